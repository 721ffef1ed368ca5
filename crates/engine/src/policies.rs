//! Controllers built on the economic dispatcher, and the strike-price baseline fleet tools use.
//!
//! - [`DispatchPolicy`] runs the fast-path [`Dispatcher`] every interval. Online, it decides
//!   interval t from what is known then: the real-time price of t-1, the day-ahead prices, and
//!   what it learnt from the intervals before. With foresight (the bound) it sees the
//!   interval's actual price and has no hysteresis and no minimum on/off time. Online, the price
//!   it plans on comes from [`PriceEstimator`].
//! - [`StrikePolicy`]: on/off with dwell (economics.md section 6): curtail every ASIC of a site after
//!   `curtail_after` intervals whose last known price is above the strike, resume after
//!   `resume_after` intervals below; GPUs and caps as [`Baseline`].

use hcp_econ::dispatch::{
    Commitment, DispatchConfig, Dispatcher, GpuBudget, Plan, Reason, ReduceKind, SiteSignal, StrikeHold,
};
use hcp_econ::plan::{PlanInput, PlannerConfig, Schedule};
use hcp_model::fleet::{Fleet, Group};
use hcp_model::{ModelRef, SimTime};
use hcp_sim::asic::{AsicTarget, IdleMode};
use hcp_sim::fleet::GroupTarget;
use hcp_sim::gpu::GpuTarget;

use crate::controller::{Baseline, BaselineMode, Controller, DecisionContext};
use crate::io::{GridRule, ReservedRule, StrikeRule};

/// Online estimate of the coming interval's real-time price at one site: three simple
/// predictors (persistence, persistence plus the day-ahead change, and the day-ahead price plus a
/// fitted share of the last deviation), each scored on the intervals already seen by its absolute
/// error (clipped, so that one spike does not decide); the best so far makes the estimate.
#[derive(Clone, Debug, Default)]
pub struct PriceEstimator {
    prev: Option<(f64, f64)>,
    pending: Option<[f64; 3]>,
    error: [f64; 3],
    sxy: f64,
    sxx: f64,
    n: u32,
}

impl PriceEstimator {
    /// Intervals of history before the fitted coefficient replaces pure persistence.
    pub const WARM_UP: u32 = 96;
    const ERROR_CLIP: f64 = 500.0;

    /// Learns from the last known interval (real-time and day-ahead) and estimates the next one
    /// from its day-ahead price.
    pub fn update_and_estimate(&mut self, last_rt: f64, last_da: f64, next_da: f64) -> f64 {
        if let Some(p) = self.pending.take() {
            for (e, x) in self.error.iter_mut().zip(p) {
                *e += (x - last_rt).abs().min(Self::ERROR_CLIP);
            }
        }
        let dev = last_rt - last_da;
        if let Some((prt, pda)) = self.prev {
            let pdev = prt - pda;
            if pdev.is_finite() && dev.is_finite() {
                self.sxy += pdev * dev;
                self.sxx += pdev * pdev;
                self.n += 1;
            }
        }
        self.prev = Some((last_rt, last_da));
        if !(next_da.is_finite() && last_da.is_finite()) {
            return last_rt;
        }
        let predictions = [last_rt, last_rt + (next_da - last_da), next_da + self.phi() * dev];
        self.pending = Some(predictions);
        let best = (0..3).min_by(|&a, &b| self.error[a].total_cmp(&self.error[b]).then(a.cmp(&b))).unwrap_or(0);
        predictions[best]
    }

    /// Share of the last deviation from day-ahead that persists, fitted by least squares.
    pub fn phi(&self) -> f64 {
        if self.n < Self::WARM_UP || self.sxx <= 0.0 { 1.0 } else { (self.sxy / self.sxx).clamp(0.0, 1.0) }
    }
}

