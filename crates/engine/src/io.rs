//! What goes into the engine and what comes out of it.

use std::collections::BTreeMap;

use hcp_econ::dispatch::Plan;
use hcp_fleet::{Command, CommandId, Outcome, Report, Scope};
use hcp_model::SimTime;
use hcp_model::ids::{DeviceIdx, SiteIdx};
use hcp_model::signals::{Deployment, GridProgram, MarketSignal};

use crate::capacity::ReplicaCapacity;
use crate::plane::PlaneOutput;

/// Which market a price belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceMarket {
    /// Real-time settlement point price of a 15-minute interval.
    RealTime15,
    /// 5-minute SCED locational price.
    RealTime5,
    /// Day-ahead settlement point price of an hour (or the interval given).
    DayAhead,
}

impl PriceMarket {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceMarket::RealTime15 => "rt_price",
            PriceMarket::RealTime5 => "rt5_price",
            PriceMarket::DayAhead => "da_price",
        }
    }

    /// Length of the interval one price covers.
    pub fn interval_ms(self) -> i64 {
        match self {
            PriceMarket::RealTime15 => 15 * 60_000,
            PriceMarket::RealTime5 => 5 * 60_000,
            PriceMarket::DayAhead => 60 * 60_000,
        }
    }
}

/// An operator's strike policy: an ASIC model sleeps after `curtail_after` decisions whose last
/// known price is above its strike, and runs again after `resume_after` below.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StrikeRule {
    pub version: u32,
    /// The strike of every model without its own.
    pub strike_usd_per_mwh: Option<f64>,
    /// Per-model strikes (operators set one per model, at its breakeven), by model id.
    pub models: BTreeMap<String, f64>,
    pub curtail_after: u32,
    pub resume_after: u32,
}

/// The megawatts a site has sold into a grid program: a deployment of that program reduces the
/// site's draw by them (times the deployment's share).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GridRule {
    pub version: u32,
    pub site: SiteIdx,
    pub program: GridProgram,
    pub mw: f64,
}

/// GPUs reserved for a tenant: the plan keeps that many GPUs serving at full power whatever the
/// price, and the router holds them for the tenant.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReservedRule {
    pub version: u32,
    pub tenant: String,
    pub gpus: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PolicyUpdate {
    Strike(StrikeRule),
    GridCommitment(GridRule),
    Reserved(ReservedRule),
    /// The named policy no longer applies.
    Cleared(String),
}

/// Where a signal came from: the feed's name (`ercot`, `csv:<file>`, `manual`, `sim`).
pub type Source = String;

/// Inputs. Everything the engine decides with arrives as one of these, with the time it is
/// handled at.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A price for the interval starting `at` at a settlement point.
    Price {
        settlement_point: String,
        market: PriceMarket,
        at: SimTime,
        usd_per_mwh: f64,
        source: Source,
    },
    /// A forecast 4CP peak (or its withdrawal) for the interval starting `at`.
    FourCp {
        settlement_point: String,
        at: SimTime,
        alert: bool,
        source: Source,
    },
    /// Air temperature at a settlement point's sites.
    Weather {
        settlement_point: String,
        temperature_c: f64,
        source: Source,
    },
    /// BTC market and hashprice.
    Market {
        signal: MarketSignal,
        source: Source,
    },
    /// The GPU price in force (contract or spot), per GPU-hour.
    GpuPrice {
        usd_per_gpu_hour: f64,
        source: Source,
    },
    /// A grid program's deployment announced at a settlement point.
    Deployment {
        settlement_point: String,
        deployment: Deployment,
        source: Source,
    },
    Telemetry {
        device: DeviceIdx,
        report: Report,
    },
    CommandResult {
        id: CommandId,
        device: DeviceIdx,
        outcome: Outcome,
    },
    Policy(PolicyUpdate),
    Maintenance {
        scope: Scope,
        on: bool,
    },
    /// Inference demand at a site: requests waiting and running, by model.
    Demand {
        site: SiteIdx,
        model: String,
        queued: u32,
        running: u32,
    },
    /// The batch jobs that wait for the planner (submitted with a deadline, not yet started, or
    /// preempted): the whole set, replacing the one before. The engine places them on the prices
    /// ahead at once and at every decision ([`Output::Batch`]).
    Jobs {
        waiting: Vec<hcp_econ::batch::BatchJob>,
    },
    /// A feed's health: a failed poll (timeout, HTTP error, malformed or out-of-range value)
    /// raises the `feed:<name>` alert with the reason; the next good poll clears it. The
    /// signals themselves age on their own (stale prices fall back to the safe policy).
    Feed {
        feed: String,
        health: FeedHealth,
    },
    /// Time passes: the engine does what is due (manager ticks, decisions).
    Tick,
}

/// How a feed's last poll went.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedHealth {
    Ok,
    /// Why it failed, as logged.
    Failed(String),
}

impl Input {
    /// A short name of the input's kind, for logs and refusals.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Price { .. } => "price",
            Input::FourCp { .. } => "four_cp",
            Input::Weather { .. } => "weather",
            Input::Market { .. } => "market",
            Input::GpuPrice { .. } => "gpu_price",
            Input::Deployment { .. } => "deployment",
            Input::Telemetry { .. } => "telemetry",
            Input::CommandResult { .. } => "command_result",
            Input::Policy(_) => "policy",
            Input::Maintenance { .. } => "maintenance",
            Input::Demand { .. } => "demand",
            Input::Feed { .. } => "feed",
            Input::Jobs { .. } => "jobs",
            Input::Tick => "tick",
        }
    }
}

