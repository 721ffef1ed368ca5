//! The resource manager, sans-IO: every device's intended state (from the power plan) and observed
//! state (from telemetry), and a reconciler that computes the commands between them.
//!
//! Inputs: `set_intent` (the plan), `telemetry` (a device's report), `command_result` (an agent's
//! answer), `set_maintenance`, `release_quarantine`, and `tick(now)`. Outputs: batched, staggered,
//! idempotent [`Command`]s and [`Event`]s (device unknown, back, quarantined, returned, command given
//! up). [`Manager::availability`] says which devices may carry load, for the dispatcher and router.
//!
//! Rules:
//! - Liveness: a device not heard from for `heartbeat_timeout_ms` is unknown: it is excluded from
//!   capacity (the engine re-plans) and gets no commands until it reports again.
//! - Commands: one in flight per device. A command has an id that stays the same across its retries,
//!   so an agent applying it twice does nothing twice; it times out after `command_timeout_ms` and is
//!   retried with doubling back-off up to `max_attempts`, then given up (an event; the device turns
//!   suspect and is retried after `give_up_backoff_ms`). A newer intent replaces a pending command.
//! - Batching and staggering: at most `batch_max` commands per tick in all, and per feeder at most
//!   `per_feeder_per_tick` wake-ups (commands that raise power), so that a feeder is not hit by the
//!   inrush of every device waking at once; power reductions are not staggered (they are what a grid
//!   event needs fast). Ticks at the same instant share one budget (a plan sent in steps).
//! - Health: temperature above `temp_max_c`, error counters rising by more than `errors_max_per_report`
//!   in one report, or hashrate below `hashrate_ratio_min` of the expected hashrate for
//!   `bad_reports_to_quarantine` reports in a row put the device in quarantine: it is slept and
//!   excluded from capacity. After `quarantine_ms` it returns on probation; a relapse doubles the
//!   period. An operator may release it earlier.
//! - Maintenance: per device, rack or site; a device in maintenance gets no commands and carries no
//!   load, and keeps its intent for when it comes back.
//!
//! Architecture invariant: pure and deterministic: no IO, clock, threads or randomness; `now_ms`
//! comes in with every input; iteration is in device order.

pub mod wire;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use hcp_model::Invalid;
use hcp_model::device::ModelRef;
use hcp_model::fleet::Fleet;
use hcp_model::ids::{DeviceIdx, FeederIdx, RackIdx, SiteIdx};

/// What a device should do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Run at this power (ASIC: hashing at the clock that draws it; GPU: power cap).
    Run { power_w: f64 },
    /// Low-power sleep (ASIC) or idle without work (GPU).
    Sleep,
}

impl Target {
    fn power_w(self) -> f64 {
        match self {
            Target::Run { power_w } => power_w,
            Target::Sleep => 0.0,
        }
    }
}

/// A device's report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    /// What it is doing now.
    pub state: Target,
    pub power_w: f64,
    /// Hashrate (ASICs) or throughput-equivalent; None where it does not apply.
    pub hashrate_ths: Option<f64>,
    pub temp_c: f64,
    /// Cumulative error counter (hardware errors, GPU Xid events).
    pub errors: u64,
}

pub type CommandId = u64;

/// A command to a device. Applying it twice is the same as once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Command {
    pub id: CommandId,
    pub device: DeviceIdx,
    pub target: Target,
    /// 1 for the first send, then 2, 3, ... for retries (same id).
    pub attempt: u32,
    pub deadline_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Applied,
    Failed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Not heard from within the heartbeat timeout: out of capacity until it reports.
    Unknown {
        device: DeviceIdx,
    },
    /// Reporting again after being unknown.
    Back {
        device: DeviceIdx,
    },
    Quarantined {
        device: DeviceIdx,
        reason: String,
        until_ms: i64,
    },
    Returned {
        device: DeviceIdx,
    },
    /// A command failed or timed out `max_attempts` times.
    GaveUp {
        device: DeviceIdx,
        command: CommandId,
        reason: String,
    },
    /// A command was applied.
    Applied {
        device: DeviceIdx,
        command: CommandId,
    },
}