/// The economic dispatcher as a harness controller.
pub struct DispatchPolicy {
    name: String,
    dispatcher: Dispatcher,
    foresight: bool,
    /// Harness group of each device (ASICs), and each ASIC group's level histogram and powers.
    group_of: Vec<u32>,
    hist: Vec<Vec<u32>>,
    level_w: Vec<Vec<f64>>,
    estimators: Vec<PriceEstimator>,
    /// Megawatts per site sold into grid programs; deployments must be honoured.
    commit_mw: f64,
    /// Site draw when each deployment arrived (the baseline of reduce-by).
    baselines: std::collections::BTreeMap<(u16, i64), f64>,
    last_site_mw: Vec<f64>,
    /// The planning path: configuration, the schedule in force and when it started.
    planner: PlannerConfig,
    schedule: Option<(SimTime, Schedule)>,
    /// Intervals between re-plans, and the horizon of each plan.
    pub replan_every: usize,
    pub horizon: usize,
    /// Per site, intervals known (with foresight) to be 4CP peaks: the bound draws nothing there.
    peaks: Vec<std::collections::BTreeSet<i64>>,
    /// Idle draw of each site's ASICs.
    idle_w: Vec<f64>,
    /// The last plan (changes and reasons), for inspection.
    pub last_plan: Option<Plan>,
    /// The operator's strike policy, and its dwell state per (site, ASIC model).
    pub strike: Option<StrikeRule>,
    strike_state: std::collections::BTreeMap<(u16, String), StrikeParamsState>,
    /// The operator's grid commitments: a deployment of a program at a site with a rule is
    /// honoured by the rule's megawatts (and names its version).
    pub grid_rules: Vec<GridRule>,
    /// ASIC model ids present at each site.
    site_models: Vec<Vec<String>>,
    /// GPUs reserved for tenants (the reserved-capacity policy): they serve whatever the price.
    pub reserved: Option<ReservedRule>,
    /// Per site, whether the GPUs are shed (the price above what their work earns).
    gpu_shed: Vec<bool>,
    /// GPUs planned to serve per site at the last decision, before any with no work idled for
    /// the ASICs (see [`DispatchPolicy::gpus_serving_now`]).
    gpu_serving: Vec<u32>,
    /// The last decision's signals, hashprice, GPU budgets and commitments: a GPU reclaim
    /// between decisions re-plans one site with them.
    last_inputs: Option<LastInputs>,
}

/// A decision's signals, hashprice, GPU budgets and commitments.
type LastInputs = (Vec<SiteSignal>, f64, Vec<GpuBudget>, Vec<Commitment>);

/// Per site, the GPUs and what they all draw (W, host share included): serving at the highest
/// cap, at the lowest, idle.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SiteGpus {
    pub(crate) count: u32,
    pub(crate) full_w: f64,
    min_w: f64,
    idle_w: f64,
}

impl SiteGpus {
    /// The draws of one GPU (averaged over the site's GPU models).
    fn per_gpu(&self) -> (f64, f64, f64) {
        let n = f64::from(self.count.max(1));
        (self.full_w / n, self.min_w / n, self.idle_w / n)
    }
}

pub(crate) fn site_gpus(fleet: &Fleet, groups: &[Group]) -> Vec<SiteGpus> {
    let mut out = vec![SiteGpus::default(); fleet.sites.len()];
    for g in groups {
        if let ModelRef::Gpu(m) = g.model {
            let m = fleet.catalogue.gpu(m);
            let o = &mut out[g.site.index()];
            let n = f64::from(g.count());
            o.full_w += n * (m.max_power_w + m.host_idle_w + m.host_load_w);
            o.min_w += n * (m.min_cap_w + m.host_idle_w + m.host_load_w);
            o.idle_w += n * (m.idle_w + m.host_idle_w);
            o.count += g.count();
        }
    }
    out
}

/// GPUs rounded up to whole replicas, at most `count`.
fn whole_replicas(gpus: u32, per: u32, count: u32) -> u32 {
    let per = per.max(1);
    gpus.div_ceil(per).saturating_mul(per).min(count)
}

/// Dwell counters of one strike.
#[derive(Clone, Debug, Default)]
struct StrikeParamsState {
    above: u32,
    below: u32,
    curtailed: bool,
}

