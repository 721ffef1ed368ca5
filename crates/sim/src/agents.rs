//! Simulated device agents: what `hcp up` plugs in where a real site has miner firmware and GPU
//! node agents. Each device reports telemetry every `telemetry_every_ms` (each at its own phase),
//! applies commands after a realistic delay (an ASIC sleeps in seconds and wakes in about its
//! model's wake time; a GPU power cap takes under two seconds), and sometimes misbehaves: a command
//! fails, an answer is lost (the command was applied; only the report shows it), an agent goes
//! silent for minutes, a device overheats, or a hash board fails (hashrate drops to 60 %) until it
//! is repaired hours later.
//!
//! A command is idempotent by id: one already applied, or being applied, is not applied twice; its
//! answer is sent again.
//!
//! Architecture invariant: pure and seeded; time comes in with `step`; devices are visited in
//! index order, so one seed gives one history.

use hcp_fleet::{Command, CommandId, Outcome, Report, Target};
use hcp_model::Invalid;
use hcp_model::device::ModelRef;
use hcp_model::fleet::Fleet;
use hcp_model::ids::DeviceIdx;

use crate::rng::{self, Rng};

/// How the simulated agents behave.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentParams {
    pub telemetry_every_ms: i64,
    /// An ASIC going to sleep: uniform delay in this range.
    pub asic_sleep_ms: (i64, i64),
    /// An ASIC changing its power target while running.
    pub asic_retune_ms: (i64, i64),
    /// A GPU changing its power cap or going idle.
    pub gpu_cap_ms: (i64, i64),
    /// Share of commands that fail (the agent answers with an error; nothing changes).
    pub fail_prob: f64,
    /// Share of applied commands whose answer is lost.
    pub lost_answer_prob: f64,
    /// Per device and hour: chance of going silent, for a time uniform in `silence_ms`.
    pub silence_per_hour: f64,
    pub silence_ms: (i64, i64),
    /// Per device and hour: chance of overheating (reported temperature +35 C) for `hot_ms`.
    pub overheat_per_hour: f64,
    pub hot_ms: i64,
    /// Per ASIC and hour: chance of a hash board failing (hashrate at 60 %) until repaired after a
    /// time uniform in `repair_ms`.
    pub board_failure_per_hour: f64,
    pub repair_ms: (i64, i64),
    pub ambient_c: f64,
}

impl Default for AgentParams {
    fn default() -> Self {
        AgentParams {
            telemetry_every_ms: 10_000,
            asic_sleep_ms: (2_000, 8_000),
            asic_retune_ms: (1_000, 5_000),
            gpu_cap_ms: (200, 1_500),
            fail_prob: 0.01,
            lost_answer_prob: 0.01,
            silence_per_hour: 0.002,
            silence_ms: (60_000, 600_000),
            overheat_per_hour: 0.0005,
            hot_ms: 20 * 60_000,
            board_failure_per_hour: 0.0002,
            repair_ms: (3_600_000, 6 * 3_600_000),
            ambient_c: 25.0,
        }
    }
}

