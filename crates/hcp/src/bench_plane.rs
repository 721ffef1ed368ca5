//! `hcp bench switching` and `hcp bench telemetry`: the device plane on the reference fleet.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use hcp_econ::dispatch::{DispatchConfig, Dispatcher, SiteSignal};
use hcp_harness::plane::{DevicePlane, PlaneConfig};
use hcp_sim::agents::Agents;

use crate::cli::{REFERENCE_FLEET, load_fleet};

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn print(obj: &serde_json::Value, json: bool) -> Result<ExitCode> {
    if json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(obj)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// From a price signal arriving to the first command batch leaving: the dispatcher's plan, the
/// plan's changes turned into intents, and the resource manager's reconcile. Every other event
/// flips the whole fleet (a spike, then its end); between events the simulated devices act and
/// report for 20 s (not timed).
pub fn switching(json: bool, fleet: Option<&Path>, events: usize) -> Result<ExitCode> {
    if !(10..=10_000).contains(&events) {
        anyhow::bail!("--events: must be between 10 and 10000");
    }
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let cfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..DispatchConfig::default() };
    let mut d = Dispatcher::new(&fleet, cfg, 0);
    let gpus = hcp_harness::policies::gpu_budgets(&fleet, &fleet.groups());
    let t_build = Instant::now();
    let mut plane =
        DevicePlane::new(&fleet, PlaneConfig::default(), 7, 0, &d, 1).map_err(|e| anyhow::anyhow!("plane: {e}"))?;
    let build_s = t_build.elapsed().as_secs_f64();
    // Every device has reported once before the first signal.
    plane.advance_to(20_000, &mut d);
    plane.take_output();
    let (mut lat, mut batch, mut changes, mut parts, mut single) = (vec![], vec![], vec![], vec![], vec![]);
    for e in 0..events {
        let now = plane.now_ms();
        let price = if e % 2 == 1 { 900.0 } else { 25.0 + (e % 7) as f64 };
        let signals = vec![SiteSignal::new(price, now, 25.0); fleet.sites.len()];
        let t = Instant::now();
        let plan = d.plan(now, &signals, 45.0, &gpus, &[]);
        let t_plan = t.elapsed().as_secs_f64() * 1e3;
        plane.apply_plan(&plan);
        let t_apply = t.elapsed().as_secs_f64() * 1e3;
        let n = plane.reconcile_now(&mut d);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        parts.push((t_plan, t_apply - t_plan, lat[lat.len() - 1] - t_apply));
        batch.push(n as f64);
        changes.push(plan.changes.len() as f64);
        // One site's price moves a little 10 s later (the everyday case).
        plane.advance_to(now + 10_000, &mut d);
        let mut one = signals.clone();
        one[0].price_usd_per_mwh += 3.0;
        one[0].price_at_ms = now + 10_000;
        let t = Instant::now();
        let plan = d.plan_sites(now + 10_000, &[hcp_model::SiteIdx(0)], &one, 45.0, &gpus, &[]);
        plane.apply_plan(&plan);
        plane.reconcile_now(&mut d);
        single.push(t.elapsed().as_secs_f64() * 1e3);
        plane.advance_to(now + 20_000, &mut d);
        plane.take_output();
    }
    for v in [&mut lat, &mut batch, &mut changes, &mut single] {
        v.sort_by(f64::total_cmp);
    }
    let (l, b, c) = (&lat[..], &batch[..], &changes[..]);
    let median = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = parts.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5)
    };
    let obj = serde_json::json!({
        "fleet": fleet.name,
        "devices": fleet.devices.len(),
        "events": events,
        "median_parts_ms": { "plan": median(|p| p.0), "intents": median(|p| p.1), "reconcile": median(|p| p.2) },
        "plane_build_s": build_s,
        "signal_to_first_batch_ms": {
            "p50": quantile(l, 0.5),
            "p99": quantile(l, 0.99),
            "max": l[l.len() - 1],
            "target_p99": 10.0,
        },
        "one_site_signal_to_first_batch_ms": {
            "p50": quantile(&single, 0.5),
            "p99": quantile(&single, 0.99),
            "target_p99": 10.0,
        },
        "changes_per_event": { "p50": quantile(c, 0.5), "max": c[c.len() - 1] },
        "first_batch_commands": { "p50": quantile(b, 0.5), "max": b[b.len() - 1] },
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
