//! The harness loop, its inputs, its rows and its invariants.

use std::collections::BTreeMap;
use std::fmt;

use hcp_model::fleet::{Fleet, Group};
use hcp_model::signals::{Deployment, GridSignal, MarketSignal, Request};
use hcp_model::time::SimTime;
use hcp_model::units::{MicroUsd, mwh};
use hcp_sim::demand::{DemandParams, DemandSim, TraceDemand};
use hcp_sim::fleet::{Fidelity, FleetSim, GroupStep, SiteEnv};
use hcp_sim::gpu::Workload;
use hcp_sim::grid::{self, GridParams, GridRun};
use hcp_sim::market::{MarketParams, MarketSim};
use hcp_sim::replay::GridSeries;

use crate::controller::{Controller, DecisionContext};

/// Where grid prices come from.
pub enum GridSource {
    Simulated(Box<GridParams>),
    /// Recorded series by settlement point. A file with one settlement point serves every site.
    Recorded(BTreeMap<String, GridSeries>),
}

pub enum MarketSource {
    Simulated(MarketParams),
    /// Piecewise constant between rows.
    Recorded(Vec<MarketSignal>),
}

pub enum DemandSource {
    Simulated(DemandParams),
    /// A recorded trace, replayed per site scaled to the site's GPUs at the default per-GPU rate.
    Trace(Vec<Request>),
}

/// Telemetry step of the per-device fidelity.
pub const DEVICE_TELEMETRY_MS: i64 = 10_000;
/// Longest run the harness accepts (a bound on memory for series).
pub const MAX_INTERVALS: usize = 4 * 35_136 * 3;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub from: SimTime,
    pub to: SimTime,
    /// Decision and output interval (15 minutes by default; 5 minutes for 5-minute prices).
    pub interval_ms: i64,
    pub fidelity: Fidelity,
    pub seed: u64,
    /// Fixed charges added to the energy price when deciding and costing (USD/MWh).
    pub energy_adder_usd_per_mwh: f64,
}

impl Scenario {
    /// Step of the inner loop: 10 s telemetry per device, or the interval per cohort.
    pub fn step_ms(&self) -> i64 {
        match self.fidelity {
            Fidelity::Device => DEVICE_TELEMETRY_MS.min(self.interval_ms),
            Fidelity::Cohort => self.interval_ms,
        }
    }
}

/// The harness rejected its inputs before running.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct SetupError {
    pub field: String,
    pub rule: String,
}

impl SetupError {
    /// A parameter set's refusal, its field under `parent`.
    pub fn within(parent: &str, e: hcp_model::Invalid) -> Self {
        SetupError { field: format!("{parent}.{}", e.field), rule: e.rule }
    }
}

/// An invariant broke: where, what, and the seed that replays it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct Violation {
    pub seed: u64,
    pub at: SimTime,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant violated at {}: {} (seed={})", self.at, self.what, self.seed)
    }
}

/// One site over one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteRow {
    pub at: SimTime,
    pub site: String,
    pub rt_price_usd_per_mwh: f64,
    pub hashprice_usd_per_ph_day: f64,
    pub ambient_c: f64,
    pub four_cp_alert: bool,
    /// Programs with a deployment in force at the interval's start (e.g. `ERS-10`), `+`-joined.
    pub grid_event: String,
    pub cap_mw: f64,
    /// Mean power over the interval by device state.
    pub asic_hashing_mw: f64,
    pub asic_transition_mw: f64,
    pub asic_idle_mw: f64,
    pub gpu_serving_mw: f64,
    pub gpu_idle_mw: f64,
    pub peak_mw: f64,
    pub hashrate_ph_s: f64,
    pub reported_hashrate_ph_s: f64,
    /// Device counts at the end of the interval.
    pub asics_hashing: f64,
    pub asics_sleeping: f64,
    pub asics_off: f64,
    pub asics_faulted: f64,
    pub gpus_serving: f64,
    pub requests: f64,
    pub output_tokens: f64,
    pub asic_faults: f64,
    pub gpu_xid_events: f64,
    pub energy_mwh: f64,
    pub mining_revenue: MicroUsd,
    /// GPU-hours served x the market's GPU rental price (what the capacity earns at market rates).
    pub inference_revenue: MicroUsd,
    pub energy_cost: MicroUsd,
}