/// An input the engine refused (and so changed nothing): which field broke which rule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{input}: {field}: {rule}")]
pub struct Refused {
    pub input: &'static str,
    pub field: String,
    pub rule: String,
}

/// What is wrong now, raised once and cleared when it is over.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Alert {
    /// Stable key (`stale_price:HB_NORTH`, `refused:price`): a later alert with the same key
    /// replaces it; `raised: false` clears it.
    pub key: String,
    pub raised: bool,
    pub at_ms: i64,
    pub text: String,
}

/// Power held off at a site, by why (MW, at the decision).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeldOff {
    /// The price is above the ASICs' value (the dispatcher's economics).
    pub economics_mw: f64,
    /// The operator's strike policy.
    pub strike_mw: f64,
    /// A grid commitment or the planning path (4CP, ramps).
    pub grid_mw: f64,
    /// The site cap or a feeder limit.
    pub cap_mw: f64,
    /// The safe policy of a stale price.
    pub stale_mw: f64,
    /// Devices out of service: maintenance, quarantine, unknown.
    pub unavailable_mw: f64,
}

impl HeldOff {
    pub fn total_mw(&self) -> f64 {
        self.economics_mw + self.strike_mw + self.grid_mw + self.cap_mw + self.stale_mw + self.unavailable_mw
    }
}

/// One site over one closed interval, metered from the devices' telemetry.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SiteInterval {
    pub at: SimTime,
    pub site: SiteIdx,
    /// The interval's real-time price when it was known at the close, else the last known one
    /// (`price_final` false).
    pub price_usd_per_mwh: f64,
    pub price_final: bool,
    pub hashprice_usd_per_ph_day: f64,
    pub gpu_usd_per_gpu_hour: f64,
    pub cap_mw: f64,
    pub asic_hashing_mw: f64,
    pub asic_idle_mw: f64,
    pub gpu_serving_mw: f64,
    pub gpu_idle_mw: f64,
    pub hashrate_ph_s: f64,
    /// Mean number of GPUs serving.
    pub gpus_serving: f64,
    pub energy_mwh: f64,
    pub mining_revenue_usd: f64,
    pub inference_revenue_usd: f64,
    pub energy_cost_usd: f64,
    /// Held off by the plan in force, by why.
    pub held: HeldOff,
    /// Cap nothing could use: the cap less the draw and everything held off.
    pub headroom_mw: f64,
}

impl SiteInterval {
    pub fn total_mw(&self) -> f64 {
        self.asic_hashing_mw + self.asic_idle_mw + self.gpu_serving_mw + self.gpu_idle_mw
    }
    pub fn mining_mw(&self) -> f64 {
        self.asic_hashing_mw + self.asic_idle_mw
    }
    pub fn inference_mw(&self) -> f64 {
        self.gpu_serving_mw + self.gpu_idle_mw
    }
}

/// The day ahead at one decision: per site, the day-ahead prices and the planning path's
/// schedule from the interval starting `at_ms` (announced on `hcp.ahead`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ahead {
    pub at_ms: i64,
    pub interval_ms: i64,
    pub sites: Vec<SiteAhead>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SiteAhead {
    pub site: String,
    pub day_ahead_usd_per_mwh: Vec<f64>,
    /// Planned ASIC draw above idle (MW); empty before the first plan.
    pub planned_asic_mw: Vec<f64>,
    /// Whether a non-price constraint (4CP, ramp) holds the site below what price alone gives.
    pub held: Vec<bool>,
}

/// A decision and what the devices did since the one before.
#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    pub at: SimTime,
    pub plan: Plan,
    pub plane: PlaneOutput,
    /// (available, unknown, quarantined, in maintenance).
    pub counts: (usize, usize, usize, usize),
    /// Size of the first command batch after the plan.
    pub first_batch: usize,
    /// Replicas whose capacity changed with this plan (all of them the first time).
    pub replicas: Vec<ReplicaCapacity>,
    pub ahead: Ahead,
    /// The interval that closed at this decision, per site (none at the first decision).
    pub closed: Vec<SiteInterval>,
}

/// Outputs, in the order they happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// A command for a device's agent (the first batch of a plan comes first).
    Command(Command),
    /// A decision with its interval's rollup.
    Decided(Box<Decided>),
    /// A signal accepted (for storage and the signals view).
    Signal {
        kind: &'static str,
        key: String,
        at: SimTime,
        value: f64,
        source: Source,
    },
    /// A policy now in force (or cleared): its name and version.
    PolicyApplied {
        name: String,
        version: Option<u32>,
    },
    Alert(Alert),
    Refused(Refused),
    /// Where the waiting batch jobs are placed: those that start now, and when the others will.
    Batch(BatchPlan),
}

/// The planner's placement of the waiting batch jobs, on the prices ahead at `at`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchPlan {
    pub at: SimTime,
    /// The price path the jobs were placed on (USD/MWh per interval from `path_start`): the price
    /// in force for the current interval, then the day-ahead prices, GPU-weighted over the sites.
    pub path_start: SimTime,
    pub path_usd_per_mwh: Vec<f64>,
    /// GPUs free for batch work (the fleet's GPUs less those the demand holds).
    pub free_gpus: u32,
    pub placements: Vec<hcp_econ::batch::Placement>,
}
