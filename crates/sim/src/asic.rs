//! ASIC physics and the two fidelities of an ASIC group (one site, one model).
//!
//! Physics, shared by both fidelities:
//! - the firmware holds a commanded power within `[min_power_w, max_power_w]`; hashrate is
//!   `nameplate * (p / nameplate_w)^curve_exponent`, concave, so J/TH falls when underclocked;
//! - ambient above `efficiency_ref_c` raises J/TH by `jth_rise_per_c` per degree; above `derate_c`
//!   the highest target falls linearly to the minimum at `shutdown_c`, where hash boards stop until
//!   the air is 3 C cooler;
//! - sleep keeps the controller (`sleep_power_w`) and wakes in `wake_s`; a cold start from off takes
//!   `cold_start_s`; both draw `boot_power_w` meanwhile;
//! - faults while hashing, each a Poisson process: reboots (`asic_reboot_s` without hashing), hash
//!   board losses (1/n of hashrate and power each, exponential repair), fan failures (the miner stops
//!   until repaired, exponential repair).
//!
//! [`AsicDevices`] holds one state per device (struct of arrays) and draws faults per device;
//! [`AsicCohort`] holds counts per state and moves expected flows. Same physics, same command rule:
//! the first `hashing` available devices (in device order) hash, the rest idle.

use hcp_model::{AsicModel, Reliability};

use crate::cohort::{Pipeline, Pools, rebalance};
use crate::rng::{self, Rng};

/// How far below `shutdown_c` the air must cool before a thermally stopped miner may restart.
pub const THERMAL_HYSTERESIS_C: f64 = 3.0;

/// Hashrate reported by a share-based estimate: shares per minute a device at nameplate submits
/// (pools tune vardiff for tens of shares per minute).
pub const SHARES_PER_MIN_AT_NAMEPLATE: f64 = 60.0;

/// The highest power target the firmware allows at an ambient, or `None` above the shutdown limit.
pub fn max_power_at(m: &AsicModel, ambient_c: f64) -> Option<f64> {
    if ambient_c >= m.shutdown_c {
        None
    } else if ambient_c <= m.derate_c {
        Some(m.max_power_w)
    } else {
        let f = (ambient_c - m.derate_c) / (m.shutdown_c - m.derate_c);
        Some(m.max_power_w - f * (m.max_power_w - m.min_power_w))
    }
}

/// The power a hashing miner actually draws for a commanded target at an ambient.
pub fn effective_power_w(m: &AsicModel, target_w: f64, ambient_c: f64) -> f64 {
    let hi = max_power_at(m, ambient_c).unwrap_or(m.min_power_w);
    target_w.clamp(m.min_power_w, hi)
}

/// Multiplier on J/TH from heat.
pub fn heat_factor(m: &AsicModel, ambient_c: f64) -> f64 {
    1.0 + m.jth_rise_per_c * (ambient_c - m.efficiency_ref_c).max(0.0)
}

/// Hashrate (TH/s) of a miner with all boards at `power_w` (already effective) and an ambient.
pub fn hashrate_ths(m: &AsicModel, power_w: f64, ambient_c: f64) -> f64 {
    m.hashrate_ths * (power_w / m.power_w).powf(m.curve_exponent) / heat_factor(m, ambient_c)
}

/// What the dispatcher asks of a group: how many devices hash, at what power, and what the others
/// do. Of the `hashing` devices, the last `low` run at `low_power_w` (a merit-order cut leaves
/// identical devices at two adjacent levels).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsicTarget {
    pub hashing: u32,
    pub power_w: f64,
    pub low: u32,
    pub low_power_w: f64,
    pub idle: IdleMode,
}

impl AsicTarget {
    /// All hashing devices at one power.
    pub fn uniform(hashing: u32, power_w: f64, idle: IdleMode) -> Self {
        AsicTarget { hashing, power_w, low: 0, low_power_w: power_w, idle }
    }

    /// Devices at the high power.
    pub fn high(&self) -> u32 {
        self.hashing - self.low.min(self.hashing)
    }
}

