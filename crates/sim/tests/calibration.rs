//! Calibration against real data in `shared/data` (beside the project root). These tests fail if a
//! simulator drifts from what it claims to reproduce.

use std::path::PathBuf;

use hcp_sim::grid::{self, GridParams, GridRun};
use hcp_sim::replay::{GridSeries, load_grid_csv};
use hcp_sim::stats::PriceStats;

pub fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared").join(rel)
}

fn ercot() -> GridSeries {
    let path = shared("data/ercot/hb_south_15min_2024-06_2024-11.csv");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    load_grid_csv(&path.display().to_string(), f).unwrap().into_values().next().unwrap()
}

/// Fit on the real file, simulate the same period with several seeds, compare distributions.
/// Tolerances (stated in docs/simulators.md): mean and median within 15 %, p99 within 30 %,
/// negative share within a factor of 2 (or 0.3 percentage points), spikes above 1,000 USD/MWh per
/// month within a factor of 2.5 (or 1 per month), averaged over 5 seeds.
#[test]
fn grid_simulator_matches_the_real_ercot_distribution() {
    let real = ercot();
    let rs = PriceStats::of(&real.rt_prices(), real.interval_ms);
    let params = GridParams::fit(&real);
    params.validate().unwrap();
    let sp = [real.settlement_point.clone()];
    let seeds = 5;
    let mut sims = vec![];
    for seed in 0..seeds {
        let s = grid::simulate(&GridRun {
            params: &params,
            from: real.start(),
            to: real.end(),
            seed,
            settlement_points: &sp,
        })
        .remove(0);
        assert_eq!(s.signals.len(), real.signals.len());
        sims.push(PriceStats::of(&s.rt_prices(), s.interval_ms));
    }
    let avg = |f: fn(&PriceStats) -> f64| sims.iter().map(f).sum::<f64>() / seeds as f64;
    let (mean, median, p99) = (avg(|s| s.mean), avg(|s| s.median), avg(|s| s.p99));
    let (neg, spikes) = (avg(|s| s.negative_share), avg(|s| s.spikes_over_1000_per_month));
    eprintln!("real {rs:?}\nsim mean {mean:.2} median {median:.2} p99 {p99:.1} neg {neg:.4} spikes/month {spikes:.2}");
    assert!((mean / rs.mean - 1.0).abs() < 0.15, "mean {mean} vs {}", rs.mean);
    assert!((median / rs.median - 1.0).abs() < 0.15, "median {median} vs {}", rs.median);
    assert!((p99 / rs.p99 - 1.0).abs() < 0.30, "p99 {p99} vs {}", rs.p99);
    assert!(
        (neg - rs.negative_share).abs() < 0.003 || (0.5..2.0).contains(&(neg / rs.negative_share)),
        "neg {neg} vs {}",
        rs.negative_share
    );
    let sr = spikes / rs.spikes_over_1000_per_month;
    assert!(
        (spikes - rs.spikes_over_1000_per_month).abs() < 1.0 || (0.4..2.5).contains(&sr),
        "spikes {spikes} vs {}",
        rs.spikes_over_1000_per_month
    );
}
