//! H100 physics: power from load and cap, throughput from cap and batch, prefill and decode
//! timing, memory and temperature, Xid-style errors; and the two fidelities of a GPU group.
//!
//! The serving model, per GPU:
//! - decode is memory-bound at small batch: a step reads the weights and the batch's KV cache,
//!   `(weights + batch * context * kv_bytes) / (bandwidth * 0.8)`, and compute-bound at large batch,
//!   `batch * 2 * params / (tflops * 0.5)`; the step time is the larger;
//! - prefill is compute-bound: `prompt * 2 * params / (tflops * 0.6)`;
//! - continuous batching: the mean batch `b` solves Little's law `b = rate * latency(b)`;
//!   utilisation (the share of time a kernel runs) is `1 - exp(-b)`;
//! - board power is `loaded_w + utilisation * dynamic(b)`, with `dynamic` rising from
//!   `dynamic_batch1_w` towards the board limit as the batch grows; a power cap below that lowers
//!   clocks as `(cap headroom / dynamic)^0.4` (dynamic power goes as f^2.5), which slows prefill in
//!   proportion and decode only as clocks^0.3 (memory-bound: POLCA's observation);
//! - temperature is inlet + `thermal_c_per_w * board power`; above `throttle_c` clocks drop 3 % per
//!   degree.

use hcp_model::{GpuModel, Reliability, ServedModel};

use crate::cohort::{Pipeline, Pools, rebalance};
use crate::rng::{self, Rng};

const DECODE_BW_EFF: f64 = 0.8;
const DECODE_MFU: f64 = 0.5;
const PREFILL_MFU: f64 = 0.6;
const DECODE_CLOCK_SENSITIVITY: f64 = 0.3;
const MAX_BATCH: f64 = 256.0;
/// Time to load model weights into an idle GPU, and to boot a node from off.
pub const MODEL_LOAD_S: f64 = 60.0;
pub const NODE_BOOT_S: f64 = 180.0;

/// The mean request the GPUs serve in a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// Arrivals per second offered to one GPU.
    pub rate_rps: f64,
    pub prompt_tokens: f64,
    pub output_tokens: f64,
}

/// A GPU's steady operating point under a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OperatingPoint {
    pub utilisation: f64,
    pub batch: f64,
    pub board_w: f64,
    pub host_w: f64,
    /// Requests per second actually served (below the offered rate when saturated).
    pub served_rps: f64,
    pub output_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    /// Time to first token (prefill plus queueing for it) and time per output token.
    pub ttft_s: f64,
    pub tpot_s: f64,
    pub memory_gb: f64,
    pub temperature_c: f64,
    /// Clock factor (1 = full clocks) after cap and thermal throttling.
    pub clock: f64,
}

/// Full-clock dynamic board power (above `loaded_w`) at a mean batch.
pub fn dynamic_w(g: &GpuModel, batch: f64) -> f64 {
    let top = g.max_power_w - g.loaded_w;
    let b = (batch - 1.0).max(0.0);
    g.dynamic_batch1_w + (top - g.dynamic_batch1_w) * (1.0 - (-b / g.dynamic_batch_scale).exp())
}

/// Board power for a utilisation and batch under a cap.
pub fn board_power_w(g: &GpuModel, cap_w: f64, utilisation: f64, batch: f64) -> f64 {
    let headroom = (cap_w.min(g.max_power_w) - g.loaded_w).max(0.0);
    g.loaded_w + utilisation * dynamic_w(g, batch).min(headroom)
}

fn cap_clock(g: &GpuModel, cap_w: f64, batch: f64) -> f64 {
    let headroom = (cap_w.min(g.max_power_w) - g.loaded_w).max(1.0);
    let need = dynamic_w(g, batch);
    if need <= headroom { 1.0 } else { (headroom / need).powf(0.4) }
}

fn step_time_s(g: &GpuModel, s: &ServedModel, batch: f64, context: f64, clock: f64) -> f64 {
    let mem = (s.weight_bytes() + batch * context * s.kv_bytes_per_token)
        / (g.memory_bandwidth_tb_s * 1e12 * DECODE_BW_EFF)
        / clock.powf(DECODE_CLOCK_SENSITIVITY);
    let cmp = batch * 2.0 * s.params_b * 1e9 / (g.bf16_tflops * 1e12 * DECODE_MFU * clock);
    mem.max(cmp) / f64::from(s.gpus_per_replica).sqrt()
}