/// What a device not asked to hash does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleMode {
    Sleep,
    Off,
}

/// Device states of a miner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AsicState {
    Off,
    Booting,
    Sleeping,
    Waking,
    Hashing,
    Rebooting,
    FanFault,
    Thermal,
}

/// Aggregates of one group over one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AsicStep {
    /// Mean power over the step by state class.
    pub hashing_w: f64,
    pub transition_w: f64,
    /// Sleeping, thermally stopped and fan-faulted miners (controller alive).
    pub idle_w: f64,
    /// True hashrate, mean over the step.
    pub hashrate_ths: f64,
    /// Share-based estimate, summed over devices (per-device fidelity only; equals the true
    /// hashrate in cohort fidelity).
    pub reported_ths: f64,
    /// Device counts at the end of the step.
    pub n_hashing: f64,
    pub n_transition: f64,
    pub n_sleeping: f64,
    pub n_off: f64,
    pub n_faulted: f64,
    /// Fault events that started in the step.
    pub faults: f64,
}

impl AsicStep {
    pub fn power_w(&self) -> f64 {
        self.hashing_w + self.transition_w + self.idle_w
    }
}

struct Rates {
    /// Probability per ms of each fault while hashing.
    reboot: f64,
    board: f64,
    fan: f64,
}

impl Rates {
    fn new(r: &Reliability) -> Rates {
        let per_ms = |per_day: f64| per_day / 86_400_000.0;
        Rates {
            reboot: per_ms(r.asic_reboots_per_day),
            board: per_ms(r.asic_board_failures_per_day),
            fan: per_ms(r.asic_fan_failures_per_day),
        }
    }
    fn total(&self) -> f64 {
        self.reboot + self.board + self.fan
    }
}

/// Per-device fidelity: one state per miner.
pub struct AsicDevices {
    pub model: AsicModel,
    rel: Reliability,
    rates: Rates,
    state: Vec<AsicState>,
    until_ms: Vec<i64>,
    boards_lost: Vec<u8>,
    repair_at_ms: Vec<i64>,
    /// Last telemetry: power drawn and share-based hashrate.
    last_power_w: Vec<f32>,
    last_reported_ths: Vec<f32>,
    rng: Rng,
}

impl AsicDevices {
    /// `n` devices, starting in the steady state of `initial` (no warm-up transient).
    pub fn new(model: AsicModel, rel: &Reliability, n: usize, initial: AsicTarget, rng: Rng) -> Self {
        let k = (initial.hashing as usize).min(n);
        let idle = match initial.idle {
            IdleMode::Sleep => AsicState::Sleeping,
            IdleMode::Off => AsicState::Off,
        };
        let mut state = vec![AsicState::Hashing; k];
        state.resize(n, idle);
        AsicDevices {
            model,
            rel: rel.clone(),
            rates: Rates::new(rel),
            state,
            until_ms: vec![0; n],
            boards_lost: vec![0; n],
            repair_at_ms: vec![0; n],
            last_power_w: vec![0.0; n],
            last_reported_ths: vec![0.0; n],
            rng,
        }
    }

    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Telemetry of one device: state, power, share-based hashrate.
    pub fn telemetry(&self, i: usize) -> (AsicState, f32, f32) {
        (self.state[i], self.last_power_w[i], self.last_reported_ths[i])
    }

