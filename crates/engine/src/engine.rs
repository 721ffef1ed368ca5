//! The control core as one state machine, in the sans-IO style of quinn-proto: the driver hands
//! it inputs with the time they are handled at ([`Engine::handle`]), asks when it next wants to be
//! woken ([`Engine::poll_timeout`]) and takes what it decided ([`Engine::poll_output`]). It owns
//! the dispatcher and planning path, the resource manager's intended and observed state, the
//! router capacity it hands out, the interval rollups and the alerts; it reads no clock, opens no
//! socket and starts no thread. The simulation (`hcp-harness::drive`) and the server
//! (`hcp-server::engine`) are two drivers of it.

use std::collections::{BTreeMap, VecDeque};

use hcp_econ::dispatch::{Plan, Reason};
use hcp_fleet::{Command, Report, Target};
use hcp_model::SimTime;
use hcp_model::device::ModelRef;
use hcp_model::fleet::{Fleet, Group};
use hcp_model::ids::{DeviceIdx, SiteIdx};
use hcp_model::signals::{Deployment, GridSignal, MarketSignal};
use hcp_sim::fleet::GroupTarget;

use crate::capacity::{self, ReplicaCapacity};

/// Intervals the batch planner looks ahead at most (a week of 15-minute intervals).
const BATCH_MAX_INTERVALS: usize = 672;
use crate::config::EngineConfig;
use crate::controller::DecisionContext;
use crate::io::{
    Ahead, Alert, BatchPlan, Decided, FeedHealth, HeldOff, Input, Output, PolicyUpdate, PriceMarket, Refused,
    SiteAhead, SiteInterval, Source,
};
use crate::plane::Plane;
use crate::policies::DispatchPolicy;

/// Prices kept per settlement point and market (a week of 5-minute prices).
const KEEP_PRICES: usize = 7 * 288;

#[derive(Clone, Debug, Default)]
struct PointSignals {
    /// By interval start: price and where it came from.
    prices: BTreeMap<(PriceMarket, i64), (f64, Source)>,
    four_cp: BTreeMap<i64, bool>,
    temperature_c: Option<f64>,
}

/// Why a device sits below its highest power, as the last plan that moved it said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldWhy {
    Economics,
    Strike,
    Grid,
    Cap,
    Stale,
}

fn hold_why(r: &Reason) -> HoldWhy {
    match r {
        Reason::PriceAboveValue { .. } | Reason::PriceBelowValue { .. } => HoldWhy::Economics,
        Reason::Strike { .. } => HoldWhy::Strike,
        Reason::GridCommitment { .. } | Reason::Scheduled { .. } => HoldWhy::Grid,
        Reason::SiteCap { .. } | Reason::FeederLimit { .. } | Reason::GpusCapped { .. } => HoldWhy::Cap,
        Reason::StalePrice { .. } => HoldWhy::Stale,
        Reason::GpusIdle { .. } | Reason::GpusShed { .. } => HoldWhy::Economics,
    }
}

/// Per-site energy and work since the interval started, integrated from reports.
#[derive(Clone, Copy, Debug, Default)]
struct SiteAcc {
    asic_hashing_j: f64,
    asic_idle_j: f64,
    gpu_serving_j: f64,
    gpu_idle_j: f64,
    hash_th_s: f64,
    gpu_serving_s: f64,
}

/// A device's last report, integrated forward until the next one.
#[derive(Clone, Copy, Debug)]
struct LastReport {
    at_ms: i64,
    power_w: f64,
    hashrate_ths: f64,
    running: bool,
}

/// The control core. See the module docs.
pub struct Engine {
    fleet: Fleet,
    groups: Vec<Group>,
    cfg: EngineConfig,
    policy: DispatchPolicy,
    plane: Plane,
    points: BTreeMap<String, PointSignals>,
    /// Settlement point of each site.
    site_point: Vec<String>,
    /// The fleet's distinct settlement points, each with its stale-price alert key.
    stale_keys: Vec<(String, String)>,
    deployments: BTreeMap<String, Vec<Deployment>>,
    market: Option<(MarketSignal, Source, SimTime)>,
    gpu_price: Option<(f64, Source)>,
    /// Inference demand by (site, model): (queued, running).
    demand: BTreeMap<(u16, String), (u32, u32)>,
    policy_versions: BTreeMap<String, u32>,
    reserved: Option<crate::io::ReservedRule>,
    now: SimTime,
    next_step: SimTime,
    next_decision: SimTime,
    interval_start: Option<SimTime>,
    replicas: Vec<ReplicaCapacity>,
    acc: Vec<SiteAcc>,
    last: Vec<Option<LastReport>>,
    hold: Vec<HoldWhy>,
    held: Vec<HeldOff>,
    site_of: Vec<SiteIdx>,
    alerts: BTreeMap<String, String>,
    /// Batch jobs waiting for the planner, and the price path they were last placed on (its
    /// start, the prices, the GPUs free).
    batch_waiting: Vec<hcp_econ::batch::BatchJob>,
    batch_path: Option<(SimTime, Vec<f64>, u32)>,
    /// Jobs told to start since the last decision, with their GPUs: the demand does not show
    /// them yet, so they are taken off the GPUs free, and not placed again.
    batch_started: BTreeMap<String, u32>,
    /// Each site's GPUs and their draws (the fleet's groups do not change after construction).
    site_gpus: Vec<crate::policies::SiteGpus>,
    /// Input kinds whose `refused:<kind>` alert is raised.
    refused_open: Vec<&'static str>,
    out: VecDeque<Output>,
}

