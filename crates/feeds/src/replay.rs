//! Recorded series replayed on the clock. The week of the series that holds `from` is laid on
//! the week of the clock's start (same weekday, same time of day: a shift of whole weeks), and each
//! value is published when it would have been known (the simulation's [`Publisher`]: real-time
//! prices at the end of their interval, the next day's day-ahead prices at 13:00, the market as
//! each row starts). When the series ends the feed says so (its prices then go stale).

use std::collections::BTreeMap;

use hcp_engine::io::Input;
use hcp_harness::world::Publisher;
use hcp_model::SimTime;
use hcp_sim::replay::{GridSeries, load_grid_csv, load_market_csv};

use crate::FeedError;
use crate::config::ReplayConfig;

const WEEK: i64 = 7 * 86_400_000;

pub struct ReplayFeed {
    name: String,
    publisher: Publisher,
    poll_s: u64,
}

/// The shift (whole weeks) that lays the series time `from` on or before `now` within a week.
pub fn week_shift(from: SimTime, now: SimTime) -> i64 {
    (now.0 - from.0).div_euclid(WEEK) * WEEK
}

impl ReplayFeed {
    /// The replay of `cfg` starting at market time `now`; errors name the file, line and column.
    pub fn new(cfg: &ReplayConfig, now: SimTime) -> Result<Self, FeedError> {
        let read = |p: &std::path::Path| {
            std::fs::File::open(p).map_err(|e| FeedError::malformed("replay", p.display().to_string(), e.to_string()))
        };
        let csv_err = |e: hcp_sim::replay::ReplayError| FeedError::malformed("replay", e.file.clone(), e.to_string());
        let mut points: BTreeMap<String, GridSeries> = BTreeMap::new();
        let mut names = vec![];
        if let Some(p) = &cfg.grid {
            points = load_grid_csv(&p.display().to_string(), read(p)?).map_err(csv_err)?;
            names.push(format!("csv:{}", p.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()));
        }
        let market = match &cfg.market {
            Some(p) => {
                names.push(format!("csv:{}", p.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()));
                load_market_csv(&p.display().to_string(), read(p)?).map_err(csv_err)?
            }
            None => vec![],
        };
        // Repaired intervals are said, never silent: a repeated timestamp keeps its first row.
        for (sp, x) in &points {
            if x.filled_gaps + x.dropped_duplicates > 0 {
                tracing::warn!(
                    feed = "replay",
                    settlement_point = %sp,
                    filled_gaps = x.filled_gaps,
                    dropped_duplicates = x.dropped_duplicates,
                    "recorded prices repaired: missing intervals filled forward, repeated timestamps dropped (the first kept)"
                );
            }
        }
        if !cfg.as_points.is_empty() {
            let Some((_, only)) = points.iter().next().filter(|_| points.len() == 1) else {
                return Err(FeedError::malformed(
                    "replay",
                    "as_points",
                    format!("needs a grid file with one settlement point, not {}", points.len()),
                ));
            };
            let only = only.clone();
            points = cfg
                .as_points
                .iter()
                .map(|p| (p.clone(), GridSeries { settlement_point: p.clone(), ..only.clone() }))
                .collect();
        }
        let first = points.values().map(GridSeries::start).chain(market.first().map(|m| m.at)).min();
        let last = points.values().map(GridSeries::end).chain(market.last().map(|m| m.at.plus_ms(86_400_000))).max();
        let (Some(first), Some(last)) = (first, last) else {
            return Err(FeedError::malformed("replay", "grid", "no data"));
        };
        let from = match &cfg.from {
            Some(f) => SimTime::parse(f).map_err(|e| FeedError::malformed("replay", "from", e.to_string()))?,
            None => SimTime(first.0.div_euclid(86_400_000) * 86_400_000),
        };
        if from < first || from >= last {
            return Err(FeedError::malformed(
                "replay",
                "from",
                format!("must be inside the series ({first} to {last})"),
            ));
        }
        let shift = week_shift(from, now);
        let name = names.join("+");
        let publisher = Publisher::new(
            points,
            BTreeMap::new(),
            market,
            now.max(first.plus_ms(shift)),
            last.plus_ms(shift),
            shift,
            &name,
        );
        Ok(ReplayFeed { name, publisher, poll_s: cfg.poll_s.unwrap_or(5) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn poll_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.poll_s)
    }

    /// What is published up to market time `now`.
    pub fn poll(&mut self, now: SimTime) -> Result<Vec<Input>, FeedError> {
        if now > self.publisher.to() {
            return Err(FeedError::Ended(format!("the recorded series ended at {}", self.publisher.to())));
        }
        let mut out = vec![];
        self.publisher.inputs(now, &mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_engine::io::PriceMarket;

    #[test]
    fn a_recorded_day_laid_on_the_current_week() {
        let dir = std::env::temp_dir().join(format!("hcp-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let grid = dir.join("grid.csv");
        let mut text = String::from("interval_start,settlement_point,rt_price_usd_per_mwh,da_price_usd_per_mwh\n");
        for q in 0..(96 * 3) {
            let t = SimTime::parse("2024-06-03").unwrap().plus_ms(q * 900_000);
            text.push_str(&format!("{},HB_SOUTH,{},{}\n", t, 20 + q, 30));
        }
        std::fs::write(&grid, text).unwrap();
        let cfg = ReplayConfig { grid: Some(grid), as_points: vec!["HB_X".into()], ..Default::default() };
        // 2026-12-07 is a Monday, as is 2024-06-03.
        let now = SimTime::parse("2026-12-07T10:07:00").unwrap();
        let mut f = ReplayFeed::new(&cfg, now).unwrap();
        let first = f.poll(now).unwrap();
        assert!(first.iter().all(|i| !matches!(i, Input::Price { market: PriceMarket::RealTime15, .. })));
        let next = f.poll(now.plus_ms(10 * 60_000)).unwrap();
        let rt: Vec<_> = next
            .iter()
            .filter_map(|i| match i {
                Input::Price { market: PriceMarket::RealTime15, at, usd_per_mwh, settlement_point, source } => {
                    Some((at.to_string(), *usd_per_mwh, settlement_point.clone(), source.clone()))
                }
                _ => None,
            })
            .collect();
        // The interval 10:00-10:15 ended at 10:15: its price is the 41st of the recorded day.
        assert_eq!(rt, vec![("2026-12-07T10:00:00".to_string(), 60.0, "HB_X".to_string(), "csv:grid.csv".to_string())]);
        let e = f.poll(SimTime::parse("2026-12-11").unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("the recorded series ended"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
