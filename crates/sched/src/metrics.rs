//! The numbers the API exposes: per band and tenant, queue time, time to first token, tokens
//! served, share of service, preemptions with reasons; Jain's fairness index.

use crate::router::PreemptReason;

/// A histogram with power-of-two millisecond buckets (0, 1, 2-3, 4-7, ... ms).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_ms: f64,
}

impl Histogram {
    pub fn record(&mut self, ms: i64) {
        let ms = ms.max(0) as u64;
        let b = (64 - ms.leading_zeros()) as usize;
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_ms += ms as f64;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean_ms(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum_ms / self.count as f64 }
    }

    /// Upper edge of the bucket holding quantile `q` (so within a factor of two above).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            acc += n;
            if acc >= target {
                return if b == 0 { 0.0 } else { ((1u64 << b) - 1) as f64 };
            }
        }
        f64::INFINITY
    }
}

/// Counters of one tenant in one band.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantStats {
    pub dispatched: u64,
    pub completed: u64,
    pub preempted: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub queue_ms_sum: f64,
    pub ttft_ms_sum: f64,
    pub first_tokens: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BandStats {
    pub arrived: u64,
    pub rejected: u64,
    pub queue: Histogram,
    pub ttft: Histogram,
    pub preempted_shrink: u64,
    pub preempted_reclaim: u64,
}

/// Per-band figures; per-tenant ones live with each tenant (`Router::tenant_stats`).
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub bands: Vec<BandStats>,
}

impl TenantStats {
    /// Weighted tokens served (the VTC cost: input x1, output x2).
    pub fn service(&self) -> f64 {
        self.input_tokens as f64 + 2.0 * self.output_tokens as f64
    }
}

impl Metrics {
    pub fn new(bands: usize) -> Self {
        Metrics {
            bands: (0..bands)
                .map(|_| BandStats {
                    arrived: 0,
                    rejected: 0,
                    queue: Histogram::default(),
                    ttft: Histogram::default(),
                    preempted_shrink: 0,
                    preempted_reclaim: 0,
                })
                .collect(),
        }
    }

    pub(crate) fn arrived(&mut self, band: u8) {
        self.bands[usize::from(band)].arrived += 1;
    }

    pub(crate) fn rejected(&mut self, band: u8) {
        self.bands[usize::from(band)].rejected += 1;
    }

    pub(crate) fn dispatched(&mut self, band: u8, waited_ms: i64) {
        self.bands[usize::from(band)].queue.record(waited_ms);
    }

    pub(crate) fn first_token(&mut self, band: u8, ttft_ms: i64) {
        self.bands[usize::from(band)].ttft.record(ttft_ms);
    }

    pub(crate) fn preempted(&mut self, band: u8, why: &PreemptReason) {
        let b = &mut self.bands[usize::from(band)];
        match why {
            PreemptReason::CapacityShrink { .. } => b.preempted_shrink += 1,
            PreemptReason::QuotaReclaim { .. } => b.preempted_reclaim += 1,
        }
    }
}

/// Jain's fairness index: (sum x)^2 / (n sum x^2); 1.0 is perfectly fair. None for no tenants.
pub fn jain(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let s: f64 = xs.iter().sum();
    let s2: f64 = xs.iter().map(|x| x * x).sum();
    if s2 <= 0.0 { Some(1.0) } else { Some(s * s / (xs.len() as f64 * s2)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_and_histogram() {
        assert_eq!(jain(&[1.0, 1.0, 1.0]), Some(1.0));
        assert!((jain(&[1.0, 0.0]).unwrap() - 0.5).abs() < 1e-12);
        let mut h = Histogram::default();
        for ms in [0, 1, 3, 5, 100, 1000] {
            h.record(ms);
        }
        assert_eq!(h.count(), 6);
        assert_eq!(h.quantile_ms(0.5), 3.0);
        assert_eq!(h.quantile_ms(1.0), 1023.0);
    }
}
