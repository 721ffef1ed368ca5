//! Price plans: per-token prices by priority tier and model, GPU-hours of batch jobs with a spot
//! discount for preemptible ones, and reserved capacity per GPU-hour.

use serde::{Deserialize, Serialize};

/// A bad plan: the field and the rule it breaks.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct PlanError {
    pub field: String,
    pub rule: String,
}

fn bad(field: impl Into<String>, rule: impl Into<String>) -> PlanError {
    PlanError { field: field.into(), rule: rule.into() }
}

/// Prices of a tier's tokens on a model (`*`: any model without its own entry), in micro-USD per
/// million tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrice {
    pub tier: u8,
    pub model: String,
    pub input_micro_usd_per_mtok: i64,
    pub output_micro_usd_per_mtok: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricePlan {
    pub tokens: Vec<TokenPrice>,
    /// Batch jobs, per GPU-hour.
    pub gpu_hour_micro_usd: i64,
    /// Discount of preemptible (spot) jobs, in percent of the GPU-hour price.
    pub spot_discount_pct: u32,
    /// GPUs reserved for the tenant, billed every hour of the period whether used or not.
    #[serde(default)]
    pub reserved_gpus: u32,
    #[serde(default)]
    pub reserved_gpu_hour_micro_usd: i64,
}

/// Tiers the default plan prices (the router's three bands).
pub const TIERS: u8 = 3;

impl PricePlan {
    /// The list price every tenant gets until it has its own plan: Llama-3-8B class serving at
    /// open-market rates (interactive 0.20/0.40 USD per million input/output tokens, standard
    /// 0.10/0.20, batch 0.05/0.10), 2.00 USD per GPU-hour for jobs with 40 % off preemptible ones,
    /// reserved capacity at 1.80 USD per GPU-hour.
    pub fn list() -> PricePlan {
        let t = |tier, i, o| TokenPrice {
            tier,
            model: "*".into(),
            input_micro_usd_per_mtok: i,
            output_micro_usd_per_mtok: o,
        };
        PricePlan {
            tokens: vec![t(0, 200_000, 400_000), t(1, 100_000, 200_000), t(2, 50_000, 100_000)],
            gpu_hour_micro_usd: 2_000_000,
            spot_discount_pct: 40,
            reserved_gpus: 0,
            reserved_gpu_hour_micro_usd: 1_800_000,
        }
    }

    /// Parses and validates a plan from JSON; errors name the field.
    pub fn from_json(s: &str) -> Result<PricePlan, PlanError> {
        let d = &mut serde_json::Deserializer::from_str(s);
        let p: PricePlan = serde::Deserialize::deserialize(d).map_err(|e| bad("plan", e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Every price non-negative and below 1,000 USD a unit; every tier up to [`TIERS`] priced for
    /// any model (`*`), so any served request can be rated; no entry twice.
    pub fn validate(&self) -> Result<(), PlanError> {
        const MAX: i64 = 1_000_000_000;
        let price = |field: String, v: i64| {
            if (0..=MAX).contains(&v) { Ok(()) } else { Err(bad(field, format!("must be 0 to {MAX} micro-USD"))) }
        };
        for (i, t) in self.tokens.iter().enumerate() {
            if t.tier >= TIERS {
                return Err(bad(format!("tokens[{i}].tier"), format!("must be below {TIERS}")));
            }
            if t.model.is_empty() || t.model.len() > 128 {
                return Err(bad(format!("tokens[{i}].model"), "must be 1 to 128 characters, or *"));
            }
            price(format!("tokens[{i}].input_micro_usd_per_mtok"), t.input_micro_usd_per_mtok)?;
            price(format!("tokens[{i}].output_micro_usd_per_mtok"), t.output_micro_usd_per_mtok)?;
            if self.tokens[..i].iter().any(|o| o.tier == t.tier && o.model == t.model) {
                return Err(bad(format!("tokens[{i}]"), format!("tier {} model {} priced twice", t.tier, t.model)));
            }
        }
        for tier in 0..TIERS {
            if !self.tokens.iter().any(|t| t.tier == tier && t.model == "*") {
                return Err(bad("tokens", format!("tier {tier} needs a price for model *")));
            }
        }
        price("gpu_hour_micro_usd".into(), self.gpu_hour_micro_usd)?;
        price("reserved_gpu_hour_micro_usd".into(), self.reserved_gpu_hour_micro_usd)?;
        if self.spot_discount_pct > 100 {
            return Err(bad("spot_discount_pct", "must be 0 to 100"));
        }
        if self.reserved_gpus > 1_000_000 {
            return Err(bad("reserved_gpus", "must be at most 1,000,000"));
        }
        Ok(())
    }

    /// The price of a tier's tokens on a model: its own entry, else the tier's `*` entry.
    pub fn token_price(&self, tier: u8, model: &str) -> Option<&TokenPrice> {
        let tier = tier.min(TIERS - 1);
        self.tokens
            .iter()
            .find(|t| t.tier == tier && t.model == model)
            .or_else(|| self.tokens.iter().find(|t| t.tier == tier && t.model == "*"))
    }

    /// Micro-USD per GPU-hour of a job (spot: after the discount, per million micro-USD-hours; the
    /// discount is applied to the line, not rounded here).
    pub fn gpu_hour_price(&self, spot: bool) -> (i64, u32) {
        (self.gpu_hour_micro_usd, if spot { self.spot_discount_pct } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_validate_with_the_field_named() {
        let p = PricePlan::list();
        assert!(p.validate().is_ok());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(PricePlan::from_json(&json).unwrap(), p);
        let mut q = p.clone();
        q.tokens[1].output_micro_usd_per_mtok = -1;
        assert_eq!(q.validate().unwrap_err().field, "tokens[1].output_micro_usd_per_mtok");
        let mut q = p.clone();
        q.tokens.remove(2);
        assert_eq!(q.validate().unwrap_err().rule, "tier 2 needs a price for model *");
        let mut q = p.clone();
        q.spot_discount_pct = 101;
        assert_eq!(q.validate().unwrap_err().field, "spot_discount_pct");
        let e = PricePlan::from_json(r#"{"tokens":[],"gpu_hour_micro_usd":1,"spot_discount_pct":0,"x":1}"#);
        assert!(e.unwrap_err().rule.contains("unknown field `x`"));
        // A model's own price wins over `*`; tiers past the last are priced as the last.
        let mut q = p.clone();
        q.tokens.push(TokenPrice {
            tier: 1,
            model: "big".into(),
            input_micro_usd_per_mtok: 9,
            output_micro_usd_per_mtok: 9,
        });
        assert_eq!(q.token_price(1, "big").unwrap().input_micro_usd_per_mtok, 9);
        assert_eq!(q.token_price(1, "small").unwrap().input_micro_usd_per_mtok, 100_000);
        assert_eq!(q.token_price(7, "small").unwrap().tier, 2);
    }
}
