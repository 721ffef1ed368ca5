//! Units. Physical quantities are `f64` with the unit at the end of the name (`power_w`,
//! `price_usd_per_mwh`, `hashrate_ths`); money is an integer count of micro-USD, [`MicroUsd`].
//!
//! Rounding rule (the only one): an `f64` amount of USD becomes micro-USD once, at the boundary
//! where a computed figure is recorded (a row, a ledger entry), by rounding to the nearest
//! micro-USD with ties away from zero ([`MicroUsd::from_usd_f64`]).

use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub};

/// Money: integer micro-USD (1 USD = 1,000,000). Never a float.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// The one rounding rule: nearest micro-USD, ties away from zero; non-finite input is a bug.
    pub fn from_usd_f64(usd: f64) -> Self {
        assert!(usd.is_finite(), "money must be finite, got {usd}");
        MicroUsd((usd * 1e6).round() as i64)
    }

    /// For display and for the optimiser only; ledgers add `MicroUsd`, not floats.
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl Add for MicroUsd {
    type Output = MicroUsd;
    fn add(self, o: MicroUsd) -> MicroUsd {
        MicroUsd(self.0 + o.0)
    }
}
impl AddAssign for MicroUsd {
    fn add_assign(&mut self, o: MicroUsd) {
        self.0 += o.0;
    }
}
impl Sub for MicroUsd {
    type Output = MicroUsd;
    fn sub(self, o: MicroUsd) -> MicroUsd {
        MicroUsd(self.0 - o.0)
    }
}
impl Neg for MicroUsd {
    type Output = MicroUsd;
    fn neg(self) -> MicroUsd {
        MicroUsd(-self.0)
    }
}

impl fmt::Display for MicroUsd {
    /// `-12.345678` style: USD with six decimals, exact.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", a / 1_000_000, a % 1_000_000)
    }
}

pub const W_PER_KW: f64 = 1e3;
pub const W_PER_MW: f64 = 1e6;
/// Hashes per second in one TH/s.
pub const H_PER_TH: f64 = 1e12;
pub const TH_PER_PH: f64 = 1e3;

/// Energy in MWh drawn by `power_w` over `seconds`.
pub fn mwh(power_w: f64, seconds: f64) -> f64 {
    power_w * seconds / 3600.0 / W_PER_MW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_rounds_once_to_nearest_micro_usd() {
        assert_eq!(MicroUsd::from_usd_f64(1.0000004), MicroUsd(1_000_000));
        assert_eq!(MicroUsd::from_usd_f64(1.0000005), MicroUsd(1_000_001));
        assert_eq!(MicroUsd::from_usd_f64(-0.0000005), MicroUsd(-1));
        assert_eq!(MicroUsd(-12_345_678).to_string(), "-12.345678");
        assert_eq!(MicroUsd(5).to_string(), "0.000005");
    }

    #[test]
    fn energy() {
        assert!((mwh(1e6, 3600.0) - 1.0).abs() < 1e-12);
        assert!((mwh(3_500.0, 900.0) - 0.000875).abs() < 1e-12);
    }
}
