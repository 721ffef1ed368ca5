//! The engine loop of `hcp up`: the simulated sites, market and grid (the seeded harness) with the
//! economic dispatcher deciding every interval, run on a worker thread at `speed` simulated seconds
//! per wall second. Each interval's plan, decisions with their reasons, site power split and signals
//! are written to storage first and then announced on the bus (`hcp.interval.<site>`,
//! `hcp.decision.<site>`, `hcp.plan`), so that what a subscriber sees is always in storage.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hcp_econ::dispatch::{DispatchConfig, Plan, Reason};
use hcp_fleet::{Event, Outcome, Scope, Target};
use hcp_harness::controller::{Controller, DecisionContext};
use hcp_harness::plane::{DeviceMinute, DevicePlane, PlaneConfig, PlaneOutput};
use hcp_harness::policies::DispatchPolicy;
use hcp_harness::run::{DemandSource, GridSource, Harness, MarketSource, Scenario, SiteRow};
use hcp_model::SimTime;
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::{Fidelity, GroupTarget};
use hcp_sim::market::MarketParams;
use hcp_store::{
    CommandRow, DecisionRow, DeviceFilter, DeviceMinuteRow, DeviceStatusRow, Page, SignalRow, SiteSecondRow,
};

use crate::{App, wall_ms};

/// Telemetry kept (in simulated time): per-site interval rows 7 days, per-device minutes 30 days;
/// older rows are deleted once a simulated day.
pub const SITE_RETENTION_MS: i64 = 7 * 86_400_000;
pub const DEVICE_RETENTION_MS: i64 = 30 * 86_400_000;

/// One interval's output, handed from the simulation thread to the writer.
pub struct Interval {
    pub at: SimTime,
    pub rows: Vec<SiteRow>,
    pub decided: Vec<Decided>,
}

/// What the engine decided at an interval's start and what the devices did before it.
pub struct Decided {
    pub plan: Option<Plan>,
    pub plane: PlaneOutput,
    /// (available, unknown, quarantined, in maintenance).
    pub counts: (usize, usize, usize, usize),
    /// Size of the first command batch after the plan, and the wall time from the signals
    /// arriving (the decision starting) to that batch leaving.
    pub first_batch: usize,
    pub switch_s: f64,
    /// Replicas whose capacity changed with this plan (all of them the first time).
    pub replicas: Vec<hcp_harness::capacity::ReplicaCapacity>,
    /// The day ahead as the engine sees it at this decision.
    pub ahead: Ahead,
}

/// Intervals of the plan ahead the engine announces (24 hours of 15-minute intervals).
pub const AHEAD_INTERVALS: usize = 96;

/// The day ahead at one decision: per site, the day-ahead prices and the planning path's
/// schedule from the interval starting `at_ms` (announced on `hcp.ahead`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Ahead {
    pub at_ms: i64,
    pub interval_ms: i64,
    pub sites: Vec<SiteAhead>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SiteAhead {
    pub site: String,
    pub day_ahead_usd_per_mwh: Vec<f64>,
    /// Planned ASIC draw above idle (MW); empty before the first plan.
    pub planned_asic_mw: Vec<f64>,
    /// Whether a non-price constraint (4CP, ramp) holds the site below what price alone gives.
    pub held: Vec<bool>,
}

/// Operator actions that reach the engine thread.
pub enum Control {
    Maintenance { scope: Scope, on: bool },
}

