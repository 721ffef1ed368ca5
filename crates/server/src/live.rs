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
}

impl Live {
    /// Keeps what a bus notice says, when it is one of the live subjects. A payload that is not
    /// JSON is an error and changes nothing.
    pub fn note(&self, subject: &str, payload: &[u8]) -> Result<(), serde_json::Error> {
        let slot = match subject {
            "hcp.plan" | "hcp.ahead" | "hcp.devices" | "hcp.alert" => subject,
            s if s.starts_with("hcp.interval.") => s,
            _ => return Ok(()),
        };
        let v: Value = serde_json::from_slice(payload)?;
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

    pub fn snapshot(&self) -> State {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_of_each_and_ignores_other_subjects() {
        let l = Live::default();
        l.note("hcp.interval.a", br#"{"at_ms":1}"#).unwrap();
        l.note("hcp.interval.a", br#"{"at_ms":2}"#).unwrap();
        l.note("hcp.interval.b", br#"{"at_ms":2}"#).unwrap();
        l.note("hcp.decision.a", b"not json but not ours").unwrap();
        assert!(l.note("hcp.plan", b"{broken").is_err());
        let s = l.snapshot();
        assert_eq!(s.sites.len(), 2);
        assert_eq!(s.sites["a"]["at_ms"], 2);
        assert!(s.plan.is_none(), "a bad payload changes nothing");
        l.seed_plan(serde_json::json!({"from":"storage"}));
        l.note("hcp.plan", br#"{"from":"bus"}"#).unwrap();
        l.seed_plan(serde_json::json!({"from":"storage again"}));
        assert_eq!(l.snapshot().plan.unwrap()["from"], "bus");
    }
}
