//! The engine loop of `hcp up`: the simulated sites, market and grid (the seeded harness) with the
//! economic dispatcher deciding every interval, run on a worker thread at `speed` simulated seconds
//! per wall second. Each interval's plan, decisions with their reasons, site power split and signals
//! are written to storage first and then announced on the bus (`hcp.interval.<site>`,
//! `hcp.decision.<site>`, `hcp.plan`), so that what a subscriber sees is always in storage.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hcp_econ::dispatch::{DispatchConfig, Plan, Reason};
use hcp_harness::controller::{Controller, DecisionContext};
use hcp_harness::policies::DispatchPolicy;
use hcp_harness::run::{DemandSource, GridSource, Harness, MarketSource, Scenario, SiteRow};
use hcp_model::SimTime;
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::{Fidelity, GroupTarget};
use hcp_sim::market::MarketParams;
use hcp_store::{DecisionRow, SignalRow, SiteSecondRow};

use crate::{App, wall_ms};

/// Telemetry kept (in simulated time): per-site interval rows 7 days, per-device minutes 30 days;
/// older rows are deleted once a simulated day.
pub const SITE_RETENTION_MS: i64 = 7 * 86_400_000;
pub const DEVICE_RETENTION_MS: i64 = 30 * 86_400_000;

/// One interval's output, handed from the simulation thread to the writer.
pub struct Interval {
    pub at: SimTime,
    pub rows: Vec<SiteRow>,
    pub plan: Option<Plan>,
}

/// Passes decisions through and hands each interval's plan to the writer.
struct Recording {
    inner: DispatchPolicy,
    plans: std::sync::mpsc::Sender<Option<Plan>>,
}

impl Controller for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn horizon_intervals(&self) -> usize {
        self.inner.horizon_intervals()
    }
    fn foresight(&self) -> bool {
        false
    }
    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        let started = Instant::now();
        let t = self.inner.decide(ctx);
        metrics::histogram!("hcp_plan_seconds").record(started.elapsed().as_secs_f64());
        let _ = self.plans.send(self.inner.last_plan.clone());
        t
    }
}

/// A stable name and a short text for a reason.
pub fn describe(r: &Reason, fleet: &hcp_model::fleet::Fleet) -> (String, String, String) {
    let site = |s: hcp_model::ids::SiteIdx| fleet.sites[s.index()].id.clone();
    match r {
        Reason::PriceAboveValue { site: s, model, price_usd_per_mwh, value_usd_per_mwh } => (
            site(*s),
            "price_above_value".into(),
            format!("{model}: price {price_usd_per_mwh:.1} USD/MWh above its value {value_usd_per_mwh:.1}"),
        ),
        Reason::PriceBelowValue { site: s, model, price_usd_per_mwh, value_usd_per_mwh } => (
            site(*s),
            "price_below_value".into(),
            format!("{model}: value {value_usd_per_mwh:.1} USD/MWh beats price {price_usd_per_mwh:.1}"),
        ),
        Reason::SiteCap { site: s, cap_mw, budget_for_asics_mw } => {
            (site(*s), "site_cap".into(), format!("cap {cap_mw:.2} MW leaves {budget_for_asics_mw:.2} MW for ASICs"))
        }
        Reason::FeederLimit { feeder, limit_mw } => {
            let f = &fleet.feeders[feeder.index()];
            (site(f.site), "feeder_limit".into(), format!("feeder {} limit {limit_mw:.2} MW", f.id))
        }
        Reason::GridCommitment { site: s, program, limit_mw, respond_by_ms } => (
            site(*s),
            "grid_commitment".into(),
            format!("{program:?}: at most {limit_mw:.2} MW within {:.0} s", *respond_by_ms as f64 / 1e3),
        ),
        Reason::StalePrice { site: s, age_ms, policy } => {
            (site(*s), "stale_price".into(), format!("price {:.0} s old: {policy:?}", *age_ms as f64 / 1e3))
        }
        Reason::Scheduled { site: s, limit_mw } => {
            (site(*s), "scheduled".into(), format!("planning path holds the site at {limit_mw:.2} MW"))
        }
        Reason::GpusCapped { site: s, planned_mw, capped_mw } => {
            (site(*s), "gpus_capped".into(), format!("GPUs capped from {planned_mw:.2} MW to {capped_mw:.2} MW"))
        }
    }
}

