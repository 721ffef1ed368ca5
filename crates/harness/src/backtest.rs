//! Backtest: the real dispatcher (and the baselines) over a recorded period, through the
//! simulator's own accounting, compared in one table.
//!
//! Policies and what each sees when it decides interval t:
//! - `always-on`: nothing; everything that fits under the caps runs at nameplate.
//! - `strike`: the real-time price of t-1 (on/off per site with dwell), its strike and dwells
//!   chosen by a grid search on the same period (its best possible tuning; hindsight it could not
//!   have live).
//! - `optimizer`: the real-time price of t-1, the day-ahead price of t, and what it learnt from the
//!   intervals before t (see [`crate::policies::DispatchPolicy`]).
//! - `perfect-foresight`: the actual real-time price of t; the same merit-order model with
//!   underclocking, no hysteresis and no minimum on/off time. Each interval's plan is then the
//!   optimum of that interval's problem (to within one segment), so the sum is an upper bound no
//!   online policy reaches.
//!
//! `uplift_captured = (margin - always-on margin) / (bound margin - always-on margin)`.

use std::collections::BTreeMap;

use hcp_econ::dispatch::DispatchConfig;
use hcp_model::ModelRef;
use hcp_model::fleet::Fleet;
use hcp_model::signals::MarketSignal;
use hcp_model::time::SimTime;
use hcp_model::units::MicroUsd;
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::{Fidelity, GroupTarget};
use hcp_sim::grid;
use hcp_sim::replay::GridSeries;

use crate::controller::{Baseline, BaselineMode, Controller, DecisionContext};
use crate::policies::{DispatchPolicy, StrikeParams, StrikePolicy};
use crate::run::{DemandSource, GridSource, Harness, MarketSource, Scenario, SetupError, SiteRow, Violation};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    Optimizer,
    Strike,
    AlwaysOn,
    PerfectForesight,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] =
        [PolicyKind::Optimizer, PolicyKind::Strike, PolicyKind::AlwaysOn, PolicyKind::PerfectForesight];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Optimizer => "optimizer",
            PolicyKind::Strike => "strike",
            PolicyKind::AlwaysOn => "always-on",
            PolicyKind::PerfectForesight => "perfect-foresight",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = hcp_model::Invalid;
    fn from_str(s: &str) -> Result<Self, hcp_model::Invalid> {
        PolicyKind::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            hcp_model::Invalid::new(
                "policy",
                format!("must be one of optimizer, strike, always-on, perfect-foresight; got {s:?}"),
            )
        })
    }
}

/// What a backtest runs on.
pub struct BacktestInput<'a> {
    pub fleet: &'a Fleet,
    pub prices: BTreeMap<String, GridSeries>,
    /// The market: recorded, or one row holding a constant hashprice.
    pub market: Vec<MarketSignal>,
    pub from: SimTime,
    pub to: SimTime,
    pub seed: u64,
    pub energy_adder_usd_per_mwh: f64,
    pub dispatch: DispatchConfig,
    /// Transmission charge set by the 4CP peaks (USD per kW-year); 0 leaves 4CP out.
    pub four_cp_usd_per_kw_year: f64,
    /// Megawatts per site sold into grid programs (the dispatcher honours their deployments),
    /// and the availability payment per committed MW-hour. Policies that cannot honour
    /// deployments (always-on, strike) sell nothing and earn no credits.
    pub commit_mw: f64,
    pub credit_usd_per_mw_h: f64,
}

/// One point of the chart: fleet totals over an interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChartPoint {
    pub at: SimTime,
    pub price_usd_per_mwh: f64,
    pub mining_mw: f64,
    pub inference_mw: f64,
    /// ASIC nameplate not drawn (curtailed or underclocked).
    pub curtailed_mw: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub policy: PolicyKind,
    pub energy_mwh: f64,
    pub mining_revenue: MicroUsd,
    pub inference_revenue: MicroUsd,
    pub energy_cost: MicroUsd,
    pub credits: MicroUsd,
    /// 4CP exposure: the site draw in each actual 4CP interval x the rate / 4.
    pub four_cp: MicroUsd,
    pub margin: MicroUsd,
    pub switches: u64,
    pub switches_per_device_day: f64,
    pub uplift_captured: f64,
    pub always_on_margin: MicroUsd,
    pub bound_margin: MicroUsd,
    /// The strike policy's tuned parameters.
    pub strike: Option<StrikeParams>,
    /// The same run in the site P&L's accounting ([`site_pnl`] per row, summed): what the live
    /// platform's P&L reports for the same rows.
    pub pnl: hcp_billing::PnlTotals,
    pub chart: Vec<ChartPoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Violation(#[from] Violation),
}

