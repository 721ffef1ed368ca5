//! Market simulator: BTC price (jump diffusion), network hashrate growth, block arrivals with
//! difficulty retargeting every 2,016 blocks, fees per block, hashprice by the formula in
//! economics.md (fees averaged over the last 144 blocks, as Luxor does), and a GPU rental price.

use std::collections::VecDeque;

use hcp_econ::{hashprice_usd_per_ph_day, network_hashrate_hs, subsidy_btc};
use hcp_model::signals::MarketSignal;
use hcp_model::time::SimTime;

use crate::rng::{self, Rng};

const YEAR_MS: f64 = 365.25 * 86_400_000.0;
pub const RETARGET_BLOCKS: u64 = 2_016;
pub const TARGET_BLOCK_S: f64 = 600.0;
const FEE_WINDOW: usize = 144;

#[derive(Clone, Debug, PartialEq)]
pub struct MarketParams {
    pub btc_usd: f64,
    /// Drift of log price per year, volatility per sqrt(year); Merton jumps per year with normal
    /// log sizes.
    pub btc_drift_per_year: f64,
    pub btc_vol_per_sqrt_year: f64,
    pub btc_jumps_per_year: f64,
    pub btc_jump_mean: f64,
    pub btc_jump_sd: f64,
    pub difficulty: f64,
    pub block_height: u64,
    /// Growth of network hashrate per year (log), and its volatility per sqrt(year).
    pub hashrate_growth_per_year: f64,
    pub hashrate_vol_per_sqrt_year: f64,
    /// Fees per block: lognormal median and log standard deviation.
    pub fees_median_btc: f64,
    pub fees_log_sd: f64,
    /// GPU rental (USD per GPU-hour): start, long-run mean, reversion rate per year, log volatility.
    pub gpu_rental_usd: f64,
    pub gpu_rental_mean_usd: f64,
    pub gpu_rental_reversion_per_year: f64,
    pub gpu_rental_vol_per_sqrt_year: f64,
}

impl Default for MarketParams {
    /// Late 2025 (economics.md section 1): BTC about 91k, difficulty about 152 T, hashprice
    /// about 38 USD/PH/day; GPU rental about 2.2 USD/h.
    fn default() -> Self {
        MarketParams {
            btc_usd: 91_000.0,
            btc_drift_per_year: 0.0,
            btc_vol_per_sqrt_year: 0.45,
            btc_jumps_per_year: 8.0,
            btc_jump_mean: -0.01,
            btc_jump_sd: 0.06,
            difficulty: 152e12,
            block_height: 925_000,
            hashrate_growth_per_year: 0.35,
            hashrate_vol_per_sqrt_year: 0.10,
            fees_median_btc: 0.025,
            fees_log_sd: 0.5,
            gpu_rental_usd: 2.2,
            gpu_rental_mean_usd: 2.2,
            gpu_rental_reversion_per_year: 2.0,
            gpu_rental_vol_per_sqrt_year: 0.3,
        }
    }
}

/// The market state, stepped on simulated time.
pub struct MarketSim {
    p: MarketParams,
    now: SimTime,
    ln_btc: f64,
    /// Network hashrate in H/s.
    hashrate_hs: f64,
    difficulty: f64,
    height: u64,
    last_retarget: SimTime,
    fees: VecDeque<f64>,
    ln_gpu: f64,
    rng: Rng,
    /// Number of retargets so far.
    pub retargets: u32,
}

impl MarketSim {
    pub fn new(p: MarketParams, start: SimTime, seed: u64) -> Self {
        let mut rng = rng::stream(seed, "market", 0);
        let since = (p.block_height % RETARGET_BLOCKS) as f64 * TARGET_BLOCK_S * 1e3;
        let fees = (0..FEE_WINDOW).map(|_| p.fees_median_btc * (p.fees_log_sd * rng::normal(&mut rng)).exp()).collect();
        MarketSim {
            now: start,
            ln_btc: p.btc_usd.ln(),
            hashrate_hs: network_hashrate_hs(p.difficulty),
            difficulty: p.difficulty,
            height: p.block_height,
            last_retarget: start.plus_ms(-(since as i64)),
            fees,
            ln_gpu: p.gpu_rental_usd.ln(),
            rng,
            retargets: 0,
            p,
        }
    }

    pub fn signal(&self) -> MarketSignal {
        let fees = self.fees.iter().sum::<f64>() / self.fees.len() as f64;
        let subsidy = subsidy_btc(self.height);
        let btc = self.ln_btc.exp();
        MarketSignal {
            at: self.now,
            btc_usd: btc,
            difficulty: self.difficulty,
            block_height: self.height,
            subsidy_btc: subsidy,
            fees_btc_per_block: fees,
            network_hashrate_ehs: self.hashrate_hs / 1e18,
            hashprice_usd_per_ph_day: hashprice_usd_per_ph_day(self.difficulty, subsidy, fees, btc),
            gpu_rental_usd_per_gpu_hour: self.ln_gpu.exp(),
        }
    }

