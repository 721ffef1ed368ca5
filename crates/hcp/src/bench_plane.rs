//! `hcp bench switching` and `hcp bench telemetry`: the device plane on the reference fleet.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use hcp_econ::dispatch::{DispatchConfig, Dispatcher, GpuBudget, SiteSignal};
use hcp_harness::plane::{DevicePlane, PlaneConfig};
use hcp_sim::agents::Agents;

use crate::cli::{REFERENCE_FLEET, load_fleet};
use crate::measure::{Machine, percentiles, print_report as print, quantile, thread_cpu_s};

/// What one switch took: wall times (ms) to the first batch leaving and to the whole plan sent,
/// the planning thread's CPU time for each, the first batch's size, the plan's changes, and the
/// parts of the first (decide + first step, intents, send).
struct Switch {
    first_ms: f64,
    whole_ms: f64,
    first_cpu_ms: f64,
    whole_cpu_ms: f64,
    first_batch: usize,
    changes: usize,
    parts: [f64; 3],
}

/// One signal handled as the engine handles it: the dispatcher decides every group's cut and turns
/// the first batch's worth of them into device changes (reductions first), those become intents
/// and the resource manager sends them; then the rest of the plan follows.
fn switch(
    plane: &mut DevicePlane,
    d: &mut Dispatcher,
    which: Option<hcp_model::SiteIdx>,
    signals: &[SiteSignal],
    gpus: &[GpuBudget],
) -> Switch {
    let now = plane.now_ms();
    let (c0, t) = (thread_cpu_s(), Instant::now());
    let mut run = match which {
        Some(s) => d.start_plan_sites(now, &[s], signals, 45.0, gpus, &[]),
        None => d.start_plan(now, signals, 45.0, gpus, &[]),
    };
    let first = run.step(plane.batch_max());
    let t_plan = t.elapsed().as_secs_f64() * 1e3;
    plane.apply_changes(first);
    let t_apply = t.elapsed().as_secs_f64() * 1e3;
    let n = plane.send_now(first);
    let t_first = t.elapsed().as_secs_f64() * 1e3;
    let c_first = thread_cpu_s();
    plane.apply_changes(run.step(usize::MAX));
    let plan = run.finish();
    plane.reconcile_now(d);
    let t_whole = t.elapsed().as_secs_f64() * 1e3;
    let c_whole = thread_cpu_s();
    Switch {
        first_ms: t_first,
        whole_ms: t_whole,
        first_cpu_ms: (c_first - c0) * 1e3,
        whole_cpu_ms: (c_whole - c0) * 1e3,
        first_batch: n,
        changes: plan.changes.len(),
        parts: [t_plan, t_apply - t_plan, t_first - t_apply],
    }
}

/// The figures of a case's switches.
fn case(v: &[Switch]) -> serde_json::Value {
    let col = |f: &dyn Fn(&Switch) -> f64| -> Vec<f64> { v.iter().map(f).collect() };
    let median = |f: &dyn Fn(&Switch) -> f64| {
        let mut c = col(f);
        c.sort_by(f64::total_cmp);
        quantile(&c, 0.5)
    };
    serde_json::json!({
        "runs": v.len(),
        "signal_to_first_batch_ms": {
            "wall": percentiles(&mut col(&|s| s.first_ms)),
            "thread_cpu": percentiles(&mut col(&|s| s.first_cpu_ms)),
            "target_p99": 10.0,
        },
        "first_batch_commands": percentiles(&mut col(&|s| s.first_batch as f64)),
        "signal_to_whole_plan_sent_ms": {
            "wall": percentiles(&mut col(&|s| s.whole_ms)),
            "thread_cpu": percentiles(&mut col(&|s| s.whole_cpu_ms)),
        },
        "changes_per_event": percentiles(&mut col(&|s| s.changes as f64)),
        "median_parts_ms": {
            "decide_and_first_step": median(&|s| s.parts[0]),
            "intents": median(&|s| s.parts[1]),
            "send": median(&|s| s.parts[2]),
        },
    })
}

