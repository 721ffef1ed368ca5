//! The workload router, sans-IO: arrivals, completions, token progress, capacity changes and time
//! go in; decisions (dispatch to a replica, queue, reject with a reason, preempt) come out.
//!
//! Three levels decide who goes next on a model's free capacity: strict priority bands with an
//! anti-starvation floor; inside a band, weighted fairness between tenants by virtual token
//! counter (VTC, Sheng et al. OSDI 2024); inside a tenant, earliest deadline then arrival order.
//! Quotas guarantee each tenant capacity and let it borrow idle capacity up to a limit; borrowed
//! capacity goes first to the lowest weighted dominant share and is reclaimed by preemption from
//! the highest. When capacity shrinks (curtailment, a grid event, a fault),
//! victims are chosen minimally and explainably; preempted work keeps its place in line and its
//! accumulated service. Nothing admitted is dropped silently: every request ends completed,
//! rejected with a reason, or is still queued or running.
//!
//! Architecture invariant: pure and deterministic. No IO, clock, threads or randomness; `now_ms`
//! comes in with every input (an input older than the latest is taken as happening at the latest);
//! ties break by id.

pub mod metrics;
pub mod router;

pub use router::*;
