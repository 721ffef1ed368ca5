//! HCP's domain model: ids, units, simulated time, device models, fleet topology
//! (site -> feeder/PDU -> rack -> device), tenants and signals.
//!
//! Architecture invariant: pure data and validation. No IO (not even reading files: callers pass
//! the text), no clock, no threads, no async runtime. Every other crate may depend on this one.

pub mod device;
pub mod fleet;
pub mod ids;
pub mod invalid;
pub mod signals;
pub mod tenant;
pub mod time;
pub mod units;
pub mod work;

pub use device::{AsicModel, Catalogue, Cooling, GpuForm, GpuModel, ModelRef, ServedModel};
pub use fleet::{Fleet, FleetError, Group, Reliability};
pub use ids::*;
pub use invalid::Invalid;
pub use time::{DemoClock, MarketClock, SimTime, WallTime};
pub use units::MicroUsd;
pub use work::{JobState, UsageKind, UsageStatus};
