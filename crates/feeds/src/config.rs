//! The feeds of live mode, from a TOML file (`hcp up --live --feeds FILE`; docs/feeds.md).
//! Every field has a default except where said; an unknown field, or a value out of its range,
//! is refused with the field named. Credentials come from the environment or from files, never
//! from this file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::FeedError;

/// Why a feeds file was refused: the field and the rule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct ConfigError {
    pub field: String,
    pub rule: String,
}

fn err(field: &str, rule: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), rule: rule.into() }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedsConfig {
    pub ercot: Option<ErcotConfig>,
    pub market: Option<MarketConfig>,
    #[serde(default)]
    pub replay: Vec<ReplayConfig>,
    pub gpu_price: Option<GpuPriceConfig>,
}

/// ERCOT's public data API.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ErcotConfig {
    /// The signals' source name.
    pub name: String,
    pub base_url: String,
    pub token_url: String,
    /// The API's B2C client id (ERCOT's public one by default).
    pub client_id: String,
    /// Points to ask for; empty: the fleet's settlement points.
    pub settlement_points: Vec<String>,
    /// Seconds between polls.
    pub poll_s: u64,
    /// Seconds between asks of the day-ahead report.
    pub day_ahead_poll_s: u64,
    /// Seconds a request may take.
    pub timeout_s: u64,
    pub real_time_15: bool,
    pub sced_5: bool,
    pub day_ahead: bool,
    /// Environment variables (or, with `_FILE` appended, files) holding the API account's
    /// username, password and subscription key. None set: requests go without credentials.
    pub username_env: String,
    pub password_env: String,
    pub subscription_key_env: String,
}

impl Default for ErcotConfig {
    fn default() -> Self {
        ErcotConfig {
            name: "ercot".into(),
            base_url: "https://api.ercot.com/api/public-reports".into(),
            token_url:
                "https://ercotb2c.b2clogin.com/ercotb2c.onmicrosoft.com/B2C_1_PUBAPI-ROPC-FLOW/oauth2/v2.0/token".into(),
            client_id: "fec253ea-0d06-4272-a5e6-b478baeecd70".into(),
            settlement_points: vec![],
            poll_s: 60,
            day_ahead_poll_s: 900,
            timeout_s: 20,
            real_time_15: true,
            sced_5: true,
            day_ahead: true,
            username_env: "ERCOT_API_USERNAME".into(),
            password_env: "ERCOT_API_PASSWORD".into(),
            subscription_key_env: "ERCOT_API_SUBSCRIPTION_KEY".into(),
        }
    }
}

/// The API account's credentials.
#[derive(Clone)]
pub struct ErcotCredentials {
    pub username: String,
    pub password: String,
    pub subscription_key: String,
}

/// A secret from `NAME` in the environment, or from the file named by `NAME_FILE`.
fn secret(name: &str) -> Result<Option<String>, FeedError> {
    if let Ok(v) = std::env::var(name) {
        return Ok(Some(v.trim().to_string()));
    }
    match std::env::var(format!("{name}_FILE")) {
        Ok(path) => std::fs::read_to_string(&path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| FeedError::Credentials(format!("{name}_FILE={path}: {e}"))),
        Err(_) => Ok(None),
    }
}

impl ErcotConfig {
    /// All three credentials, or none; some without the others is an error naming the missing.
    pub fn credentials(&self) -> Result<Option<ErcotCredentials>, FeedError> {
        let u = secret(&self.username_env)?;
        let p = secret(&self.password_env)?;
        let k = secret(&self.subscription_key_env)?;
        match (u, p, k) {
            (Some(username), Some(password), Some(subscription_key)) => {
                Ok(Some(ErcotCredentials { username, password, subscription_key }))
            }
            (None, None, None) => Ok(None),
            (u, p, _) => {
                let missing = if u.is_none() {
                    &self.username_env
                } else if p.is_none() {
                    &self.password_env
                } else {
                    &self.subscription_key_env
                };
                Err(FeedError::Credentials(format!("{missing} (or {missing}_FILE) is not set, the others are")))
            }
        }
    }
}

/// A BTC market feed with mempool.space's API.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MarketConfig {
    pub name: String,
    pub base_url: String,
    pub poll_s: u64,
    pub timeout_s: u64,
}

impl Default for MarketConfig {
    fn default() -> Self {
        MarketConfig { name: "mempool".into(), base_url: "https://mempool.space".into(), poll_s: 300, timeout_s: 20 }
    }
}

/// A recorded series replayed on the clock: the series' week that holds `from` is laid on the
/// current week (same weekday and time of day), and each value is published when it would have
/// been known. Grid (the layout of shared/data/ercot) and/or market (shared/data/bitcoin).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub grid: Option<PathBuf>,
    pub market: Option<PathBuf>,
    /// Where the replay starts in the series (`2024-06-03`); default its first day.
    pub from: Option<String>,
    /// Publish the file's only settlement point as these (a fleet's points), when its names
    /// differ from the fleet's.
    #[serde(default)]
    pub as_points: Vec<String>,
    /// Seconds between publications.
    pub poll_s: Option<u64>,
}

