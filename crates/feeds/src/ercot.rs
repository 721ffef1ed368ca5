//! ERCOT's public data API (`https://api.ercot.com/api/public-reports`).
//!
//! Every report answers the same shape: `_meta` (`totalRecords`, `pageSize`, `totalPages`,
//! `currentPage`), `report`, `fields` (each with a `name`) and `data`, a list of rows, each row an
//! array of values in the order of `fields`. Reports read here:
//!
//! | report | path | fields used |
//! |---|---|---|
//! | NP6-905-CD, settlement point prices (15 min) | `np6-905-cd/spp_node_zone_hub` | deliveryDate, deliveryHour (1-24, hour ending), deliveryInterval (1-4), settlementPoint, settlementPointPrice, DSTFlag |
//! | NP6-788-CD, SCED LMPs (5 min) | `np6-788-cd/lmp_node_zone_hub` | SCEDTimestamp, repeatHourFlag, settlementPoint, LMP |
//! | NP4-190-CD, day-ahead prices (hourly) | `np4-190-cd/dam_stlmnt_pnt_prices` | deliveryDate, hourEnding (`01:00`-`24:00`), settlementPoint, settlementPointPrice, DSTFlag |
//!
//! Times are Central Prevailing Time; [`crate::time`] converts them to market (standard) time.
//! Access takes an `id_token` from ERCOT's B2C token endpoint (resource-owner password flow: the
//! API account's username and password) sent as a bearer token, and the account's subscription
//! key in `Ocp-Apim-Subscription-Key`. The token lasts an hour; it is renewed before it ends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hcp_engine::io::{Input, PriceMarket};
use hcp_model::SimTime;
use serde_json::Value;

use crate::FeedError;
use crate::config::ErcotConfig;
use crate::time::{from_prevailing, to_prevailing};

/// A report page as ERCOT answers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub fields: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub total_pages: u64,
    pub current_page: u64,
}

/// Parses a report page; `what` names it in errors.
pub fn parse_report(what: &str, body: &[u8]) -> Result<Report, FeedError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| FeedError::malformed(what, "body", format!("not JSON: {e}")))?;
    let meta = v.get("_meta").ok_or_else(|| FeedError::malformed(what, "_meta", "missing"))?;
    let page = |f: &str| {
        meta.get(f)
            .and_then(Value::as_u64)
            .ok_or_else(|| FeedError::malformed(what, format!("_meta.{f}"), "must be a whole number"))
    };
    let (total_pages, current_page) = (page("totalPages")?, page("currentPage")?);
    let fields = v
        .get("fields")
        .and_then(Value::as_array)
        .ok_or_else(|| FeedError::malformed(what, "fields", "must be a list"))?
        .iter()
        .enumerate()
        .map(|(i, f)| {
            f.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| FeedError::malformed(what, format!("fields[{i}].name"), "must be a string"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows = match v.get("data") {
        // An empty report answers `data: {}` or `data: []`.
        Some(Value::Object(o)) if o.is_empty() => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, r)| match r.as_array() {
                Some(r) if r.len() == fields.len() => Ok(r.clone()),
                Some(r) => Err(FeedError::malformed(
                    what,
                    format!("data[{i}]"),
                    format!("has {} values for {} fields", r.len(), fields.len()),
                )),
                None => Err(FeedError::malformed(what, format!("data[{i}]"), "must be a list of values")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(FeedError::malformed(what, "data", "must be a list of rows")),
    };
    Ok(Report { fields, rows, total_pages, current_page })
}

/// Reads named values of a report's rows.
struct Cols<'a> {
    what: &'a str,
    report: &'a Report,
}

impl<'a> Cols<'a> {
    fn col(&self, name: &str) -> Result<usize, FeedError> {
        self.report
            .fields
            .iter()
            .position(|f| f == name)
            .ok_or_else(|| FeedError::malformed(self.what, "fields", format!("no field {name:?}")))
    }

    fn err(&self, row: usize, name: &str, rule: &str) -> FeedError {
        FeedError::malformed(self.what, format!("data[{row}].{name}"), rule)
    }

    fn str(&self, row: usize, c: usize) -> Result<&'a str, FeedError> {
        self.report.rows[row][c].as_str().ok_or_else(|| self.err(row, &self.report.fields[c], "must be a string"))
    }

    fn int(&self, row: usize, c: usize, lo: i64, hi: i64) -> Result<i64, FeedError> {
        let v = &self.report.rows[row][c];
        let n = v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
        match n {
            Some(n) if (lo..=hi).contains(&n) => Ok(n),
            _ => Err(self.err(row, &self.report.fields[c], &format!("must be a whole number from {lo} to {hi}"))),
        }
    }

    fn price(&self, row: usize, c: usize) -> Result<f64, FeedError> {
        let v = &self.report.rows[row][c];
        match v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())) {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(self.err(row, &self.report.fields[c], "must be a number (USD/MWh)")),
        }
    }

    fn flag(&self, row: usize, c: usize) -> Result<bool, FeedError> {
        match &self.report.rows[row][c] {
            Value::Bool(b) => Ok(*b),
            Value::Null => Ok(false),
            Value::String(s) if s.eq_ignore_ascii_case("y") || s.eq_ignore_ascii_case("true") => Ok(true),
            Value::String(s) if s.eq_ignore_ascii_case("n") || s.eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(self.err(row, &self.report.fields[c], "must be true/false or Y/N")),
        }
    }

    fn date(&self, row: usize, c: usize) -> Result<SimTime, FeedError> {
        let s = self.str(row, c)?;
        match SimTime::parse(s) {
            Ok(t) if s.len() == 10 => Ok(t),
            _ => Err(self.err(row, &self.report.fields[c], "must be a date YYYY-MM-DD")),
        }
    }
}