/// Maintenance scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Device(DeviceIdx),
    Rack(RackIdx),
    Site(SiteIdx),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ManagerConfig {
    pub heartbeat_timeout_ms: i64,
    pub command_timeout_ms: i64,
    pub max_attempts: u32,
    pub retry_backoff_ms: i64,
    pub give_up_backoff_ms: i64,
    pub batch_max: usize,
    pub per_feeder_per_tick: usize,
    pub temp_max_c: f64,
    pub errors_max_per_report: u64,
    pub hashrate_ratio_min: f64,
    pub bad_reports_to_quarantine: u32,
    pub quarantine_ms: i64,
    /// A running report within this share of the target power counts as the target reached.
    pub power_tolerance: f64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            heartbeat_timeout_ms: 30_000,
            command_timeout_ms: 10_000,
            max_attempts: 3,
            retry_backoff_ms: 2_000,
            give_up_backoff_ms: 300_000,
            batch_max: 10_000,
            per_feeder_per_tick: 50,
            temp_max_c: 90.0,
            errors_max_per_report: 100,
            hashrate_ratio_min: 0.8,
            bad_reports_to_quarantine: 3,
            quarantine_ms: 1_800_000,
            power_tolerance: 0.1,
        }
    }
}

impl ManagerConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let positive = [
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("command_timeout_ms", self.command_timeout_ms),
            ("retry_backoff_ms", self.retry_backoff_ms),
            ("give_up_backoff_ms", self.give_up_backoff_ms),
            ("quarantine_ms", self.quarantine_ms),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(Invalid::new(name, "must be > 0"));
            }
        }
        for (name, zero) in [
            ("max_attempts", self.max_attempts == 0),
            ("batch_max", self.batch_max == 0),
            ("per_feeder_per_tick", self.per_feeder_per_tick == 0),
        ] {
            if zero {
                return Err(Invalid::new(name, "must be >= 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.hashrate_ratio_min) {
            return Err(Invalid::new("hashrate_ratio_min", "must be in [0, 1]"));
        }
        if !(0.0..1.0).contains(&self.power_tolerance) {
            return Err(Invalid::new("power_tolerance", "must be in [0, 1)"));
        }
        if self.bad_reports_to_quarantine == 0 {
            return Err(Invalid::new("bad_reports_to_quarantine", "must be >= 1"));
        }
        Ok(())
    }
}

/// Health of a device.
#[derive(Clone, Debug, PartialEq)]
pub enum Health {
    Healthy,
    Quarantined { reason: String, until_ms: i64 },
}

/// What the API shows of one device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceView {
    pub device: DeviceIdx,
    pub intent: Option<Target>,
    pub last_report: Option<Report>,
    pub last_seen_ms: Option<i64>,
    pub alive: bool,
    pub health: Health,
    pub maintenance: bool,
    pub pending: Option<Command>,
    /// Whether it may carry load now.
    pub available: bool,
}

#[derive(Clone, Debug)]
struct Pending {
    cmd: Command,
    /// Not sent before this time (retry back-off); sent when `sent` is true.
    not_before_ms: i64,
    sent: bool,
}

#[derive(Clone, Debug)]
struct DeviceState {
    site: SiteIdx,
    feeder: FeederIdx,
    rack: RackIdx,
    model: ModelRef,
    intent: Option<Target>,
    report: Option<Report>,
    last_seen_ms: Option<i64>,
    alive: bool,
    health: Health,
    /// Consecutive reports with hashrate below the expected.
    bad_reports: u32,
    /// Quarantine length next time (doubles on relapse).
    next_quarantine_ms: i64,
    maintenance: bool,
    pending: Option<Pending>,
    /// After giving up on a command, no new one before this time.
    hold_until_ms: i64,
    /// A target the agent said it applied after the last report (the report is older than the
    /// answer, so it does not show it yet). Cleared by the next report.
    confirmed: Option<Target>,
}

fn set_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

/// The resource manager of one fleet.
#[derive(Clone)]
pub struct Manager {
    cfg: ManagerConfig,
    devices: Vec<DeviceState>,
    /// Expected hashrate per watt at nameplate, per ASIC model index (0 for GPUs).
    ths_per_w: Vec<f64>,
    /// Deadlines of commands sent, in order (a deadline is the send time plus one fixed timeout,
    /// so they arrive in order: a FIFO, with a sorted insert only if time were to go back). An
    /// entry whose command was answered, settled or replaced stays until its deadline and is
    /// skipped then (no search on the hot path).
    inflight: VecDeque<(i64, CommandId, DeviceIdx)>,
    /// Commands sent and not yet answered, settled or replaced.
    inflight_n: usize,
    next_id: CommandId,
    /// Devices the next tick must look at (a bit per device): an intent, report, answer,
    /// maintenance or health change, or a timer came due. A tick costs what changed, not the fleet.
    dirty: Vec<u64>,
    /// Heartbeat deadlines in report order (deadlines only grow): (last report + timeout, device).
    heartbeats: VecDeque<(i64, u32)>,
    /// Times when a device needs looking at again: retry back-off, give-up hold, quarantine end.
    timers: BinaryHeap<Reverse<(i64, u32)>>,
    /// Wake-ups per feeder in the current tick.
    wakes: Vec<u32>,
    /// The instant the batch budgets (`wakes`, `sent_at`) count for.
    budget_at: Option<i64>,
    sent_at: usize,
}

