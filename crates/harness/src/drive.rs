//! The engine driven by the simulated world: the seeded whole-platform simulation of the same
//! control core `hcp up` runs. Each step the world's inputs reach the engine, the engine's
//! commands reach the devices, and the invariants are checked: no site or feeder draws above its
//! limit (from the devices' own state), every plan stays inside each site's limit, every device is
//! counted once, and each closed interval's energy by state adds up to its metered energy.

use hcp_engine::io::{Decided, Input, Output};
use hcp_engine::{Engine, EngineConfig};
use hcp_model::SimTime;
use hcp_model::fleet::Fleet;
use hcp_model::ids::DeviceIdx;

use crate::run::Violation;
use crate::world::SimWorld;

pub struct Driven {
    pub engine: Engine,
    pub world: SimWorld,
    seed: u64,
    /// Devices of each site and each feeder (fleet indexes).
    site_devices: Vec<Vec<DeviceIdx>>,
    feeder_devices: Vec<Vec<DeviceIdx>>,
    site_cap_w: Vec<f64>,
    feeder_limit_w: Vec<f64>,
    inputs: Vec<Input>,
    /// Time the draw of a site may stay above its cap while commands are being applied (a device
    /// asked to shed takes up to 8 s; one asked to rise may be faster). Zero means never.
    pub transient_ms: i64,
    over_since: Vec<Option<SimTime>>,
}

impl Driven {
    /// The engine of `fleet` with `cfg` from `from` (command ids from 1), driven by `world`.
    pub fn new(fleet: &Fleet, cfg: EngineConfig, world: SimWorld, from: SimTime, seed: u64) -> Result<Self, Violation> {
        let engine = Engine::new(fleet, cfg, from, 1).map_err(|e| Violation {
            seed,
            at: from,
            what: format!("engine setup: {e}"),
        })?;
        Ok(Self::with_engine(engine, world, seed))
    }

    /// An engine the caller built (with state restored from storage, say), driven by `world`.
    pub fn with_engine(engine: Engine, world: SimWorld, seed: u64) -> Self {
        let fleet = engine.fleet();
        let mut site_devices = vec![vec![]; fleet.sites.len()];
        let mut feeder_devices = vec![vec![]; fleet.feeders.len()];
        for (i, d) in fleet.devices.iter().enumerate() {
            site_devices[d.site.index()].push(DeviceIdx(i as u32));
            feeder_devices[d.feeder.index()].push(DeviceIdx(i as u32));
        }
        let site_cap_w = fleet.sites.iter().map(|s| s.power_cap_w).collect();
        let feeder_limit_w = fleet.feeders.iter().map(|f| f.limit_w).collect();
        let over_since = vec![None; fleet.sites.len() + fleet.feeders.len()];
        Driven {
            engine,
            world,
            seed,
            site_devices,
            feeder_devices,
            site_cap_w,
            feeder_limit_w,
            inputs: vec![],
            transient_ms: 10_000,
            over_since,
        }
    }

    /// The time of the next step: when the engine next wants to be woken.
    pub fn next(&self) -> SimTime {
        self.engine.poll_timeout()
    }

    /// One step at `now`: the world's inputs, the engine's tick, its commands to the devices,
    /// everything else to `on_output`; then the invariants.
    pub fn step(&mut self, now: SimTime, on_output: &mut dyn FnMut(Output)) -> Result<(), Violation> {
        self.step_with(now, &mut |_| {}, on_output)
    }

    /// [`Driven::step`], calling `first_batch` with a decision's first batch's size as soon as
    /// those commands have reached the devices, before the rest of the plan is made (a driver
    /// on the wall clock times the switching path from it).
    pub fn step_with(
        &mut self,
        now: SimTime,
        first_batch: &mut dyn FnMut(usize),
        on_output: &mut dyn FnMut(Output),
    ) -> Result<(), Violation> {
        self.world.inputs(now, &mut self.inputs);
        for i in self.inputs.drain(..) {
            // A refused input comes out as an output; the world's inputs are valid by construction.
            let _ = self.engine.handle(i, now);
        }
        let world = &mut self.world;
        let _ = self.engine.handle_with(Input::Tick, now, &mut |cmds| {
            for c in cmds {
                world.command(c, now);
            }
            first_batch(cmds.len());
        });
        while let Some(o) = self.engine.poll_output() {
            match o {
                Output::Command(c) => self.world.command(&c, now),
                Output::Decided(d) => {
                    self.check_decided(&d)?;
                    on_output(Output::Decided(d));
                }
                other => on_output(other),
            }
        }
        self.check_draw(now)
    }

