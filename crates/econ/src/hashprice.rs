//! Hashprice: expected revenue per unit of hashrate per day.
//!
//! blocks_per_day = 86_400 * H / (D * 2^32); hashprice per PH/s per day =
//! 86_400 * 1e15 / (D * 2^32) * (subsidy + fees) * btc_usd.

use hcp_model::AsicModel;

const TWO_POW_32: f64 = 4_294_967_296.0;

/// Block subsidy at a height: 50 BTC halving every 210,000 blocks (3.125 BTC from 840,000).
pub fn subsidy_btc(height: u64) -> f64 {
    let halvings = height / 210_000;
    if halvings >= 64 { 0.0 } else { 50.0 / (1u64 << halvings) as f64 }
}

/// Expected BTC per day earned by `hashrate_ths` at `difficulty`, with `reward_btc` per block
/// (subsidy plus mean fees).
pub fn btc_per_day(hashrate_ths: f64, difficulty: f64, reward_btc: f64) -> f64 {
    86_400.0 * hashrate_ths * 1e12 / (difficulty * TWO_POW_32) * reward_btc
}

/// Hashprice in BTC per PH/s per day.
pub fn hashprice_btc_per_ph_day(difficulty: f64, subsidy_btc: f64, fees_btc_per_block: f64) -> f64 {
    btc_per_day(1_000.0, difficulty, subsidy_btc + fees_btc_per_block)
}

/// Hashprice in USD per PH/s per day.
pub fn hashprice_usd_per_ph_day(difficulty: f64, subsidy_btc: f64, fees_btc_per_block: f64, btc_usd: f64) -> f64 {
    hashprice_btc_per_ph_day(difficulty, subsidy_btc, fees_btc_per_block) * btc_usd
}

/// Network hashrate (H/s) implied by a difficulty at 600 s blocks.
pub fn network_hashrate_hs(difficulty: f64) -> f64 {
    difficulty * TWO_POW_32 / 600.0
}

/// Power price (USD/MWh) at which a machine of `j_per_th` breaks even at a hashprice.
/// A device of E J/TH draws E W per TH/s, i.e. 0.024 * E kWh per TH per day.
pub fn breakeven_usd_per_mwh(hashprice_usd_per_ph_day: f64, j_per_th: f64) -> f64 {
    let usd_per_th_day = hashprice_usd_per_ph_day / 1_000.0;
    usd_per_th_day / (j_per_th * 0.024) * 1_000.0
}

/// Mining revenue per MWh drawn by a model at nameplate.
pub fn model_breakeven_usd_per_mwh(model: &AsicModel, hashprice_usd_per_ph_day: f64) -> f64 {
    breakeven_usd_per_mwh(hashprice_usd_per_ph_day, model.j_per_th())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ViaBTC's shutdown-price worked case: S19 at 95 TH/s and 3,250 W, difficulty 17.62 T, subsidy
    /// 6.25 BTC, fees 1.3 % of subsidy, power 0.077 USD/kWh: 0.00068685 BTC/day, shutdown BTC
    /// price 8,744.27 USD, both within 0.05 %.
    #[test]
    fn reproduces_the_viabtc_worked_case() {
        let reward = 6.25 * 1.013;
        let btc = btc_per_day(95.0, 17.62e12, reward);
        assert!((btc / 0.000_686_85 - 1.0).abs() < 0.0005, "{btc}");
        let cost_usd_per_day = 3.25 * 24.0 * 0.077;
        let shutdown = cost_usd_per_day / btc;
        assert!((shutdown / 8_744.27 - 1.0).abs() < 0.0005, "{shutdown}");
    }

    #[test]
    fn late_2025_hashprice_is_about_38() {
        // economics.md: about 38.2 USD/PH/day with BTC about 91k and difficulty about 152 T.
        let hp = hashprice_usd_per_ph_day(152e12, 3.125, 0.03, 91_000.0);
        assert!((hp - 38.2).abs() < 1.0, "{hp}");
        assert!((network_hashrate_hs(152e12) / 1e21 - 1.09).abs() < 0.01);
    }

    #[test]
    fn subsidy_halvings() {
        assert_eq!(subsidy_btc(0), 50.0);
        assert_eq!(subsidy_btc(839_999), 6.25);
        assert_eq!(subsidy_btc(840_000), 3.125);
        assert_eq!(subsidy_btc(1_050_000), 1.5625);
        assert_eq!(subsidy_btc(u64::MAX), 0.0);
    }

    #[test]
    fn breakeven_matches_the_reference_range() {
        // At 40-55 USD/PH/day an ASIC earns about 75-170 USD per MWh (economics.md section 4).
        let s19xp = breakeven_usd_per_mwh(40.0, 21.5);
        let s21xp = breakeven_usd_per_mwh(55.0, 13.5);
        assert!((70.0..80.0).contains(&s19xp), "{s19xp}");
        assert!((165.0..175.0).contains(&s21xp), "{s21xp}");
    }
}