/// Per site, the power its GPUs draw serving at their highest cap, and the least they draw serving
/// at their lowest (host draw included).
pub fn gpu_budgets(fleet: &Fleet, groups: &[Group]) -> Vec<GpuBudget> {
    site_gpus(fleet, groups)
        .iter()
        .map(|g| GpuBudget { planned_w: g.full_w, min_w: g.min_w, ..Default::default() })
        .collect()
}

impl DispatchPolicy {
    /// The dispatcher, for the device plane's telemetry, faults and maintenance.
    pub fn dispatcher_mut(&mut self) -> &mut Dispatcher {
        &mut self.dispatcher
    }

    /// The planning path's schedule ahead of `now`, `n` intervals of it at most: per site the
    /// planned ASIC draw above idle (W) and whether a non-price constraint holds the site there.
    /// Empty before the first plan (or when its horizon is over).
    pub fn schedule_ahead(&self, now: SimTime, n: usize) -> Vec<(Vec<f64>, Vec<bool>)> {
        let Some((at, s)) = &self.schedule else { return vec![] };
        let k = ((now.0 - at.0).max(0) / self.planner.interval_ms) as usize;
        s.site_asic_w
            .iter()
            .zip(&s.held)
            .map(|(w, h)| {
                let end = (k + n).min(w.len());
                let start = k.min(end);
                (w[start..end].to_vec(), h[start..end].to_vec())
            })
            .collect()
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// `cfg.stale_telemetry_ms` is ignored: a backtest feeds no per-device telemetry back, so
    /// every device is fresh; faults stay inside the simulator.
    pub fn new(fleet: &Fleet, mut cfg: DispatchConfig, foresight: bool, commit_mw: f64, start: SimTime) -> Self {
        let planner = PlannerConfig {
            running_levels: cfg.running_levels,
            energy_adder_usd_per_mwh: cfg.energy_adder_usd_per_mwh,
            batch_size: cfg.batch_size,
            batch_interval_ms: cfg.batch_interval_ms,
            ..Default::default()
        };
        cfg.stale_telemetry_ms = i64::MAX / 4;
        if foresight {
            cfg.hysteresis_usd_per_mwh = 0.0;
            cfg.min_on_ms = 0;
            cfg.min_off_ms = 0;
        }
        let dispatcher = Dispatcher::new(fleet, cfg, start.0);
        let groups = fleet.groups();
        let mut group_of = vec![u32::MAX; fleet.devices.len()];
        let mut hist = vec![vec![]; groups.len()];
        let mut level_w = vec![vec![]; groups.len()];
        for (gi, g) in groups.iter().enumerate() {
            if let ModelRef::Asic(_) = g.model {
                let w = dispatcher.level_powers_w(g.devices[0]).expect("ASIC group").to_vec();
                let mut h = vec![0u32; w.len()];
                for d in &g.devices {
                    group_of[d.index()] = gi as u32;
                    h[dispatcher.level(*d) as usize] += 1;
                }
                hist[gi] = h;
                level_w[gi] = w;
            }
        }
        DispatchPolicy {
            name: if foresight { "perfect-foresight" } else { "optimizer" }.into(),
            dispatcher,
            foresight,
            group_of,
            hist,
            level_w,
            estimators: vec![PriceEstimator::default(); fleet.sites.len()],
            commit_mw,
            baselines: Default::default(),
            last_site_mw: vec![0.0; fleet.sites.len()],
            planner,
            schedule: None,
            replan_every: 96,
            horizon: 192,
            peaks: vec![Default::default(); fleet.sites.len()],
            idle_w: fleet.asic_sleep_w_by_site(),
            last_plan: None,
            strike: None,
            strike_state: Default::default(),
            reserved: None,
            gpu_shed: vec![false; fleet.sites.len()],
            gpu_serving: vec![0; fleet.sites.len()],
            last_inputs: None,
            grid_rules: vec![],
            site_models: fleet
                .sites
                .iter()
                .map(|site| {
                    let mut m: Vec<String> = groups
                        .iter()
                        .filter(|g| g.site == site.idx && matches!(g.model, ModelRef::Asic(_)))
                        .map(|g| fleet.model_id(g.model).to_string())
                        .collect();
                    m.sort();
                    m.dedup();
                    m
                })
                .collect(),
        }
    }

    /// Prices the expected 4CP charge into the plan (USD per kW-year); with foresight, `peaks`
    /// are the actual 4CP intervals per site.
    pub fn with_four_cp(mut self, usd_per_kw_year: f64, peaks: Vec<std::collections::BTreeSet<i64>>) -> Self {
        self.planner.four_cp_usd_per_kw_year = usd_per_kw_year;
        if self.foresight && usd_per_kw_year > 0.0 {
            self.peaks = peaks;
        }
        self
    }

    /// Re-plans the horizon from the day-ahead prices and 4CP alerts when due.
    fn replan(&mut self, ctx: &DecisionContext, gpus: &[GpuBudget], ambient: &[f64]) {
        let due = match &self.schedule {
            None => true,
            Some((at, _)) => (ctx.now.0 - at.0) / self.planner.interval_ms >= self.replan_every as i64,
        };
        if !due || ctx.day_ahead.iter().any(|d| d.is_empty()) {
            return;
        }
        let gpu_w: Vec<f64> = gpus.iter().map(|g| g.planned_w).collect();
        let current: Vec<f64> = (0..ctx.fleet.sites.len())
            .map(|s| (self.last_site_mw[s] * 1e6 - gpu_w[s] - self.idle_w[s]).max(0.0))
            .collect();
        let input = PlanInput {
            price: ctx.day_ahead,
            four_cp_alert: ctx.four_cp_ahead,
            ambient_c: ambient,
            hashprice_usd_per_ph_day: ctx.market.hashprice_usd_per_ph_day,
            gpu_w: &gpu_w,
            current_asic_w: &current,
        };
        // A failed solve keeps the previous schedule (or none): the fast path still runs safely.
        if let Ok(s) = hcp_econ::plan::solve(ctx.fleet, &self.planner, &input) {
            self.schedule = Some((ctx.now, s));
        }
    }

    /// The schedule's limit on a site's draw for the interval starting `now`, if the plan holds
    /// the site back there.
    fn schedule_limit(&self, now: SimTime, site: usize, gpu_w: f64) -> f64 {
        let Some((at, s)) = &self.schedule else { return f64::INFINITY };
        let k = ((now.0 - at.0) / self.planner.interval_ms) as usize;
        match (s.held[site].get(k), s.site_asic_w[site].get(k)) {
            (Some(true), Some(w)) => w + self.idle_w[site] + gpu_w,
            _ => f64::INFINITY,
        }
    }

    /// The two-tier target that reproduces a group's level histogram (more than two running levels
    /// only arise from measured efficiencies; the lower ones merge into the low tier by power).
    fn target(&self, gi: usize) -> AsicTarget {
        let h = &self.hist[gi];
        let w = &self.level_w[gi];
        let running: Vec<usize> = (1..h.len()).rev().filter(|&l| h[l] > 0).collect();
        let Some(&top) = running.first() else {
            return AsicTarget::uniform(0, w[w.len() - 1], IdleMode::Sleep);
        };
        let low: u32 = running[1..].iter().map(|&l| h[l]).sum();
        let low_w = if low > 0 {
            running[1..].iter().map(|&l| f64::from(h[l]) * w[l]).sum::<f64>() / f64::from(low)
        } else {
            w[top]
        };
        AsicTarget { hashing: h[top] + low, power_w: w[top], low, low_power_w: low_w, idle: IdleMode::Sleep }
    }
}

impl Controller for DispatchPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn horizon_intervals(&self) -> usize {
        if self.foresight { 1 } else { self.horizon }
    }

