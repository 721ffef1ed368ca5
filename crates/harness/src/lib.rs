//! The whole-platform simulation harness (TigerBeetle style): a seeded loop that advances simulated
//! time, feeds simulator outputs in as signals and telemetry, lets a controller decide, steps the
//! fleet, checks invariants every step and reports `seed=N` on failure so any run replays exactly.
//!
//! Later issues plug the dispatcher (a [`Controller`]), the router and billing into this loop.
//!
//! Architecture invariant: pure and deterministic. No IO, no clock, no threads: the caller passes
//! parsed inputs and receives rows through a callback.

pub mod backtest;
pub mod batchtest;
pub mod drive;
pub mod plane;
pub mod replay;
pub mod world;

pub use hcp_engine::{capacity, controller, policies};
pub mod run;

pub use controller::{Baseline, BaselineMode, Controller, DecisionContext};
pub use run::*;
