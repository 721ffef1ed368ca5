//! The planning path: a rolling-horizon linear programme over the next 24-48 hours, solved with
//! Clarabel through good_lp. It sets the schedule the fast path follows where something other than
//! the coming price matters: 4CP avoidance windows and ramp limits (pre-positioning).
//!
//! Model (per site s, ASIC group g on feeder f, level segment l, interval t):
//! - variable `y[g,l,t]` in `[0, n_g * dw_l]` MW: the power of that segment running (segments of a
//!   concave curve fill in value order, so no ordering constraints are needed);
//! - objective: maximise the sum of `(value_l * hashprice / heat_g - price[s,t] - adder -
//!   fourcp[s,t]) * y * dt` minus `wear * (up + down)`, where `fourcp` is the expected 4CP charge of
//!   a MW drawn in an alerted interval (`rate * 1000 / 4 * peak_share`) and `up`/`down` are the
//!   site's changes between intervals;
//! - constraints: site cap and feeder limits after idle draw and GPUs; ramp-up per interval no
//!   more than the staggered restarts allow.
//!
//! Architecture invariant: pure (the solver is a library); the caller times it.

use good_lp::{Expression, Solution, SolverModel, Variable, clarabel, variable, variables};
use hcp_model::ModelRef;
use hcp_model::fleet::Fleet;

/// Limits on a planning problem.
pub const MAX_HORIZON: usize = 4 * 24 * 7;

#[derive(Clone, Debug, PartialEq)]
pub struct PlannerConfig {
    pub running_levels: usize,
    pub interval_ms: i64,
    pub energy_adder_usd_per_mwh: f64,
    /// Transmission charge set by the 4CP peaks (USD per kW-year; 0 ignores 4CP).
    pub four_cp_usd_per_kw_year: f64,
    /// Chance that one alerted interval is its month's peak.
    pub four_cp_peak_share: f64,
    /// Switching wear per MW changed.
    pub wear_usd_per_mw: f64,
    /// Restart staggering (as the fast path): devices per feeder per batch, and batch spacing.
    pub batch_size: u32,
    pub batch_interval_ms: i64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            running_levels: 4,
            interval_ms: 15 * 60_000,
            energy_adder_usd_per_mwh: 0.0,
            four_cp_usd_per_kw_year: 0.0,
            four_cp_peak_share: 1.0 / 40.0,
            wear_usd_per_mw: 1.0,
            batch_size: 10,
            batch_interval_ms: 5_000,
        }
    }
}

/// Forecasts and state the plan starts from, by site.
pub struct PlanInput<'a> {
    /// Forecast real-time price per site and interval (the day-ahead price is the first forecast).
    pub price: &'a [Vec<f64>],
    pub four_cp_alert: &'a [Vec<bool>],
    pub ambient_c: &'a [f64],
    pub hashprice_usd_per_ph_day: f64,
    /// Planned GPU draw per site (fixed over the horizon).
    pub gpu_w: &'a [f64],
    /// ASIC draw above idle per site now (where ramps start).
    pub current_asic_w: &'a [f64],
}

/// The schedule: ASIC power above idle per site and interval, and where a non-price constraint
/// (4CP or ramp) holds a site below what the price alone would give.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub site_asic_w: Vec<Vec<f64>>,
    pub held: Vec<Vec<bool>>,
    pub objective_usd: f64,
    pub variables: usize,
    pub constraints: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}: {1}")]
    Input(&'static str, String),
    #[error("the solver failed: {0}")]
    Solver(String),
}

struct Seg {
    site: usize,
    feeder: usize,
    /// USD/MWh at the plan's hashprice and the site's ambient.
    value: f64,
    max_mw: f64,
}