    fn foresight(&self) -> bool {
        self.foresight
    }

    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        self.decide_with(ctx, 0, &mut |_| {})
    }
}

impl DispatchPolicy {
    /// Advances the strike policy's dwell with each site's last known price and holds (or frees)
    /// each site's ASIC models in the dispatcher.
    fn apply_strike(&mut self, ctx: &DecisionContext) {
        let Some(rule) = &self.strike else {
            if !self.strike_state.is_empty() {
                for ((s, m), _) in std::mem::take(&mut self.strike_state) {
                    self.dispatcher.hold_by_strike(hcp_model::SiteIdx(s), &m, None);
                }
            }
            return;
        };
        for (s, models) in self.site_models.iter().enumerate() {
            let price = ctx.last_grid[s].rt_price_usd_per_mwh + ctx.energy_adder_usd_per_mwh;
            for m in models {
                let strike = rule.models.get(m).copied().or(rule.strike_usd_per_mwh);
                let key = (s as u16, m.clone());
                let Some(strike) = strike else {
                    if self.strike_state.remove(&key).is_some() {
                        self.dispatcher.hold_by_strike(hcp_model::SiteIdx(s as u16), m, None);
                    }
                    continue;
                };
                let st = self.strike_state.entry(key).or_default();
                if price.is_finite() {
                    if price > strike {
                        st.above += 1;
                        st.below = 0;
                    } else {
                        st.below += 1;
                        st.above = 0;
                    }
                }
                if !st.curtailed && st.above >= rule.curtail_after {
                    st.curtailed = true;
                } else if st.curtailed && st.below >= rule.resume_after {
                    st.curtailed = false;
                }
                let hold = st.curtailed.then_some(StrikeHold {
                    strike_usd_per_mwh: strike,
                    price_usd_per_mwh: price,
                    policy_version: rule.version,
                });
                self.dispatcher.hold_by_strike(hcp_model::SiteIdx(s as u16), m, hold);
            }
        }
    }

