//! Small statistics helpers used to fit and check the simulators.

/// Quantile by linear interpolation between closest ranks; `q` in [0, 1]. NaN for empty input.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, q)
}

pub fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

/// The figures the grid calibration compares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriceStats {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    pub negative_share: f64,
    /// Intervals above 1,000 USD/MWh per 30 days.
    pub spikes_over_1000_per_month: f64,
}

impl PriceStats {
    pub fn of(prices: &[f64], interval_ms: i64) -> PriceStats {
        let mut v = prices.to_vec();
        v.sort_by(f64::total_cmp);
        let months = prices.len() as f64 * interval_ms as f64 / (30.0 * 86_400_000.0);
        PriceStats {
            mean: mean(&v),
            median: quantile_sorted(&v, 0.5),
            p99: quantile_sorted(&v, 0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
            negative_share: v.iter().filter(|&&p| p < 0.0).count() as f64 / v.len().max(1) as f64,
            spikes_over_1000_per_month: v.iter().filter(|&&p| p > 1_000.0).count() as f64 / months.max(1e-9),
        }
    }
}
