//! What the dashboard shows as "now": the latest interval of each site, the latest plan, the day
//! ahead and the device counts, as the engine announced them on the bus (`hcp.interval.<site>`,
//! `hcp.plan`, `hcp.ahead`, `hcp.devices`). Every API process follows the bus, so the figures are
//! the same whichever process answers; storage keeps the history (site power, signals, P&L).
//!
//! A process that started after the engine's last announcement shows the latest plan from storage
//! and waits one interval for the rest.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::Value;

#[derive(Default)]
pub struct Live {
    inner: Mutex<State>,
}

#[derive(Default, Clone)]
pub struct State {
    /// The latest interval event per site.
    pub sites: BTreeMap<String, Value>,
    pub plan: Option<Value>,
    pub ahead: Option<Value>,
    pub devices: Option<Value>,
    /// The engine's alerts in force (`hcp.alert`), by key.
    pub alerts: BTreeMap<String, Value>,
    /// Wall time (ms) the latest interval arrived; 0 before the first.
    pub last_interval_wall_ms: i64,
    /// The engine's mode and clock at its latest signals notice (`hcp.signals`).
    pub clock: Option<crate::events::ClockNotice>,
    /// The latest value of each signal, by `kind/key`, with the wall time it arrived.
    pub signals: BTreeMap<String, (crate::events::SignalNotice, i64)>,
    /// Each feed's latest poll (`hcp.feed`), and the wall time of its latest good one.
    pub feeds: BTreeMap<String, (crate::events::FeedNotice, Option<i64>)>,
}

impl Live {
    /// Keeps what a bus notice says, when it is one of the live subjects. A payload that is not
    /// JSON is an error and changes nothing.
    pub fn note(&self, subject: &str, payload: &[u8]) -> Result<(), serde_json::Error> {
        match subject {
            "hcp.signals" => {
                let n: crate::events::SignalsNotice = serde_json::from_slice(payload)?;
                let now = crate::wall_ms();
                let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                for x in n.signals {
                    let key = format!("{}/{}", x.kind, x.key);
                    // Day-ahead prices arrive a day at a time: the view keeps the latest hour's.
                    if st.signals.get(&key).is_some_and(|(old, _)| old.kind == "da_price" && old.at_ms > x.at_ms) {
                        continue;
                    }
                    st.signals.insert(key, (x, now));
                }
                st.clock = Some(n.clock);
                return Ok(());
            }
            "hcp.feed" => {
                let f: crate::events::FeedNotice = serde_json::from_slice(payload)?;
                let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let last_ok = if f.ok { Some(f.wall_ms) } else { st.feeds.get(&f.feed).and_then(|x| x.1) };
                st.feeds.insert(f.feed.clone(), (f, last_ok));
                return Ok(());
            }
            _ => {}
        }
        let slot = match subject {
            "hcp.plan" | "hcp.ahead" | "hcp.devices" | "hcp.alert" => subject,
            s if s.starts_with("hcp.interval.") => s,
            _ => return Ok(()),
        };
        // Each subject's payload is read as its type (a payload that is not is refused), then kept
        // as the JSON the dashboard reads.
        let v: Value = match slot {
            "hcp.plan" => serde_json::to_value(serde_json::from_slice::<crate::events::PlanNotice>(payload)?)?,
            // `hcp_engine::io::Ahead` as published; read as JSON (a price not known is null).
            "hcp.ahead" => serde_json::from_slice(payload)?,
            "hcp.devices" => serde_json::to_value(serde_json::from_slice::<crate::events::DevicesNotice>(payload)?)?,
            "hcp.alert" => serde_json::to_value(serde_json::from_slice::<crate::events::AlertNotice>(payload)?)?,
            _ => serde_json::to_value(serde_json::from_slice::<crate::events::IntervalNotice>(payload)?)?,
        };
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match slot {
            "hcp.plan" => st.plan = Some(v),
            "hcp.ahead" => st.ahead = Some(v),
            "hcp.devices" => st.devices = Some(v),
            "hcp.alert" => {
                let key = v["key"].as_str().unwrap_or_default().to_string();
                if v["raised"].as_bool() == Some(true) {
                    st.alerts.insert(key, v);
                } else {
                    st.alerts.remove(&key);
                }
            }
            s => {
                st.last_interval_wall_ms = crate::wall_ms();
                st.sites.insert(s["hcp.interval.".len()..].to_string(), v);
            }
        }
        Ok(())
    }