    /// Steps until `until` (inclusive).
    pub fn run_until(&mut self, until: SimTime, on_output: &mut dyn FnMut(Output)) -> Result<(), Violation> {
        while self.next() <= until {
            let t = self.next();
            self.step(t, on_output)?;
        }
        Ok(())
    }

    fn violation(&self, at: SimTime, what: String) -> Violation {
        Violation { seed: self.seed, at, what }
    }

    fn check_draw(&mut self, now: SimTime) -> Result<(), Violation> {
        let fleet = self.engine.fleet();
        let limits = self.site_cap_w.iter().zip(&self.site_devices).map(|(l, d)| (*l, d));
        let feeders = self.feeder_limit_w.iter().zip(&self.feeder_devices).map(|(l, d)| (*l, d));
        let mut over = vec![];
        for (k, (limit, devices)) in limits.chain(feeders).enumerate() {
            let w = self.world.draw_w(devices.iter().copied());
            over.push((k, w, limit, w > limit * (1.0 + 1e-9) + 1e-6));
        }
        for (k, w, limit, is_over) in over {
            if !is_over {
                self.over_since[k] = None;
                continue;
            }
            let since = *self.over_since[k].get_or_insert(now);
            if now.0 - since.0 > self.transient_ms {
                let name = if k < fleet.sites.len() {
                    format!("site {}", fleet.sites[k].id)
                } else {
                    format!("feeder {}", fleet.feeders[k - fleet.sites.len()].id)
                };
                return Err(self.violation(
                    now,
                    format!(
                        "{name} draws {:.1} kW above its {:.1} kW limit for {} s",
                        w / 1e3,
                        limit / 1e3,
                        (now.0 - since.0) / 1000
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_decided(&self, d: &Decided) -> Result<(), Violation> {
        let fleet = self.engine.fleet();
        for (s, p) in d.plan.sites.iter().enumerate() {
            let cap = fleet.sites[s].power_cap_w / 1e6;
            if p.asic_mw + p.gpu_mw > p.limit_mw.min(cap) + 1e-6 {
                return Err(self.violation(
                    d.at,
                    format!(
                        "plan for site {} draws {:.3} MW above its {:.3} MW limit",
                        fleet.sites[s].id,
                        p.asic_mw + p.gpu_mw,
                        p.limit_mw
                    ),
                ));
            }
        }
        let (a, u, q, m) = d.counts;
        if a + u + q > fleet.devices.len() || m > fleet.devices.len() {
            return Err(self.violation(d.at, format!("device counts {a}+{u}+{q} exceed the fleet")));
        }
        for r in &d.closed {
            let by_state = r.total_mw() * (self.engine.config().interval_ms() as f64 / 3.6e6);
            if (by_state - r.energy_mwh).abs() > 1e-9 * r.energy_mwh.abs().max(1.0) {
                return Err(self.violation(
                    d.at,
                    format!("site {}: energy by state {by_state} MWh != metered {} MWh", r.site.0, r.energy_mwh),
                ));
            }
            if r.total_mw() > r.cap_mw * (1.0 + 1e-9) {
                return Err(self.violation(d.at, format!("site {}: mean draw above its cap", r.site.0)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_sim::agents::AgentParams;
    use hcp_sim::grid::GridParams;
    use hcp_sim::market::MarketParams;

    fn fleet() -> Fleet {
        Fleet::from_toml("small.toml", include_str!("../../../examples/fleets/small.toml")).unwrap()
    }

    fn driven(seed: u64, hours: i64) -> Driven {
        let f = fleet();
        let from = SimTime::parse("2025-07-01").unwrap();
        let to = from.plus_ms(hours * 3_600_000);
        let world =
            SimWorld::new(&f, from, to, seed, &GridParams::default(), &MarketParams::default(), AgentParams::default())
                .unwrap();
        Driven::new(&f, EngineConfig::default(), world, from, seed).unwrap()
    }

    /// A simulated day with misbehaving agents: invariants hold every step, every interval is
    /// closed with metered energy, and the same seed gives the same decisions.
    #[test]
    fn a_day_drives_the_engine_with_the_invariants_held() {
        let run = |seed| {
            let mut d = driven(seed, 24);
            let end = SimTime::parse("2025-07-02").unwrap();
            let mut decided = vec![];
            d.run_until(end, &mut |o| {
                if let Output::Decided(x) = o {
                    decided.push(x);
                }
            })
            .unwrap_or_else(|v| panic!("{v}"));
            decided
        };
        let a = run(5);
        assert_eq!(a.len(), 97, "a decision each interval, both ends included");
        assert!(a[1..].iter().all(|d| d.closed.len() == 2), "each interval closed for both sites");
        let energy: f64 = a.iter().flat_map(|d| &d.closed).map(|r| r.energy_mwh).sum();
        assert!(energy > 1.0, "the fleet drew {energy} MWh");
        assert!(a.iter().any(|d| !d.plan.changes.is_empty()), "prices moved the fleet");
        let commands: usize = a.iter().map(|d| d.plane.commands.len()).sum();
        assert!(commands > 0);
        let b = run(5);
        let key = |v: &[Box<Decided>]| v.iter().map(|d| (d.at, d.plan.changes.clone())).collect::<Vec<_>>();
        assert_eq!(key(&a), key(&b), "one seed, one history");
    }

    /// Runs to `until`, returning the decisions.
    fn decisions(d: &mut Driven, until: SimTime) -> Vec<Decided> {
        let mut out = vec![];
        d.run_until(until, &mut |o| {
            if let Output::Decided(x) = o {
                out.push(*x);
            }
        })
        .unwrap_or_else(|v| panic!("{v}"));
        out
    }

    fn gpu_draw_w(d: &Driven, site: usize) -> Vec<f64> {
        let f = d.engine.fleet();
        (0..f.devices.len())
            .filter(|&i| f.devices[i].site.index() == site && matches!(f.devices[i].model, hcp_model::ModelRef::Gpu(_)))
            .filter_map(|i| d.world.agents().power_w(DeviceIdx(i as u32)))
            .collect()
    }

    /// A batch job with a deadline waits for cheaper power: handed to the engine in the summer
    /// afternoon's high prices, it is placed in the cheapest stretch before its deadline (on the
    /// prices the plan is announced with), costs less there than at once, and finishes in time;
    /// a set with two jobs of one id is refused, naming the field, and changes nothing.
    #[test]
    fn a_batch_job_with_a_deadline_waits_for_the_cheapest_stretch() {
        use hcp_econ::batch::{BatchJob, Why};
        let mut d = driven(5, 40);
        let t0 = SimTime::parse("2025-07-01T16:00").unwrap();
        decisions(&mut d, t0);
        let now = d.engine.now();
        let job = BatchJob {
            id: "job-1".into(),
            gpus: 8,
            remaining_ms: 2 * 3_600_000,
            deadline: now.plus_ms(20 * 3_600_000),
            preemptible: false,
        };
        let twice = vec![job.clone(), job.clone()];
        let e = d.engine.handle(Input::Jobs { waiting: twice }, now).unwrap_err();
        assert_eq!(e.field, "waiting[1].id", "{e}");
        d.engine.handle(Input::Jobs { waiting: vec![job.clone()] }, now).unwrap();
        let mut plans = vec![];
        while let Some(o) = d.engine.poll_output() {
            if let Output::Batch(b) = o {
                plans.push(b);
            }
        }
        assert_eq!(plans.len(), 1, "placed at once");
        let b = &plans[0];
        assert!(b.path_usd_per_mwh.len() >= 80, "prices ahead known: {}", b.path_usd_per_mwh.len());
        let p = &b.placements[0];
        assert_eq!(p.id, "job-1");
        assert!(!p.run_now, "the afternoon is not the cheapest stretch: {p:?} on {:?}", b.path_usd_per_mwh);
        assert_eq!(p.why, Why::CheaperLater);
        assert!(p.start > now && p.finish <= job.deadline, "{p:?}");
        assert!(p.planned_usd < p.now_usd, "{p:?}");
        // The stretch chosen is the cheapest of the eight intervals that start where it starts.
        let iv = d.engine.config().interval_ms();
        let k = ((p.start.0 - b.path_start.0) / iv) as usize;
        let mean = |k: usize| b.path_usd_per_mwh[k..k + 8].iter().sum::<f64>() / 8.0;
        let latest = ((job.deadline.0 - b.path_start.0) / iv) as usize - 8;
        assert!((0..=latest).all(|j| mean(k) <= mean(j) + 1e-9), "stretch at {k} is not the cheapest");
        // At each decision the job is placed again, on the prices then; when its start comes it
        // is told to run.
        let mut started = None;
        d.run_until(job.deadline, &mut |o| {
            if let Output::Batch(b) = o
                && started.is_none()
                && b.placements[0].run_now
            {
                started = Some(b.at);
            }
        })
        .unwrap_or_else(|v| panic!("{v}"));
        let started = started.expect("told to start before the deadline");
        assert!(started > now && started.plus_ms(job.remaining_ms) <= job.deadline, "started {started}");
    }

    /// GPUs are valued at the GPU price in force: when the price is above what their work earns
    /// they stop serving, except those the reserved-capacity policy keeps (named with its
    /// version), and serve again when the GPU price makes them worth it.
    #[test]
    fn gpus_stop_serving_above_their_value_except_the_reserved() {
        use hcp_econ::dispatch::Reason;
        let mut d = driven(5, 12);
        let t0 = SimTime::parse("2025-07-01").unwrap();
        decisions(&mut d, t0.plus_ms(3_600_000));
        let now = d.engine.now();
        let reserved = hcp_engine::io::ReservedRule { version: 3, tenant: "t".into(), gpus: 8 };
        d.engine.handle(Input::Policy(hcp_engine::io::PolicyUpdate::Reserved(reserved)), now).unwrap();
        // A GPU-hour worth 0.01 USD: every price is above the GPUs' value (about 8 USD/MWh).
        d.engine.handle(Input::GpuPrice { usd_per_gpu_hour: 0.01, source: "test".into() }, now).unwrap();
        let shed = decisions(&mut d, now.plus_ms(16 * 60_000));
        let reasons: Vec<&Reason> = shed.iter().flat_map(|x| &x.plan.reasons).collect();
        let site0 = reasons.iter().find_map(|r| match r {
            Reason::GpusShed { site, shed: true, serving_gpus, policy_version, .. } if site.0 == 0 => {
                Some((*serving_gpus, *policy_version))
            }
            _ => None,
        });
        assert_eq!(site0, Some((8, Some(3))), "the reserved GPUs serve, named by the policy: {reasons:?}");
        // Each site's GPUs are shed only on a price above their value (tx-west's may be lower).
        for r in &reasons {
            if let Reason::GpusShed { shed: true, price_usd_per_mwh, value_usd_per_mwh, .. } = r {
                assert!(price_usd_per_mwh > value_usd_per_mwh, "{r:?}");
            }
        }
        // The devices did it: at tx-south 8 GPUs draw serving power, 24 their idle power.
        let draws = gpu_draw_w(&d, 0);
        let idle = d.engine.fleet().catalogue.gpus.iter().map(|m| m.idle_w).fold(f64::INFINITY, f64::min);
        let serving = draws.iter().filter(|w| **w > idle * 1.5).count();
        assert_eq!((serving, draws.len()), (8, 32), "{draws:?}");
        // Worth far more than the power: they all serve again.
        let now = d.engine.now();
        d.engine.handle(Input::GpuPrice { usd_per_gpu_hour: 5.0, source: "test".into() }, now).unwrap();
        let back = decisions(&mut d, now.plus_ms(16 * 60_000));
        assert!(
            back.iter()
                .flat_map(|x| &x.plan.reasons)
                .any(|r| matches!(r, Reason::GpusShed { shed: false, serving_gpus: 32, .. }))
        );
        decisions(&mut d, now.plus_ms(17 * 60_000));
        assert!(gpu_draw_w(&d, 0).iter().all(|w| *w > idle * 1.5));
    }

    /// Where the site cap binds, GPUs with no work (the router's demand says none is running or
    /// queued) idle and give their headroom to the ASICs; when work arrives, the site is re-planned
    /// at once and the GPUs serve again, the site's draw within its cap throughout (checked by the
    /// driver every step).
    #[test]
    fn idle_gpus_lend_their_headroom_to_asics_and_get_it_back_when_work_arrives() {
        use hcp_econ::dispatch::Reason;
        let text =
            include_str!("../../../examples/fleets/small.toml").replace("power_cap_mw = 0.85", "power_cap_mw = 0.5");
        let f = Fleet::from_toml("tight.toml", &text).unwrap();
        let from = SimTime::parse("2025-07-01").unwrap();
        let world = SimWorld::new(
            &f,
            from,
            from.plus_ms(12 * 3_600_000),
            5,
            &GridParams::default(),
            &MarketParams::default(),
            AgentParams::default(),
        )
        .unwrap();
        let mut d = Driven::new(&f, EngineConfig::default(), world, from, 5).unwrap();
        // The agents start at full power, above this cap: the first plan's commands take longer
        // than a command's transient to bring it down. From the first hour on, 10 s.
        d.transient_ms = 60_000;
        decisions(&mut d, from.plus_ms(3_600_000));
        d.transient_ms = 10_000;
        let model = f.served_model.id.clone();
        let site = hcp_model::ids::SiteIdx(0);
        let now = d.engine.now();
        d.engine.handle(Input::Demand { site, model: model.clone(), queued: 0, running: 0 }, now).unwrap();
        let idle = decisions(&mut d, now.plus_ms(16 * 60_000));
        let freed = idle.iter().flat_map(|x| &x.plan.reasons).find_map(|r| match r {
            Reason::GpusIdle { site, idle_gpus, freed_mw } if site.0 == 0 => Some((*idle_gpus, *freed_mw)),
            _ => None,
        });
        let (n, mw) = freed.expect("the cap binds and the idle GPUs give way");
        assert_eq!(n, 32);
        assert!(mw > 0.02, "{mw} MW");
        let last = idle.last().unwrap();
        assert!(last.plan.sites[0].gpu_idle_mw > 0.02);
        let later = d.engine.now().plus_ms(30_000);
        decisions(&mut d, later);
        let gpu_idle = d.engine.fleet().catalogue.gpus.iter().map(|m| m.idle_w).fold(f64::INFINITY, f64::min);
        assert!(gpu_draw_w(&d, 0).iter().all(|w| *w <= gpu_idle * 1.01), "GPUs idle");
        // Work arrives: the GPUs serve again within the switching budget (seconds, not the next
        // interval), the ASICs having made room.
        let now = d.engine.now();
        d.engine.handle(Input::Demand { site, model, queued: 40, running: 200 }, now).unwrap();
        let mut commands = 0;
        while let Some(o) = d.engine.poll_output() {
            if let Output::Command(c) = o {
                d.world.command(&c, now);
                commands += 1;
            }
        }
        assert!(commands > 0, "the reclaim sends commands at once");
        decisions(&mut d, now.plus_ms(20_000));
        let serving = gpu_draw_w(&d, 0).iter().filter(|w| **w > gpu_idle * 1.5).count();
        assert_eq!(serving, 32, "within 20 s every GPU serves again");
    }
}
