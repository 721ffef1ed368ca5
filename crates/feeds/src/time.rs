//! ERCOT publishes in Central Prevailing Time (CST, or CDT from the second Sunday of March 02:00
//! to the first Sunday of November 02:00, with a flag on the repeated hour); the engine's market
//! time is Central Standard Time all year ([`hcp_model::MarketClock::ERCOT`]). These convert.

use hcp_model::SimTime;

const HOUR: i64 = 3_600_000;

/// The day of month of the `n`th Sunday of a month (n from 1).
fn nth_sunday(year: i32, month: u32, n: u32) -> u32 {
    let first = SimTime::from_civil(year, month, 1, 0, 0, 0, 0).expect("a valid date").civil().weekday;
    // weekday: 0 = Monday .. 6 = Sunday
    1 + (6 + 7 - first) % 7 + 7 * (n - 1)
}

/// Whether daylight saving time is in force at a standard-time instant (US rules since 2007).
pub fn is_dst(t: SimTime) -> bool {
    let y = t.civil().year;
    let start = SimTime::from_civil(y, 3, nth_sunday(y, 3, 2), 2, 0, 0, 0).expect("valid");
    // 02:00 CDT is 01:00 CST.
    let end = SimTime::from_civil(y, 11, nth_sunday(y, 11, 1), 1, 0, 0, 0).expect("valid");
    t >= start && t < end
}

/// Market (standard) time of a prevailing local time; `repeated` marks the second 01:00-02:00
/// of the fall-back day (ERCOT's `DSTFlag`).
pub fn from_prevailing(local: SimTime, repeated: bool) -> SimTime {
    if repeated {
        return local;
    }
    let earlier = local.plus_ms(-HOUR);
    if is_dst(earlier) { earlier } else { local }
}

/// Prevailing local time of a market (standard) time.
pub fn to_prevailing(t: SimTime) -> SimTime {
    if is_dst(t) { t.plus_ms(HOUR) } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SimTime {
        SimTime::parse(s).unwrap()
    }

    #[test]
    fn prevailing_and_standard_time_around_both_changes() {
        // 2024: DST from 10 March 02:00 CST to 3 November 01:00 CST.
        assert!(!is_dst(t("2024-03-10T01:59:00")));
        assert!(is_dst(t("2024-03-10T02:00:00")));
        assert!(is_dst(t("2024-11-03T00:59:00")));
        assert!(!is_dst(t("2024-11-03T01:00:00")));
        // Summer: prevailing is an hour ahead.
        assert_eq!(from_prevailing(t("2024-06-01T14:00:00"), false), t("2024-06-01T13:00:00"));
        assert_eq!(to_prevailing(t("2024-06-01T13:00:00")), t("2024-06-01T14:00:00"));
        // Winter: the same.
        assert_eq!(from_prevailing(t("2024-12-01T14:00:00"), false), t("2024-12-01T14:00:00"));
        // Spring forward: 03:30 CDT is 02:30 CST; 01:30 CST stays.
        assert_eq!(from_prevailing(t("2024-03-10T03:30:00"), false), t("2024-03-10T02:30:00"));
        assert_eq!(from_prevailing(t("2024-03-10T01:30:00"), false), t("2024-03-10T01:30:00"));
        // Fall back: the first 01:30 is CDT (00:30 CST), the repeated one CST.
        assert_eq!(from_prevailing(t("2024-11-03T01:30:00"), false), t("2024-11-03T00:30:00"));
        assert_eq!(from_prevailing(t("2024-11-03T01:30:00"), true), t("2024-11-03T01:30:00"));
        assert_eq!(from_prevailing(t("2024-11-03T02:30:00"), false), t("2024-11-03T02:30:00"));
        // Round trip over a year, every 15 minutes.
        let mut x = t("2024-01-01");
        while x < t("2025-01-01") {
            let p = to_prevailing(x);
            let repeated = !is_dst(x) && is_dst(x.plus_ms(-HOUR)) && p == x;
            assert_eq!(from_prevailing(p, repeated), x, "{x}");
            x = x.plus_ms(15 * 60_000);
        }
    }
}