impl Manager {
    pub fn new(fleet: &Fleet, cfg: ManagerConfig) -> Result<Self, Invalid> {
        cfg.validate()?;
        let devices: Vec<DeviceState> = fleet
            .devices
            .iter()
            .map(|d| DeviceState {
                site: d.site,
                feeder: d.feeder,
                rack: d.rack,
                model: d.model,
                intent: None,
                report: None,
                last_seen_ms: None,
                alive: false,
                health: Health::Healthy,
                bad_reports: 0,
                next_quarantine_ms: cfg.quarantine_ms,
                maintenance: false,
                pending: None,
                hold_until_ms: i64::MIN,
                confirmed: None,
            })
            .collect();
        let ths_per_w = fleet.catalogue.asics.iter().map(|m| m.hashrate_ths / m.power_w).collect();
        let n = devices.len();
        Ok(Manager {
            cfg,
            devices,
            ths_per_w,
            inflight: VecDeque::new(),
            inflight_n: 0,
            next_id: 1,
            dirty: vec![0; n.div_ceil(64)],
            heartbeats: VecDeque::new(),
            timers: BinaryHeap::new(),
            wakes: vec![0; fleet.feeders.len()],
            budget_at: None,
            sent_at: 0,
        })
    }

    /// Command ids continue from `first` (ids an earlier run already used must not come back: an
    /// agent would take a new command for an old one it applied).
    pub fn start_ids_at(&mut self, first: CommandId) {
        self.next_id = self.next_id.max(first.saturating_sub(1));
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn mark(&mut self, i: usize) {
        set_bit(&mut self.dirty, i);
    }

    fn device(&self, d: DeviceIdx) -> Result<&DeviceState, Invalid> {
        self.devices.get(d.index()).ok_or_else(|| Invalid::new("device", format!("index {} is not in the fleet", d.0)))
    }

    /// The plan's target for a device. A pending command for an older target is replaced.
    pub fn set_intent(&mut self, d: DeviceIdx, target: Target) -> Result<(), Invalid> {
        if let Target::Run { power_w } = target
            && !(power_w.is_finite() && power_w > 0.0)
        {
            return Err(Invalid::new("target.power_w", "must be a finite number > 0"));
        }
        self.device(d)?;
        let st = &mut self.devices[d.index()];
        if st.intent == Some(target) {
            return Ok(());
        }
        st.intent = Some(target);
        if let Some(p) = st.pending.take()
            && p.sent
        {
            self.inflight_n -= 1;
        }
        self.mark(d.index());
        Ok(())
    }

    /// A device's report. Returns events (back, quarantined, applied).
    pub fn telemetry(&mut self, d: DeviceIdx, r: Report, now_ms: i64) -> Result<Vec<Event>, Invalid> {
        if !(r.power_w.is_finite() && r.power_w >= 0.0) {
            return Err(Invalid::new("power_w", "must be a finite number >= 0"));
        }
        if !r.temp_c.is_finite() {
            return Err(Invalid::new("temp_c", "must be a finite number"));
        }
        if r.hashrate_ths.is_some_and(|h| !(h.is_finite() && h >= 0.0)) {
            return Err(Invalid::new("hashrate_ths", "must be a finite number >= 0"));
        }
        self.device(d)?;
        let mut events = vec![];
        let tol = self.cfg.power_tolerance;
        let st = &mut self.devices[d.index()];
        if !st.alive && st.last_seen_ms.is_some() {
            events.push(Event::Back { device: d });
        }
        st.alive = true;
        st.last_seen_ms = Some(now_ms);
        st.confirmed = None;
        // Health.
        let errors_jump = st.report.map_or(0, |p| r.errors.saturating_sub(p.errors));
        let expected = match (st.model, r.state) {
            (ModelRef::Asic(m), Target::Run { .. }) => Some(self.ths_per_w[m.index()] * r.power_w),
            _ => None,
        };
        let low_hash = match (expected, r.hashrate_ths) {
            (Some(e), Some(h)) if e > 0.0 => h < self.cfg.hashrate_ratio_min * e,
            _ => false,
        };
        st.bad_reports = if low_hash { st.bad_reports + 1 } else { 0 };
        st.report = Some(r);
        let reason = if r.temp_c > self.cfg.temp_max_c {
            Some(format!("temperature {:.1} C above {:.1} C", r.temp_c, self.cfg.temp_max_c))
        } else if errors_jump > self.cfg.errors_max_per_report {
            Some(format!("{errors_jump} errors in one report (limit {})", self.cfg.errors_max_per_report))
        } else if st.bad_reports >= self.cfg.bad_reports_to_quarantine {
            Some(format!(
                "hashrate below {:.0} % of expected in {} reports in a row",
                self.cfg.hashrate_ratio_min * 100.0,
                st.bad_reports
            ))
        } else {
            None
        };
        if let Some(reason) = reason
            && st.health == Health::Healthy
        {
            let until_ms = now_ms + st.next_quarantine_ms;
            st.next_quarantine_ms = st.next_quarantine_ms.saturating_mul(2);
            st.health = Health::Quarantined { reason: reason.clone(), until_ms };
            st.bad_reports = 0;
            events.push(Event::Quarantined { device: d, reason, until_ms });
            self.timers.push(Reverse((until_ms, d.0)));
        }
        // A report showing the pending target reached settles the command (an agent's answer may
        // be lost; the device's own state is the truth).
        if let Some(p) = &st.pending
            && p.sent
            && reached(r, p.cmd.target, tol)
        {
            let cmd = p.cmd;
            st.pending = None;
            self.inflight_n -= 1;
            events.push(Event::Applied { device: d, command: cmd.id });
        }
        self.heartbeats.push_back((now_ms + self.cfg.heartbeat_timeout_ms, d.0));
        self.mark(d.index());
        Ok(events)
    }

    /// An agent's answer to a command. Answers to unknown or replaced commands are ignored.
    pub fn command_result(&mut self, id: CommandId, device: DeviceIdx, outcome: Outcome, now_ms: i64) -> Vec<Event> {
        let Some(st) = self.devices.get_mut(device.index()) else { return vec![] };
        let Some(p) = st.pending.as_mut().filter(|p| p.sent && p.cmd.id == id) else { return vec![] };
        let cmd = p.cmd;
        self.inflight_n -= 1;
        set_bit(&mut self.dirty, device.index());
        match outcome {
            Outcome::Applied => {
                st.pending = None;
                st.confirmed = Some(cmd.target);
                vec![Event::Applied { device, command: id }]
            }
            Outcome::Failed(reason) => self.retry_or_give_up(device, reason, now_ms),
        }
    }

    fn retry_or_give_up(&mut self, device: DeviceIdx, reason: String, now_ms: i64) -> Vec<Event> {
        let cfg = &self.cfg;
        let st = &mut self.devices[device.index()];
        let Some(p) = st.pending.as_mut() else { return vec![] };
        if p.cmd.attempt >= cfg.max_attempts {
            let id = p.cmd.id;
            st.pending = None;
            st.hold_until_ms = now_ms + cfg.give_up_backoff_ms;
            self.timers.push(Reverse((st.hold_until_ms, device.0)));
            return vec![Event::GaveUp { device, command: id, reason }];
        }
        p.not_before_ms = now_ms + cfg.retry_backoff_ms * (1 << (p.cmd.attempt - 1).min(16));
        p.cmd.attempt += 1;
        p.sent = false;
        self.timers.push(Reverse((p.not_before_ms, device.0)));
        vec![]
    }

    /// The devices of a device, rack or site scope, in device order; an error when there are none.
    pub fn members(&self, scope: Scope) -> Result<Vec<DeviceIdx>, Invalid> {
        let list: Vec<DeviceIdx> = match scope {
            Scope::Device(d) => {
                self.device(d)?;
                vec![d]
            }
            Scope::Rack(r) => self.matching(|st| st.rack == r),
            Scope::Site(s) => self.matching(|st| st.site == s),
        };
        if list.is_empty() {
            return Err(Invalid::new("scope", "no device in it"));
        }
        Ok(list)
    }

    fn matching(&self, hit: impl Fn(&DeviceState) -> bool) -> Vec<DeviceIdx> {
        self.devices.iter().enumerate().filter(|(_, st)| hit(st)).map(|(i, _)| DeviceIdx(i as u32)).collect()
    }

    /// Maintenance on or off for a device, rack or site. Returns how many devices changed.
    pub fn set_maintenance(&mut self, scope: Scope, on: bool) -> Result<usize, Invalid> {
        let mut n = 0;
        for d in self.members(scope)? {
            let st = &mut self.devices[d.index()];
            n += usize::from(st.maintenance != on);
            st.maintenance = on;
            self.mark(d.index());
        }
        Ok(n)
    }

    /// Ends a quarantine now (an operator's decision).
    pub fn release_quarantine(&mut self, d: DeviceIdx) -> Result<bool, Invalid> {
        self.device(d)?;
        let st = &mut self.devices[d.index()];
        let was = matches!(st.health, Health::Quarantined { .. });
        st.health = Health::Healthy;
        self.mark(d.index());
        Ok(was)
    }

    fn available(&self, st: &DeviceState) -> bool {
        st.alive && st.health == Health::Healthy && !st.maintenance
    }

    /// What each device should do now, after health and maintenance: quarantined devices sleep,
    /// devices in maintenance and unknown ones are left alone.
    fn effective_target(&self, st: &DeviceState) -> Option<Target> {
        if !st.alive || st.maintenance {
            return None;
        }
        match st.health {
            Health::Quarantined { .. } => Some(Target::Sleep),
            Health::Healthy => st.intent,
        }
    }

    /// Time passes: heartbeats expire, commands time out, quarantines end, and the reconciler emits
    /// the commands that bring devices to their targets. Only devices marked since the last tick
    /// (or whose timer came due) are looked at, in device order.
    pub fn tick(&mut self, now_ms: i64, commands: &mut Vec<Command>, events: &mut Vec<Event>) {
        // Timeouts of commands sent.
        while let Some(&(deadline, id, d)) = self.inflight.front() {
            if deadline > now_ms {
                break;
            }
            self.inflight.pop_front();
            // Entries of commands answered, settled or replaced since are left to expire here.
            let st = &self.devices[d.index()];
            if st.pending.as_ref().is_some_and(|p| p.sent && p.cmd.id == id && p.cmd.deadline_ms == deadline) {
                self.inflight_n -= 1;
                events.extend(self.retry_or_give_up(d, format!("command {id} timed out"), now_ms));
            }
        }
        // Heartbeats: a device whose last report is older than the timeout turns unknown.
        let timeout = self.cfg.heartbeat_timeout_ms;
        while let Some(&(deadline, i)) = self.heartbeats.front() {
            if deadline >= now_ms {
                break;
            }
            self.heartbeats.pop_front();
            let st = &mut self.devices[i as usize];
            if st.alive && st.last_seen_ms.is_some_and(|t| now_ms - t > timeout) {
                st.alive = false;
                if let Some(p) = st.pending.take()
                    && p.sent
                {
                    self.inflight_n -= 1;
                }
                events.push(Event::Unknown { device: DeviceIdx(i) });
            }
        }
        // Timers: quarantines end, back-offs and holds expire.
        while let Some(&Reverse((at, i))) = self.timers.peek() {
            if at > now_ms {
                break;
            }
            self.timers.pop();
            let st = &mut self.devices[i as usize];
            if let Health::Quarantined { until_ms, .. } = st.health
                && now_ms >= until_ms
            {
                st.health = Health::Healthy;
                events.push(Event::Returned { device: DeviceIdx(i) });
            }
            self.mark(i as usize);
        }
        // The batch and wake-up budgets are per instant: a second tick at the same time (the rest
        // of a plan that was sent in steps) continues them rather than starting new ones.
        self.budgets_for(now_ms);
        let mut sent = self.sent_at;
        'scan: for w in 0..self.dirty.len() {
            let mut bits = self.dirty[w];
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if sent >= self.cfg.batch_max {
                    break 'scan;
                }
                let i = w * 64 + b;
                let keep = self.reconcile_one(i, now_ms, commands, &mut sent);
                if !keep {
                    self.dirty[w] &= !(1 << b);
                }
            }
        }
        self.sent_at = sent;
    }

    /// Sends the commands the listed devices need now (the devices a plan just changed), within
    /// the instant's budgets, before anything else is looked at: the first batch of a plan leaves
    /// without a pass over the rest of the fleet. Timeouts, heartbeats, timers and other marked
    /// devices wait for the next [`Manager::tick`] (at the same instant, it continues the budgets).
    pub fn tick_devices(
        &mut self,
        now_ms: i64,
        devices: impl IntoIterator<Item = DeviceIdx>,
        commands: &mut Vec<Command>,
    ) {
        self.budgets_for(now_ms);
        let mut sent = self.sent_at;
        for d in devices {
            let i = d.index();
            if sent >= self.cfg.batch_max {
                break;
            }
            let (w, bit) = (i / 64, 1u64 << (i % 64));
            if self.dirty.get(w).is_none_or(|x| x & bit == 0) {
                continue;
            }
            if !self.reconcile_one(i, now_ms, commands, &mut sent) {
                self.dirty[w] &= !bit;
            }
        }
        self.sent_at = sent;
    }

    fn budgets_for(&mut self, now_ms: i64) {
        if self.budget_at != Some(now_ms) {
            self.budget_at = Some(now_ms);
            self.wakes.iter_mut().for_each(|w| *w = 0);
            self.sent_at = 0;
        }
    }

    /// Sends the command device `i` needs now, if any. Returns whether it must be looked at again
    /// (held back by the per-feeder limit).
    fn reconcile_one(&mut self, i: usize, now_ms: i64, commands: &mut Vec<Command>, sent: &mut usize) -> bool {
        let d = DeviceIdx(i as u32);
        let st = &self.devices[i];
        let Some(target) = self.effective_target(st) else { return false };
        if now_ms < st.hold_until_ms
            || st.confirmed == Some(target)
            || st.report.is_some_and(|r| reached(r, target, self.cfg.power_tolerance))
        {
            return false;
        }
        match &st.pending {
            // Waiting for its answer (or its timeout), or for its back-off timer.
            Some(p) if p.cmd.target == target && (p.sent || now_ms < p.not_before_ms) => return false,
            _ => {}
        }
        let raises = st.report.is_none_or(|r| target.power_w() > r.power_w);
        if raises {
            let n = &mut self.wakes[st.feeder.index()];
            if *n as usize >= self.cfg.per_feeder_per_tick {
                return true;
            }
            *n += 1;
        }
        let deadline_ms = now_ms + self.cfg.command_timeout_ms;
        let (id, attempt) = match &st.pending {
            Some(p) if p.cmd.target == target => (p.cmd.id, p.cmd.attempt),
            _ => {
                self.next_id += 1;
                (self.next_id, 1)
            }
        };
        let cmd = Command { id, device: d, target, attempt, deadline_ms };
        self.devices[i].pending = Some(Pending { cmd, not_before_ms: now_ms, sent: true });
        if self.inflight.back().is_none_or(|b| b.0 <= deadline_ms) {
            self.inflight.push_back((deadline_ms, id, d));
        } else {
            let at = self.inflight.partition_point(|x| x.0 <= deadline_ms);
            self.inflight.insert(at, (deadline_ms, id, d));
        }
        self.inflight_n += 1;
        commands.push(cmd);
        *sent += 1;
        false
    }

    /// Whether each device may carry load now (alive, healthy, not in maintenance).
    pub fn availability(&self) -> Vec<bool> {
        self.devices.iter().map(|st| self.available(st)).collect()
    }

    pub fn view(&self, d: DeviceIdx) -> Option<DeviceView> {
        let st = self.devices.get(d.index())?;
        Some(DeviceView {
            device: d,
            intent: st.intent,
            last_report: st.report,
            last_seen_ms: st.last_seen_ms,
            alive: st.alive,
            health: st.health.clone(),
            maintenance: st.maintenance,
            pending: st.pending.as_ref().map(|p| p.cmd),
            available: self.available(st),
        })
    }

    /// Counts for metrics, disjoint but for maintenance: (available, unknown (not reporting),
    /// quarantined (and reporting), in maintenance).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let mut c = (0, 0, 0, 0);
        for st in &self.devices {
            if self.available(st) {
                c.0 += 1;
            }
            if !st.alive {
                c.1 += 1;
            }
            // Disjoint with unknown: a quarantined device that stopped reporting is unknown.
            if st.alive && matches!(st.health, Health::Quarantined { .. }) {
                c.2 += 1;
            }
            if st.maintenance {
                c.3 += 1;
            }
        }
        c
    }

    /// Commands sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight_n
    }
}

/// Whether a report shows a target reached.
fn reached(r: Report, t: Target, tol: f64) -> bool {
    match (r.state, t) {
        (Target::Sleep, Target::Sleep) => true,
        // The device's setpoint, not its measured power (which moves with load and temperature).
        (Target::Run { power_w: set }, Target::Run { power_w }) => (set - power_w).abs() <= tol * power_w,
        _ => false,
    }
}