    /// [`Controller::decide`], handing `on_first` the plan's first `first_changes` (or more) device
    /// changes, reductions first, before the rest of the plan exists: the engine sends the first
    /// command batch from them (see [`hcp_econ::dispatch::PlanRun`]).
    pub fn decide_with(
        &mut self,
        ctx: &DecisionContext,
        first_changes: usize,
        on_first: &mut dyn FnMut(&[hcp_econ::dispatch::TargetChange]),
    ) -> Vec<GroupTarget> {
        let now = ctx.now.0;
        let n_sites = ctx.fleet.sites.len();
        let mut signals = Vec::with_capacity(n_sites);
        let mut ambients = Vec::with_capacity(n_sites);
        for s in 0..n_sites {
            let last = &ctx.last_grid[s];
            let next_da = ctx.day_ahead[s].first().copied().unwrap_or(f64::NAN);
            // A price is published at the end of its interval; none known is as old as can be
            // (the dispatcher's safe policy applies).
            let known = last.rt_price_usd_per_mwh.is_finite();
            let estimate = if known {
                self.estimators[s].update_and_estimate(last.rt_price_usd_per_mwh, last.da_price_usd_per_mwh, next_da)
            } else {
                0.0
            };
            let published_ms = if known { last.at.0 + last.interval_ms } else { i64::MIN / 4 };
            let (price, ambient, published_ms) = match ctx.actual {
                Some(a) => (a[s].rt_price_usd_per_mwh, a[s].temperature_c, now),
                None => (estimate, last.temperature_c, published_ms),
            };
            let ambient = if ambient.is_finite() { ambient } else { 25.0 };
            ambients.push(ambient);
            signals.push(SiteSignal::new(price, published_ms, ambient + ctx.fleet.sites[s].ambient_offset_c));
        }
        self.apply_strike(ctx);
        // GPUs serve at their highest cap while their work earns more than the power costs, unless
        // an obligation needs more than the ASICs can give; those with no work give their
        // headroom to the ASICs when the limit binds.
        let mut gpu_reasons = vec![];
        let gpus = self.gpu_budgets(ctx, &signals, &mut gpu_reasons);
        if !self.foresight {
            self.replan(ctx, &gpus, &ambients);
        }
        for (s, sig) in signals.iter_mut().enumerate() {
            sig.schedule_limit_w = if self.peaks[s].contains(&now) {
                self.idle_w[s] + gpus[s].planned_w
            } else {
                self.schedule_limit(ctx.now, s, gpus[s].planned_w)
            };
        }
        let mut commitments = vec![];
        for (s, deps) in ctx.deployments.iter().enumerate() {
            for d in deps {
                // The operator's rule for this site and program, else the assumed commitment of a
                // backtest; a deployment nobody committed to is not ours to answer.
                let rule = self.grid_rules.iter().find(|r| r.site.index() == s && r.program == d.program);
                let (mw, version) = match rule {
                    Some(r) => (r.mw, Some(r.version)),
                    None if self.commit_mw > 0.0 => (self.commit_mw, None),
                    None => continue,
                };
                let base = *self.baselines.entry((s as u16, d.notice_at.0)).or_insert(self.last_site_mw[s]);
                commitments.push(Commitment {
                    site: hcp_model::SiteIdx(s as u16),
                    program: d.program,
                    kind: ReduceKind::By { mw: mw * d.fraction, baseline_mw: base },
                    respond_by_ms: d.respond_by.0,
                    policy_version: version,
                });
            }
        }
        let mut run =
            self.dispatcher.start_plan(now, &signals, ctx.market.hashprice_usd_per_ph_day, &gpus, &commitments);
        if first_changes > 0 {
            on_first(run.step(first_changes));
        }
        let mut plan = run.finish();
        plan.reasons.extend(gpu_reasons);
        self.last_inputs = Some((signals, ctx.market.hashprice_usd_per_ph_day, gpus.clone(), commitments));
        self.count_changes(&plan.changes);
        for (s, p) in plan.sites.iter().enumerate() {
            self.last_site_mw[s] = p.asic_mw + p.gpu_mw;
        }
        let targets = self.targets(ctx.fleet, ctx.groups, &plan, &gpus);
        self.last_plan = Some(plan);
        targets
    }

