//! Recorded series: any simulated series can come from a CSV instead.
//!
//! - Grid prices: `interval_start, [settlement_point,] rt_price_usd_per_mwh, [da_price_usd_per_mwh,
//!   temperature_c, ...]` (the layout of `shared/data/ercot/*.csv`; extra columns are ignored).
//! - Inference arrivals: `TIMESTAMP, ContextTokens, GeneratedTokens` (the Azure LLM trace), or
//!   `timestamp, prompt_tokens, output_tokens`.
//! - Market: `timestamp, btc_usd, difficulty, [fees_btc_per_block]` or `timestamp,
//!   hashprice_usd_per_ph_day`.
//!
//! Malformed input gets a [`ReplayError`] naming the file, the line and the column, never a panic.
//! Header names are matched case-insensitively.

use std::collections::BTreeMap;
use std::io::Read;

use hcp_model::signals::{GridSignal, MarketSignal, Request};
use hcp_model::time::SimTime;

/// Bad recorded input: where, and which rule it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: line {line}, column {column}: {rule}")]
pub struct ReplayError {
    pub file: String,
    pub line: u64,
    /// Column name (and 1-based number), or `-` when the whole line is at fault.
    pub column: String,
    pub rule: String,
}

/// Upper bound on rows read from one file.
pub const MAX_ROWS: usize = 10_000_000;

struct Csv<'a> {
    file: &'a str,
    headers: Vec<String>,
    rdr: csv::Reader<Box<dyn Read + 'a>>,
}

struct Row<'c> {
    file: &'c str,
    headers: &'c [String],
    line: u64,
    rec: csv::StringRecord,
}

impl<'a> Csv<'a> {
    fn open(file: &'a str, input: impl Read + 'a) -> Result<Self, ReplayError> {
        let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(Box::new(input) as Box<dyn Read>);
        let headers = rdr
            .headers()
            .map_err(|e| ReplayError {
                file: file.into(),
                line: 1,
                column: "-".into(),
                rule: format!("unreadable header: {e}"),
            })?
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect();
        Ok(Csv { file, headers, rdr })
    }

    /// Index of the first header among `names`, or an error naming the first.
    fn column(&self, names: &[&str]) -> Result<usize, ReplayError> {
        self.find(names).ok_or_else(|| ReplayError {
            file: self.file.into(),
            line: 1,
            column: names[0].into(),
            rule: format!("missing column {:?} (header has: {})", names[0], self.headers.join(", ")),
        })
    }

    fn find(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.headers.iter().position(|h| h == n))
    }

    fn rows(&mut self) -> impl Iterator<Item = Result<Row<'_>, ReplayError>> + '_ {
        let file = self.file;
        let headers = &self.headers;
        self.rdr.records().enumerate().map(move |(i, r)| {
            if i >= MAX_ROWS {
                return Err(ReplayError {
                    file: file.into(),
                    line: i as u64 + 2,
                    column: "-".into(),
                    rule: format!("more than {MAX_ROWS} rows"),
                });
            }
            match r {
                Ok(rec) => Ok(Row { file, headers, line: rec.position().map_or(i as u64 + 2, |p| p.line()), rec }),
                Err(e) => {
                    let line = e.position().map_or(i as u64 + 2, |p| p.line());
                    let rule = match e.kind() {
                        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                            format!("expected {expected_len} fields like the header, found {len}")
                        }
                        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
                        _ => e.to_string(),
                    };
                    Err(ReplayError { file: file.into(), line, column: "-".into(), rule })
                }
            }
        })
    }
}

impl Row<'_> {
    fn err(&self, col: usize, rule: String) -> ReplayError {
        ReplayError {
            file: self.file.into(),
            line: self.line,
            column: format!("{} (#{})", self.headers.get(col).map_or("?", |s| s.as_str()), col + 1),
            rule,
        }
    }

    fn text(&self, col: usize) -> &str {
        self.rec.get(col).unwrap_or("")
    }

    fn time(&self, col: usize) -> Result<SimTime, ReplayError> {
        SimTime::parse(self.text(col)).map_err(|e| self.err(col, e.to_string()))
    }

    /// A finite number within `[lo, hi]`.
    fn num(&self, col: usize, lo: f64, hi: f64) -> Result<f64, ReplayError> {
        let t = self.text(col);
        let v: f64 = t.parse().map_err(|_| self.err(col, format!("expected a number, got {t:?}")))?;
        if !v.is_finite() || v < lo || v > hi {
            return Err(self.err(col, format!("{v} is outside the allowed range [{lo}, {hi}]")));
        }
        Ok(v)
    }
}