    /// Advances by `dt_ms` and returns the state at the end.
    pub fn step(&mut self, dt_ms: i64) -> MarketSignal {
        let p = &self.p;
        let dt_y = dt_ms as f64 / YEAR_MS;
        let r = &mut self.rng;
        let vol = p.btc_vol_per_sqrt_year;
        self.ln_btc += (p.btc_drift_per_year - 0.5 * vol * vol) * dt_y + vol * dt_y.sqrt() * rng::normal(r);
        let jumps = rng::poisson(r, p.btc_jumps_per_year * dt_y);
        for _ in 0..jumps as u32 {
            self.ln_btc += p.btc_jump_mean + p.btc_jump_sd * rng::normal(r);
        }
        let hv = p.hashrate_vol_per_sqrt_year;
        self.hashrate_hs *=
            ((p.hashrate_growth_per_year - 0.5 * hv * hv) * dt_y + hv * dt_y.sqrt() * rng::normal(r)).exp();
        let gv = p.gpu_rental_vol_per_sqrt_year;
        self.ln_gpu += p.gpu_rental_reversion_per_year * (p.gpu_rental_mean_usd.ln() - self.ln_gpu) * dt_y
            + gv * dt_y.sqrt() * rng::normal(r);
        // Blocks found in the step, spread evenly through it.
        let expected = dt_ms as f64 / 1e3 * self.hashrate_hs / (self.difficulty * 4_294_967_296.0);
        let blocks = rng::poisson(r, expected) as u64;
        for k in 0..blocks {
            self.height += 1;
            self.fees.pop_front();
            self.fees.push_back(p.fees_median_btc * (p.fees_log_sd * rng::normal(r)).exp());
            if self.height.is_multiple_of(RETARGET_BLOCKS) {
                let at = self.now.plus_ms(dt_ms * (k as i64 + 1) / (blocks as i64 + 1));
                let took = (at.0 - self.last_retarget.0).max(1) as f64 / 1e3;
                let ratio = (RETARGET_BLOCKS as f64 * TARGET_BLOCK_S / took).clamp(0.25, 4.0);
                self.difficulty *= ratio;
                self.last_retarget = at;
                self.retargets += 1;
            }
        }
        self.now = self.now.plus_ms(dt_ms);
        self.signal()
    }

    /// One signal per interval over `[from, to)`, each the state at the interval's start.
    pub fn simulate(p: &MarketParams, from: SimTime, to: SimTime, interval_ms: i64, seed: u64) -> Vec<MarketSignal> {
        let mut m = MarketSim::new(p.clone(), from, seed);
        let n = ((to.0 - from.0) / interval_ms).max(0);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(m.signal());
            m.step(interval_ms);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_late_2025_hashprice() {
        let m = MarketSim::new(MarketParams::default(), SimTime::parse("2025-11-01").unwrap(), 1);
        let s = m.signal();
        assert!((s.hashprice_usd_per_ph_day - 38.2).abs() < 2.0, "{}", s.hashprice_usd_per_ph_day);
        assert!((0.9..1.2).contains(&(s.network_hashrate_ehs / 1000.0)));
    }

    #[test]
    fn retargeting_holds_ten_minute_blocks_while_hashrate_grows() {
        let p = MarketParams::default();
        let from = SimTime::parse("2025-01-01").unwrap();
        let mut m = MarketSim::new(p.clone(), from, 7);
        let h0 = m.height;
        let dt = 15 * 60_000;
        let steps = 4 * 24 * 365;
        let mut first = None;
        for _ in 0..steps {
            let s = m.step(dt);
            first.get_or_insert(s);
        }
        let s = m.signal();
        let blocks = (s.block_height - h0) as f64;
        let mean_block_s = steps as f64 * dt as f64 / 1e3 / blocks;
        // Difficulty lags growth by up to one epoch: blocks come a little faster than 600 s.
        assert!((540.0..600.0).contains(&mean_block_s), "{mean_block_s}");
        assert!(m.retargets >= 25 && m.retargets <= 28, "{}", m.retargets);
        assert!(s.difficulty > p.difficulty * 1.2, "difficulty follows hashrate growth");
        // Hashprice = formula of the current state.
        let hp = hashprice_usd_per_ph_day(s.difficulty, s.subsidy_btc, s.fees_btc_per_block, s.btc_usd);
        assert_eq!(hp, s.hashprice_usd_per_ph_day);
    }

    #[test]
    fn btc_volatility_is_as_configured() {
        let p = MarketParams { btc_jumps_per_year: 0.0, ..Default::default() };
        let from = SimTime::parse("2025-01-01").unwrap();
        let s = MarketSim::simulate(&p, from, from.plus_ms(4 * 365 * 86_400_000), 86_400_000, 3);
        let r: Vec<f64> = s.windows(2).map(|w| (w[1].btc_usd / w[0].btc_usd).ln()).collect();
        let m = r.iter().sum::<f64>() / r.len() as f64;
        let sd = (r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
        let annual = sd * 365.25f64.sqrt();
        assert!((annual / p.btc_vol_per_sqrt_year - 1.0).abs() < 0.1, "{annual}");
        assert!(s.iter().all(|x| (0.5..10.0).contains(&x.gpu_rental_usd_per_gpu_hour)));
    }
}
