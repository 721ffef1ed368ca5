//! The engine's tunables: one [`EngineConfig`], resolved once (defaults, then an optional TOML
//! file, then command-line overrides) and never changed after the engine is built.
//! docs/engine-config.md lists every field with its unit and default; a test keeps the two in step.

use hcp_econ::dispatch::{DispatchConfig, SafePolicy};
use hcp_fleet::ManagerConfig;

/// A config file or override was refused: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct ConfigError {
    pub field: String,
    pub rule: String,
}

fn bad(field: &str, rule: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), rule: rule.into() }
}

/// Every tunable of the control core. Units are in the field names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Decision interval (the market's settlement interval).
    pub interval_s: i64,
    /// Resource-manager tick: commands, retries, heartbeats.
    pub step_s: i64,
    /// Dead band against flapping.
    pub hysteresis_usd_per_mwh: f64,
    /// Fixed charges added to the energy price when deciding and costing.
    pub energy_adder_usd_per_mwh: f64,
    /// Running power levels per ASIC.
    pub running_levels: usize,
    /// Minimum time a device stays on, or off, after a change.
    pub min_on_s: i64,
    pub min_off_s: i64,
    /// A device without a report for this long is skipped by the dispatcher.
    pub stale_telemetry_s: i64,
    /// A price older than this is stale: the site falls back to `safe_policy`.
    pub stale_price_s: i64,
    /// `curtail` (ASICs sleep) or `hold` (keep the last plan) while a site's price is stale.
    pub safe_policy: String,
    /// Staggered restarts: devices per feeder per batch, and the time between batches.
    pub restart_batch: u32,
    pub restart_batch_interval_s: i64,
    /// Planning path: re-plan every this many intervals, over this many.
    pub replan_every_intervals: usize,
    pub horizon_intervals: usize,
    /// The schedule ahead announced with each decision.
    pub ahead_intervals: usize,
    /// Expected 4CP transmission charge priced into the plan.
    pub four_cp_usd_per_kw_year: f64,
    /// A device that has not reported for this long is unknown (out of capacity).
    pub heartbeat_timeout_s: i64,
    /// A command not answered within this long is retried.
    pub command_timeout_s: i64,
    pub command_max_attempts: u32,
    /// Commands one instant may send in all; wake-ups per feeder per tick.
    pub batch_max: usize,
    pub wakeups_per_feeder_per_tick: usize,
    /// Health: a report above this temperature counts against the device.
    pub temp_max_c: f64,
    /// Quarantine length for an unhealthy device (doubles on relapse).
    pub quarantine_s: i64,
    /// Accepted range of a price signal; a value outside is refused as bad input.
    pub price_min_usd_per_mwh: f64,
    pub price_max_usd_per_mwh: f64,
    /// Accepted range of hashprice.
    pub hashprice_max_usd_per_ph_day: f64,
    /// Accepted range of a GPU price.
    pub gpu_price_max_usd_per_gpu_hour: f64,
    /// A market signal (hashprice) older than this raises an alert (the last value is kept).
    pub stale_market_s: i64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let d = DispatchConfig::default();
        EngineConfig {
            interval_s: 900,
            step_s: 2,
            hysteresis_usd_per_mwh: d.hysteresis_usd_per_mwh,
            energy_adder_usd_per_mwh: d.energy_adder_usd_per_mwh,
            running_levels: d.running_levels,
            min_on_s: d.min_on_ms / 1000,
            min_off_s: d.min_off_ms / 1000,
            stale_telemetry_s: d.stale_telemetry_ms / 1000,
            stale_price_s: d.stale_price_ms / 1000,
            safe_policy: "curtail".into(),
            restart_batch: d.batch_size,
            restart_batch_interval_s: d.batch_interval_ms / 1000,
            replan_every_intervals: 96,
            horizon_intervals: 192,
            ahead_intervals: 96,
            four_cp_usd_per_kw_year: 0.0,
            heartbeat_timeout_s: 30,
            command_timeout_s: 120,
            command_max_attempts: 3,
            batch_max: 10_000,
            wakeups_per_feeder_per_tick: 50,
            temp_max_c: 90.0,
            quarantine_s: 1_800,
            price_min_usd_per_mwh: -1_000.0,
            price_max_usd_per_mwh: 10_000.0,
            hashprice_max_usd_per_ph_day: 10_000.0,
            gpu_price_max_usd_per_gpu_hour: 1_000.0,
            stale_market_s: 2 * 86_400,
        }
    }
}

