//! HCP's simulators: ASIC and H100 physics, market (BTC, difficulty, fees, hashprice, GPU rental),
//! grid (ERCOT-like prices, weather, 4CP, demand response), inference demand, replay of recorded
//! CSV series, and the fleet at two fidelities (per device and per cohort).
//!
//! Architecture invariant: deterministic from a seed and stepping on simulated time. No clock, no
//! threads, no file or network IO (replay parses text or readers that callers open). Depends only on
//! the model, econ and fleet crates (the agents speak the resource manager's command and report types).

pub mod agents;
pub mod asic;
mod cohort;
pub mod demand;
pub mod fleet;
pub mod gpu;
pub mod grid;
pub mod market;
pub mod replay;
pub mod rng;
pub mod stats;