/// Builds and solves the plan over the horizon of `input.price`.
pub fn solve(fleet: &Fleet, cfg: &PlannerConfig, input: &PlanInput) -> Result<Schedule, PlanError> {
    let sites = fleet.sites.len();
    let horizon = input.price.first().map_or(0, Vec::len);
    if input.price.len() != sites || input.price.iter().any(|p| p.len() != horizon) {
        return Err(PlanError::Input("price", "one forecast per site, all of one length".into()));
    }
    if horizon == 0 || horizon > MAX_HORIZON {
        return Err(PlanError::Input("price", format!("the horizon must hold 1 to {MAX_HORIZON} intervals")));
    }
    if input.price.iter().flatten().any(|p| !p.is_finite()) {
        return Err(PlanError::Input("price", "forecast prices must be finite".into()));
    }
    let dt_h = cfg.interval_ms as f64 / 3.6e6;
    let hp = input.hashprice_usd_per_ph_day;
    // Segments per group and the fixed draw per site and feeder.
    let mut segs: Vec<Seg> = vec![];
    let mut site_fixed = input.gpu_w.to_vec();
    let mut feeder_fixed = vec![0.0; fleet.feeders.len()];
    let mut ramp_mw = vec![0.0; sites];
    let restarts_per_interval =
        f64::from(cfg.batch_size) * (cfg.interval_ms as f64 / cfg.batch_interval_ms.max(1) as f64);
    for g in fleet.groups() {
        let ModelRef::Asic(a) = g.model else { continue };
        let m = fleet.catalogue.asic(a);
        let n = f64::from(g.count());
        let s = g.site.index();
        site_fixed[s] += n * m.sleep_power_w;
        feeder_fixed[g.feeder.index()] += n * m.sleep_power_w;
        ramp_mw[s] += n.min(restarts_per_interval) * m.max_power_w / 1e6;
        let heat = 1.0
            + m.jth_rise_per_c * (input.ambient_c[s] + fleet.sites[s].ambient_offset_c - m.efficiency_ref_c).max(0.0);
        let (mut prev_w, mut prev_ths) = (m.sleep_power_w, 0.0);
        for k in 0..cfg.running_levels {
            let f = if cfg.running_levels == 1 { 1.0 } else { k as f64 / (cfg.running_levels - 1) as f64 };
            let p = m.min_power_w + f * (m.max_power_w - m.min_power_w);
            let ths = m.hashrate_ths * (p / m.power_w).powf(m.curve_exponent);
            let dw = p - prev_w;
            let value = (ths - prev_ths) / 1_000.0 / 24.0 / (dw / 1e6) * hp / heat;
            segs.push(Seg { site: s, feeder: g.feeder.index(), value, max_mw: n * dw / 1e6 });
            (prev_w, prev_ths) = (p, ths);
        }
    }
    let four_cp_per_mw = cfg.four_cp_usd_per_kw_year * 1_000.0 / 4.0 * cfg.four_cp_peak_share;
    let mut vars = variables!();
    let y: Vec<Vec<Variable>> =
        (0..horizon).map(|_| segs.iter().map(|sg| vars.add(variable().min(0.0).max(sg.max_mw))).collect()).collect();
    let up: Vec<Vec<Variable>> =
        (0..horizon).map(|_| (0..sites).map(|_| vars.add(variable().min(0.0))).collect()).collect();
    let down: Vec<Vec<Variable>> =
        (0..horizon).map(|_| (0..sites).map(|_| vars.add(variable().min(0.0))).collect()).collect();
    let mut objective = Expression::with_capacity(horizon * (segs.len() + 2 * sites));
    for t in 0..horizon {
        for (k, sg) in segs.iter().enumerate() {
            let four_cp =
                if input.four_cp_alert[sg.site].get(t).copied().unwrap_or(false) { four_cp_per_mw } else { 0.0 };
            // Energy margin over the interval, less the expected 4CP charge of drawing the MW.
            let net = (sg.value - input.price[sg.site][t] - cfg.energy_adder_usd_per_mwh) * dt_h - four_cp;
            objective.add_mul(net, y[t][k]);
        }
        for s in 0..sites {
            objective.add_mul(-cfg.wear_usd_per_mw, up[t][s]);
            objective.add_mul(-cfg.wear_usd_per_mw, down[t][s]);
        }
    }
    let mut model = vars.maximise(objective).using(clarabel);
    let mut constraints = 0;
    for t in 0..horizon {
        let mut site_sum: Vec<Expression> = (0..sites).map(|_| Expression::default()).collect();
        let mut feeder_sum: Vec<Expression> = (0..fleet.feeders.len()).map(|_| Expression::default()).collect();
        for (k, sg) in segs.iter().enumerate() {
            site_sum[sg.site].add_mul(1.0, y[t][k]);
            feeder_sum[sg.feeder].add_mul(1.0, y[t][k]);
        }
        for (f, e) in feeder_sum.into_iter().enumerate() {
            if fleet.feeders[f].limit_w.is_finite() && !segs.iter().all(|sg| sg.feeder != f) {
                model.add_constraint(e.leq((fleet.feeders[f].limit_w - feeder_fixed[f]).max(0.0) / 1e6));
                constraints += 1;
            }
        }
        for (s, e) in site_sum.into_iter().enumerate() {
            model.add_constraint(e.clone().leq((fleet.sites[s].power_cap_w - site_fixed[s]).max(0.0) / 1e6));
            // Change from the previous interval = up - down; up limited by the restart ramp.
            let prev: Expression = if t == 0 {
                Expression::from(input.current_asic_w[s] / 1e6)
            } else {
                let mut p = Expression::default();
                for (k, sg) in segs.iter().enumerate() {
                    if sg.site == s {
                        p.add_mul(1.0, y[t - 1][k]);
                    }
                }
                p
            };
            let mut change = e - prev;
            change -= up[t][s];
            change += down[t][s];
            model.add_constraint(change.eq(0.0));
            model.add_constraint(Expression::from(up[t][s]).leq(ramp_mw[s]));
            constraints += 3;
        }
    }
    let solution = model.solve().map_err(|e| PlanError::Solver(e.to_string()))?;
    let mut site_asic_w = vec![vec![0.0; horizon]; sites];
    let mut held = vec![vec![false; horizon]; sites];
    let mut objective_usd = 0.0;
    for t in 0..horizon {
        // What the price alone would run (merit order under the site and feeder budgets).
        let mut order: Vec<usize> = (0..segs.len()).collect();
        order.sort_by(|&a, &b| segs[b].value.total_cmp(&segs[a].value).then(a.cmp(&b)));
        let mut site_left: Vec<f64> =
            (0..sites).map(|s| (fleet.sites[s].power_cap_w - site_fixed[s]).max(0.0) / 1e6).collect();
        let mut feeder_left: Vec<f64> =
            (0..fleet.feeders.len()).map(|f| (fleet.feeders[f].limit_w - feeder_fixed[f]).max(0.0) / 1e6).collect();
        let mut economic = vec![0.0; sites];
        for k in order {
            let sg = &segs[k];
            if sg.value > input.price[sg.site][t] + cfg.energy_adder_usd_per_mwh {
                let take = sg.max_mw.min(site_left[sg.site]).min(feeder_left[sg.feeder]).max(0.0);
                site_left[sg.site] -= take;
                feeder_left[sg.feeder] -= take;
                economic[sg.site] += take;
            }
        }
        for (k, sg) in segs.iter().enumerate() {
            let v = solution.value(y[t][k]).max(0.0);
            site_asic_w[sg.site][t] += v * 1e6;
            objective_usd += (sg.value - input.price[sg.site][t] - cfg.energy_adder_usd_per_mwh) * v * dt_h;
        }
        for s in 0..sites {
            held[s][t] = site_asic_w[s][t] / 1e6 < economic[s] - 1e-3;
        }
    }
    Ok(Schedule { site_asic_w, held, objective_usd, variables: horizon * (segs.len() + 2 * sites), constraints })
}
