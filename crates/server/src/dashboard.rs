//! The read models the dashboard and the customer portal show, over REST (every figure here is
//! also reachable by a script): the fleet now, the economics (prices, breakeven per ASIC model,
//! the day ahead, grid commitments), alerts, a tenant's usage by day, the router's figures by
//! tenant, and backtests run on demand.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use hcp_harness::backtest::{BacktestError, BacktestInput, Outcome, PolicyKind, backtest};
use hcp_model::device::ModelRef;
use hcp_model::time::SimTime;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult};
use crate::routes::{Auth, Body, Params};

type AppState = State<Arc<App>>;

/// Longest backtest the API runs (days): it runs on the API's own CPUs.
pub const MAX_BACKTEST_DAYS: i64 = 7;
/// No interval for this long (wall time) is a stale-signals alert.
pub const STALE_AFTER_MS: i64 = 30_000;
/// A site drawing at least this share of its cap is "near its cap".
pub const NEAR_CAP: f64 = 0.98;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/fleet", get(fleet))
        .route("/economics", get(economics))
        .route("/alerts", get(alerts))
        .route("/workloads", get(workloads))
        .route("/usage/daily", get(usage_daily))
        .route("/backtests", get(backtest_fleets).post(run_backtest))
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The fleet's device models (ASICs first, in catalogue order) with how many devices each: the
/// topology does not change while the process runs, so this is counted once, at start.
pub fn device_models(fleet: &hcp_model::fleet::Fleet) -> Vec<(ModelRef, usize)> {
    let mut n: std::collections::BTreeMap<ModelRef, usize> = Default::default();
    for d in &fleet.devices {
        *n.entry(d.model).or_default() += 1;
    }
    n.into_iter().collect()
}

/// The latest plan's figures for a site (`held_for_grid_mw`, `limit_mw`, `stale`), if any.
fn plan_site<'a>(plan: Option<&'a Value>, site: &str) -> Option<&'a Value> {
    plan?.get("sites")?.as_array()?.iter().find(|s| s.get("site").and_then(Value::as_str) == Some(site))
}

/// Per site, the power split now against the cap, hashrate, GPUs serving and margin per hour.
#[utoipa::path(get, path = "/api/v1/fleet", tag = "dashboard", security(("bearer" = [])), responses((status = 200, description = "Per site: the latest interval's power split (mining, inference, curtailed, held for grid) against the cap, hashrate, GPUs serving, margin per hour; fleet totals; device counts"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn fleet(State(app): AppState, Auth(p): Auth) -> ApiResult<Json<Value>> {
    p.require(Role::Viewer)?;
    Ok(Json(fleet_now(&app)))
}

pub(crate) fn fleet_now(app: &App) -> Value {
    let st = app.live.snapshot();
    let mut totals = [0.0f64; 7];
    let sites: Vec<Value> = app
        .fleet
        .sites
        .iter()
        .map(|s| {
            let Some(iv) = st.sites.get(&s.id) else {
                return json!({ "site": s.id, "cap_mw": s.power_cap_w / 1e6, "at_ms": null });
            };
            let held = plan_site(st.plan.as_ref(), &s.id).map_or(0.0, |p| f(p, "held_for_grid_mw"));
            // The engine's intervals are 15 minutes (announced as `interval_h`).
            let hours = iv.get("interval_h").and_then(Value::as_f64).filter(|h| *h > 0.0).unwrap_or(0.25);
            let row = [
                f(iv, "cap_mw"),
                f(iv, "mining_mw"),
                f(iv, "inference_mw"),
                f(iv, "curtailed_mw"),
                held,
                f(iv, "hashrate_ph_s"),
                f(iv, "margin_usd") / hours,
            ];
            for (t, x) in totals.iter_mut().zip(row) {
                *t += x;
            }
            json!({
                "site": s.id,
                "at_ms": iv.get("at_ms"),
                "cap_mw": row[0],
                "mining_mw": row[1],
                "inference_mw": row[2],
                "curtailed_mw": row[3],
                "held_off_mw": iv.get("held_off_mw"),
                "headroom_mw": iv.get("headroom_mw"),
                "held_for_grid_mw": row[4],
                "hashrate_ph_s": row[5],
                "gpus_serving": iv.get("gpus_serving"),
                "margin_usd_per_h": row[6],
                "price_usd_per_mwh": iv.get("price_usd_per_mwh"),
                "hashprice_usd_per_ph_day": iv.get("hashprice_usd_per_ph_day"),
            })
        })
        .collect();
    json!({
        "fleet": app.fleet.name,
        "models": app.device_models.iter().map(|(m, n)| {
            let kind = if matches!(m, ModelRef::Asic(_)) { "asic" } else { "gpu" };
            json!({ "id": app.fleet.model_id(*m), "kind": kind, "devices": n })
        }).collect::<Vec<_>>(),
        "sites": sites,
        "totals": {
            "cap_mw": totals[0], "mining_mw": totals[1], "inference_mw": totals[2], "curtailed_mw": totals[3],
            "held_for_grid_mw": totals[4], "hashrate_ph_s": totals[5], "margin_usd_per_h": totals[6],
        },
        "devices": st.devices,
        "last_interval_wall_ms": st.last_interval_wall_ms,
    })
}

