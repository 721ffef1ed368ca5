//! A simulated world that drives the engine: the grid (real-time prices published at the end of
//! each interval, day-ahead prices published at 13:00 for the next day, 4CP alerts with them,
//! deployments at their notice), the BTC market, and the devices (the seeded agents of
//! [`hcp_sim::agents`], the one simulation of the devices). It produces the engine's inputs at each
//! time and takes its commands.
//!
//! Architecture invariant: pure and deterministic (seeded, simulated time).

use std::collections::BTreeMap;

use hcp_engine::io::{Input, PriceMarket};
use hcp_fleet::Command;
use hcp_model::SimTime;
use hcp_model::fleet::Fleet;
use hcp_model::ids::DeviceIdx;
use hcp_model::signals::{Deployment, MarketSignal};
use hcp_sim::agents::{AgentParams, Agents};
use hcp_sim::grid::{self, GridParams, GridRun};
use hcp_sim::market::{MarketParams, MarketSim};
use hcp_sim::replay::GridSeries;

use crate::run::SetupError;

/// The source name simulated signals carry.
pub const SOURCE: &str = "sim";

/// Hour of the day (market time) at which the next day's day-ahead prices are published.
pub const DAY_AHEAD_PUBLISHED_HOUR: i64 = 13;

pub struct SimWorld {
    /// The grid and market signals; none in live mode, where feeds bring them.
    signals: Option<Publisher>,
    agents: Agents,
}

/// Publishes grid and market series (simulated, or recorded and replayed) as the engine's inputs,
/// each when it would be known: a real-time price at the end of its interval with the weather of
/// that moment, the next day's day-ahead prices and 4CP alerts at 13:00, a deployment at its
/// notice, a market signal as its interval starts. The series may be shifted in time (a replay
/// of a recorded series on today's calendar): a series time `s` is published at `s + shift_ms`.
pub struct Publisher {
    points: BTreeMap<String, GridSeries>,
    deployments: BTreeMap<String, Vec<Deployment>>,
    market: Vec<MarketSignal>,
    /// Shifted times: what is published starts at `from` and ends at `to`.
    from: SimTime,
    to: SimTime,
    shift_ms: i64,
    /// The last time inputs were produced for (signals are produced once, for `(last, now]`).
    last: Option<SimTime>,
    interval_ms: i64,
    source: String,
}

impl Publisher {
    /// Series of settlement points (with their deployments) and a market series, published
    /// `shift_ms` later than their own times, from `from` to `to` (shifted times), as `source`.
    pub fn new(
        points: BTreeMap<String, GridSeries>,
        deployments: BTreeMap<String, Vec<Deployment>>,
        market: Vec<MarketSignal>,
        from: SimTime,
        to: SimTime,
        shift_ms: i64,
        source: &str,
    ) -> Self {
        Publisher {
            points,
            deployments,
            market,
            from,
            to,
            shift_ms,
            last: None,
            interval_ms: 15 * 60_000,
            source: source.into(),
        }
    }

    /// The end of what is published (shifted time).
    pub fn to(&self) -> SimTime {
        self.to
    }

    /// Everything published in `(last call, now]`; the first call also tells what was already
    /// known at the start (the day's and the next day's day-ahead prices, the market in force).
    pub fn inputs(&mut self, now: SimTime, out: &mut Vec<Input>) {
        let first = self.last.is_none();
        let prev = self.last.unwrap_or(SimTime(self.from.0 - 1));
        if now <= prev {
            return;
        }
        self.last = Some(now);
        let iv = self.interval_ms;
        let day = 86_400_000;
        let shift = self.shift_ms;
        let source = &self.source;
        for (sp, series) in &self.points {
            let at_series = |t: i64| series.at(SimTime(t - shift));
            // Day-ahead: at the start the day and the next, then each day at 13:00 the next day.
            let mut days = vec![];
            if first {
                let d0 = now.0.div_euclid(day) * day;
                days.push(d0);
                days.push(d0 + day);
            }
            let mut k = prev.0.div_euclid(day) * day + DAY_AHEAD_PUBLISHED_HOUR * 3_600_000;
            while k <= now.0 {
                if k > prev.0 && now < self.to {
                    days.push(k.div_euclid(day) * day + day);
                }
                k += day;
            }
            days.sort();
            days.dedup();
            for d in days {
                for h in 0..24 {
                    let at = SimTime(d + h * 3_600_000);
                    out.push(Input::Price {
                        settlement_point: sp.clone(),
                        market: PriceMarket::DayAhead,
                        at,
                        usd_per_mwh: at_series(at.0).da_price_usd_per_mwh,
                        source: source.clone(),
                    });
                }
                for q in 0..(day / iv) {
                    let at = SimTime(d + q * iv);
                    if at_series(at.0).four_cp_alert {
                        out.push(Input::FourCp {
                            settlement_point: sp.clone(),
                            at,
                            alert: true,
                            source: source.clone(),
                        });
                    }
                }
            }
            // Real-time: an interval's price when it ends, with the weather of its end.
            let mut end = (prev.0.div_euclid(iv) + 1) * iv;
            while end <= now.0 {
                if end <= self.to.0 {
                    let at = SimTime(end - iv);
                    out.push(Input::Price {
                        settlement_point: sp.clone(),
                        market: PriceMarket::RealTime15,
                        at,
                        usd_per_mwh: at_series(at.0).rt_price_usd_per_mwh,
                        source: source.clone(),
                    });
                    let t = at_series(end).temperature_c;
                    let temperature_c = if t.is_finite() { t } else { GridParams::default().temp_mean(SimTime(end)) };
                    out.push(Input::Weather { settlement_point: sp.clone(), temperature_c, source: source.clone() });
                }
                end += iv;
            }
            for d in self.deployments.get(sp).into_iter().flatten() {
                let notice = d.notice_at.plus_ms(shift);
                if notice > prev && notice <= now {
                    let deployment = Deployment {
                        notice_at: notice,
                        respond_by: d.respond_by.plus_ms(shift),
                        end_at: d.end_at.plus_ms(shift),
                        ..*d
                    };
                    out.push(Input::Deployment { settlement_point: sp.clone(), deployment, source: source.clone() });
                }
            }
        }
        // The market: each interval's signal as it starts (and the one in force at the start).
        let i0 = self.market.partition_point(|m| m.at.plus_ms(shift) <= prev);
        let i1 = self.market.partition_point(|m| m.at.plus_ms(shift) <= now);
        let from = if first { i1.saturating_sub(1) } else { i0 };
        for m in &self.market[from.min(i1)..i1] {
            let signal = MarketSignal { at: m.at.plus_ms(shift), ..*m };
            out.push(Input::Market { signal, source: source.clone() });
        }
    }
}