/// Runs the engine until `stop` turns true.
pub async fn run(
    app: Arc<App>,
    seed: u64,
    speed: f64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let fleet = app.fleet.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Interval>(16);
    let halt = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt_sim = halt.clone();
    // The simulation: a year from 2025-06-01 (restarted with the next seed when it ends).
    let sim = std::thread::Builder::new().name("hcp-engine".into()).spawn(move || -> anyhow::Result<()> {
        let from = SimTime::parse("2025-06-01").expect("valid date");
        let interval_ms = 15 * 60_000;
        let scenario = Scenario {
            from,
            to: from.plus_ms(365 * 86_400_000),
            interval_ms,
            fidelity: Fidelity::Cohort,
            seed,
            energy_adder_usd_per_mwh: 0.0,
        };
        let mut h = Harness::new(
            &fleet,
            scenario,
            GridSource::Simulated(Box::default()),
            MarketSource::Simulated(MarketParams::default()),
            DemandSource::Simulated(DemandParams::default()),
        )
        .map_err(|e| anyhow::anyhow!("engine setup: {e}"))?;
        let (ptx, prx) = std::sync::mpsc::channel();
        let mut ctl =
            Recording { inner: DispatchPolicy::new(&fleet, DispatchConfig::default(), false, 0.0, from), plans: ptx };
        let n_sites = fleet.sites.len();
        let mut rows = Vec::with_capacity(n_sites);
        let started = Instant::now();
        let mut done = 0u64;
        let pace = Duration::from_secs_f64(interval_ms as f64 / 1e3 / speed.max(1e-6));
        let result = h.run(
            &mut ctl,
            &mut |row| {
                rows.push(row.clone());
                if rows.len() == n_sites {
                    if halt_sim.load(Ordering::Relaxed) {
                        // The harness has no early exit: stop feeding the writer and run out fast.
                        rows.clear();
                        return;
                    }
                    let plan = prx.try_iter().last().flatten();
                    let at = rows[0].at;
                    let _ = tx.blocking_send(Interval { at, rows: std::mem::take(&mut rows), plan });
                    done += 1;
                    let due = pace * done as u32;
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait.min(Duration::from_secs(5)));
                    }
                }
            },
            &mut |_, _| {},
        );
        result.map(|_| ()).map_err(|v| anyhow::anyhow!("invariant broken: {} at {} (seed={})", v.what, v.at, v.seed))
    })?;
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() { break },
            msg = rx.recv() => {
                let Some(iv) = msg else {
                    // The simulation thread ended: its period is over, or an invariant broke.
                    let r = sim.join().map_err(|_| anyhow::anyhow!("engine thread panicked"))?;
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "engine stopped");
                    }
                    return r;
                };
                record(&app, iv).await?;
            }
        }
    }
    halt.store(true, Ordering::Relaxed);
    rx.close();
    // The simulation thread is left to run out; the process is stopping.
    drop(sim);
    Ok(())
}