/// Prices now, hashprice, breakeven per ASIC model, the day ahead and grid commitments.
#[utoipa::path(get, path = "/api/v1/economics", tag = "dashboard", security(("bearer" = [])), responses((status = 200, description = "Real-time and day-ahead price per site, hashprice, breakeven price per ASIC model in the fleet, the plan ahead (24 h: day-ahead price and planned ASIC draw per interval), grid commitments"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn economics(State(app): AppState, Auth(p): Auth) -> ApiResult<Json<Value>> {
    p.require(Role::Viewer)?;
    let st = app.live.snapshot();
    let hashprice = st.sites.values().find_map(|v| v.get("hashprice_usd_per_ph_day").and_then(Value::as_f64));
    let breakeven: Vec<Value> = app
        .device_models
        .iter()
        .filter_map(|(m, n)| match m {
            ModelRef::Asic(a) => Some((app.fleet.catalogue.asic(*a), n)),
            ModelRef::Gpu(_) => None,
        })
        .map(|(m, n)| {
            json!({
                "model": m.id,
                "name": m.name,
                "devices": n,
                "j_per_th": m.j_per_th(),
                "breakeven_usd_per_mwh": hashprice.map(|h| hcp_econ::hashprice::model_breakeven_usd_per_mwh(m, h)),
            })
        })
        .collect();
    let ahead = st.ahead.as_ref();
    let sites: Vec<Value> = app
        .fleet
        .sites
        .iter()
        .map(|s| {
            let iv = st.sites.get(&s.id);
            let da_now = ahead
                .and_then(|a| a.get("sites")?.as_array()?.iter().find(|x| x["site"] == s.id.as_str()).cloned())
                .and_then(|x| x.get("day_ahead_usd_per_mwh")?.get(0)?.as_f64());
            let plan = plan_site(st.plan.as_ref(), &s.id);
            json!({
                "site": s.id,
                "settlement_point": s.settlement_point,
                "rt_price_usd_per_mwh": iv.and_then(|v| v.get("price_usd_per_mwh")),
                "da_price_usd_per_mwh": da_now,
                "commitment": {
                    "held_for_grid_mw": plan.map_or(0.0, |p| f(p, "held_for_grid_mw")),
                    "limit_mw": plan.and_then(|p| p.get("limit_mw")),
                },
            })
        })
        .collect();
    Ok(Json(json!({
        "hashprice_usd_per_ph_day": hashprice,
        "sites": sites,
        "breakeven": breakeven,
        "ahead": ahead,
    })))
}

/// One alert: what, where, how bad.
fn alert(severity: &str, kind: &str, site: Option<&str>, message: String) -> Value {
    json!({ "severity": severity, "kind": kind, "site": site, "message": message })
}

