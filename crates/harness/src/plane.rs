//! The device plane of the running platform: the resource manager between the dispatcher's plan and
//! the devices' agents.
//!
//! Each step (`step_ms` of simulated time): agents report and answer; reports go to the manager
//! (liveness, health, settling commands) and to the dispatcher (fresh telemetry, measured
//! efficiency, faults); the manager's tick emits the commands that bring devices to their intents,
//! which go to the agents. A plan sets intents ([`DevicePlane::apply_plan`]) and is followed at once
//! by a reconcile, whose batch is the "first command batch" of the switching measurement.
//! Quarantine and maintenance reach the dispatcher, so the next plan re-plans around them; a device
//! the manager calls unknown stops reporting and turns stale in the dispatcher.
//!
//! Everything that happened (commands sent, outcomes, events, per-device-minute telemetry
//! rollups) is collected for the caller to record ([`DevicePlane::take_output`]).
//!
//! Architecture invariant: pure and deterministic (seeded agents, simulated time, device order).

use hcp_econ::dispatch::{Dispatcher, Plan, TargetChange};
use hcp_fleet::{Command, CommandId, Event, Manager, ManagerConfig, Outcome, Report, Scope, Target};
use hcp_model::device::ModelRef;
use hcp_model::fleet::Fleet;
use hcp_model::ids::DeviceIdx;
use hcp_sim::agents::{AgentParams, Agents};

#[derive(Clone, Debug, PartialEq)]
pub struct PlaneConfig {
    /// Simulated time between steps (agents, manager tick).
    pub step_ms: i64,
    pub manager: ManagerConfig,
    pub agents: AgentParams,
}

impl Default for PlaneConfig {
    fn default() -> Self {
        PlaneConfig {
            step_ms: 2_000,
            // An ASIC takes about a minute to wake: a command's timeout must cover that.
            manager: ManagerConfig { command_timeout_ms: 120_000, ..Default::default() },
            agents: AgentParams::default(),
        }
    }
}

/// One device's telemetry over one minute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceMinute {
    pub device: DeviceIdx,
    pub minute_ms: i64,
    pub samples: u32,
    pub power_w_avg: f64,
    pub hashrate_ths_avg: Option<f64>,
    pub temp_c_max: f64,
    pub errors: u64,
}

/// What happened since the last `take_output`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlaneOutput {
    /// Commands sent (first sends and retries), with the time sent.
    pub commands: Vec<(i64, Command)>,
    /// Answers: (time, command, device, outcome).
    pub outcomes: Vec<(i64, CommandId, DeviceIdx, Outcome)>,
    pub events: Vec<(i64, Event)>,
    pub minutes: Vec<DeviceMinute>,
    /// Reports taken in.
    pub reports: u64,
    /// Status changes: (time, device, "available" | "unknown" | "quarantined", why).
    pub status: Vec<(i64, DeviceIdx, &'static str, Option<String>)>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    samples: u32,
    power_sum: f64,
    hash_sum: f64,
    has_hash: bool,
    temp_max: f64,
    errors: u64,
}

#[derive(Clone)]
pub struct DevicePlane {
    manager: Manager,
    agents: Agents,
    step_ms: i64,
    now_ms: i64,
    /// Per ASIC model: nameplate hashrate, power, curve exponent (expected hashrate at a power).
    curve: Vec<(f64, f64, f64)>,
    models: Vec<ModelRef>,
    efficiency: Vec<f64>,
    /// Moving average of expected over measured hashrate.
    ratio_avg: Vec<f64>,
    faulted: Vec<bool>,
    /// Last status reported out (see `PlaneOutput::status`).
    status: Vec<&'static str>,
    acc: Vec<Acc>,
    minute_ms: i64,
    reports: Vec<(DeviceIdx, Report)>,
    answers: Vec<(CommandId, DeviceIdx, Outcome)>,
    cmds: Vec<Command>,
    events: Vec<Event>,
    out: PlaneOutput,
}