    /// Advances `[now, now + dt)`: applies the target, then faults, then accounts power.
    pub fn step(&mut self, now_ms: i64, dt_ms: i64, target: &AsicTarget, ambient_c: f64) -> AsicStep {
        use AsicState::*;
        let m = &self.model;
        let hot = ambient_c >= m.shutdown_c;
        let cooled = ambient_c < m.shutdown_c - THERMAL_HYSTERESIS_C;
        let p_hi = effective_power_w(m, target.power_w, ambient_c);
        let p_lo = effective_power_w(m, target.low_power_w, ambient_c);
        let (h_hi, h_lo) = (hashrate_ths(m, p_hi, ambient_c), hashrate_ths(m, p_lo, ambient_c));
        let high = target.high();
        let boards = f64::from(m.hash_boards);
        let idle_state = match target.idle {
            IdleMode::Sleep => Sleeping,
            IdleMode::Off => Off,
        };
        let p_fault = self.rates.total() * dt_ms as f64;
        let window_min = dt_ms as f64 / 60_000.0;
        let shares_per_ths = SHARES_PER_MIN_AT_NAMEPLATE * window_min / m.hashrate_ths;
        let mut out = AsicStep::default();
        let mut seen = 0u32;
        for i in 0..self.state.len() {
            let mut st = self.state[i];
            if hot && !matches!(st, Off | FanFault) {
                st = Thermal;
            }
            match st {
                Thermal if cooled => st = Sleeping,
                FanFault if now_ms >= self.until_ms[i] => st = Off,
                _ => {}
            }
            let available = !matches!(st, FanFault | Thermal);
            let want = available && seen < target.hashing;
            let (p_eff, h_full) = if seen < high { (p_hi, h_hi) } else { (p_lo, h_lo) };
            seen += u32::from(available);
            if want {
                match st {
                    Off => {
                        st = Booting;
                        self.until_ms[i] = now_ms + (m.cold_start_s * 1e3) as i64;
                    }
                    Sleeping => {
                        st = Waking;
                        self.until_ms[i] = now_ms + (m.wake_s * 1e3) as i64;
                    }
                    Booting | Waking | Rebooting if now_ms >= self.until_ms[i] => st = Hashing,
                    _ => {}
                }
            } else if available && !(st == Off || (st == Sleeping && idle_state == Sleeping)) {
                st = idle_state;
            }
            if self.boards_lost[i] > 0 && now_ms >= self.repair_at_ms[i] {
                self.boards_lost[i] = 0;
            }
            if st == Hashing && rng::unit(&mut self.rng) < p_fault {
                out.faults += 1.0;
                let u = rng::unit(&mut self.rng) * self.rates.total();
                if u < self.rates.reboot {
                    st = Rebooting;
                    self.until_ms[i] = now_ms + (self.rel.asic_reboot_s * 1e3) as i64;
                } else if u < self.rates.reboot + self.rates.board {
                    if self.boards_lost[i] + 1 < m.hash_boards {
                        if self.boards_lost[i] == 0 {
                            let repair = rng::exp_mean(&mut self.rng, self.rel.asic_board_repair_h * 3.6e6);
                            self.repair_at_ms[i] = now_ms + repair as i64;
                        }
                        self.boards_lost[i] += 1;
                    }
                } else {
                    st = FanFault;
                    self.until_ms[i] = now_ms + rng::exp_mean(&mut self.rng, self.rel.asic_fan_repair_h * 3.6e6) as i64;
                }
            }
            self.state[i] = st;
            let (power, reported) = match st {
                Hashing => {
                    let ok = 1.0 - f64::from(self.boards_lost[i]) / boards;
                    let h = h_full * ok;
                    out.hashing_w += p_eff * ok;
                    out.hashrate_ths += h;
                    out.n_hashing += 1.0;
                    let reported = rng::poisson(&mut self.rng, h * shares_per_ths) / shares_per_ths;
                    out.reported_ths += reported;
                    (p_eff * ok, reported)
                }
                Booting | Waking | Rebooting => {
                    out.transition_w += m.boot_power_w;
                    out.n_transition += 1.0;
                    (m.boot_power_w, 0.0)
                }
                Sleeping => {
                    out.idle_w += m.sleep_power_w;
                    out.n_sleeping += 1.0;
                    (m.sleep_power_w, 0.0)
                }
                FanFault | Thermal => {
                    out.idle_w += m.sleep_power_w;
                    out.n_faulted += 1.0;
                    (m.sleep_power_w, 0.0)
                }
                Off => {
                    out.n_off += 1.0;
                    (0.0, 0.0)
                }
            };
            self.last_power_w[i] = power as f32;
            self.last_reported_ths[i] = reported as f32;
        }
        out
    }
}

