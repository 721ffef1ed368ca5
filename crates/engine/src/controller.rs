//! What decides the fleet's targets each interval. The economic dispatcher (a later issue)
//! implements [`Controller`]; [`Baseline`] is the simple rule the harness ships with: GPUs serve
//! first, ASICs fill the remaining site and feeder headroom most efficient first, and (in
//! breakeven mode) an ASIC model sleeps while the last known price is above its breakeven.

use hcp_model::fleet::{Fleet, Group};
use hcp_model::signals::{Deployment, GridSignal, MarketSignal};
use hcp_model::{ModelRef, SimTime};
use hcp_sim::asic::{AsicTarget, IdleMode};
use hcp_sim::fleet::GroupTarget;
use hcp_sim::gpu::GpuTarget;

/// What a controller sees when it decides.
pub struct DecisionContext<'a> {
    pub now: SimTime,
    pub fleet: &'a Fleet,
    pub groups: &'a [Group],
    /// Last known grid interval per site (the one before `now`; prices are published after the
    /// interval), indexed by site.
    pub last_grid: &'a [GridSignal],
    /// Whether a 4CP peak window is forecast for the interval starting `now`, by site.
    pub four_cp_alert: &'a [bool],
    /// Demand-response deployments announced by `now` and not yet over, by site.
    pub deployments: &'a [Vec<Deployment>],
    pub market: &'a MarketSignal,
    pub energy_adder_usd_per_mwh: f64,
    /// Day-ahead prices by site for the interval starting `now` and the following ones, as many as
    /// [`Controller::horizon_intervals`] asks (day-ahead prices are published the day before).
    pub day_ahead: &'a [Vec<f64>],
    /// 4CP alerts (a forecast) by site over the same horizon.
    pub four_cp_ahead: &'a [Vec<bool>],
    /// The interval's actual grid signal by site, given only to a controller whose
    /// [`Controller::foresight`] is true (the perfect-foresight bound).
    pub actual: Option<&'a [GridSignal]>,
    /// GPUs with work (running or queued) by site, when the router's demand is known; empty or
    /// `None` for a site: all of its GPUs count as busy.
    pub gpu_busy: &'a [Option<u32>],
}

pub trait Controller {
    fn name(&self) -> &str;
    /// Intervals of day-ahead prices and 4CP alerts the controller wants ahead of `now`.
    fn horizon_intervals(&self) -> usize {
        0
    }
    /// True only for the perfect-foresight bound, which sees the interval's actual prices.
    fn foresight(&self) -> bool {
        false
    }
    /// One target per group, in `ctx.groups` order. The harness checks the result against site
    /// caps and feeder limits every step.
    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineMode {
    /// Everything that fits under the caps runs.
    AlwaysOn,
    /// ASIC models sleep while the last price (plus adder) is above their breakeven.
    Breakeven,
}

pub struct Baseline {
    pub mode: BaselineMode,
}

/// Worst-case draw of a group's devices when serving/hashing, and when idle.
fn draws(fleet: &Fleet, model: ModelRef) -> (f64, f64) {
    match model {
        ModelRef::Asic(a) => {
            let m = fleet.catalogue.asic(a);
            (m.max_power_w, m.sleep_power_w)
        }
        ModelRef::Gpu(g) => {
            let m = fleet.catalogue.gpu(g);
            (m.max_power_w + m.host_idle_w + m.host_load_w, m.idle_w + m.host_idle_w)
        }
    }
}

impl Controller for Baseline {
    fn name(&self) -> &str {
        match self.mode {
            BaselineMode::AlwaysOn => "always-on",
            BaselineMode::Breakeven => "breakeven",
        }
    }

    fn decide(&mut self, ctx: &DecisionContext) -> Vec<GroupTarget> {
        let fleet = ctx.fleet;
        let mut site_left: Vec<f64> = fleet.sites.iter().map(|s| s.power_cap_w).collect();
        let mut feeder_left: Vec<f64> = fleet.feeders.iter().map(|f| f.limit_w).collect();
        // Every device's idle draw is reserved first, so any running choice below fits.
        for g in ctx.groups {
            let idle = draws(fleet, g.model).1 * f64::from(g.count());
            site_left[g.site.index()] -= idle;
            feeder_left[g.feeder.index()] -= idle;
        }
        let mut out: Vec<Option<GroupTarget>> = vec![None; ctx.groups.len()];
        // GPUs first (economics.md section 4), then ASICs from the most efficient.
        let mut order: Vec<usize> = (0..ctx.groups.len()).collect();
        let rank = |g: &Group| match g.model {
            ModelRef::Gpu(_) => f64::NEG_INFINITY,
            ModelRef::Asic(a) => fleet.catalogue.asic(a).j_per_th(),
        };
        order.sort_by(|&a, &b| rank(&ctx.groups[a]).total_cmp(&rank(&ctx.groups[b])).then(a.cmp(&b)));
        for i in order {
            let g = &ctx.groups[i];
            let (run_w, idle_w) = draws(fleet, g.model);
            let extra = run_w - idle_w;
            let room = site_left[g.site.index()].min(feeder_left[g.feeder.index()]).max(0.0);
            let mut k = g.count().min((room / extra).floor() as u32);
            if let ModelRef::Asic(a) = g.model {
                let m = fleet.catalogue.asic(a);
                let price = ctx.last_grid[g.site.index()].rt_price_usd_per_mwh + ctx.energy_adder_usd_per_mwh;
                let breakeven = hcp_econ::model_breakeven_usd_per_mwh(m, ctx.market.hashprice_usd_per_ph_day);
                if self.mode == BaselineMode::Breakeven && price > breakeven {
                    k = 0;
                }
                out[i] = Some(GroupTarget::Asic(AsicTarget::uniform(k, m.max_power_w, IdleMode::Sleep)));
            } else if let ModelRef::Gpu(gm) = g.model {
                let cap_w = fleet.catalogue.gpu(gm).max_power_w;
                out[i] = Some(GroupTarget::Gpu(GpuTarget { serving: k, cap_w, idle_off: false }));
            }
            site_left[g.site.index()] -= f64::from(k) * extra;
            feeder_left[g.feeder.index()] -= f64::from(k) * extra;
        }
        out.into_iter().map(|t| t.expect("every group decided")).collect()
    }
}
