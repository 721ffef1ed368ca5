//! Typed payloads of bus subjects, one type per subject, used by the producer and every consumer:
//! `hcp.policy`, `hcp.alert`, `hcp.signals`, `hcp.feed`, `hcp.signal.manual`, `hcp.demand`,
//! `hcp.interval.<site>`, `hcp.plan`, `hcp.decision.<site>`, `hcp.devices`, `hcp.capacity`,
//! `hcp.maintenance`, `hcp.jobs.waiting`, `hcp.batch`; `hcp.ahead` is `hcp_engine::io::Ahead` and `hcp.tenants` a
//! `hcp_store::TenantRow`. (`hcp.job.cancel` carries a job id as text.) A float that may be
//! unknown is an `Option` (JSON null), never a 0 read by default.

use serde::{Deserialize, Serialize};

/// `hcp.policy`: a policy saved through the API (the body as stored, validated there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyNotice {
    pub name: String,
    pub version: i64,
    pub body: String,
}

/// `hcp.alert`: the engine's alerts as they are raised and cleared.
pub type AlertNotice = hcp_engine::io::Alert;

/// The engine's clock and mode, as the signals view extrapolates it between notices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockNotice {
    /// `demo` (simulated world, accelerated time), `live` (feeds, wall clock at the market's
    /// offset) or `rehearsal` (feeds, a recorded period replayed on an accelerated clock).
    pub mode: String,
    /// Market time at `wall_ms`.
    pub market_ms: i64,
    pub wall_ms: i64,
    /// Market seconds per wall second.
    pub speed: f64,
}

/// One signal the engine accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalNotice {
    /// `rt_price`, `rt5_price`, `da_price`, `temperature_c`, `four_cp`, `hashprice`, `gpu_price`,
    /// `deployment`.
    pub kind: String,
    /// Settlement point, `network` or `fleet`.
    pub key: String,
    /// Market time the value is for (an interval's start for prices), ms since the epoch.
    pub at_ms: i64,
    pub value: f64,
    /// Feed name: `ercot`, `mempool`, `csv:<file>`, `contract`, `manual`, `sim`.
    pub source: String,
    /// Market time the engine accepted it.
    pub received_ms: i64,
}

/// `hcp.signals`: signals accepted since the last notice, and the clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsNotice {
    pub clock: ClockNotice,
    pub signals: Vec<SignalNotice>,
}

/// `hcp.feed`: how a feed's poll went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedNotice {
    pub feed: String,
    pub ok: bool,
    /// Why the poll failed (the request or field and the rule), when it did.
    pub reason: Option<String>,
    /// Signals it brought that the engine accepted.
    pub accepted: u32,
    pub wall_ms: i64,
}

/// `hcp.signal.manual`: a value an operator set through the API, for the engine to take with
/// source `manual`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManualSignal {
    /// `rt_price` (the price in force now, USD/MWh, taken as the current 5-minute price),
    /// `da_price` (an hour's day-ahead price; `at_ms` required), `temperature_c`, `hashprice`
    /// (USD/PH/day) or `gpu_price` (USD/GPU-hour).
    #[schema(pattern = "^(rt_price|da_price|temperature_c|hashprice|gpu_price)$")]
    pub kind: String,
    /// Settlement point for prices and temperature; ignored for `hashprice` and `gpu_price`.
    #[serde(default)]
    pub key: String,
    pub value: f64,
    /// For `da_price`: the hour's start (market time, ms since the epoch).
    #[serde(default)]
    pub at_ms: Option<i64>,
}

/// `hcp.demand`: an API process's router: requests waiting and, per site, sequences running.
/// Published when it changes (and every 30 s); the engine sums the processes' latest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandNotice {
    /// The publishing process (random per start).
    pub instance: String,
    pub queued: u32,
    pub running: std::collections::BTreeMap<String, u32>,
}

/// `hcp.jobs.waiting`: an API process's batch jobs that wait for the planner (submitted with a
/// deadline, not started yet). Published when the set changes (and every 30 s); the engine
/// places the union of the processes' latest sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitingNotice {
    /// The publishing process (random per start).
    pub instance: String,
    pub jobs: Vec<WaitingJob>,
}

/// A batch job waiting for the planner, in wall-clock time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitingJob {
    pub id: String,
    pub gpus: u32,
    /// Run time it still needs (ms of wall clock).
    pub remaining_ms: i64,
    /// When it must have finished (wall clock, ms since the epoch).
    pub deadline_ms: i64,
}

/// `hcp.batch`: where the engine's planner placed the waiting batch jobs (wall-clock times).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNotice {
    pub wall_ms: i64,
    pub placements: Vec<BatchPlacement>,
}

/// One job's place: start now, or the time it is planned to start, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPlacement {
    pub id: String,
    pub run_now: bool,
    pub start_ms: i64,
    pub finish_ms: i64,
    pub why: hcp_econ::batch::Why,
    /// Energy cost of the placement and of running at once (USD).
    pub planned_usd: f64,
    pub now_usd: f64,
}

/// A float as announced: `None` where it is not a number (a price not known yet).
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// `hcp.interval.<site>`: one site's closed interval, metered from telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntervalNotice {
    pub at_ms: i64,
    pub site: String,
    pub price_usd_per_mwh: Option<f64>,
    pub price_final: bool,
    pub hashprice_usd_per_ph_day: Option<f64>,
    pub cap_mw: f64,
    pub mining_mw: f64,
    pub inference_mw: f64,
    /// Power the plan held off (economics, strike, grid, cap, stale price, devices out of
    /// service), in all and by reason, and the cap nothing could use.
    pub curtailed_mw: f64,
    pub held_off_mw: hcp_engine::io::HeldOff,
    pub headroom_mw: f64,
    pub hashrate_ph_s: f64,
    pub gpus_serving: f64,
    pub margin_usd: Option<f64>,
    pub interval_h: f64,
}

/// One site of `hcp.plan`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSiteNotice {
    pub site: String,
    pub asic_mw: f64,
    pub gpu_mw: f64,
    pub held_for_grid_mw: f64,
    pub limit_mw: f64,
    pub price_usd_per_mwh: Option<f64>,
    pub stale: bool,
}

/// `hcp.plan` (and the stored plan's body): a plan that changed something.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanNotice {
    pub at_ms: i64,
    pub changes: usize,
    pub blocked: u32,
    pub sites: Vec<PlanSiteNotice>,
}

/// `hcp.decision.<site>`: a decision as stored, with its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionNotice {
    pub id: i64,
    pub at_ms: i64,
    pub site: String,
    pub kind: String,
    pub reason: String,
}

/// `hcp.devices`: device statuses changed; the fleet's counts after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesNotice {
    pub changes: usize,
    pub available: usize,
    pub unknown: usize,
    pub quarantined: usize,
}

/// `hcp.capacity`: replicas whose capacity changed with a plan (in notices of at most 2,000).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityNotice {
    pub at_ms: i64,
    pub replicas: Vec<hcp_store::ReplicaRow>,
}

/// `hcp.maintenance`: devices put into or out of maintenance through the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceNotice {
    /// `device`, `rack` or `site`.
    pub scope: String,
    pub id: String,
    pub on: bool,
    pub devices: usize,
}
