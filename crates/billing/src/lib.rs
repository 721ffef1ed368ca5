//! Billing, pure: price plans and rating ([`plan`]), billing periods ([`period`]), invoices
//! ([`invoice`]), the double-entry ledger ([`ledger`]) and site P&L ([`pnl`]).
//!
//! Money is integer micro-USD ([`hcp_model::MicroUsd`]). Rating rule (the only one): an amount is
//! quantity x unit price, computed exactly in integers and rounded once per invoice line to the
//! nearest micro-USD, ties away from zero ([`round_div`]). Usage is never rated record by record,
//! so a million one-token requests cost what one million-token request costs.
//!
//! Architecture invariant: pure. No IO, clock or threads; usage and periods come in, invoices,
//! ledger entries and P&L go out.

pub mod invoice;
pub mod ledger;
pub mod period;
pub mod plan;
pub mod pnl;

pub use invoice::{Invoice, LineItem, UsageAgg, UsageKind, invoice};
pub use ledger::{Account, Ledger, LedgerError};
pub use period::Period;
pub use plan::{PlanError, PricePlan, TokenPrice};
pub use pnl::{PnlTotals, SitePnl};

/// `num / den` rounded to the nearest integer, ties away from zero (`den > 0`).
pub fn round_div(num: i128, den: i128) -> i128 {
    assert!(den > 0, "a unit is positive");
    let q = num / den;
    let r = num % den;
    if 2 * r.abs() >= den { q + num.signum() } else { q }
}

#[cfg(test)]
mod tests {
    use super::round_div;

    #[test]
    fn rounding_is_nearest_with_ties_away_from_zero() {
        assert_eq!(round_div(5, 10), 1);
        assert_eq!(round_div(4, 10), 0);
        assert_eq!(round_div(-5, 10), -1);
        assert_eq!(round_div(-4, 10), 0);
        assert_eq!(round_div(15, 10), 2);
        assert_eq!(round_div(1_000_000, 1_000_000), 1);
        assert_eq!(round_div(0, 7), 0);
    }
}
