//! Whole-platform simulation tests: determinism, invariants under random seeds and fleets,
//! agreement of the two fidelities, and that a broken controller is caught with its seed.

use hcp_harness::*;
use hcp_model::fleet::Fleet;
use hcp_model::time::{MS_PER_DAY, SimTime};
use hcp_model::units::MicroUsd;
use hcp_model::{ModelRef, Reliability};
use hcp_sim::asic::{AsicTarget, IdleMode};
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::{Fidelity, GroupTarget};
use hcp_sim::gpu::GpuTarget;
use hcp_sim::market::MarketParams;
use proptest::prelude::*;

fn small() -> Fleet {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml");
    Fleet::from_toml(path, &std::fs::read_to_string(path).unwrap()).unwrap()
}

fn scenario(from: &str, days: f64, fidelity: Fidelity, seed: u64) -> Scenario {
    let from = SimTime::parse(from).unwrap();
    Scenario {
        from,
        to: from.plus_ms((days * MS_PER_DAY as f64) as i64),
        interval_ms: 15 * 60_000,
        fidelity,
        seed,
        energy_adder_usd_per_mwh: 5.0,
    }
}

fn run(fleet: &Fleet, sc: Scenario, mode: BaselineMode) -> Result<(Summary, Vec<SiteRow>), Violation> {
    let mut h = Harness::new(
        fleet,
        sc,
        GridSource::Simulated(Box::default()),
        MarketSource::Simulated(MarketParams::default()),
        DemandSource::Simulated(DemandParams::default()),
    )
    .unwrap();
    let mut rows = vec![];
    let s = h.run(&mut Baseline { mode }, &mut |r| rows.push(r.clone()), &mut |_, _| {})?;
    Ok((s, rows))
}

#[test]
fn same_seed_same_rows_other_seed_other_rows() {
    let f = small();
    let a = run(&f, scenario("2024-07-01", 1.0, Fidelity::Device, 11), BaselineMode::Breakeven).unwrap();
    let b = run(&f, scenario("2024-07-01", 1.0, Fidelity::Device, 11), BaselineMode::Breakeven).unwrap();
    let c = run(&f, scenario("2024-07-01", 1.0, Fidelity::Device, 12), BaselineMode::Breakeven).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.1, c.1);
}

#[test]
fn money_in_rows_adds_up_to_the_summary() {
    let f = small();
    let (s, rows) = run(&f, scenario("2024-08-01", 3.0, Fidelity::Cohort, 3), BaselineMode::Breakeven).unwrap();
    let rev = rows.iter().fold(MicroUsd::ZERO, |a, r| a + r.mining_revenue);
    let cost = rows.iter().fold(MicroUsd::ZERO, |a, r| a + r.energy_cost);
    assert_eq!((rev, cost), (s.total.mining_revenue, s.total.energy_cost));
    assert_eq!(rows.len(), 2 * 3 * 96);
    // The fleet's mean power is the sum of its sites'; its period is counted once.
    let sites_mw: f64 = s.sites.iter().map(|(_, t)| t.mean_mw()).sum();
    assert!((s.total.mean_mw() - sites_mw).abs() < 1e-9 && (s.total.hours - 72.0).abs() < 1e-9);
    assert!(s.total.peak_mw <= s.sites.iter().map(|(_, t)| t.peak_mw).sum::<f64>() + 1e-9);
    for r in &rows {
        assert!(r.peak_mw <= r.cap_mw + 1e-9);
        // Cost is energy x (price + adder), rounded once.
        let expect = MicroUsd::from_usd_f64(r.energy_mwh * (r.rt_price_usd_per_mwh + 5.0));
        assert_eq!(r.energy_cost, expect);
    }
}