/// A regular series of grid intervals at one settlement point.
#[derive(Clone, Debug, PartialEq)]
pub struct GridSeries {
    pub settlement_point: String,
    pub interval_ms: i64,
    pub signals: Vec<GridSignal>,
    /// Intervals missing in the file (for example the DST spring-forward hour), filled with the
    /// previous interval's values.
    pub filled_gaps: usize,
    /// Repeated intervals (for example the DST fall-back hour); the first is kept.
    pub dropped_duplicates: usize,
}

impl GridSeries {
    pub fn start(&self) -> SimTime {
        self.signals[0].at
    }

    pub fn end(&self) -> SimTime {
        self.start().plus_ms(self.interval_ms * self.signals.len() as i64)
    }

    /// The interval containing `t`, clamped to the series.
    pub fn at(&self, t: SimTime) -> &GridSignal {
        let i = ((t.0 - self.start().0).div_euclid(self.interval_ms)).clamp(0, self.signals.len() as i64 - 1);
        &self.signals[i as usize]
    }

    /// Real-time prices in order.
    pub fn rt_prices(&self) -> Vec<f64> {
        self.signals.iter().map(|s| s.rt_price_usd_per_mwh).collect()
    }

    /// The series at a coarser interval (a multiple of its own): prices and temperature averaged,
    /// a 4CP alert if any part had one. A trailing partial interval is dropped.
    pub fn resample_mean(&self, interval_ms: i64) -> GridSeries {
        assert!(interval_ms % self.interval_ms == 0, "resample to a multiple of the interval");
        let k = (interval_ms / self.interval_ms) as usize;
        let signals = self
            .signals
            .chunks_exact(k)
            .map(|c| {
                let avg = |f: fn(&GridSignal) -> f64| c.iter().map(f).sum::<f64>() / k as f64;
                GridSignal {
                    at: c[0].at,
                    interval_ms,
                    rt_price_usd_per_mwh: avg(|s| s.rt_price_usd_per_mwh),
                    da_price_usd_per_mwh: avg(|s| s.da_price_usd_per_mwh),
                    temperature_c: avg(|s| s.temperature_c),
                    four_cp_alert: c.iter().any(|s| s.four_cp_alert),
                }
            })
            .collect();
        GridSeries { interval_ms, signals, ..self.clone() }
    }
}

/// ERCOT's price limits with margin: anything beyond is a data error, not a price.
const PRICE_MIN: f64 = -10_000.0;
const PRICE_MAX: f64 = 20_000.0;

/// Loads grid prices, one series per settlement point (sorted by name).
pub fn load_grid_csv(file: &str, input: impl Read) -> Result<BTreeMap<String, GridSeries>, ReplayError> {
    let mut csv = Csv::open(file, input)?;
    let c_at = csv.column(&["interval_start", "timestamp", "time"])?;
    let c_rt = csv.column(&["rt_price_usd_per_mwh", "rt_price", "price_usd_per_mwh"])?;
    let c_sp = csv.find(&["settlement_point"]);
    let c_da = csv.find(&["da_price_usd_per_mwh", "da_price"]);
    let c_temp = csv.find(&["temperature_c"]);
    let mut raw: BTreeMap<String, Vec<(u64, GridSignal)>> = BTreeMap::new();
    for row in csv.rows() {
        let row = row?;
        let at = row.time(c_at)?;
        let rt = row.num(c_rt, PRICE_MIN, PRICE_MAX)?;
        let da = match c_da {
            Some(c) if !row.text(c).is_empty() => row.num(c, PRICE_MIN, PRICE_MAX)?,
            _ => rt,
        };
        let temp = match c_temp {
            Some(c) if !row.text(c).is_empty() => row.num(c, -60.0, 70.0)?,
            _ => f64::NAN,
        };
        let sp = c_sp.map_or("", |c| row.text(c)).to_string();
        let sig = GridSignal {
            at,
            interval_ms: 0,
            rt_price_usd_per_mwh: rt,
            da_price_usd_per_mwh: da,
            temperature_c: temp,
            four_cp_alert: false,
        };
        raw.entry(sp).or_default().push((row.line, sig));
    }
    if raw.is_empty() {
        return Err(ReplayError { file: file.into(), line: 2, column: "-".into(), rule: "no data rows".into() });
    }
    let mut out = BTreeMap::new();
    for (sp, rows) in raw {
        out.insert(sp.clone(), regularise(file, sp, rows, c_at)?);
    }
    Ok(out)
}