/// One price of a report, in market time.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceRow {
    pub settlement_point: String,
    pub market: PriceMarket,
    pub at: SimTime,
    pub usd_per_mwh: f64,
}

impl PriceRow {
    pub fn input(&self, source: &str) -> Input {
        Input::Price {
            settlement_point: self.settlement_point.clone(),
            market: self.market,
            at: self.at,
            usd_per_mwh: self.usd_per_mwh,
            source: source.into(),
        }
    }
}

const MIN_15: i64 = 15 * 60_000;
const MIN_5: i64 = 5 * 60_000;
const HOUR: i64 = 3_600_000;

/// NP6-905-CD: each row is the price of a 15-minute interval.
pub fn spp_rows(report: &Report) -> Result<Vec<PriceRow>, FeedError> {
    let c = Cols { what: "np6-905-cd", report };
    let (cd, ch, ci, csp, cp, cdst) = (
        c.col("deliveryDate")?,
        c.col("deliveryHour")?,
        c.col("deliveryInterval")?,
        c.col("settlementPoint")?,
        c.col("settlementPointPrice")?,
        c.col("DSTFlag")?,
    );
    (0..report.rows.len())
        .map(|r| {
            let local = c.date(r, cd)?.plus_ms((c.int(r, ch, 1, 24)? - 1) * HOUR + (c.int(r, ci, 1, 4)? - 1) * MIN_15);
            Ok(PriceRow {
                settlement_point: c.str(r, csp)?.to_string(),
                market: PriceMarket::RealTime15,
                at: from_prevailing(local, c.flag(r, cdst)?),
                usd_per_mwh: c.price(r, cp)?,
            })
        })
        .collect()
}

/// NP6-788-CD: each row is a SCED run's price, in force for the 5-minute interval it starts.
pub fn sced_rows(report: &Report) -> Result<Vec<PriceRow>, FeedError> {
    let c = Cols { what: "np6-788-cd", report };
    let (ct, crep, csp, cp) =
        (c.col("SCEDTimestamp")?, c.col("repeatHourFlag")?, c.col("settlementPoint")?, c.col("LMP")?);
    (0..report.rows.len())
        .map(|r| {
            let s = c.str(r, ct)?;
            let local = SimTime::parse(s).map_err(|_| c.err(r, "SCEDTimestamp", "must be a date-time"))?;
            let at = from_prevailing(local, c.flag(r, crep)?);
            Ok(PriceRow {
                settlement_point: c.str(r, csp)?.to_string(),
                market: PriceMarket::RealTime5,
                at: SimTime(at.0.div_euclid(MIN_5) * MIN_5),
                usd_per_mwh: c.price(r, cp)?,
            })
        })
        .collect()
}

