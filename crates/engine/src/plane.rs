//! The device plane of the engine: the resource manager between the dispatcher's plan and the
//! devices, whoever drives them (simulated agents in the harness, site agents in a real site).
//!
//! Reports and command results come in ([`Plane::report`], [`Plane::answer`]); they go to the
//! manager (liveness, health, settling commands) and to the dispatcher (fresh telemetry, measured
//! efficiency, faults). The manager's tick ([`Plane::reconcile`]) emits the commands that bring
//! devices to their intents; they wait in [`Plane::drain_commands`] for the driver to deliver. A plan
//! sets intents ([`Plane::apply_plan`]) and is followed at once by a reconcile, whose batch is the
//! "first command batch" of the switching measurement. Quarantine and maintenance reach the
//! dispatcher, so the next plan re-plans around them; a device the manager calls unknown turns
//! stale in the dispatcher.
//!
//! Everything that happened (commands sent, outcomes, events, per-device-minute telemetry rollups)
//! is collected for the caller to record ([`Plane::take_output`]).
//!
//! Architecture invariant: pure and deterministic (simulated time, device order). No devices here.

use hcp_econ::dispatch::{Dispatcher, Plan, TargetChange};
use hcp_fleet::{Command, CommandId, Event, Manager, ManagerConfig, Outcome, Report, Scope, Target};
use hcp_model::Invalid;
use hcp_model::device::ModelRef;
use hcp_model::fleet::Fleet;
use hcp_model::ids::DeviceIdx;

/// A device's status as the control plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Available,
    Unknown,
    Quarantined,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Available => "available",
            DeviceStatus::Unknown => "unknown",
            DeviceStatus::Quarantined => "quarantined",
        }
    }
}

impl From<DeviceStatus> for String {
    fn from(s: DeviceStatus) -> String {
        s.as_str().to_string()
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
    /// Status changes: (time, device, status, why).
    pub status: Vec<(i64, DeviceIdx, DeviceStatus, Option<String>)>,
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

/// The manager side of the device plane (see the module docs).
#[derive(Clone)]
pub struct Plane {
    manager: Manager,
    now_ms: i64,
    /// Per ASIC model: nameplate hashrate, power, curve exponent (expected hashrate at a power).
    curve: Vec<(f64, f64, f64)>,
    models: Vec<ModelRef>,
    efficiency: Vec<f64>,
    /// Moving average of expected over measured hashrate.
    ratio_avg: Vec<f64>,
    faulted: Vec<bool>,
    /// Last status reported out (see `PlaneOutput::status`).
    status: Vec<DeviceStatus>,
    acc: Vec<Acc>,
    minute_ms: i64,
    cmds: Vec<Command>,
    events: Vec<Event>,
    /// Commands waiting for the driver to deliver them.
    outbox: Vec<Command>,
    out: PlaneOutput,
}

impl Plane {
    /// The plane of `fleet` at `now_ms`, with every ASIC's intent at the dispatcher's current level
    /// and every GPU's at its highest cap. Command ids start at `first_command_id` (ids below it
    /// were used by an earlier run).
    pub fn new(
        fleet: &Fleet,
        cfg: ManagerConfig,
        now_ms: i64,
        dispatcher: &Dispatcher,
        first_command_id: CommandId,
    ) -> Result<Self, Invalid> {
        let mut manager = Manager::new(fleet, cfg)?;
        manager.start_ids_at(first_command_id);
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
        Ok(Plane {
            manager,
            now_ms,
            curve,
            models,
            efficiency: vec![1.0; n],
            ratio_avg: vec![1.0; n],
            faulted: vec![false; n],
            status: vec![DeviceStatus::Unknown; n],
            acc: vec![Acc::default(); n],
            minute_ms: now_ms.div_euclid(60_000) * 60_000,
            cmds: vec![],
            events: vec![],
            outbox: vec![],
            out: PlaneOutput::default(),
        })
    }

    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Time moves to `t` (never back): a minute that ended is rolled up.
    pub fn set_time(&mut self, t: i64) {
        if t <= self.now_ms {
            return;
        }
        self.now_ms = t;
        if t.div_euclid(60_000) * 60_000 != self.minute_ms {
            self.flush_minute();
            self.minute_ms = t.div_euclid(60_000) * 60_000;
        }
    }

    /// One step at `t`: time moves, the manager reconciles, the dispatcher's derived state settles.
    /// Returns the number of commands sent.
    pub fn step(&mut self, t: i64, dispatcher: &mut Dispatcher) -> usize {
        self.set_time(t);
        let n = self.reconcile(t, dispatcher);
        dispatcher.settle(t);
        n
    }

    /// A device's report at `t`. A report of a device outside the fleet is refused.
    pub fn report(&mut self, d: DeviceIdx, r: Report, t: i64, dispatcher: &mut Dispatcher) -> Result<(), Invalid> {
        if d.index() >= self.models.len() {
            return Err(Invalid::new("device", format!("{} is not a device of the fleet", d.0)));
        }
        if !(r.power_w.is_finite() && r.power_w >= 0.0) {
            return Err(Invalid::new("power_w", format!("must be a finite number >= 0, not {}", r.power_w)));
        }
        if !r.temp_c.is_finite() {
            return Err(Invalid::new("temp_c", "must be a finite number"));
        }
        if r.hashrate_ths.is_some_and(|h| !(h.is_finite() && h >= 0.0)) {
            return Err(Invalid::new("hashrate_ths", "must be a finite number >= 0"));
        }
        self.set_time(t);
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
                if self.status[d.index()] == DeviceStatus::Unknown && !self.faulted[d.index()] {
                    self.set_status(d, DeviceStatus::Available, None, t);
                }
                self.note_events(ev, t, dispatcher)
            }
            Err(e) => {
                self.out.events.push((t, Event::GaveUp { device: d, command: 0, reason: format!("report: {e}") }))
            }
        }
        dispatcher.observe(d, t, self.efficiency[d.index()], self.faulted[d.index()]);
        Ok(())
    }