fn prefill_s(g: &GpuModel, s: &ServedModel, prompt: f64, clock: f64) -> f64 {
    prompt * 2.0 * s.params_b * 1e9 / (g.bf16_tflops * 1e12 * PREFILL_MFU * clock) / f64::from(s.gpus_per_replica)
}

/// Largest batch that fits in memory next to the weights.
pub fn max_batch(g: &GpuModel, s: &ServedModel, context: f64) -> f64 {
    let free = g.memory_gb * 1e9 * 0.9 * f64::from(s.gpus_per_replica) - s.weight_bytes();
    (free / (context * s.kv_bytes_per_token)).clamp(0.0, MAX_BATCH)
}

/// What one replica (the served model on `gpus_per_replica` GPUs) can hold under a power cap, for
/// the router: concurrent sequences (the largest batch that fits in memory next to the weights at
/// the workload's mean context, scaled by the throughput the cap leaves against full clocks) and
/// KV-cache tokens. A cap that slows decoding by a third leaves two thirds of the sequences.
pub fn replica_capacity(
    g: &GpuModel,
    s: &ServedModel,
    cap_w: f64,
    prompt_tokens: f64,
    output_tokens: f64,
) -> (u32, u64) {
    let context = prompt_tokens + output_tokens / 2.0;
    let kv_tokens = ((g.memory_gb * 1e9 * 0.9 * f64::from(s.gpus_per_replica) - s.weight_bytes())
        / s.kv_bytes_per_token)
        .max(0.0) as u64;
    let b = max_batch(g, s, context);
    if b < 1.0 {
        return (0, kv_tokens);
    }
    let latency =
        |clock: f64| prefill_s(g, s, prompt_tokens, clock) + output_tokens * step_time_s(g, s, b, context, clock);
    let ratio = latency(1.0) / latency(cap_clock(g, cap_w, b));
    ((b * ratio).floor().max(1.0) as u32, kv_tokens)
}

/// One sequence's timing on a replica under a power cap, with `batch` sequences decoding
/// together: time to its first token (prefill) and time per output token after it.
pub fn sequence_timing(g: &GpuModel, s: &ServedModel, cap_w: f64, batch: f64, prompt: f64, output: f64) -> (f64, f64) {
    let b = batch.max(1.0);
    let clock = cap_clock(g, cap_w, b);
    (prefill_s(g, s, prompt, clock), step_time_s(g, s, b, prompt + output / 2.0, clock))
}

/// The operating point of one GPU under a workload, a cap and an inlet temperature.
pub fn operating_point(g: &GpuModel, s: &ServedModel, cap_w: f64, w: &Workload, inlet_c: f64) -> OperatingPoint {
    let context = w.prompt_tokens + w.output_tokens / 2.0;
    let b_max = max_batch(g, s, context).max(1.0);
    let latency = |b: f64, clock: f64| {
        prefill_s(g, s, w.prompt_tokens, clock) + w.output_tokens * step_time_s(g, s, b, context, clock)
    };
    let mut clock = 1.0;
    let mut b: f64 = 0.0;
    // Fixed point of b = rate * latency(b), with clocks following the cap and heat at that batch.
    for _ in 0..60 {
        let next = (w.rate_rps * latency(b.max(1.0), clock)).min(b_max);
        let util = 1.0 - (-next).exp();
        let board = board_power_w(g, cap_w, util, next);
        let temp = inlet_c + g.thermal_c_per_w * board;
        let thermal = if temp > g.throttle_c { (1.0 - 0.03 * (temp - g.throttle_c)).max(0.3) } else { 1.0 };
        let new_clock = cap_clock(g, cap_w, next.max(1.0)) * thermal;
        let done = (next - b).abs() < 1e-6 * b.max(1.0) && (new_clock - clock).abs() < 1e-9;
        b = next;
        clock = new_clock;
        if done {
            break;
        }
    }
    let util = 1.0 - (-b).exp();
    let lat = latency(b.max(1.0), clock);
    let capacity_rps = b_max / latency(b_max, clock);
    let served = w.rate_rps.min(capacity_rps);
    let board = board_power_w(g, cap_w, util, b);
    let pf = prefill_s(g, s, w.prompt_tokens, clock);
    let rho = (served * pf).min(0.99);
    let queue = if w.rate_rps > capacity_rps { f64::INFINITY } else { rho / (1.0 - rho) * pf };
    OperatingPoint {
        utilisation: util,
        batch: b,
        board_w: board,
        host_w: g.host_idle_w + util * g.host_load_w,
        served_rps: served,
        output_tokens_per_s: served * w.output_tokens,
        prompt_tokens_per_s: served * w.prompt_tokens,
        ttft_s: pf + queue,
        tpot_s: if w.output_tokens > 0.0 { (lat - pf) / w.output_tokens } else { 0.0 },
        memory_gb: (s.weight_bytes() / f64::from(s.gpus_per_replica) + b * context * s.kv_bytes_per_token) / 1e9,
        temperature_c: inlet_c + g.thermal_c_per_w * board,
        clock,
    }
}