fn regularise(file: &str, sp: String, rows: Vec<(u64, GridSignal)>, c_at: usize) -> Result<GridSeries, ReplayError> {
    let at_err = |line: u64, rule: String| ReplayError {
        file: file.into(),
        line,
        column: format!("interval_start (#{})", c_at + 1),
        rule,
    };
    // The interval is the most common positive step between consecutive rows.
    let mut steps: BTreeMap<i64, usize> = BTreeMap::new();
    for w in rows.windows(2) {
        let d = w[1].1.at.0 - w[0].1.at.0;
        if d > 0 {
            *steps.entry(d).or_default() += 1;
        }
    }
    let interval_ms = steps.iter().max_by_key(|(d, n)| (**n, std::cmp::Reverse(**d))).map_or(15 * 60_000, |(d, _)| *d);
    let mut signals: Vec<GridSignal> = Vec::with_capacity(rows.len());
    let (mut filled_gaps, mut dropped_duplicates) = (0, 0);
    for (line, mut s) in rows {
        s.interval_ms = interval_ms;
        if let Some(&prev) = signals.last() {
            let d = s.at.0 - prev.at.0;
            if d < 0 {
                return Err(at_err(line, format!("time goes backwards: {} after {}", s.at, prev.at)));
            }
            if d == 0 {
                dropped_duplicates += 1;
                continue;
            }
            if d % interval_ms != 0 {
                return Err(at_err(
                    line,
                    format!("{} is not on the {} s grid of this series", s.at, interval_ms / 1000),
                ));
            }
            let missing = d / interval_ms - 1;
            if missing > 96 * 7 {
                return Err(at_err(line, format!("gap of {missing} intervals before {} (more than a week)", s.at)));
            }
            for k in 1..=missing {
                signals.push(GridSignal { at: prev.at.plus_ms(k * interval_ms), ..prev });
                filled_gaps += 1;
            }
        }
        signals.push(s);
    }
    Ok(GridSeries { settlement_point: sp, interval_ms, signals, filled_gaps, dropped_duplicates })
}

/// Loads an inference arrival trace.
pub fn load_trace_csv(file: &str, input: impl Read) -> Result<Vec<Request>, ReplayError> {
    let mut csv = Csv::open(file, input)?;
    let c_at = csv.column(&["timestamp", "arrival_time", "time"])?;
    let c_in = csv.column(&["contexttokens", "prompt_tokens", "input_tokens"])?;
    let c_out = csv.column(&["generatedtokens", "output_tokens"])?;
    let mut out: Vec<Request> = Vec::new();
    for row in csv.rows() {
        let row = row?;
        let at = row.time(c_at)?;
        if let Some(prev) = out.last()
            && at < prev.at
        {
            return Err(row.err(c_at, format!("arrivals must not go backwards: {at} after {}", prev.at)));
        }
        let p = row.num(c_in, 0.0, 10_000_000.0)?;
        let o = row.num(c_out, 0.0, 10_000_000.0)?;
        if p.fract() != 0.0 || o.fract() != 0.0 {
            return Err(
                row.err(if p.fract() != 0.0 { c_in } else { c_out }, "token counts must be whole numbers".into())
            );
        }
        out.push(Request { at, prompt_tokens: p as u32, output_tokens: o as u32 });
    }
    if out.is_empty() {
        return Err(ReplayError { file: file.into(), line: 2, column: "-".into(), rule: "no data rows".into() });
    }
    Ok(out)
}