    /// A command's result at `t`.
    pub fn answer(
        &mut self,
        id: CommandId,
        d: DeviceIdx,
        outcome: Outcome,
        t: i64,
        dispatcher: &mut Dispatcher,
    ) -> Result<(), Invalid> {
        if d.index() >= self.models.len() {
            return Err(Invalid::new("device", format!("{} is not a device of the fleet", d.0)));
        }
        self.set_time(t);
        let ev = self.manager.command_result(id, d, outcome.clone(), t);
        self.out.outcomes.push((t, id, d, outcome));
        self.note_events(ev, t, dispatcher);
        Ok(())
    }

    fn set_status(&mut self, d: DeviceIdx, status: DeviceStatus, why: Option<String>, t: i64) {
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
                    self.set_status(*device, DeviceStatus::Quarantined, Some(reason.clone()), t);
                }
                Event::Returned { device } => {
                    self.faulted[device.index()] = false;
                    let alive = self.manager.view(*device).is_some_and(|v| v.alive);
                    let s = if alive { DeviceStatus::Available } else { DeviceStatus::Unknown };
                    self.set_status(*device, s, None, t);
                }
                Event::Unknown { device } => {
                    let why = Some("no report within the heartbeat timeout".into());
                    self.set_status(*device, DeviceStatus::Unknown, why, t);
                }
                Event::Back { device } if !self.faulted[device.index()] => {
                    self.set_status(*device, DeviceStatus::Available, None, t);
                }
                _ => {}
            }
            self.out.events.push((t, e));
        }
    }

    /// The manager's tick: commands out. Returns how many were sent.
    fn reconcile(&mut self, t: i64, dispatcher: &mut Dispatcher) -> usize {
        self.manager.tick(t, &mut self.cmds, &mut self.events);
        let ev = std::mem::take(&mut self.events);
        self.note_events(ev, t, dispatcher);
        self.send(t)
    }

    fn send(&mut self, t: i64) -> usize {
        let n = self.cmds.len();
        for c in self.cmds.drain(..) {
            self.outbox.push(c);
            self.out.commands.push((t, c));
        }
        n
    }

    /// Commands waiting for delivery, in the order sent.
    pub fn pending_commands(&self) -> &[Command] {
        &self.outbox
    }

    /// Takes the commands waiting for delivery, in the order sent (the buffer keeps its capacity:
    /// a plan's batch of thousands allocates once, not every time).
    pub fn drain_commands(&mut self) -> std::vec::Drain<'_, Command> {
        self.outbox.drain(..)
    }

    /// A plan's changes become intents. GPU caps come separately ([`Plane::set_gpu_cap`]).
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
    pub fn set_gpu_cap(&mut self, device: DeviceIdx, cap_w: f64) -> Result<(), Invalid> {
        self.manager.set_intent(device, Target::Run { power_w: cap_w })
    }

    /// A GPU with no work, or shed: it idles (asleep, drawing its idle power).
    pub fn set_gpu_idle(&mut self, device: DeviceIdx) -> Result<(), Invalid> {
        self.manager.set_intent(device, Target::Sleep)
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
        self.send(t)
    }

    /// Commands one instant may send in all (the size of a full first batch).
    pub fn batch_max(&self) -> usize {
        self.manager.config().batch_max
    }

    /// Maintenance on or off; the dispatcher holds the devices where they are.
    pub fn set_maintenance(&mut self, scope: Scope, on: bool, dispatcher: &mut Dispatcher) -> Result<usize, Invalid> {
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