    /// Each group's target from a plan. GPU caps: the highest, unless the plan capped the site's
    /// GPUs (then the same share of the range between the lowest and the highest cap on every
    /// serving GPU). GPUs serving: all, those reserved while the site's GPUs are shed, those with
    /// work while the others' headroom went to the ASICs; the first of each group serve.
    fn targets(&self, fleet: &Fleet, groups: &[Group], plan: &Plan, gpus: &[GpuBudget]) -> Vec<GroupTarget> {
        let mut left: Vec<u32> = (0..fleet.sites.len()).map(|s| self.serving(s, plan, gpus)).collect();
        groups
            .iter()
            .enumerate()
            .map(|(gi, g)| match g.model {
                ModelRef::Asic(_) => GroupTarget::Asic(self.target(gi)),
                ModelRef::Gpu(m) => {
                    let s = g.site.index();
                    let m = fleet.catalogue.gpu(m);
                    let b = gpus[s];
                    let got = plan.sites.get(s).map_or(b.planned_w, |p| (p.gpu_mw + p.gpu_idle_mw) * 1e6);
                    let share = if b.planned_w > b.min_w {
                        ((got - b.min_w) / (b.planned_w - b.min_w)).clamp(0.0, 1.0)
                    } else {
                        1.0
                    };
                    let cap_w = m.min_cap_w + share * (m.max_power_w - m.min_cap_w);
                    let serving = left[s].min(g.count());
                    left[s] -= serving;
                    GroupTarget::Gpu(GpuTarget { serving, cap_w, idle_off: false })
                }
            })
            .collect()
    }

    /// GPUs serving at a site under a plan made with `gpus`: those planned, less the ones with no
    /// work when their headroom went to the ASICs.
    fn serving(&self, site: usize, plan: &Plan, gpus: &[GpuBudget]) -> u32 {
        let idle = plan.sites.get(site).is_some_and(|p| p.gpu_idle_mw > 0.0);
        let planned = self.gpu_serving[site];
        if idle { planned.saturating_sub(gpus[site].idle_gpus) } else { planned }
    }