/// Xid-style GPU errors and how long each keeps a GPU out of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Xid {
    /// 13: graphics engine exception (the application fails).
    GraphicsException = 13,
    /// 31: GPU memory page fault.
    MmuFault = 31,
    /// 48: double-bit ECC error (GPU reset).
    DoubleBitEcc = 48,
    /// 79: GPU has fallen off the bus (node reboot).
    FallenOffBus = 79,
    /// 94: contained ECC error (the application restarts).
    ContainedEcc = 94,
    /// 95: uncontained ECC error (GPU reset).
    UncontainedEcc = 95,
}

impl Xid {
    /// (error, share of events, seconds out of service).
    pub const TABLE: [(Xid, f64, f64); 6] = [
        (Xid::GraphicsException, 0.30, 30.0),
        (Xid::MmuFault, 0.25, 30.0),
        (Xid::ContainedEcc, 0.15, 60.0),
        (Xid::DoubleBitEcc, 0.10, 180.0),
        (Xid::UncontainedEcc, 0.10, 180.0),
        (Xid::FallenOffBus, 0.10, 900.0),
    ];

    pub fn mean_outage_s() -> f64 {
        Self::TABLE.iter().map(|(_, w, s)| w * s).sum()
    }

    fn draw(u: f64) -> (Xid, f64) {
        let mut acc = 0.0;
        for (x, w, s) in Self::TABLE {
            acc += w;
            if u < acc {
                return (x, s);
            }
        }
        let (x, _, s) = Self::TABLE[Self::TABLE.len() - 1];
        (x, s)
    }
}

/// What the dispatcher asks of a GPU group: how many serve and at what cap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuTarget {
    pub serving: u32,
    pub cap_w: f64,
    /// Whether GPUs not serving keep their node powered (idle) or are switched off.
    pub idle_off: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GpuState {
    Off,
    Idle,
    Loading,
    Serving,
    Faulted,
}

/// Aggregates of one GPU group over one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuStep {
    /// Board plus host power of serving GPUs, and of the rest (idle, loading, faulted).
    pub serving_w: f64,
    pub idle_w: f64,
    pub n_serving: f64,
    pub n_idle: f64,
    pub n_off: f64,
    pub n_faulted: f64,
    pub requests_served: f64,
    pub output_tokens: f64,
    pub prompt_tokens: f64,
    pub xid_events: f64,
    pub point: OperatingPoint,
}

impl GpuStep {
    pub fn power_w(&self) -> f64 {
        self.serving_w + self.idle_w
    }
}

fn idle_w(g: &GpuModel, st: GpuState) -> f64 {
    match st {
        GpuState::Off => 0.0,
        GpuState::Idle | GpuState::Faulted => g.idle_w + g.host_idle_w,
        GpuState::Loading => g.loaded_w + g.host_idle_w,
        GpuState::Serving => unreachable!("serving power comes from the operating point"),
    }
}

/// Per-device fidelity: one state per GPU.
pub struct GpuDevices {
    pub model: GpuModel,
    served: ServedModel,
    xid_per_ms: f64,
    state: Vec<GpuState>,
    until_ms: Vec<i64>,
    last_xid: Vec<Option<Xid>>,
    last_power_w: Vec<f32>,
    rng: Rng,
}

