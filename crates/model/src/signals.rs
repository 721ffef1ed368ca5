//! Signals: what the outside world tells HCP. Market (BTC, difficulty, fees, hashprice, GPU
//! rental), grid (real-time and day-ahead prices, weather, 4CP, demand-response deployments) and
//! demand (inference arrivals). Simulators and recorded series produce them; the dispatcher reads them.

use crate::time::SimTime;

/// The state of the Bitcoin network and the GPU rental market at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarketSignal {
    pub at: SimTime,
    pub btc_usd: f64,
    pub difficulty: f64,
    pub block_height: u64,
    pub subsidy_btc: f64,
    /// Mean fees per block over the last 144 blocks (Luxor's convention).
    pub fees_btc_per_block: f64,
    pub network_hashrate_ehs: f64,
    pub hashprice_usd_per_ph_day: f64,
    pub gpu_rental_usd_per_gpu_hour: f64,
}

/// Grid prices and weather at one settlement point for one interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridSignal {
    /// Start of the interval.
    pub at: SimTime,
    pub interval_ms: i64,
    pub rt_price_usd_per_mwh: f64,
    pub da_price_usd_per_mwh: f64,
    pub temperature_c: f64,
    /// True while a 4CP peak window is forecast (June-September weekday afternoons).
    pub four_cp_alert: bool,
}

/// Grid programs a large flexible load can sell into (economics.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum GridProgram {
    /// Load resource on an under-frequency relay; trips near 59.7 Hz.
    ResponsiveReserve,
    /// Controllable Load Resource following 5-minute dispatch base points.
    ControllableLoad,
    Ecrs,
    NonSpin,
    Ers10,
    Ers30,
}

impl GridProgram {
    pub const ALL: [GridProgram; 6] = [
        GridProgram::ResponsiveReserve,
        GridProgram::ControllableLoad,
        GridProgram::Ecrs,
        GridProgram::NonSpin,
        GridProgram::Ers10,
        GridProgram::Ers30,
    ];

    /// Time allowed from the deployment notice to the full reduction.
    pub fn response_ms(self) -> i64 {
        match self {
            GridProgram::ResponsiveReserve => 500,
            GridProgram::ControllableLoad => 16_000,
            GridProgram::Ecrs => 10 * 60_000,
            GridProgram::NonSpin => 30 * 60_000,
            GridProgram::Ers10 => 10 * 60_000,
            GridProgram::Ers30 => 30 * 60_000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GridProgram::ResponsiveReserve => "RRS",
            GridProgram::ControllableLoad => "CLR",
            GridProgram::Ecrs => "ECRS",
            GridProgram::NonSpin => "Non-Spin",
            GridProgram::Ers10 => "ERS-10",
            GridProgram::Ers30 => "ERS-30",
        }
    }
}

/// A demand-response deployment: reduce the committed load by a fraction within the response time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Deployment {
    pub program: GridProgram,
    pub notice_at: SimTime,
    /// `notice_at + program.response_ms()`.
    pub respond_by: SimTime,
    pub end_at: SimTime,
    /// Share (0..=1) of the committed megawatts that must be dropped.
    pub fraction: f64,
}

/// Inference demand over an interval, aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct DemandSignal {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

/// One inference request (for the router and for per-request replay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    pub at: SimTime,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}
