//! Billing periods: calendar months in UTC, named `YYYY-MM`.

use serde::Serialize;

const DAY_MS: i64 = 86_400_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Period {
    pub label: String,
    /// First millisecond of the month (inclusive), since the Unix epoch.
    pub start_ms: i64,
    /// First millisecond of the next month (exclusive).
    pub end_ms: i64,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil (year, month) of a day count since 1970-01-01.
fn civil_month(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

impl Period {
    pub fn month(year: i64, month: i64) -> Period {
        let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
        Period {
            label: format!("{year:04}-{month:02}"),
            start_ms: days_from_civil(year, month, 1) * DAY_MS,
            end_ms: days_from_civil(ny, nm, 1) * DAY_MS,
        }
    }

    /// `YYYY-MM`, years 2000 to 2999.
    pub fn parse(s: &str) -> Result<Period, String> {
        let bad = || format!("period: {s:?} must be a month as YYYY-MM");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let y: i64 = y.parse().map_err(|_| bad())?;
        let m: i64 = m.parse().map_err(|_| bad())?;
        if !(2000..=2999).contains(&y) || !(1..=12).contains(&m) {
            return Err(bad());
        }
        Ok(Period::month(y, m))
    }

    /// The month holding `ms`.
    pub fn containing(ms: i64) -> Period {
        let (y, m) = civil_month(ms.div_euclid(DAY_MS));
        Period::month(y, m)
    }

    pub fn next(&self) -> Period {
        Period::containing(self.end_ms)
    }

    pub fn hours(&self) -> f64 {
        (self.end_ms - self.start_ms) as f64 / 3_600_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months_in_utc() {
        let p = Period::parse("2026-11").unwrap();
        // 2026-11-01T00:00:00Z
        assert_eq!(p.start_ms, 1_793_491_200_000);
        assert_eq!(p.hours(), 30.0 * 24.0);
        assert_eq!(Period::parse("2024-02").unwrap().hours(), 29.0 * 24.0);
        assert_eq!(Period::containing(p.start_ms), p);
        assert_eq!(Period::containing(p.end_ms - 1), p);
        assert_eq!(p.next().label, "2026-12");
        assert_eq!(Period::parse("2026-12").unwrap().next().label, "2027-01");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "3000-01"] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
    }
}