impl DevicePlane {
    /// The plane of `fleet` at `now_ms`, with every ASIC's intent at the dispatcher's current level.
    /// Command ids start after `first_command_id - 1` (ids already used by an earlier run).
    pub fn new(
        fleet: &Fleet,
        cfg: PlaneConfig,
        seed: u64,
        now_ms: i64,
        dispatcher: &Dispatcher,
        first_command_id: CommandId,
    ) -> Result<Self, String> {
        if cfg.step_ms <= 0 {
            return Err("step_ms: must be > 0".into());
        }
        let mut manager = Manager::new(fleet, cfg.manager)?;
        manager.start_ids_at(first_command_id);
        let agents = Agents::new(fleet, cfg.agents, seed, now_ms)?;
        let models: Vec<ModelRef> = fleet.devices.iter().map(|d| d.model).collect();
        for (i, m) in models.iter().enumerate() {
            let d = DeviceIdx(i as u32);
            let target = match m {
                ModelRef::Asic(_) => match dispatcher.level(d) {
                    0 => Target::Sleep,
                    _ => Target::Run { power_w: dispatcher.power_w(d).unwrap_or(0.0) },
                },
                ModelRef::Gpu(g) => Target::Run { power_w: fleet.catalogue.gpu(*g).max_power_w },
            };
            if matches!(target, Target::Run { power_w } if power_w > 0.0) || target == Target::Sleep {
                manager.set_intent(d, target)?;
            }
        }
        let curve = fleet.catalogue.asics.iter().map(|m| (m.hashrate_ths, m.power_w, m.curve_exponent)).collect();
        let n = models.len();
        Ok(DevicePlane {
            manager,
            agents,
            step_ms: cfg.step_ms,
            now_ms,
            curve,
            models,
            efficiency: vec![1.0; n],
            ratio_avg: vec![1.0; n],
            faulted: vec![false; n],
            status: vec!["unknown"; n],
            acc: vec![Acc::default(); n],
            minute_ms: now_ms.div_euclid(60_000) * 60_000,
            reports: vec![],
            answers: vec![],
            cmds: vec![],
            events: vec![],
            out: PlaneOutput::default(),
        })
    }

    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Steps up to `now_ms`.
    pub fn advance_to(&mut self, now_ms: i64, dispatcher: &mut Dispatcher) {
        while self.now_ms + self.step_ms <= now_ms {
            let t = self.now_ms + self.step_ms;
            self.step(t, dispatcher);
        }
    }

    fn step(&mut self, t: i64, dispatcher: &mut Dispatcher) {
        self.now_ms = t;
        if t.div_euclid(60_000) * 60_000 != self.minute_ms {
            self.flush_minute();
            self.minute_ms = t.div_euclid(60_000) * 60_000;
        }
        self.agents.step(t, &mut self.reports, &mut self.answers);
        let mut reports = std::mem::take(&mut self.reports);
        for &(d, r) in &reports {
            self.take_report(d, r, t, dispatcher);
        }
        reports.clear();
        self.reports = reports;
        let mut answers = std::mem::take(&mut self.answers);
        for (id, d, outcome) in answers.drain(..) {
            let ev = self.manager.command_result(id, d, outcome.clone(), t);
            self.out.outcomes.push((t, id, d, outcome));
            self.note_events(ev, t, dispatcher);
        }
        self.answers = answers;
        self.reconcile(t, dispatcher);
        dispatcher.settle(t);
    }

