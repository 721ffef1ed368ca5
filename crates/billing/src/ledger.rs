//! The double-entry ledger: every transaction's postings sum to zero (debits positive, credits
//! negative), so the balances of all accounts always sum to zero. An unbalanced or empty
//! transaction is refused and changes nothing.

use std::collections::BTreeMap;

use hcp_model::MicroUsd;
use serde::Serialize;

use crate::invoice::Invoice;
use crate::pnl::SitePnl;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Account {
    /// What a tenant owes (asset).
    Receivable(String),
    /// Revenue by line item kind (`input_tokens`, `gpu_hours`, ...).
    InferenceRevenue(&'static str),
    /// Mining pool payouts due (asset) and mining revenue, by site.
    PoolReceivable(String),
    MiningRevenue(String),
    /// Energy bought at the real-time price (expense) and owed to the retailer (liability), by site.
    EnergyCost(String),
    EnergyPayable(String),
    /// Grid-program credits earned (revenue) and due from the program (asset), by site.
    GridCredits(String),
    GridReceivable(String),
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LedgerError {
    #[error("transaction {memo:?}: postings sum to {sum} micro-USD, must be 0")]
    Unbalanced { memo: String, sum: i64 },
    #[error("transaction {memo:?}: has no postings")]
    Empty { memo: String },
    #[error("transaction {memo:?}: amount overflows")]
    Overflow { memo: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub memo: String,
    pub postings: Vec<(Account, i64)>,
}

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    balances: BTreeMap<Account, i64>,
    journal: Vec<Entry>,
}

impl Ledger {
    /// Posts a transaction whose postings sum to zero.
    pub fn post(&mut self, memo: &str, postings: Vec<(Account, i64)>) -> Result<(), LedgerError> {
        if postings.is_empty() {
            return Err(LedgerError::Empty { memo: memo.into() });
        }
        let sum = postings
            .iter()
            .try_fold(0i64, |s, (_, v)| s.checked_add(*v))
            .ok_or_else(|| LedgerError::Overflow { memo: memo.into() })?;
        if sum != 0 {
            return Err(LedgerError::Unbalanced { memo: memo.into(), sum });
        }
        // Net each account's postings, then check every new balance before changing any.
        let mut delta: BTreeMap<&Account, i64> = BTreeMap::new();
        for (a, v) in &postings {
            let d = delta.entry(a).or_insert(0);
            *d = d.checked_add(*v).ok_or_else(|| LedgerError::Overflow { memo: memo.into() })?;
        }
        let mut next = Vec::with_capacity(delta.len());
        for (a, d) in delta {
            let have = self.balances.get(a).copied().unwrap_or(0);
            next.push((a.clone(), have.checked_add(d).ok_or_else(|| LedgerError::Overflow { memo: memo.into() })?));
        }
        self.balances.extend(next);
        self.journal.push(Entry { memo: memo.into(), postings });
        Ok(())
    }

    /// An issued invoice: the tenant owes its total; each line is revenue of its kind.
    pub fn post_invoice(&mut self, inv: &Invoice) -> Result<(), LedgerError> {
        let mut p = vec![(Account::Receivable(inv.tenant.clone()), inv.total_micro_usd)];
        for l in &inv.lines {
            p.push((Account::InferenceRevenue(l.item), -l.amount_micro_usd));
        }
        self.post(&format!("invoice {} {}", inv.tenant, inv.period.label), p)
    }

    /// A site's interval: mining revenue earned, energy bought, grid credits earned.
    pub fn post_pnl(&mut self, p: &SitePnl) -> Result<(), LedgerError> {
        let s = &p.site;
        self.post(
            &format!("site {s} at {}", p.at_ms),
            vec![
                (Account::PoolReceivable(s.clone()), p.mining_revenue.0),
                (Account::MiningRevenue(s.clone()), -p.mining_revenue.0),
                (Account::EnergyCost(s.clone()), p.energy_cost.0),
                (Account::EnergyPayable(s.clone()), -p.energy_cost.0),
                (Account::GridReceivable(s.clone()), p.grid_credits.0),
                (Account::GridCredits(s.clone()), -p.grid_credits.0),
            ],
        )
    }

    pub fn balance(&self, a: &Account) -> MicroUsd {
        MicroUsd(self.balances.get(a).copied().unwrap_or(0))
    }

    /// The sum of every account's balance: zero in a ledger that balances.
    pub fn trial_balance(&self) -> i64 {
        self.balances.values().sum()
    }

    pub fn balances(&self) -> &BTreeMap<Account, i64> {
        &self.balances
    }

    pub fn journal(&self) -> &[Entry] {
        &self.journal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::{UsageAgg, UsageKind, invoice};
    use crate::period::Period;
    use crate::plan::PricePlan;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Invoice { tenant: u8, tier: u8, input: u32, output: u32, gpu_ms: u32, spot: bool },
        Pnl { site: u8, mining: i32, energy: i32, credits: i32 },
        Raw { a: u8, b: u8, amount: i64, skew: i64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 0u8..3, any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(
                |(tenant, tier, input, output, gpu_ms, spot)| Op::Invoice { tenant, tier, input, output, gpu_ms, spot }
            ),
            (0u8..3, any::<i32>(), any::<i32>(), any::<i32>()).prop_map(|(site, mining, energy, credits)| Op::Pnl {
                site,
                mining,
                energy,
                credits
            }),
            (0u8..3, 0u8..3, -1_000_000i64..1_000_000, -2i64..2).prop_map(|(a, b, amount, skew)| Op::Raw {
                a,
                b,
                amount,
                skew
            }),
        ]
    }

    proptest! {
        /// Whatever is posted, the ledger balances, a refused transaction changes nothing, and each
        /// tenant's receivable is the sum of its invoices.
        #[test]
        fn the_ledger_always_balances(ops in proptest::collection::vec(op(), 1..60)) {
            let mut l = Ledger::default();
            let mut owed = [0i64; 3];
            let p = Period::parse("2026-11").unwrap();
            let mut plan = PricePlan::list();
            plan.reserved_gpus = 1;
            for o in ops {
                let before = (l.balances().clone(), l.journal().len());
                let ok = match o {
                    Op::Invoice { tenant, tier, input, output, gpu_ms, spot } => {
                        let u = [
                            UsageAgg { kind: UsageKind::Tokens, tier, model: "m".into(), spot: false, records: 1,
                                input_tokens: input.into(), output_tokens: output.into(), gpu_ms: 0 },
                            UsageAgg { kind: UsageKind::Gpu, tier, model: "m".into(), spot, records: 1,
                                input_tokens: 0, output_tokens: 0, gpu_ms: gpu_ms.into() },
                        ];
                        let inv = invoice(&format!("t{tenant}"), &p, &plan, &u);
                        owed[tenant as usize] += inv.total_micro_usd;
                        prop_assert!(l.post_invoice(&inv).is_ok());
                        true
                    }
                    Op::Pnl { site, mining, energy, credits } => {
                        let s = SitePnl { site: format!("s{site}"), at_ms: 0, hours: 0.25,
                            mining_revenue: MicroUsd(mining.into()), inference_revenue: MicroUsd(0),
                            energy_cost: MicroUsd(energy.into()), grid_credits: MicroUsd(credits.into()) };
                        prop_assert!(l.post_pnl(&s).is_ok());
                        true
                    }
                    Op::Raw { a, b, amount, skew } => {
                        let r = l.post("raw", vec![
                            (Account::Receivable(format!("t{a}")), amount),
                            (Account::GridCredits(format!("s{b}")), -amount + skew),
                        ]);
                        prop_assert_eq!(r.is_ok(), skew == 0);
                        if skew == 0 { owed[a as usize] += amount; }
                        r.is_ok()
                    }
                };
                if !ok {
                    prop_assert_eq!(&before.0, l.balances());
                    prop_assert_eq!(before.1, l.journal().len());
                }
                prop_assert_eq!(l.trial_balance(), 0);
            }
            for (t, o) in owed.iter().enumerate() {
                prop_assert_eq!(l.balance(&Account::Receivable(format!("t{t}"))).0, *o);
            }
        }
    }

    #[test]
    fn unbalanced_and_empty_transactions_are_refused() {
        let mut l = Ledger::default();
        let e = l.post("x", vec![(Account::Receivable("a".into()), 5), (Account::InferenceRevenue("gpu_hours"), -4)]);
        assert_eq!(e.unwrap_err(), LedgerError::Unbalanced { memo: "x".into(), sum: 1 });
        assert!(matches!(l.post("y", vec![]), Err(LedgerError::Empty { .. })));
        assert!(l.balances().is_empty() && l.journal().is_empty());
        // One account twice in a transaction nets out.
        let a = Account::Receivable("a".into());
        l.post("z", vec![(a.clone(), 5), (a.clone(), -5)]).unwrap();
        assert_eq!(l.balance(&a).0, 0);
    }
}
