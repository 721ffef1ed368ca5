//! A BTC market feed from mempool.space's REST API (or any server with its API, such as a
//! self-hosted mempool instance):
//!
//! - `GET /api/v1/prices`: `{"time": <unix s>, "USD": <price>, ...}`
//! - `GET /api/v1/mining/hashrate/3d`: `{"hashrates": [...], "difficulty": [...],
//!   "currentHashrate": <H/s>, "currentDifficulty": <difficulty>}`
//! - `GET /api/v1/mining/reward-stats/144`: `{"startBlock", "endBlock", "totalReward", "totalFee",
//!   "totalTx"}`, amounts in satoshis (as strings or numbers)
//!
//! From them: the hashprice (USD per PH/s per day) with the subsidy at the tip's height and the
//! mean fees per block over the last 144 blocks (Luxor's convention), as the engine's market input.

use hcp_engine::io::Input;
use hcp_model::SimTime;
use hcp_model::signals::MarketSignal;
use serde_json::Value;

use crate::FeedError;
use crate::config::MarketConfig;

fn num(what: &str, v: &Value, field: &str) -> Result<f64, FeedError> {
    let x = v.get(field).ok_or_else(|| FeedError::malformed(what, field, "missing"))?;
    match x.as_f64().or_else(|| x.as_str().and_then(|s| s.trim().parse().ok())) {
        Some(n) if n.is_finite() => Ok(n),
        _ => Err(FeedError::malformed(what, field, "must be a number")),
    }
}

fn json(what: &str, body: &[u8]) -> Result<Value, FeedError> {
    serde_json::from_slice(body).map_err(|e| FeedError::malformed(what, "body", format!("not JSON: {e}")))
}

/// `/api/v1/prices`: the BTC price in USD.
pub fn parse_prices(body: &[u8]) -> Result<f64, FeedError> {
    let v = json("prices", body)?;
    let usd = num("prices", &v, "USD")?;
    if !(1.0..=1e8).contains(&usd) {
        return Err(FeedError::malformed("prices", "USD", format!("must be 1 to 1e8 USD, not {usd}")));
    }
    Ok(usd)
}

/// `/api/v1/mining/hashrate/3d`: the current difficulty.
pub fn parse_difficulty(body: &[u8]) -> Result<f64, FeedError> {
    let v = json("hashrate", body)?;
    let d = num("hashrate", &v, "currentDifficulty")?;
    if !(1.0..=1e18).contains(&d) {
        return Err(FeedError::malformed("hashrate", "currentDifficulty", format!("must be 1 to 1e18, not {d}")));
    }
    Ok(d)
}

/// `/api/v1/mining/reward-stats/N`: the tip's height and the mean fees per block (BTC).
pub fn parse_reward_stats(body: &[u8]) -> Result<(u64, f64), FeedError> {
    let v = json("reward-stats", body)?;
    let start = num("reward-stats", &v, "startBlock")?;
    let end = num("reward-stats", &v, "endBlock")?;
    if !(start >= 0.0 && end >= start && end < 1e8) {
        return Err(FeedError::malformed("reward-stats", "endBlock", "must be a height at or after startBlock"));
    }
    let fees_sat = num("reward-stats", &v, "totalFee")?;
    let blocks = end - start + 1.0;
    let per_block = fees_sat / 1e8 / blocks;
    if !(0.0..=100.0).contains(&per_block) {
        return Err(FeedError::malformed(
            "reward-stats",
            "totalFee",
            format!("gives {per_block} BTC of fees per block, outside 0 to 100"),
        ));
    }
    Ok((end as u64, per_block))
}

/// The market signal at `at` from what the three answers say.
pub fn market_signal(at: SimTime, btc_usd: f64, difficulty: f64, height: u64, fees_btc_per_block: f64) -> MarketSignal {
    let subsidy = hcp_econ::subsidy_btc(height);
    MarketSignal {
        at,
        btc_usd,
        difficulty,
        block_height: height,
        subsidy_btc: subsidy,
        fees_btc_per_block,
        network_hashrate_ehs: hcp_econ::network_hashrate_hs(difficulty) / 1e18,
        hashprice_usd_per_ph_day: hcp_econ::hashprice_usd_per_ph_day(difficulty, subsidy, fees_btc_per_block, btc_usd),
        gpu_rental_usd_per_gpu_hour: f64::NAN,
    }
}

pub struct MarketFeed {
    cfg: MarketConfig,
    client: reqwest::Client,
}

impl MarketFeed {
    pub fn new(cfg: MarketConfig) -> Result<Self, FeedError> {
        Ok(MarketFeed { client: crate::http_client(cfg.timeout_s)?, cfg })
    }

    pub fn poll_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cfg.poll_s)
    }

    /// One poll at market time `now`: the market signal.
    pub async fn poll(&mut self, now: SimTime) -> Result<Vec<Input>, FeedError> {
        let base = self.cfg.base_url.trim_end_matches('/');
        let get = |path: &str| {
            let url = format!("{base}{path}");
            let client = &self.client;
            let t = self.cfg.timeout_s;
            async move { crate::get(client, &url, &[], &[], t).await }
        };
        let btc = parse_prices(&get("/api/v1/prices").await?)?;
        let difficulty = parse_difficulty(&get("/api/v1/mining/hashrate/3d").await?)?;
        let (height, fees) = parse_reward_stats(&get("/api/v1/mining/reward-stats/144").await?)?;
        let signal = market_signal(now, btc, difficulty, height, fees);
        Ok(vec![Input::Market { signal, source: self.cfg.name.clone() }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/responses/mempool").join(name))
            .unwrap()
    }

    #[test]
    fn a_hashprice_from_price_difficulty_and_fees() {
        let btc = parse_prices(&recorded("prices.json")).unwrap();
        let d = parse_difficulty(&recorded("hashrate_3d.json")).unwrap();
        let (h, fees) = parse_reward_stats(&recorded("reward_stats_144.json")).unwrap();
        let m = market_signal(SimTime(0), btc, d, h, fees);
        assert_eq!(m.subsidy_btc, 3.125);
        // Hashprice = 86400 x 1e15 / (d x 2^32) x (subsidy + fees) x price.
        let expect = 86_400.0 * 1e15 / (d * 2f64.powi(32)) * (3.125 + fees) * btc;
        assert!((m.hashprice_usd_per_ph_day - expect).abs() < 1e-6 * expect, "{} {expect}", m.hashprice_usd_per_ph_day);
        assert!((20.0..200.0).contains(&m.hashprice_usd_per_ph_day), "{}", m.hashprice_usd_per_ph_day);
    }

    #[test]
    fn bad_answers_name_the_field() {
        assert_eq!(parse_prices(br#"{"time":1,"EUR":5}"#).unwrap_err().to_string(), "prices: USD: missing");
        assert!(parse_prices(br#"{"USD":-3}"#).unwrap_err().to_string().starts_with("prices: USD: must be 1 to"));
        assert!(parse_difficulty(b"oops").unwrap_err().to_string().starts_with("hashrate: body: not JSON"));
        let e = parse_reward_stats(br#"{"startBlock":10,"endBlock":153,"totalFee":"1e15"}"#).unwrap_err();
        assert!(e.to_string().starts_with("reward-stats: totalFee: gives"), "{e}");
    }
}
