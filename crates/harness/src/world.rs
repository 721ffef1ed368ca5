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
    /// One series per distinct settlement point.
    points: BTreeMap<String, GridSeries>,
    deployments: BTreeMap<String, Vec<Deployment>>,
    market: Vec<MarketSignal>,
    agents: Agents,
    from: SimTime,
    to: SimTime,
    /// The last time inputs were produced for (signals are produced once, for `(last, now]`).
    last: Option<SimTime>,
    interval_ms: i64,
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
        grid_params.validate().map_err(|r| err("grid", r))?;
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
        let agents = Agents::new(fleet, agents, seed, from.0).map_err(|e| err("agents", e))?;
        Ok(SimWorld {
            points: points.into_iter().zip(sim).collect(),
            deployments,
            market,
            agents,
            from,
            to,
            last: None,
            interval_ms,
        })
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    pub fn to(&self) -> SimTime {
        self.to
    }

    /// A command reaches its device's agent.
    pub fn command(&mut self, c: &Command, now: SimTime) {
        self.agents.command(c, now.0);
    }

    /// Everything the world tells the engine at `now` (what happened since the last call):
    /// signals first, then the devices' reports and answers.
    pub fn inputs(&mut self, now: SimTime, out: &mut Vec<Input>) {
        // The first call also tells what was already known at the start.
        let first = self.last.is_none();
        let prev = self.last.unwrap_or(SimTime(self.from.0 - 1));
        if now <= prev {
            return;
        }
        self.last = Some(now);
        let iv = self.interval_ms;
        let day = 86_400_000;
        for (sp, series) in &self.points {
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
                    let g = series.at(at);
                    out.push(Input::Price {
                        settlement_point: sp.clone(),
                        market: PriceMarket::DayAhead,
                        at,
                        usd_per_mwh: g.da_price_usd_per_mwh,
                        source: SOURCE.into(),
                    });
                }
                for q in 0..(day / iv) {
                    let at = SimTime(d + q * iv);
                    if series.at(at).four_cp_alert {
                        out.push(Input::FourCp {
                            settlement_point: sp.clone(),
                            at,
                            alert: true,
                            source: SOURCE.into(),
                        });
                    }
                }
            }
            // Real-time: an interval's price when it ends, with the weather of its end.
            let mut end = (prev.0.div_euclid(iv) + 1) * iv;
            while end <= now.0 {
                if end <= self.to.0 {
                    let at = SimTime(end - iv);
                    let g = series.at(at);
                    out.push(Input::Price {
                        settlement_point: sp.clone(),
                        market: PriceMarket::RealTime15,
                        at,
                        usd_per_mwh: g.rt_price_usd_per_mwh,
                        source: SOURCE.into(),
                    });
                    let t = series.at(SimTime(end)).temperature_c;
                    let temperature_c = if t.is_finite() { t } else { GridParams::default().temp_mean(SimTime(end)) };
                    out.push(Input::Weather { settlement_point: sp.clone(), temperature_c, source: SOURCE.into() });
                }
                end += iv;
            }
            for d in self.deployments.get(sp).into_iter().flatten() {
                if d.notice_at > prev && d.notice_at <= now {
                    out.push(Input::Deployment { settlement_point: sp.clone(), deployment: *d, source: SOURCE.into() });
                }
            }
        }
        // The market: each interval's signal as it starts (and the one in force at the start).
        let i0 = self.market.partition_point(|m| m.at <= prev);
        let i1 = self.market.partition_point(|m| m.at <= now);
        let from = if first { i1.saturating_sub(1) } else { i0 };
        for m in &self.market[from.min(i1)..i1] {
            out.push(Input::Market { signal: *m, source: SOURCE.into() });
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
