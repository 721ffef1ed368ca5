//! The whole fleet at one of two fidelities: per device (every device has its own state and
//! telemetry; used when the platform runs live) and per cohort (feeder x model x state counts; used
//! for long backtests). Both step the same physics from [`crate::asic`] and [`crate::gpu`].

use hcp_model::fleet::{Fleet, Group};
use hcp_model::{FeederIdx, ModelRef, SiteIdx};

use crate::asic::{AsicCohort, AsicDevices, AsicStep, AsicTarget};
use crate::gpu::{GpuCohort, GpuDevices, GpuStep, GpuTarget, Workload};
use crate::rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fidelity {
    Device,
    Cohort,
}

impl std::str::FromStr for Fidelity {
    type Err = hcp_model::Invalid;
    fn from_str(s: &str) -> Result<Self, hcp_model::Invalid> {
        match s {
            "device" => Ok(Fidelity::Device),
            "cohort" => Ok(Fidelity::Cohort),
            _ => Err(hcp_model::Invalid::new("fidelity", format!("must be device or cohort, got {s:?}"))),
        }
    }
}

/// A command for one group (see [`Fleet::groups`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GroupTarget {
    Asic(AsicTarget),
    Gpu(GpuTarget),
}

/// The environment of a site during a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiteEnv {
    pub ambient_c: f64,
    /// Inference arrivals offered to the site's GPUs.
    pub workload: Workload,
}

/// One group's result for a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GroupStep {
    Asic(AsicStep),
    Gpu(GpuStep),
}

impl GroupStep {
    pub fn power_w(&self) -> f64 {
        match self {
            GroupStep::Asic(a) => a.power_w(),
            GroupStep::Gpu(g) => g.power_w(),
        }
    }
}

enum Sim {
    AsicDev(AsicDevices),
    AsicCoh(AsicCohort),
    GpuDev(GpuDevices),
    GpuCoh(GpuCohort),
}

pub struct GroupSim {
    pub site: SiteIdx,
    pub feeder: FeederIdx,
    pub model: ModelRef,
    pub count: u32,
    sim: Sim,
}

pub struct FleetSim {
    pub fidelity: Fidelity,
    pub groups: Vec<GroupSim>,
    /// Device index -> (group, index in group), for telemetry.
    locate: Vec<(u32, u32)>,
}

/// Per-device telemetry, as an agent would report it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Telemetry {
    Asic { state: crate::asic::AsicState, power_w: f32, reported_ths: f32 },
    Gpu { state: crate::gpu::GpuState, power_w: f32, last_xid: Option<crate::gpu::Xid> },
}

impl FleetSim {
    /// Builds the fleet's groups in [`Fleet::groups`] order, each starting in the steady state of
    /// its initial target.
    pub fn new(fleet: &Fleet, fidelity: Fidelity, initial: &[GroupTarget], seed: u64) -> Self {
        let groups: Vec<Group> = fleet.groups();
        assert_eq!(groups.len(), initial.len(), "one initial target per group");
        let mut locate = vec![(0, 0); fleet.devices.len()];
        let mut out = Vec::with_capacity(groups.len());
        for (gi, (g, t)) in groups.iter().zip(initial).enumerate() {
            for (k, d) in g.devices.iter().enumerate() {
                locate[d.index()] = (gi as u32, k as u32);
            }
            let n = g.devices.len();
            let rng = rng::stream(seed, "fleet", gi as u64);
            let sim = match (g.model, t, fidelity) {
                (ModelRef::Asic(m), GroupTarget::Asic(t), Fidelity::Device) => {
                    Sim::AsicDev(AsicDevices::new(fleet.catalogue.asic(m).clone(), &fleet.reliability, n, *t, rng))
                }
                (ModelRef::Asic(m), GroupTarget::Asic(t), Fidelity::Cohort) => {
                    Sim::AsicCoh(AsicCohort::new(fleet.catalogue.asic(m).clone(), &fleet.reliability, n, *t))
                }
                (ModelRef::Gpu(m), GroupTarget::Gpu(t), Fidelity::Device) => Sim::GpuDev(GpuDevices::new(
                    fleet.catalogue.gpu(m).clone(),
                    fleet.served_model.clone(),
                    &fleet.reliability,
                    n,
                    t,
                    rng,
                )),
                (ModelRef::Gpu(m), GroupTarget::Gpu(t), Fidelity::Cohort) => Sim::GpuCoh(GpuCohort::new(
                    fleet.catalogue.gpu(m).clone(),
                    fleet.served_model.clone(),
                    &fleet.reliability,
                    n,
                    t,
                )),
                _ => panic!("group {gi}: target kind does not match the model kind"),
            };
            out.push(GroupSim { site: g.site, feeder: g.feeder, model: g.model, count: n as u32, sim });
        }
        FleetSim { fidelity, groups: out, locate }
    }

