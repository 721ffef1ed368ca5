//! Site P&L per interval: mining revenue (hashprice in force x hashrate delivered), inference
//! revenue, energy cost at the real-time price, grid-program credits.

use hcp_model::MicroUsd;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SitePnl {
    pub site: String,
    pub at_ms: i64,
    pub hours: f64,
    pub mining_revenue: MicroUsd,
    pub inference_revenue: MicroUsd,
    pub energy_cost: MicroUsd,
    pub grid_credits: MicroUsd,
}

impl SitePnl {
    pub fn margin(&self) -> MicroUsd {
        self.mining_revenue + self.inference_revenue + self.grid_credits - self.energy_cost
    }
}

/// Sums of P&L rows (a period, a site or the fleet).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PnlTotals {
    pub rows: u64,
    pub mining_revenue: MicroUsd,
    pub inference_revenue: MicroUsd,
    pub energy_cost: MicroUsd,
    pub grid_credits: MicroUsd,
    pub margin: MicroUsd,
}

impl PnlTotals {
    pub fn add(&mut self, p: &SitePnl) {
        self.rows += 1;
        self.mining_revenue += p.mining_revenue;
        self.inference_revenue += p.inference_revenue;
        self.energy_cost += p.energy_cost;
        self.grid_credits += p.grid_credits;
        self.margin += p.margin();
    }
}