/// Per-cohort fidelity: counts per state, expected flows.
pub struct AsicCohort {
    pub model: AsicModel,
    rel: Reliability,
    rates: Rates,
    n: f64,
    off: f64,
    sleeping: f64,
    hashing: f64,
    fan_fault: f64,
    thermal: f64,
    /// Devices booting, waking or rebooting, by when they hash.
    pipeline: Pipeline,
    /// Expected number of lost hash boards in the group.
    boards_lost: f64,
}

impl AsicCohort {
    pub fn new(model: AsicModel, rel: &Reliability, n: usize, initial: AsicTarget) -> Self {
        let n = n as f64;
        let k = f64::from(initial.hashing).min(n);
        let (sleeping, off) = match initial.idle {
            IdleMode::Sleep => (n - k, 0.0),
            IdleMode::Off => (0.0, n - k),
        };
        AsicCohort {
            model,
            rel: rel.clone(),
            rates: Rates::new(rel),
            n,
            off,
            sleeping,
            hashing: k,
            fan_fault: 0.0,
            thermal: 0.0,
            pipeline: Pipeline::default(),
            boards_lost: 0.0,
        }
    }

    fn in_flight(&self) -> f64 {
        self.pipeline.total()
    }

    pub fn step(&mut self, now_ms: i64, dt_ms: i64, target: &AsicTarget, ambient_c: f64) -> AsicStep {
        let m = &self.model;
        let dt = dt_ms as f64;
        // Heat: everything powered stops; restart once cooled.
        if ambient_c >= m.shutdown_c {
            self.thermal += self.sleeping + self.hashing + self.in_flight();
            self.sleeping = 0.0;
            self.hashing = 0.0;
            self.pipeline.clear();
        } else if ambient_c < m.shutdown_c - THERMAL_HYSTERESIS_C {
            self.sleeping += self.thermal;
            self.thermal = 0.0;
        }
        // Repairs (exponential, same means as the per-device draws).
        let fixed = self.fan_fault * (1.0 - (-dt / (self.rel.asic_fan_repair_h * 3.6e6)).exp());
        self.fan_fault -= fixed;
        self.off += fixed;
        self.boards_lost *= (-dt / (self.rel.asic_board_repair_h * 3.6e6)).exp();
        // Commands: the first `hashing` available devices run.
        let available = self.n - self.fan_fault - self.thermal;
        let want = f64::from(target.hashing).min(available);
        let pools = Pools {
            running: &mut self.hashing,
            warm: &mut self.sleeping,
            cold: &mut self.off,
            starting: &mut self.pipeline,
        };
        rebalance(pools, want, now_ms, (m.wake_s * 1e3) as i64, (m.cold_start_s * 1e3) as i64);
        if target.idle == IdleMode::Off {
            self.off += self.sleeping;
            self.sleeping = 0.0;
        }
        // Faults on hashing devices.
        let events = self.hashing * self.rates.total() * dt;
        if events > 0.0 {
            let t = self.rates.total();
            let reboots = events * self.rates.reboot / t;
            let fans = events * self.rates.fan / t;
            let boards = events * self.rates.board / t;
            self.hashing -= reboots + fans;
            self.fan_fault += fans;
            self.pipeline.push(now_ms + (self.rel.asic_reboot_s * 1e3) as i64, reboots);
            let max_lost = self.n * f64::from(m.hash_boards - 1);
            self.boards_lost = (self.boards_lost + boards).min(max_lost);
        }
        // Power over the step, time-weighted through transitions that complete inside it. Hashing
        // devices split between the two powers as the target does.
        let f_hi = if target.hashing > 0 { f64::from(target.high()) / f64::from(target.hashing) } else { 1.0 };
        let p_hi = effective_power_w(m, target.power_w, ambient_c);
        let p_lo = effective_power_w(m, target.low_power_w, ambient_c);
        let p_eff = f_hi * p_hi + (1.0 - f_hi) * p_lo;
        let h_per = f_hi * hashrate_ths(m, p_hi, ambient_c) + (1.0 - f_hi) * hashrate_ths(m, p_lo, ambient_c);
        let ok = 1.0 - self.boards_lost / (self.n * f64::from(m.hash_boards));
        let d = self.pipeline.drain_step(now_ms, dt_ms);
        let hashing_dev_time = self.hashing + d.running_after;
        let transition_dev_time = d.in_transition;
        self.hashing += d.completed;
        let h = h_per * ok * hashing_dev_time;
        AsicStep {
            hashing_w: p_eff * ok * hashing_dev_time,
            transition_w: m.boot_power_w * transition_dev_time,
            idle_w: m.sleep_power_w * (self.sleeping + self.fan_fault + self.thermal),
            hashrate_ths: h,
            reported_ths: h,
            n_hashing: self.hashing,
            n_transition: self.in_flight(),
            n_sleeping: self.sleeping,
            n_off: self.off,
            n_faulted: self.fan_fault + self.thermal,
            faults: events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_model::Catalogue;

    fn s21() -> AsicModel {
        Catalogue::default().asics.into_iter().find(|m| m.id == "antminer-s21").unwrap()
    }

    #[test]
    fn underclocking_improves_efficiency_and_heat_worsens_it() {
        let m = s21();
        let full = hashrate_ths(&m, 3500.0, 20.0);
        assert!((full - 200.0).abs() < 1e-9);
        let low = hashrate_ths(&m, m.min_power_w, 20.0);
        let jth_full = 3500.0 / full;
        let jth_low = m.min_power_w / low;
        assert!(low < full && jth_low < jth_full * 0.95, "{jth_low} vs {jth_full}");
        assert!(hashrate_ths(&m, 3500.0, 38.0) < full * 0.96);
    }

    #[test]
    fn derates_above_the_limit_and_stops_at_shutdown() {
        let m = s21();
        assert_eq!(max_power_at(&m, 35.0), Some(3500.0));
        let mid = max_power_at(&m, 43.5).unwrap();
        assert!(mid < 3500.0 && mid > m.min_power_w);
        assert_eq!(max_power_at(&m, 47.0), None);
        let mut g = AsicDevices::new(m.clone(), &Reliability::default(), 10, target(10), rng::stream(1, "a", 0));
        let s = g.step(0, 10_000, &target(10), 48.0);
        assert_eq!((s.n_faulted, s.hashrate_ths), (10.0, 0.0));
        // Still too warm to restart within the hysteresis band.
        assert_eq!(g.step(10_000, 10_000, &target(10), 45.0).n_faulted, 10.0);
        let s = g.step(20_000, 10_000, &target(10), 30.0);
        assert_eq!(s.n_transition, 10.0, "cooled miners wake");
    }

    fn target(k: u32) -> AsicTarget {
        AsicTarget::uniform(k, 3500.0, IdleMode::Sleep)
    }

    #[test]
    fn wake_and_cold_start_take_their_time() {
        let m = s21();
        let rel = Reliability {
            asic_reboots_per_day: 0.0,
            asic_board_failures_per_day: 0.0,
            asic_fan_failures_per_day: 0.0,
            ..Default::default()
        };
        let off = AsicTarget::uniform(0, 3500.0, IdleMode::Off);
        let mut g = AsicDevices::new(m.clone(), &rel, 4, off, rng::stream(1, "a", 0));
        let mut t = 0;
        let mut first_hash = None;
        while t < 600_000 {
            let s = g.step(t, 10_000, &target(4), 20.0);
            if s.n_hashing == 4.0 && first_hash.is_none() {
                first_hash = Some(t);
            }
            t += 10_000;
        }
        assert_eq!(first_hash, Some((m.cold_start_s * 1e3) as i64));
        // Sleep, then wake: wake_s.
        g.step(t, 10_000, &AsicTarget { hashing: 0, ..target(0) }, 20.0);
        t += 10_000;
        let start = t;
        while g.step(t, 10_000, &target(4), 20.0).n_hashing < 4.0 {
            t += 10_000;
        }
        assert_eq!(t - start, (m.wake_s * 1e3) as i64);
    }
}