impl AgentParams {
    /// Agents that never misbehave: no failures, lost answers, silences, heat or board failures.
    pub fn quiet() -> Self {
        AgentParams {
            fail_prob: 0.0,
            lost_answer_prob: 0.0,
            silence_per_hour: 0.0,
            overheat_per_hour: 0.0,
            board_failure_per_hour: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.telemetry_every_ms <= 0 {
            return Err(Invalid::new("telemetry_every_ms", "must be > 0"));
        }
        for (name, (lo, hi)) in [
            ("asic_sleep_ms", self.asic_sleep_ms),
            ("asic_retune_ms", self.asic_retune_ms),
            ("gpu_cap_ms", self.gpu_cap_ms),
            ("silence_ms", self.silence_ms),
            ("repair_ms", self.repair_ms),
        ] {
            if lo < 0 || hi < lo {
                return Err(Invalid::new(name, "must be a range 0 <= low <= high"));
            }
        }
        for (name, p) in [
            ("fail_prob", self.fail_prob),
            ("lost_answer_prob", self.lost_answer_prob),
            ("silence_per_hour", self.silence_per_hour),
            ("overheat_per_hour", self.overheat_per_hour),
            ("board_failure_per_hour", self.board_failure_per_hour),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Invalid::new(name, "must be a probability in [0, 1]"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct Applying {
    id: CommandId,
    target: Target,
    at_ms: i64,
    fail: bool,
    lost: bool,
}

#[derive(Clone, Copy, Debug)]
struct Agent {
    model: ModelRef,
    state: Target,
    next_report_ms: i64,
    applying: Option<Applying>,
    /// The last command applied (idempotency) and whether its answer still has to be sent.
    last_applied: CommandId,
    silent_until_ms: i64,
    hot_until_ms: i64,
    board_failed_until_ms: i64,
    errors: u64,
}

/// The agents of one fleet.
#[derive(Clone)]
pub struct Agents {
    params: AgentParams,
    agents: Vec<Agent>,
    /// Per ASIC model: nameplate hashrate, nameplate power, curve exponent, sleep draw, wake time.
    asic: Vec<(f64, f64, f64, f64, i64)>,
    /// Per GPU model: idle draw.
    gpu_idle_w: Vec<f64>,
    rng: Rng,
    /// Answers waiting to be sent at the next step (re-sent commands already applied).
    replies: Vec<(CommandId, DeviceIdx, Outcome)>,
    last_step_ms: i64,
}

impl Agents {
    /// Every device starts running at its highest power (what an unmanaged site does).
    pub fn new(fleet: &Fleet, params: AgentParams, seed: u64, now_ms: i64) -> Result<Self, Invalid> {
        params.validate()?;
        let mut rng = rng::stream(seed, "agents", 0);
        let every = params.telemetry_every_ms;
        let agents = fleet
            .devices
            .iter()
            .map(|d| {
                let state = match d.model {
                    ModelRef::Asic(m) => Target::Run { power_w: fleet.catalogue.asic(m).max_power_w },
                    ModelRef::Gpu(m) => Target::Run { power_w: fleet.catalogue.gpu(m).max_power_w },
                };
                Agent {
                    model: d.model,
                    state,
                    next_report_ms: now_ms + (rng::unit(&mut rng) * every as f64) as i64,
                    applying: None,
                    last_applied: 0,
                    silent_until_ms: i64::MIN,
                    hot_until_ms: i64::MIN,
                    board_failed_until_ms: i64::MIN,
                    errors: 0,
                }
            })
            .collect();
        let asic = fleet
            .catalogue
            .asics
            .iter()
            .map(|m| (m.hashrate_ths, m.power_w, m.curve_exponent, m.sleep_power_w, (m.wake_s * 1e3) as i64))
            .collect();
        let gpu_idle_w = fleet.catalogue.gpus.iter().map(|m| m.idle_w).collect();
        Ok(Agents { params, agents, asic, gpu_idle_w, rng, replies: vec![], last_step_ms: now_ms })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// What a device draws now, as its next report would say without noise (W).
    pub fn power_w(&self, d: DeviceIdx) -> Option<f64> {
        let a = self.agents.get(d.index())?;
        Some(match (a.model, a.state) {
            (ModelRef::Asic(_), Target::Run { power_w }) => power_w,
            (ModelRef::Asic(m), Target::Sleep) => self.asic[m.index()].3,
            (ModelRef::Gpu(_), Target::Run { power_w }) => power_w * 0.9,
            (ModelRef::Gpu(m), Target::Sleep) => self.gpu_idle_w[m.index()],
        })
    }

    /// What a device is doing now (for tests and the API's simulated view).
    pub fn state(&self, d: DeviceIdx) -> Option<Target> {
        self.agents.get(d.index()).map(|a| a.state)
    }

    fn uniform(rng: &mut Rng, (lo, hi): (i64, i64)) -> i64 {
        lo + (rng::unit(rng) * (hi - lo) as f64) as i64
    }

    /// A command reaches its device's agent. Commands to unknown devices are dropped (a real
    /// network would lose them too; the manager times them out).
    pub fn command(&mut self, c: &Command, now_ms: i64) {
        let Some(a) = self.agents.get_mut(c.device.index()) else { return };
        if a.silent_until_ms > now_ms {
            return;
        }
        if a.last_applied == c.id {
            // Applied already: answer again, change nothing.
            self.replies.push((c.id, c.device, Outcome::Applied));
            return;
        }
        if a.applying.is_some_and(|p| p.id == c.id) {
            return;
        }
        let p = &self.params;
        let delay = match (a.model, a.state, c.target) {
            (ModelRef::Asic(m), Target::Sleep, Target::Run { .. }) => {
                let wake = self.asic[m.index()].4;
                Self::uniform(&mut self.rng, ((wake as f64 * 0.8) as i64, (wake as f64 * 1.3) as i64))
            }
            (ModelRef::Asic(_), _, Target::Sleep) => Self::uniform(&mut self.rng, p.asic_sleep_ms),
            (ModelRef::Asic(_), _, _) => Self::uniform(&mut self.rng, p.asic_retune_ms),
            (ModelRef::Gpu(_), _, _) => Self::uniform(&mut self.rng, p.gpu_cap_ms),
        };
        let fail = rng::unit(&mut self.rng) < p.fail_prob;
        let lost = rng::unit(&mut self.rng) < p.lost_answer_prob;
        a.applying = Some(Applying { id: c.id, target: c.target, at_ms: now_ms + delay, fail, lost });
    }

    /// Time passes to `now_ms`: commands due are applied (or fail), and every device whose report
    /// is due reports. Outputs are appended in device order.
    pub fn step(
        &mut self,
        now_ms: i64,
        reports: &mut Vec<(DeviceIdx, Report)>,
        answers: &mut Vec<(CommandId, DeviceIdx, Outcome)>,
    ) {
        let dt_h = (now_ms - self.last_step_ms).max(0) as f64 / 3_600_000.0;
        self.last_step_ms = self.last_step_ms.max(now_ms);
        answers.append(&mut self.replies);
        let p = &self.params;
        let every = p.telemetry_every_ms;
        let (silence, overheat, board) =
            (p.silence_per_hour * dt_h, p.overheat_per_hour * dt_h, p.board_failure_per_hour * dt_h);
        for (i, a) in self.agents.iter_mut().enumerate() {
            let d = DeviceIdx(i as u32);
            // Trouble starts.
            if a.silent_until_ms <= now_ms && rng::unit(&mut self.rng) < silence {
                a.silent_until_ms = now_ms + Self::uniform(&mut self.rng, p.silence_ms);
            }
            if a.hot_until_ms <= now_ms && rng::unit(&mut self.rng) < overheat {
                a.hot_until_ms = now_ms + p.hot_ms;
            }
            if matches!(a.model, ModelRef::Asic(_))
                && a.board_failed_until_ms <= now_ms
                && rng::unit(&mut self.rng) < board
            {
                a.board_failed_until_ms = now_ms + Self::uniform(&mut self.rng, p.repair_ms);
                a.errors += 500;
            }
            if let Some(c) = a.applying
                && c.at_ms <= now_ms
            {
                a.applying = None;
                if c.fail {
                    answers.push((c.id, d, Outcome::Failed("agent: setting rejected by firmware".into())));
                } else {
                    a.state = c.target;
                    a.last_applied = c.id;
                    if !c.lost && a.silent_until_ms <= now_ms {
                        answers.push((c.id, d, Outcome::Applied));
                    }
                }
            }
            if a.next_report_ms > now_ms {
                continue;
            }
            a.next_report_ms += every * ((now_ms - a.next_report_ms) / every + 1);
            if a.silent_until_ms > now_ms {
                continue;
            }
            let noise = 1.0 + 0.01 * rng::normal(&mut self.rng);
            let (power_w, hashrate_ths, load) = match (a.model, a.state) {
                (ModelRef::Asic(m), Target::Run { power_w }) => {
                    let (h, w, e, _, _) = self.asic[m.index()];
                    let board = if a.board_failed_until_ms > now_ms { 0.6 } else { 1.0 };
                    (power_w * noise, Some(h * (power_w / w).powf(e) * board * noise), power_w / w)
                }
                (ModelRef::Asic(m), Target::Sleep) => (self.asic[m.index()].3, Some(0.0), 0.0),
                (ModelRef::Gpu(_), Target::Run { power_w }) => (power_w * 0.9 * noise, None, 0.9),
                (ModelRef::Gpu(m), Target::Sleep) => (self.gpu_idle_w[m.index()], None, 0.1),
            };
            let hot = if a.hot_until_ms > now_ms { 35.0 } else { 0.0 };
            let temp_c = p.ambient_c + 40.0 * load + hot + rng::normal(&mut self.rng);
            if a.board_failed_until_ms > now_ms {
                a.errors += 3;
            }
            let r = Report { state: a.state, power_w, hashrate_ths, temp_c, errors: a.errors };
            reports.push((d, r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_model::fleet::Fleet;

    fn fleet() -> Fleet {
        Fleet::from_toml("small.toml", include_str!("../../../examples/fleets/small.toml")).unwrap()
    }

    #[test]
    fn every_device_reports_once_per_period() {
        let f = fleet();
        let mut a = Agents::new(&f, AgentParams::quiet(), 1, 0).unwrap();
        let (mut r, mut ans) = (vec![], vec![]);
        for t in (0..=60_000).step_by(1_000) {
            a.step(t, &mut r, &mut ans);
        }
        // Phases in [0, 10 s): six reports per device in a minute, or seven where the phase is 0.
        let mut per = vec![0; f.devices.len()];
        for (d, _) in &r {
            per[d.index()] += 1;
        }
        assert!(per.iter().all(|&n| n == 6 || n == 7), "{per:?}");
        assert!(ans.is_empty());
    }

    #[test]
    fn commands_apply_after_a_delay_and_once() {
        let f = fleet();
        let mut a = Agents::new(&f, AgentParams::quiet(), 2, 0).unwrap();
        let d = DeviceIdx(0);
        let c = Command { id: 7, device: d, target: Target::Sleep, attempt: 1, deadline_ms: 10_000 };
        a.command(&c, 0);
        let (mut r, mut ans) = (vec![], vec![]);
        a.step(1_000, &mut r, &mut ans);
        assert!(matches!(a.state(d), Some(Target::Run { .. })), "sleep takes at least 2 s");
        for t in (2_000..=8_000).step_by(1_000) {
            a.step(t, &mut r, &mut ans);
        }
        assert_eq!(a.state(d), Some(Target::Sleep));
        assert_eq!(ans, vec![(7, d, Outcome::Applied)]);
        // The same command again: answered again, applied once.
        a.command(&c, 9_000);
        ans.clear();
        a.step(9_000, &mut r, &mut ans);
        assert_eq!(ans, vec![(7, d, Outcome::Applied)]);
        // Waking takes about the model's wake time (60 s for the S21), not seconds.
        let wake = Command { id: 8, device: d, target: Target::Run { power_w: 3_000.0 }, attempt: 1, deadline_ms: 0 };
        a.command(&wake, 10_000);
        a.step(40_000, &mut r, &mut ans);
        assert_eq!(a.state(d), Some(Target::Sleep));
        a.step(100_000, &mut r, &mut ans);
        assert_eq!(a.state(d), Some(Target::Run { power_w: 3_000.0 }));
    }

    #[test]
    fn one_seed_one_history_and_trouble_happens() {
        let f = fleet();
        let noisy = AgentParams {
            fail_prob: 0.2,
            lost_answer_prob: 0.2,
            silence_per_hour: 0.5,
            overheat_per_hour: 0.5,
            board_failure_per_hour: 0.5,
            ..Default::default()
        };
        let run = || {
            let mut a = Agents::new(&f, noisy.clone(), 3, 0).unwrap();
            let (mut r, mut ans) = (vec![], vec![]);
            for (k, t) in (0..3_600_000).step_by(5_000).enumerate() {
                let d = DeviceIdx((k % f.devices.len()) as u32);
                let c = Command { id: k as u64 + 1, device: d, target: Target::Sleep, attempt: 1, deadline_ms: 0 };
                a.command(&c, t);
                a.step(t, &mut r, &mut ans);
            }
            (r, ans)
        };
        let (r1, a1) = run();
        let (r2, a2) = run();
        assert_eq!(r1, r2);
        assert_eq!(a1, a2);
        assert!(a1.iter().any(|x| matches!(x.2, Outcome::Failed(_))));
        assert!(r1.iter().any(|(_, r)| r.temp_c > 90.0), "some device overheats");
        // Silent devices skip reports: fewer than one per device per 10 s.
        assert!(r1.len() < f.devices.len() * 360);
    }

    #[test]
    fn bad_params_name_the_field() {
        let f = fleet();
        let p = AgentParams { fail_prob: 1.5, ..Default::default() };
        assert_eq!(
            Agents::new(&f, p, 0, 0).err().unwrap(),
            Invalid::new("fail_prob", "must be a probability in [0, 1]")
        );
        let p = AgentParams { gpu_cap_ms: (5, 1), ..Default::default() };
        assert_eq!(Agents::new(&f, p, 0, 0).err().unwrap().field, "gpu_cap_ms");
    }
}