    fn take_report(&mut self, d: DeviceIdx, r: Report, t: i64, dispatcher: &mut Dispatcher) {
        self.out.reports += 1;
        let a = &mut self.acc[d.index()];
        a.samples += 1;
        a.power_sum += r.power_w;
        if let Some(h) = r.hashrate_ths {
            a.hash_sum += h;
            a.has_hash = true;
        }
        a.temp_max = if a.samples == 1 { r.temp_c } else { a.temp_max.max(r.temp_c) };
        a.errors = r.errors;
        // Measured efficiency against the model's curve: smoothed over reports (a 1 % noise moves
        // the average by a third of that) and passed on in 5 % steps, so that noise never re-sorts
        // the dispatcher's merit order and a failed hash board does within a few reports.
        if let (ModelRef::Asic(m), Target::Run { power_w }, Some(h)) = (self.models[d.index()], r.state, r.hashrate_ths)
            && h > 0.0
        {
            let (nh, nw, e) = self.curve[m.index()];
            let ratio = nh * (power_w / nw).powf(e) / h;
            let avg = &mut self.ratio_avg[d.index()];
            *avg += 0.2 * (ratio - *avg);
            self.efficiency[d.index()] = (*avg * 20.0).round() / 20.0;
        }
        match self.manager.telemetry(d, r, t) {
            Ok(ev) => {
                if self.status[d.index()] == "unknown" && !self.faulted[d.index()] {
                    self.set_status(d, "available", None, t);
                }
                self.note_events(ev, t, dispatcher)
            }
            Err(e) => {
                self.out.events.push((t, Event::GaveUp { device: d, command: 0, reason: format!("report: {e}") }))
            }
        }
        dispatcher.observe(d, t, self.efficiency[d.index()], self.faulted[d.index()]);
    }

    fn set_status(&mut self, d: DeviceIdx, status: &'static str, why: Option<String>, t: i64) {
        if self.status[d.index()] != status {
            self.status[d.index()] = status;
            self.out.status.push((t, d, status, why));
        }
    }

    fn note_events(&mut self, ev: Vec<Event>, t: i64, dispatcher: &mut Dispatcher) {
        for e in ev {
            match &e {
                Event::Quarantined { device, reason, .. } => {
                    self.faulted[device.index()] = true;
                    dispatcher.observe(*device, t, self.efficiency[device.index()], true);
                    self.set_status(*device, "quarantined", Some(reason.clone()), t);
                }
                Event::Returned { device } => {
                    self.faulted[device.index()] = false;
                    let alive = self.manager.view(*device).is_some_and(|v| v.alive);
                    self.set_status(*device, if alive { "available" } else { "unknown" }, None, t);
                }
                Event::Unknown { device } => {
                    self.set_status(*device, "unknown", Some("no report within the heartbeat timeout".into()), t);
                }
                Event::Back { device } if !self.faulted[device.index()] => {
                    self.set_status(*device, "available", None, t);
                }
                _ => {}
            }
            self.out.events.push((t, e));
        }
    }

    /// The manager's tick: commands out to the agents. Returns how many were sent.
    fn reconcile(&mut self, t: i64, dispatcher: &mut Dispatcher) -> usize {
        self.manager.tick(t, &mut self.cmds, &mut self.events);
        let ev = std::mem::take(&mut self.events);
        self.note_events(ev, t, dispatcher);
        let n = self.cmds.len();
        for c in self.cmds.drain(..) {
            self.agents.command(&c, t);
            self.out.commands.push((t, c));
        }
        n
    }

    /// A plan's changes become intents. GPU caps come separately ([`DevicePlane::set_gpu_cap`]).
    pub fn apply_plan(&mut self, plan: &Plan) {
        self.apply_changes(&plan.changes);
    }

    /// Some of a plan's changes become intents (a plan taken in steps, see
    /// [`hcp_econ::dispatch::PlanRun`]); applying a change twice does nothing the second time.
    pub fn apply_changes(&mut self, changes: &[TargetChange]) {
        for c in changes {
            let target = if c.to_level == 0 { Target::Sleep } else { Target::Run { power_w: c.power_w } };
            // The plan only names devices of the fleet with valid powers; an error here is a bug
            // upstream, recorded rather than hidden.
            if let Err(e) = self.manager.set_intent(c.device, target) {
                let ev = Event::GaveUp { device: c.device, command: 0, reason: format!("intent: {e}") };
                self.out.events.push((self.now_ms, ev));
            }
        }
    }

    /// A GPU's power cap from the plan.
    pub fn set_gpu_cap(&mut self, device: DeviceIdx, cap_w: f64) -> Result<(), String> {
        self.manager.set_intent(device, Target::Run { power_w: cap_w })
    }

    /// Reconciles now (after a plan): the first command batch. Returns its size.
    pub fn reconcile_now(&mut self, dispatcher: &mut Dispatcher) -> usize {
        self.reconcile(self.now_ms, dispatcher)
    }

