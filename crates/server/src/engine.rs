//! The server's engine shell: it feeds the sans-IO control core (`hcp-engine`) and records what
//! it decides. Three modes:
//! - demo (the default): the simulated world of `hcp-harness::world` (grid, market, deployments
//!   and the devices' agents) steps the core on simulated time paced by [`DemoClock`], `speed`
//!   simulated seconds per wall second, from 2025-06-01;
//! - live: wall-clock time at the market's offset ([`MarketClock`]); the signals come from the
//!   configured feeds (`hcp-feeds`: ERCOT, a BTC market API, CSV replay, a GPU contract price)
//!   and manual values set through the API; the devices are the simulated agents until a site
//!   agent drives real ones;
//! - rehearsal: live mode on an accelerated clock from a given market time (to replay recorded
//!   feed responses, or a recorded period through the CSV replay feed).
//!
//! The core runs on a worker thread. Operator actions (maintenance, policies, manual values) and
//! feed polls reach it through a channel; a feed's failed poll, or a value the core refuses, is the
//! `feed:<name>` alert until a poll is good again, and stale prices fall back to the safe policy.
//! Each decision's plan, decisions with their reasons, site power split and P&L, and the signals
//! accepted, are written to storage first and then announced on the bus (`hcp.interval.<site>`,
//! `hcp.decision.<site>`, `hcp.plan`, `hcp.signals`, `hcp.feed`), so that what a subscriber sees
//! is always in storage. Stopping stops: the worker checks the stop flag at least every 50 ms of
//! wall time, and the feeds' tasks end with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hcp_econ::dispatch::Reason;
use hcp_engine::EngineConfig;
use hcp_engine::io::{Decided, FeedHealth, Input, Output, PolicyUpdate, PriceMarket};
use hcp_fleet::{Event, Outcome, Scope, Target};
use hcp_harness::drive::Driven;
use hcp_harness::plane::DeviceMinute;
use hcp_harness::world::SimWorld;
use hcp_model::signals::MarketSignal;
use hcp_model::{DemoClock, MarketClock, SimTime, WallTime};
use hcp_sim::agents::AgentParams;
use hcp_sim::grid::GridParams;
use hcp_sim::market::MarketParams;
use hcp_store::{
    CommandRow, DecisionRow, DeviceFilter, DeviceMinuteRow, DeviceStatusRow, Page, SignalRow, SiteSecondRow,
};

use crate::{App, Mode, wall_ms};

/// Telemetry kept (in simulated time): per-site interval rows 7 days, per-device minutes 30 days;
/// older rows are deleted once a simulated day.
pub const SITE_RETENTION_MS: i64 = 7 * 86_400_000;
pub const DEVICE_RETENTION_MS: i64 = 30 * 86_400_000;

/// What the worker hands the writer.
enum Note {
    /// A decision and its wall times.
    Decided(Box<Decided>, Timing),
    /// Signals accepted since the last note of them.
    Signals(crate::events::SignalsNotice),
    /// How a feed's poll went.
    Feed(crate::events::FeedNotice),
    Alert(hcp_engine::io::Alert),
    Refused(hcp_engine::Refused),
    Policy {
        name: String,
        version: Option<u32>,
    },
    /// The planner's placement of the waiting batch jobs.
    Batch(crate::events::BatchNotice),
}

/// Wall time of a decision step: the whole plan, and from the step's start to its first command
/// batch reaching the devices (the whole step when the plan's first changes needed no command).
#[derive(Clone, Copy, Debug, Default)]
struct Timing {
    plan_s: f64,
    switch_s: f64,
    /// The run's first decision (recorded whether or not it changed anything).
    first: bool,
}

/// Operator actions that reach the engine thread.
pub enum Control {
    Maintenance {
        scope: Scope,
        on: bool,
    },
    Policy(PolicyUpdate),
    /// A value an operator set through the API.
    Manual(crate::events::ManualSignal),
    /// A feed's poll (live mode).
    Feed(hcp_feeds::FeedMsg),
    /// The routers' demand, summed over the API processes: requests waiting, and running per site.
    Demand {
        queued: u32,
        running: Vec<u32>,
    },
    /// The batch jobs waiting for the planner, over the API processes.
    Jobs(Vec<crate::events::WaitingJob>),
}

