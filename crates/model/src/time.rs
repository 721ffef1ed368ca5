//! Simulated time: milliseconds since 1970-01-01T00:00:00 of the market's local clock.
//!
//! HCP never reads the wall clock in its core. Every timestamp is a [`SimTime`]; the adapters
//! that talk to the real world convert at the edge. Market data (ERCOT) is published in local time
//! without an offset, so `SimTime` is a naive local time: calendar fields (hour, month, weekday)
//! come straight from it, which is what daily shapes and 4CP windows are defined in.

use std::fmt;

/// A point in simulated (market-local) time, in milliseconds since 1970-01-01T00:00:00.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SimTime(pub i64);

/// Wall-clock time: milliseconds since 1970-01-01T00:00:00 UTC, as a real clock gives it. Its
/// own type, so that nothing mixes it with [`SimTime`] by accident: [`MarketClock`] (live mode)
/// and [`DemoClock`] (accelerated simulation) are the only conversions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime(pub i64);

/// Live mode: market time is wall-clock time at the market's fixed offset from UTC (ERCOT's
/// Central Standard Time: -6 h; a market that shifts for daylight saving is given its standard
/// offset, and its published local times carry the DST flag the feed adapter reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarketClock {
    pub utc_offset_ms: i64,
}

impl MarketClock {
    pub const ERCOT: MarketClock = MarketClock { utc_offset_ms: -6 * 3_600_000 };

    pub fn market_time(&self, w: WallTime) -> SimTime {
        SimTime(w.0 + self.utc_offset_ms)
    }

    pub fn wall_time(&self, t: SimTime) -> WallTime {
        WallTime(t.0 - self.utc_offset_ms)
    }
}

/// Demo mode: simulated time starts at `sim_start` when the wall clock reads `wall_start` and runs
/// `speed` times as fast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DemoClock {
    pub wall_start: WallTime,
    pub sim_start: SimTime,
    pub speed: f64,
}

impl DemoClock {
    /// Simulated time at a wall-clock time (never before `sim_start`).
    pub fn sim_time(&self, w: WallTime) -> SimTime {
        let elapsed = (w.0 - self.wall_start.0).max(0) as f64;
        SimTime(self.sim_start.0 + (elapsed * self.speed) as i64)
    }

    /// The wall-clock time at which simulated time reaches `t`.
    pub fn wall_time(&self, t: SimTime) -> WallTime {
        let sim = (t.0 - self.sim_start.0).max(0) as f64;
        WallTime(self.wall_start.0 + (sim / self.speed.max(1e-9)).ceil() as i64)
    }
}

/// Milliseconds per second, minute, hour, day.
pub const MS_PER_S: i64 = 1_000;
pub const MS_PER_MIN: i64 = 60 * MS_PER_S;
pub const MS_PER_HOUR: i64 = 60 * MS_PER_MIN;
pub const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// Calendar fields of a [`SimTime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i32,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
    /// 0 = Monday .. 6 = Sunday
    pub weekday: u32,
}

/// Why a timestamp or duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeParseError {
    #[error("expected a date-time like 2024-06-01, 2024-06-01T00:15:00 or 2023-11-16 18:17:03.97, got {0:?}")]
    Format(String),
    #[error("{0:?} is not a valid calendar date or time of day")]
    Range(String),
    #[error("expected a duration like 10s, 5m, 15m, 1h or 1d (a positive number and a unit), got {0:?}")]
    Duration(String),
}

// Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (Hinnant's algorithm).
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl SimTime {
    pub const EPOCH: SimTime = SimTime(0);

    /// Builds a time from calendar fields; `None` if a field is out of range.
    pub fn from_civil(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> Option<Self> {
        if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 {
            return None;
        }
        if s > 59 || ms > 999 {
            return None;
        }
        let days = days_from_civil(y, mo, d);
        let ms_of_day =
            i64::from(h) * MS_PER_HOUR + i64::from(mi) * MS_PER_MIN + i64::from(s) * MS_PER_S + i64::from(ms);
        Some(SimTime(days * MS_PER_DAY + ms_of_day))
    }

    pub fn civil(self) -> Civil {
        let days = self.0.div_euclid(MS_PER_DAY);
        let rem = self.0.rem_euclid(MS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: (rem / MS_PER_HOUR) as u32,
            minute: (rem % MS_PER_HOUR / MS_PER_MIN) as u32,
            second: (rem % MS_PER_MIN / MS_PER_S) as u32,
            millis: (rem % MS_PER_S) as u32,
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            weekday: (days + 3).rem_euclid(7) as u32,
        }
    }

    /// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS[.fraction]]` or the same with a space.
    /// Fractions beyond milliseconds are truncated.
    pub fn parse(s: &str) -> Result<Self, TimeParseError> {
        let fmt = || TimeParseError::Format(s.to_string());
        let t = s.trim();
        let (date, time) = match t.find(['T', ' ']) {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        };
        let mut dp = date.split('-');
        let (Some(y), Some(mo), Some(d), None) = (dp.next(), dp.next(), dp.next(), dp.next()) else {
            return Err(fmt());
        };
        if y.len() != 4 || mo.len() != 2 || d.len() != 2 {
            return Err(fmt());
        }
        let num = |x: &str| -> Result<u32, TimeParseError> {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fmt());
            }
            x.parse::<u32>().map_err(|_| fmt())
        };
        let (y, mo, d) = (num(y)? as i32, num(mo)?, num(d)?);
        let (mut h, mut mi, mut sec, mut ms) = (0, 0, 0, 0);
        if let Some(time) = time {
            let mut tp = time.split(':');
            h = num(tp.next().ok_or_else(fmt)?)?;
            mi = num(tp.next().ok_or_else(fmt)?)?;
            if let Some(sp) = tp.next() {
                let (whole, frac) = match sp.split_once('.') {
                    Some((w, f)) => (w, Some(f)),
                    None => (sp, None),
                };
                sec = num(whole)?;
                if let Some(f) = frac {
                    num(f)?;
                    let digits: String = f.chars().chain("000".chars()).take(3).collect();
                    ms = num(&digits)?;
                }
            }
            if tp.next().is_some() {
                return Err(fmt());
            }
        }
        SimTime::from_civil(y, mo, d, h, mi, sec, ms).ok_or_else(|| TimeParseError::Range(s.into()))
    }

    pub fn plus_ms(self, ms: i64) -> Self {
        SimTime(self.0 + ms)
    }

    /// Hours (fractional) since midnight, local.
    pub fn hour_of_day(self) -> f64 {
        self.0.rem_euclid(MS_PER_DAY) as f64 / MS_PER_HOUR as f64
    }

    /// Day of the year, 0-based, as a fraction of the year (0.0 = 1 January).
    pub fn year_fraction(self) -> f64 {
        let c = self.civil();
        let start = days_from_civil(c.year, 1, 1);
        let days = self.0.div_euclid(MS_PER_DAY) - start;
        let len = if days_in_month(c.year, 2) == 29 { 366.0 } else { 365.0 };
        (days as f64 + self.hour_of_day() / 24.0) / len
    }

    pub fn secs_since(self, earlier: SimTime) -> f64 {
        (self.0 - earlier.0) as f64 / 1_000.0
    }
}

impl fmt::Display for SimTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.civil();
        write!(f, "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", c.year, c.month, c.day, c.hour, c.minute, c.second)?;
        if c.millis != 0 {
            write!(f, ".{:03}", c.millis)?;
        }
        Ok(())
    }
}

/// Parses a duration such as `10s`, `5m`, `15m`, `1h`, `1d` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, TimeParseError> {
    let err = || TimeParseError::Duration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = t.split_at(split);
    let n: i64 = n.parse().map_err(|_| err())?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => MS_PER_S,
        "m" | "min" => MS_PER_MIN,
        "h" => MS_PER_HOUR,
        "d" => MS_PER_DAY,
        _ => return Err(err()),
    };
    if n <= 0 {
        return Err(err());
    }
    n.checked_mul(unit_ms).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_formats_of_our_data_files() {
        let t = SimTime::parse("2024-06-01T00:15:00").unwrap();
        assert_eq!(t.to_string(), "2024-06-01T00:15:00");
        let t = SimTime::parse("2023-11-16 18:17:03.9799600").unwrap();
        assert_eq!(t.to_string(), "2023-11-16T18:17:03.979");
        assert_eq!(SimTime::parse("2024-06-01").unwrap().civil().hour, 0);
        // 2024-06-01 was a Saturday.
        assert_eq!(SimTime::parse("2024-06-01").unwrap().civil().weekday, 5);
    }

    #[test]
    fn rejects_bad_dates_with_the_reason() {
        for bad in ["2024-13-01", "2024-02-30", "2024-06-01T24:00", "2023-02-29"] {
            assert!(matches!(SimTime::parse(bad), Err(TimeParseError::Range(_))), "{bad}");
        }
        for bad in ["", "2024/06/01", "2024-6-1", "2024-06-01T00", "x024-06-01", "2024-06-01T00:00:00:00"] {
            assert!(matches!(SimTime::parse(bad), Err(TimeParseError::Format(_))), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("15m").unwrap(), 15 * MS_PER_MIN);
        assert_eq!(parse_duration_ms("10s").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("1d").unwrap(), MS_PER_DAY);
        for bad in ["", "m", "0s", "15", "15x", "-5m"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn civil_round_trips(ms in -5_000_000_000_000i64..10_000_000_000_000i64) {
            let t = SimTime(ms);
            let c = t.civil();
            let back = SimTime::from_civil(c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis).unwrap();
            prop_assert_eq!(back, t);
            prop_assert_eq!(SimTime::parse(&t.to_string()).unwrap(), t);
        }
    }
}
