//! Inference demand: request arrivals with a diurnal shape, weekly dip and bursts (a Markov-
//! modulated Poisson process), request sizes lognormal; parameters fitted from a recorded trace or
//! default. A recorded trace replays as an arrival series through [`TraceDemand`].

use hcp_model::signals::{DemandSignal, Request};
use hcp_model::time::{MS_PER_DAY, MS_PER_MIN, SimTime};

use crate::rng::{self, Rng};
use crate::stats::{mean, quantile};

#[derive(Clone, Debug, PartialEq)]
pub struct DemandParams {
    /// Mean arrivals per second per GPU of serving capacity (scaled by the caller).
    pub rps_per_gpu: f64,
    /// Daily swing: rate * (1 + amplitude * cos(2 pi (hour - peak_hour) / 24)).
    pub diurnal_amplitude: f64,
    pub peak_hour: f64,
    /// Weekend rate relative to weekdays.
    pub weekend_factor: f64,
    /// Bursts: onsets per day, mean length in minutes, rate multiplier.
    pub bursts_per_day: f64,
    pub burst_mean_min: f64,
    pub burst_factor: f64,
    /// Lognormal sizes: median and log standard deviation of prompt and output tokens.
    pub prompt_median: f64,
    pub prompt_log_sd: f64,
    pub output_median: f64,
    pub output_log_sd: f64,
}

impl Default for DemandParams {
    fn default() -> Self {
        DemandParams {
            rps_per_gpu: 1.0,
            diurnal_amplitude: 0.35,
            peak_hour: 14.0,
            weekend_factor: 0.8,
            bursts_per_day: 6.0,
            burst_mean_min: 5.0,
            burst_factor: 2.5,
            prompt_median: 1_000.0,
            prompt_log_sd: 1.0,
            output_median: 250.0,
            output_log_sd: 0.8,
        }
    }
}

impl DemandParams {
    /// Fits request sizes and the mean rate (per `gpus`) from a trace; shape parameters keep
    /// their defaults unless the trace spans days.
    pub fn fit(trace: &[Request], gpus: f64) -> DemandParams {
        let mut p = DemandParams::default();
        if trace.len() < 2 {
            return p;
        }
        let span_s = trace[trace.len() - 1].at.secs_since(trace[0].at).max(1.0);
        p.rps_per_gpu = trace.len() as f64 / span_s / gpus.max(1.0);
        let lp: Vec<f64> = trace.iter().map(|r| f64::from(r.prompt_tokens.max(1)).ln()).collect();
        let lo: Vec<f64> = trace.iter().map(|r| f64::from(r.output_tokens.max(1)).ln()).collect();
        let sd = |v: &[f64]| {
            let m = mean(v);
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        p.prompt_median = quantile(&lp, 0.5).exp();
        p.prompt_log_sd = sd(&lp);
        p.output_median = quantile(&lo, 0.5).exp();
        p.output_log_sd = sd(&lo);
        p
    }

    pub fn mean_prompt(&self) -> f64 {
        self.prompt_median * (self.prompt_log_sd.powi(2) / 2.0).exp()
    }

    pub fn mean_output(&self) -> f64 {
        self.output_median * (self.output_log_sd.powi(2) / 2.0).exp()
    }

    /// The deterministic part of the rate at `t`, per GPU.
    pub fn shape(&self, t: SimTime) -> f64 {
        let c = t.civil();
        let daily =
            1.0 + self.diurnal_amplitude * (std::f64::consts::TAU * (t.hour_of_day() - self.peak_hour) / 24.0).cos();
        let weekly = if c.weekday >= 5 { self.weekend_factor } else { 1.0 };
        self.rps_per_gpu * daily * weekly
    }
}

/// Demand for one site: `gpus` scales the per-GPU rate.
pub struct DemandSim {
    pub params: DemandParams,
    gpus: f64,
    rng: Rng,
    burst_until: i64,
    next_minute: i64,
}

impl DemandSim {
    pub fn new(params: DemandParams, gpus: f64, seed: u64, site: u64) -> Self {
        DemandSim { params, gpus, rng: rng::stream(seed, "demand", site), burst_until: i64::MIN, next_minute: i64::MIN }
    }