/// Loads a market series (piecewise constant between rows).
pub fn load_market_csv(file: &str, input: impl Read) -> Result<Vec<MarketSignal>, ReplayError> {
    let mut csv = Csv::open(file, input)?;
    let c_at = csv.column(&["timestamp", "time", "date"])?;
    // A hashprice column (the recorded daily file has one with fees, empty where fees are
    // unknown, and one from the subsidy alone, used where the first is empty).
    let c_hp = csv.find(&["hashprice_usd_per_ph_day", "hashprice_incl_fees_usd_per_ph_day"]);
    let c_hp_subsidy = csv.find(&["hashprice_subsidy_usd_per_ph_day"]);
    let (c_btc, c_diff) = match c_hp.or(c_hp_subsidy) {
        Some(_) => (csv.find(&["btc_usd", "btc_close_usd"]), csv.find(&["difficulty"])),
        None => (Some(csv.column(&["btc_usd", "btc_close_usd"])?), Some(csv.column(&["difficulty"])?)),
    };
    let c_fee = csv.find(&["fees_btc_per_block"]);
    let c_gpu = csv.find(&["gpu_rental_usd_per_gpu_hour"]);
    let c_height = csv.find(&["block_height", "height"]);
    let mut out: Vec<MarketSignal> = Vec::new();
    for row in csv.rows() {
        let row = row?;
        let at = row.time(c_at)?;
        if let Some(prev) = out.last()
            && at <= prev.at
        {
            return Err(row.err(c_at, format!("timestamps must increase: {at} after {}", prev.at)));
        }
        let btc = c_btc.map(|c| row.num(c, 1.0, 1e8)).transpose()?.unwrap_or(f64::NAN);
        let diff = c_diff.map(|c| row.num(c, 1.0, 1e18)).transpose()?.unwrap_or(f64::NAN);
        let fees = c_fee.map(|c| row.num(c, 0.0, 100.0)).transpose()?.unwrap_or(0.0);
        let height = match c_height {
            Some(c) => row.num(c, 0.0, 1e8)? as u64,
            None => height_at(at),
        };
        let subsidy = hcp_econ::subsidy_btc(height);
        let hp = match (c_hp, c_hp_subsidy) {
            (Some(c), Some(s)) if row.text(c).trim().is_empty() => row.num(s, 0.0, 1e6)?,
            (Some(c), _) => row.num(c, 0.0, 1e6)?,
            (None, Some(s)) => row.num(s, 0.0, 1e6)?,
            (None, None) => hcp_econ::hashprice_usd_per_ph_day(diff, subsidy, fees, btc),
        };
        let gpu = c_gpu.map(|c| row.num(c, 0.0, 1_000.0)).transpose()?.unwrap_or(f64::NAN);
        out.push(MarketSignal {
            at,
            btc_usd: btc,
            difficulty: diff,
            block_height: height,
            subsidy_btc: subsidy,
            fees_btc_per_block: fees,
            network_hashrate_ehs: if diff.is_finite() { hcp_econ::network_hashrate_hs(diff) / 1e18 } else { f64::NAN },
            hashprice_usd_per_ph_day: hp,
            gpu_rental_usd_per_gpu_hour: gpu,
        });
    }
    if out.is_empty() {
        return Err(ReplayError { file: file.into(), line: 2, column: "-".into(), rule: "no data rows".into() });
    }
    Ok(out)
}