#[test]
fn breakeven_sleeps_asics_when_prices_spike() {
    let f = small();
    let (_, rows) = run(&f, scenario("2024-06-01", 30.0, Fidelity::Cohort, 2), BaselineMode::Breakeven).unwrap();
    let spikes: Vec<_> =
        rows.windows(2).filter(|w| w[0].site == "tx-south" && w[0].rt_price_usd_per_mwh > 500.0).collect();
    assert!(!spikes.is_empty(), "a month of simulated prices has spikes");
    // Decisions use the last known price: the interval after a spike has no hashing.
    let after: Vec<_> = rows
        .iter()
        .zip(rows.iter().skip(2))
        .filter(|(a, _)| a.site == "tx-south" && a.rt_price_usd_per_mwh > 500.0)
        .map(|(_, b)| b)
        .collect();
    assert!(after.iter().all(|r| r.asics_hashing == 0.0), "ASICs sleep after a spike");
    let (on, _) = run(&f, scenario("2024-06-01", 30.0, Fidelity::Cohort, 2), BaselineMode::AlwaysOn).unwrap();
    let (be, _) = run(&f, scenario("2024-06-01", 30.0, Fidelity::Cohort, 2), BaselineMode::Breakeven).unwrap();
    assert!(be.total.energy_mwh < on.total.energy_mwh);
    assert!(be.total.energy_cost < on.total.energy_cost);
}

/// The two fidelities share physics; on aggregate power and hashrate they agree within 0.5 %
/// over a week with curtailment, and within 1 % with fault rates fifty times the defaults.
#[test]
fn device_and_cohort_fidelities_agree() {
    let mut f = small();
    for (scale, tol) in [(1.0, 0.005), (50.0, 0.01)] {
        let r = Reliability::default();
        f.reliability = Reliability {
            asic_reboots_per_day: r.asic_reboots_per_day * scale,
            asic_board_failures_per_day: r.asic_board_failures_per_day * scale,
            asic_fan_failures_per_day: r.asic_fan_failures_per_day * scale,
            gpu_xid_per_day: r.gpu_xid_per_day * scale,
            ..r
        };
        let (d, _) = run(&f, scenario("2024-07-08", 7.0, Fidelity::Device, 4), BaselineMode::Breakeven).unwrap();
        let (c, _) = run(&f, scenario("2024-07-08", 7.0, Fidelity::Cohort, 4), BaselineMode::Breakeven).unwrap();
        let rel = |a: f64, b: f64| (a / b - 1.0).abs();
        let e = rel(d.total.energy_mwh, c.total.energy_mwh);
        let h = rel(d.total.mean_hashrate_ph_s(), c.total.mean_hashrate_ph_s());
        let m = rel(d.total.mining_energy_mwh, c.total.mining_energy_mwh);
        eprintln!("fault scale {scale}: energy {e:.4}, mining energy {m:.4}, hashrate {h:.4}");
        assert!(e < tol && h < tol && m < tol, "scale {scale}: energy {e}, mining energy {m}, hashrate {h}");
        assert!(d.total.asic_faults > 0.0 && c.total.asic_faults > 0.0);
    }
}

/// A controller that ignores the caps.
struct Reckless;

impl Controller for Reckless {
    fn name(&self) -> &str {
        "reckless"
    }
    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        ctx.groups
            .iter()
            .map(|g| match g.model {
                ModelRef::Asic(a) => GroupTarget::Asic(AsicTarget::uniform(
                    g.count(),
                    ctx.fleet.catalogue.asic(a).max_power_w,
                    IdleMode::Sleep,
                )),
                ModelRef::Gpu(_) => GroupTarget::Gpu(GpuTarget { serving: g.count(), cap_w: 700.0, idle_off: false }),
            })
            .collect()
    }
}

#[test]
fn a_cap_violation_is_caught_with_its_seed() {
    let mut f = small();
    f.sites[0].power_cap_w = 0.3e6;
    let mut h = Harness::new(
        &f,
        scenario("2024-07-01", 1.0, Fidelity::Cohort, 77),
        GridSource::Simulated(Box::default()),
        MarketSource::Simulated(MarketParams::default()),
        DemandSource::Simulated(DemandParams::default()),
    )
    .unwrap();
    let v = h.run(&mut Reckless, &mut |_| {}, &mut |_, _| {}).unwrap_err();
    assert_eq!(v.seed, 77);
    assert!(v.to_string().contains("site tx-south draws") && v.to_string().ends_with("(seed=77)"), "{v}");
}