/// NP4-190-CD: each row is the day-ahead price of an hour.
pub fn dam_rows(report: &Report) -> Result<Vec<PriceRow>, FeedError> {
    let c = Cols { what: "np4-190-cd", report };
    let (cd, ch, csp, cp, cdst) = (
        c.col("deliveryDate")?,
        c.col("hourEnding")?,
        c.col("settlementPoint")?,
        c.col("settlementPointPrice")?,
        c.col("DSTFlag")?,
    );
    (0..report.rows.len())
        .map(|r| {
            let he = c.str(r, ch)?;
            let hour = he
                .strip_suffix(":00")
                .and_then(|h| h.parse::<i64>().ok())
                .filter(|h| (1..=24).contains(h))
                .ok_or_else(|| c.err(r, "hourEnding", "must be an hour ending 01:00 to 24:00"))?;
            let local = c.date(r, cd)?.plus_ms((hour - 1) * HOUR);
            Ok(PriceRow {
                settlement_point: c.str(r, csp)?.to_string(),
                market: PriceMarket::DayAhead,
                at: from_prevailing(local, c.flag(r, cdst)?),
                usd_per_mwh: c.price(r, cp)?,
            })
        })
        .collect()
}

/// A prevailing-time date as ERCOT's query parameters take it.
fn date_param(t: SimTime) -> String {
    let c = t.civil();
    format!("{:04}-{:02}-{:02}", c.year, c.month, c.day)
}