/// Counts on/off switches from the targets a controller returns (devices that start or stop hashing).
struct Counting<C> {
    inner: C,
    last: Option<Vec<GroupTarget>>,
    switches: u64,
}

impl<C: Controller> Controller for Counting<C> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn horizon_intervals(&self) -> usize {
        self.inner.horizon_intervals()
    }
    fn foresight(&self) -> bool {
        self.inner.foresight()
    }
    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        let t = self.inner.decide(ctx);
        if let Some(last) = &self.last {
            for (a, b) in last.iter().zip(&t) {
                if let (GroupTarget::Asic(a), GroupTarget::Asic(b)) = (a, b) {
                    self.switches += u64::from(a.hashing.abs_diff(b.hashing));
                }
            }
        }
        self.last = Some(t.clone());
        t
    }
}

#[derive(Clone)]
struct Run {
    rows: Vec<SiteRow>,
    switches: u64,
}

impl BacktestInput<'_> {
    fn harness(&self) -> Result<Harness<'_>, SetupError> {
        let scenario = Scenario {
            from: self.from,
            to: self.to,
            interval_ms: 15 * 60_000,
            fidelity: Fidelity::Cohort,
            seed: self.seed,
            energy_adder_usd_per_mwh: self.energy_adder_usd_per_mwh,
        };
        Harness::new(
            self.fleet,
            scenario,
            GridSource::Recorded(self.prices.clone()),
            MarketSource::Recorded(self.market.clone()),
            DemandSource::Simulated(DemandParams::default()),
        )
    }

    /// What the runs will say about their inputs (a series applied to sites at other points,
    /// repaired gaps and repeated timestamps).
    pub fn notes(&self) -> Result<Vec<String>, BacktestError> {
        Ok(self.harness()?.notes().to_vec())
    }

    fn run<C: Controller>(&self, controller: C) -> Result<Run, BacktestError> {
        let mut h = self.harness()?;
        let mut rows = Vec::new();
        let mut c = Counting { inner: controller, last: None, switches: 0 };
        h.run(&mut c, &mut |r| rows.push(r.clone()), &mut |_, _| {})?;
        Ok(Run { rows, switches: c.switches })
    }
}