#[test]
fn setup_errors_name_the_field() {
    let f = small();
    let mk = |sc: Scenario| {
        Harness::new(
            &f,
            sc,
            GridSource::Simulated(Box::default()),
            MarketSource::Simulated(MarketParams::default()),
            DemandSource::Simulated(DemandParams::default()),
        )
        .err()
        .unwrap()
    };
    let mut sc = scenario("2024-07-01", 1.0, Fidelity::Cohort, 1);
    sc.to = sc.from;
    assert_eq!(mk(sc).field, "to");
    let mut sc = scenario("2024-07-01", 1.0, Fidelity::Device, 1);
    sc.interval_ms = 15_000;
    assert_eq!(mk(sc).field, "step");
}

/// Recorded prices that needed repair, or that are of another settlement point than a site's,
/// are said in the run's notes (never silent): per series used, with the sites concerned.
#[test]
fn repaired_or_foreign_prices_are_said() {
    let f = small();
    let grid = |points: &[&str], repeat: bool| {
        let mut text = String::from("interval_start,settlement_point,rt_price_usd_per_mwh\n");
        for sp in points {
            for q in 0..(96 * 3) {
                let t = SimTime::parse("2024-07-01").unwrap().plus_ms(q * 900_000);
                text.push_str(&format!("{t},{sp},{}\n", 20 + q % 7));
                if repeat && q == 10 {
                    text.push_str(&format!("{t},{sp},99\n"));
                }
            }
        }
        hcp_sim::replay::load_grid_csv("p.csv", text.as_bytes()).unwrap()
    };
    let notes = |g| {
        Harness::new(
            &f,
            scenario("2024-07-01T06:00", 1.0, Fidelity::Cohort, 1),
            GridSource::Recorded(g),
            MarketSource::Simulated(MarketParams::default()),
            DemandSource::Simulated(DemandParams::default()),
        )
        .unwrap()
        .notes()
        .to_vec()
    };
    // One file per site's point, one of them with a repeated timestamp.
    let n = notes(grid(&["HB_SOUTH", "HB_WEST"], true));
    assert!(n.iter().any(|x| x.contains("prices of HB_WEST") && x.contains("1 repeated timestamps dropped")), "{n:?}");
    assert!(n.iter().any(|x| x.contains("prices of HB_SOUTH") && x.contains("1 repeated")), "{n:?}");
    // One point only, another site's: a warning naming the sites priced with it.
    let n = notes(grid(&["HB_NORTH"], false));
    assert!(
        n.iter().any(|x| x.starts_with("warning: the price file holds only settlement point HB_NORTH")
            && x.contains("(HB_SOUTH)")
            && x.contains("(HB_WEST)")),
        "{n:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Invariants (caps, feeder limits, device counts, energy balance) hold for any seed, start
    /// date, policy and fault rates; and the same seed replays exactly.
    #[test]
    fn invariants_hold_for_any_seed(seed in 0u64..1_000_000, day in 0i64..365, always_on in any::<bool>(), faults in 0.0f64..200.0) {
        let mut f = small();
        f.reliability.asic_reboots_per_day = faults / 10.0;
        f.reliability.asic_fan_failures_per_day = faults / 100.0;
        f.reliability.gpu_xid_per_day = faults / 10.0;
        let from = SimTime::parse("2024-01-01").unwrap().plus_ms(day * MS_PER_DAY);
        let sc = Scenario { from, to: from.plus_ms(MS_PER_DAY / 4), interval_ms: 15 * 60_000, fidelity: Fidelity::Device, seed, energy_adder_usd_per_mwh: 0.0 };
        let mode = if always_on { BaselineMode::AlwaysOn } else { BaselineMode::Breakeven };
        let a = run(&f, sc.clone(), mode);
        prop_assert!(a.is_ok(), "{}", a.unwrap_err());
        let b = run(&f, sc, mode);
        prop_assert_eq!(a.unwrap(), b.unwrap());
    }
}