impl SimWorld {
    /// A world of `fleet` from `from` to `to` (signals end there), seeded.
    pub fn new(
        fleet: &Fleet,
        from: SimTime,
        to: SimTime,
        seed: u64,
        grid_params: &GridParams,
        market: &MarketParams,
        agents: AgentParams,
    ) -> Result<Self, SetupError> {
        let err = |field: &str, rule: String| SetupError { field: field.into(), rule };
        if to <= from {
            return Err(err("to", format!("must be after from ({to} is not after {from})")));
        }
        grid_params.validate().map_err(|e| SetupError::within("grid", e))?;
        let interval_ms = 15 * 60_000;
        let mut points: Vec<String> = fleet.sites.iter().map(|s| s.settlement_point.clone()).collect();
        points.sort();
        points.dedup();
        // A day before the start (the first decisions have a last price and a day ahead) and two
        // after the end (the day ahead of the last day).
        let sim = grid::simulate(&GridRun {
            params: grid_params,
            from: SimTime(from.0.div_euclid(86_400_000) * 86_400_000 - 86_400_000),
            to: to.plus_ms(2 * 86_400_000),
            seed,
            settlement_points: &points,
        });
        let mut deployments = BTreeMap::new();
        for (sp, x) in points.iter().zip(&sim) {
            let stream = hcp_sim::rng::mix64(sp.bytes().fold(seed, |h, b| hcp_sim::rng::mix64(h ^ u64::from(b))));
            deployments.insert(sp.clone(), grid::deployments(x, grid_params, stream));
        }
        let market = MarketSim::simulate(market, from.plus_ms(-interval_ms), to, interval_ms, seed);
        let agents = Agents::new(fleet, agents, seed, from.0).map_err(|e| SetupError::within("agents", e))?;
        let points = points.into_iter().zip(sim).collect();
        Ok(SimWorld { signals: Some(Publisher::new(points, deployments, market, from, to, 0, SOURCE)), agents })
    }

    /// Only the devices (seeded agents from `from`): the signals come from elsewhere (live
    /// mode's feeds). The devices stay simulated until a site agent drives real ones.
    pub fn devices_only(fleet: &Fleet, from: SimTime, seed: u64, agents: AgentParams) -> Result<Self, SetupError> {
        let agents = Agents::new(fleet, agents, seed, from.0).map_err(|e| SetupError::within("agents", e))?;
        Ok(SimWorld { signals: None, agents })
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    /// The end of the simulated signals (none: never).
    pub fn to(&self) -> Option<SimTime> {
        self.signals.as_ref().map(Publisher::to)
    }

    /// A command reaches its device's agent.
    pub fn command(&mut self, c: &Command, now: SimTime) {
        self.agents.command(c, now.0);
    }

    /// Everything the world tells the engine at `now` (what happened since the last call):
    /// signals first, then the devices' reports and answers.
    pub fn inputs(&mut self, now: SimTime, out: &mut Vec<Input>) {
        if let Some(p) = &mut self.signals {
            p.inputs(now, out);
        }
        // The devices.
        let (mut reports, mut answers) = (vec![], vec![]);
        self.agents.step(now.0, &mut reports, &mut answers);
        out.extend(reports.into_iter().map(|(device, report)| Input::Telemetry { device, report }));
        out.extend(answers.into_iter().map(|(id, device, outcome)| Input::CommandResult { id, device, outcome }));
    }

    /// What every device of a list draws now (W), from the agents' state.
    pub fn draw_w(&self, devices: impl Iterator<Item = DeviceIdx>) -> f64 {
        devices.filter_map(|d| self.agents.power_w(d)).sum()
    }
}
