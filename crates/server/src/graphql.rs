//! A read-only GraphQL endpoint at `/graphql` (POST a JSON `{query, variables, operationName}`,
//! or GET `?query=`) over the fleet, sites, devices, plans, decisions and usage, for dashboards and
//! integrations. The same tokens and session cookie as REST; the same rules: fleet data needs an
//! operator account (viewer or above), usage is a tenant's own (an admin names the tenant).
//!
//! Limits: a query deeper than [`MAX_DEPTH`] or costlier than [`MAX_COMPLEXITY`] is refused before
//! it runs. A list's cost is its `limit` times the cost of one element, so `sites { devices(limit:
//! 1000) { telemetry } }` is priced as what it would read. The schema is exported to
//! `docs/schema.graphql` (a test keeps the file current).

use std::sync::Arc;

use async_graphql::{
    ComplexObject, Context, EmptyMutation, EmptySubscription, ErrorExtensions, Json, Object, Schema, SimpleObject,
};
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hcp_store::{DeviceFilter, Page, UsageFilter};
use serde::Deserialize;

use crate::App;
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::routes::{Auth, Params};

pub const MAX_DEPTH: usize = 6;
pub const MAX_COMPLEXITY: usize = 5_000;
/// Largest `limit` a list argument takes.
pub const MAX_LIMIT: i32 = 1_000;

pub type HcpSchema = Schema<Query, EmptyMutation, EmptySubscription>;

pub fn schema() -> HcpSchema {
    Schema::build(Query, EmptyMutation, EmptySubscription)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .finish()
}

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/graphql", get(get_query).post(post_query))
}

/// A GraphQL request body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GqlBody {
    /// The GraphQL document.
    query: String,
    /// Variables: an object.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    variables: Option<serde_json::Value>,
    #[serde(default)]
    operation_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GqlQuery {
    query: String,
    variables: Option<String>,
    operation_name: Option<String>,
}

async fn run(app: Arc<App>, p: Principal, b: GqlBody) -> Response {
    if b.variables.as_ref().is_some_and(|v| !v.is_object() && !v.is_null()) {
        return ApiError::invalid("variables", "must be an object").into_response();
    }
    let mut req = async_graphql::Request::new(b.query);
    if let Some(v) = b.variables {
        req = req.variables(async_graphql::Variables::from_json(v));
    }
    if let Some(o) = b.operation_name {
        req = req.operation_name(o);
    }
    let res = app.graphql.execute(req.data(p).data(app.clone())).await;
    axum::Json(res).into_response()
}

/// A GraphQL query (read-only; the schema is `docs/schema.graphql`).
#[utoipa::path(post, path = "/graphql", tag = "graphql", security(("bearer" = [])), request_body(content = GqlBody, description = "JSON: {query, variables, operationName}", content_type = "application/json"), responses((status = 200, description = "GraphQL response: data and errors (a field the caller may not read is an error with code forbidden)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 422, description = "Not a GraphQL request body", body = crate::openapi::ErrorBody)))]
pub(crate) async fn post_query(State(app): State<Arc<App>>, Auth(p): Auth, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<GqlBody>(&body) {
        Ok(b) => run(app, p, b).await,
        Err(e) => {
            ApiError::invalid("body", format!("a JSON object {{query, variables, operationName}}: {e}")).into_response()
        }
    }
}

/// A GraphQL query in the query string (`?query=...&variables=<JSON>`).
#[utoipa::path(get, path = "/graphql", tag = "graphql", security(("bearer" = [])), params(("query" = String, Query, description = "The GraphQL document"), ("variables" = Option<String>, Query, description = "Variables as JSON"), ("operationName" = Option<String>, Query)), responses((status = 200, description = "GraphQL response: data and errors"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody)))]
pub(crate) async fn get_query(State(app): State<Arc<App>>, Auth(p): Auth, Params(q): Params<GqlQuery>) -> Response {
    // An empty `variables` is none.
    let variables = match q.variables.as_deref().filter(|v| !v.trim().is_empty()).map(serde_json::from_str).transpose()
    {
        Ok(v) => v,
        Err(e) => return ApiError::invalid("variables", format!("JSON: {e}")).into_response(),
    };
    run(app, p, GqlBody { query: q.query, variables, operation_name: q.operation_name }).await
}

fn err(code: &'static str, msg: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(msg.into()).extend_with(|_, e| e.set("code", code))
}

fn app<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Arc<App>> {
    ctx.data::<Arc<App>>()
}