    fn update_burst(&mut self, now: SimTime) {
        // Burst onsets are checked once per simulated minute.
        if self.next_minute == i64::MIN {
            self.next_minute = now.0;
        }
        while self.next_minute <= now.0 {
            let p = self.params.bursts_per_day * MS_PER_MIN as f64 / MS_PER_DAY as f64;
            if self.next_minute >= self.burst_until && rng::unit(&mut self.rng) < p {
                let len = rng::exp_mean(&mut self.rng, self.params.burst_mean_min * MS_PER_MIN as f64);
                self.burst_until = self.next_minute + len as i64;
            }
            self.next_minute += MS_PER_MIN;
        }
    }

    /// Offered arrival rate (requests/s) at `now` for the whole site.
    pub fn rate_rps(&mut self, now: SimTime) -> f64 {
        self.update_burst(now);
        let burst = if now.0 < self.burst_until { self.params.burst_factor } else { 1.0 };
        self.params.shape(now) * self.gpus * burst
    }

    /// Aggregated arrivals over `[now, now + dt)`.
    pub fn step(&mut self, now: SimTime, dt_ms: i64) -> DemandSignal {
        let lambda = self.rate_rps(now) * dt_ms as f64 / 1e3;
        let n = rng::poisson(&mut self.rng, lambda);
        // Sums of lognormal sizes: exact draws for small counts, normal approximation above.
        let (mp, mo) = (self.params.mean_prompt(), self.params.mean_output());
        let (prompt, output) = if n < 64.0 {
            let mut a = (0.0, 0.0);
            for _ in 0..n as u32 {
                let r = self.draw_sizes();
                a.0 += r.0;
                a.1 += r.1;
            }
            a
        } else {
            let var = |m: f64, s: f64| ((s * s).exp() - 1.0) * m * m;
            let sp = (n * var(mp, self.params.prompt_log_sd)).sqrt();
            let so = (n * var(mo, self.params.output_log_sd)).sqrt();
            ((n * mp + sp * rng::normal(&mut self.rng)).max(0.0), (n * mo + so * rng::normal(&mut self.rng)).max(0.0))
        };
        DemandSignal { requests: n as u64, prompt_tokens: prompt.round() as u64, output_tokens: output.round() as u64 }
    }

    fn draw_sizes(&mut self) -> (f64, f64) {
        let p = &self.params;
        let prompt = (p.prompt_median * (p.prompt_log_sd * rng::normal(&mut self.rng)).exp()).round().max(1.0);
        let output = (p.output_median * (p.output_log_sd * rng::normal(&mut self.rng)).exp()).round().max(1.0);
        (prompt, output)
    }

    /// Individual requests over `[now, now + dt)` (for the router), in arrival order.
    pub fn requests(&mut self, now: SimTime, dt_ms: i64) -> Vec<Request> {
        let lambda = self.rate_rps(now) * dt_ms as f64 / 1e3;
        let n = rng::poisson(&mut self.rng, lambda) as usize;
        let mut at: Vec<i64> = (0..n).map(|_| now.0 + (rng::unit(&mut self.rng) * dt_ms as f64) as i64).collect();
        at.sort_unstable();
        at.into_iter()
            .map(|t| {
                let (p, o) = self.draw_sizes();
                Request { at: SimTime(t), prompt_tokens: p as u32, output_tokens: o as u32 }
            })
            .collect()
    }
}

/// A recorded trace replayed as an arrival series: shifted to start at `start`, looped over its
/// own span (plus one mean gap), and thinned or replicated by `scale` (drawn per request with a seeded stream).
pub struct TraceDemand {
    trace: Vec<Request>,
    start: SimTime,
    span_ms: i64,
    scale: f64,
    rng: Rng,
}

impl TraceDemand {
    pub fn new(trace: Vec<Request>, start: SimTime, scale: f64, seed: u64, site: u64) -> Self {
        assert!(!trace.is_empty(), "a trace has at least one request (replay rejects empty files)");
        // The loop period is the span plus one mean gap, so the lap seam keeps the trace's rate.
        let n = trace.len() as i64;
        let span_ms = ((trace[trace.len() - 1].at.0 - trace[0].at.0) * n / (n - 1).max(1)).max(1_000);
        TraceDemand { trace, start, span_ms, scale, rng: rng::stream(seed, "trace", site) }
    }