/// Hands a feed's poll to the engine: its inputs, in order. The feed is healthy when the poll
/// succeeded and the engine took every value; else failed, with the first reason.
fn feed_inputs(engine: &mut hcp_engine::Engine, result: Result<Vec<Input>, String>, t: SimTime) -> (FeedHealth, u32) {
    match result {
        Err(why) => (FeedHealth::Failed(why), 0),
        Ok(inputs) => {
            let (mut accepted, mut refused) = (0, None);
            for mut i in inputs {
                // A feed stamps the market with its own clock's time, a step ahead at most.
                if let Input::Market { signal, .. } = &mut i {
                    signal.at = signal.at.min(t);
                }
                match engine.handle(i, t) {
                    Ok(()) => accepted += 1,
                    Err(e) => {
                        refused.get_or_insert_with(|| format!("value refused: {e}"));
                    }
                }
            }
            (refused.map_or(FeedHealth::Ok, FeedHealth::Failed), accepted)
        }
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
        Reason::GridCommitment { site: s, program, limit_mw, respond_by_ms, policy_version } => (
            site(*s),
            "grid_commitment".into(),
            match policy_version {
                Some(v) => format!(
                    "{}: at most {limit_mw:.2} MW by {} (policy grid-commitment v{v})",
                    program.name(),
                    hcp_model::SimTime(*respond_by_ms)
                ),
                None => {
                    format!("{}: at most {limit_mw:.2} MW by {}", program.name(), hcp_model::SimTime(*respond_by_ms))
                }
            },
        ),
        Reason::Strike { site: s, model, price_usd_per_mwh, strike_usd_per_mwh, policy_version } => (
            site(*s),
            "strike".into(),
            format!(
                "{model}: price {price_usd_per_mwh:.1} USD/MWh above its strike {strike_usd_per_mwh:.1} (policy strike v{policy_version})"
            ),
        ),
        Reason::StalePrice { site: s, age_ms, policy } => {
            (site(*s), "stale_price".into(), format!("price {:.0} s old: {policy:?}", *age_ms as f64 / 1e3))
        }
        Reason::Scheduled { site: s, limit_mw } => {
            (site(*s), "scheduled".into(), format!("planning path holds the site at {limit_mw:.2} MW"))
        }
        Reason::GpusIdle { site: s, idle_gpus, freed_mw } => (
            site(*s),
            "gpus_idle".into(),
            format!("{idle_gpus} GPUs with no work idle: {freed_mw:.2} MW to the ASICs until demand returns"),
        ),
        Reason::GpusShed { site: s, shed, price_usd_per_mwh, value_usd_per_mwh, serving_gpus, policy_version } => (
            site(*s),
            "gpus_shed".into(),
            match (shed, policy_version) {
                (true, Some(v)) => format!(
                    "price {price_usd_per_mwh:.1} USD/MWh above the GPUs' work at {value_usd_per_mwh:.1}: {serving_gpus} reserved GPUs serve (policy reserved-capacity v{v})"
                ),
                (true, None) => format!(
                    "price {price_usd_per_mwh:.1} USD/MWh above the GPUs' work at {value_usd_per_mwh:.1}: GPUs stop serving"
                ),
                (false, _) => format!(
                    "price {price_usd_per_mwh:.1} USD/MWh below the GPUs' work at {value_usd_per_mwh:.1}: {serving_gpus} GPUs serve again"
                ),
            },
        ),
        Reason::GpusCapped { site: s, planned_mw, capped_mw } => {
            (site(*s), "gpus_capped".into(), format!("GPUs capped from {planned_mw:.2} MW to {capped_mw:.2} MW"))
        }
    }
}

/// A stored policy as the engine takes it. The body was validated by the API when it was saved;
/// anything unreadable here is refused with the field named.
pub fn policy_update(
    fleet: &hcp_model::fleet::Fleet,
    name: &str,
    version: i64,
    body: &str,
) -> anyhow::Result<PolicyUpdate> {
    use hcp_engine::io::{GridRule, ReservedRule, StrikeRule};
    let v: serde_json::Value = serde_json::from_str(body)?;
    let version = u32::try_from(version).map_err(|_| anyhow::anyhow!("version: out of range"))?;
    let num = |f: &str| {
        v.get(f).and_then(serde_json::Value::as_f64).ok_or_else(|| anyhow::anyhow!("body.{f}: a number is required"))
    };
    Ok(match name {
        "strike" => {
            let models = match v.get("models") {
                None => Default::default(),
                Some(m) => serde_json::from_value(m.clone()).map_err(|e| anyhow::anyhow!("body.models: {e}"))?,
            };
            PolicyUpdate::Strike(StrikeRule {
                version,
                strike_usd_per_mwh: v.get("strike_usd_per_mwh").and_then(serde_json::Value::as_f64),
                models,
                curtail_after: num("curtail_after")? as u32,
                resume_after: num("resume_after")? as u32,
            })
        }
        "grid-commitment" => {
            let site = v.get("site").and_then(serde_json::Value::as_str).unwrap_or_default();
            let site = fleet
                .sites
                .iter()
                .find(|s| s.id == site)
                .ok_or_else(|| anyhow::anyhow!("body.site: no site {site}"))?
                .idx;
            let program = v.get("program").and_then(serde_json::Value::as_str).unwrap_or_default();
            let program = hcp_model::signals::GridProgram::ALL
                .into_iter()
                .find(|p| p.name() == program)
                .ok_or_else(|| anyhow::anyhow!("body.program: unknown program {program}"))?;
            PolicyUpdate::GridCommitment(GridRule { version, site, program, mw: num("mw")? })
        }
        "reserved-capacity" => PolicyUpdate::Reserved(ReservedRule {
            version,
            tenant: v.get("tenant").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
            gpus: num("gpus")? as u32,
        }),
        other => anyhow::bail!("name: no policy {other:?}"),
    })
}