    /// The latest plan, if none arrived on the bus yet (from storage at start).
    pub fn seed_plan(&self, plan: Value) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.plan.is_none() {
            st.plan = Some(plan);
        }
    }

    /// What the signals view shows now: the mode, the engine's market time, each signal's latest
    /// value with its source and age, and each feed's health.
    pub fn signals_now(&self, engine_mode: Option<&str>) -> SignalsNow {
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let wall = crate::wall_ms();
        // The engine's market time now, extrapolated from its latest notice.
        let market_ms = st.clock.as_ref().map(|c| c.market_ms + ((wall - c.wall_ms) as f64 * c.speed) as i64);
        let signals = st
            .signals
            .values()
            .map(|(s, arrived)| {
                // A price is for an interval: its age runs from the interval's end (when a
                // settlement price is known); other values from the time they are for.
                let span_ms = match s.kind.as_str() {
                    "rt_price" => 900_000,
                    "da_price" => 3_600_000,
                    _ => 0,
                };
                let age_s = market_ms.map(|m| (m - s.at_ms - span_ms) as f64 / 1e3);
                SignalNow {
                    kind: s.kind.clone(),
                    key: s.key.clone(),
                    value: s.value,
                    at_ms: s.at_ms,
                    source: s.source.clone(),
                    age_s,
                    received_s_ago: (wall - arrived) as f64 / 1e3,
                }
            })
            .collect();
        let feeds = st
            .feeds
            .values()
            .map(|(f, last_ok)| FeedNow {
                feed: f.feed.clone(),
                ok: f.ok,
                reason: f.reason.clone(),
                last_poll_s_ago: (wall - f.wall_ms) as f64 / 1e3,
                last_ok_s_ago: last_ok.map(|t| (wall - t) as f64 / 1e3),
            })
            .collect();
        SignalsNow {
            mode: st.clock.as_ref().map(|c| c.mode.clone()).or(engine_mode.map(str::to_string)),
            market_time_ms: market_ms,
            speed: st.clock.as_ref().map(|c| c.speed),
            signals,
            feeds,
        }
    }

    pub fn snapshot(&self) -> State {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `GET /api/v1/signals` without `kind` and `key`.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SignalsNow {
    /// `demo`, `live` or `rehearsal`; null before the engine's first notice (when this process
    /// runs no engine).
    pub mode: Option<String>,
    /// The engine's market time now (ms since the epoch, the market's standard time).
    pub market_time_ms: Option<i64>,
    /// Market seconds per wall second (1 in live mode).
    pub speed: Option<f64>,
    pub signals: Vec<SignalNow>,
    pub feeds: Vec<FeedNow>,
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SignalNow {
    pub kind: String,
    pub key: String,
    pub value: f64,
    /// Market time the value is for (an interval's start for prices).
    pub at_ms: i64,
    /// Where it came from: `ercot`, `mempool`, `csv:<file>`, `contract`, `manual`, `sim`.
    pub source: String,
    /// Market seconds since the value was due: since its interval ended for prices, since the
    /// time it is for otherwise (negative: a day-ahead price for a later hour).
    pub age_s: Option<f64>,
    /// Wall seconds since the engine accepted it.
    pub received_s_ago: f64,
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct FeedNow {
    pub feed: String,
    /// Whether its latest poll succeeded and every value was accepted.
    pub ok: bool,
    /// Why the latest poll failed.
    pub reason: Option<String>,
    pub last_poll_s_ago: f64,
    pub last_ok_s_ago: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(at_ms: i64) -> Vec<u8> {
        let n = crate::events::IntervalNotice {
            at_ms,
            site: "a".into(),
            price_usd_per_mwh: None,
            price_final: false,
            hashprice_usd_per_ph_day: Some(50.0),
            cap_mw: 1.0,
            mining_mw: 0.5,
            inference_mw: 0.1,
            curtailed_mw: 0.0,
            held_off_mw: Default::default(),
            headroom_mw: 0.4,
            hashrate_ph_s: 10.0,
            gpus_serving: 8.0,
            margin_usd: None,
            interval_h: 0.25,
        };
        serde_json::to_vec(&n).unwrap()
    }

    #[test]
    fn keeps_the_latest_of_each_and_ignores_other_subjects() {
        let l = Live::default();
        l.note("hcp.interval.a", &interval(1)).unwrap();
        l.note("hcp.interval.a", &interval(2)).unwrap();
        l.note("hcp.interval.b", &interval(2)).unwrap();
        l.note("hcp.decision.a", b"not json but not ours").unwrap();
        assert!(l.note("hcp.plan", b"{broken").is_err());
        // A payload of the wrong shape for its subject is refused too.
        assert!(l.note("hcp.interval.c", br#"{"at_ms":1}"#).is_err());
        let s = l.snapshot();
        assert_eq!(s.sites.len(), 2);
        assert_eq!(s.sites["a"]["at_ms"], 2);
        assert!(s.plan.is_none(), "a bad payload changes nothing");
        l.seed_plan(serde_json::json!({"from":"storage"}));
        l.note("hcp.plan", br#"{"at_ms":5,"changes":1,"blocked":0,"sites":[]}"#).unwrap();
        l.seed_plan(serde_json::json!({"from":"storage again"}));
        assert_eq!(l.snapshot().plan.unwrap()["at_ms"], 5);
    }
}