impl Engine {
    /// The engine of `fleet` at `start` (decisions at `start` and every interval after). Command
    /// ids start at `first_command_id` (those below were used by an earlier run).
    pub fn new(fleet: &Fleet, cfg: EngineConfig, start: SimTime, first_command_id: u64) -> Result<Self, Refused> {
        cfg.validate().map_err(|e| Refused { input: "config", field: e.field, rule: e.rule })?;
        let mut policy = DispatchPolicy::new(fleet, cfg.dispatch(), false, 0.0, start);
        policy = policy.with_four_cp(cfg.four_cp_usd_per_kw_year, vec![]);
        policy.replan_every = cfg.replan_every_intervals;
        policy.horizon = cfg.horizon_intervals;
        // Live telemetry comes from the devices: a device that stops reporting turns stale.
        policy.dispatcher_mut().cfg.stale_telemetry_ms = cfg.stale_telemetry_s * 1000;
        let plane = Plane::new(fleet, cfg.manager(), start.0, policy.dispatcher(), first_command_id)
            .map_err(|e| refused("config", e.within("manager")))?;
        let n = fleet.devices.len();
        let interval = cfg.interval_ms();
        // Decisions fall on whole intervals of market time.
        let first = SimTime(start.0.div_euclid(interval) * interval);
        let first = if first < start { first.plus_ms(interval) } else { first };
        let groups = fleet.groups();
        let site_gpus = crate::policies::site_gpus(fleet, &groups);
        Ok(Engine {
            groups,
            site_point: fleet.sites.iter().map(|s| s.settlement_point.clone()).collect(),
            stale_keys: {
                let mut p: Vec<String> = fleet.sites.iter().map(|s| s.settlement_point.clone()).collect();
                p.sort();
                p.dedup();
                p.into_iter()
                    .map(|sp| {
                        let key = format!("stale_price:{sp}");
                        (sp, key)
                    })
                    .collect()
            },
            site_of: fleet.devices.iter().map(|d| d.site).collect(),
            acc: vec![SiteAcc::default(); fleet.sites.len()],
            held: vec![HeldOff::default(); fleet.sites.len()],
            fleet: fleet.clone(),
            policy,
            plane,
            points: BTreeMap::new(),
            deployments: BTreeMap::new(),
            market: None,
            gpu_price: None,
            demand: BTreeMap::new(),
            policy_versions: BTreeMap::new(),
            reserved: None,
            now: start,
            next_step: start,
            next_decision: first,
            interval_start: None,
            replicas: vec![],
            last: vec![None; n],
            hold: vec![HoldWhy::Economics; n],
            alerts: BTreeMap::new(),
            batch_waiting: vec![],
            batch_path: None,
            batch_started: BTreeMap::new(),
            site_gpus,
            refused_open: vec![],
            out: VecDeque::new(),
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn now(&self) -> SimTime {
        self.now
    }

    /// The resource manager (intended and observed state of every device).
    pub fn manager(&self) -> &hcp_fleet::Manager {
        self.plane.manager()
    }

    /// The dispatcher (levels, skips).
    pub fn dispatcher(&self) -> &hcp_econ::dispatch::Dispatcher {
        self.policy.dispatcher()
    }

    /// The version of each policy in force, by name.
    /// The market signal in force (before any arrived: no hashprice, no GPU price).
    pub fn market(&self) -> MarketSignal {
        self.market.as_ref().map_or_else(fallback_market, |m| m.0)
    }

    pub fn policies(&self) -> &BTreeMap<String, u32> {
        &self.policy_versions
    }

    /// When the engine next wants a [`Input::Tick`]: its next manager step or decision.
    pub fn poll_timeout(&self) -> SimTime {
        self.next_step.min(self.next_decision)
    }

    /// The next output, in the order things happened.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Takes an input at `now` (time never goes back: an earlier `now` counts as the latest).
    /// A refused input changes nothing and comes back as [`Output::Refused`] (and the error).
    pub fn handle(&mut self, input: Input, now: SimTime) -> Result<(), Refused> {
        self.handle_with(input, now, &mut |_| {})
    }

    /// [`Engine::handle`], handing a decision's first command batch to `first_batch` as soon as
    /// it exists, before the rest of the plan is made (the switching path); those commands are
    /// not repeated as outputs.
    pub fn handle_with(
        &mut self,
        input: Input,
        now: SimTime,
        first_batch: &mut dyn FnMut(&[Command]),
    ) -> Result<(), Refused> {
        let now = now.max(self.now);
        self.now = now;
        let kind = input.kind();
        let r = self.take(input, now, first_batch);
        match &r {
            Err(e) => {
                self.raise(format!("refused:{kind}"), now, e.to_string());
                if !self.refused_open.contains(&kind) {
                    self.refused_open.push(kind);
                }
                self.out.push_back(Output::Refused(e.clone()));
            }
            // An input of a kind refused before is accepted again: that alert is over.
            Ok(()) if !self.refused_open.is_empty() && self.refused_open.contains(&kind) => {
                self.refused_open.retain(|k| *k != kind);
                self.clear(&format!("refused:{kind}"), now);
            }
            Ok(()) => {}
        }
        r
    }

    fn refuse(input: &'static str, field: &str, rule: impl Into<String>) -> Refused {
        Refused { input, field: field.into(), rule: rule.into() }
    }

    fn point(&self, sp: &str, input: &'static str) -> Result<(), Refused> {
        if self.site_point.iter().any(|p| p == sp) {
            Ok(())
        } else {
            Err(Self::refuse(input, "settlement_point", format!("{sp:?} is not a settlement point of the fleet")))
        }
    }

    fn take(&mut self, input: Input, now: SimTime, first_batch: &mut dyn FnMut(&[Command])) -> Result<(), Refused> {
        match input {
            Input::Tick => {
                self.advance(now, first_batch);
                Ok(())
            }
            Input::Price { settlement_point, market, at, usd_per_mwh, source } => {
                self.point(&settlement_point, "price")?;
                let (lo, hi) = (self.cfg.price_min_usd_per_mwh, self.cfg.price_max_usd_per_mwh);
                if !(usd_per_mwh.is_finite() && (lo..=hi).contains(&usd_per_mwh)) {
                    return Err(Self::refuse(
                        "price",
                        "usd_per_mwh",
                        format!("must be between {lo} and {hi}, not {usd_per_mwh}"),
                    ));
                }
                if at.0.rem_euclid(market.interval_ms().min(self.cfg.interval_ms())) != 0
                    && market != PriceMarket::RealTime5
                {
                    return Err(Self::refuse(
                        "price",
                        "at",
                        format!("{at} is not the start of a {} interval", market.as_str()),
                    ));
                }
                // A 15-minute settlement price is known when its interval ends; a 5-minute SCED
                // price is set by the run that starts its interval (ex ante).
                let known_at = match market {
                    PriceMarket::RealTime15 => at.plus_ms(market.interval_ms()),
                    PriceMarket::RealTime5 => at,
                    PriceMarket::DayAhead => SimTime(i64::MIN),
                };
                if known_at > now.plus_ms(60_000) {
                    return Err(Self::refuse(
                        "price",
                        "at",
                        format!("a real-time price of {at} cannot be known at {now}"),
                    ));
                }
                let p = self.points.entry(settlement_point.clone()).or_default();
                // A day-ahead hour holds for each decision interval inside it.
                if market == PriceMarket::DayAhead {
                    let step = self.cfg.interval_ms().min(market.interval_ms());
                    for k in 0..(market.interval_ms() / step) {
                        p.prices.insert((market, at.0 + k * step), (usd_per_mwh, source.clone()));
                    }
                } else {
                    p.prices.insert((market, at.0), (usd_per_mwh, source.clone()));
                }
                let n = p.prices.range((market, i64::MIN)..=(market, i64::MAX)).count();
                if n > KEEP_PRICES * 4 {
                    let oldest: Vec<_> = p
                        .prices
                        .range((market, i64::MIN)..=(market, i64::MAX))
                        .take(n - KEEP_PRICES * 4)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in oldest {
                        p.prices.remove(&k);
                    }
                }
                self.out.push_back(Output::Signal {
                    kind: market.as_str(),
                    key: settlement_point,
                    at,
                    value: usd_per_mwh,
                    source,
                });
                Ok(())
            }
            Input::FourCp { settlement_point, at, alert, source } => {
                self.point(&settlement_point, "four_cp")?;
                self.points.entry(settlement_point.clone()).or_default().four_cp.insert(at.0, alert);
                let value = if alert { 1.0 } else { 0.0 };
                self.out.push_back(Output::Signal { kind: "four_cp", key: settlement_point, at, value, source });
                Ok(())
            }
            Input::Weather { settlement_point, temperature_c, source } => {
                self.point(&settlement_point, "weather")?;
                if !(temperature_c.is_finite() && (-60.0..=70.0).contains(&temperature_c)) {
                    return Err(Self::refuse("weather", "temperature_c", "must be between -60 and 70"));
                }
                self.points.entry(settlement_point.clone()).or_default().temperature_c = Some(temperature_c);
                let kind = "temperature_c";
                self.out.push_back(Output::Signal {
                    kind,
                    key: settlement_point,
                    at: now,
                    value: temperature_c,
                    source,
                });
                Ok(())
            }
            Input::Market { signal, source } => {
                let h = signal.hashprice_usd_per_ph_day;
                let max = self.cfg.hashprice_max_usd_per_ph_day;
                if !(h.is_finite() && h > 0.0 && h <= max) {
                    return Err(Self::refuse(
                        "market",
                        "hashprice_usd_per_ph_day",
                        format!("must be above 0 and at most {max}, not {h}"),
                    ));
                }
                if signal.at > now {
                    return Err(Self::refuse("market", "at", format!("{} is after now ({now})", signal.at)));
                }
                for (f, v) in [("btc_usd", signal.btc_usd), ("difficulty", signal.difficulty)] {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(Self::refuse("market", f, "must be a finite number >= 0"));
                    }
                }
                self.out.push_back(Output::Signal {
                    kind: "hashprice",
                    key: "network".into(),
                    at: signal.at,
                    value: h,
                    source: source.clone(),
                });
                self.clear(&"stale_market".to_string(), now);
                self.market = Some((signal, source, now));
                Ok(())
            }
            Input::GpuPrice { usd_per_gpu_hour, source } => {
                let max = self.cfg.gpu_price_max_usd_per_gpu_hour;
                if !(usd_per_gpu_hour.is_finite() && (0.0..=max).contains(&usd_per_gpu_hour)) {
                    return Err(Self::refuse("gpu_price", "usd_per_gpu_hour", format!("must be between 0 and {max}")));
                }
                self.out.push_back(Output::Signal {
                    kind: "gpu_price",
                    key: "fleet".into(),
                    at: now,
                    value: usd_per_gpu_hour,
                    source: source.clone(),
                });
                self.gpu_price = Some((usd_per_gpu_hour, source));
                Ok(())
            }
            Input::Deployment { settlement_point, deployment, source } => {
                self.point(&settlement_point, "deployment")?;
                let d = deployment;
                if !(d.notice_at <= d.respond_by && d.respond_by <= d.end_at) {
                    return Err(Self::refuse("deployment", "end_at", "must have notice_at <= respond_by <= end_at"));
                }
                if !(d.fraction.is_finite() && (0.0..=1.0).contains(&d.fraction)) {
                    return Err(Self::refuse("deployment", "fraction", "must be between 0 and 1"));
                }
                let list = self.deployments.entry(settlement_point.clone()).or_default();
                if !list.contains(&d) {
                    list.push(d);
                }
                list.retain(|x| x.end_at > now);
                self.out.push_back(Output::Signal {
                    kind: "deployment",
                    key: format!("{settlement_point}:{}", d.program.name()),
                    at: d.notice_at,
                    value: d.fraction,
                    source,
                });
                Ok(())
            }
            Input::Telemetry { device, report } => {
                let (plane, policy) = (&mut self.plane, &mut self.policy);
                // The plane checks the report first: a refused one is not metered either.
                plane.report(device, report, now.0, policy.dispatcher_mut()).map_err(|e| refused("telemetry", e))?;
                self.meter(device, &report, now.0);
                Ok(())
            }
            Input::CommandResult { id, device, outcome } => {
                let (plane, policy) = (&mut self.plane, &mut self.policy);
                plane
                    .answer(id, device, outcome, now.0, policy.dispatcher_mut())
                    .map_err(|e| refused("command_result", e))
            }
            Input::Maintenance { scope, on } => {
                let (plane, policy) = (&mut self.plane, &mut self.policy);
                plane
                    .set_maintenance(scope, on, policy.dispatcher_mut())
                    .map(|_| ())
                    .map_err(|e| refused("maintenance", e))
            }
            Input::Policy(update) => self.set_policy(update),
            Input::Feed { feed, health } => {
                let key = format!("feed:{feed}");
                match health {
                    FeedHealth::Ok => self.clear(&key, now),
                    FeedHealth::Failed(why) => {
                        let text = format!(
                            "feed {feed}: {why}; its signals age and the safe policy applies when they are stale"
                        );
                        self.raise(key, now, text);
                    }
                }
                Ok(())
            }
            Input::Jobs { waiting } => {
                let mut ids = std::collections::BTreeSet::new();
                for (i, j) in waiting.iter().enumerate() {
                    if j.id.is_empty() || !ids.insert(j.id.as_str()) {
                        return Err(Self::refuse("jobs", &format!("waiting[{i}].id"), "must be non-empty and unique"));
                    }
                    if j.gpus == 0 {
                        return Err(Self::refuse("jobs", &format!("waiting[{i}].gpus"), "must be at least 1"));
                    }
                    if j.remaining_ms <= 0 {
                        return Err(Self::refuse("jobs", &format!("waiting[{i}].remaining_ms"), "must be above 0"));
                    }
                }
                self.batch_waiting = waiting;
                self.place_batch(now);
                Ok(())
            }
            Input::Demand { site, model, queued, running } => {
                if site.index() >= self.fleet.sites.len() {
                    return Err(Self::refuse("demand", "site", format!("{} is not a site of the fleet", site.0)));
                }
                self.demand.insert((site.0, model), (queued, running));
                // Work arrived where idle GPUs gave their headroom to the ASICs: the site is
                // re-planned now (the ASICs make room, the GPUs serve again), not at the next
                // interval.
                let s = site.index();
                if let Some(busy) = self.gpu_busy()[s]
                    && busy > self.policy.gpus_serving_now(s)
                    && let Some((plan, targets)) = self.policy.reclaim_gpus(now, &self.fleet, &self.groups, s, busy)
                {
                    // A decision between intervals: commands now, the router's capacity with them.
                    self.plane.set_time(now.0);
                    self.plane.apply_plan(&plan);
                    self.apply_gpu_targets(&targets);
                    let first_batch = self.plane.reconcile_now(self.policy.dispatcher_mut());
                    self.drain_commands();
                    let (replicas, avail) = self.capacity(&targets);
                    self.note_holds(&plan, &avail);
                    self.out.push_back(Output::Decided(Box::new(Decided {
                        at: now,
                        plan,
                        plane: self.plane.take_output(),
                        counts: self.plane.manager().counts(),
                        first_batch,
                        replicas,
                        ahead: Ahead::default(),
                        closed: vec![],
                    })));
                }
                Ok(())
            }
        }
    }

    fn set_policy(&mut self, update: PolicyUpdate) -> Result<(), Refused> {
        let (name, version) = match update {
            PolicyUpdate::Strike(rule) => {
                let known: Vec<&str> = self.fleet.catalogue.asics.iter().map(|m| m.id.as_str()).collect();
                for (m, v) in &rule.models {
                    if !known.contains(&m.as_str()) {
                        return Err(Self::refuse(
                            "policy",
                            &format!("strike.models.{m}"),
                            "not an ASIC model of the catalogue",
                        ));
                    }
                    if !v.is_finite() {
                        return Err(Self::refuse("policy", &format!("strike.models.{m}"), "must be a finite price"));
                    }
                }
                if rule.curtail_after == 0 || rule.resume_after == 0 {
                    return Err(Self::refuse("policy", "strike.curtail_after", "dwell counts must be >= 1"));
                }
                let v = rule.version;
                self.policy.strike = Some(rule);
                ("strike".to_string(), Some(v))
            }
            PolicyUpdate::GridCommitment(rule) => {
                if rule.site.index() >= self.fleet.sites.len() {
                    return Err(Self::refuse("policy", "grid-commitment.site", "not a site of the fleet"));
                }
                if !(rule.mw.is_finite() && rule.mw >= 0.0) {
                    return Err(Self::refuse("policy", "grid-commitment.mw", "must be a number >= 0"));
                }
                let v = rule.version;
                // One commitment per site and program: the new one replaces the old.
                self.policy.grid_rules.retain(|r| !(r.site == rule.site && r.program == rule.program));
                self.policy.grid_rules.push(rule);
                ("grid-commitment".to_string(), Some(v))
            }
            PolicyUpdate::Reserved(rule) => {
                let v = rule.version;
                self.policy.reserved = Some(rule.clone());
                self.reserved = Some(rule);
                ("reserved-capacity".to_string(), Some(v))
            }
            PolicyUpdate::Cleared(name) => {
                match name.as_str() {
                    "strike" => self.policy.strike = None,
                    "grid-commitment" => self.policy.grid_rules.clear(),
                    "reserved-capacity" => {
                        self.reserved = None;
                        self.policy.reserved = None;
                    }
                    other => return Err(Self::refuse("policy", "name", format!("no policy {other:?}"))),
                }
                (name, None)
            }
        };
        match version {
            Some(v) => self.policy_versions.insert(name.clone(), v),
            None => self.policy_versions.remove(&name),
        };
        self.out.push_back(Output::PolicyApplied { name, version });
        Ok(())
    }

    /// Energy since the device's last report, at that report's power, goes to its site.
    fn meter(&mut self, d: DeviceIdx, r: &Report, t: i64) {
        let Some(model) = self.fleet.devices.get(d.index()).map(|x| x.model) else { return };
        if !(r.power_w.is_finite() && r.power_w >= 0.0) {
            return;
        }
        self.integrate(d.index(), t, model);
        let running = matches!(r.state, Target::Run { .. });
        let hashrate_ths = r.hashrate_ths.filter(|h| h.is_finite()).unwrap_or(0.0);
        self.last[d.index()] = Some(LastReport { at_ms: t, power_w: r.power_w, hashrate_ths, running });
    }

    fn integrate(&mut self, i: usize, t: i64, model: ModelRef) {
        let Some(l) = &mut self.last[i] else { return };
        // A silent device is counted at its last power for at most one interval.
        let dt_s = (t - l.at_ms).clamp(0, self.cfg.interval_ms()) as f64 / 1e3;
        l.at_ms = t.max(l.at_ms);
        let a = &mut self.acc[self.site_of[i].index()];
        match (model, l.running) {
            (ModelRef::Asic(_), true) => {
                a.asic_hashing_j += l.power_w * dt_s;
                a.hash_th_s += l.hashrate_ths * dt_s;
            }
            (ModelRef::Asic(_), false) => a.asic_idle_j += l.power_w * dt_s,
            (ModelRef::Gpu(_), true) => {
                a.gpu_serving_j += l.power_w * dt_s;
                a.gpu_serving_s += dt_s;
            }
            (ModelRef::Gpu(_), false) => a.gpu_idle_j += l.power_w * dt_s,
        }
    }

    /// Does what is due up to `now`: manager steps, decisions at interval starts.
    fn advance(&mut self, now: SimTime, first_batch: &mut dyn FnMut(&[Command])) {
        loop {
            let next = self.poll_timeout();
            if next > now {
                break;
            }
            if self.next_decision <= self.next_step {
                let at = self.next_decision;
                self.plane.set_time(at.0);
                self.decide(at, first_batch);
                self.next_decision = at.plus_ms(self.cfg.interval_ms());
                if self.next_step <= at {
                    self.next_step = at.plus_ms(self.cfg.step_ms());
                }
            } else {
                let at = self.next_step;
                self.plane.step(at.0, self.policy.dispatcher_mut());
                self.drain_commands();
                self.next_step = at.plus_ms(self.cfg.step_ms());
            }
        }
        self.check_stale(now);
    }

    /// GPU targets to the devices: the first `serving` GPUs of each group run at the cap, the
    /// others idle (asleep, model unloaded).
    fn apply_gpu_targets(&mut self, targets: &[GroupTarget]) {
        for (g, target) in self.groups.iter().zip(targets) {
            if let GroupTarget::Gpu(gt) = target {
                for (k, &d) in g.devices.iter().enumerate() {
                    // A GPU's cap within its model's range never fails; recorded if it does.
                    let r = if (k as u32) < gt.serving {
                        self.plane.set_gpu_cap(d, gt.cap_w)
                    } else {
                        self.plane.set_gpu_idle(d)
                    };
                    if let Err(e) = r {
                        self.out.push_back(Output::Refused(refused("plan", e)));
                    }
                }
            }
        }
    }

    /// GPUs with work per site, from the router's demand (requests running and queued) and the
    /// replicas' slots: any request waiting keeps every GPU of its site busy; else the replicas
    /// the running requests fill. None where no demand was reported.
    fn gpu_busy(&self) -> Vec<Option<u32>> {
        let per = self.fleet.served_model.gpus_per_replica.max(1);
        let mut out = vec![None; self.fleet.sites.len()];
        let mut slots = vec![0u32; self.fleet.sites.len()];
        let mut gpus = vec![0u32; self.fleet.sites.len()];
        for r in &self.replicas {
            let s = r.site.index();
            slots[s] = slots[s].max(r.slots);
            gpus[s] += r.gpus;
        }
        for ((site, _), (queued, running)) in &self.demand {
            let s = usize::from(*site);
            let Some(o) = out.get_mut(s) else { continue };
            let need = if *queued > 0 {
                gpus[s]
            } else if slots[s] > 0 {
                running.div_ceil(slots[s]) * per
            } else {
                gpus[s]
            };
            *o = Some(o.unwrap_or(0u32).saturating_add(need).min(gpus[s].max(need)));
        }
        out
    }

    /// Places the waiting batch jobs on the last price path (shifted to `now`) and says where
    /// ([`Output::Batch`]); nothing when none waits.
    fn place_batch(&mut self, now: SimTime) {
        if self.batch_waiting.is_empty() {
            return;
        }
        let iv = self.cfg.interval_ms();
        let start = SimTime(now.0.div_euclid(iv) * iv);
        let (prices, free) = match &self.batch_path {
            Some((t0, p, free)) if *t0 <= start => {
                let skip = ((start.0 - t0.0) / iv) as usize;
                (p.get(skip..).map(<[f64]>::to_vec).unwrap_or_default(), *free)
            }
            _ => (vec![], 0),
        };
        let (n, w) = self.site_gpus.iter().fold((0u32, 0.0), |(n, w), g| (n + g.count, w + g.full_w));
        let started: u32 = self.batch_started.values().sum();
        let free = free.saturating_sub(started);
        let path = hcp_econ::batch::PricePath {
            start,
            interval_ms: iv,
            usd_per_mwh: &prices,
            gpu_draw_w: if n > 0 { w / f64::from(n) } else { 0.0 },
            free_gpus: &[free],
            max_intervals: BATCH_MAX_INTERVALS,
        };
        let waiting: Vec<hcp_econ::batch::BatchJob> =
            self.batch_waiting.iter().filter(|j| !self.batch_started.contains_key(&j.id)).cloned().collect();
        if waiting.is_empty() {
            return;
        }
        let placements = hcp_econ::batch::schedule(now, &path, &waiting);
        for (p, j) in placements.iter().zip(&waiting) {
            if p.run_now {
                self.batch_started.insert(j.id.clone(), j.gpus);
            }
        }
        self.out.push_back(Output::Batch(BatchPlan {
            at: now,
            path_start: start,
            path_usd_per_mwh: prices,
            free_gpus: free,
            placements,
        }));
    }

    /// The batch planner's price path from `t0`: per interval, the GPU-weighted mean over the
    /// sites of the price in force now (the last real-time price; the day-ahead price where none
    /// is known) and then the day-ahead prices; and the GPUs the demand leaves free. Empty when
    /// a site with GPUs has no prices.
    fn set_batch_path(&mut self, t0: SimTime, last_grid: &[GridSignal], known: &[Vec<f64>], busy: &[Option<u32>]) {
        let gpus = &self.site_gpus;
        let with_gpus: Vec<usize> = (0..gpus.len()).filter(|&s| gpus[s].count > 0).collect();
        let total: u32 = with_gpus.iter().map(|&s| gpus[s].count).sum();
        let held: u32 = with_gpus.iter().map(|&s| busy[s].unwrap_or(0).min(gpus[s].count)).sum();
        let len = with_gpus.iter().map(|&s| known[s].len()).min().unwrap_or(0);
        let price = |s: usize, k: usize| -> f64 {
            if k == 0 && last_grid[s].rt_price_usd_per_mwh.is_finite() {
                last_grid[s].rt_price_usd_per_mwh
            } else {
                known[s][k]
            }
        };
        let path: Vec<f64> = if total == 0 || len == 0 {
            vec![]
        } else {
            (0..len)
                .map(|k| {
                    with_gpus.iter().map(|&s| f64::from(gpus[s].count) * price(s, k)).sum::<f64>() / f64::from(total)
                })
                .collect()
        };
        let path = if path.iter().all(|p| p.is_finite()) { path } else { vec![] };
        self.batch_path = Some((t0, path, total - held));
    }

    fn drain_commands(&mut self) {
        for c in self.plane.drain_commands() {
            self.out.push_back(Output::Command(c));
        }
    }

    fn raise(&mut self, key: String, now: SimTime, text: String) {
        if self.alerts.get(&key) != Some(&text) {
            self.alerts.insert(key.clone(), text.clone());
            self.out.push_back(Output::Alert(Alert { key, raised: true, at_ms: now.0, text }));
        }
    }

    fn clear(&mut self, key: &String, now: SimTime) {
        if let Some(text) = self.alerts.remove(key) {
            self.out.push_back(Output::Alert(Alert { key: key.clone(), raised: false, at_ms: now.0, text }));
        }
    }

    /// Stale prices and market raise alerts; fresh ones clear them.
    fn check_stale(&mut self, now: SimTime) {
        let stale_ms = self.cfg.stale_price_s * 1000;
        for k in 0..self.stale_keys.len() {
            let (sp, key) = &self.stale_keys[k];
            let published = self.last_price(sp).map(|(g, _)| g.at.0 + g.interval_ms);
            // One alert per staleness episode (its text would change every tick).
            let open = self.alerts.contains_key(key);
            let text = match published {
                Some(p) if now.0 - p <= stale_ms => {
                    if open {
                        let key = key.clone();
                        self.clear(&key, now);
                    }
                    continue;
                }
                Some(p) if !open => {
                    format!("{sp}: last price published {} s ago; the safe policy applies", (now.0 - p) / 1000)
                }
                None if !open && self.interval_start.is_some() => {
                    format!("{sp}: no price received yet; the safe policy applies")
                }
                _ => continue,
            };
            let key = key.clone();
            self.raise(key, now, text);
        }
        let key = "stale_market".to_string();
        let open = self.alerts.contains_key(&key);
        if let Some((m, _, _)) = &self.market
            && now.0 - m.at.0 > self.cfg.stale_market_s * 1000
            && !open
        {
            let text = format!("hashprice last set for {}; deciding with it", m.at);
            self.raise(key, now, text);
        }
    }

    /// The most recently published real-time price of a point (15- or 5-minute), as a grid
    /// signal of its interval, with its source.
    fn last_price(&self, sp: &str) -> Option<(GridSignal, Source)> {
        let p = self.points.get(sp)?;
        let latest = |m: PriceMarket| {
            p.prices
                .range((m, i64::MIN)..=(m, i64::MAX))
                .next_back()
                .map(|((_, at), (v, src))| (*at, m.interval_ms(), *v, src.clone()))
        };
        let best = [latest(PriceMarket::RealTime15), latest(PriceMarket::RealTime5)]
            .into_iter()
            .flatten()
            .max_by_key(|(at, len, _, _)| at + len)?;
        let (at, len, v, src) = best;
        let da = p.prices.get(&(PriceMarket::DayAhead, at.div_euclid(self.cfg.interval_ms()) * self.cfg.interval_ms()));
        Some((
            GridSignal {
                at: SimTime(at),
                interval_ms: len,
                rt_price_usd_per_mwh: v,
                da_price_usd_per_mwh: da.map_or(f64::NAN, |x| x.0),
                temperature_c: p.temperature_c.unwrap_or(f64::NAN),
                four_cp_alert: p.four_cp.get(&at).copied().unwrap_or(false),
            },
            src,
        ))
    }

    /// Day-ahead prices from `t0` over `n` intervals: those known, then the last known day's
    /// price at the same time of day (persistence); empty when none is known.
    fn day_ahead(&self, sp: &str, t0: SimTime, n: usize) -> Vec<f64> {
        let Some(p) = self.points.get(sp) else { return vec![] };
        let da = PriceMarket::DayAhead;
        let mut known = p.prices.range((da, i64::MIN)..=(da, i64::MAX)).map(|((_, at), (v, _))| (*at, *v));
        let Some(first) = known.next() else { return vec![] };
        let iv = self.cfg.interval_ms();
        (0..n as i64)
            .map(|k| {
                let t = t0.0 + k * iv;
                let mut back = t;
                // The same time of day on the latest day known (at most 30 days back).
                for _ in 0..=30 {
                    if let Some((v, _)) = p.prices.get(&(da, back)) {
                        return *v;
                    }
                    back -= 86_400_000;
                }
                p.prices.range((da, i64::MIN)..=(da, t)).next_back().map_or(first.1, |(_, (v, _))| *v)
            })
            .collect()
    }

    fn decide(&mut self, t0: SimTime, first_batch: &mut dyn FnMut(&[Command])) {
        let n_sites = self.fleet.sites.len();
        let interval = self.cfg.interval_ms();
        // Close the interval that ends here: bring every device's energy up to now.
        for i in 0..self.last.len() {
            let m = self.fleet.devices[i].model;
            self.integrate(i, t0.0, m);
        }
        let closed = match self.interval_start {
            Some(start) => self.close(start, t0),
            None => vec![],
        };
        self.acc = vec![SiteAcc::default(); n_sites];
        self.interval_start = Some(t0);
        let unknown = GridSignal {
            at: SimTime(i64::MIN / 4),
            interval_ms: interval,
            rt_price_usd_per_mwh: f64::NAN,
            da_price_usd_per_mwh: f64::NAN,
            temperature_c: f64::NAN,
            four_cp_alert: false,
        };
        let last_grid: Vec<GridSignal> =
            self.site_point.iter().map(|sp| self.last_price(sp).map_or(unknown, |(g, _)| g)).collect();
        let horizon = self.cfg.horizon_intervals;
        // One look-up per site serves the planning path's horizon and the day ahead announced.
        let known: Vec<Vec<f64>> =
            self.site_point.iter().map(|sp| self.day_ahead(sp, t0, horizon.max(self.cfg.ahead_intervals))).collect();
        // The planning path needs every site's prices over the whole horizon.
        let day_ahead: Vec<Vec<f64>> =
            if known.iter().all(|d| d.len() >= horizon && d[..horizon].iter().all(|x| x.is_finite())) {
                known.iter().map(|d| d[..horizon].to_vec()).collect()
            } else {
                vec![vec![]; n_sites]
            };
        let four_cp_ahead: Vec<Vec<bool>> = self
            .site_point
            .iter()
            .map(|sp| {
                let p = self.points.get(sp);
                (0..horizon as i64)
                    .map(|k| p.and_then(|p| p.four_cp.get(&(t0.0 + k * interval)).copied()).unwrap_or(false))
                    .collect()
            })
            .collect();
        let four_cp: Vec<bool> = four_cp_ahead.iter().map(|v| v.first().copied().unwrap_or(false)).collect();
        let deployments: Vec<Vec<Deployment>> = self
            .site_point
            .iter()
            .map(|sp| {
                self.deployments
                    .get(sp)
                    .map_or(vec![], |v| v.iter().filter(|d| d.notice_at <= t0 && d.end_at > t0).copied().collect())
            })
            .collect();
        let mut market = self.market();
        if let Some((p, _)) = &self.gpu_price {
            market.gpu_rental_usd_per_gpu_hour = *p;
        }
        let gpu_busy = self.gpu_busy();
        let ctx = DecisionContext {
            now: t0,
            fleet: &self.fleet,
            groups: &self.groups,
            last_grid: &last_grid,
            four_cp_alert: &four_cp,
            deployments: &deployments,
            market: &market,
            energy_adder_usd_per_mwh: self.cfg.energy_adder_usd_per_mwh,
            day_ahead: &day_ahead,
            four_cp_ahead: &four_cp_ahead,
            actual: None,
            gpu_busy: &gpu_busy,
        };
        let plane = &mut self.plane;
        let mut first = 0;
        let batch = plane.batch_max();
        let targets = self.policy.decide_with(&ctx, batch, &mut |changes| {
            plane.apply_changes(changes);
            first = plane.send_now(changes);
            first_batch(plane.pending_commands());
            plane.drain_commands();
        });
        let plan = self.policy.last_plan.clone().unwrap_or_default();
        self.plane.apply_plan(&plan);
        self.apply_gpu_targets(&targets);
        let rest = self.plane.reconcile_now(self.policy.dispatcher_mut());
        self.drain_commands();
        let first_batch = if first > 0 { first } else { rest };
        let (replicas, avail) = self.capacity(&targets);
        self.note_holds(&plan, &avail);
        self.set_batch_path(t0, &last_grid, &known, &gpu_busy);
        // The demand now shows the jobs started before this decision (or they left the set).
        self.batch_started.clear();
        self.place_batch(t0);
        let schedule = self.policy.schedule_ahead(t0, self.cfg.ahead_intervals);
        let ahead = Ahead {
            at_ms: t0.0,
            interval_ms: interval,
            sites: self
                .fleet
                .sites
                .iter()
                .enumerate()
                .map(|(i, site)| SiteAhead {
                    site: site.id.clone(),
                    day_ahead_usd_per_mwh: known[i].iter().take(self.cfg.ahead_intervals).copied().collect(),
                    planned_asic_mw: schedule.get(i).map(|s| s.0.iter().map(|w| w / 1e6).collect()).unwrap_or_default(),
                    held: schedule.get(i).map(|s| s.1.clone()).unwrap_or_default(),
                })
                .collect(),
        };
        self.out.push_back(Output::Decided(Box::new(Decided {
            at: t0,
            plan,
            plane: self.plane.take_output(),
            counts: self.plane.manager().counts(),
            first_batch,
            replicas,
            ahead,
            closed,
        })));
    }

    /// The replicas' capacity after the groups' targets: those that changed (all the first
    /// time), and the devices' availability it was computed with.
    fn capacity(&mut self, targets: &[GroupTarget]) -> (Vec<ReplicaCapacity>, Vec<bool>) {
        let serving: Vec<Option<(u32, f64)>> = targets
            .iter()
            .map(|x| match x {
                GroupTarget::Gpu(g) => Some((g.serving, g.cap_w)),
                _ => None,
            })
            .collect();
        let avail = self.plane.manager().availability();
        let caps = capacity::replicas(&self.fleet, &self.groups, &serving, &avail);
        let replicas = capacity::changed(&self.replicas, &caps).into_iter().cloned().collect();
        self.replicas = caps;
        (replicas, avail)
    }

    /// Records why each moved device now sits where it does, and what the plan holds off.
    fn note_holds(&mut self, plan: &Plan, avail: &[bool]) {
        for c in &plan.changes {
            if let Some(r) = plan.reasons.get(c.reason as usize) {
                self.hold[c.device.index()] = hold_why(r);
            }
        }
        let d = self.policy.dispatcher();
        let mut held = vec![HeldOff::default(); self.fleet.sites.len()];
        for (i, dev) in self.fleet.devices.iter().enumerate() {
            let ModelRef::Asic(m) = dev.model else { continue };
            let idx = DeviceIdx(i as u32);
            let max_w = self.fleet.catalogue.asic(m).max_power_w;
            let h = &mut held[dev.site.index()];
            if !avail[i] {
                h.unavailable_mw += max_w / 1e6;
                continue;
            }
            let now_w = d.power_w(idx).unwrap_or(max_w);
            let off = (max_w - now_w).max(0.0) / 1e6;
            if off <= 0.0 {
                continue;
            }
            match self.hold[i] {
                HoldWhy::Economics => h.economics_mw += off,
                HoldWhy::Strike => h.strike_mw += off,
                HoldWhy::Grid => h.grid_mw += off,
                HoldWhy::Cap => h.cap_mw += off,
                HoldWhy::Stale => h.stale_mw += off,
            }
        }
        self.held = held;
    }

    /// The rollup of each site over `[start, end)`.
    fn close(&self, start: SimTime, end: SimTime) -> Vec<SiteInterval> {
        let dur_s = ((end.0 - start.0).max(1)) as f64 / 1e3;
        let hours = dur_s / 3_600.0;
        let hashprice = self.market.as_ref().map_or(f64::NAN, |m| m.0.hashprice_usd_per_ph_day);
        let gpu_price = self
            .gpu_price
            .as_ref()
            .map(|g| g.0)
            .or(self.market.as_ref().map(|m| m.0.gpu_rental_usd_per_gpu_hour))
            .filter(|x| x.is_finite())
            .unwrap_or(0.0);
        self.fleet
            .sites
            .iter()
            .enumerate()
            .map(|(s, site)| {
                let a = &self.acc[s];
                let sp = &self.site_point[s];
                let settled = self.points.get(sp).and_then(|p| p.prices.get(&(PriceMarket::RealTime15, start.0)));
                let (price, fin) = match settled {
                    Some((v, _)) => (*v, true),
                    None => (self.last_price(sp).map_or(f64::NAN, |(g, _)| g.rt_price_usd_per_mwh), false),
                };
                let mw = |j: f64| j / dur_s / 1e6;
                let total_mw = mw(a.asic_hashing_j + a.asic_idle_j + a.gpu_serving_j + a.gpu_idle_j);
                let energy_mwh = total_mw * hours;
                let hashrate_ph_s = a.hash_th_s / dur_s / 1e3;
                let cost_price = if price.is_finite() { price + self.cfg.energy_adder_usd_per_mwh } else { 0.0 };
                let held = self.held[s];
                let cap_mw = site.power_cap_w / 1e6;
                SiteInterval {
                    at: start,
                    site: site.idx,
                    price_usd_per_mwh: price,
                    price_final: fin,
                    hashprice_usd_per_ph_day: hashprice,
                    gpu_usd_per_gpu_hour: gpu_price,
                    cap_mw,
                    asic_hashing_mw: mw(a.asic_hashing_j),
                    asic_idle_mw: mw(a.asic_idle_j),
                    gpu_serving_mw: mw(a.gpu_serving_j),
                    gpu_idle_mw: mw(a.gpu_idle_j),
                    hashrate_ph_s,
                    gpus_serving: a.gpu_serving_s / dur_s,
                    energy_mwh,
                    mining_revenue_usd: if hashprice.is_finite() {
                        hashrate_ph_s * hashprice * hours / 24.0
                    } else {
                        0.0
                    },
                    inference_revenue_usd: a.gpu_serving_s / 3_600.0 * gpu_price,
                    energy_cost_usd: energy_mwh * cost_price,
                    held,
                    headroom_mw: (cap_mw - total_mw - held.total_mw()).max(0.0),
                }
            })
            .collect()
    }

    /// Inference demand as last reported, by (site, model): (queued, running).
    pub fn demand(&self) -> &BTreeMap<(u16, String), (u32, u32)> {
        &self.demand
    }
}

/// A value the manager or the plane refused, as the engine's refusal of `input`.
fn refused(input: &'static str, e: hcp_model::Invalid) -> Refused {
    Refused { input, field: e.field, rule: e.rule }
}

/// Before any market signal: no hashprice known, so nothing is worth mining (the dispatcher sleeps
/// ASICs whose value it cannot tell) and GPUs earn nothing in the books.
fn fallback_market() -> MarketSignal {
    MarketSignal {
        at: SimTime(0),
        btc_usd: 0.0,
        difficulty: 0.0,
        block_height: 0,
        subsidy_btc: 0.0,
        fees_btc_per_block: 0.0,
        network_hashrate_ehs: 0.0,
        hashprice_usd_per_ph_day: 0.0,
        gpu_rental_usd_per_gpu_hour: 0.0,
    }
}