/// How the engine's time relates to the wall clock.
#[derive(Clone, Copy, Debug)]
enum EngineClock {
    /// Accelerated: demo mode, or a rehearsal of live mode on a recorded period.
    Demo(DemoClock),
    /// Live: the wall clock at the market's offset.
    Market(MarketClock),
}

impl EngineClock {
    fn now(&self) -> SimTime {
        self.time_of(WallTime(wall_ms()))
    }

    fn wall_of(&self, t: SimTime) -> WallTime {
        match self {
            EngineClock::Demo(c) => c.wall_time(t),
            EngineClock::Market(c) => c.wall_time(t),
        }
    }

    /// Engine time at a wall-clock time (a demo's deadlines move with its clock).
    fn time_of(&self, w: WallTime) -> SimTime {
        match self {
            EngineClock::Demo(c) => c.sim_time(w),
            EngineClock::Market(c) => c.market_time(w),
        }
    }

    fn speed(&self) -> f64 {
        match self {
            EngineClock::Demo(c) => c.speed,
            EngineClock::Market(_) => 1.0,
        }
    }
}

/// The engine's input from a manual value, at `t`.
fn manual_input(m: &crate::events::ManualSignal, t: SimTime, market: MarketSignal) -> Input {
    let source = "manual".to_string();
    let sp = m.key.clone();
    match m.kind.as_str() {
        // The price in force now: the current 5-minute interval's.
        "rt_price" => Input::Price {
            settlement_point: sp,
            market: PriceMarket::RealTime5,
            at: SimTime(t.0.div_euclid(300_000) * 300_000),
            usd_per_mwh: m.value,
            source,
        },
        "da_price" => Input::Price {
            settlement_point: sp,
            market: PriceMarket::DayAhead,
            at: SimTime(m.at_ms.unwrap_or(t.0)),
            usd_per_mwh: m.value,
            source,
        },
        "temperature_c" => Input::Weather { settlement_point: sp, temperature_c: m.value, source },
        // The network's other figures stay as last known.
        "hashprice" => {
            Input::Market { signal: MarketSignal { at: t, hashprice_usd_per_ph_day: m.value, ..market }, source }
        }
        _ => Input::GpuPrice { usd_per_gpu_hour: m.value, source },
    }
}