/// The dispatcher deciding, and the device plane between its plans and the simulated agents.
struct Recording {
    inner: DispatchPolicy,
    plane: DevicePlane,
    fleet: hcp_model::fleet::Fleet,
    control: std::sync::mpsc::Receiver<Control>,
    decided: std::sync::mpsc::Sender<Decided>,
    /// The router's capacity as last announced.
    replicas: Vec<hcp_harness::capacity::ReplicaCapacity>,
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
        // The devices live up to now: telemetry, answers, retries, quarantines.
        for c in self.control.try_iter() {
            let Control::Maintenance { scope, on } = c;
            if let Err(e) = self.plane.set_maintenance(scope, on, self.inner.dispatcher_mut()) {
                tracing::warn!(error = %e, "maintenance not applied");
            }
        }
        self.plane.advance_to(ctx.now.0, self.inner.dispatcher_mut());
        // Signals in: the plan's first changes become intents and the first batch leaves before
        // the rest of the plan exists; then the rest, the GPU caps, and the rest of the batch.
        let started = Instant::now();
        let plane = &mut self.plane;
        let mut first = (0, 0.0);
        let t = self.inner.decide_with(ctx, plane.batch_max(), &mut |changes| {
            plane.apply_changes(changes);
            first = (plane.send_now(changes), started.elapsed().as_secs_f64());
        });
        metrics::histogram!("hcp_plan_seconds").record(started.elapsed().as_secs_f64());
        if let Some(plan) = &self.inner.last_plan {
            self.plane.apply_plan(plan);
        }
        for (g, target) in ctx.groups.iter().zip(&t) {
            if let GroupTarget::Gpu(gt) = target {
                for &d in &g.devices {
                    if let Err(e) = self.plane.set_gpu_cap(d, gt.cap_w) {
                        tracing::warn!(device = d.0, error = %e, "GPU cap not applied");
                    }
                }
            }
        }
        let rest = self.plane.reconcile_now(self.inner.dispatcher_mut());
        // When the plan's first changes needed no command, the first batch is the reconcile's.
        let (first_batch, switch_s) = if first.0 > 0 { first } else { (rest, started.elapsed().as_secs_f64()) };
        metrics::histogram!("hcp_switch_seconds").record(switch_s);
        // The router's capacity: the plan's GPU caps on the GPUs that may carry load.
        let serving: Vec<Option<(u32, f64)>> = t
            .iter()
            .map(|x| match x {
                GroupTarget::Gpu(g) => Some((g.serving, g.cap_w)),
                _ => None,
            })
            .collect();
        let caps =
            hcp_harness::capacity::replicas(&self.fleet, ctx.groups, &serving, &self.plane.manager().availability());
        let replicas = hcp_harness::capacity::changed(&self.replicas, &caps).into_iter().cloned().collect();
        self.replicas = caps;
        let schedule = self.inner.schedule_ahead(ctx.now, AHEAD_INTERVALS);
        let ahead = Ahead {
            at_ms: ctx.now.0,
            interval_ms: 15 * 60_000,
            sites: self
                .fleet
                .sites
                .iter()
                .enumerate()
                .map(|(i, site)| SiteAhead {
                    site: site.id.clone(),
                    day_ahead_usd_per_mwh: ctx
                        .day_ahead
                        .get(i)
                        .map(|d| d.iter().take(AHEAD_INTERVALS).copied().collect())
                        .unwrap_or_default(),
                    planned_asic_mw: schedule.get(i).map(|s| s.0.iter().map(|w| w / 1e6).collect()).unwrap_or_default(),
                    held: schedule.get(i).map(|s| s.1.clone()).unwrap_or_default(),
                })
                .collect(),
        };
        let _ = self.decided.send(Decided {
            ahead,
            plan: self.inner.last_plan.clone(),
            plane: self.plane.take_output(),
            counts: self.plane.manager().counts(),
            first_batch,
            switch_s,
            replicas,
        });
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
    // What storage already holds: devices in maintenance, command ids used.
    let mut in_maintenance = vec![];
    let mut page = Page { after: None, limit: Some(hcp_store::MAX_PAGE) };
    loop {
        let rows = app.store.devices(&DeviceFilter { maintenance: Some(true), ..Default::default() }, &page).await?;
        in_maintenance.extend(rows.iter().map(|d| hcp_model::ids::DeviceIdx(d.idx as u32)));
        match rows.last() {
            Some(last) if rows.len() == hcp_store::MAX_PAGE as usize => page.after = Some(last.idx),
            _ => break,
        }
    }
    let first_command_id = app.store.max_command_id().await? as u64 + 1;
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let mut maintenance_sub = app.bus.subscribe("hcp.maintenance", hcp_bus::From::New).await?;
    // The simulation: a year from 2025-06-01 (restarted with the next seed when it ends).
    let sim_fleet = fleet.clone();
    let sim = std::thread::Builder::new().name("hcp-engine".into()).spawn(move || -> anyhow::Result<()> {
        let fleet = sim_fleet;
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
        let (dtx, drx) = std::sync::mpsc::channel();
        let mut inner = DispatchPolicy::new(&fleet, DispatchConfig::default(), false, 0.0, from);
        // Live telemetry comes from the device plane: a device that stops reporting turns stale.
        inner.dispatcher_mut().cfg.stale_telemetry_ms = DispatchConfig::default().stale_telemetry_ms;
        let mut plane =
            DevicePlane::new(&fleet, PlaneConfig::default(), seed, from.0, inner.dispatcher(), first_command_id)
                .map_err(|e| anyhow::anyhow!("device plane: {e}"))?;
        for &d in &in_maintenance {
            plane
                .set_maintenance(Scope::Device(d), true, inner.dispatcher_mut())
                .map_err(|e| anyhow::anyhow!("maintenance of device {}: {e}", d.0))?;
        }
        let mut ctl =
            Recording { inner, plane, fleet: fleet.clone(), control: control_rx, decided: dtx, replicas: vec![] };
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
                    let decided = drx.try_iter().collect();
                    let at = rows[0].at;
                    let _ = tx.blocking_send(Interval { at, rows: std::mem::take(&mut rows), decided });
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
            m = maintenance_sub.next() => match m {
                Ok(m) => match maintenance_scope(&fleet, &m.payload) {
                    Ok((scope, on)) => { let _ = control_tx.send(Control::Maintenance { scope, on }); }
                    Err(e) => tracing::warn!(error = %e, "maintenance message ignored"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "maintenance subscription lost; resubscribing");
                    maintenance_sub = app.bus.subscribe("hcp.maintenance", hcp_bus::From::New).await?;
                }
            },
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

/// The scope of a `hcp.maintenance` message (as the API publishes it).
fn maintenance_scope(fleet: &hcp_model::fleet::Fleet, payload: &[u8]) -> anyhow::Result<(Scope, bool)> {
    #[derive(serde::Deserialize)]
    struct M {
        scope: String,
        id: String,
        on: bool,
    }
    let m: M = serde_json::from_slice(payload)?;
    let scope = match m.scope.as_str() {
        "device" => Scope::Device(hcp_model::ids::DeviceIdx(m.id.parse()?)),
        "rack" => Scope::Rack(hcp_model::ids::RackIdx(m.id.parse()?)),
        "site" => Scope::Site(
            fleet.sites.iter().find(|s| s.id == m.id).map(|s| s.idx).ok_or_else(|| anyhow::anyhow!("id: no site"))?,
        ),
        other => anyhow::bail!("scope: {other:?} is not device, rack or site"),
    };
    Ok((scope, m.on))
}

fn target_text(t: Target) -> String {
    match t {
        Target::Sleep => "sleep".into(),
        Target::Run { power_w } => format!("run {power_w:.0} W"),
    }
}

/// A device-minute rollup as stored.
pub fn minute_row(m: &DeviceMinute) -> DeviceMinuteRow {
    DeviceMinuteRow {
        device_idx: i64::from(m.device.0),
        minute_ms: m.minute_ms,
        samples: i64::from(m.samples),
        power_w_avg: m.power_w_avg,
        hashrate_ths_avg: m.hashrate_ths_avg,
        temp_c_max: m.temp_c_max,
        errors: m.errors as i64,
    }
}

/// Writes what the device plane did: commands, answers, status changes, minute rollups.
async fn record_plane(app: &App, d: &Decided) -> anyhow::Result<()> {
    if !d.replicas.is_empty() {
        let at_ms = d.plan.as_ref().map_or(0, |p| p.at_ms);
        let rows: Vec<hcp_store::ReplicaRow> = d
            .replicas
            .iter()
            .map(|r| hcp_store::ReplicaRow {
                id: i64::from(r.id),
                site_id: app.fleet.sites[r.site.index()].id.clone(),
                gpus: i64::from(r.gpus),
                slots: i64::from(r.slots),
                kv_tokens: r.kv_tokens as i64,
                cap_w: r.cap_w,
                updated_ms: at_ms,
            })
            .collect();
        app.store.put_replicas(&rows).await?;
        // In notices of 2,000 replicas (~200 kB, under the bus's 1 MiB message limit): a whole
        // reference fleet's first announcement is 50,000.
        for chunk in rows.chunks(2_000) {
            let ev = serde_json::json!({ "at_ms": at_ms, "replicas": chunk });
            app.bus.publish("hcp.capacity", ev.to_string().as_bytes()).await?;
        }
    }
    let out = &d.plane;
    let cmds: Vec<CommandRow> = out
        .commands
        .iter()
        .map(|(t, c)| CommandRow {
            id: c.id as i64,
            device_idx: i64::from(c.device.0),
            target: target_text(c.target),
            attempt: i64::from(c.attempt),
            issued_ms: *t,
            outcome: None,
            outcome_ms: None,
        })
        .collect();
    app.store.add_commands(&cmds).await?;
    let mut answers: Vec<(i64, String, i64)> = out
        .outcomes
        .iter()
        .map(|(t, id, _, o)| {
            let text = match o {
                Outcome::Applied => "applied".to_string(),
                Outcome::Failed(why) => format!("failed: {why}"),
            };
            (*id as i64, text, *t)
        })
        .collect();
    for (t, e) in &out.events {
        match e {
            Event::GaveUp { command, reason, .. } if *command > 0 => {
                answers.push((*command as i64, format!("gave up: {reason}"), *t));
            }
            Event::Applied { command, .. } => answers.push((*command as i64, "applied".into(), *t)),
            _ => {}
        }
    }
    app.store.set_command_outcomes(&answers).await?;
    let status: Vec<DeviceStatusRow> = out
        .status
        .iter()
        .map(|(t, dev, s, why)| DeviceStatusRow {
            idx: i64::from(dev.0),
            status: (*s).into(),
            reason: why.clone(),
            at_ms: *t,
        })
        .collect();
    app.store.set_device_status(&status).await?;
    let minutes: Vec<DeviceMinuteRow> = out.minutes.iter().map(minute_row).collect();
    app.store.put_device_minutes(&minutes).await?;
    metrics::counter!("hcp_commands_total", "event" => "sent").increment(out.commands.len() as u64);
    let failed = out.outcomes.iter().filter(|o| matches!(o.3, Outcome::Failed(_))).count() as u64;
    metrics::counter!("hcp_commands_total", "event" => "failed").increment(failed);
    metrics::counter!("hcp_commands_total", "event" => "applied")
        .increment(out.events.iter().filter(|(_, e)| matches!(e, Event::Applied { .. })).count() as u64);
    metrics::counter!("hcp_commands_total", "event" => "gave_up")
        .increment(out.events.iter().filter(|(_, e)| matches!(e, Event::GaveUp { .. })).count() as u64);
    metrics::counter!("hcp_telemetry_reports_total").increment(out.reports);
    let (available, unknown, quarantined, maintenance) = d.counts;
    for (state, n) in
        [("available", available), ("unknown", unknown), ("quarantined", quarantined), ("maintenance", maintenance)]
    {
        metrics::gauge!("hcp_managed_devices", "state" => state).set(n as f64);
    }
    metrics::gauge!("hcp_first_batch_commands").set(d.first_batch as f64);
    if !out.status.is_empty() {
        let ev = serde_json::json!({ "changes": out.status.len(), "available": available, "unknown": unknown, "quarantined": quarantined });
        app.bus.publish("hcp.devices", ev.to_string().as_bytes()).await?;
    }
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
    // The engine sells into no grid program (it commits no MW), so it earns no credits.
    let pnl: Vec<hcp_store::SitePnlRow> = iv
        .rows
        .iter()
        .map(|r| {
            let p = hcp_harness::backtest::site_pnl(r, 0.25, 0.0, 0.0);
            hcp_store::SitePnlRow {
                site_id: p.site,
                at_ms,
                hours: p.hours,
                mining_revenue: p.mining_revenue.0,
                inference_revenue: p.inference_revenue.0,
                energy_cost: p.energy_cost.0,
                grid_credits: p.grid_credits.0,
            }
        })
        .collect();
    app.store.put_site_pnl(&pnl).await?;
    for d in &iv.decided {
        record_plane(app, d).await?;
    }
    if let Some(d) = iv.decided.last() {
        app.bus.publish("hcp.ahead", &serde_json::to_vec(&d.ahead)?).await?;
    }
    let mut decisions = vec![];
    if let Some(plan) = iv.decided.iter().rev().find_map(|d| d.plan.as_ref())
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
            "interval_h": 0.25,
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