/// From a price signal arriving to the first command batch leaving, in memory (no store, bus or
/// agent link: `--end-to-end` has them), in three cases:
/// - a grid event on the running fleet: from a settled state (every ASIC running), a spike sleeps
///   every ASIC; the first batch is a full batch of reductions. Repeated from a copy of the
///   settled state (the copy is not timed).
/// - flips: every other event flips the whole fleet (a spike, then its end) with 20 s of devices
///   acting and reporting between events (not timed); wake-ups are staggered per feeder, so the
///   fleet is never settled and first batches are small.
/// - one site's price moving 3 USD/MWh, 10 s after each flip (the everyday case).
pub fn switching(json: bool, fleet: Option<&Path>, events: usize) -> Result<ExitCode> {
    if !(10..=10_000).contains(&events) {
        anyhow::bail!("--events: must be between 10 and 10000");
    }
    let machine = Machine::start();
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let cfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..DispatchConfig::default() };
    let mut d = Dispatcher::new(&fleet, cfg, 0);
    let gpus = hcp_harness::policies::gpu_budgets(&fleet, &fleet.groups());
    let t_build = Instant::now();
    let mut plane =
        DevicePlane::new(&fleet, PlaneConfig::default(), 7, 0, &d, 1).map_err(|e| anyhow::anyhow!("plane: {e}"))?;
    let build_s = t_build.elapsed().as_secs_f64();
    let sites = fleet.sites.len();
    // Every device has reported once; then a low price runs the fleet and it settles.
    plane.advance_to(20_000, &mut d);
    switch(&mut plane, &mut d, None, &vec![SiteSignal::new(25.0, 20_000, 25.0); sites], &gpus);
    plane.advance_to(200_000, &mut d);
    plane.take_output();
    // Grid events on the running fleet.
    let mut grid = vec![];
    for k in 0..events.min(100) {
        let (mut p, mut dd) = (plane.clone(), d.clone());
        let signals = vec![SiteSignal::new(900.0 + k as f64, p.now_ms(), 25.0); sites];
        grid.push(switch(&mut p, &mut dd, None, &signals, &gpus));
    }
    // Flips and one-site moves.
    let (mut flips, mut single) = (vec![], vec![]);
    for e in 0..events {
        let now = plane.now_ms();
        let price = if e % 2 == 1 { 900.0 } else { 25.0 + (e % 7) as f64 };
        let signals = vec![SiteSignal::new(price, now, 25.0); sites];
        flips.push(switch(&mut plane, &mut d, None, &signals, &gpus));
        plane.advance_to(now + 10_000, &mut d);
        let mut one = signals.clone();
        one[0].price_usd_per_mwh += 3.0;
        one[0].price_at_ms = now + 10_000;
        single.push(switch(&mut plane, &mut d, Some(hcp_model::SiteIdx(0)), &one, &gpus));
        plane.advance_to(now + 20_000, &mut d);
        plane.take_output();
    }
    let mut one_wall: Vec<f64> = single.iter().map(|s| s.first_ms).collect();
    let mut one_cpu: Vec<f64> = single.iter().map(|s| s.first_cpu_ms).collect();
    let obj = serde_json::json!({
        "fleet": fleet.name,
        "devices": fleet.devices.len(),
        "events": events,
        "plane_build_s": build_s,
        "grid_event_on_running_fleet": case(&grid),
        "flips": case(&flips),
        "one_site_signal_to_first_batch_ms": {
            "wall": percentiles(&mut one_wall),
            "thread_cpu": percentiles(&mut one_cpu),
            "target_p99": 10.0,
        },
        "machine": machine.report(),
    });
    print(&obj, json)
}

