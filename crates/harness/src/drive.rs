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
}