impl SiteRow {
    pub fn total_mw(&self) -> f64 {
        self.asic_hashing_mw + self.asic_transition_mw + self.asic_idle_mw + self.gpu_serving_mw + self.gpu_idle_mw
    }
    pub fn margin(&self) -> MicroUsd {
        self.mining_revenue + self.inference_revenue - self.energy_cost
    }
}

/// Totals of a run, per site and for the fleet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub energy_mwh: f64,
    pub mining_energy_mwh: f64,
    pub mining_revenue: MicroUsd,
    pub inference_revenue: MicroUsd,
    pub energy_cost: MicroUsd,
    pub hashrate_ph_s_hours: f64,
    /// Length of the period in hours (each interval counted once, however many sites).
    pub hours: f64,
    /// Sum of hours over site rows (the weight of the price averages).
    pub site_hours: f64,
    pub requests: f64,
    pub output_tokens: f64,
    pub asic_faults: f64,
    pub gpu_xid_events: f64,
    pub peak_mw: f64,
    /// Demand-response deployments announced at the site's settlement point.
    pub deployments: u64,
    pub price_x_hours: f64,
    pub hashprice_x_hours: f64,
    pub rows: u64,
}

impl Totals {
    /// Adds a site row; the caller adds the interval's hours once per interval.
    fn add(&mut self, r: &SiteRow, hours: f64) {
        self.energy_mwh += r.energy_mwh;
        self.mining_energy_mwh += (r.asic_hashing_mw + r.asic_transition_mw + r.asic_idle_mw) * hours;
        self.mining_revenue += r.mining_revenue;
        self.inference_revenue += r.inference_revenue;
        self.energy_cost += r.energy_cost;
        self.hashrate_ph_s_hours += r.hashrate_ph_s * hours;
        self.site_hours += hours;
        self.requests += r.requests;
        self.output_tokens += r.output_tokens;
        self.asic_faults += r.asic_faults;
        self.gpu_xid_events += r.gpu_xid_events;
        self.price_x_hours += r.rt_price_usd_per_mwh * hours;
        self.hashprice_x_hours += r.hashprice_usd_per_ph_day * hours;
        self.rows += 1;
    }
    pub fn margin(&self) -> MicroUsd {
        self.mining_revenue + self.inference_revenue - self.energy_cost
    }
    pub fn mean_mw(&self) -> f64 {
        if self.hours > 0.0 { self.energy_mwh / self.hours } else { 0.0 }
    }
    pub fn mean_hashrate_ph_s(&self) -> f64 {
        if self.hours > 0.0 { self.hashrate_ph_s_hours / self.hours } else { 0.0 }
    }
    pub fn mean_price(&self) -> f64 {
        if self.site_hours > 0.0 { self.price_x_hours / self.site_hours } else { 0.0 }
    }
    pub fn mean_hashprice(&self) -> f64 {
        if self.site_hours > 0.0 { self.hashprice_x_hours / self.site_hours } else { 0.0 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub fleet: String,
    pub controller: String,
    pub fidelity: Fidelity,
    pub seed: u64,
    pub from: SimTime,
    pub to: SimTime,
    pub steps: u64,
    pub device_steps: u64,
    pub sites: Vec<(String, Totals)>,
    pub total: Totals,
    /// Notes on inputs (a recorded series applied to every site, filled gaps, ...).
    pub notes: Vec<String>,
}

/// Everything a run needs, resolved.
pub struct Harness<'f> {
    fleet: &'f Fleet,
    groups: Vec<Group>,
    scenario: Scenario,
    grid: Vec<GridSeries>,
    /// Deployments by site, sorted by notice time.
    deployments: Vec<Vec<Deployment>>,
    market: Vec<MarketSignal>,
    demand: Vec<Demand>,
    notes: Vec<String>,
}

enum Demand {
    Sim(DemandSim),
    Trace(TraceDemand),
}

impl<'f> Harness<'f> {
    pub fn new(
        fleet: &'f Fleet,
        scenario: Scenario,
        grid: GridSource,
        market: MarketSource,
        demand: DemandSource,
    ) -> Result<Self, SetupError> {
        let err = |field: &str, rule: String| SetupError { field: field.into(), rule };
        let s = &scenario;
        if s.to <= s.from {
            return Err(err("to", format!("must be after from ({} is not after {})", s.to, s.from)));
        }
        if s.interval_ms <= 0 || s.interval_ms % s.step_ms() != 0 || s.interval_ms % 60_000 != 0 {
            return Err(err(
                "step",
                "must be a whole number of minutes and a multiple of the 10 s telemetry step".into(),
            ));
        }
        let intervals = (s.to.0 - s.from.0) / s.interval_ms;
        if intervals < 1 || intervals as usize > MAX_INTERVALS {
            return Err(err(
                "to",
                format!("the run must hold between 1 and {MAX_INTERVALS} intervals, not {intervals}"),
            ));
        }
        if !s.energy_adder_usd_per_mwh.is_finite() {
            return Err(err("energy_adder_usd_per_mwh", "must be finite".into()));
        }
        let mut notes = vec![];
        let points: Vec<String> = fleet.sites.iter().map(|x| x.settlement_point.clone()).collect();
        let mut unique: Vec<String> = points.clone();
        unique.sort();
        unique.dedup();
        let (series, grid_params): (Vec<GridSeries>, Option<GridParams>) = match grid {
            GridSource::Simulated(p) => {
                p.validate().map_err(|e| SetupError::within("grid", e))?;
                // One interval before the run, so the first decision has a last known price.
                let sim = grid::simulate(&GridRun {
                    params: &p,
                    from: s.from.plus_ms(-s.interval_ms),
                    to: s.to,
                    seed: s.seed,
                    settlement_points: &unique,
                });
                let by: BTreeMap<&str, &GridSeries> = unique.iter().map(String::as_str).zip(sim.iter()).collect();
                (points.iter().map(|sp| by[sp.as_str()].clone()).collect(), Some(*p))
            }
            GridSource::Recorded(map) => {
                let pick = |sp: &str| -> Result<GridSeries, SetupError> {
                    if map.len() == 1 {
                        return Ok(map.values().next().cloned().expect("one series"));
                    }
                    map.get(sp).cloned().ok_or_else(|| {
                        err(
                            "prices",
                            format!(
                                "no series for settlement point {sp} (the file has: {})",
                                map.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })
                };
                if map.len() == 1 {
                    let (sp, _) = map.iter().next().expect("one series");
                    // A file of one named point priced sites at other points: said as a warning,
                    // with the sites it applies to.
                    let elsewhere: Vec<String> = fleet
                        .sites
                        .iter()
                        .filter(|site| !sp.is_empty() && site.settlement_point != *sp)
                        .map(|site| format!("{} ({})", site.id, site.settlement_point))
                        .collect();
                    if elsewhere.is_empty() {
                        notes.push(format!(
                            "recorded prices of {} applied to every site",
                            if sp.is_empty() { "the file" } else { sp }
                        ));
                    } else {
                        notes.push(format!(
                            "warning: the price file holds only settlement point {sp}; its prices are applied to \
                             sites at other points: {}",
                            elsewhere.join(", ")
                        ));
                    }
                }
                // Every series used: what was repaired in it.
                let mut used: Vec<&String> =
                    if map.len() == 1 { map.keys().collect() } else { unique.iter().collect() };
                used.dedup();
                for sp in used {
                    if let Some(x) = map.get(sp.as_str())
                        && x.filled_gaps + x.dropped_duplicates > 0
                    {
                        let name = if sp.is_empty() { "the file" } else { sp.as_str() };
                        notes.push(format!(
                            "warning: prices of {name}: {} missing intervals filled forward, {} repeated timestamps \
                             dropped (the first of each kept)",
                            x.filled_gaps, x.dropped_duplicates
                        ));
                    }
                }
                let mut v = vec![];
                for sp in &points {
                    let mut x = pick(sp)?;
                    if x.start() > s.from || x.end() < s.to {
                        return Err(err(
                            "from",
                            format!(
                                "the period {}..{} is not inside the recorded prices {}..{}",
                                s.from,
                                s.to,
                                x.start(),
                                x.end()
                            ),
                        ));
                    }
                    // Finer prices average into the step; coarser ones hold over it.
                    if x.interval_ms < s.interval_ms && s.interval_ms % x.interval_ms == 0 {
                        x = x.resample_mean(s.interval_ms);
                        notes.push(format!(
                            "{} min prices averaged into {} min intervals",
                            x.interval_ms / 60_000,
                            s.interval_ms / 60_000
                        ));
                    } else if x.interval_ms % s.interval_ms != 0 {
                        return Err(err(
                            "step",
                            format!(
                                "the prices' {} s interval and the {} s step must divide one another",
                                x.interval_ms / 1000,
                                s.interval_ms / 1000
                            ),
                        ));
                    }
                    if x.signals.iter().all(|g| g.temperature_c.is_nan()) {
                        notes.push("no temperature in the prices file: using the default weather".into());
                    }
                    grid::mark_four_cp(&mut x);
                    v.push(x);
                }
                (v, None)
            }
        };
        // Deployments per settlement point, drawn from the prices the sites see (scarcity makes
        // them likelier); a recorded series uses the parameters fitted to it.
        // Sites on one settlement point share its series, so each point is fitted and drawn once.
        let mut by_point: BTreeMap<&str, Vec<Deployment>> = BTreeMap::new();
        let deployments: Vec<Vec<Deployment>> = series
            .iter()
            .map(|x| {
                by_point
                    .entry(x.settlement_point.as_str())
                    .or_insert_with(|| {
                        let params = grid_params.clone().unwrap_or_else(|| GridParams::fit(x));
                        let stream = hcp_sim::rng::mix64(
                            x.settlement_point.bytes().fold(s.seed, |h, b| hcp_sim::rng::mix64(h ^ u64::from(b))),
                        );
                        grid::deployments(x, &params, stream)
                    })
                    .clone()
            })
            .collect();
        // 5-minute runs on 15-minute prices: derive 5-minute prices that average to the 15-minute
        // ones (other coarser series hold their price over each step).
        let series: Vec<GridSeries> = series
            .into_iter()
            .map(|x| {
                if x.interval_ms == 15 * 60_000 && s.interval_ms == 5 * 60_000 {
                    grid::five_minute(&x, s.seed)
                } else {
                    x
                }
            })
            .collect();
        let market = match market {
            MarketSource::Simulated(p) => MarketSim::simulate(&p, s.from, s.to, s.interval_ms, s.seed),
            MarketSource::Recorded(v) => {
                if v.first().is_none_or(|m| m.at > s.from) {
                    return Err(err(
                        "market",
                        format!("the recorded market series must start at or before {}", s.from),
                    ));
                }
                v
            }
        };
        let mut sites_demand = vec![];
        let default_rps = DemandParams::default().rps_per_gpu;
        for site in &fleet.sites {
            let gpus = fleet
                .devices
                .iter()
                .filter(|d| d.site == site.idx && matches!(d.model, hcp_model::ModelRef::Gpu(_)))
                .count() as f64;
            let idx = u64::from(site.idx.0);
            sites_demand.push(match &demand {
                DemandSource::Simulated(p) => Demand::Sim(DemandSim::new(p.clone(), gpus, s.seed, idx)),
                DemandSource::Trace(t) => {
                    let span_s = (t[t.len() - 1].at.secs_since(t[0].at)).max(1.0);
                    let scale = gpus * default_rps / (t.len() as f64 / span_s);
                    Demand::Trace(TraceDemand::new(t.clone(), s.from, scale, s.seed, idx))
                }
            });
        }
        if let DemandSource::Trace(t) = &demand {
            notes.push(format!(
                "demand: recorded trace of {} requests, looped and scaled to {default_rps} req/s per GPU",
                t.len()
            ));
        }
        Ok(Harness {
            fleet,
            groups: fleet.groups(),
            scenario,
            grid: series,
            deployments,
            market,
            demand: sites_demand,
            notes,
        })
    }
}

fn finite_or(x: f64, default: f64) -> f64 {
    if x.is_finite() { x } else { default }
}

fn check_power(seed: u64, at: SimTime, what: &str, name: &str, power_w: f64, limit_w: f64) -> Result<(), Violation> {
    if power_w > limit_w * (1.0 + 1e-9) + 1e-6 {
        return Err(Violation {
            seed,
            at,
            what: format!("{what} {name} draws {:.1} kW above its {:.1} kW limit", power_w / 1e3, limit_w / 1e3),
        });
    }
    Ok(())
}

#[derive(Default, Clone)]
struct Acc {
    asic_hashing_j: f64,
    asic_transition_j: f64,
    asic_idle_j: f64,
    gpu_serving_j: f64,
    gpu_serving_s: f64,
    gpu_idle_j: f64,
    peak_w: f64,
    hash_th_s: f64,
    reported_th_s: f64,
    revenue_usd: f64,
    requests: f64,
    output_tokens: f64,
    faults: f64,
    xids: f64,
    end: [f64; 5],
}

impl Harness<'_> {
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn intervals(&self) -> u64 {
        ((self.scenario.to.0 - self.scenario.from.0) / self.scenario.interval_ms) as u64
    }

    fn market_at(&self, t: SimTime) -> &MarketSignal {
        let i = self.market.partition_point(|m| m.at <= t);
        &self.market[i.saturating_sub(1)]
    }

    fn ambient(&self, g: &GridSignal, site: usize) -> f64 {
        let air = if g.temperature_c.is_finite() { g.temperature_c } else { GridParams::default().temp_mean(g.at) };
        air + self.fleet.sites[site].ambient_offset_c
    }

    /// Runs the scenario with `controller`, streaming one row per site and interval to `on_row`
    /// and `(done, total)` intervals to `on_progress`.
    pub fn run(
        &mut self,
        controller: &mut dyn Controller,
        on_row: &mut dyn FnMut(&SiteRow),
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Summary, Violation> {
        let sc = self.scenario.clone();
        let seed = sc.seed;
        let fleet = self.fleet;
        let n_sites = fleet.sites.len();
        let step = sc.step_ms();
        let per_interval = sc.interval_ms / step;
        let total_intervals = self.intervals();
        let step_s = step as f64 / 1e3;
        let hours = sc.interval_ms as f64 / 3.6e6;
        let mut fleet_sim: Option<FleetSim> = None;
        let mut outs = Vec::with_capacity(self.groups.len());
        let mut site_totals = vec![Totals::default(); n_sites];
        let mut total = Totals::default();
        let mut steps = 0u64;
        let mut device_steps = 0u64;
        for i in 0..total_intervals {
            let t0 = sc.from.plus_ms(i as i64 * sc.interval_ms);
            let now_grid: Vec<GridSignal> = self.grid.iter().map(|g| *g.at(t0)).collect();
            let last_grid: Vec<GridSignal> = self.grid.iter().map(|g| *g.at(t0.plus_ms(-sc.interval_ms))).collect();
            let market = *self.market_at(t0);
            let four_cp: Vec<bool> = now_grid.iter().map(|g| g.four_cp_alert).collect();
            let announced: Vec<Vec<Deployment>> = self
                .deployments
                .iter()
                .map(|d| d.iter().filter(|x| x.notice_at <= t0 && x.end_at > t0).copied().collect())
                .collect();
            let horizon = controller.horizon_intervals();
            let (day_ahead, four_cp_ahead): (Vec<Vec<f64>>, Vec<Vec<bool>>) = self
                .grid
                .iter()
                .map(|g| {
                    (0..horizon as i64)
                        .map(|k| g.at(t0.plus_ms(k * sc.interval_ms)))
                        .map(|x| (x.da_price_usd_per_mwh, x.four_cp_alert))
                        .unzip()
                })
                .unzip();
            let ctx = DecisionContext {
                now: t0,
                fleet,
                groups: &self.groups,
                last_grid: &last_grid,
                four_cp_alert: &four_cp,
                deployments: &announced,
                market: &market,
                energy_adder_usd_per_mwh: sc.energy_adder_usd_per_mwh,
                day_ahead: &day_ahead,
                four_cp_ahead: &four_cp_ahead,
                actual: controller.foresight().then_some(&now_grid[..]),
                gpu_busy: &[],
            };
            let targets = controller.decide(&ctx);
            if targets.len() != self.groups.len() {
                return Err(Violation {
                    seed,
                    at: t0,
                    what: format!("controller returned {} targets for {} groups", targets.len(), self.groups.len()),
                });
            }
            let sim = fleet_sim.get_or_insert_with(|| FleetSim::new(fleet, sc.fidelity, &targets, seed));
            let mut acc = vec![Acc::default(); n_sites];
            let ambient: Vec<f64> = (0..n_sites).map(|s| self.ambient(&now_grid[s], s)).collect();
            for k in 0..per_interval {
                let t = t0.plus_ms(k * step);
                let mut env = Vec::with_capacity(n_sites);
                for (s, amb) in ambient.iter().enumerate() {
                    let d = match &mut self.demand[s] {
                        Demand::Sim(d) => d.step(t, step),
                        Demand::Trace(d) => d.step(t, step),
                    };
                    let n = d.requests as f64;
                    let w = if n > 0.0 {
                        Workload {
                            rate_rps: n / step_s,
                            prompt_tokens: d.prompt_tokens as f64 / n,
                            output_tokens: d.output_tokens as f64 / n,
                        }
                    } else {
                        Workload { rate_rps: 0.0, prompt_tokens: 1_000.0, output_tokens: 250.0 }
                    };
                    env.push(SiteEnv { ambient_c: *amb, workload: w });
                }
                sim.step(t.0, step, &targets, &env, &mut outs);
                steps += 1;
                let mut site_w = vec![0.0; n_sites];
                let mut feeder_w = vec![0.0; fleet.feeders.len()];
                for (g, o) in self.groups.iter().zip(&outs) {
                    let a = &mut acc[g.site.index()];
                    let p = o.power_w();
                    site_w[g.site.index()] += p;
                    feeder_w[g.feeder.index()] += p;
                    let n = f64::from(g.count());
                    device_steps += g.count() as u64;
                    let counted = match o {
                        GroupStep::Asic(x) => {
                            a.asic_hashing_j += x.hashing_w * step_s;
                            a.asic_transition_j += x.transition_w * step_s;
                            a.asic_idle_j += x.idle_w * step_s;
                            a.hash_th_s += x.hashrate_ths * step_s;
                            a.reported_th_s += x.reported_ths * step_s;
                            a.revenue_usd +=
                                x.hashrate_ths / 1_000.0 * market.hashprice_usd_per_ph_day * step_s / 86_400.0;
                            a.faults += x.faults;
                            if k == per_interval - 1 {
                                a.end[0] += x.n_hashing;
                                a.end[1] += x.n_sleeping;
                                a.end[2] += x.n_off;
                                a.end[3] += x.n_faulted;
                            }
                            x.n_hashing + x.n_transition + x.n_sleeping + x.n_off + x.n_faulted
                        }
                        GroupStep::Gpu(x) => {
                            a.gpu_serving_j += x.serving_w * step_s;
                            a.gpu_serving_s += x.n_serving * step_s;
                            a.gpu_idle_j += x.idle_w * step_s;
                            a.requests += x.requests_served;
                            a.output_tokens += x.output_tokens;
                            a.xids += x.xid_events;
                            if k == per_interval - 1 {
                                a.end[4] += x.n_serving;
                            }
                            x.n_serving + x.n_idle + x.n_off + x.n_faulted
                        }
                    };
                    if (counted - n).abs() > 1e-6 * n.max(1.0) {
                        return Err(Violation {
                            seed,
                            at: t,
                            what: format!(
                                "group of {} on feeder {} counts {counted} devices, not {n}",
                                fleet.model_id(g.model),
                                fleet.feeders[g.feeder.index()].id
                            ),
                        });
                    }
                }
                for (f, w) in fleet.feeders.iter().zip(&feeder_w) {
                    check_power(
                        seed,
                        t,
                        "feeder",
                        &format!("{}/{}", fleet.sites[f.site.index()].id, f.id),
                        *w,
                        f.limit_w,
                    )?;
                }
                for (s, w) in fleet.sites.iter().zip(&site_w) {
                    check_power(seed, t, "site", &s.id, *w, s.power_cap_w)?;
                    let a = &mut acc[s.idx.index()];
                    a.peak_w = a.peak_w.max(*w);
                }
                // The fleet's coincident peak.
                total.peak_mw = total.peak_mw.max(site_w.iter().sum::<f64>() / 1e6);
            }
            let dur_s = sc.interval_ms as f64 / 1e3;
            for (s, a) in acc.iter().enumerate() {
                let site = &fleet.sites[s];
                let mw = |j: f64| j / dur_s / 1e6;
                let energy_mwh = mwh(
                    (a.asic_hashing_j + a.asic_transition_j + a.asic_idle_j + a.gpu_serving_j + a.gpu_idle_j) / dur_s,
                    dur_s,
                );
                let price = now_grid[s].rt_price_usd_per_mwh;
                let row = SiteRow {
                    at: t0,
                    site: site.id.clone(),
                    rt_price_usd_per_mwh: price,
                    hashprice_usd_per_ph_day: market.hashprice_usd_per_ph_day,
                    ambient_c: ambient[s],
                    four_cp_alert: now_grid[s].four_cp_alert,
                    grid_event: announced[s].iter().map(|d| d.program.name()).collect::<Vec<_>>().join("+"),
                    cap_mw: site.power_cap_w / 1e6,
                    asic_hashing_mw: mw(a.asic_hashing_j),
                    asic_transition_mw: mw(a.asic_transition_j),
                    asic_idle_mw: mw(a.asic_idle_j),
                    gpu_serving_mw: mw(a.gpu_serving_j),
                    gpu_idle_mw: mw(a.gpu_idle_j),
                    peak_mw: a.peak_w / 1e6,
                    hashrate_ph_s: a.hash_th_s / dur_s / 1e3,
                    reported_hashrate_ph_s: a.reported_th_s / dur_s / 1e3,
                    asics_hashing: a.end[0],
                    asics_sleeping: a.end[1],
                    asics_off: a.end[2],
                    asics_faulted: a.end[3],
                    gpus_serving: a.end[4],
                    requests: a.requests,
                    output_tokens: a.output_tokens,
                    asic_faults: a.faults,
                    gpu_xid_events: a.xids,
                    energy_mwh,
                    mining_revenue: MicroUsd::from_usd_f64(a.revenue_usd),
                    inference_revenue: MicroUsd::from_usd_f64(
                        a.gpu_serving_s / 3_600.0 * finite_or(market.gpu_rental_usd_per_gpu_hour, 0.0),
                    ),
                    energy_cost: MicroUsd::from_usd_f64(energy_mwh * (price + sc.energy_adder_usd_per_mwh)),
                };
                // Energy balances: the metered energy is the sum of the energy by state.
                let by_state = row.total_mw() * hours;
                if (by_state - row.energy_mwh).abs() > 1e-9 * row.energy_mwh.abs().max(1.0) {
                    return Err(Violation {
                        seed,
                        at: t0,
                        what: format!(
                            "site {}: energy by state {by_state} MWh != metered {} MWh",
                            site.id, row.energy_mwh
                        ),
                    });
                }
                if row.peak_mw > row.cap_mw * (1.0 + 1e-9) {
                    return Err(Violation { seed, at: t0, what: format!("site {} peak above cap", site.id) });
                }
                site_totals[s].add(&row, hours);
                site_totals[s].hours += hours;
                let new = self.deployments[s]
                    .iter()
                    .filter(|d| d.notice_at >= t0 && d.notice_at < t0.plus_ms(sc.interval_ms))
                    .count() as u64;
                site_totals[s].deployments += new;
                total.deployments += new;
                site_totals[s].peak_mw = site_totals[s].peak_mw.max(row.peak_mw);
                total.add(&row, hours);
                on_row(&row);
            }
            total.hours += hours;
            on_progress(i + 1, total_intervals);
        }
        // Ledger check: the fleet's money is exactly the sum of its sites'.
        let sum = |f: fn(&Totals) -> MicroUsd| site_totals.iter().fold(MicroUsd::ZERO, |a, t| a + f(t));
        if sum(|t| t.mining_revenue) != total.mining_revenue
            || sum(|t| t.inference_revenue) != total.inference_revenue
            || sum(|t| t.energy_cost) != total.energy_cost
        {
            return Err(Violation { seed, at: sc.to, what: "site totals do not add up to the fleet total".into() });
        }
        Ok(Summary {
            fleet: fleet.name.clone(),
            controller: controller.name().to_string(),
            fidelity: sc.fidelity,
            seed,
            from: sc.from,
            to: sc.to,
            steps,
            device_steps,
            sites: fleet.sites.iter().map(|s| s.id.clone()).zip(site_totals).collect(),
            total,
            notes: self.notes.clone(),
        })
    }
}