    /// Sends the commands the given changes need, now, while the dispatcher is still busy with
    /// the rest of its plan (the first batch of a plan taken in steps). Nothing else is looked at
    /// until the next reconcile, which at the same instant shares this batch's budgets. Returns
    /// the batch's size.
    pub fn send_now(&mut self, changes: &[TargetChange]) -> usize {
        let t = self.now_ms;
        self.manager.tick_devices(t, changes.iter().map(|c| c.device), &mut self.cmds);
        let n = self.cmds.len();
        for c in self.cmds.drain(..) {
            self.agents.command(&c, t);
            self.out.commands.push((t, c));
        }
        n
    }

    /// Commands one instant may send in all (the size of a full first batch).
    pub fn batch_max(&self) -> usize {
        self.manager.config().batch_max
    }

    /// Maintenance on or off; the dispatcher holds the devices where they are.
    pub fn set_maintenance(&mut self, scope: Scope, on: bool, dispatcher: &mut Dispatcher) -> Result<usize, String> {
        let members = self.manager.members(scope)?;
        let n = self.manager.set_maintenance(scope, on)?;
        for d in members {
            dispatcher.set_maintenance(d, on);
        }
        Ok(n)
    }

    fn flush_minute(&mut self) {
        for (i, a) in self.acc.iter_mut().enumerate() {
            if a.samples == 0 {
                continue;
            }
            let n = f64::from(a.samples);
            self.out.minutes.push(DeviceMinute {
                device: DeviceIdx(i as u32),
                minute_ms: self.minute_ms,
                samples: a.samples,
                power_w_avg: a.power_sum / n,
                hashrate_ths_avg: a.has_hash.then(|| a.hash_sum / n),
                temp_c_max: a.temp_max,
                errors: a.errors,
            });
            *a = Acc::default();
        }
    }

    /// Everything recorded since the last call.
    pub fn take_output(&mut self) -> PlaneOutput {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_econ::dispatch::{DispatchConfig, GpuBudget, SiteSignal};

    fn fleet() -> Fleet {
        Fleet::from_toml("small.toml", include_str!("../../../examples/fleets/small.toml")).unwrap()
    }

    fn plan(d: &mut Dispatcher, f: &Fleet, now: i64, price: f64) -> Plan {
        let sig: Vec<SiteSignal> = f.sites.iter().map(|_| SiteSignal::new(price, now, 25.0)).collect();
        d.plan(now, &sig, 50.0, &vec![GpuBudget::default(); f.sites.len()], &[])
    }

    #[test]
    fn a_price_spike_sleeps_the_fleet_through_commands_and_telemetry() {
        let f = fleet();
        let cfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..Default::default() };
        let mut d = Dispatcher::new(&f, cfg, 0);
        let mut p =
            DevicePlane::new(&f, PlaneConfig { agents: AgentParams::quiet(), ..Default::default() }, 1, 0, &d, 1)
                .unwrap();
        p.advance_to(60_000, &mut d);
        let out = p.take_output();
        assert!(out.reports >= f.devices.len() as u64 * 5);
        assert_eq!(out.minutes.len(), f.devices.len(), "one minute row per device");
        assert!(out.commands.is_empty(), "the agents already run at the intents");
        // A spike: every ASIC sleeps; the first batch leaves at once.
        let pl = plan(&mut d, &f, 60_000, 5_000.0);
        let asics = f.devices.iter().filter(|x| matches!(x.model, ModelRef::Asic(_))).count();
        assert_eq!(pl.changes.len(), asics);
        p.apply_plan(&pl);
        let first = p.reconcile_now(&mut d);
        assert_eq!(first, asics, "reductions are not staggered");
        p.advance_to(120_000, &mut d);
        let asleep =
            (0..f.devices.len()).filter(|&i| p.agents().state(DeviceIdx(i as u32)) == Some(Target::Sleep)).count();
        assert_eq!(asleep, asics);
        let out = p.take_output();
        assert_eq!(out.outcomes.len(), asics, "every command answered once");
        assert_eq!(p.manager().in_flight(), 0);
    }

