//! The device plane with simulated devices: the engine's [`Plane`] (the resource manager between
//! the plan and the devices) wired to the simulated agents of [`hcp_sim::agents`].
//!
//! Each step (`step_ms` of simulated time): agents report and answer; reports and answers go to the
//! plane (and through it to the manager and the dispatcher); the manager's tick emits the commands
//! that bring devices to their intents, which go to the agents.
//!
//! Architecture invariant: pure and deterministic (seeded agents, simulated time, device order).

use hcp_econ::dispatch::{Dispatcher, Plan, TargetChange};
use hcp_engine::plane::Plane;
pub use hcp_engine::plane::{DeviceMinute, DeviceStatus, PlaneOutput};
use hcp_fleet::{CommandId, Manager, ManagerConfig, Outcome, Report, Scope};
use hcp_model::Invalid;
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

#[derive(Clone)]
pub struct DevicePlane {
    plane: Plane,
    agents: Agents,
    step_ms: i64,
    reports: Vec<(DeviceIdx, Report)>,
    answers: Vec<(CommandId, DeviceIdx, Outcome)>,
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
    ) -> Result<Self, Invalid> {
        if cfg.step_ms <= 0 {
            return Err(Invalid::new("step_ms", "must be > 0"));
        }
        let plane = Plane::new(fleet, cfg.manager, now_ms, dispatcher, first_command_id)?;
        let agents = Agents::new(fleet, cfg.agents, seed, now_ms)?;
        Ok(DevicePlane { plane, agents, step_ms: cfg.step_ms, reports: vec![], answers: vec![] })
    }

    pub fn manager(&self) -> &Manager {
        self.plane.manager()
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    /// The plane alone, for a driver that takes the commands and delivers them itself
    /// ([`Plane::drain_commands`]; the end-to-end benchmark sends them over the agent link).
    pub fn plane_mut(&mut self) -> &mut Plane {
        &mut self.plane
    }

    pub fn now_ms(&self) -> i64 {
        self.plane.now_ms()
    }

    /// Steps up to `now_ms`.
    pub fn advance_to(&mut self, now_ms: i64, dispatcher: &mut Dispatcher) {
        while self.plane.now_ms() + self.step_ms <= now_ms {
            let t = self.plane.now_ms() + self.step_ms;
            self.step(t, dispatcher);
        }
    }

    fn step(&mut self, t: i64, dispatcher: &mut Dispatcher) {
        self.plane.set_time(t);
        self.agents.step(t, &mut self.reports, &mut self.answers);
        for (d, r) in self.reports.drain(..) {
            // The agents report only devices of the fleet, with finite values.
            let _ = self.plane.report(d, r, t, dispatcher);
        }
        for (id, d, outcome) in self.answers.drain(..) {
            let _ = self.plane.answer(id, d, outcome, t, dispatcher);
        }
        self.plane.step(t, dispatcher);
        self.deliver();
    }

    fn deliver(&mut self) -> usize {
        let t = self.plane.now_ms();
        let mut n = 0;
        for c in self.plane.drain_commands() {
            self.agents.command(&c, t);
            n += 1;
        }
        n
    }

    /// A plan's changes become intents. GPU caps come separately ([`DevicePlane::set_gpu_cap`]).
    pub fn apply_plan(&mut self, plan: &Plan) {
        self.plane.apply_plan(plan);
    }

    /// See [`Plane::apply_changes`].
    pub fn apply_changes(&mut self, changes: &[TargetChange]) {
        self.plane.apply_changes(changes);
    }

    /// A GPU's power cap from the plan.
    pub fn set_gpu_cap(&mut self, device: DeviceIdx, cap_w: f64) -> Result<(), Invalid> {
        self.plane.set_gpu_cap(device, cap_w)
    }

    /// Reconciles now (after a plan): the first command batch. Returns its size.
    pub fn reconcile_now(&mut self, dispatcher: &mut Dispatcher) -> usize {
        self.plane.reconcile_now(dispatcher);
        self.deliver()
    }

    /// See [`Plane::send_now`]; the commands reach the agents at once.
    pub fn send_now(&mut self, changes: &[TargetChange]) -> usize {
        self.plane.send_now(changes);
        self.deliver()
    }

    /// Commands one instant may send in all (the size of a full first batch).
    pub fn batch_max(&self) -> usize {
        self.plane.batch_max()
    }

    /// Maintenance on or off; the dispatcher holds the devices where they are.
    pub fn set_maintenance(&mut self, scope: Scope, on: bool, dispatcher: &mut Dispatcher) -> Result<usize, Invalid> {
        self.plane.set_maintenance(scope, on, dispatcher)
    }

    /// Everything recorded since the last call.
    pub fn take_output(&mut self) -> PlaneOutput {
        self.plane.take_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_econ::dispatch::{DispatchConfig, GpuBudget, SiteSignal};
    use hcp_fleet::{Event, Target};
    use hcp_model::device::ModelRef;

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