    /// GPUs serving at a site now (after the last decision or reclaim).
    pub fn gpus_serving_now(&self, site: usize) -> u32 {
        match (&self.last_plan, &self.last_inputs) {
            (Some(plan), Some((_, _, gpus, _))) => self.serving(site, plan, gpus),
            _ => self.gpu_serving[site],
        }
    }

    /// Each changed device's level moves in its group's histogram.
    fn count_changes(&mut self, changes: &[hcp_econ::dispatch::TargetChange]) {
        for c in changes {
            let gi = self.group_of[c.device.index()] as usize;
            self.hist[gi][c.from_level as usize] -= 1;
            self.hist[gi][c.to_level as usize] += 1;
        }
    }

    /// Per site, the GPUs' budget for the dispatcher: serving (all, or while shed only those
    /// reserved) at their highest and lowest caps, the rest idle, and what the ones with no work
    /// could give back. Records the GPUs planned to serve, and a reason when a site's GPUs are
    /// shed or serve again.
    fn gpu_budgets(
        &mut self,
        ctx: &DecisionContext,
        signals: &[SiteSignal],
        reasons: &mut Vec<Reason>,
    ) -> Vec<GpuBudget> {
        let per = ctx.fleet.served_model.gpus_per_replica;
        let gpu_price = ctx.market.gpu_rental_usd_per_gpu_hour;
        let stale_ms = self.dispatcher.cfg.stale_price_ms;
        let mut reserved_left = self.reserved.as_ref().map_or(0, |r| r.gpus);
        let sites = site_gpus(ctx.fleet, ctx.groups);
        let mut out = vec![GpuBudget::default(); sites.len()];
        for (s, g) in sites.iter().enumerate() {
            if g.count == 0 {
                continue;
            }
            let (full_w, min_w, idle_w) = g.per_gpu();
            let reserve_here = whole_replicas(reserved_left.min(g.count), per, g.count);
            reserved_left = reserved_left.saturating_sub(reserve_here);
            let value = gpu_price / (full_w / 1e6);
            let price = signals[s].price_usd_per_mwh + ctx.energy_adder_usd_per_mwh;
            let fresh = ctx.now.0 - signals[s].price_at_ms <= stale_ms;
            // Shed only on a known, fresh price above a known value; otherwise as before.
            let shed = if value.is_finite() && value > 0.0 && price.is_finite() && fresh {
                price > value
            } else {
                self.gpu_shed[s]
            };
            let serving = if shed { reserve_here } else { g.count };
            if shed != self.gpu_shed[s] {
                reasons.push(Reason::GpusShed {
                    site: hcp_model::SiteIdx(s as u16),
                    shed,
                    price_usd_per_mwh: price,
                    value_usd_per_mwh: value,
                    serving_gpus: serving,
                    policy_version: self.reserved.as_ref().filter(|_| shed && reserve_here > 0).map(|r| r.version),
                });
                self.gpu_shed[s] = shed;
            }
            let idle = f64::from(g.count - serving);
            // The GPUs with work (or reserved) keep serving; the others may idle for the ASICs.
            let (idle_gpus, idle_flex_w) = match ctx.gpu_busy.get(s).copied().flatten() {
                Some(busy) if !shed => {
                    let keep = whole_replicas(busy.max(reserve_here), per, g.count);
                    let n = g.count - keep;
                    (n, f64::from(n) * (full_w - idle_w))
                }
                _ => (0, 0.0),
            };
            out[s] = GpuBudget {
                planned_w: f64::from(serving) * full_w + idle * idle_w,
                min_w: f64::from(serving) * min_w + idle * idle_w,
                idle_flex_w,
                idle_gpus,
            };
            self.gpu_serving[s] = serving;
        }
        out
    }