    /// A plan taken in steps: the first batch leaves from the first changes alone and holds only
    /// reductions; the rest of the plan and of the instant's batch follow; the fleet ends where
    /// the plan taken at once would leave it, every command answered once.
    #[test]
    fn a_plan_taken_in_steps_sends_its_first_batch_before_the_rest_exists() {
        let f = fleet();
        let cfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..Default::default() };
        let mut d = Dispatcher::new(&f, cfg, 0);
        let quiet = PlaneConfig { agents: AgentParams::quiet(), ..Default::default() };
        let mut p = DevicePlane::new(&f, quiet, 1, 0, &d, 1).unwrap();
        p.advance_to(60_000, &mut d);
        p.take_output();
        let asics = f.devices.iter().filter(|x| matches!(x.model, ModelRef::Asic(_))).count();
        // Site 0 spikes (its ASICs sleep), the others' price falls a little (no change).
        let sig: Vec<SiteSignal> =
            (0..f.sites.len()).map(|s| SiteSignal::new(if s == 0 { 5_000.0 } else { 20.0 }, 60_000, 25.0)).collect();
        let gpus = vec![GpuBudget::default(); f.sites.len()];
        let mut run = d.start_plan(60_000, &sig, 50.0, &gpus, &[]);
        let first = run.step(10).to_vec();
        assert!(!first.is_empty() && first.len() < asics);
        p.apply_changes(&first);
        let n = p.send_now(&first);
        assert_eq!(n, first.len(), "every first change needs a command");
        let out = p.take_output();
        assert!(out.commands.iter().all(|(_, c)| c.target == Target::Sleep));
        let rest = run.step(usize::MAX).to_vec();
        let plan = run.finish();
        assert_eq!(first.len() + rest.len(), plan.changes.len());
        p.apply_changes(&rest);
        p.reconcile_now(&mut d);
        p.advance_to(120_000, &mut d);
        let out = p.take_output();
        assert_eq!(out.outcomes.len(), plan.changes.len(), "every command answered once");
        for c in &plan.changes {
            assert_eq!(p.agents().state(c.device), Some(Target::Sleep));
        }
    }

    #[test]
    fn quarantine_and_maintenance_reach_the_dispatcher() {
        let f = fleet();
        let mut d = Dispatcher::new(&f, DispatchConfig::default(), 0);
        let hot = AgentParams { overheat_per_hour: 1.0, ..Default::default() };
        let mut p = DevicePlane::new(&f, PlaneConfig { agents: hot, ..Default::default() }, 7, 0, &d, 1).unwrap();
        p.advance_to(2 * 3_600_000, &mut d);
        let out = p.take_output();
        let q: Vec<DeviceIdx> = out
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Quarantined { device, .. } => Some(*device),
                _ => None,
            })
            .collect();
        assert!(!q.is_empty(), "overheating devices are quarantined");
        let pl = plan(&mut d, &f, p.now_ms(), 20.0);
        assert!(pl.changes.iter().all(|c| !q.contains(&c.device)), "quarantined devices are not planned");
        let n = p.set_maintenance(Scope::Site(hcp_model::ids::SiteIdx(0)), true, &mut d).unwrap();
        assert!(n > 0);
        assert!(d.skip(DeviceIdx(0)).is_none() || p.manager().view(DeviceIdx(0)).unwrap().maintenance);
    }

    #[test]
    fn one_seed_one_history() {
        let f = fleet();
        let run = || {
            let mut d = Dispatcher::new(&f, DispatchConfig::default(), 0);
            let mut p = DevicePlane::new(&f, PlaneConfig::default(), 11, 0, &d, 100).unwrap();
            for k in 1..=8 {
                p.advance_to(k * 900_000, &mut d);
                let pl = plan(&mut d, &f, k * 900_000, if k % 2 == 0 { 400.0 } else { 20.0 });
                p.apply_plan(&pl);
                p.reconcile_now(&mut d);
            }
            p.take_output()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.commands.iter().all(|(_, c)| c.id >= 100), "ids start where asked");
    }
}
