//! Billing and batch jobs over REST: usage records, price plans, invoices (JSON and CSV), site
//! P&L, and batch jobs (submit, list, get, cancel) placed by the router's gang logic and metered
//! in GPU-milliseconds. A tenant key sees only its own tenant's usage, invoices and jobs.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hcp_billing::{Period, PricePlan, UsageAgg, UsageKind};
use hcp_model::{JobState, UsageStatus};
use hcp_sched::Work;
use hcp_store::{Page, PricePlanRow, UsageFilter, UsageRow, WorkloadRow};
use serde::{Deserialize, Serialize};

use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult};
use crate::routes::{Auth, Body, Params};
use crate::routing::Placement;
use crate::{App, wall_ms};

type AppState = State<Arc<App>>;

pub fn routes() -> Router<Arc<App>> {
    use axum::routing::get;
    Router::new()
        .route("/usage", get(usage))
        .route("/tenants/{id}/price-plan", get(price_plan).put(put_price_plan))
        .route("/tenants/{id}/invoices/{period}", get(invoice))
        .route("/invoices/{period}", get(invoices))
        .route("/pnl", get(pnl))
        .route("/jobs", get(jobs).post(submit_job))
        .route("/jobs/{id}", get(job).delete(cancel_job))
}

/// The tenant a caller may read: its own (tenant key), or any (admin) when named.
pub(crate) fn scope(p: &Principal, asked: Option<&str>) -> ApiResult<Option<String>> {
    match p {
        Principal::Tenant { tenant, .. } => match asked {
            Some(a) if a != tenant => Err(ApiError::not_found(format!("tenant {a} not found"))),
            _ => Ok(Some(tenant.clone())),
        },
        Principal::Account { .. } => {
            p.require(Role::Admin)?;
            Ok(asked.map(str::to_string))
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    tenant: Option<String>,
    tag: Option<String>,
    site: Option<String>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    from_ms: Option<i64>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    to_ms: Option<i64>,
    after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsagePage {
    pub items: Vec<UsageRow>,
    pub next_after: Option<i64>,
}

/// Usage records in write order (one per served request or finished job), filtered.
#[utoipa::path(get, path = "/api/v1/usage", tag = "billing", security(("bearer" = [])), params(UsageQuery), responses((status = 200, body = UsagePage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn usage(State(app): AppState, Auth(p): Auth, Params(q): Params<UsageQuery>) -> ApiResult<Response> {
    let tenant = scope(&p, q.tenant.as_deref())?;
    crate::routes::check_times(&[("from_ms", q.from_ms), ("to_ms", q.to_ms)])?;
    let f = UsageFilter {
        tenant: tenant.as_deref(),
        tag: q.tag.as_deref(),
        site: q.site.as_deref(),
        from_ms: q.from_ms,
        to_ms: q.to_ms,
    };
    let items = app.store.usage(&f, &Page { after: q.after, limit: q.limit }).await?;
    let full = items.len() as u32 == q.limit.unwrap_or(100).min(hcp_store::MAX_PAGE);
    let next_after = if full { items.last().map(|u| u.seq) } else { None };
    Ok(Json(UsagePage { items, next_after }).into_response())
}

/// The plan in force at `at_ms` (the list price when the tenant has none).
async fn plan_at(app: &App, tenant: &str, at_ms: i64) -> ApiResult<(PricePlan, Option<i64>)> {
    match app.store.price_plan_at(tenant, at_ms).await? {
        None => Ok((PricePlan::list(), None)),
        Some(row) => PricePlan::from_json(&row.body)
            .map(|p| (p, Some(row.effective_ms)))
            .map_err(|e| ApiError::internal(format!("stored price plan of {tenant}: {e}"))),
    }
}

/// The tenant's price plan now and, if a change is pending, from the next period.
#[utoipa::path(get, path = "/api/v1/tenants/{id}/price-plan", tag = "billing", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "The plan in force (the list price when none was set) and any pending from the next period"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 404, description = "No such tenant", body = crate::openapi::ErrorBody)))]
pub(crate) async fn price_plan(State(app): AppState, Auth(p): Auth, Path(id): Path<String>) -> ApiResult<Response> {
    p.require_tenant(&id)?;
    app.store.tenant(&id).await?;
    let now = wall_ms();
    let (plan, since) = plan_at(&app, &id, now).await?;
    let next_start = Period::containing(now).end_ms;
    let (next, next_since) = plan_at(&app, &id, next_start).await?;
    let pending = (next_since != since).then_some(serde_json::json!({ "effective_ms": next_since, "plan": next }));
    Ok(Json(serde_json::json!({
        "tenant": id, "plan": plan, "effective_ms": since, "list_price": since.is_none(), "pending": pending,
    }))
    .into_response())
}

/// Sets a tenant's price plan (admin). It applies from the start of the next billing period, so
/// every invoice is rated by one plan; a tenant's first plan applies at once.
#[utoipa::path(put, path = "/api/v1/tenants/{id}/price-plan", tag = "billing", security(("bearer" = [])), params(("id" = String, Path)), request_body(content = serde_json::Value, description = "A price plan: tokens[{tier, model, input_micro_usd_per_mtok, output_micro_usd_per_mtok}], gpu_hour_micro_usd, spot_discount_pct, reserved_gpus, reserved_gpu_hour_micro_usd"), responses((status = 200, description = "Stored, with the time it applies from"), (status = 403, description = "Needs admin", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid plan, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn put_price_plan(
    State(app): AppState,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<Response> {
    p.require(Role::Admin)?;
    app.store.tenant(&id).await?;
    let text = body.to_string();
    let plan = PricePlan::from_json(&text).map_err(|e| ApiError::invalid(e.field, e.rule))?;
    let now = wall_ms();
    let has = app.store.price_plan_at(&id, i64::MAX).await?.is_some();
    let effective_ms = if has { Period::containing(now).end_ms } else { 0 };
    let canonical = serde_json::to_string(&plan).expect("a plan serialises");
    app.store
        .put_price_plan(&PricePlanRow { tenant_id: id.clone(), effective_ms, body: canonical.clone(), updated_ms: now })
        .await?;
    app.store.audit(now, &p.actor(), "price_plan.set", &id, None, Some(&canonical)).await?;
    Ok(Json(serde_json::json!({ "tenant": id, "effective_ms": effective_ms, "plan": plan })).into_response())
}

async fn build_invoice(app: &App, tenant: &str, period: &Period) -> ApiResult<hcp_billing::Invoice> {
    let (plan, _) = plan_at(app, tenant, period.start_ms).await?;
    let sums = app.store.usage_sums(tenant, period.start_ms, period.end_ms).await?;
    let usage: Vec<UsageAgg> = sums
        .into_iter()
        .map(|s| UsageAgg {
            kind: s.kind,
            tier: u8::try_from(s.tier.clamp(0, 255)).unwrap_or(0),
            model: s.model,
            spot: s.spot,
            records: s.records as u64,
            input_tokens: s.input_tokens as u64,
            output_tokens: s.output_tokens as u64,
            gpu_ms: s.gpu_ms as u64,
        })
        .collect();
    Ok(hcp_billing::invoice(tenant, period, &plan, &usage))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct FormatQuery {
    /// `json` (default) or `csv`.
    #[param(pattern = "^(json|csv)$")]
    format: Option<String>,
}

fn wants_csv(q: &FormatQuery) -> ApiResult<bool> {
    match q.format.as_deref() {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(_) => Err(ApiError::invalid("format", "must be json or csv")),
    }
}

fn csv_response(body: String, name: &str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// A tenant's invoice for a month (`YYYY-MM`, UTC): line items by tier, model and unit, rated by
/// the plan in force at the month's start, each line rounded once; `status` is `open` until the
/// month ends.
#[utoipa::path(get, path = "/api/v1/tenants/{id}/invoices/{period}", tag = "billing", security(("bearer" = [])), params(("id" = String, Path), ("period" = String, Path, pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$", description = "YYYY-MM"), FormatQuery), responses((status = 200, description = "The invoice, JSON or CSV"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 404, description = "No such tenant", body = crate::openapi::ErrorBody), (status = 422, description = "Bad period or format", body = crate::openapi::ErrorBody)))]
pub(crate) async fn invoice(
    State(app): AppState,
    Auth(p): Auth,
    Path((id, period)): Path<(String, String)>,
    Params(q): Params<FormatQuery>,
) -> ApiResult<Response> {
    p.require_tenant(&id)?;
    let csv = wants_csv(&q)?;
    let period = Period::parse(&period).map_err(|e| ApiError::invalid(e.field, e.rule))?;
    app.store.tenant(&id).await?;
    let inv = build_invoice(&app, &id, &period).await?;
    if csv {
        return Ok(csv_response(inv.to_csv(), &format!("invoice-{id}-{}.csv", period.label)));
    }
    let status = if wall_ms() >= period.end_ms { "closed" } else { "open" };
    let mut v = serde_json::to_value(&inv).map_err(ApiError::internal)?;
    v["status"] = status.into();
    Ok(Json(v).into_response())
}

/// Every tenant's invoice total for a month (admin), and the fleet's.
#[utoipa::path(get, path = "/api/v1/invoices/{period}", tag = "billing", security(("bearer" = [])), params(("period" = String, Path, pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$", description = "YYYY-MM"), FormatQuery), responses((status = 200, description = "Totals by tenant"), (status = 403, description = "Needs admin", body = crate::openapi::ErrorBody)))]
pub(crate) async fn invoices(
    State(app): AppState,
    Auth(p): Auth,
    Path(period): Path<String>,
    Params(q): Params<FormatQuery>,
) -> ApiResult<Response> {
    p.require(Role::Admin)?;
    let csv = wants_csv(&q)?;
    let period = Period::parse(&period).map_err(|e| ApiError::invalid(e.field, e.rule))?;
    let mut rows = vec![];
    let mut ledger = hcp_billing::Ledger::default();
    for t in app.store.usage_tenants(period.start_ms, period.end_ms).await? {
        let inv = build_invoice(&app, &t, &period).await?;
        ledger.post_invoice(&inv).map_err(ApiError::internal)?;
        rows.push((t, inv.requests, inv.total_micro_usd));
    }
    let total: i64 = rows.iter().map(|r| r.2).sum();
    if csv {
        let mut s = String::from("tenant,period,requests,total_micro_usd\n");
        for (t, n, v) in &rows {
            s.push_str(&format!("{t},{},{n},{v}\n", period.label));
        }
        return Ok(csv_response(s, &format!("invoices-{}.csv", period.label)));
    }
    Ok(Json(serde_json::json!({
        "period": period,
        "items": rows.iter().map(|(t, n, v)| serde_json::json!({"tenant": t, "requests": n, "total_micro_usd": v})).collect::<Vec<_>>(),
        "total_micro_usd": total,
        "ledger_balanced": ledger.trial_balance() == 0,
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PnlQuery {
    site: Option<String>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    from_ms: i64,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    to_ms: i64,
}

/// Site P&L over a time range (operators): per site and for the fleet, mining revenue, inference
/// revenue, energy cost, grid-program credits and margin, in micro-USD.
#[utoipa::path(get, path = "/api/v1/pnl", tag = "billing", security(("bearer" = [])), params(PnlQuery), responses((status = 200, description = "Totals by site and for the fleet, in micro-USD (`_micro_usd`); `simulated` is true in demo mode, where the revenue and costs are the simulation's"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Needs viewer", body = crate::openapi::ErrorBody)))]
pub(crate) async fn pnl(State(app): AppState, Auth(p): Auth, Params(q): Params<PnlQuery>) -> ApiResult<Response> {
    p.require(Role::Viewer)?;
    crate::routes::check_times(&[("from_ms", Some(q.from_ms)), ("to_ms", Some(q.to_ms))])?;
    if q.to_ms <= q.from_ms {
        return Err(ApiError::invalid("to_ms", "must be after from_ms"));
    }
    let rows = app.store.site_pnl(q.site.as_deref(), q.from_ms, q.to_ms).await?;
    let mut by_site: std::collections::BTreeMap<String, hcp_billing::pnl::PnlTotals> = Default::default();
    let mut fleet = hcp_billing::pnl::PnlTotals::default();
    let mut ledger = hcp_billing::Ledger::default();
    for r in &rows {
        let p = hcp_billing::SitePnl {
            site: r.site_id.clone(),
            at_ms: r.at_ms,
            hours: r.hours,
            mining_revenue: hcp_model::MicroUsd(r.mining_revenue),
            inference_revenue: hcp_model::MicroUsd(r.inference_revenue),
            energy_cost: hcp_model::MicroUsd(r.energy_cost),
            grid_credits: hcp_model::MicroUsd(r.grid_credits),
        };
        by_site.entry(r.site_id.clone()).or_default().add(&p);
        fleet.add(&p);
        ledger.post_pnl(&p).map_err(ApiError::internal)?;
    }
    // Amounts in micro-USD, named so; in demo mode the revenue and costs are the simulation's.
    let totals = |t: &hcp_billing::pnl::PnlTotals| {
        serde_json::json!({
            "rows": t.rows,
            "mining_revenue_micro_usd": t.mining_revenue.0,
            "inference_revenue_micro_usd": t.inference_revenue.0,
            "energy_cost_micro_usd": t.energy_cost.0,
            "grid_credits_micro_usd": t.grid_credits.0,
            "margin_micro_usd": t.margin.0,
        })
    };
    Ok(Json(serde_json::json!({
        "from_ms": q.from_ms, "to_ms": q.to_ms,
        "simulated": app.mode == "demo",
        "sites": by_site.iter().map(|(s, t)| serde_json::json!({"site": s, "totals": totals(t)})).collect::<Vec<_>>(),
        "fleet": totals(&fleet),
        "ledger_balanced": ledger.trial_balance() == 0,
    }))
    .into_response())
}

// ---- batch jobs --------------------------------------------------------------------------------

#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobBody {
    /// GPUs the job needs, all at once.
    #[schema(minimum = 1, maximum = 10_000)]
    pub gpus: u32,
    /// Run time it needs, in seconds (wall clock).
    #[schema(exclusive_minimum = 0.0, maximum = 2_592_000.0)]
    pub duration_s: f64,
    /// Tier 0 (interactive) to 2 (batch); default 2.
    #[serde(default = "batch_tier")]
    #[schema(minimum = 0, maximum = 2, default = 2)]
    pub priority: u8,
    /// Preemptible jobs run at the spot price and may be stopped when power shrinks.
    #[serde(default = "yes")]
    pub preemptible: bool,
    /// Admins submit for a tenant; a tenant key submits for its own.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Seconds from now by which the job must have finished. With it, the job may wait: the
    /// engine's planner starts it in the intervals where its energy is cheapest that still meet
    /// the deadline (state `deferred` until then). Without it, the job queues at once.
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

fn batch_tier() -> u8 {
    2
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct JobRecord {
    gpus: u32,
    duration_s: f64,
    priority: u8,
    preemptible: bool,
    gang: u32,
    /// GPU time accrued while running, ms of wall clock (not x GPUs).
    ran_ms: i64,
    started_ms: Option<i64>,
    site: Option<String>,
    preemptions: u32,
    reason: Option<String>,
    /// When it must have finished (wall clock), for a job that may wait for cheaper power.
    #[serde(default)]
    deadline_ms: Option<i64>,
    /// The planner's latest placement of a deferred job.
    #[serde(default)]
    planned: Option<crate::events::BatchPlacement>,
}

/// Slots a job of `gpus` GPUs takes: the GPUs' worth of sequences on the fleet's replicas now.
fn gang_for(app: &App, gpus: u32) -> u32 {
    let per = app.fleet.served_model.gpus_per_replica.max(1);
    let r = app.router.lock().unwrap_or_else(|e| e.into_inner());
    let slots_per_replica = r.max_slots().max(1);
    (gpus.div_ceil(per) * slots_per_replica).max(1)
}

/// Submits a batch job: placed by the router as a gang (all its GPUs at once), metered in
/// GPU-milliseconds when it ends.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "billing", security(("bearer" = [])), request_body = JobBody, responses((status = 201, description = "Accepted, queued"), (status = 404, description = "The tenant named does not exist", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn submit_job(State(app): AppState, Auth(p): Auth, Body(b): Body<JobBody>) -> ApiResult<Response> {
    let tenant = match (&p, &b.tenant) {
        (Principal::Tenant { tenant, .. }, None) => tenant.clone(),
        (Principal::Tenant { tenant, .. }, Some(t)) if t == tenant => tenant.clone(),
        (Principal::Tenant { .. }, Some(t)) => return Err(ApiError::not_found(format!("tenant {t} not found"))),
        (Principal::Account { .. }, t) => {
            p.require(Role::Admin)?;
            t.clone().ok_or_else(|| ApiError::invalid("tenant", "is required for an admin"))?
        }
    };
    if !(1..=10_000).contains(&b.gpus) {
        return Err(ApiError::invalid("gpus", "must be 1 to 10000"));
    }
    if !(b.duration_s.is_finite() && b.duration_s > 0.0 && b.duration_s <= 30.0 * 86_400.0) {
        return Err(ApiError::invalid("duration_s", "must be > 0 and at most 30 days"));
    }
    if let Some(d) = b.deadline_s
        && !(d.is_finite() && d >= b.duration_s && d <= 30.0 * 86_400.0)
    {
        return Err(ApiError::invalid("deadline_s", "must be at least duration_s and at most 30 days"));
    }
    if b.priority > 2 {
        return Err(ApiError::invalid("priority", "must be 0, 1 or 2"));
    }
    if let Principal::Tenant { band, .. } = &p
        && i64::from(b.priority) < *band
    {
        return Err(ApiError::invalid("priority", format!("this key may use tier {band} or lower priority")));
    }
    let tix = {
        let r = app.router.lock().unwrap_or_else(|e| e.into_inner());
        let tix = r.tenant(&tenant).ok_or_else(|| ApiError::not_found(format!("tenant {tenant} not found")))?;
        if !r.can_ever_serve(&tenant) {
            return Err(ApiError::invalid("tenant", crate::gateway::no_capacity(&tenant)));
        }
        tix
    };
    let now = wall_ms();
    let id = format!("job-{}", crate::auth::short_id());
    let st = JobRecord {
        gpus: b.gpus,
        duration_s: b.duration_s,
        priority: b.priority,
        preemptible: b.preemptible,
        gang: gang_for(&app, b.gpus),
        ran_ms: 0,
        started_ms: None,
        site: None,
        preemptions: 0,
        reason: None,
        deadline_ms: b.deadline_s.map(|d| now + (d * 1000.0).floor() as i64),
        planned: None,
    };
    let row = WorkloadRow {
        id: id.clone(),
        tenant_id: tenant.clone(),
        kind: "job".into(),
        state: if st.deadline_ms.is_some() { JobState::Deferred } else { JobState::Queued },
        body: serde_json::to_string(&st).expect("serialises"),
        created_ms: now,
        updated_ms: now,
    };
    app.store.put_workload(&row).await?;
    spawn_job(&app, row.clone(), st, tix);
    let mut r = (StatusCode::CREATED, Json(job_json(&row))).into_response();
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&format!("/api/v1/jobs/{id}")).expect("ascii"));
    Ok(r)
}

fn job_json(w: &WorkloadRow) -> serde_json::Value {
    let body: serde_json::Value = serde_json::from_str(&w.body).unwrap_or_default();
    serde_json::json!({
        "id": w.id, "tenant": w.tenant_id, "state": w.state, "created_ms": w.created_ms, "updated_ms": w.updated_ms,
        "gpus": body["gpus"], "duration_s": body["duration_s"], "priority": body["priority"],
        "preemptible": body["preemptible"], "ran_ms": body["ran_ms"], "site": body["site"],
        "preemptions": body["preemptions"], "reason": body["reason"],
        "deadline_ms": body["deadline_ms"], "planned": body["planned"],
    })
}

/// How often a job's process renews the job's row while it waits or runs. A row not renewed for
/// [`JOB_LEASE_MS`] belongs to a process that stopped: another API process (or the next start)
/// claims it and resumes the job, keeping the GPU time it ran and its preemptions.
pub const JOB_HEARTBEAT: Duration = Duration::from_secs(10);
pub const JOB_LEASE_MS: i64 = 30_000;

/// What a job's task is told by the API or the process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum JobSignal {
    Run,
    /// The tenant (or an admin) cancelled it.
    Cancel,
    /// This process is stopping: hand the job back (its row is left for the next claim at once).
    Release,
}

/// A job's task as the process sees it: its switch, the planner's placements for it, and, while
/// it waits for the planner, what the planner needs.
pub struct JobHandle {
    signal: tokio::sync::watch::Sender<JobSignal>,
    placement: tokio::sync::watch::Sender<Option<crate::events::BatchPlacement>>,
    pub waiting: Option<crate::events::WaitingJob>,
}

impl JobHandle {
    pub fn send(&self, s: JobSignal) {
        let _ = self.signal.send(s);
    }
}

/// Starts a job's task: it waits for the planner first when it is deferred, then is placed by
/// the router.
fn spawn_job(app: &Arc<App>, row: WorkloadRow, st: JobRecord, tix: hcp_model::TenantId) {
    let (signal_tx, signal) = tokio::sync::watch::channel(JobSignal::Run);
    let (placement_tx, placement) = tokio::sync::watch::channel(None);
    let handle = JobHandle { signal: signal_tx, placement: placement_tx, waiting: None };
    app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(row.id.clone(), handle);
    tokio::spawn(run_job(app.clone(), row, st, tix, signal, placement));
}

/// The planner's placements announced on the bus (`hcp.batch`): each job waiting here is told its own.
pub fn batch_notice(app: &App, n: &crate::events::BatchNotice) {
    let jobs = app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner());
    for p in &n.placements {
        if let Some(h) = jobs.get(&p.id)
            && h.waiting.is_some()
        {
            let _ = h.placement.send(Some(p.clone()));
        }
    }
}

/// The jobs waiting for the planner here (announced on `hcp.jobs.waiting`).
pub fn waiting_jobs(app: &App) -> Vec<crate::events::WaitingJob> {
    let jobs = app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let mut w: Vec<_> = jobs.values().filter_map(|h| h.waiting.clone()).collect();
    w.sort_by(|a, b| a.id.cmp(&b.id));
    w
}

/// Claims the jobs whose process stopped renewing them and resumes them here. Returns how many.
pub async fn resume_jobs(app: &Arc<App>) -> anyhow::Result<usize> {
    let mut n = 0;
    for w in app.store.stale_workloads("job", wall_ms() - JOB_LEASE_MS, hcp_store::MAX_PAGE).await? {
        let Ok(mut st) = serde_json::from_str::<JobRecord>(&w.body) else {
            tracing::warn!(job = %w.id, "stored job state unreadable; left as it is");
            continue;
        };
        let Some(tix) = app.router.lock().unwrap_or_else(|e| e.into_inner()).tenant(&w.tenant_id) else {
            tracing::warn!(job = %w.id, tenant = %w.tenant_id, "job of a tenant the router does not know; left");
            continue;
        };
        // Time since the last renewal is not known to have run: it is neither billed nor
        // counted towards the job (at most one heartbeat's worth, run again).
        st.started_ms = None;
        // A job that waited for the planner waits again; any other queues.
        let state = if w.state == JobState::Deferred { JobState::Deferred } else { JobState::Queued };
        let row = next_row(&w, &st, state);
        if !app.store.update_workload_if(&row, w.updated_ms).await? {
            continue; // another process claimed it first
        }
        tracing::info!(job = %row.id, ran_ms = st.ran_ms, "job resumed");
        spawn_job(app, row, st, tix);
        n += 1;
    }
    Ok(n)
}

/// Resumes unowned jobs at start and every heartbeat until `stop`.
pub async fn resume_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        if let Err(e) = resume_jobs(&app).await {
            tracing::warn!(error = %e, "jobs not resumed this time");
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
            _ = tokio::time::sleep(JOB_HEARTBEAT) => {}
        }
    }
}

/// Hands every job this process runs back (for the next start or another process), and waits
/// (up to 5 s) until their rows say so.
pub async fn release_jobs(app: &App) {
    for h in app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).values() {
        h.send(JobSignal::Release);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!("jobs not released in 5 s; their leases expire instead");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The row that follows `row` with the job's state: written at a later `updated_ms` than `row`'s
/// (the lease compares it), so a write conditional on `row` succeeds only once.
fn next_row(row: &WorkloadRow, st: &JobRecord, state: JobState) -> WorkloadRow {
    WorkloadRow {
        state,
        body: serde_json::to_string(st).expect("serialises"),
        updated_ms: wall_ms().max(row.updated_ms + 1),
        ..row.clone()
    }
}

/// A job's row, written only while this process holds it.
struct Lease<'a> {
    app: &'a App,
    row: WorkloadRow,
}

impl Lease<'_> {
    /// Writes the state; false when another process took the job over (this one must stop).
    /// A storage error keeps the job running here (the next heartbeat tries again).
    async fn write(&mut self, st: &JobRecord, state: JobState, release: bool) -> bool {
        let expect = self.row.updated_ms;
        let mut next = next_row(&self.row, st, state);
        if release {
            // As old as can be, so the next claim need not wait for the lease to end.
            next.updated_ms = i64::MIN;
        }
        match self.app.store.update_workload_if(&next, expect).await {
            Ok(true) => {
                self.row = next;
                true
            }
            Ok(false) => {
                tracing::warn!(job = %self.row.id, "job taken over by another process; stopping it here");
                false
            }
            Err(e) => {
                tracing::error!(job = %self.row.id, error = %e, "job state not stored");
                true
            }
        }
    }
}

/// What woke a job's task.
enum Wake {
    Placement(Option<Placement>),
    Signal(JobSignal),
    Beat,
    Served,
}

/// The job's one usage record: the GPU time it ran, GPUs x milliseconds (none if it never ran).
async fn meter_job(app: &App, row: &WorkloadRow, st: &JobRecord, status: UsageStatus) {
    if st.ran_ms <= 0 {
        return;
    }
    let u = UsageRow {
        seq: 0,
        id: row.id.clone(),
        tenant_id: row.tenant_id.clone(),
        key_id: String::new(),
        kind: UsageKind::Gpu,
        tier: i64::from(st.priority),
        model: app.fleet.served_model.id.clone(),
        site_id: st.site.clone().unwrap_or_default(),
        input_tokens: 0,
        output_tokens: 0,
        gpu_ms: st.ran_ms * i64::from(st.gpus),
        spot: st.preemptible,
        status,
        tag: None,
        at_ms: wall_ms(),
    };
    if let Err(e) = app.meter.record(u).await {
        tracing::error!(job = %row.id, error = %e, "job usage not recorded");
    }
}

/// Cancels a job no process here runs: its holder (another API process) is asked on the bus
/// (`hcp.job.cancel`); a job nobody holds any more (its lease lapsed) is claimed and ended here,
/// billed for the time it ran.
async fn cancel_elsewhere(app: &App, w: &WorkloadRow) -> ApiResult<()> {
    if w.updated_ms >= wall_ms() - JOB_LEASE_MS {
        app.bus.publish("hcp.job.cancel", w.id.as_bytes()).await.map_err(ApiError::internal)?;
        return Ok(());
    }
    let mut st: JobRecord = serde_json::from_str(&w.body).map_err(ApiError::internal)?;
    st.started_ms = None;
    let row = next_row(w, &st, JobState::Cancelled);
    if app.store.update_workload_if(&row, w.updated_ms).await? {
        meter_job(app, &row, &st, UsageStatus::Cancelled).await;
    } else {
        // Claimed meanwhile by a process that resumes it: that one hears the bus.
        app.bus.publish("hcp.job.cancel", w.id.as_bytes()).await.map_err(ApiError::internal)?;
    }
    Ok(())
}

/// A cancel announced on the bus: the job's task here, if it runs here, is told.
pub fn cancel_notice(app: &App, id: &[u8]) {
    let id = String::from_utf8_lossy(id);
    if let Some(h) = app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(id.as_ref()) {
        h.send(JobSignal::Cancel);
    }
}

/// Adds the time run since `started_ms` to `ran_ms` (and restarts the count from now).
fn accrue(st: &mut JobRecord) {
    if let Some(t) = st.started_ms {
        let now = wall_ms();
        st.ran_ms += (now - t).max(0);
        st.started_ms = Some(now);
    }
}

/// A job's life: a job with a deadline first waits for the planner (state `deferred`) until its
/// placement says start, or until its latest start (deadline less the time it still needs: the
/// planner's silence never makes it late); then it waits for the router's placement, runs until
/// its time is served (preemption sends it back to the queue, keeping what it ran), is cancelled,
/// or is rejected; it renews its row every heartbeat (with the time run so far) and stops if
/// another process took it over. The GPU time it ran is metered once when it ends (the job id is
/// the usage record's id, so a job resumed elsewhere is still billed once).
async fn run_job(
    app: Arc<App>,
    row: WorkloadRow,
    mut st: JobRecord,
    tix: hcp_model::TenantId,
    mut signal: tokio::sync::watch::Receiver<JobSignal>,
    mut placement: tokio::sync::watch::Receiver<Option<crate::events::BatchPlacement>>,
) {
    let need_ms = (st.duration_s * 1000.0).ceil() as i64;
    let deferred = row.state == JobState::Deferred;
    let mut lease = Lease { app: &app, row };
    let mut beat = tokio::time::interval(JOB_HEARTBEAT);
    beat.tick().await;
    let forget = |app: &App, id: &str| {
        app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    };
    if deferred && let Some(deadline) = st.deadline_ms {
        let remaining_ms = (need_ms - st.ran_ms).max(1);
        // The latest start keeps a margin for the router's placement and the model's loading:
        // 5 % of the run, at least 1 s, at most 10 min. The planner plans to the deadline less it.
        let margin = (remaining_ms / 20).clamp(1_000, 600_000);
        let waiting = crate::events::WaitingJob {
            id: lease.row.id.clone(),
            gpus: st.gpus,
            remaining_ms,
            deadline_ms: deadline - margin,
        };
        let latest = deadline - remaining_ms - margin;
        if let Some(h) = app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&lease.row.id) {
            h.waiting = Some(waiting);
        }
        let until = tokio::time::Instant::now() + Duration::from_millis((latest - wall_ms()).max(0) as u64);
        // Deferred: until the planner says start, the latest start comes, or a signal.
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    tracing::info!(job = %lease.row.id, "latest start reached with no placement from the planner; the job queues");
                    break None;
                }
                r = placement.changed() => {
                    if r.is_err() {
                        break None;
                    }
                    let p = placement.borrow_and_update().clone();
                    if let Some(p) = p {
                        let start = p.run_now;
                        st.planned = Some(p);
                        if start {
                            break None;
                        }
                    }
                }
                r = signal.changed() => match if r.is_err() { JobSignal::Release } else { *signal.borrow() } {
                    JobSignal::Run => {}
                    JobSignal::Cancel => break Some(JobState::Cancelled),
                    JobSignal::Release => {
                        lease.write(&st, JobState::Deferred, true).await;
                        return forget(&app, &lease.row.id);
                    }
                },
                _ = beat.tick() => {
                    if !lease.write(&st, JobState::Deferred, false).await {
                        return forget(&app, &lease.row.id);
                    }
                }
            }
        };
        if let Some(h) = app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&lease.row.id) {
            h.waiting = None;
        }
        if let Some(state) = end {
            lease.write(&st, state, false).await;
            return forget(&app, &lease.row.id);
        }
        if !lease.write(&st, JobState::Queued, false).await {
            return forget(&app, &lease.row.id);
        }
    }
    let work = Work {
        id: 0,
        tenant: tix,
        band: st.priority,
        model: crate::routing::SERVED_MODEL,
        prompt_tokens: 1,
        max_output_tokens: 1,
        deadline_ms: None,
        gang: st.gang,
        preemptible: st.preemptible,
        restart_cost: st.duration_s,
    };
    let (rid, mut rx) = app.router.lock().unwrap_or_else(|e| e.into_inner()).arrive(work, wall_ms());
    let leave = |app: &App, id: &str| {
        app.router.lock().unwrap_or_else(|e| e.into_inner()).finish(rid, None, wall_ms());
        app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    };
    let end_state = 'job: loop {
        // Queued: wait for a placement, a signal or the next renewal.
        let wake = tokio::select! {
            p = rx.recv() => Wake::Placement(p),
            r = signal.changed() => Wake::Signal(if r.is_err() { JobSignal::Release } else { *signal.borrow() }),
            _ = beat.tick() => Wake::Beat,
        };
        let replica = match wake {
            Wake::Placement(Some(Placement::Dispatched(r))) => r,
            Wake::Placement(Some(Placement::Preempted)) | Wake::Signal(JobSignal::Run) | Wake::Served => continue,
            Wake::Placement(Some(Placement::Rejected(why))) => {
                st.reason = Some(format!("{why:?}"));
                break JobState::Rejected;
            }
            Wake::Placement(None) => break JobState::Failed,
            Wake::Signal(JobSignal::Cancel) => break JobState::Cancelled,
            Wake::Signal(JobSignal::Release) => {
                lease.write(&st, JobState::Queued, true).await;
                return leave(&app, &lease.row.id);
            }
            Wake::Beat => {
                if !lease.write(&st, JobState::Queued, false).await {
                    return leave(&app, &lease.row.id);
                }
                continue;
            }
        };
        st.started_ms = Some(wall_ms());
        st.site = app.router.lock().unwrap_or_else(|e| e.into_inner()).site_of(replica).map(str::to_string);
        if !lease.write(&st, JobState::Running, false).await {
            return leave(&app, &lease.row.id);
        }
        let until = tokio::time::Instant::now() + Duration::from_millis((need_ms - st.ran_ms).max(0) as u64);
        // Running: until its time is served, it is preempted, cancelled or released.
        loop {
            let wake = tokio::select! {
                _ = tokio::time::sleep_until(until) => Wake::Served,
                p = rx.recv() => Wake::Placement(p),
                r = signal.changed() => Wake::Signal(if r.is_err() { JobSignal::Release } else { *signal.borrow() }),
                _ = beat.tick() => Wake::Beat,
            };
            accrue(&mut st);
            match wake {
                Wake::Served => {
                    // Its time is served: a wake that came late (a busy runtime) is the
                    // platform's delay, not GPU time the job used or is billed for.
                    st.ran_ms = st.ran_ms.min(need_ms);
                    break 'job JobState::Completed;
                }
                Wake::Signal(JobSignal::Cancel) => break 'job JobState::Cancelled,
                Wake::Signal(JobSignal::Run) | Wake::Placement(Some(Placement::Dispatched(_))) => {}
                Wake::Placement(Some(Placement::Rejected(_))) => {}
                Wake::Placement(Some(Placement::Preempted)) | Wake::Placement(None) => {
                    st.started_ms = None;
                    st.preemptions += 1;
                    if !lease.write(&st, JobState::Queued, false).await {
                        return leave(&app, &lease.row.id);
                    }
                    continue 'job;
                }
                Wake::Signal(JobSignal::Release) => {
                    st.started_ms = None;
                    lease.write(&st, JobState::Queued, true).await;
                    return leave(&app, &lease.row.id);
                }
                Wake::Beat => {
                    if !lease.write(&st, JobState::Running, false).await {
                        return leave(&app, &lease.row.id);
                    }
                }
            }
        }
    };
    st.started_ms = None;
    let served = end_state == JobState::Completed;
    app.router.lock().unwrap_or_else(|e| e.into_inner()).finish(rid, served.then_some(1), wall_ms());
    meter_job(&app, &lease.row, &st, end_state.into()).await;
    lease.write(&st, end_state, false).await;
    app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&lease.row.id);
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsQuery {
    tenant: Option<String>,
    after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A tenant's batch jobs, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "billing", security(("bearer" = [])), params(JobsQuery), responses((status = 200, description = "Jobs"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 422, description = "tenant is required for an admin", body = crate::openapi::ErrorBody)))]
pub(crate) async fn jobs(State(app): AppState, Auth(p): Auth, Params(q): Params<JobsQuery>) -> ApiResult<Response> {
    let tenant = scope(&p, q.tenant.as_deref())?.ok_or_else(|| ApiError::invalid("tenant", "is required"))?;
    let rows = app.store.workloads_of(&tenant, &Page { after: q.after, limit: q.limit }).await?;
    let next = rows.last().map(|r| r.created_ms);
    let items: Vec<_> = rows.iter().filter(|r| r.kind == "job").map(job_json).collect();
    Ok(Json(serde_json::json!({ "items": items, "next_after": next })).into_response())
}

async fn own_job(app: &App, p: &Principal, id: &str) -> ApiResult<WorkloadRow> {
    if let Principal::Account { .. } = p {
        p.require(Role::Admin)?;
    }
    let w = app.store.workload(id).await?;
    if w.kind != "job" || p.require_tenant(&w.tenant_id).is_err() {
        return Err(ApiError::not_found(format!("job {id} not found")));
    }
    Ok(w)
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "billing", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "The job"), (status = 404, description = "No such job", body = crate::openapi::ErrorBody)))]
pub(crate) async fn job(State(app): AppState, Auth(p): Auth, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(job_json(&own_job(&app, &p, &id).await?)).into_response())
}

/// Cancels a queued or running job; the GPU time it ran is billed.
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", tag = "billing", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 202, description = "Cancelling"), (status = 404, description = "No such job", body = crate::openapi::ErrorBody), (status = 409, description = "Already ended", body = crate::openapi::ErrorBody)))]
pub(crate) async fn cancel_job(State(app): AppState, Auth(p): Auth, Path(id): Path<String>) -> ApiResult<Response> {
    let w = own_job(&app, &p, &id).await?;
    let here = match app.gateway.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        Some(h) => {
            h.send(JobSignal::Cancel);
            true
        }
        None => false,
    };
    match here {
        true => {}
        false if !w.state.ended() => cancel_elsewhere(&app, &w).await?,
        false => {
            return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("job {id} has ended ({})", w.state)));
        }
    }
    app.store.audit(wall_ms(), &p.actor(), "job.cancel", &id, None, None).await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&w))).into_response())
}