/// Runs the engine until `stop` turns true.
pub async fn run(
    app: Arc<App>,
    seed: u64,
    speed: f64,
    cfg: EngineConfig,
    mode: Mode,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let fleet = app.fleet.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Note>(64);
    let halt = Arc::new(AtomicBool::new(false));
    let halt_sim = halt.clone();
    // What storage already holds: devices in maintenance, command ids used, policies in force.
    let mut initial: Vec<Input> = vec![];
    let mut page = Page { after: None, limit: Some(hcp_store::MAX_PAGE) };
    loop {
        let rows = app.store.devices(&DeviceFilter { maintenance: Some(true), ..Default::default() }, &page).await?;
        initial.extend(
            rows.iter().map(|d| Input::Maintenance {
                scope: Scope::Device(hcp_model::ids::DeviceIdx(d.idx as u32)),
                on: true,
            }),
        );
        match rows.last() {
            Some(last) if rows.len() == hcp_store::MAX_PAGE as usize => page.after = Some(last.idx),
            _ => break,
        }
    }
    for p in app.store.policies().await? {
        match policy_update(&fleet, &p.name, p.version, &p.body) {
            Ok(u) => initial.push(Input::Policy(u)),
            Err(e) => tracing::warn!(policy = %p.name, error = %e, "stored policy not applied"),
        }
    }
    let first_command_id = app.store.max_command_id().await? as u64 + 1;
    let (control_tx, control_rx) = std::sync::mpsc::channel::<Control>();
    let mut maintenance_sub = app.bus.subscribe("hcp.maintenance", hcp_bus::From::New).await?;
    let mut policy_sub = app.bus.subscribe("hcp.policy", hcp_bus::From::New).await?;
    let mut manual_sub = app.bus.subscribe("hcp.signal.manual", hcp_bus::From::New).await?;
    let mut demand_sub = app.bus.subscribe("hcp.demand", hcp_bus::From::New).await?;
    let mut waiting_sub = app.bus.subscribe("hcp.jobs.waiting", hcp_bus::From::New).await?;
    // Each API process's batch jobs waiting for the planner (a process silent for a minute no
    // longer counts).
    let mut waiting: std::collections::BTreeMap<String, (Vec<crate::events::WaitingJob>, Instant)> = Default::default();
    // Each API process's latest demand (a process silent for a minute no longer counts).
    let mut demand: std::collections::BTreeMap<String, (crate::events::DemandNotice, Instant)> = Default::default();
    // The clock, the start and the world: demo (a simulated year from 2025-06-01), live (the
    // wall clock at the market's offset, from the current interval) or a rehearsal of live mode.
    let speed = speed.max(1e-6);
    let interval_ms = cfg.interval_ms();
    let (mode_name, clock, from) = match &mode {
        Mode::Demo => {
            let from = SimTime::parse("2025-06-01").expect("valid date");
            ("demo", EngineClock::Demo(DemoClock { wall_start: WallTime(wall_ms()), sim_start: from, speed }), from)
        }
        Mode::Live { rehearse_from: Some(from), .. } => {
            let from = SimTime(from.0.div_euclid(interval_ms) * interval_ms);
            (
                "rehearsal",
                EngineClock::Demo(DemoClock { wall_start: WallTime(wall_ms()), sim_start: from, speed }),
                from,
            )
        }
        Mode::Live { rehearse_from: None, .. } => {
            let c = MarketClock::ERCOT;
            let now = c.market_time(WallTime(wall_ms()));
            ("live", EngineClock::Market(c), SimTime(now.0.div_euclid(interval_ms) * interval_ms))
        }
    };
    tracing::info!(mode = mode_name, from = %from, "engine starts");
    // Live mode's feeds, each on its own task, hand their polls to the engine thread.
    let (feed_tx, mut feed_rx) = tokio::sync::mpsc::channel::<hcp_feeds::FeedMsg>(256);
    let mut feed_tasks = vec![];
    if let Mode::Live { feeds, .. } = &mode {
        let mut points: Vec<String> = fleet.sites.iter().map(|s| s.settlement_point.clone()).collect();
        points.sort();
        points.dedup();
        let clock_fn: hcp_feeds::Clock = Arc::new(move || clock.now());
        feed_tasks = hcp_feeds::spawn(feeds, &points, clock_fn, feed_tx.clone(), stop.clone())
            .map_err(|e| anyhow::anyhow!("feeds: {e}"))?;
    }
    drop(feed_tx);
    let live = matches!(mode, Mode::Live { .. });
    let sim_fleet = fleet.clone();
    let sim = std::thread::Builder::new().name("hcp-engine".into()).spawn(move || -> anyhow::Result<()> {
        let fleet = sim_fleet;
        let world = if live {
            SimWorld::devices_only(&fleet, from, seed, AgentParams::default())
        } else {
            SimWorld::new(
                &fleet,
                from,
                from.plus_ms(365 * 86_400_000),
                seed,
                &GridParams::default(),
                &MarketParams::default(),
                AgentParams::default(),
            )
        }
        .map_err(|e| anyhow::anyhow!("engine setup: {e}"))?;
        let mut engine = hcp_engine::Engine::new(&fleet, cfg, from, first_command_id)
            .map_err(|e| anyhow::anyhow!("engine setup: {e}"))?;
        for i in initial {
            if let Err(r) = engine.handle(i, from) {
                tracing::warn!(error = %r, "stored state not applied");
            }
        }
        let mut driven = Driven::with_engine(engine, world, seed);
        let clock_notice = |t: SimTime| crate::events::ClockNotice {
            mode: mode_name.into(),
            market_ms: clock.now().max(t).0,
            wall_ms: wall_ms(),
            speed: clock.speed(),
        };
        let mut signals = vec![];
        let mut notes = vec![];
        let mut decided_once = false;
        loop {
            if halt_sim.load(Ordering::Relaxed) {
                return Ok(());
            }
            let t = driven.next();
            if let Some(to) = driven.world.to()
                && t > to
            {
                tracing::info!(at = %t, "the simulated year is over; the engine stops");
                return Ok(());
            }
            let due = clock.wall_of(t).0 - wall_ms();
            if due > 0 {
                std::thread::sleep(Duration::from_millis(due.min(50) as u64));
                continue;
            }
            // Operator actions, demand and feed polls are taken at the step's time: the engine's
            // time never runs ahead of the world's (a demo's results stay the same under a seed).
            for c in control_rx.try_iter() {
                match c {
                    Control::Maintenance { scope, on } => {
                        if let Err(e) = driven.engine.handle(Input::Maintenance { scope, on }, t) {
                            tracing::warn!(error = %e, "operator action not applied");
                        }
                    }
                    Control::Policy(u) => {
                        if let Err(e) = driven.engine.handle(Input::Policy(u), t) {
                            tracing::warn!(error = %e, "operator action not applied");
                        }
                    }
                    Control::Demand { queued, running } => {
                        for (s, run) in running.iter().enumerate() {
                            let input = Input::Demand {
                                site: hcp_model::ids::SiteIdx(s as u16),
                                model: fleet.served_model.id.clone(),
                                queued,
                                running: *run,
                            };
                            if let Err(e) = driven.engine.handle(input, t) {
                                tracing::warn!(error = %e, "demand not taken");
                            }
                        }
                    }
                    Control::Jobs(jobs) => {
                        // Wall-clock run times and deadlines in the engine's time: a demo's
                        // clock runs `speed` times as fast.
                        let waiting = jobs
                            .into_iter()
                            .map(|j| hcp_econ::batch::BatchJob {
                                id: j.id,
                                gpus: j.gpus,
                                remaining_ms: ((j.remaining_ms as f64 * clock.speed()).ceil() as i64).max(1),
                                deadline: clock.time_of(WallTime(j.deadline_ms)),
                                // A job, once started, runs to its end here (a preemptible one
                                // stops only when its GPUs are taken): one stretch.
                                preemptible: false,
                            })
                            .collect();
                        if let Err(e) = driven.engine.handle(Input::Jobs { waiting }, t) {
                            tracing::warn!(error = %e, "waiting jobs not taken");
                        }
                    }
                    Control::Manual(m) => {
                        let input = manual_input(&m, t, driven.engine.market());
                        if let Err(e) = driven.engine.handle(input, t) {
                            tracing::warn!(error = %e, "manual value refused");
                        }
                    }
                    Control::Feed(msg) => {
                        // A feed reads the outside world on the clock: its values are taken at the
                        // clock's time, even when the worker runs behind (a price it hands on as
                        // known must not be refused as early). Only live mode has feeds.
                        let tc = clock.now().max(t);
                        let (health, accepted) = feed_inputs(&mut driven.engine, msg.result, tc);
                        notes.push(Note::Feed(crate::events::FeedNotice {
                            feed: msg.feed.clone(),
                            ok: health == FeedHealth::Ok,
                            reason: match &health {
                                FeedHealth::Failed(why) => Some(why.clone()),
                                FeedHealth::Ok => None,
                            },
                            accepted,
                            wall_ms: wall_ms(),
                        }));
                        // Never refused: a feed's health is always taken.
                        let _ = driven.engine.handle(Input::Feed { feed: msg.feed, health }, tc);
                    }
                }
            }
            let started = Instant::now();
            let mut first_s = None;
            let mut first_batch = |n: usize| {
                if n > 0 && first_s.is_none() {
                    first_s = Some(started.elapsed().as_secs_f64());
                }
            };
            let step = driven.step_with(t, &mut first_batch, &mut |o| match o {
                Output::Signal { kind, key, at, value, source } => signals.push(crate::events::SignalNotice {
                    kind: kind.into(),
                    key,
                    at_ms: at.0,
                    value,
                    source,
                    received_ms: t.0,
                }),
                Output::Decided(d) => {
                    if !signals.is_empty() {
                        notes.push(Note::Signals(crate::events::SignalsNotice {
                            clock: clock_notice(t),
                            signals: std::mem::take(&mut signals),
                        }));
                    }
                    notes.push(Note::Decided(d, Timing::default()))
                }
                Output::Alert(a) => notes.push(Note::Alert(a)),
                Output::Refused(r) => notes.push(Note::Refused(r)),
                Output::PolicyApplied { name, version } => notes.push(Note::Policy { name, version }),
                Output::Batch(b) => notes.push(Note::Batch(crate::events::BatchNotice {
                    wall_ms: wall_ms(),
                    placements: b
                        .placements
                        .into_iter()
                        .map(|p| crate::events::BatchPlacement {
                            id: p.id,
                            run_now: p.run_now,
                            start_ms: clock.wall_of(p.start).0,
                            finish_ms: clock.wall_of(p.finish).0,
                            why: p.why,
                            planned_usd: p.planned_usd,
                            now_usd: p.now_usd,
                        })
                        .collect(),
                })),
                Output::Command(_) => {}
            });
            let plan_s = started.elapsed().as_secs_f64();
            let mut timing = Timing { plan_s, switch_s: first_s.unwrap_or(plan_s), first: false };
            if let Err(v) = step {
                anyhow::bail!("invariant broken: {} at {} (seed={})", v.what, v.at, v.seed);
            }
            // Signals between decisions reach the view at once (live mode decides every 15 min).
            if !signals.is_empty() {
                notes.push(Note::Signals(crate::events::SignalsNotice {
                    clock: clock_notice(t),
                    signals: std::mem::take(&mut signals),
                }));
            }
            for mut n in notes.drain(..) {
                if let Note::Decided(d, s) = &mut n {
                    // The first decision of a run with a plan (not a reclaim between intervals).
                    timing.first = !decided_once && !d.ahead.sites.is_empty();
                    decided_once |= timing.first;
                    *s = timing;
                }
                // The writer is gone: the process is stopping.
                if tx.blocking_send(n).is_err() {
                    return Ok(());
                }
            }
        }
    })?;
    let result = loop {
        if *stop.borrow() {
            break Ok(());
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() { break Ok(()) },
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
            m = policy_sub.next() => match m {
                Ok(m) => match serde_json::from_slice::<crate::events::PolicyNotice>(&m.payload) {
                    Ok(n) => match policy_update(&fleet, &n.name, n.version, &n.body) {
                        Ok(u) => { let _ = control_tx.send(Control::Policy(u)); }
                        Err(e) => tracing::warn!(error = %e, "policy not applied"),
                    },
                    Err(e) => tracing::warn!(error = %e, "policy message ignored"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "policy subscription lost; resubscribing");
                    policy_sub = app.bus.subscribe("hcp.policy", hcp_bus::From::New).await?;
                }
            },
            m = manual_sub.next() => match m {
                Ok(m) => match serde_json::from_slice::<crate::events::ManualSignal>(&m.payload) {
                    Ok(v) => { let _ = control_tx.send(Control::Manual(v)); }
                    Err(e) => tracing::warn!(error = %e, "manual value message ignored"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "manual value subscription lost; resubscribing");
                    manual_sub = app.bus.subscribe("hcp.signal.manual", hcp_bus::From::New).await?;
                }
            },
            Some(f) = feed_rx.recv() => { let _ = control_tx.send(Control::Feed(f)); },
            m = demand_sub.next() => match m {
                Ok(m) => match serde_json::from_slice::<crate::events::DemandNotice>(&m.payload) {
                    Ok(n) => {
                        demand.insert(n.instance.clone(), (n, Instant::now()));
                        demand.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
                        let mut running = vec![0u32; fleet.sites.len()];
                        let mut queued = 0u32;
                        for (n, _) in demand.values() {
                            queued = queued.saturating_add(n.queued);
                            for (site, r) in &n.running {
                                if let Some(i) = fleet.sites.iter().position(|s| &s.id == site) {
                                    running[i] = running[i].saturating_add(*r);
                                }
                            }
                        }
                        let _ = control_tx.send(Control::Demand { queued, running });
                    }
                    Err(e) => tracing::warn!(error = %e, "demand message ignored"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "demand subscription lost; resubscribing");
                    demand_sub = app.bus.subscribe("hcp.demand", hcp_bus::From::New).await?;
                }
            },
            m = waiting_sub.next() => match m {
                Ok(m) => match serde_json::from_slice::<crate::events::WaitingNotice>(&m.payload) {
                    Ok(n) => {
                        waiting.insert(n.instance, (n.jobs, Instant::now()));
                        waiting.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
                        // One entry per job: a job resumed elsewhere may still be listed by the
                        // process that held it until that one's list lapses.
                        let mut jobs: Vec<crate::events::WaitingJob> =
                            waiting.values().flat_map(|(j, _)| j.iter().cloned()).collect();
                        jobs.sort_by(|a, b| a.id.cmp(&b.id));
                        jobs.dedup_by(|a, b| a.id == b.id);
                        let _ = control_tx.send(Control::Jobs(jobs));
                    }
                    Err(e) => tracing::warn!(error = %e, "waiting jobs message ignored"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "waiting jobs subscription lost; resubscribing");
                    waiting_sub = app.bus.subscribe("hcp.jobs.waiting", hcp_bus::From::New).await?;
                }
            },
            msg = rx.recv() => {
                let Some(n) = msg else {
                    // The worker ended: its period is over, or an invariant broke.
                    break Ok(());
                };
                if let Err(e) = record(&app, n).await {
                    break Err(e);
                }
            }
        }
    };
    for t in feed_tasks {
        t.abort();
    }
    // Stopping stops: the worker sees the flag within 50 ms and its channel closed at once.
    halt.store(true, Ordering::Relaxed);
    rx.close();
    let joined = tokio::task::spawn_blocking(move || sim.join()).await?;
    let worker = joined.map_err(|_| anyhow::anyhow!("engine thread panicked"))?;
    if let Err(e) = &worker {
        tracing::error!(error = %e, "engine stopped");
    }
    app.engine_stopped.store(true, Ordering::Relaxed);
    result.and(worker)
}