    /// Advances every group over `[now, now + dt)`. `env` is indexed by site. A site's offered
    /// inference load is split over its GPU groups in proportion to the GPUs each is asked to serve.
    pub fn step(
        &mut self,
        now_ms: i64,
        dt_ms: i64,
        targets: &[GroupTarget],
        env: &[SiteEnv],
        out: &mut Vec<GroupStep>,
    ) {
        assert_eq!(targets.len(), self.groups.len(), "one target per group");
        let mut serving_by_site = vec![0.0f64; env.len()];
        for (g, t) in self.groups.iter().zip(targets) {
            if let GroupTarget::Gpu(t) = t {
                serving_by_site[g.site.index()] += f64::from(t.serving.min(g.count));
            }
        }
        out.clear();
        for (g, t) in self.groups.iter_mut().zip(targets) {
            let e = &env[g.site.index()];
            let share = |t: &GpuTarget| {
                let total = serving_by_site[g.site.index()];
                let f = if total > 0.0 { f64::from(t.serving.min(g.count)) / total } else { 0.0 };
                Workload { rate_rps: e.workload.rate_rps * f, ..e.workload }
            };
            out.push(match (&mut g.sim, t) {
                (Sim::AsicDev(s), GroupTarget::Asic(t)) => GroupStep::Asic(s.step(now_ms, dt_ms, t, e.ambient_c)),
                (Sim::AsicCoh(s), GroupTarget::Asic(t)) => GroupStep::Asic(s.step(now_ms, dt_ms, t, e.ambient_c)),
                (Sim::GpuDev(s), GroupTarget::Gpu(t)) => {
                    GroupStep::Gpu(s.step(now_ms, dt_ms, t, &share(t), e.ambient_c))
                }
                (Sim::GpuCoh(s), GroupTarget::Gpu(t)) => {
                    GroupStep::Gpu(s.step(now_ms, dt_ms, t, &share(t), e.ambient_c))
                }
                _ => panic!("target kind does not match group kind"),
            });
        }
    }

    /// Telemetry of one device (per-device fidelity only).
    pub fn telemetry(&self, device: hcp_model::DeviceIdx) -> Option<Telemetry> {
        let (g, k) = *self.locate.get(device.index())?;
        match &self.groups[g as usize].sim {
            Sim::AsicDev(s) => {
                let (state, power_w, reported_ths) = s.telemetry(k as usize);
                Some(Telemetry::Asic { state, power_w, reported_ths })
            }
            Sim::GpuDev(s) => {
                let (state, power_w, last_xid) = s.telemetry(k as usize);
                Some(Telemetry::Gpu { state, power_w, last_xid })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asic::IdleMode;
    use hcp_model::DeviceIdx;

    #[test]
    fn per_device_telemetry_adds_up_to_the_group() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml");
        let fleet = Fleet::from_toml(path, &std::fs::read_to_string(path).unwrap()).unwrap();
        let targets: Vec<GroupTarget> = fleet
            .groups()
            .iter()
            .map(|g| match g.model {
                ModelRef::Asic(a) => GroupTarget::Asic(AsicTarget {
                    hashing: g.count() / 2,
                    power_w: fleet.catalogue.asic(a).max_power_w,
                    low: g.count() / 4,
                    low_power_w: fleet.catalogue.asic(a).min_power_w,
                    idle: IdleMode::Sleep,
                }),
                ModelRef::Gpu(_) => GroupTarget::Gpu(GpuTarget { serving: g.count(), cap_w: 300.0, idle_off: false }),
            })
            .collect();
        let mut sim = FleetSim::new(&fleet, Fidelity::Device, &targets, 9);
        let env = vec![
            SiteEnv {
                ambient_c: 30.0,
                workload: Workload { rate_rps: 40.0, prompt_tokens: 800.0, output_tokens: 200.0 }
            };
            fleet.sites.len()
        ];
        let mut out = vec![];
        sim.step(0, 10_000, &targets, &env, &mut out);
        for (gi, g) in fleet.groups().iter().enumerate() {
            let sum: f64 = g
                .devices
                .iter()
                .map(|d| match sim.telemetry(*d).unwrap() {
                    Telemetry::Asic { power_w, .. } | Telemetry::Gpu { power_w, .. } => f64::from(power_w),
                })
                .sum();
            assert!((sum / out[gi].power_w() - 1.0).abs() < 1e-5, "group {gi}: {sum} vs {}", out[gi].power_w());
        }
        assert!(sim.telemetry(DeviceIdx(fleet.devices.len() as u32)).is_none());
        let cohort = FleetSim::new(&fleet, Fidelity::Cohort, &targets, 9);
        assert!(cohort.telemetry(DeviceIdx(0)).is_none(), "cohorts have no per-device telemetry");
    }
}