impl BacktestInput<'_> {
    /// The actual 4CP intervals of each site's price series (empty when 4CP is left out).
    fn peaks(&self) -> Vec<std::collections::BTreeSet<i64>> {
        self.fleet
            .sites
            .iter()
            .map(|site| {
                if self.four_cp_usd_per_kw_year <= 0.0 {
                    return Default::default();
                }
                let series = if self.prices.len() == 1 {
                    self.prices.values().next()
                } else {
                    self.prices.get(&site.settlement_point)
                };
                series
                    .map(|x| {
                        grid::four_cp_peaks(x)
                            .into_iter()
                            .filter(|t| *t >= self.from && *t < self.to)
                            .map(|t| t.0)
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The 4CP exposure of a run.
    fn four_cp(&self, rows: &[SiteRow], peaks: &[std::collections::BTreeSet<i64>]) -> MicroUsd {
        let index: BTreeMap<&str, usize> = self.fleet.sites.iter().map(|s| (s.id.as_str(), s.idx.index())).collect();
        let kw_at_peaks: f64 = rows
            .iter()
            .filter(|r| peaks[index[r.site.as_str()]].contains(&r.at.0))
            .map(|r| r.total_mw() * 1_000.0)
            .sum();
        MicroUsd::from_usd_f64(kw_at_peaks * self.four_cp_usd_per_kw_year / 4.0)
    }

    /// Margin of a run: revenue less energy cost and 4CP exposure.
    fn margin(&self, rows: &[SiteRow], peaks: &[std::collections::BTreeSet<i64>]) -> MicroUsd {
        rows.iter().fold(MicroUsd::ZERO, |a, r| a + r.margin()) - self.four_cp(rows, peaks)
    }
}

/// The strike grid: strikes every 5 USD/MWh from -20 to 600, curtail after 1-4 intervals, resume
/// after 1, 2, 3, 4, 6 or 8. Each candidate is scored exactly on the always-on run's per-interval
/// mining margins (on) and idle costs (off); the five best are then run through the simulator and
/// the best of those is kept.
fn tune_strike(
    input: &BacktestInput,
    always_on: &[SiteRow],
    peaks: &[std::collections::BTreeSet<i64>],
) -> Result<(StrikeParams, Run), BacktestError> {
    let fleet = input.fleet;
    let sites = fleet.sites.len();
    let sleep_w = fleet.asic_sleep_w_by_site();
    let adder = input.energy_adder_usd_per_mwh;
    // Per site: (last known price, margin if on, margin if off), interval by interval.
    let mut by_site: Vec<Vec<(f64, f64, f64)>> = vec![vec![]; sites];
    let mut last_price = vec![None; sites];
    let site_index: BTreeMap<&str, usize> = fleet.sites.iter().map(|s| (s.id.as_str(), s.idx.index())).collect();
    for r in always_on {
        let s = site_index[r.site.as_str()];
        let price = r.rt_price_usd_per_mwh + adder;
        let asic_mwh = (r.asic_hashing_mw + r.asic_transition_mw + r.asic_idle_mw) * 0.25;
        let on = r.mining_revenue.as_usd_f64() - asic_mwh * price;
        let off = -sleep_w[s] / 1e6 * 0.25 * price;
        let known = last_price[s].unwrap_or(r.rt_price_usd_per_mwh) + adder;
        by_site[s].push((known, on, off));
        last_price[s] = Some(r.rt_price_usd_per_mwh);
    }
    let mut scored: Vec<(f64, StrikeParams)> = vec![];
    for strike in (-4..=120).map(|k| f64::from(k) * 5.0) {
        for curtail_after in 1..=4 {
            for resume_after in [1, 2, 3, 4, 6, 8] {
                let params = StrikeParams { strike_usd_per_mwh: strike, curtail_after, resume_after };
                let mut p = StrikePolicy::new(params, sites);
                let mut total = 0.0;
                for (s, series) in by_site.iter().enumerate() {
                    for &(known, on, off) in series {
                        total += if p.step(s, known - adder) { off } else { on };
                    }
                }
                scored.push((total, params));
            }
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best: Option<(MicroUsd, StrikeParams, Run)> = None;
    for &(_, params) in scored.iter().take(5) {
        let run = input.run(StrikePolicy::new(params, sites))?;
        let m = input.margin(&run.rows, peaks);
        if best.as_ref().is_none_or(|b| m > b.0) {
            best = Some((m, params, run));
        }
    }
    let (_, params, run) = best.expect("five candidates ran");
    Ok((params, run))
}

fn chart(fleet: &Fleet, rows: &[SiteRow]) -> Vec<ChartPoint> {
    let nameplate_asic_mw: f64 = fleet
        .devices
        .iter()
        .filter_map(|d| match d.model {
            ModelRef::Asic(a) => Some(fleet.catalogue.asic(a).power_w / 1e6),
            ModelRef::Gpu(_) => None,
        })
        .sum();
    let mut out: Vec<ChartPoint> = vec![];
    let sites = fleet.sites.len() as f64;
    for r in rows {
        if out.last().is_none_or(|p| p.at != r.at) {
            out.push(ChartPoint {
                at: r.at,
                price_usd_per_mwh: 0.0,
                mining_mw: 0.0,
                inference_mw: 0.0,
                curtailed_mw: nameplate_asic_mw,
            });
        }
        let p = out.last_mut().expect("pushed");
        p.price_usd_per_mwh += r.rt_price_usd_per_mwh / sites;
        let mining = r.asic_hashing_mw + r.asic_transition_mw + r.asic_idle_mw;
        p.mining_mw += mining;
        p.inference_mw += r.gpu_serving_mw + r.gpu_idle_mw;
        p.curtailed_mw = (p.curtailed_mw - mining).max(0.0);
    }
    out
}

/// Runs the requested policies (always-on and the bound always run, for the uplift).
/// A site's P&L over one interval of `hours`: the row's mining revenue (hashprice in force x
/// hashrate delivered), inference revenue and energy cost at the real-time price, and the grid
/// programs' availability credit for the MW committed. The engine records these rows; the
/// backtest's totals are their sums.
pub fn site_pnl(r: &SiteRow, hours: f64, commit_mw: f64, credit_usd_per_mw_h: f64) -> hcp_billing::SitePnl {
    hcp_billing::SitePnl {
        site: r.site.clone(),
        at_ms: r.at.0,
        hours,
        mining_revenue: r.mining_revenue,
        inference_revenue: r.inference_revenue,
        energy_cost: r.energy_cost,
        grid_credits: MicroUsd::from_usd_f64(commit_mw * hours * credit_usd_per_mw_h),
    }
}

pub fn backtest(input: &BacktestInput, policies: &[PolicyKind]) -> Result<Vec<Outcome>, BacktestError> {
    let fleet = input.fleet;
    let days = (input.to.0 - input.from.0) as f64 / 86_400_000.0;
    let asics = fleet.asic_count().max(1) as f64;
    let peaks = input.peaks();
    let policy = |foresight: bool| {
        DispatchPolicy::new(fleet, input.dispatch.clone(), foresight, input.commit_mw, input.from)
            .with_four_cp(input.four_cp_usd_per_kw_year, peaks.clone())
    };
    let credits =
        MicroUsd::from_usd_f64(input.commit_mw * fleet.sites.len() as f64 * days * 24.0 * input.credit_usd_per_mw_h);
    let credits_of = |p: PolicyKind| match p {
        PolicyKind::Optimizer | PolicyKind::PerfectForesight => credits,
        PolicyKind::Strike | PolicyKind::AlwaysOn => MicroUsd::ZERO,
    };
    let always_on = input.run(Baseline { mode: BaselineMode::AlwaysOn })?;
    let bound = input.run(policy(true))?;
    let m_on = input.margin(&always_on.rows, &peaks);
    let m_bound = input.margin(&bound.rows, &peaks) + credits_of(PolicyKind::PerfectForesight);
    let mut runs: Vec<(PolicyKind, Run, Option<StrikeParams>)> = vec![];
    for &p in policies {
        let (run, strike) = match p {
            PolicyKind::AlwaysOn => (always_on.clone(), None),
            PolicyKind::PerfectForesight => (bound.clone(), None),
            PolicyKind::Optimizer => (input.run(policy(false))?, None),
            PolicyKind::Strike => {
                let (params, run) = tune_strike(input, &always_on.rows, &peaks)?;
                (run, Some(params))
            }
        };
        runs.push((p, run, strike));
    }
    Ok(runs
        .into_iter()
        .map(|(policy, run, strike)| {
            let sum = |f: fn(&SiteRow) -> MicroUsd| run.rows.iter().fold(MicroUsd::ZERO, |a, r| a + f(r));
            let m = input.margin(&run.rows, &peaks) + credits_of(policy);
            let span = (m_bound - m_on).as_usd_f64();
            Outcome {
                policy,
                energy_mwh: run.rows.iter().map(|r| r.energy_mwh).sum(),
                mining_revenue: sum(|r| r.mining_revenue),
                inference_revenue: sum(|r| r.inference_revenue),
                energy_cost: sum(|r| r.energy_cost),
                credits: credits_of(policy),
                four_cp: input.four_cp(&run.rows, &peaks),
                margin: m,
                switches: run.switches,
                switches_per_device_day: run.switches as f64 / asics / days.max(1e-9),
                uplift_captured: if span.abs() > 1e-9 { (m - m_on).as_usd_f64() / span } else { 0.0 },
                always_on_margin: m_on,
                bound_margin: m_bound,
                strike,
                pnl: {
                    let commit = if credits_of(policy) == MicroUsd::ZERO { 0.0 } else { input.commit_mw };
                    let mut t = hcp_billing::PnlTotals::default();
                    for r in &run.rows {
                        t.add(&site_pnl(r, 0.25, commit, input.credit_usd_per_mw_h));
                    }
                    t
                },
                chart: chart(fleet, &run.rows),
            }
        })
        .collect())
}