impl EngineConfig {
    /// Defaults overlaid with a TOML file's fields (unknown fields refused), then validated.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: EngineConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            // serde names an unknown field in its message; point at it when it does.
            let field = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field")).unwrap_or("engine config");
            bad(field, msg.clone())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sets one field from text (`name=value` on the command line), then validates the whole.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let mut table = toml::Table::try_from(&*self).map_err(|e| bad(name, e.to_string()))?;
        let old = table.get(name).ok_or_else(|| bad(name, "no such engine setting"))?;
        let parsed: toml::Value = match old {
            toml::Value::String(_) => toml::Value::String(value.to_string()),
            toml::Value::Integer(_) => toml::Value::Integer(
                value.parse().map_err(|_| bad(name, format!("must be an integer, not {value:?}")))?,
            ),
            toml::Value::Float(_) => {
                toml::Value::Float(value.parse().map_err(|_| bad(name, format!("must be a number, not {value:?}")))?)
            }
            _ => return Err(bad(name, "cannot be set from the command line")),
        };
        table.insert(name.to_string(), parsed);
        let next: EngineConfig = table.try_into().map_err(|e: toml::de::Error| bad(name, e.message().to_string()))?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let pos = |f: &str, v: i64| if v > 0 { Ok(()) } else { Err(bad(f, "must be > 0")) };
        pos("interval_s", self.interval_s)?;
        pos("step_s", self.step_s)?;
        if self.interval_s % 60 != 0 {
            return Err(bad("interval_s", "must be a whole number of minutes"));
        }
        if self.interval_s % self.step_s != 0 {
            return Err(bad("step_s", "must divide interval_s"));
        }
        for (f, v) in [
            ("min_on_s", self.min_on_s),
            ("min_off_s", self.min_off_s),
            ("restart_batch_interval_s", self.restart_batch_interval_s),
        ] {
            if v < 0 {
                return Err(bad(f, "must be >= 0"));
            }
        }
        pos("stale_telemetry_s", self.stale_telemetry_s)?;
        pos("stale_price_s", self.stale_price_s)?;
        pos("heartbeat_timeout_s", self.heartbeat_timeout_s)?;
        pos("command_timeout_s", self.command_timeout_s)?;
        pos("quarantine_s", self.quarantine_s)?;
        pos("stale_market_s", self.stale_market_s)?;
        self.safe_policy()?;
        if !(1..=hcp_econ::dispatch::MAX_LEVELS - 1).contains(&self.running_levels) {
            return Err(bad("running_levels", format!("must be between 1 and {}", hcp_econ::dispatch::MAX_LEVELS - 1)));
        }
        for (f, v) in [
            ("hysteresis_usd_per_mwh", self.hysteresis_usd_per_mwh),
            ("four_cp_usd_per_kw_year", self.four_cp_usd_per_kw_year),
            ("hashprice_max_usd_per_ph_day", self.hashprice_max_usd_per_ph_day),
            ("gpu_price_max_usd_per_gpu_hour", self.gpu_price_max_usd_per_gpu_hour),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(f, "must be a finite number >= 0"));
            }
        }
        if !self.energy_adder_usd_per_mwh.is_finite() {
            return Err(bad("energy_adder_usd_per_mwh", "must be finite"));
        }
        if !(self.price_min_usd_per_mwh.is_finite()
            && self.price_max_usd_per_mwh.is_finite()
            && self.price_min_usd_per_mwh < self.price_max_usd_per_mwh)
        {
            return Err(bad("price_max_usd_per_mwh", "must be finite and above price_min_usd_per_mwh"));
        }
        if self.restart_batch == 0 {
            return Err(bad("restart_batch", "must be > 0"));
        }
        if self.command_max_attempts == 0 {
            return Err(bad("command_max_attempts", "must be > 0"));
        }
        if self.batch_max == 0 || self.wakeups_per_feeder_per_tick == 0 {
            return Err(bad("batch_max", "batch_max and wakeups_per_feeder_per_tick must be > 0"));
        }
        if self.replan_every_intervals == 0 || self.horizon_intervals < self.replan_every_intervals {
            return Err(bad("horizon_intervals", "must be >= replan_every_intervals > 0"));
        }
        if !self.temp_max_c.is_finite() {
            return Err(bad("temp_max_c", "must be finite"));
        }
        Ok(())
    }

    pub fn interval_ms(&self) -> i64 {
        self.interval_s * 1000
    }

    pub fn step_ms(&self) -> i64 {
        self.step_s * 1000
    }

    pub fn safe_policy(&self) -> Result<SafePolicy, ConfigError> {
        match self.safe_policy.as_str() {
            "curtail" => Ok(SafePolicy::Curtail),
            "hold" => Ok(SafePolicy::Hold),
            other => Err(bad("safe_policy", format!("must be curtail or hold, not {other:?}"))),
        }
    }

    /// The fast path's configuration.
    pub fn dispatch(&self) -> DispatchConfig {
        DispatchConfig {
            energy_adder_usd_per_mwh: self.energy_adder_usd_per_mwh,
            hysteresis_usd_per_mwh: self.hysteresis_usd_per_mwh,
            running_levels: self.running_levels,
            min_on_ms: self.min_on_s * 1000,
            min_off_ms: self.min_off_s * 1000,
            stale_telemetry_ms: self.stale_telemetry_s * 1000,
            stale_price_ms: self.stale_price_s * 1000,
            safe_policy: self.safe_policy().unwrap_or(SafePolicy::Curtail),
            batch_size: self.restart_batch,
            batch_interval_ms: self.restart_batch_interval_s * 1000,
        }
    }

    /// The resource manager's configuration.
    pub fn manager(&self) -> ManagerConfig {
        ManagerConfig {
            heartbeat_timeout_ms: self.heartbeat_timeout_s * 1000,
            command_timeout_ms: self.command_timeout_s * 1000,
            max_attempts: self.command_max_attempts,
            batch_max: self.batch_max,
            per_feeder_per_tick: self.wakeups_per_feeder_per_tick,
            temp_max_c: self.temp_max_c,
            quarantine_ms: self.quarantine_s * 1000,
            ..ManagerConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overlays_the_defaults_and_bad_fields_are_named() {
        let c = EngineConfig::from_toml("interval_s = 300\nhysteresis_usd_per_mwh = 2.5\n").unwrap();
        assert_eq!(c.interval_s, 300);
        assert_eq!(c.hysteresis_usd_per_mwh, 2.5);
        assert_eq!(c.step_s, EngineConfig::default().step_s);
        let e = EngineConfig::from_toml("intervl_s = 300\n").unwrap_err();
        assert_eq!(e.field, "intervl_s", "{e}");
        let e = EngineConfig::from_toml("interval_s = 90\n").unwrap_err();
        assert_eq!(e.field, "interval_s");
        let e = EngineConfig::from_toml("safe_policy = \"panic\"\n").unwrap_err();
        assert_eq!(e.field, "safe_policy");
        let e = EngineConfig::from_toml("step_s = 7\n").unwrap_err();
        assert_eq!(e.field, "step_s");
    }

    #[test]
    fn one_setting_from_the_command_line() {
        let mut c = EngineConfig::default();
        c.set("stale_price_s", "600").unwrap();
        assert_eq!(c.stale_price_s, 600);
        c.set("safe_policy", "hold").unwrap();
        assert_eq!(c.dispatch().safe_policy, SafePolicy::Hold);
        assert_eq!(c.set("stale_price_s", "ten").unwrap_err().field, "stale_price_s");
        assert_eq!(c.set("nope", "1").unwrap_err().field, "nope");
        let before = c.clone();
        assert!(c.set("step_s", "0").is_err());
        assert_eq!(c, before, "a refused setting changes nothing");
    }

    /// docs/engine-config.md names every field with its default.
    #[test]
    fn the_documentation_lists_every_field_with_its_default() {
        let doc = include_str!("../../../docs/engine-config.md");
        let table = toml::Table::try_from(EngineConfig::default()).unwrap();
        for (k, v) in table {
            let shown = match v {
                toml::Value::String(s) => format!("`\"{s}\"`"),
                toml::Value::Integer(i) => format!("`{i}`"),
                toml::Value::Float(f) => format!("`{f:?}`"),
                other => format!("`{other:?}`"),
            };
            let row =
                doc.lines().find(|l| l.starts_with(&format!("| `{k}` |"))).unwrap_or_else(|| panic!("{k} missing"));
            assert!(row.contains(&shown), "{k}: default {shown} not in {row:?}");
        }
    }
}
