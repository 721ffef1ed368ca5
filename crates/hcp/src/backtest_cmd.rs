//! `hcp backtest`: the four policies over a recorded period, compared.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hcp_econ::dispatch::DispatchConfig;
use hcp_harness::backtest::{BacktestError, BacktestInput, Outcome, PolicyKind, backtest};
use hcp_model::signals::MarketSignal;
use hcp_model::time::SimTime;
use hcp_sim::market::{MarketParams, MarketSim};
use hcp_sim::replay;

use crate::cli::{SMALL_FLEET, load_fleet};

#[derive(clap::Args)]
pub struct BacktestArgs {
    /// Fleet file (TOML).
    #[arg(long)]
    fleet: PathBuf,
    /// Recorded real-time (and day-ahead) prices, CSV (the layout of shared/data/ercot).
    #[arg(long)]
    prices: PathBuf,
    /// A constant hashprice for the whole period (USD per PH/s per day).
    #[arg(long, conflicts_with = "market")]
    hashprice_usd_per_ph_day: Option<f64>,
    /// Recorded market series (CSV: timestamp,btc_usd,difficulty[,fees_btc_per_block] or
    /// timestamp,hashprice_usd_per_ph_day). Default: the simulated market.
    #[arg(long)]
    market: Option<PathBuf>,
    /// One policy (default: all four, compared).
    #[arg(long, value_parser = parse_policy)]
    policy: Option<PolicyKind>,
    /// One JSON object per policy, in an array.
    #[arg(long)]
    json: bool,
    /// Draw price against the power split over time (the optimizer's run, or the one policy's).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Start and end (exclusive) inside the price file. Default: the whole file.
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    to: Option<String>,
    /// Fixed charges added to the energy price (USD/MWh).
    #[arg(long, default_value_t = 0.0)]
    adder_usd_per_mwh: f64,
    /// Transmission charge set by the 4CP peaks (USD per kW-year, 50-150 in ERCOT); 0 leaves
    /// 4CP out of the margin.
    #[arg(long, default_value_t = 0.0)]
    four_cp_usd_per_kw_year: f64,
    /// Megawatts per site sold into grid programs (ECRS, Non-Spin, ERS): the optimizer honours
    /// the simulated deployments on the price file and earns the availability payment.
    #[arg(long, default_value_t = 0.0)]
    grid_commit_mw: f64,
    /// Availability payment per committed MW-hour (USD).
    #[arg(long, default_value_t = 0.0)]
    credit_usd_per_mw_h: f64,
    /// The dispatcher's dead band against flapping (USD/MWh).
    #[arg(long)]
    hysteresis_usd_per_mwh: Option<f64>,
    /// The dispatcher's minimum on and off time per device (minutes).
    #[arg(long)]
    min_on_off_min: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse().map_err(|e: hcp_model::Invalid| e.to_string())
}