/// Approximate block height at a date, from the last halvings (for subsidy when a market file has
/// no height column): 630,000 on 2020-05-11, 840,000 on 2024-04-20, then 144 blocks a day.
fn height_at(t: SimTime) -> u64 {
    let anchors = [("2016-07-09", 420_000.0), ("2020-05-11", 630_000.0), ("2024-04-20", 840_000.0)];
    let (date, h) =
        anchors.iter().rev().find(|(d, _)| SimTime::parse(d).is_ok_and(|a| a <= t)).copied().unwrap_or(anchors[0]);
    let days = t.secs_since(SimTime::parse(date).expect("valid anchor")) / 86_400.0;
    (h + 144.0 * days).max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(text: &str) -> Result<BTreeMap<String, GridSeries>, ReplayError> {
        load_grid_csv("p.csv", text.as_bytes())
    }

    const HEAD: &str =
        "interval_start,settlement_point,rt_price_usd_per_mwh,da_price_usd_per_mwh,temperature_c,dew_point_c\n";

    #[test]
    fn loads_the_ercot_layout() {
        let s = grid(&format!("{HEAD}2024-06-01T00:00:00,HB_SOUTH,17.69,24.57,29.2,21.5\n2024-06-01T00:15:00,HB_SOUTH,-3.5,24.57,29.2,21.5\n")).unwrap();
        let s = &s["HB_SOUTH"];
        assert_eq!(s.interval_ms, 900_000);
        assert_eq!(s.rt_prices(), vec![17.69, -3.5]);
        assert_eq!(s.signals[1].temperature_c, 29.2);
    }

    #[test]
    fn resamples_by_averaging() {
        let rows: String = (0..6).map(|i| format!("2024-06-01T00:{:02}:00,X,{},1,20,1\n", i * 5, i * 3)).collect();
        let s = &grid(&format!("{HEAD}{rows}")).unwrap()["X"];
        assert_eq!(s.interval_ms, 300_000);
        let q = s.resample_mean(900_000);
        assert_eq!(q.rt_prices(), vec![3.0, 12.0]);
        assert_eq!(q.signals[1].at, SimTime::parse("2024-06-01T00:15").unwrap());
    }

    #[test]
    fn fills_gaps_and_drops_repeats() {
        let rows = ["00:00", "00:15", "00:15", "01:00", "01:15"]
            .iter()
            .map(|t| format!("2024-03-10T{t}:00,X,1,1,1,1\n"))
            .collect::<String>();
        let s = &grid(&format!("{HEAD}{rows}")).unwrap()["X"];
        assert_eq!((s.signals.len(), s.filled_gaps, s.dropped_duplicates), (6, 2, 1));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let check = |body: &str, line: u64, column: &str, rule: &str| {
            let e = grid(&format!("{HEAD}{body}")).unwrap_err();
            assert_eq!((e.file.as_str(), e.line, e.column.as_str()), ("p.csv", line, column), "{e}");
            assert!(e.rule.contains(rule), "{e}");
        };
        check("2024-06-01T00:00:00,X,abc,1,1,1\n", 2, "rt_price_usd_per_mwh (#3)", "expected a number");
        check(
            "2024-06-01T00:00:00,X,1,1,1,1\n2024-06-01T00:15,X,1,1e9,1,1\n",
            3,
            "da_price_usd_per_mwh (#4)",
            "outside",
        );
        check("2024-06-01T00:00:00,X,1,1,1,1\nnot-a-time,X,1,1,1,1\n", 3, "interval_start (#1)", "date-time");
        check("2024-06-01T00:00:00,X,1,1,1,1\n2024-06-01T00:15:00,X,1\n", 3, "-", "expected 6 fields");
        check(
            "2024-06-01T00:15:00,X,1,1,1,1\n2024-06-01T00:30:00,X,1,1,1,1\n2024-06-01T00:00:00,X,1,1,1,1\n",
            4,
            "interval_start (#1)",
            "backwards",
        );
        check("2024-06-01T00:00:00,X,NaN,1,1,1\n", 2, "rt_price_usd_per_mwh (#3)", "outside");
        let e = load_grid_csv("p.csv", "a,b\n1,2\n".as_bytes()).unwrap_err();
        assert!(e.rule.contains("missing column \"interval_start\""), "{e}");
        assert!(load_grid_csv("p.csv", HEAD.as_bytes()).unwrap_err().rule.contains("no data"));
    }

    #[test]
    fn loads_a_trace_and_rejects_bad_tokens() {
        let t = load_trace_csv("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.03,3180,8\n".as_bytes()).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].prompt_tokens, t[1].output_tokens), (4808, 8));
        let e =
            load_trace_csv("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,-4,10\n".as_bytes())
                .unwrap_err();
        assert_eq!((e.line, e.column.as_str()), (2, "contexttokens (#2)"));
    }

    #[test]
    fn loads_a_market_series() {
        let m = load_market_csv(
            "m.csv",
            "timestamp,btc_usd,difficulty,fees_btc_per_block\n2025-01-01,91000,152e12,0.03\n".as_bytes(),
        )
        .unwrap();
        assert!((m[0].hashprice_usd_per_ph_day - 38.0).abs() < 1.0);
        assert_eq!(m[0].subsidy_btc, 3.125);
        let old =
            load_market_csv("m.csv", "timestamp,btc_usd,difficulty\n2022-06-01,30000,30e12\n".as_bytes()).unwrap();
        assert_eq!(old[0].subsidy_btc, 6.25);
        let m = load_market_csv("m.csv", "date,hashprice_usd_per_ph_day\n2025-01-01,44.3\n".as_bytes()).unwrap();
        assert_eq!(m[0].hashprice_usd_per_ph_day, 44.3);
        let e = load_market_csv("m.csv", "date,btc_usd\n2025-01-01,1\n".as_bytes()).unwrap_err();
        assert!(e.rule.contains("difficulty"));
    }
}
