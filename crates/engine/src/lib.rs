//! The HCP control core, sans-IO: [`Engine`] takes signals (prices, market, grid deployments and
//! 4CP alerts), device telemetry, command results, operator policies, maintenance and inference
//! demand with the time they are handled at, and gives plans with reasons, device commands,
//! capacity changes, the schedule ahead, status changes, rollups and alerts.
//!
//! Architecture invariant: pure and deterministic. No IO, no clock, no threads: time comes in with
//! every input; outputs leave through [`Engine::poll_output`]. It builds no simulator: the
//! devices and signals are whatever its driver connects (the harness's simulated world, or the
//! server's feeds and agents).

pub mod capacity;
pub mod config;
pub mod controller;
pub mod engine;
pub mod io;
pub mod plane;
pub mod policies;

pub use config::{ConfigError, EngineConfig};
pub use engine::Engine;
pub use io::{Decided, Input, Output, Refused};
