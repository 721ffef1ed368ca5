//! Billing periods: calendar months in UTC, named `YYYY-MM`.

use hcp_model::Invalid;
use hcp_model::SimTime;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Period {
    pub label: String,
    /// First millisecond of the month (inclusive), since the Unix epoch.
    pub start_ms: i64,
    /// First millisecond of the next month (exclusive).
    pub end_ms: i64,
}

impl Period {
    /// The calendar arithmetic is `SimTime`'s (naive milliseconds since 1970-01-01, which read as
    /// UTC are Unix time).
    pub fn month(year: i32, month: u32) -> Period {
        let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
        let first = |y, m| SimTime::from_civil(y, m, 1, 0, 0, 0, 0).map_or(0, |t| t.0);
        Period { label: format!("{year:04}-{month:02}"), start_ms: first(year, month), end_ms: first(ny, nm) }
    }

    /// `YYYY-MM`, years 2000 to 2999.
    pub fn parse(s: &str) -> Result<Period, Invalid> {
        let bad = || Invalid::new("period", format!("{s:?} must be a month as YYYY-MM"));
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let y: i32 = y.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        if !(2000..=2999).contains(&y) || !(1..=12).contains(&m) {
            return Err(bad());
        }
        Ok(Period::month(y, m))
    }

    /// The month holding `ms`.
    pub fn containing(ms: i64) -> Period {
        let c = SimTime(ms).civil();
        Period::month(c.year, c.month)
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
