//! Tenants: the AI customers who buy inference.

use crate::ids::TenantId;

/// Priority tiers a request or job can run in, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Critical,
    Standard,
    Batch,
}

/// An AI customer with a fairness weight and a default tier.
#[derive(Clone, Debug, PartialEq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// Relative share when backlogged (> 0).
    pub weight: f64,
    pub default_tier: Tier,
    /// GPUs guaranteed to this tenant.
    pub guaranteed_gpus: u32,
}
