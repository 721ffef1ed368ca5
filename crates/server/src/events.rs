//! Typed payloads of bus subjects, one type per subject, used by the producer and every consumer.
//! (Subjects announced before this module existed still carry `json!` payloads; they move here as
//! they are touched.)

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
