//! Mining and device economics: hashprice from difficulty, subsidy, fees and BTC price, and the
//! breakeven power price of each ASIC model (economics.md section 1). The dispatcher will live here.
//!
//! Architecture invariant: pure functions and plain structs. No IO, no clock, no threads.

pub mod batch;
pub mod dispatch;
pub mod hashprice;
pub mod plan;

pub use hashprice::*;