fn datetime_param(t: SimTime) -> String {
    let c = t.civil();
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// The ERCOT feed: polls the configured reports for the configured settlement points and hands
/// on each price once, in time order.
pub struct ErcotFeed {
    cfg: ErcotConfig,
    client: reqwest::Client,
    creds: Option<crate::config::ErcotCredentials>,
    token: Option<(String, Instant)>,
    /// The latest interval handed on, per point and market.
    sent: BTreeMap<(String, PriceMarket), SimTime>,
    /// When the day-ahead report was last asked (it changes once a day).
    day_ahead_polled: Option<Instant>,
}

impl ErcotFeed {
    pub fn new(cfg: ErcotConfig) -> Result<Self, FeedError> {
        let creds = cfg.credentials()?;
        Ok(ErcotFeed {
            client: crate::http_client(cfg.timeout_s)?,
            cfg,
            creds,
            token: None,
            sent: BTreeMap::new(),
            day_ahead_polled: None,
        })
    }

    pub fn poll_every(&self) -> Duration {
        Duration::from_secs(self.cfg.poll_s)
    }

    async fn token(&mut self) -> Result<Option<String>, FeedError> {
        let Some(creds) = &self.creds else { return Ok(None) };
        if let Some((t, until)) = &self.token
            && Instant::now() < *until
        {
            return Ok(Some(t.clone()));
        }
        let url = &self.cfg.token_url;
        let scope = format!("openid {} offline_access", self.cfg.client_id);
        let form = [
            ("grant_type", "password"),
            ("username", creds.username.as_str()),
            ("password", creds.password.as_str()),
            ("scope", scope.as_str()),
            ("client_id", self.cfg.client_id.as_str()),
            ("response_type", "id_token"),
        ];
        let resp = self
            .client
            .post(url)
            .form(&form)
            .send()
            .await
            .map_err(|e| FeedError::from_reqwest(url, self.cfg.timeout_s, e))?;
        if !resp.status().is_success() {
            return Err(FeedError::Http { url: url.clone(), status: resp.status().as_u16() });
        }
        let body = resp.bytes().await.map_err(|e| FeedError::from_reqwest(url, self.cfg.timeout_s, e))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| FeedError::malformed("token", "body", format!("not JSON: {e}")))?;
        let token = v
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| FeedError::malformed("token", "id_token", "missing"))?
            .to_string();
        // `expires_in` comes as a number or a string; renewed a minute early.
        let life = v
            .get("expires_in")
            .and_then(|x| x.as_u64().or_else(|| x.as_str().and_then(|s| s.parse().ok())))
            .unwrap_or(3600);
        self.token = Some((token.clone(), Instant::now() + Duration::from_secs(life.saturating_sub(60).max(1))));
        Ok(Some(token))
    }

    /// Every page of one report for one point.
    async fn report(
        &mut self,
        path: &str,
        what: &str,
        mut query: Vec<(&'static str, String)>,
    ) -> Result<Vec<Report>, FeedError> {
        let token = self.token().await?;
        let url = format!("{}/{path}", self.cfg.base_url.trim_end_matches('/'));
        let bearer = token.map(|t| format!("Bearer {t}"));
        let key = self.creds.as_ref().map(|c| c.subscription_key.clone());
        let mut headers: Vec<(&str, &str)> = vec![];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b));
        }
        if let Some(k) = &key {
            headers.push(("Ocp-Apim-Subscription-Key", k));
        }
        query.push(("size", "1000".into()));
        let mut pages = vec![];
        let mut page = 1u64;
        loop {
            let mut q = query.clone();
            q.push(("page", page.to_string()));
            let body = crate::get(&self.client, &url, &q, &headers, self.cfg.timeout_s).await?;
            let r = parse_report(what, &body)?;
            let last = r.total_pages <= page || page >= 20;
            pages.push(r);
            if last {
                break;
            }
            page += 1;
        }
        Ok(pages)
    }

    /// One poll at market time `now`: new prices as inputs, oldest first.
    pub async fn poll(&mut self, now: SimTime) -> Result<Vec<Input>, FeedError> {
        let local = to_prevailing(now);
        let day = 86_400_000;
        let today = SimTime(local.0.div_euclid(day) * day);
        let mut rows = vec![];
        let points = self.cfg.settlement_points.clone();
        for sp in &points {
            if self.cfg.real_time_15 {
                let q = vec![
                    ("deliveryDateFrom", date_param(today.plus_ms(-day))),
                    ("deliveryDateTo", date_param(today)),
                    ("settlementPoint", sp.clone()),
                ];
                for r in self.report("np6-905-cd/spp_node_zone_hub", "np6-905-cd", q).await? {
                    rows.extend(spp_rows(&r)?);
                }
            }
            if self.cfg.sced_5 {
                let q = vec![
                    ("SCEDTimestampFrom", datetime_param(local.plus_ms(-30 * 60_000))),
                    ("settlementPoint", sp.clone()),
                ];
                for r in self.report("np6-788-cd/lmp_node_zone_hub", "np6-788-cd", q).await? {
                    rows.extend(sced_rows(&r)?);
                }
            }
        }
        // Day-ahead prices change once a day (published about 13:00 for the next day): asked at
        // the first poll and then every `day_ahead_poll_s`.
        let da_due = self.day_ahead_polled.is_none_or(|t| t.elapsed().as_secs() >= self.cfg.day_ahead_poll_s);
        if self.cfg.day_ahead && da_due {
            for sp in &points {
                let q = vec![
                    ("deliveryDateFrom", date_param(today)),
                    ("deliveryDateTo", date_param(today.plus_ms(day))),
                    ("settlementPoint", sp.clone()),
                ];
                for r in self.report("np4-190-cd/dam_stlmnt_pnt_prices", "np4-190-cd", q).await? {
                    rows.extend(dam_rows(&r)?);
                }
            }
            self.day_ahead_polled = Some(Instant::now());
        }
        rows.retain(|r| points.contains(&r.settlement_point));
        rows.sort_by_key(|r| (r.market, r.at));
        let mut out = vec![];
        for r in rows {
            let key = (r.settlement_point.clone(), r.market);
            if self.sent.get(&key).is_some_and(|t| r.at <= *t) {
                continue;
            }
            // A real-time price is handed on once its interval is over; SCED's as its run starts.
            // (ERCOT publishes nothing earlier; a response that holds a later row, as a recorded
            // one replayed on a rehearsal clock does, keeps it until then.)
            let known = match r.market {
                PriceMarket::RealTime15 => r.at.plus_ms(MIN_15) <= now,
                PriceMarket::RealTime5 => r.at <= now,
                PriceMarket::DayAhead => true,
            };
            if !known {
                continue;
            }
            self.sent.insert(key, r.at);
            out.push(r.input(&self.cfg.name));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/responses/ercot").join(name))
            .unwrap()
    }

    #[test]
    fn settlement_point_prices_in_market_time() {
        let r = parse_report("np6-905-cd", &recorded("spp_node_zone_hub.json")).unwrap();
        let rows = spp_rows(&r).unwrap();
        assert_eq!(rows.len(), r.rows.len());
        // 2024-06-01 hour ending 15, interval 1 is 14:00 CDT, 13:00 CST.
        let first = &rows[0];
        assert_eq!(first.settlement_point, "HB_SOUTH");
        assert_eq!(first.market, PriceMarket::RealTime15);
        assert_eq!(first.at, SimTime::parse("2024-06-01T13:00:00").unwrap());
        assert!((first.usd_per_mwh - 13.89).abs() < 1e-9);
    }

    #[test]
    fn sced_and_day_ahead_prices_in_market_time() {
        let r = parse_report("np6-788-cd", &recorded("lmp_node_zone_hub.json")).unwrap();
        let rows = sced_rows(&r).unwrap();
        assert!(rows.iter().all(|x| x.at.0 % MIN_5 == 0 && x.market == PriceMarket::RealTime5));
        assert_eq!(rows[0].at, SimTime::parse("2024-06-01T13:05:00").unwrap());
        let r = parse_report("np4-190-cd", &recorded("dam_stlmnt_pnt_prices.json")).unwrap();
        let rows = dam_rows(&r).unwrap();
        assert_eq!(rows.len(), 24);
        // Hour ending 01:00 of 2024-06-02 starts at 23:00 CST of 2024-06-01.
        assert_eq!(rows[0].at, SimTime::parse("2024-06-01T23:00:00").unwrap());
    }

    #[test]
    fn malformed_reports_name_the_field() {
        let bad = |body: &str| parse_report("np6-905-cd", body.as_bytes()).and_then(|r| spp_rows(&r)).unwrap_err();
        assert!(bad("<html>").to_string().contains("body: not JSON"));
        assert!(bad(r#"{"fields":[],"data":[]}"#).to_string().contains("_meta: missing"));
        let meta = r#""_meta":{"totalRecords":1,"pageSize":1,"totalPages":1,"currentPage":1}"#;
        let fields = r#""fields":[{"name":"deliveryDate"},{"name":"deliveryHour"},{"name":"deliveryInterval"},{"name":"settlementPoint"},{"name":"settlementPointType"},{"name":"settlementPointPrice"},{"name":"DSTFlag"}]"#;
        let e = bad(&format!(r#"{{{meta},{fields},"data":[["2024-06-01",25,1,"HB_SOUTH","HU",20.1,false]]}}"#));
        assert_eq!(e.to_string(), "np6-905-cd: data[0].deliveryHour: must be a whole number from 1 to 24");
        let e = bad(&format!(r#"{{{meta},{fields},"data":[["2024-06-01",1,1,"HB_SOUTH","HU","n/a",false]]}}"#));
        assert_eq!(e.to_string(), "np6-905-cd: data[0].settlementPointPrice: must be a number (USD/MWh)");
        let e = bad(&format!(r#"{{{meta},{fields},"data":[["2024-06-01",1,1,"HB_SOUTH"]]}}"#));
        assert!(e.to_string().contains("data[0]: has 4 values for 7 fields"));
    }
}