/// The scope of a `hcp.maintenance` message (as the API publishes it).
fn maintenance_scope(fleet: &hcp_model::fleet::Fleet, payload: &[u8]) -> anyhow::Result<(Scope, bool)> {
    let m: crate::events::MaintenanceNotice = serde_json::from_slice(payload)?;
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
        let at_ms = d.at.0;
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
            let ev = crate::events::CapacityNotice { at_ms, replicas: chunk.to_vec() };
            app.bus.publish("hcp.capacity", &serde_json::to_vec(&ev)?).await?;
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
            status: s.as_str().into(),
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
        let ev = crate::events::DevicesNotice { changes: out.status.len(), available, unknown, quarantined };
        app.bus.publish("hcp.devices", &serde_json::to_vec(&ev)?).await?;
    }
    Ok(())
}

/// Writes one note of the worker, then announces it.
async fn record(app: &App, n: Note) -> anyhow::Result<()> {
    match n {
        Note::Decided(d, timing) => record_decided(app, *d, timing).await,
        Note::Signals(n) => {
            let rows: Vec<SignalRow> = n
                .signals
                .iter()
                .map(|s| SignalRow { kind: s.kind.clone(), key: s.key.clone(), at_ms: s.at_ms, value: s.value })
                .collect();
            app.store.add_signals(&rows).await?;
            app.bus.publish("hcp.signals", &serde_json::to_vec(&n)?).await?;
            Ok(())
        }
        Note::Feed(f) => {
            metrics::counter!("hcp_feed_polls_total", "feed" => f.feed.clone(), "ok" => if f.ok { "true" } else { "false" })
                .increment(1);
            app.bus.publish("hcp.feed", &serde_json::to_vec(&f)?).await?;
            Ok(())
        }
        Note::Alert(a) => {
            if a.raised {
                tracing::warn!(key = %a.key, "{}", a.text);
            } else {
                tracing::info!(key = %a.key, "cleared: {}", a.text);
            }
            app.bus.publish("hcp.alert", &serde_json::to_vec(&a)?).await?;
            Ok(())
        }
        Note::Refused(r) => {
            tracing::warn!(input = r.input, field = %r.field, "refused: {}", r.rule);
            metrics::counter!("hcp_engine_refused_total", "input" => r.input).increment(1);
            Ok(())
        }
        Note::Policy { name, version } => {
            tracing::info!(policy = %name, version = ?version, "policy in force");
            Ok(())
        }
        Note::Batch(b) => {
            let waiting = b.placements.iter().filter(|p| !p.run_now).count();
            metrics::gauge!("hcp_batch_jobs_deferred").set(waiting as f64);
            app.bus.publish("hcp.batch", &serde_json::to_vec(&b)?).await?;
            Ok(())
        }
    }
}

