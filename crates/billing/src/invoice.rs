//! Invoices: a tenant's usage in a period, aggregated, rated by the plan in force, one line per
//! tier x model x unit, each rounded once ([`crate::round_div`]).

use hcp_model::MicroUsd;
use serde::Serialize;

use crate::period::Period;
use crate::plan::PricePlan;
use crate::round_div;

pub use hcp_model::UsageKind;

/// Usage summed over a period for one kind, tier, model and spot flag (what storage aggregates).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageAgg {
    pub kind: UsageKind,
    pub tier: u8,
    pub model: String,
    pub spot: bool,
    pub records: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub gpu_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LineItem {
    pub description: String,
    /// `input_tokens`, `output_tokens`, `gpu_hours`, `reserved_gpu_hours`.
    pub item: &'static str,
    pub tier: Option<u8>,
    pub model: Option<String>,
    /// Quantity in the unit's smallest count (tokens, GPU-milliseconds).
    pub quantity: u64,
    /// The unit the price is per: `1000000 tokens`, `GPU-hour` (3,600,000 GPU-ms).
    pub unit: &'static str,
    pub unit_price_micro_usd: i64,
    pub discount_pct: u32,
    pub amount_micro_usd: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Invoice {
    pub tenant: String,
    pub period: Period,
    pub lines: Vec<LineItem>,
    pub total_micro_usd: i64,
    pub requests: u64,
}

impl Invoice {
    pub fn total(&self) -> MicroUsd {
        MicroUsd(self.total_micro_usd)
    }

    /// CSV: a header and one row per line item, amounts in micro-USD.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "tenant,period,description,item,tier,model,quantity,unit,unit_price_micro_usd,discount_pct,amount_micro_usd\n",
        );
        let q = |t: &str| {
            if t.contains([',', '"', '\n']) { format!("\"{}\"", t.replace('"', "\"\"")) } else { t.to_string() }
        };
        for l in &self.lines {
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{}\n",
                q(&self.tenant),
                self.period.label,
                q(&l.description),
                l.item,
                l.tier.map_or(String::new(), |t| t.to_string()),
                q(l.model.as_deref().unwrap_or("")),
                l.quantity,
                l.unit,
                l.unit_price_micro_usd,
                l.discount_pct,
                l.amount_micro_usd
            ));
        }
        s.push_str(&format!("{},{},total,,,,,,,,{}\n", q(&self.tenant), self.period.label, self.total_micro_usd));
        s
    }
}

const MTOK: i128 = 1_000_000;
const GPU_HOUR_MS: i128 = 3_600_000;

/// quantity x price / unit x (100 - discount) / 100, rounded once.
fn amount(quantity: u64, price: i64, unit: i128, discount_pct: u32) -> i64 {
    let num = i128::from(quantity) * i128::from(price) * i128::from(100 - discount_pct.min(100));
    round_div(num, unit * 100) as i64
}