/// The caller must be an operator account of at least `role`.
fn require(ctx: &Context<'_>, role: Role) -> async_graphql::Result<()> {
    let p = ctx.data::<Principal>()?;
    p.require(role).map_err(|e| err("forbidden", e.message))
}

fn store_err(e: hcp_store::StoreError) -> async_graphql::Error {
    match e {
        hcp_store::StoreError::NotFound(what) => err("not_found", format!("{what} not found")),
        hcp_store::StoreError::Invalid { field, rule } => err("invalid", format!("{field}: {rule}")),
        e => {
            tracing::error!(error = %e, "graphql: storage");
            err("internal", "internal error; see the server log")
        }
    }
}

fn checked_limit(l: Option<i32>) -> async_graphql::Result<u32> {
    match l.unwrap_or(100) {
        n @ 1..=MAX_LIMIT => Ok(n as u32),
        n => Err(err("invalid", format!("limit: must be 1 to {MAX_LIMIT}, got {n}"))),
    }
}

/// List cost: `limit` elements of `child` each.
fn list_cost(child: usize, limit: Option<i32>) -> usize {
    child.saturating_mul(limit.unwrap_or(100).clamp(1, MAX_LIMIT) as usize)
}

pub struct Query;

#[Object]
impl Query {
    /// Who the token is.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Me> {
        Ok(match ctx.data::<Principal>()? {
            Principal::Account { name, role } => {
                Me { account: Some(name.clone()), role: Some(role.as_str().into()), tenant: None }
            }
            Principal::Tenant { tenant, .. } => Me { account: None, role: None, tenant: Some(tenant.clone()) },
        })
    }

    /// The fleet now: per site the latest interval's power split, hashrate, GPUs serving and margin.
    async fn fleet(&self, ctx: &Context<'_>) -> async_graphql::Result<Fleet> {
        require(ctx, Role::Viewer)?;
        let v = crate::dashboard::fleet_now(app(ctx)?);
        let sites = v["sites"].as_array().map(|a| a.iter().map(SiteNow::from_json).collect()).unwrap_or_default();
        Ok(Fleet { name: app(ctx)?.fleet.name.clone(), sites, totals: SiteNow::from_json(&v["totals"]) })
    }

    /// The sites (topology and cap).
    async fn sites(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Site>> {
        require(ctx, Role::Viewer)?;
        let rows = app(ctx)?.store.sites().await.map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|s| Site { id: s.id, idx: s.idx, power_cap_w: s.power_cap_w, settlement_point: s.settlement_point })
            .collect())
    }

    /// Devices in index order, filtered; page with `after` (the last `idx` seen).
    #[graphql(complexity = "list_cost(child_complexity, limit)")]
    #[allow(clippy::too_many_arguments)]
    async fn devices(
        &self,
        ctx: &Context<'_>,
        site: Option<String>,
        model: Option<String>,
        #[graphql(desc = "available, unknown or quarantined")] status: Option<String>,
        maintenance: Option<bool>,
        after: Option<i64>,
        limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Device>> {
        require(ctx, Role::Viewer)?;
        let f = DeviceFilter { site: site.as_deref(), model: model.as_deref(), maintenance, status: status.as_deref() };
        let rows = app(ctx)?
            .store
            .devices(&f, &Page { after, limit: Some(checked_limit(limit)?) })
            .await
            .map_err(store_err)?;
        Ok(rows.into_iter().map(Device::from).collect())
    }

    async fn device(&self, ctx: &Context<'_>, idx: i64) -> async_graphql::Result<Device> {
        require(ctx, Role::Viewer)?;
        Ok(app(ctx)?.store.device(idx).await.map_err(store_err)?.into())
    }

    /// Plan summaries, newest first.
    #[graphql(complexity = "list_cost(child_complexity, limit)")]
    async fn plans(
        &self,
        ctx: &Context<'_>,
        after: Option<i64>,
        limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Plan>> {
        require(ctx, Role::Viewer)?;
        let rows =
            app(ctx)?.store.plans(&Page { after, limit: Some(checked_limit(limit)?) }).await.map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|r| Plan {
                id: r.id,
                at_ms: r.at_ms,
                summary: Json(serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null)),
            })
            .collect())
    }

    /// Plan changes with their reasons, newest first, optionally of one site.
    #[graphql(complexity = "list_cost(child_complexity, limit)")]
    async fn decisions(
        &self,
        ctx: &Context<'_>,
        site: Option<String>,
        after: Option<i64>,
        limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Decision>> {
        require(ctx, Role::Viewer)?;
        let page = Page { after, limit: Some(checked_limit(limit)?) };
        let rows = app(ctx)?.store.decisions(site.as_deref(), &page).await.map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|d| Decision {
                id: d.id,
                at_ms: d.at_ms,
                site_id: d.site_id,
                kind: d.kind,
                reason: d.reason,
                detail: Json(serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null)),
            })
            .collect())
    }

    /// Usage records in write order: a tenant key reads its own; an admin names a tenant or
    /// reads all.
    #[graphql(complexity = "list_cost(child_complexity, limit)")]
    #[allow(clippy::too_many_arguments)]
    async fn usage(
        &self,
        ctx: &Context<'_>,
        tenant: Option<String>,
        tag: Option<String>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        after: Option<i64>,
        limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Usage>> {
        let p = ctx.data::<Principal>()?;
        let tenant = crate::billing::scope(p, tenant.as_deref()).map_err(|e| err("forbidden", e.message))?;
        let f = UsageFilter { tenant: tenant.as_deref(), tag: tag.as_deref(), site: None, from_ms, to_ms };
        let rows =
            app(ctx)?.store.usage(&f, &Page { after, limit: Some(checked_limit(limit)?) }).await.map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|u| Usage {
                seq: u.seq,
                id: u.id,
                tenant_id: u.tenant_id,
                key_id: u.key_id,
                kind: u.kind.to_string(),
                tier: u.tier,
                model: u.model,
                site_id: u.site_id,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                gpu_ms: u.gpu_ms,
                spot: u.spot,
                status: u.status.to_string(),
                tag: u.tag,
                at_ms: u.at_ms,
            })
            .collect())
    }
}