/// Writes one interval, then announces it.
#[tracing::instrument(name = "engine.interval", skip_all, fields(at_ms = iv.at.0, sites = iv.rows.len()))]
async fn record(app: &App, iv: Interval) -> anyhow::Result<()> {
    let at_ms = iv.at.0;
    let fleet = &app.fleet;
    let started = Instant::now();
    let mut signals = vec![];
    let mut seconds = vec![];
    for r in &iv.rows {
        let sp = fleet.sites.iter().find(|s| s.id == r.site).map_or("", |s| s.settlement_point.as_str());
        signals.push(SignalRow { kind: "rt_price".into(), key: sp.into(), at_ms, value: r.rt_price_usd_per_mwh });
        seconds.push(SiteSecondRow {
            site_id: r.site.clone(),
            at_ms,
            power_w: r.total_mw() * 1e6,
            mining_w: (r.asic_hashing_mw + r.asic_transition_mw + r.asic_idle_mw) * 1e6,
            inference_w: (r.gpu_serving_mw + r.gpu_idle_mw) * 1e6,
        });
    }
    if let Some(r) = iv.rows.first() {
        signals.push(SignalRow {
            kind: "hashprice".into(),
            key: "network".into(),
            at_ms,
            value: r.hashprice_usd_per_ph_day,
        });
    }
    app.store.add_signals(&signals).await?;
    app.store.put_site_seconds(&seconds).await?;
    let mut decisions = vec![];
    if let Some(plan) = &iv.plan
        && !plan.changes.is_empty()
    {
        let mut per_reason = vec![0u32; plan.reasons.len()];
        for c in &plan.changes {
            if let Some(n) = per_reason.get_mut(c.reason as usize) {
                *n += 1;
            }
        }
        for (k, r) in plan.reasons.iter().enumerate() {
            let (site, kind, text) = describe(r, fleet);
            decisions.push(DecisionRow {
                id: 0,
                at_ms,
                site_id: site,
                kind,
                reason: text,
                body: serde_json::json!({ "devices_changed": per_reason[k] }).to_string(),
            });
        }
        let summary = serde_json::json!({
            "at_ms": at_ms,
            "changes": plan.changes.len(),
            "blocked": plan.blocked,
            "sites": plan.sites.iter().enumerate().map(|(i, s)| serde_json::json!({
                "site": fleet.sites[i].id,
                "asic_mw": s.asic_mw,
                "gpu_mw": s.gpu_mw,
                "held_for_grid_mw": s.held_for_grid_mw,
                "limit_mw": s.limit_mw,
                "price_usd_per_mwh": s.price_usd_per_mwh,
                "stale": s.stale,
            })).collect::<Vec<_>>(),
        });
        app.store.add_plan(at_ms, &summary.to_string()).await?;
        app.bus.publish("hcp.plan", summary.to_string().as_bytes()).await?;
    }
    let ids = app.store.add_decisions(&decisions).await?;
    metrics::histogram!("hcp_engine_record_seconds").record(started.elapsed().as_secs_f64());
    for (d, id) in decisions.iter().zip(ids) {
        let ev = serde_json::json!({ "id": id, "at_ms": at_ms, "site": d.site_id, "kind": d.kind, "reason": d.reason });
        app.bus.publish(&format!("hcp.decision.{}", d.site_id), ev.to_string().as_bytes()).await?;
    }
    for r in &iv.rows {
        let ev = serde_json::json!({
            "at_ms": at_ms,
            "site": r.site,
            "price_usd_per_mwh": r.rt_price_usd_per_mwh,
            "hashprice_usd_per_ph_day": r.hashprice_usd_per_ph_day,
            "cap_mw": r.cap_mw,
            "mining_mw": r.asic_hashing_mw + r.asic_transition_mw + r.asic_idle_mw,
            "inference_mw": r.gpu_serving_mw + r.gpu_idle_mw,
            "curtailed_mw": (r.cap_mw - r.total_mw()).max(0.0),
            "hashrate_ph_s": r.hashrate_ph_s,
            "gpus_serving": r.gpus_serving,
            "margin_usd": r.margin().0 as f64 / 1e6,
        });
        app.bus.publish(&format!("hcp.interval.{}", r.site), ev.to_string().as_bytes()).await?;
        let power = [
            ("hashing", r.asic_hashing_mw),
            ("asic_transition", r.asic_transition_mw),
            ("asic_idle", r.asic_idle_mw),
            ("gpu_serving", r.gpu_serving_mw),
            ("gpu_idle", r.gpu_idle_mw),
            ("curtailed", (r.cap_mw - r.total_mw()).max(0.0)),
        ];
        for (state, mw) in power {
            metrics::gauge!("hcp_site_power_watts", "site" => r.site.clone(), "state" => state).set(mw * 1e6);
        }
        let devices = [
            ("asic_hashing", r.asics_hashing),
            ("asic_sleeping", r.asics_sleeping),
            ("asic_off", r.asics_off),
            ("asic_faulted", r.asics_faulted),
            ("gpu_serving", r.gpus_serving),
        ];
        for (state, n) in devices {
            metrics::gauge!("hcp_devices", "site" => r.site.clone(), "state" => state).set(n);
        }
        metrics::gauge!("hcp_site_price_usd_per_mwh", "site" => r.site.clone()).set(r.rt_price_usd_per_mwh);
    }
    if at_ms.rem_euclid(86_400_000) == 0 {
        let n = app.store.prune_telemetry(at_ms - DEVICE_RETENTION_MS, at_ms - SITE_RETENTION_MS).await?;
        tracing::info!(rows = n, "telemetry retention");
    }
    app.engine_at_ms.store(at_ms, Ordering::Relaxed);
    app.engine_wall_ms.store(wall_ms(), Ordering::Relaxed);
    Ok(())
}