/// Rates a tenant's usage in a period. `usage` may hold several rows for one line (they are
/// summed); lines come out in a fixed order (kind, tier, model, spot), so the same usage always
/// gives the same invoice.
pub fn invoice(tenant: &str, period: &Period, plan: &PricePlan, usage: &[UsageAgg]) -> Invoice {
    let mut agg: std::collections::BTreeMap<(UsageKind, u8, &str, bool), UsageAgg> = Default::default();
    for u in usage {
        let e = agg.entry((u.kind, u.tier, u.model.as_str(), u.spot)).or_insert_with(|| UsageAgg {
            records: 0,
            input_tokens: 0,
            output_tokens: 0,
            gpu_ms: 0,
            ..u.clone()
        });
        e.records += u.records;
        e.input_tokens += u.input_tokens;
        e.output_tokens += u.output_tokens;
        e.gpu_ms += u.gpu_ms;
    }
    let mut lines = vec![];
    let mut requests = 0;
    for ((kind, tier, model, spot), u) in &agg {
        match kind {
            UsageKind::Tokens => {
                requests += u.records;
                let p = plan.token_price(*tier, model).expect("a validated plan prices every tier");
                for (item, q, price) in [
                    ("input_tokens", u.input_tokens, p.input_micro_usd_per_mtok),
                    ("output_tokens", u.output_tokens, p.output_micro_usd_per_mtok),
                ] {
                    lines.push(LineItem {
                        description: format!("{model}, tier {tier}, {}", item.replace('_', " ")),
                        item,
                        tier: Some(*tier),
                        model: Some(model.to_string()),
                        quantity: q,
                        unit: "1000000 tokens",
                        unit_price_micro_usd: price,
                        discount_pct: 0,
                        amount_micro_usd: amount(q, price, MTOK, 0),
                    });
                }
            }
            UsageKind::Gpu => {
                let (price, discount) = plan.gpu_hour_price(*spot);
                lines.push(LineItem {
                    description: format!(
                        "{model}, tier {tier}, batch job GPU-hours{}",
                        if *spot { " (spot)" } else { "" }
                    ),
                    item: "gpu_hours",
                    tier: Some(*tier),
                    model: Some(model.to_string()),
                    quantity: u.gpu_ms,
                    unit: "GPU-hour",
                    unit_price_micro_usd: price,
                    discount_pct: discount,
                    amount_micro_usd: amount(u.gpu_ms, price, GPU_HOUR_MS, discount),
                });
            }
        }
    }
    if plan.reserved_gpus > 0 {
        let gpu_ms = u64::from(plan.reserved_gpus) * (period.end_ms - period.start_ms) as u64;
        lines.push(LineItem {
            description: format!("{} reserved GPUs", plan.reserved_gpus),
            item: "reserved_gpu_hours",
            tier: None,
            model: None,
            quantity: gpu_ms,
            unit: "GPU-hour",
            unit_price_micro_usd: plan.reserved_gpu_hour_micro_usd,
            discount_pct: 0,
            amount_micro_usd: amount(gpu_ms, plan.reserved_gpu_hour_micro_usd, GPU_HOUR_MS, 0),
        });
    }
    let total_micro_usd = lines.iter().map(|l| l.amount_micro_usd).sum();
    Invoice { tenant: tenant.to_string(), period: period.clone(), lines, total_micro_usd, requests }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(tier: u8, input: u64, output: u64) -> UsageAgg {
        UsageAgg {
            kind: UsageKind::Tokens,
            tier,
            model: "llama".into(),
            spot: false,
            records: 1,
            input_tokens: input,
            output_tokens: output,
            gpu_ms: 0,
        }
    }

    #[test]
    fn lines_are_rated_once_each_and_add_up() {
        let p = Period::parse("2026-11").unwrap();
        let mut plan = PricePlan::list();
        plan.reserved_gpus = 2;
        let jobs = |spot| UsageAgg {
            kind: UsageKind::Gpu,
            tier: 2,
            model: "llama".into(),
            spot,
            records: 1,
            input_tokens: 0,
            output_tokens: 0,
            gpu_ms: 5_400_000,
        };
        // Two rows of the same line are summed before rounding: 3 + 2 input tokens at 0.10 USD per
        // million is 0.5 micro-USD, which rounds (tie, away from zero) to 1.
        let usage = [tokens(1, 3, 0), tokens(1, 2, 7), tokens(0, 1_000_000, 500_000), jobs(false), jobs(true)];
        let inv = invoice("acme", &p, &plan, &usage);
        let amounts: Vec<(&str, Option<u8>, i64)> =
            inv.lines.iter().map(|l| (l.item, l.tier, l.amount_micro_usd)).collect();
        assert_eq!(
            amounts,
            vec![
                ("input_tokens", Some(0), 200_000),
                ("output_tokens", Some(0), 200_000),
                ("input_tokens", Some(1), 1),
                ("output_tokens", Some(1), 1),     // 7 x 0.2 = 1.4 -> 1
                ("gpu_hours", Some(2), 3_000_000), // 1.5 h x 2 USD
                ("gpu_hours", Some(2), 1_800_000), // 40 % off
                ("reserved_gpu_hours", None, 2 * 720 * 1_800_000),
            ]
        );
        assert_eq!(inv.total_micro_usd, amounts.iter().map(|a| a.2).sum::<i64>());
        assert_eq!(inv.requests, 3);
        let csv = inv.to_csv();
        assert_eq!(csv.lines().count(), 1 + 7 + 1);
        assert!(csv.ends_with(&format!("acme,2026-11,total,,,,,,,,{}\n", inv.total_micro_usd)));
        // The same usage in another order gives the same invoice.
        let mut rev = usage.to_vec();
        rev.reverse();
        assert_eq!(invoice("acme", &p, &plan, &rev), inv);
    }
}