impl GpuDevices {
    pub fn new(
        model: GpuModel,
        served: ServedModel,
        rel: &Reliability,
        n: usize,
        initial: &GpuTarget,
        rng: Rng,
    ) -> Self {
        let k = (initial.serving as usize).min(n);
        let mut state = vec![GpuState::Serving; k];
        state.resize(n, if initial.idle_off { GpuState::Off } else { GpuState::Idle });
        GpuDevices {
            model,
            served,
            xid_per_ms: rel.gpu_xid_per_day / 86_400_000.0,
            state,
            until_ms: vec![0; n],
            last_xid: vec![None; n],
            last_power_w: vec![0.0; n],
            rng,
        }
    }

    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Telemetry of one device: state, power, last Xid.
    pub fn telemetry(&self, i: usize) -> (GpuState, f32, Option<Xid>) {
        (self.state[i], self.last_power_w[i], self.last_xid[i])
    }

    /// Advances `[now, now + dt)`. `offered_rps` is the whole group's arrival rate.
    pub fn step(&mut self, now_ms: i64, dt_ms: i64, target: &GpuTarget, w: &Workload, inlet_c: f64) -> GpuStep {
        use GpuState::*;
        let g = &self.model;
        let mut out = GpuStep::default();
        let mut seen = 0u32;
        let p_xid = self.xid_per_ms * dt_ms as f64;
        for i in 0..self.state.len() {
            let mut st = self.state[i];
            if st == Faulted && now_ms >= self.until_ms[i] {
                st = Idle;
            }
            let available = st != Faulted;
            let want = available && seen < target.serving;
            seen += u32::from(available);
            if want {
                match st {
                    Off => {
                        st = Loading;
                        self.until_ms[i] = now_ms + ((NODE_BOOT_S + MODEL_LOAD_S) * 1e3) as i64;
                    }
                    Idle => {
                        st = Loading;
                        self.until_ms[i] = now_ms + (MODEL_LOAD_S * 1e3) as i64;
                    }
                    Loading if now_ms >= self.until_ms[i] => st = Serving,
                    _ => {}
                }
            } else if available {
                st = if target.idle_off || st == Off { Off } else { Idle };
            }
            if st == Serving && rng::unit(&mut self.rng) < p_xid {
                let (x, s) = Xid::draw(rng::unit(&mut self.rng));
                self.last_xid[i] = Some(x);
                out.xid_events += 1.0;
                st = Faulted;
                self.until_ms[i] = now_ms + (s * 1e3) as i64;
            }
            self.state[i] = st;
            match st {
                Serving => out.n_serving += 1.0,
                Off => out.n_off += 1.0,
                Faulted => out.n_faulted += 1.0,
                Idle | Loading => out.n_idle += 1.0,
            }
            if st != Serving {
                let p = idle_w(g, st);
                out.idle_w += p;
                self.last_power_w[i] = p as f32;
            }
        }
        fill_serving(&mut out, g, &self.served, target.cap_w, w, inlet_c, dt_ms);
        let per_gpu = out.point.board_w + out.point.host_w;
        for (st, p) in self.state.iter().zip(self.last_power_w.iter_mut()) {
            if *st == Serving {
                *p = per_gpu as f32;
            }
        }
        out
    }
}

/// Splits the group's offered load over its serving GPUs and accounts their power and output.
fn fill_serving(out: &mut GpuStep, g: &GpuModel, s: &ServedModel, cap_w: f64, w: &Workload, inlet_c: f64, dt_ms: i64) {
    if out.n_serving <= 0.0 {
        return;
    }
    let per = Workload { rate_rps: w.rate_rps / out.n_serving, ..*w };
    let p = operating_point(g, s, cap_w, &per, inlet_c);
    let dt_s = dt_ms as f64 / 1e3;
    out.serving_w = out.n_serving * (p.board_w + p.host_w);
    out.requests_served = p.served_rps * out.n_serving * dt_s;
    out.output_tokens = p.output_tokens_per_s * out.n_serving * dt_s;
    out.prompt_tokens = p.prompt_tokens_per_s * out.n_serving * dt_s;
    out.point = p;
}