pub fn run(a: &BacktestArgs) -> Result<ExitCode> {
    let fleet = load_fleet(Some(&a.fleet), SMALL_FLEET)?;
    let name = a.prices.display().to_string();
    let prices =
        replay::load_grid_csv(&name, std::fs::File::open(&a.prices).with_context(|| format!("open prices {name}"))?)?;
    let start = prices.values().map(|s| s.start()).max().expect("non-empty");
    let end = prices.values().map(|s| s.end()).min().expect("non-empty");
    let from = match &a.from {
        Some(s) => SimTime::parse(s).context("--from")?,
        None => start,
    };
    let to = match &a.to {
        Some(s) => SimTime::parse(s).context("--to")?,
        None => end,
    };
    let market: Vec<MarketSignal> = match (&a.hashprice_usd_per_ph_day, &a.market) {
        (Some(hp), _) => {
            if !(hp.is_finite() && *hp > 0.0 && *hp < 10_000.0) {
                bail!("--hashprice-usd-per-ph-day: must be a number > 0 and < 10000, got {hp}");
            }
            let mut m = MarketSim::new(MarketParams::default(), from, a.seed).signal();
            m.at = from;
            m.hashprice_usd_per_ph_day = *hp;
            vec![m]
        }
        (None, Some(p)) => replay::load_market_csv(
            &p.display().to_string(),
            std::fs::File::open(p).with_context(|| format!("open market {}", p.display()))?,
        )?,
        (None, None) => {
            MarketSim::simulate(&MarketParams::default(), from, to.max(from.plus_ms(1)), 15 * 60_000, a.seed)
        }
    };
    if !a.adder_usd_per_mwh.is_finite() {
        bail!("--adder-usd-per-mwh: must be a finite number");
    }
    if !(a.grid_commit_mw.is_finite() && a.grid_commit_mw >= 0.0) {
        bail!("--grid-commit-mw: must be a number >= 0");
    }
    if !(a.credit_usd_per_mw_h.is_finite() && a.credit_usd_per_mw_h >= 0.0) {
        bail!("--credit-usd-per-mw-h: must be a number >= 0");
    }
    if !(a.four_cp_usd_per_kw_year.is_finite() && (0.0..=10_000.0).contains(&a.four_cp_usd_per_kw_year)) {
        bail!("--four-cp-usd-per-kw-year: must be between 0 and 10000");
    }
    let input = BacktestInput {
        fleet: &fleet,
        prices,
        market,
        from,
        to,
        seed: a.seed,
        energy_adder_usd_per_mwh: a.adder_usd_per_mwh,
        dispatch: dispatch_config(a)?,
        four_cp_usd_per_kw_year: a.four_cp_usd_per_kw_year,
        commit_mw: a.grid_commit_mw,
        credit_usd_per_mw_h: a.credit_usd_per_mw_h,
    };
    let policies: Vec<PolicyKind> = match a.policy {
        Some(p) => vec![p],
        None => PolicyKind::ALL.to_vec(),
    };
    let outcomes = match backtest(&input, &policies) {
        Ok(o) => o,
        Err(BacktestError::Violation(v)) => return Ok(crate::cli::violation_exit(&v)),
        Err(BacktestError::Setup(e)) => return Err(e.into()),
    };
    // What the inputs needed (a series applied to sites at other points, repaired intervals):
    // on stderr, so that --json stays one document on stdout.
    for n in input.notes().unwrap_or_default() {
        eprintln!("hcp backtest: {n}");
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&outcomes.iter().map(hcp_server::dashboard::outcome_json).collect::<Vec<_>>())?
        );
    } else {
        print!("{}", table(&fleet.name, from, to, &outcomes));
        print!("{}", batch_table(&input.prices, from, to, a.seed));
    }
    if let Some(path) = &a.chart {
        let o = outcomes.iter().find(|o| o.policy == PolicyKind::Optimizer).unwrap_or(&outcomes[0]);
        write_chart(path, &format!("{} — {} ({} .. {})", fleet.name, o.policy.name(), from, to), o)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Batch deferral on the first price series: the default stream of batch jobs run at once, by
/// the planner on what it knew, and by the planner on the actual prices (`hcp_harness::batchtest`).
fn batch_table(
    prices: &std::collections::BTreeMap<String, replay::GridSeries>,
    from: SimTime,
    to: SimTime,
    seed: u64,
) -> String {
    use hcp_harness::batchtest::{BatchStream, arrivals, run};
    let mut s = String::new();
    let Some((point, series)) = prices.iter().next() else { return s };
    let stream = BatchStream::default();
    // Arrivals stop two days before the end, so every deadline falls inside the prices.
    let jobs = arrivals(&stream, from.max(series.start()), to.min(series.end()).plus_ms(-2 * 86_400_000), seed);
    if jobs.is_empty() {
        return s;
    }
    let runs = run(series, &stream, &jobs);
    let _ = writeln!(
        s,
        "\nbatch jobs at {point}: {} jobs of {} GPUs, {}-{} h each with {}-{} h of slack, {} GPUs free, {:.0} W per GPU",
        jobs.len(),
        stream.gpus_per_job,
        stream.run_h.0,
        stream.run_h.1,
        stream.slack_h.0,
        stream.slack_h.1,
        stream.pool_gpus,
        stream.gpu_draw_w
    );
    let _ = writeln!(
        s,
        "{:<18} {:>12} {:>14} {:>12} {:>10} {:>8} {:>12}",
        "placement", "energy MWh", "energy USD", "USD/MWh", "saved", "late", "wait h mean"
    );
    let base = runs[0].cost_usd;
    for r in &runs {
        let _ = writeln!(
            s,
            "{:<18} {:>12.1} {:>14.0} {:>12.2} {:>9.1}% {:>8} {:>12.2}",
            r.policy,
            r.energy_mwh,
            r.cost_usd,
            r.usd_per_mwh,
            if base.abs() > 0.0 { (base - r.cost_usd) / base.abs() * 100.0 } else { 0.0 },
            r.late,
            r.mean_wait_h
        );
    }
    s
}

fn dispatch_config(a: &BacktestArgs) -> Result<DispatchConfig> {
    let mut cfg = DispatchConfig { energy_adder_usd_per_mwh: a.adder_usd_per_mwh, ..Default::default() };
    if let Some(h) = a.hysteresis_usd_per_mwh {
        if !(h.is_finite() && (0.0..=1_000.0).contains(&h)) {
            bail!("--hysteresis-usd-per-mwh: must be between 0 and 1000");
        }
        cfg.hysteresis_usd_per_mwh = h;
    }
    if let Some(m) = a.min_on_off_min {
        if !(m.is_finite() && (0.0..=1_440.0).contains(&m)) {
            bail!("--min-on-off-min: must be between 0 and 1440 minutes");
        }
        cfg.min_on_ms = (m * 60_000.0) as i64;
        cfg.min_off_ms = cfg.min_on_ms;
    }
    Ok(cfg)
}

fn write_chart(path: &Path, title: &str, o: &Outcome) -> Result<()> {
    std::fs::write(path, crate::chart::svg(title, &o.chart)).with_context(|| format!("write chart {}", path.display()))
}

fn table(fleet: &str, from: SimTime, to: SimTime, outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "backtest of fleet {fleet}, {from} .. {to}");
    let _ = writeln!(
        s,
        "{:<18} {:>12} {:>14} {:>14} {:>14} {:>10} {:>12} {:>14} {:>12} {:>8}",
        "policy",
        "energy MWh",
        "mining USD",
        "inference USD",
        "energy USD",
        "credits",
        "4CP USD",
        "margin USD",
        "sw/dev/day",
        "uplift"
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "{:<18} {:>12.1} {:>14.0} {:>14.0} {:>14.0} {:>10.0} {:>12.0} {:>14.0} {:>12.3} {:>8.3}",
            o.policy.name(),
            o.energy_mwh,
            o.mining_revenue.as_usd_f64(),
            o.inference_revenue.as_usd_f64(),
            o.energy_cost.as_usd_f64(),
            o.credits.as_usd_f64(),
            o.four_cp.as_usd_f64(),
            o.margin.as_usd_f64(),
            o.switches_per_device_day,
            o.uplift_captured
        );
    }
    for o in outcomes {
        if let Some(p) = o.strike {
            let _ = writeln!(
                s,
                "strike tuned on the period: {:.0} USD/MWh, curtail after {} intervals above, resume after {} below",
                p.strike_usd_per_mwh, p.curtail_after, p.resume_after
            );
        }
    }
    s
}