/// A fixed GPU price (a contract), published at start and every hour.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuPriceConfig {
    pub usd_per_gpu_hour: f64,
    #[serde(default = "contract")]
    pub name: String,
}

fn contract() -> String {
    "contract".into()
}

impl FeedsConfig {
    /// Parses and checks a feeds file.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: FeedsConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            // toml names the key in its message; the span tells the line.
            err("feeds", msg)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = |f: &str, u: &str| {
            if u.starts_with("http://") || u.starts_with("https://") {
                Ok(())
            } else {
                Err(err(f, format!("must be an http:// or https:// URL, not {u:?}")))
            }
        };
        let secs = |f: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) { Ok(()) } else { Err(err(f, format!("must be {lo} to {hi} seconds, not {v}"))) }
        };
        if let Some(e) = &self.ercot {
            url("ercot.base_url", &e.base_url)?;
            url("ercot.token_url", &e.token_url)?;
            secs("ercot.poll_s", e.poll_s, 1, 3600)?;
            secs("ercot.day_ahead_poll_s", e.day_ahead_poll_s, 1, 86_400)?;
            secs("ercot.timeout_s", e.timeout_s, 1, 300)?;
            if !(e.real_time_15 || e.sced_5 || e.day_ahead) {
                return Err(err("ercot", "asks for no report: enable real_time_15, sced_5 or day_ahead"));
            }
        }
        if let Some(m) = &self.market {
            url("market.base_url", &m.base_url)?;
            secs("market.poll_s", m.poll_s, 1, 86_400)?;
            secs("market.timeout_s", m.timeout_s, 1, 300)?;
        }
        for (i, r) in self.replay.iter().enumerate() {
            if r.grid.is_none() && r.market.is_none() {
                return Err(err(&format!("replay[{i}]"), "needs grid or market (a CSV file)"));
            }
            if let Some(f) = &r.from {
                hcp_model::SimTime::parse(f).map_err(|e| err(&format!("replay[{i}].from"), e.to_string()))?;
            }
            if let Some(p) = r.poll_s {
                secs(&format!("replay[{i}].poll_s"), p, 1, 3600)?;
            }
        }
        if let Some(g) = &self.gpu_price
            && !(g.usd_per_gpu_hour.is_finite() && (0.0..=1_000.0).contains(&g.usd_per_gpu_hour))
        {
            return Err(err("gpu_price.usd_per_gpu_hour", "must be 0 to 1000 USD per GPU-hour"));
        }
        Ok(())
    }

    /// What can be checked before the start: the replay files load (their errors name the file,
    /// line and column), and each ERCOT credential is set with the others or not at all.
    pub fn check(&self) -> Result<(), ConfigError> {
        for (i, r) in self.replay.iter().enumerate() {
            crate::replay::ReplayFeed::new(r, hcp_model::SimTime(0))
                .map_err(|e| err(&format!("replay[{i}]"), e.to_string()))?;
        }
        if let Some(e) = &self.ercot {
            e.credentials().map_err(|x| err("ercot", x.to_string()))?;
        }
        Ok(())
    }

    /// Whether any feed is configured.
    pub fn is_empty(&self) -> bool {
        self.ercot.is_none() && self.market.is_none() && self.replay.is_empty() && self.gpu_price.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feeds_file_with_defaults_and_refusals_naming_the_field() {
        let c = FeedsConfig::from_toml("[ercot]\nsettlement_points = [\"HB_SOUTH\"]\n[market]\n").unwrap();
        let e = c.ercot.unwrap();
        assert_eq!(e.poll_s, 60);
        assert!(e.base_url.starts_with("https://api.ercot.com"));
        assert_eq!(c.market.unwrap().base_url, "https://mempool.space");
        let bad = |t: &str| FeedsConfig::from_toml(t).unwrap_err().to_string();
        assert_eq!(bad("[ercot]\npoll_s = 0\n"), "ercot.poll_s: must be 1 to 3600 seconds, not 0");
        assert!(bad("[ercot]\npol_s = 5\n").contains("pol_s"), "{}", bad("[ercot]\npol_s = 5\n"));
        assert_eq!(bad("[market]\nbase_url = \"mempool.space\"\n").split(':').next(), Some("market.base_url"));
        assert_eq!(bad("[[replay]]\n"), "replay[0]: needs grid or market (a CSV file)");
        assert!(bad("[gpu_price]\nusd_per_gpu_hour = -1\n").starts_with("gpu_price.usd_per_gpu_hour"));
    }
}