/// Writes one decision and its closed interval, then announces them.
#[tracing::instrument(name = "engine.interval", skip_all, fields(at_ms = d.at.0, sites = d.closed.len()))]
async fn record_decided(app: &App, d: Decided, timing: Timing) -> anyhow::Result<()> {
    let at_ms = d.at.0;
    let fleet = &app.fleet;
    let started = Instant::now();
    metrics::histogram!("hcp_plan_seconds").record(timing.plan_s);
    metrics::histogram!("hcp_switch_seconds").record(timing.switch_s);
    let rows = &d.closed;
    let interval_ms = rows.first().map_or(15 * 60_000, |r| at_ms - r.at.0);
    let hours = interval_ms as f64 / 3.6e6;
    let seconds: Vec<SiteSecondRow> = rows
        .iter()
        .map(|r| SiteSecondRow {
            site_id: fleet.sites[r.site.index()].id.clone(),
            at_ms: r.at.0,
            power_w: r.total_mw() * 1e6,
            mining_w: r.mining_mw() * 1e6,
            inference_w: r.inference_mw() * 1e6,
        })
        .collect();
    app.store.put_site_seconds(&seconds).await?;
    // The engine sells into no grid program's payments here, so it books no credits.
    let usd = |x: f64| hcp_model::MicroUsd::from_usd_f64(x).0;
    let pnl: Vec<hcp_store::SitePnlRow> = rows
        .iter()
        .map(|r| hcp_store::SitePnlRow {
            site_id: fleet.sites[r.site.index()].id.clone(),
            at_ms: r.at.0,
            hours,
            mining_revenue: usd(r.mining_revenue_usd),
            inference_revenue: usd(r.inference_revenue_usd),
            energy_cost: usd(r.energy_cost_usd),
            grid_credits: 0,
        })
        .collect();
    app.store.put_site_pnl(&pnl).await?;
    record_plane(app, &d).await?;
    // A decision between intervals (GPUs reclaimed) has no day ahead of its own.
    if !d.ahead.sites.is_empty() {
        app.bus.publish("hcp.ahead", &serde_json::to_vec(&d.ahead)?).await?;
    }
    let mut decisions = vec![];
    let plan = &d.plan;
    // A plan is recorded when it changes devices, or GPUs are shed or serve again (GPU targets
    // are not device changes of the plan).
    let gpus_changed = plan.reasons.iter().any(|r| matches!(r, Reason::GpusShed { .. }));
    if timing.first {
        // Where each site starts: recorded even when the first plan changes nothing, so the
        // decisions are never empty once the engine has planned.
        for (i, s) in plan.sites.iter().enumerate() {
            let price = match crate::events::finite(s.price_usd_per_mwh) {
                Some(p) => format!("{p:.1} USD/MWh"),
                None => "no price yet (the safe policy)".to_string(),
            };
            decisions.push(DecisionRow {
                id: 0,
                at_ms,
                site_id: fleet.sites[i].id.clone(),
                kind: "initial_plan".into(),
                reason: format!(
                    "engine started: ASICs {:.2} MW, GPUs {:.2} MW under a {:.2} MW limit at {price}",
                    s.asic_mw, s.gpu_mw, s.limit_mw
                ),
                body: serde_json::json!({ "devices_changed": plan.changes.iter().filter(|c| fleet.devices[c.device.index()].site.index() == i).count() }).to_string(),
            });
        }
    }
    if !plan.changes.is_empty() || gpus_changed || timing.first {
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
        let summary = crate::events::PlanNotice {
            at_ms,
            changes: plan.changes.len(),
            blocked: plan.blocked,
            sites: plan
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| crate::events::PlanSiteNotice {
                    site: fleet.sites[i].id.clone(),
                    asic_mw: s.asic_mw,
                    gpu_mw: s.gpu_mw,
                    held_for_grid_mw: s.held_for_grid_mw,
                    limit_mw: s.limit_mw,
                    price_usd_per_mwh: crate::events::finite(s.price_usd_per_mwh),
                    stale: s.stale,
                })
                .collect(),
        };
        let summary = serde_json::to_string(&summary)?;
        app.store.add_plan(at_ms, &summary).await?;
        app.bus.publish("hcp.plan", summary.as_bytes()).await?;
    }
    let ids = app.store.add_decisions(&decisions).await?;
    metrics::histogram!("hcp_engine_record_seconds").record(started.elapsed().as_secs_f64());
    for (d, id) in decisions.iter().zip(ids) {
        let ev = crate::events::DecisionNotice {
            id,
            at_ms,
            site: d.site_id.clone(),
            kind: d.kind.clone(),
            reason: d.reason.clone(),
        };
        app.bus.publish(&format!("hcp.decision.{}", d.site_id), &serde_json::to_vec(&ev)?).await?;
    }
    for r in rows {
        let site = &fleet.sites[r.site.index()].id;
        let margin = r.mining_revenue_usd + r.inference_revenue_usd - r.energy_cost_usd;
        let held = r.held.total_mw();
        let ev = crate::events::IntervalNotice {
            at_ms: r.at.0,
            site: site.clone(),
            price_usd_per_mwh: crate::events::finite(r.price_usd_per_mwh),
            price_final: r.price_final,
            hashprice_usd_per_ph_day: crate::events::finite(r.hashprice_usd_per_ph_day),
            cap_mw: r.cap_mw,
            mining_mw: r.mining_mw(),
            inference_mw: r.inference_mw(),
            curtailed_mw: held,
            held_off_mw: r.held,
            headroom_mw: r.headroom_mw,
            hashrate_ph_s: r.hashrate_ph_s,
            gpus_serving: r.gpus_serving,
            margin_usd: crate::events::finite(margin),
            interval_h: hours,
        };
        app.bus.publish(&format!("hcp.interval.{site}"), &serde_json::to_vec(&ev)?).await?;
        let power = [
            ("hashing", r.asic_hashing_mw),
            ("asic_idle", r.asic_idle_mw),
            ("gpu_serving", r.gpu_serving_mw),
            ("gpu_idle", r.gpu_idle_mw),
            ("held_economics", r.held.economics_mw),
            ("held_strike", r.held.strike_mw),
            ("held_grid", r.held.grid_mw),
            ("held_cap", r.held.cap_mw),
            ("held_stale", r.held.stale_mw),
            ("unavailable", r.held.unavailable_mw),
            ("headroom", r.headroom_mw),
        ];
        for (state, mw) in power {
            metrics::gauge!("hcp_site_power_watts", "site" => site.clone(), "state" => state).set(mw * 1e6);
        }
        metrics::gauge!("hcp_devices", "site" => site.clone(), "state" => "gpu_serving").set(r.gpus_serving);
        if r.price_usd_per_mwh.is_finite() {
            metrics::gauge!("hcp_site_price_usd_per_mwh", "site" => site.clone()).set(r.price_usd_per_mwh);
        }
    }
    if at_ms.rem_euclid(86_400_000) == 0 {
        let n = app.store.prune_telemetry(at_ms - DEVICE_RETENTION_MS, at_ms - SITE_RETENTION_MS).await?;
        tracing::info!(rows = n, "telemetry retention");
    }
    app.engine_at_ms.store(at_ms, Ordering::Relaxed);
    app.engine_wall_ms.store(wall_ms(), Ordering::Relaxed);
    Ok(())
}