/// Telemetry ingestion: every device reporting every 10 s for `minutes` simulated minutes, taken in
/// by the resource manager (liveness, health, settling commands) and the dispatcher (freshness,
/// efficiency), rolled up per device and minute, and the rollups written to SQLite (a fresh file)
/// or the store at `store_url`. The agents' own simulation is timed alone on the same seed and
/// subtracted.
pub fn telemetry(json: bool, fleet: Option<&Path>, minutes: u32, store_url: Option<&str>) -> Result<ExitCode> {
    if !(1..=60).contains(&minutes) {
        anyhow::bail!("--minutes: must be between 1 and 60");
    }
    let machine = Machine::start();
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let span_ms = i64::from(minutes) * 60_000;
    let cfg = PlaneConfig::default();
    let step_ms = cfg.step_ms;
    // The agents alone.
    let mut agents = Agents::new(&fleet, cfg.agents.clone(), 7, 0).map_err(|e| anyhow::anyhow!("agents: {e}"))?;
    let (mut reports, mut answers) = (vec![], vec![]);
    let mut generated = 0u64;
    let t = Instant::now();
    let mut now = 0;
    while now + step_ms <= span_ms {
        now += step_ms;
        agents.step(now, &mut reports, &mut answers);
        generated += reports.len() as u64;
        reports.clear();
        answers.clear();
    }
    let agents_s = t.elapsed().as_secs_f64();
    // The same agents through the plane.
    let mut d = Dispatcher::new(&fleet, DispatchConfig::default(), 0);
    let mut plane = DevicePlane::new(&fleet, cfg, 7, 0, &d, 1).map_err(|e| anyhow::anyhow!("plane: {e}"))?;
    let t = Instant::now();
    plane.advance_to(span_ms + 60_000, &mut d);
    let plane_s = t.elapsed().as_secs_f64();
    let out = plane.take_output();
    // The agents alone ran one minute less; scale their time to the plane's span.
    let agents_scaled_s = agents_s * (span_ms + 60_000) as f64 / span_ms as f64;
    let ingest_s = (plane_s - agents_scaled_s).max(1e-9);
    let rows: Vec<hcp_store::DeviceMinuteRow> = out.minutes.iter().map(hcp_server::engine::minute_row).collect();
    let dir = std::env::temp_dir().join(format!("hcp-bench-telemetry-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = match store_url {
        Some(u) => u.to_string(),
        None => format!("sqlite:{}", dir.join("bench.db").display()),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let store_s = rt.block_on(async {
        let store = hcp_store::Store::open(&url).await.context("--store")?;
        store.migrate().await?;
        let t = Instant::now();
        // One minute's rows per write, as the engine writes them.
        for chunk in rows.chunk_by(|a, b| a.minute_ms == b.minute_ms) {
            store.put_device_minutes(chunk).await?;
        }
        let s = t.elapsed().as_secs_f64();
        store.close().await;
        anyhow::Ok(s)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let store_s = store_s?;
    let needed = fleet.devices.len() as f64 / 10.0;
    let ingest_rate = out.reports as f64 / ingest_s;
    let row_rate = rows.len() as f64 / store_s;
    // Reports per second one core sustains with their rollups stored.
    let sustained = out.reports as f64 / (ingest_s + store_s);
    let obj = serde_json::json!({
        "machine": machine.report(),
        "fleet": fleet.name,
        "devices": fleet.devices.len(),
        "simulated_minutes": minutes + 1,
        "reports": out.reports,
        "reports_generated_by_agents_alone": generated,
        "agents_s": agents_scaled_s,
        "plane_s": plane_s,
        "ingest_s": ingest_s,
        "ingest_reports_per_s": ingest_rate,
        "minute_rows": rows.len(),
        "store": if store_url.is_some() { "given" } else { "sqlite file" },
        "store_s": store_s,
        "store_rows_per_s": row_rate,
        "sustained_reports_per_s_one_core": sustained,
        "needed_reports_per_s": needed,
        "core_share_needed": needed / sustained,
    });
    print(&obj, json)
}