/// Alerts now: stale signals, sites near their cap, unhealthy devices, missed commitments.
pub(crate) fn alerts_now(app: &App, now_wall_ms: i64) -> Vec<Value> {
    let st = app.live.snapshot();
    let mut out = vec![];
    if app.engine_expected || st.last_interval_wall_ms > 0 {
        let since = if st.last_interval_wall_ms == 0 {
            now_wall_ms - app.started_wall_ms
        } else {
            now_wall_ms - st.last_interval_wall_ms
        };
        if since > STALE_AFTER_MS {
            out.push(alert(
                "critical",
                "stale_signals",
                None,
                format!("no interval from the engine for {} s", since / 1_000),
            ));
        }
    }
    for s in &app.fleet.sites {
        let plan = plan_site(st.plan.as_ref(), &s.id);
        if plan.and_then(|p| p.get("stale")).and_then(Value::as_bool) == Some(true) {
            out.push(alert("warning", "stale_signals", Some(&s.id), "the plan ran on a stale price".into()));
        }
        let Some(iv) = st.sites.get(&s.id) else { continue };
        let cap = f(iv, "cap_mw");
        let drawn = f(iv, "mining_mw") + f(iv, "inference_mw");
        if cap > 0.0 && drawn >= NEAR_CAP * cap {
            out.push(alert(
                "warning",
                "near_cap",
                Some(&s.id),
                format!("drawing {drawn:.2} of {cap:.2} MW ({:.1} %)", drawn / cap * 100.0),
            ));
        }
        // A commitment is missed when the site draws above the limit the plan promised the grid.
        if let Some(p) = plan {
            let held = f(p, "held_for_grid_mw");
            if held > 0.0 && drawn > f(p, "limit_mw") + 1e-3 {
                out.push(alert(
                    "critical",
                    "missed_commitment",
                    Some(&s.id),
                    format!("drawing {drawn:.2} MW above the {:.2} MW promised to the grid", f(p, "limit_mw")),
                ));
            }
        }
    }
    // The engine's own alerts (stale price or market, a failing feed, a refused input), by key.
    for (key, a) in &st.alerts {
        let kind = key.split(':').next().unwrap_or(key);
        let severity = if kind == "stale_price" || kind == "feed" { "critical" } else { "warning" };
        let text = a.get("text").and_then(Value::as_str).unwrap_or_default().to_string();
        let mut v = alert(severity, kind, None, text);
        v["key"] = json!(key);
        out.push(v);
    }
    if let Some(d) = &st.devices {
        for (state, severity) in [("quarantined", "warning"), ("unknown", "info")] {
            let n = d.get(state).and_then(Value::as_u64).unwrap_or(0);
            if n > 0 {
                out.push(alert(severity, "unhealthy_devices", None, format!("{n} devices {state}")));
            }
        }
    }
    out
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "dashboard", security(("bearer" = [])), responses((status = 200, description = "Alerts now (severity critical, warning or info; kind stale_signals, near_cap, unhealthy_devices or missed_commitment; site where one applies; and the engine's own, with their key: stale_price, stale_market, feed, refused)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn alerts(State(app): AppState, Auth(p): Auth) -> ApiResult<Json<Value>> {
    p.require(Role::Viewer)?;
    Ok(Json(json!({ "items": alerts_now(&app, crate::wall_ms()) })))
}

/// The router's figures per band and per tenant (an operator sees the busiest tenants, a tenant
/// key its own).
#[utoipa::path(get, path = "/api/v1/workloads", tag = "workloads", security(("bearer" = [])), responses((status = 200, description = "Queues, time to first token, preemptions and fairness by band (operators), and per tenant: GPUs held against entitlement, per band requests, tokens, mean queue time and time to first token"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody)))]
pub(crate) async fn workloads(State(app): AppState, Auth(p): Auth) -> ApiResult<Json<Value>> {
    let r = app.router.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Json(match &p {
        Principal::Tenant { tenant, .. } => json!({ "tenants": r.tenants_summary(Some(tenant), 1) }),
        Principal::Account { .. } => {
            p.require(Role::Viewer)?;
            json!({ "router": r.summary(), "tenants": r.tenants_summary(None, 50) })
        }
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DailyQuery {
    /// Required for an admin; a tenant key reads its own.
    tenant: Option<String>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    from_ms: Option<i64>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    to_ms: Option<i64>,
}

/// A tenant's usage by UTC day, kind, tier and model.
#[utoipa::path(get, path = "/api/v1/usage/daily", tag = "billing", security(("bearer" = [])), params(DailyQuery), responses((status = 200, description = "Usage by UTC day, kind, tier and model (default: the last 30 days)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn usage_daily(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<DailyQuery>,
) -> ApiResult<Json<Value>> {
    let tenant = crate::billing::scope(&p, q.tenant.as_deref())?
        .ok_or_else(|| ApiError::invalid("tenant", "required for an operator account"))?;
    crate::routes::check_times(&[("from_ms", q.from_ms), ("to_ms", q.to_ms)])?;
    let to = q.to_ms.unwrap_or_else(|| crate::wall_ms() + 1);
    let from = q.from_ms.unwrap_or(to - 30 * 86_400_000);
    if from >= to {
        return Err(ApiError::invalid("from_ms", "must be before to_ms"));
    }
    let items = app.store.usage_daily(&tenant, from, to).await?;
    Ok(Json(json!({ "tenant": tenant, "items": items })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BacktestBody {
    /// First day, `YYYY-MM-DD` (UTC).
    #[schema(pattern = "^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")]
    from: String,
    /// Days to run, 1 to 7.
    #[schema(minimum = 1, maximum = 7)]
    days: i64,
    /// A fleet this platform knows (`GET /api/v1/backtests` lists them); default: the one it runs.
    fleet: Option<String>,
    /// Policies to compare (optimizer, strike, always-on, perfect-foresight); default: all four.
    #[schema(value_type = Option<Vec<PolicyName>>, min_items = 1, max_items = 4)]
    policies: Option<Vec<String>>,
    /// A constant hashprice (USD per PH/s per day); default: the simulated market.
    hashprice_usd_per_ph_day: Option<f64>,
    /// Seed of the simulated grid and market; default 1.
    #[schema(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    seed: Option<u64>,
}

/// A policy's name, as the document lists them (the body carries them as strings).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "kebab-case")]
#[allow(dead_code)]
enum PolicyName {
    Optimizer,
    Strike,
    AlwaysOn,
    PerfectForesight,
}

/// One policy's result as JSON (the same fields as `hcp backtest --json`).
pub fn outcome_json(o: &Outcome) -> Value {
    json!({
        "policy": o.policy.name(),
        "energy_mwh": o.energy_mwh,
        "mining_revenue_usd": o.mining_revenue.as_usd_f64(),
        "inference_revenue_usd": o.inference_revenue.as_usd_f64(),
        "energy_cost_usd": o.energy_cost.as_usd_f64(),
        "credits_usd": o.credits.as_usd_f64(),
        "four_cp_usd": o.four_cp.as_usd_f64(),
        "margin_usd": o.margin.as_usd_f64(),
        "always_on_margin_usd": o.always_on_margin.as_usd_f64(),
        "bound_margin_usd": o.bound_margin.as_usd_f64(),
        "uplift_captured": o.uplift_captured,
        "switches": o.switches,
        "switches_per_device_day": o.switches_per_device_day,
        "strike": o.strike.map(|s| json!({
            "strike_usd_per_mwh": s.strike_usd_per_mwh,
            "curtail_after_intervals": s.curtail_after,
            "resume_after_intervals": s.resume_after,
        })),
    })
}

/// Runs the chosen policies over a simulated period of the chosen fleet (the grid and market
/// simulators, seeded), on a blocking thread; one backtest at a time per process.
#[utoipa::path(post, path = "/api/v1/backtests", tag = "dashboard", security(("bearer" = [])), request_body = BacktestBody, responses((status = 200, description = "Per policy: energy, revenue, cost, margin, switches, uplift captured; and the optimizer's (or first policy's) chart: price and power split per interval"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn run_backtest(
    State(app): AppState,
    Auth(p): Auth,
    Body(b): Body<BacktestBody>,
) -> ApiResult<Json<Value>> {
    p.require(Role::Operator)?;
    let from = SimTime::parse(&b.from).map_err(|e| ApiError::invalid("from", format!("a date YYYY-MM-DD: {e}")))?;
    if !(1..=MAX_BACKTEST_DAYS).contains(&b.days) {
        return Err(ApiError::invalid("days", format!("must be 1 to {MAX_BACKTEST_DAYS}")));
    }
    let fleet = match &b.fleet {
        None => app.fleet.clone(),
        Some(n) if *n == app.fleet.name => app.fleet.clone(),
        Some(n) => app
            .backtest_fleets
            .iter()
            .find(|f| &f.name == n)
            .cloned()
            .ok_or_else(|| ApiError::invalid("fleet", format!("no fleet named {n:?}")))?,
    };
    let policies: Vec<PolicyKind> = match &b.policies {
        None => PolicyKind::ALL.to_vec(),
        Some(v) if v.is_empty() || v.len() > 4 => return Err(ApiError::invalid("policies", "one to four policies")),
        Some(v) => v
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, hcp_model::Invalid>>()
            .map_err(|e| ApiError::invalid("policies", e.rule))?,
    };
    if let Some(h) = b.hashprice_usd_per_ph_day
        && !(h.is_finite() && h > 0.0 && h < 10_000.0)
    {
        return Err(ApiError::invalid("hashprice_usd_per_ph_day", "must be a number > 0 and < 10000"));
    }
    // Seeds as the document types them (int64, at least 0).
    if b.seed.is_some_and(|s| s > i64::MAX as u64) {
        return Err(ApiError::invalid("seed", format!("must be 0 to {}", i64::MAX)));
    }
    let seed = b.seed.unwrap_or(1);
    let to = from.plus_ms(b.days * 86_400_000);
    let _one = app.backtest_slot.acquire().await.map_err(ApiError::internal)?;
    let started = std::time::Instant::now();
    let (outcomes, name, notes) = tokio::task::spawn_blocking(move || {
        let interval = 15 * 60_000;
        let points: Vec<String> = {
            let mut v: Vec<String> = fleet.sites.iter().map(|s| s.settlement_point.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        // A day of prices before (the first decision's last known price) and two after (the
        // planning path's day-ahead horizon at the end).
        let series = hcp_sim::grid::simulate(&hcp_sim::grid::GridRun {
            params: &hcp_sim::grid::GridParams::default(),
            from: from.plus_ms(-86_400_000),
            to: to.plus_ms(2 * 86_400_000),
            seed,
            settlement_points: &points,
        });
        let prices = points.iter().cloned().zip(series).collect();
        let params = hcp_sim::market::MarketParams::default();
        let market = match b.hashprice_usd_per_ph_day {
            Some(hp) => {
                let mut m = hcp_sim::market::MarketSim::new(params, from, seed).signal();
                m.at = from;
                m.hashprice_usd_per_ph_day = hp;
                vec![m]
            }
            None => hcp_sim::market::MarketSim::simulate(&params, from, to, interval, seed),
        };
        let input = BacktestInput {
            fleet: &fleet,
            prices,
            market,
            from,
            to,
            seed,
            energy_adder_usd_per_mwh: 0.0,
            dispatch: Default::default(),
            four_cp_usd_per_kw_year: 0.0,
            commit_mw: 0.0,
            credit_usd_per_mw_h: 0.0,
        };
        let notes = input.notes().unwrap_or_default();
        (backtest(&input, &policies), fleet.name.clone(), notes)
    })
    .await
    .map_err(ApiError::internal)?;
    let outcomes = outcomes.map_err(|e| match e {
        BacktestError::Setup(e) => ApiError::invalid("from", e.to_string()),
        BacktestError::Violation(v) => ApiError::internal(format!("a safety invariant failed: {v:?}")),
    })?;
    let shown = outcomes.iter().find(|o| o.policy == PolicyKind::Optimizer).unwrap_or(&outcomes[0]);
    let chart: Vec<Value> = shown
        .chart
        .iter()
        .map(|c| {
            json!({ "at_ms": c.at.0, "price_usd_per_mwh": c.price_usd_per_mwh, "mining_mw": c.mining_mw,
                    "inference_mw": c.inference_mw, "curtailed_mw": c.curtailed_mw })
        })
        .collect();
    Ok(Json(json!({
        "fleet": name,
        "from": from.to_string(),
        "to": to.to_string(),
        "seed": seed,
        "seconds": started.elapsed().as_secs_f64(),
        "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
        "chart": { "policy": shown.policy.name(), "points": chart },
        "notes": notes,
    })))
}

/// The fleets a backtest may run, the policies, the longest period.
#[utoipa::path(get, path = "/api/v1/backtests", tag = "dashboard", security(("bearer" = [])), responses((status = 200, description = "Fleets (name, sites, devices), policies and the most days a backtest from the API may run"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn backtest_fleets(State(app): AppState, Auth(p): Auth) -> ApiResult<Json<Value>> {
    p.require(Role::Viewer)?;
    let items: Vec<Value> = std::iter::once(&app.fleet)
        .chain(app.backtest_fleets.iter().filter(|f| f.name != app.fleet.name))
        .map(|f| json!({ "name": f.name, "sites": f.sites.len(), "devices": f.devices.len() }))
        .collect();
    Ok(Json(json!({
        "fleets": items,
        "policies": PolicyKind::ALL.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "max_days": MAX_BACKTEST_DAYS,
    })))
}