    /// Requests over `[now, now + dt)`.
    pub fn requests(&mut self, now: SimTime, dt_ms: i64) -> Vec<Request> {
        let t0 = self.trace[0].at.0;
        let mut out = vec![];
        let mut from = now.0 - self.start.0;
        let to = from + dt_ms;
        while from < to {
            let lap = from.div_euclid(self.span_ms);
            let lo = t0 + from.rem_euclid(self.span_ms);
            let hi = t0 + (to - lap * self.span_ms).min(self.span_ms);
            let a = self.trace.partition_point(|r| r.at.0 < lo);
            let b = self.trace.partition_point(|r| r.at.0 < hi);
            for r in &self.trace[a..b] {
                let copies = self.scale.floor() + f64::from(rng::unit(&mut self.rng) < self.scale.fract());
                for _ in 0..copies as u32 {
                    out.push(Request { at: SimTime(self.start.0 + lap * self.span_ms + (r.at.0 - t0)), ..*r });
                }
            }
            from = (lap + 1) * self.span_ms;
        }
        out
    }

    pub fn step(&mut self, now: SimTime, dt_ms: i64) -> DemandSignal {
        let rs = self.requests(now, dt_ms);
        DemandSignal {
            requests: rs.len() as u64,
            prompt_tokens: rs.iter().map(|r| u64::from(r.prompt_tokens)).sum(),
            output_tokens: rs.iter().map(|r| u64::from(r.output_tokens)).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_the_daily_shape_and_bursts() {
        let p = DemandParams { bursts_per_day: 0.0, ..Default::default() };
        let mut d = DemandSim::new(p.clone(), 100.0, 1, 0);
        let day = SimTime::parse("2024-06-04").unwrap();
        let peak = d.rate_rps(day.plus_ms(14 * 3_600_000));
        let trough = d.rate_rps(day.plus_ms(2 * 3_600_000));
        assert!(peak > trough * 1.8, "{peak} {trough}");
        // Mean over a weekday is rps_per_gpu x gpus.
        let mut sum = DemandSignal::default();
        for m in 0..1440 {
            let s = d.step(day.plus_ms(m * 60_000), 60_000);
            sum.requests += s.requests;
            sum.output_tokens += s.output_tokens;
        }
        let rps = sum.requests as f64 / 86_400.0;
        assert!((rps / 100.0 - 1.0).abs() < 0.02, "{rps}");
        let mean_out = sum.output_tokens as f64 / sum.requests as f64;
        assert!((mean_out / p.mean_output() - 1.0).abs() < 0.03, "{mean_out}");
        let bursty = DemandParams { bursts_per_day: 200.0, ..p };
        let mut b = DemandSim::new(bursty, 100.0, 1, 0);
        let rates: Vec<f64> = (0..1440).map(|m| b.rate_rps(day.plus_ms(m * 60_000))).collect();
        assert!(rates.iter().any(|r| *r > 2.0 * 135.0), "bursts raise the rate");
    }

    #[test]
    fn trace_replays_shifted_and_looped() {
        let base = SimTime::parse("2023-11-16T18:00:00").unwrap();
        let trace: Vec<Request> =
            (0..10).map(|i| Request { at: base.plus_ms(i * 1000), prompt_tokens: 100, output_tokens: 10 }).collect();
        let start = SimTime::parse("2024-01-01").unwrap();
        let mut t = TraceDemand::new(trace.clone(), start, 1.0, 1, 0);
        let first = t.requests(start, 10_000);
        assert_eq!(first.len(), 10);
        assert_eq!(first[3].at, start.plus_ms(3000));
        // The next 10 s is the second lap.
        assert_eq!(t.requests(start.plus_ms(10_000), 10_000).len(), 10);
        let mut twice = TraceDemand::new(trace.clone(), start, 2.0, 1, 0);
        assert_eq!(twice.step(start, 30_000).requests, 60);
        let p = DemandParams::fit(&trace, 1.0);
        assert!((p.prompt_median - 100.0).abs() < 1e-6 && (p.rps_per_gpu - 10.0 / 9.0).abs() < 1e-9);
    }
}