#[derive(SimpleObject)]
pub struct Me {
    account: Option<String>,
    role: Option<String>,
    tenant: Option<String>,
}

#[derive(SimpleObject)]
pub struct Fleet {
    name: String,
    sites: Vec<SiteNow>,
    /// Sums over the sites (the `site` field is empty).
    totals: SiteNow,
}

/// A site's latest interval (fields null before the first).
#[derive(SimpleObject, Default)]
pub struct SiteNow {
    site: String,
    at_ms: Option<i64>,
    cap_mw: Option<f64>,
    mining_mw: Option<f64>,
    inference_mw: Option<f64>,
    curtailed_mw: Option<f64>,
    held_for_grid_mw: Option<f64>,
    hashrate_ph_s: Option<f64>,
    /// GPUs serving inference (a mean over the interval, so it may be fractional).
    gpus_serving: Option<f64>,
    margin_usd_per_h: Option<f64>,
    price_usd_per_mwh: Option<f64>,
}

impl SiteNow {
    fn from_json(v: &serde_json::Value) -> Self {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        SiteNow {
            site: v.get("site").and_then(|s| s.as_str()).unwrap_or_default().to_string(),
            at_ms: v.get("at_ms").and_then(serde_json::Value::as_i64),
            cap_mw: f("cap_mw"),
            mining_mw: f("mining_mw"),
            inference_mw: f("inference_mw"),
            curtailed_mw: f("curtailed_mw"),
            held_for_grid_mw: f("held_for_grid_mw"),
            hashrate_ph_s: f("hashrate_ph_s"),
            gpus_serving: f("gpus_serving"),
            margin_usd_per_h: f("margin_usd_per_h"),
            price_usd_per_mwh: f("price_usd_per_mwh"),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Site {
    id: String,
    idx: i64,
    power_cap_w: f64,
    settlement_point: String,
}

#[ComplexObject]
impl Site {
    /// The latest interval of this site.
    async fn now(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<SiteNow>> {
        let v = crate::dashboard::fleet_now(app(ctx)?);
        Ok(v["sites"].as_array().and_then(|a| a.iter().find(|s| s["site"] == self.id.as_str())).map(SiteNow::from_json))
    }

    /// The site's power split per interval over `[fromMs, toMs)`, oldest first.
    async fn power(
        &self,
        ctx: &Context<'_>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> async_graphql::Result<Vec<SitePower>> {
        let rows = app(ctx)?
            .store
            .site_seconds(&self.id, from_ms.unwrap_or(i64::MIN), to_ms.unwrap_or(i64::MAX))
            .await
            .map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|r| SitePower { at_ms: r.at_ms, power_w: r.power_w, mining_w: r.mining_w, inference_w: r.inference_w })
            .collect())
    }

    /// The site's devices in index order.
    #[graphql(complexity = "list_cost(child_complexity, limit)")]
    async fn devices(
        &self,
        ctx: &Context<'_>,
        status: Option<String>,
        after: Option<i64>,
        limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Device>> {
        let f = DeviceFilter { site: Some(&self.id), status: status.as_deref(), ..Default::default() };
        let rows = app(ctx)?
            .store
            .devices(&f, &Page { after, limit: Some(checked_limit(limit)?) })
            .await
            .map_err(store_err)?;
        Ok(rows.into_iter().map(Device::from).collect())
    }
}

#[derive(SimpleObject)]
pub struct SitePower {
    at_ms: i64,
    power_w: f64,
    mining_w: f64,
    inference_w: f64,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Device {
    idx: i64,
    site_id: String,
    feeder_id: String,
    rack_idx: i64,
    model: String,
    /// asic or gpu.
    kind: String,
    maintenance: bool,
    /// available, unknown or quarantined.
    status: String,
    status_reason: Option<String>,
    status_ms: Option<i64>,
    /// The latest minute of telemetry stored.
    last_telemetry_ms: Option<i64>,
}

impl From<hcp_store::DeviceRow> for Device {
    fn from(d: hcp_store::DeviceRow) -> Self {
        Device {
            idx: d.idx,
            site_id: d.site_id,
            feeder_id: d.feeder_id,
            rack_idx: d.rack_idx,
            model: d.model,
            kind: d.kind,
            maintenance: d.maintenance,
            status: d.status,
            status_reason: d.status_reason,
            status_ms: d.status_ms,
            last_telemetry_ms: d.last_telemetry_ms,
        }
    }
}

#[ComplexObject]
impl Device {
    /// Per-minute telemetry rollups over `[fromMs, toMs)`, oldest first (at most 1,000).
    #[graphql(complexity = "list_cost(child_complexity, Some(MAX_LIMIT))")]
    async fn telemetry(
        &self,
        ctx: &Context<'_>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> async_graphql::Result<Vec<DeviceMinute>> {
        let rows = app(ctx)?
            .store
            .device_minutes(self.idx, from_ms.unwrap_or(i64::MIN), to_ms.unwrap_or(i64::MAX))
            .await
            .map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|m| DeviceMinute {
                minute_ms: m.minute_ms,
                samples: m.samples,
                power_w_avg: m.power_w_avg,
                hashrate_ths_avg: m.hashrate_ths_avg,
                temp_c_max: m.temp_c_max,
                errors: m.errors,
            })
            .collect())
    }
}

#[derive(SimpleObject)]
pub struct DeviceMinute {
    minute_ms: i64,
    samples: i64,
    power_w_avg: f64,
    hashrate_ths_avg: Option<f64>,
    temp_c_max: f64,
    errors: i64,
}

#[derive(SimpleObject)]
pub struct Plan {
    id: i64,
    at_ms: i64,
    /// Per site: ASIC and GPU MW, MW held for the grid, the limit, the price, whether it was stale.
    summary: Json<serde_json::Value>,
}

#[derive(SimpleObject)]
pub struct Decision {
    id: i64,
    at_ms: i64,
    site_id: String,
    kind: String,
    reason: String,
    /// What the change did (devices changed).
    detail: Json<serde_json::Value>,
}

#[derive(SimpleObject)]
pub struct Usage {
    seq: i64,
    id: String,
    tenant_id: String,
    key_id: String,
    /// tokens or gpu.
    kind: String,
    tier: i64,
    model: String,
    site_id: String,
    input_tokens: i64,
    output_tokens: i64,
    gpu_ms: i64,
    spot: bool,
    status: String,
    tag: Option<String>,
    at_ms: i64,
}

#[cfg(test)]
mod tests {
    /// `docs/schema.graphql` is the schema this build serves. After a change to the schema, run
    /// `HCP_WRITE_SCHEMA=1 cargo test -p hcp-server graphql` to rewrite it.
    #[test]
    fn the_exported_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/schema.graphql");
        let sdl = super::schema().sdl();
        if std::env::var_os("HCP_WRITE_SCHEMA").is_some() {
            std::fs::write(path, &sdl).unwrap();
        }
        let saved = std::fs::read_to_string(path).unwrap_or_default();
        assert!(saved == sdl, "docs/schema.graphql is stale: HCP_WRITE_SCHEMA=1 cargo test -p hcp-server graphql");
    }
}