    /// Demand came back to a site whose idle GPUs gave their headroom to the ASICs: re-plans that
    /// site at once with the last decision's signals and `busy` GPUs with work (the ASICs make
    /// room first). The plan (every site as last planned, this one's changes and reasons), and
    /// the groups' targets; None when nothing is to be reclaimed.
    pub fn reclaim_gpus(
        &mut self,
        now: SimTime,
        fleet: &Fleet,
        groups: &[Group],
        site: usize,
        busy: u32,
    ) -> Option<(Plan, Vec<GroupTarget>)> {
        let last = self.last_plan.as_ref()?;
        if last.sites.get(site).is_none_or(|p| p.gpu_idle_mw <= 0.0) {
            return None;
        }
        let (signals, hashprice, mut gpus, commitments) = self.last_inputs.clone()?;
        let per = fleet.served_model.gpus_per_replica;
        let g = site_gpus(fleet, groups)[site];
        let (full_w, _, idle_w) = g.per_gpu();
        let keep = whole_replicas(busy, per, g.count);
        if keep <= self.serving(site, last, &gpus) {
            return None;
        }
        // Fewer of the GPUs planned to serve idle now.
        let n = self.gpu_serving[site].saturating_sub(keep);
        gpus[site].idle_gpus = n;
        gpus[site].idle_flex_w = f64::from(n) * (full_w - idle_w);
        let plan = self
            .dispatcher
            .start_plan_sites(now.0, &[hcp_model::SiteIdx(site as u16)], &signals, hashprice, &gpus, &commitments)
            .finish();
        let mut merged = last.clone();
        self.count_changes(&plan.changes);
        merged.sites[site] = plan.sites[site];
        merged.changes = plan.changes.clone();
        merged.reasons = plan.reasons.clone();
        merged.at_ms = plan.at_ms;
        merged.blocked = plan.blocked;
        if let Some((_, _, g, _)) = &mut self.last_inputs {
            g[site] = gpus[site];
        }
        let targets = self.targets(fleet, groups, &merged, &gpus);
        // The other sites as the last decision planned them, this site's changes and reasons.
        self.last_plan = Some(merged.clone());
        Some((merged, targets))
    }
}

/// Strike price with dwell, on/off for a whole site, as fleet tools do it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StrikeParams {
    pub strike_usd_per_mwh: f64,
    pub curtail_after: u32,
    pub resume_after: u32,
}

pub struct StrikePolicy {
    pub params: StrikeParams,
    above: Vec<u32>,
    below: Vec<u32>,
    curtailed: Vec<bool>,
}

impl StrikePolicy {
    pub fn new(params: StrikeParams, sites: usize) -> Self {
        StrikePolicy { params, above: vec![0; sites], below: vec![0; sites], curtailed: vec![false; sites] }
    }

    /// Advances one site's state with the last known price; true while curtailed.
    pub fn step(&mut self, site: usize, last_price: f64) -> bool {
        if last_price > self.params.strike_usd_per_mwh {
            self.above[site] += 1;
            self.below[site] = 0;
        } else {
            self.below[site] += 1;
            self.above[site] = 0;
        }
        if !self.curtailed[site] && self.above[site] >= self.params.curtail_after {
            self.curtailed[site] = true;
        } else if self.curtailed[site] && self.below[site] >= self.params.resume_after {
            self.curtailed[site] = false;
        }
        self.curtailed[site]
    }
}

impl Controller for StrikePolicy {
    fn name(&self) -> &str {
        "strike"
    }

    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        let curtailed: Vec<bool> = (0..ctx.fleet.sites.len())
            .map(|s| self.step(s, ctx.last_grid[s].rt_price_usd_per_mwh + ctx.energy_adder_usd_per_mwh))
            .collect();
        let mut t = Baseline { mode: BaselineMode::AlwaysOn }.decide(ctx);
        for (g, target) in ctx.groups.iter().zip(t.iter_mut()) {
            if let GroupTarget::Asic(a) = target
                && curtailed[g.site.index()]
            {
                a.hashing = 0;
                a.low = 0;
            }
        }
        t
    }
}