/// Per-cohort fidelity of a GPU group: counts and expected flows.
pub struct GpuCohort {
    pub model: GpuModel,
    served: ServedModel,
    xid_per_ms: f64,
    n: f64,
    off: f64,
    idle: f64,
    serving: f64,
    loading: Pipeline,
    /// Faulted GPUs by when they return to idle.
    faulted: Pipeline,
}

impl GpuCohort {
    pub fn new(model: GpuModel, served: ServedModel, rel: &Reliability, n: usize, initial: &GpuTarget) -> Self {
        let n = n as f64;
        let k = f64::from(initial.serving).min(n);
        let (off, idle) = if initial.idle_off { (n - k, 0.0) } else { (0.0, n - k) };
        GpuCohort {
            model,
            served,
            xid_per_ms: rel.gpu_xid_per_day / 86_400_000.0,
            n,
            off,
            idle,
            serving: k,
            loading: Pipeline::default(),
            faulted: Pipeline::default(),
        }
    }

    pub fn step(&mut self, now_ms: i64, dt_ms: i64, target: &GpuTarget, w: &Workload, inlet_c: f64) -> GpuStep {
        let g = &self.model;
        let dt = dt_ms as f64;
        self.idle += self.faulted.take_ready(now_ms);
        let want = f64::from(target.serving).min(self.n - self.faulted.total());
        let pools = Pools {
            running: &mut self.serving,
            warm: &mut self.idle,
            cold: &mut self.off,
            starting: &mut self.loading,
        };
        rebalance(pools, want, now_ms, (MODEL_LOAD_S * 1e3) as i64, ((NODE_BOOT_S + MODEL_LOAD_S) * 1e3) as i64);
        if target.idle_off {
            self.off += self.idle;
            self.idle = 0.0;
        }
        let events = self.serving * self.xid_per_ms * dt;
        if events > 0.0 {
            self.serving -= events;
            for (_, share, s) in Xid::TABLE {
                self.faulted.push(now_ms + (s * 1e3) as i64, events * share);
            }
        }
        // Loading time inside the step draws loading power; the rest of the step serves.
        let serving_before = self.serving;
        let d = self.loading.drain_step(now_ms, dt_ms);
        self.serving += d.completed;
        let faulted = self.faulted.total();
        let mut out = GpuStep {
            idle_w: self.idle * idle_w(g, GpuState::Idle)
                + faulted * idle_w(g, GpuState::Faulted)
                + d.in_transition * idle_w(g, GpuState::Loading),
            n_idle: self.idle + self.loading.total(),
            n_off: self.off,
            n_faulted: faulted,
            xid_events: events,
            ..Default::default()
        };
        // Serve with the time-weighted number of serving GPUs, report the count at the end.
        out.n_serving = serving_before + d.running_after;
        fill_serving(&mut out, g, &self.served, target.cap_w, w, inlet_c, dt_ms);
        out.n_serving = self.serving;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_model::Catalogue;

    fn sxm() -> GpuModel {
        Catalogue::default().gpus[0].clone()
    }

    /// economics.md section 3: about 420-430 W at 92 % utilisation serving Llama-3-8B; idle about
    /// 70-75 W without a model and about 115 W with one loaded.
    #[test]
    fn reproduces_the_measured_h100_points() {
        let g = sxm();
        assert!((70.0..=75.0).contains(&g.idle_w));
        assert_eq!(board_power_w(&g, 700.0, 0.0, 1.0), 115.0);
        let p = board_power_w(&g, 700.0, 0.92, 1.0);
        assert!((420.0..=430.0).contains(&p), "{p}");
        // End to end: one request per second of Llama-3-8B with 1,000 prompt and 400 output tokens.
        let s = ServedModel::llama3_8b();
        let op = operating_point(
            &g,
            &s,
            700.0,
            &Workload { rate_rps: 1.0, prompt_tokens: 1000.0, output_tokens: 400.0 },
            25.0,
        );
        assert!((0.88..=0.95).contains(&op.utilisation), "util {}", op.utilisation);
        assert!((405.0..=445.0).contains(&op.board_w), "power {}", op.board_w);
        assert!((0.004..=0.010).contains(&op.tpot_s), "tpot {}", op.tpot_s);
        assert!(op.ttft_s < 0.1, "ttft {}", op.ttft_s);
    }

    /// Llama-3-8B on one H100 SXM: ~56 GB of KV cache next to 16 GB of weights (~430,000 tokens),
    /// so at a 1,200-token mean context about 256 sequences (the batch ceiling); a deep cap leaves
    /// fewer, full power all of them, and a cap never adds any.
    #[test]
    fn replica_capacity_follows_memory_and_the_cap() {
        let g = sxm();
        let s = ServedModel::llama3_8b();
        let (full, kv) = replica_capacity(&g, &s, g.max_power_w, 1000.0, 400.0);
        assert!((400_000..=460_000).contains(&kv), "kv {kv}");
        assert_eq!(full, 256);
        let (capped, kv2) = replica_capacity(&g, &s, g.min_cap_w, 1000.0, 400.0);
        assert_eq!(kv2, kv, "memory does not depend on the cap");
        assert!(capped < full && capped >= 1, "{capped}");
        let mut last = 0;
        for w in [g.min_cap_w, 300.0, 400.0, 500.0, 600.0, g.max_power_w] {
            let (n, _) = replica_capacity(&g, &s, w, 1000.0, 400.0);
            assert!(n >= last, "monotone in the cap: {n} at {w} W");
            last = n;
        }
    }

    #[test]
    fn a_sequence_slows_with_the_cap_and_the_batch() {
        let g = sxm();
        let s = ServedModel::llama3_8b();
        let (ttft, tpot) = sequence_timing(&g, &s, g.max_power_w, 1.0, 1000.0, 400.0);
        assert!((0.005..0.2).contains(&ttft) && (0.003..0.05).contains(&tpot), "{ttft} {tpot}");
        let (ttft_c, tpot_c) = sequence_timing(&g, &s, g.min_cap_w, 64.0, 1000.0, 400.0);
        assert!(ttft_c > ttft && tpot_c > tpot, "{ttft_c} {tpot_c}");
    }

    #[test]
    fn serving_power_range_and_caps() {
        let g = sxm();
        let s = ServedModel::llama3_8b();
        let busy = Workload { rate_rps: 20.0, prompt_tokens: 1000.0, output_tokens: 400.0 };
        let op = operating_point(&g, &s, 700.0, &busy, 25.0);
        assert!((400.0..=700.0).contains(&op.board_w), "{}", op.board_w);
        let capped = operating_point(&g, &s, 300.0, &busy, 25.0);
        assert!(capped.board_w <= 300.0 + 1e-9);
        assert!(capped.clock < 1.0);
        // Decode-heavy work loses far less throughput than power (POLCA).
        let tput_loss = 1.0 - capped.output_tokens_per_s / op.output_tokens_per_s.max(1e-9);
        let power_loss = 1.0 - capped.board_w / op.board_w;
        assert!(tput_loss < power_loss, "{tput_loss} vs {power_loss}");
        // More batch, more throughput.
        let light = operating_point(&g, &s, 700.0, &Workload { rate_rps: 2.0, ..busy }, 25.0);
        assert!(op.output_tokens_per_s > light.output_tokens_per_s);
        assert!(op.memory_gb > light.memory_gb && op.memory_gb <= 80.0);
    }

    #[test]
    fn saturation_caps_throughput() {
        let g = Catalogue::default().gpus[1].clone();
        let s = ServedModel::llama3_8b();
        let op = operating_point(
            &g,
            &s,
            350.0,
            &Workload { rate_rps: 500.0, prompt_tokens: 2000.0, output_tokens: 500.0 },
            25.0,
        );
        assert!(op.served_rps < 500.0 && op.ttft_s.is_infinite());
    }

    #[test]
    fn xid_faults_take_gpus_out_and_back() {
        let rel = Reliability { gpu_xid_per_day: 20.0, ..Default::default() };
        let t = GpuTarget { serving: 100, cap_w: 700.0, idle_off: false };
        let w = Workload { rate_rps: 100.0, prompt_tokens: 500.0, output_tokens: 200.0 };
        let mut d = GpuDevices::new(sxm(), ServedModel::llama3_8b(), &rel, 100, &t, rng::stream(3, "g", 0));
        let mut events = 0.0;
        for i in 0..360 {
            events += d.step(i * 10_000, 10_000, &t, &w, 25.0).xid_events;
        }
        // 100 GPUs x 20/day x 1 h = 83 expected.
        assert!((50.0..120.0).contains(&events), "{events}");
    }
}
