//! HTTP routes. Every `/api/v1` route needs a bearer token; reads need the viewer role, changes to
//! the fleet need operator, tenants and keys need admin (or the tenant itself for its own keys).
//! Every change writes an audit record (who, what, when, before and after). Lists are paged
//! (`after`, `limit` up to the store's maximum page).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::Stream;
use hcp_store::{ApiKeyRow, DeviceFilter, Page, TenantRow};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::App;
use crate::auth::{Principal, Role, TokenKind, hash_secret, parse_token, secret, short_id, valid_name};
use crate::error::{ApiError, ApiResult};
use crate::reads::Table;

/// Largest request body accepted.
pub const MAX_BODY: usize = 256 * 1024;

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/me", get(me))
        .route("/sites", get(sites))
        .route("/devices", get(devices))
        .route("/devices/{idx}", get(device))
        .route("/devices/{idx}/telemetry", get(device_telemetry))
        .route("/commands", get(commands))
        .route("/maintenance", post(maintenance))
        .route("/plans", get(plans))
        .route("/decisions", get(decisions))
        .route("/router", get(router_state))
        .route("/signals", get(signals))
        .route("/signals/manual", axum::routing::put(put_manual_signal))
        .route("/sites/{id}/power", get(site_power))
        .route("/policies", get(policies))
        .route("/policies/{name}", get(policy).put(put_policy))
        .route("/tenants", get(tenants).post(create_tenant))
        .route("/tenants/{id}", get(tenant))
        .route("/tenants/{id}/keys", get(keys).post(create_key))
        .route("/keys/{id}", delete(revoke_key))
        .route("/audit", get(audit))
        .route("/accounts", get(accounts).post(create_account))
        .route("/events", get(events))
        .merge(crate::billing::routes())
        .merge(crate::dashboard::routes());
    ops_router()
        .nest("/api/v1", api)
        .merge(crate::gateway::routes())
        .merge(crate::ui::routes())
        .merge(crate::graphql::routes())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(observe))
        .with_state(app)
}

/// Health, readiness and metrics only (every role serves these).
pub fn ops_router() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(crate::openapi::docs())
}

/// Request count and latency by route and status.
async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let openai = req.uri().path().starts_with("/v1/");
    let span = tracing::info_span!("http", method = %method, route = %route, status = tracing::field::Empty);
    let mut res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    // A body over the limit is refused by the extractor in plain text: answered in the error
    // shape of the API it was sent to.
    let json = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        let why = format!("the body is larger than {MAX_BODY} bytes");
        res = if openai {
            crate::openai::OaiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("too_large"), why)
                .into_response()
        } else {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", why).into_response()
        };
    }
    span.record("status", res.status().as_u16());
    let status = res.status().as_u16().to_string();
    metrics::histogram!("hcp_http_request_duration_seconds", "route" => route.clone(), "method" => method.clone(), "status" => status.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("hcp_http_requests_total", "route" => route, "method" => method, "status" => status).increment(1);
    res.headers_mut()
        .entry(axum::http::header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(axum::http::HeaderValue::from_static("nosniff"));
    res
}

/// The caller, authenticated and admitted by its rate limit.
pub struct Auth(pub Principal);

impl FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let peer = peer_of(app, parts);
        authenticate(app, &parts.headers, peer, parts.method.is_safe()).await.map(Auth)
    }
}

/// The session cookie the dashboard's login sets (HttpOnly, SameSite=Strict, Secure behind
/// TLS): it carries a random session secret (`hcps_...`) the server keeps (as a hash) until
/// logout or expiry, never the token the user logged in with.
pub const SESSION_COOKIE: &str = "hcp_session";
/// The header a change authenticated by the session cookie must carry: a page of another site
/// cannot set it (and SameSite=Strict keeps the cookie off its requests in the first place).
pub const CSRF_HEADER: &str = "x-hcp-csrf";

/// The caller's token: the `Authorization: Bearer` header's, else the session cookie's (true).
pub(crate) fn token_of(headers: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return v.to_str().ok()?.strip_prefix("Bearer ").map(|t| (t.trim(), false));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| (value, true))
}

/// The client's address: the TCP peer's, or where the platform runs behind a proxy it trusts
/// (`Config::trust_forwarded_for`), the last address of `X-Forwarded-For` (the one that proxy
/// saw). Failed tokens are counted per this address.
pub(crate) struct Peer(pub Option<std::net::IpAddr>);

impl FromRequestParts<Arc<App>> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        Ok(Peer(peer_of(app, parts)))
    }
}

pub(crate) fn peer_of(app: &App, parts: &Parts) -> Option<std::net::IpAddr> {
    if app.trust_forwarded_for {
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|a| a.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
}

/// The token's principal (verified, or remembered from a recent verification), admitted by its
/// rate limit. `safe`: the request changes nothing (GET, HEAD), so it needs no CSRF header when
/// the token came from the session cookie. `peer`: the client's address, which failures count
/// against.
pub(crate) async fn authenticate(
    app: &Arc<App>,
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    safe: bool,
) -> ApiResult<Principal> {
    let (token, cookie) = token_of(headers)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> (or a dashboard session)"))?;
    if cookie && !safe && !headers.contains_key(CSRF_HEADER) {
        return Err(ApiError::forbidden(format!(
            "{CSRF_HEADER}: a change authenticated by the session cookie must carry this header"
        )));
    }
    let p = if cookie { session_principal(app, token).await? } else { principal(app, token, peer).await? };
    app.gate.admit(&p)?;
    Ok(p)
}

/// A bearer token's principal, from the cache or verified. The verification runs as a task of
/// its own: a client that goes away mid-check (closes the connection, resets its HTTP/2 stream)
/// cancels nothing, so the check still holds its slot to the end and its failure is counted.
async fn principal(app: &Arc<App>, token: &str, peer: Option<std::net::IpAddr>) -> ApiResult<Principal> {
    // Only a token's shape is looked up: a session's cache key is not a bearer token.
    if parse_token(token).is_none() {
        return Err(ApiError::unauthorized("invalid token"));
    }
    if let Some(p) = app.gate.cached(token) {
        return Ok(p);
    }
    let (app, token) = (app.clone(), token.to_string());
    tokio::spawn(async move {
        // One verification per token at a time: a burst of requests with a token not yet
        // cached (a client opening 1,000 streams) waits for the first one's Argon2 check
        // instead of running 1,000 of them.
        let lock = app.gate.verifying(&token);
        let _held = lock.lock().await;
        if let Some(p) = app.gate.cached(&token) {
            return Ok(p);
        }
        let p = verify(&app, &token, peer).await;
        app.gate.verified(&token);
        let p = p?;
        app.gate.remember(&token, &p);
        Ok(p)
    })
    .await
    .map_err(ApiError::internal)?
}

async fn verify(app: &Arc<App>, token: &str, peer: Option<std::net::IpAddr>) -> ApiResult<Principal> {
    let bad = || ApiError::unauthorized("invalid token");
    let kind = parse_token(token).ok_or_else(bad)?;
    let (what, bare) = match &kind {
        TokenKind::Account { name, .. } => ("account", *name),
        TokenKind::Key { id, .. } => ("key", *id),
    };
    // A name no account or key can have is refused without a check (and without a place in the
    // failure counts, whose keys it would otherwise make as long as a header allows).
    if !valid_name(bare) {
        return Err(bad());
    }
    let name = format!("{what}:{bare}");
    let guard = &app.gate.guard;
    let _slot = match guard.admit(token, &name, peer).await {
        crate::auth::Admission::Check(slot) => slot,
        crate::auth::Admission::Refused(e) => return Err(e),
    };
    // Known or not, the name costs one check: an unknown one is checked against the dummy hash.
    let (secret, hash, found) = match kind {
        TokenKind::Account { name, secret } => {
            let a = app.store.accounts().await?.into_iter().find(|a| a.name == name);
            let hash = a.as_ref().map_or_else(|| crate::auth::dummy_hash().to_string(), |a| a.secret_hash.clone());
            (secret, hash, a.map(Found::Account))
        }
        TokenKind::Key { id, secret } => {
            let k = match app.store.key(id).await {
                Ok(k) => Some(k),
                Err(hcp_store::StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let hash = k.as_ref().map_or_else(|| crate::auth::dummy_hash().to_string(), |k| k.secret_hash.clone());
            (secret, hash, k.map(Found::Key))
        }
    };
    let ok = guard.check(secret.to_string(), hash).await?;
    let found = match found {
        Some(f) if ok => f,
        _ => {
            guard.failed(token, &name, peer);
            return Err(bad());
        }
    };
    match found {
        Found::Account(a) => account_principal(a),
        // Said only to the holder of the secret: the id alone does not tell a key was revoked.
        // Remembered as failed, so that a revoked key in use is not checked again and again.
        Found::Key(k) if k.revoked_ms.is_some() => {
            guard.failed(token, &name, peer);
            Err(ApiError::unauthorized("key revoked"))
        }
        Found::Key(k) => Ok(key_principal(k)),
    }
}

/// An operator account as the caller.
fn account_principal(a: hcp_store::AccountRow) -> ApiResult<Principal> {
    let role = Role::parse(&a.role).ok_or_else(|| ApiError::internal("stored role"))?;
    Ok(Principal::Account { name: a.name, role })
}

/// A tenant key as the caller.
fn key_principal(k: ApiKeyRow) -> Principal {
    Principal::Tenant { tenant: k.tenant_id, key: k.id, band: k.default_band, rate_per_s: k.rate_per_s }
}

/// The SHA-256 of a session cookie's value, as the store keeps it.
pub(crate) fn session_hash(cookie: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(cookie.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of a session (beside tokens in the same cache, so that revoking a key or
/// changing an account drops its sessions' entries too).
pub(crate) fn session_cache_key(hash: &str) -> String {
    format!("session:{hash}")
}

/// The principal of a dashboard session: the account or key it was opened with, read again on
/// every cache miss (a changed role or a revoked key applies to the session too).
async fn session_principal(app: &App, cookie: &str) -> ApiResult<Principal> {
    let ended = || ApiError::unauthorized("the dashboard session has ended or is unknown: log in again");
    let hash = session_hash(cookie);
    let key = session_cache_key(&hash);
    if let Some(p) = app.gate.cached(&key) {
        return Ok(p);
    }
    let row = app.store.session(&hash, crate::wall_ms()).await?.ok_or_else(ended)?;
    let p = match row.kind.as_str() {
        "account" => account_principal(
            app.store.accounts().await?.into_iter().find(|a| a.name == row.subject).ok_or_else(ended)?,
        )?,
        _ => match app.store.key(&row.subject).await {
            Ok(k) if k.revoked_ms.is_none() => key_principal(k),
            Ok(_) | Err(hcp_store::StoreError::NotFound(_)) => return Err(ended()),
            Err(e) => return Err(e.into()),
        },
    };
    app.gate.remember(&key, &p);
    Ok(p)
}

enum Found {
    Account(hcp_store::AccountRow),
    Key(ApiKeyRow),
}

/// Times from 1970 to 9999 in ms since the epoch: nothing outside can hold data, and the
/// arithmetic on them stays in range.
pub const MAX_MS: i64 = 253_402_300_800_000;

/// Each given time is within [0, `MAX_MS`], or the field is named.
pub(crate) fn check_times(times: &[(&'static str, Option<i64>)]) -> ApiResult<()> {
    for (field, v) in times {
        if let Some(v) = v
            && !(0..=MAX_MS).contains(v)
        {
            return Err(ApiError::invalid(*field, format!("must be between 0 and {MAX_MS} (ms since 1970)")));
        }
    }
    Ok(())
}

/// A JSON body parsed strictly: unknown fields, wrong types and missing fields are 422 naming the
/// field.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type: must be application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("body: {e} (limit {MAX_BODY} bytes)"))
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(Body).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner();
            // Broken JSON has no field to name (the path would read `?`): the body is at fault.
            if inner.is_syntax() || inner.is_eof() {
                return ApiError::invalid("body", format!("malformed JSON: {inner}"));
            }
            let field = if path == "." || path == "?" { "body".to_string() } else { path };
            ApiError::invalid(field, inner.to_string())
        })
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    pub after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

impl PageQuery {
    fn page(&self) -> Page {
        Page { after: self.after, limit: self.limit }
    }
}

/// A query string parsed strictly: unknown parameters and bad values are 422 naming the parameter.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state).await.map(|Query(x)| Params(x)).map_err(|e| {
            let text = e.body_text();
            let field = text.split('`').nth(1).unwrap_or("query").to_string();
            ApiError::invalid(field, text)
        })
    }
}

// ---- health, readiness, metrics ----------------------------------------------------------------

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "The process is up")))]
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when storage and the bus answer and, where this process runs the engine, it produced an
/// interval within the last 60 s (after a 60-s grace period from start).
#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "Storage and bus answer; signals are fresh"), (status = 503, description = "Not ready, with the problems")))]
pub(crate) async fn readyz(State(app): AppState) -> Response {
    let mut problems = vec![];
    if let Err(e) = app.store.ping().await {
        problems.push(format!("store: {e}"));
    }
    if let Err(e) = app.bus.ping().await {
        problems.push(format!("bus: {e}"));
    }
    let now = crate::wall_ms();
    if app.engine_expected {
        let last = app.engine_wall_ms.load(Ordering::Relaxed);
        let since = if last == 0 { now - app.started_wall_ms } else { now - last };
        if since > 60_000 {
            problems.push(format!("signals: no interval for {} s", since / 1_000));
        }
    }
    let body = serde_json::json!({
        "ready": problems.is_empty(),
        "problems": problems,
        "store": format!("{:?}", app.store.backend()).to_lowercase(),
        "bus": app.bus.kind(),
        "engine_at_ms": app.engine_at_ms.load(Ordering::Relaxed),
    });
    let status = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "ops", security(("bearer" = [])), responses((status = 200, description = "Prometheus text exposition (an operator account's token, any role; or without credentials on the metrics listener, --metrics-listen)", content_type = "text/plain"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "A tenant key", body = crate::openapi::ErrorBody), (status = 404, description = "Served on the metrics listener instead", body = crate::openapi::ErrorBody)))]
pub(crate) async fn metrics_text(State(app): AppState, Auth(p): Auth) -> ApiResult<Response> {
    if app.metrics_elsewhere {
        return Err(ApiError::not_found("/metrics is served on the metrics listener (--metrics-listen), not here"));
    }
    // What it shows (power per site, prices, device counts) is what tenants may not read.
    p.require(Role::Viewer)?;
    Ok(open_metrics(State(app)).await)
}

/// The exposition without credentials: served only on the metrics listener.
async fn open_metrics(State(app): AppState) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// The metrics listener's routes: `/metrics` without credentials (bind it to an address only
/// the scraper reaches) and `/healthz`.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(open_metrics))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn(observe))
        .with_state(app)
}

// ---- reads ------------------------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/me", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "The caller"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn me(Auth(p): Auth) -> impl IntoResponse {
    Json(crate::ui::who(&p))
}

#[utoipa::path(get, path = "/api/v1/sites", tag = "fleet", security(("bearer" = [])), responses((status = 200, body = crate::openapi::SitesPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn sites(State(app): AppState, Auth(p): Auth) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    Ok(Json(serde_json::json!({ "items": app.store.sites().await? })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceQuery {
    site: Option<String>,
    model: Option<String>,
    maintenance: Option<bool>,
    /// available, unknown or quarantined
    status: Option<String>,
    after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "fleet", security(("bearer" = [])), params(DeviceQuery), responses((status = 200, body = crate::openapi::DevicesPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn devices(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<DeviceQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let key = format!("{:?}", (&q.site, &q.model, q.maintenance, &q.status, q.after, q.limit));
    cached(&app, Table::Devices, key, async {
        let page = Page { after: q.after, limit: q.limit };
        let filter = DeviceFilter {
            site: q.site.as_deref(),
            model: q.model.as_deref(),
            maintenance: q.maintenance,
            status: q.status.as_deref(),
        };
        let items = app.store.devices(&filter, &page).await?;
        let next = (items.len() as u32 == page.limit.unwrap_or(100)).then(|| items.last().map(|d| d.idx)).flatten();
        Ok(serde_json::json!({ "items": items, "next_after": next }))
    })
    .await
}

/// A JSON page from the read cache, or computed (and kept) when its table changed since.
async fn cached(
    app: &App,
    table: Table,
    key: String,
    compute: impl std::future::Future<Output = ApiResult<serde_json::Value>>,
) -> ApiResult<Response> {
    let json = |b: Bytes| ([(header::CONTENT_TYPE, "application/json")], b).into_response();
    if let Some(b) = app.reads.get(table, &key) {
        return Ok(json(b));
    }
    let generation = app.reads.generation(table);
    let body = Bytes::from(serde_json::to_vec(&compute.await?).map_err(ApiError::internal)?);
    app.reads.put(table, key, generation, body.clone());
    Ok(json(body))
}

#[utoipa::path(get, path = "/api/v1/devices/{idx}", tag = "fleet", security(("bearer" = [])), params(("idx" = i64, Path, description = "Device index")), responses((status = 200, body = hcp_store::DeviceRow), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn device(
    State(app): AppState,
    Auth(p): Auth,
    Path(idx): Path<String>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let idx: i64 = idx.parse().map_err(|_| ApiError::invalid("idx", "must be an integer"))?;
    Ok(Json(app.store.device(idx).await?))
}

#[utoipa::path(get, path = "/api/v1/plans", tag = "plans", security(("bearer" = [])), params(PageQuery), responses((status = 200, description = "Plans, newest first"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn plans(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let page = q.page();
    let items: Vec<serde_json::Value> = app
        .store
        .plans(&page)
        .await?
        .into_iter()
        .map(|r| {
            serde_json::json!({ "id": r.id, "at_ms": r.at_ms, "plan": serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default() })
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecisionQuery {
    site: Option<String>,
    after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/decisions", tag = "plans", security(("bearer" = [])), params(DecisionQuery), responses((status = 200, body = crate::openapi::DecisionsPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn decisions(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<DecisionQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let key = format!("{:?}", (&q.site, q.after, q.limit));
    cached(&app, Table::Decisions, key, async {
        let page = Page { after: q.after, limit: q.limit };
        let items = app.store.decisions(q.site.as_deref(), &page).await?;
        let next = items.last().map(|d| d.id);
        Ok(serde_json::json!({ "items": items, "next_after": next }))
    })
    .await
}

/// The workload router: its capacity (replicas in service, sequences, GPUs; by site) as the plan
/// sets it, its queues and figures by band.
#[utoipa::path(get, path = "/api/v1/router", tag = "workloads", security(("bearer" = [])), responses((status = 200, description = "Capacity by site; queues, queue time, time to first token, preemptions and fairness by band"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn router_state(State(app): AppState, Auth(p): Auth) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let summary = app.router.lock().unwrap_or_else(|e| e.into_inner()).summary();
    Ok(Json(summary))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignalQuery {
    /// With `key`: the history of one signal (`rt_price`, `da_price`, `hashprice`, ...).
    /// Without both: every signal now, with the mode, sources, ages and feeds' health.
    kind: Option<String>,
    key: Option<String>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    from_ms: Option<i64>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    to_ms: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/signals", tag = "signals", security(("bearer" = [])), params(SignalQuery), responses((status = 200, description = "Without kind and key: the signals now (crate::live::SignalsNow: mode, market time, each signal's value, source and age, each feed's health). With both: that signal's history (items: SignalRow)."), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn signals(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<SignalQuery>,
) -> ApiResult<axum::response::Response> {
    p.require(Role::Viewer)?;
    check_times(&[("from_ms", q.from_ms), ("to_ms", q.to_ms)])?;
    // The page's bound, checked for the signals now as well (they take no page).
    Page { after: None, limit: q.limit }.limit()?;
    let (kind, key) = match (q.kind, q.key) {
        (None, None) => {
            let mode = app.engine_expected.then_some(app.mode);
            return Ok(Json(app.live.signals_now(mode)).into_response());
        }
        (Some(k), Some(v)) => (k, v),
        (None, Some(_)) => return Err(ApiError::invalid("kind", "required with key")),
        (Some(_), None) => return Err(ApiError::invalid("key", "required with kind")),
    };
    let items = app
        .store
        .signals(&kind, &key, q.from_ms.unwrap_or(0), q.to_ms.unwrap_or(MAX_MS), q.limit.unwrap_or(100))
        .await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[utoipa::path(put, path = "/api/v1/signals/manual", tag = "signals", security(("bearer" = [])), request_body = crate::events::ManualSignal, responses((status = 202, description = "Accepted: the engine takes it at its next step, with source manual"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn put_manual_signal(
    State(app): AppState,
    Auth(p): Auth,
    Body(m): Body<crate::events::ManualSignal>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Operator)?;
    validate_manual(&app, &m)?;
    let body = serde_json::to_string(&m).map_err(ApiError::internal)?;
    app.store.audit(crate::wall_ms(), &p.actor(), "signal.manual", &m.kind, None, Some(&body)).await?;
    app.bus.publish("hcp.signal.manual", body.as_bytes()).await.map_err(ApiError::internal)?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "accepted": m, "source": "manual" }))))
}

/// A manual value is checked here against the engine's own bounds, so that one it would refuse
/// is refused to the operator instead.
fn validate_manual(app: &App, m: &crate::events::ManualSignal) -> Result<(), ApiError> {
    let c = &app.engine_config;
    let points = || app.fleet.sites.iter().any(|s| s.settlement_point == m.key);
    let range = |lo: f64, hi: f64, unit: &str| {
        if m.value.is_finite() && (lo..=hi).contains(&m.value) {
            Ok(())
        } else {
            Err(ApiError::invalid("value", format!("must be {lo} to {hi} {unit}, not {}", m.value)))
        }
    };
    match m.kind.as_str() {
        "rt_price" | "da_price" | "temperature_c" if !points() => {
            return Err(ApiError::invalid("key", format!("{:?} is not a settlement point of the fleet", m.key)));
        }
        "rt_price" => range(c.price_min_usd_per_mwh, c.price_max_usd_per_mwh, "USD/MWh")?,
        "da_price" => {
            range(c.price_min_usd_per_mwh, c.price_max_usd_per_mwh, "USD/MWh")?;
            match m.at_ms {
                Some(t) if t.rem_euclid(3_600_000) == 0 => {}
                Some(_) => return Err(ApiError::invalid("at_ms", "must be the start of an hour")),
                None => return Err(ApiError::invalid("at_ms", "required for da_price (the hour's start)")),
            }
        }
        "temperature_c" => range(-60.0, 70.0, "C")?,
        "hashprice" => {
            if !(m.value.is_finite() && m.value > 0.0 && m.value <= c.hashprice_max_usd_per_ph_day) {
                return Err(ApiError::invalid(
                    "value",
                    format!("must be above 0 and at most {} USD/PH/day", c.hashprice_max_usd_per_ph_day),
                ));
            }
        }
        "gpu_price" => range(0.0, c.gpu_price_max_usd_per_gpu_hour, "USD/GPU-hour")?,
        other => {
            return Err(ApiError::invalid(
                "kind",
                format!("{other:?} is not rt_price, da_price, temperature_c, hashprice or gpu_price"),
            ));
        }
    }
    if m.at_ms.is_some() && m.kind != "da_price" {
        return Err(ApiError::invalid("at_ms", "only for da_price"));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RangeQuery {
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    from_ms: Option<i64>,
    #[param(minimum = 0, maximum = 253_402_300_800_000_i64)]
    to_ms: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/sites/{id}/power", tag = "signals", security(("bearer" = [])), params(("id" = String, Path, description = "Site id"), RangeQuery), responses((status = 200, body = crate::openapi::SitePowerPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn site_power(
    State(app): AppState,
    Auth(p): Auth,
    Path(id): Path<String>,
    Params(q): Params<RangeQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    if !app.fleet.sites.iter().any(|s| s.id == id) {
        return Err(ApiError::not_found(format!("site {id} not found")));
    }
    check_times(&[("from_ms", q.from_ms), ("to_ms", q.to_ms)])?;
    let items = app.store.site_seconds(&id, q.from_ms.unwrap_or(0), q.to_ms.unwrap_or(MAX_MS)).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(get, path = "/api/v1/devices/{idx}/telemetry", tag = "fleet", security(("bearer" = [])), params(("idx" = i64, Path, description = "Device index"), RangeQuery), responses((status = 200, description = "Per-minute rollups, oldest first (at most 1,000)", body = crate::openapi::DeviceMinutesPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn device_telemetry(
    State(app): AppState,
    Auth(p): Auth,
    Path(idx): Path<String>,
    Params(q): Params<RangeQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let i: i64 = idx.parse().map_err(|_| ApiError::invalid("idx", "a device index"))?;
    if i < 0 || i as usize >= app.fleet.devices.len() {
        return Err(ApiError::not_found(format!("device {i} not found")));
    }
    check_times(&[("from_ms", q.from_ms), ("to_ms", q.to_ms)])?;
    let items = app.store.device_minutes(i, q.from_ms.unwrap_or(0), q.to_ms.unwrap_or(MAX_MS)).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommandQuery {
    /// Only commands to this device.
    device: Option<i64>,
    after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/commands", tag = "fleet", security(("bearer" = [])), params(CommandQuery), responses((status = 200, description = "Commands sent to devices and their outcomes, newest first", body = crate::openapi::CommandsPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn commands(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<CommandQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let page = Page { after: q.after, limit: q.limit };
    let items = app.store.commands(q.device, &page).await?;
    let next = (items.len() as u32 == page.limit.unwrap_or(100)).then(|| items.last().map(|c| c.id)).flatten();
    Ok(Json(serde_json::json!({ "items": items, "next_after": next })))
}

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies", security(("bearer" = [])), responses((status = 200, description = "Every policy with its version"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn policies(State(app): AppState, Auth(p): Auth) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let items: Vec<serde_json::Value> = app.store.policies().await?.into_iter().map(policy_json).collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

fn policy_json(r: hcp_store::PolicyRow) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "version": r.version,
        "updated_ms": r.updated_ms,
        "body": serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default(),
    })
}

#[utoipa::path(get, path = "/api/v1/policies/{name}", tag = "policies", security(("bearer" = [])), params(("name" = String, Path)), responses((status = 200, description = "The policy"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn policy(
    State(app): AppState,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    Ok(Json(policy_json(app.store.policy(&name).await?)))
}

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants", security(("bearer" = [])), params(PageQuery), responses((status = 200, body = crate::openapi::TenantsPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn tenants(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Viewer)?;
    let page = q.page();
    let items = app.store.tenants(&page).await?;
    let next = items.last().map(|t| t.created_ms);
    Ok(Json(serde_json::json!({ "items": items, "next_after": next })))
}

#[utoipa::path(get, path = "/api/v1/tenants/{id}", tag = "tenants", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, body = hcp_store::TenantRow), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn tenant(
    State(app): AppState,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    p.require_tenant(&id).or_else(|_| p.require(Role::Viewer))?;
    Ok(Json(app.store.tenant(&id).await?))
}

fn key_json(k: &ApiKeyRow) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "tenant": k.tenant_id,
        "default_band": k.default_band,
        "rate_per_s": k.rate_per_s,
        "created_ms": k.created_ms,
        "revoked_ms": k.revoked_ms,
    })
}

#[utoipa::path(get, path = "/api/v1/tenants/{id}/keys", tag = "tenants", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "The tenant's keys (no secrets)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn keys(State(app): AppState, Auth(p): Auth, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    p.require_tenant(&id)?;
    let items: Vec<serde_json::Value> = app.store.keys_of(&id).await?.iter().map(key_json).collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", security(("bearer" = [])), params(PageQuery), responses((status = 200, body = crate::openapi::AuditPage), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn audit(
    State(app): AppState,
    Auth(p): Auth,
    Params(q): Params<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Admin)?;
    let page = q.page();
    let items = app.store.audits(&page).await?;
    let next = items.last().map(|a| a.id);
    Ok(Json(serde_json::json!({ "items": items, "next_after": next })))
}

// ---- changes ----------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MaintenanceBody {
    /// device, rack or site.
    #[schema(pattern = "^(device|rack|site)$")]
    scope: String,
    /// Device index, rack index or site id.
    id: String,
    on: bool,
}

#[utoipa::path(post, path = "/api/v1/maintenance", tag = "fleet", security(("bearer" = [])), request_body = MaintenanceBody, responses((status = 200, description = "Devices in scope and how many changed"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn maintenance(
    State(app): AppState,
    Auth(p): Auth,
    Body(b): Body<MaintenanceBody>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Operator)?;
    let f = &app.fleet;
    let idxs: Vec<i64> = match b.scope.as_str() {
        "device" => {
            let i: usize = b.id.parse().map_err(|_| ApiError::invalid("id", "a device index"))?;
            if i >= f.devices.len() {
                return Err(ApiError::invalid("id", format!("no device {i}; the fleet has {}", f.devices.len())));
            }
            vec![i as i64]
        }
        "rack" => {
            let r: u32 = b.id.parse().map_err(|_| ApiError::invalid("id", "a rack index"))?;
            let v: Vec<i64> =
                f.devices.iter().enumerate().filter(|(_, d)| d.rack.0 == r).map(|(i, _)| i as i64).collect();
            if v.is_empty() {
                return Err(ApiError::invalid("id", format!("no rack {r}")));
            }
            v
        }
        "site" => {
            let s = f.sites.iter().find(|s| s.id == b.id).ok_or_else(|| ApiError::invalid("id", "no such site"))?;
            f.devices.iter().enumerate().filter(|(_, d)| d.site == s.idx).map(|(i, _)| i as i64).collect()
        }
        _ => return Err(ApiError::invalid("scope", "must be device, rack or site")),
    };
    let changed = app.store.set_maintenance(&idxs, b.on).await?;
    app.reads.bump(Table::Devices);
    let after =
        crate::events::MaintenanceNotice { scope: b.scope.clone(), id: b.id.clone(), on: b.on, devices: idxs.len() };
    let after = serde_json::to_value(&after).map_err(ApiError::internal)?;
    app.store
        .audit(
            crate::wall_ms(),
            &p.actor(),
            "maintenance.set",
            &format!("{}:{}", b.scope, b.id),
            Some(&serde_json::json!({ "on": !b.on }).to_string()),
            Some(&after.to_string()),
        )
        .await?;
    let _ = app.bus.publish("hcp.maintenance", after.to_string().as_bytes()).await;
    Ok(Json(serde_json::json!({ "devices": idxs.len(), "changed": changed })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyBody {
    /// The version this change replaces (0 for a new policy).
    expected_version: i64,
    body: serde_json::Value,
}

/// Policies the platform knows, and their rules.
fn validate_policy(fleet: &hcp_model::fleet::Fleet, name: &str, body: &serde_json::Value) -> ApiResult<()> {
    let num = |field: &str, lo: f64, hi: f64| -> ApiResult<()> {
        let v = body
            .get(field)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ApiError::invalid(format!("body.{field}"), "a number is required"))?;
        if !(lo..=hi).contains(&v) {
            return Err(ApiError::invalid(format!("body.{field}"), format!("must be between {lo} and {hi}")));
        }
        Ok(())
    };
    let only = |allowed: &[&str]| -> ApiResult<()> {
        let obj = body.as_object().ok_or_else(|| ApiError::invalid("body", "must be an object"))?;
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::invalid(format!("body.{k}"), format!("unknown field; expected one of {allowed:?}")));
        }
        Ok(())
    };
    match name {
        "strike" => {
            only(&["strike_usd_per_mwh", "models", "curtail_after", "resume_after"])?;
            if body.get("strike_usd_per_mwh").is_some() || body.get("models").is_none() {
                num("strike_usd_per_mwh", -1_000.0, 10_000.0)?;
            }
            if let Some(m) = body.get("models") {
                let m = m
                    .as_object()
                    .ok_or_else(|| ApiError::invalid("body.models", "must be an object of model id to strike"))?;
                for (id, v) in m {
                    let field = format!("body.models.{id}");
                    let v = v.as_f64().ok_or_else(|| ApiError::invalid(field.clone(), "a number is required"))?;
                    if !(-1_000.0..=10_000.0).contains(&v) {
                        return Err(ApiError::invalid(field, "must be between -1000 and 10000"));
                    }
                    if !fleet.catalogue.asics.iter().any(|a| &a.id == id) {
                        return Err(ApiError::invalid(field, "not an ASIC model of the catalogue"));
                    }
                }
            }
            num("curtail_after", 1.0, 96.0)?;
            num("resume_after", 1.0, 96.0)
        }
        "grid-commitment" => {
            only(&["site", "program", "mw"])?;
            body.get("site")
                .and_then(|v| v.as_str())
                .ok_or_else(|| ApiError::invalid("body.site", "a site id is required"))?;
            let program = body.get("program").and_then(|v| v.as_str()).unwrap_or("");
            if !hcp_model::signals::GridProgram::ALL.iter().any(|p| p.name() == program) {
                return Err(ApiError::invalid("body.program", "must be ERS-10, ERS-30, RRS, CLR, ECRS or Non-Spin"));
            }
            num("mw", 0.0, 10_000.0)
        }
        "reserved-capacity" => {
            only(&["tenant", "gpus"])?;
            body.get("tenant")
                .and_then(|v| v.as_str())
                .ok_or_else(|| ApiError::invalid("body.tenant", "a tenant id is required"))?;
            num("gpus", 0.0, 1e6)
        }
        _ => Err(ApiError::invalid("name", "must be strike, grid-commitment or reserved-capacity")),
    }
}

#[utoipa::path(put, path = "/api/v1/policies/{name}", tag = "policies", security(("bearer" = [])), params(("name" = String, Path, pattern = "^(strike|grid-commitment|reserved-capacity)$", description = "strike, grid-commitment or reserved-capacity")), request_body = PolicyBody, responses((status = 200, description = "The new version"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody), (status = 409, description = "Another version is current", body = crate::openapi::ErrorBody)))]
pub(crate) async fn put_policy(
    State(app): AppState,
    Auth(p): Auth,
    Path(name): Path<String>,
    Body(b): Body<PolicyBody>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Operator)?;
    validate_policy(&app.fleet, &name, &b.body)?;
    if name == "grid-commitment" {
        let site = b.body["site"].as_str().unwrap_or_default();
        if !app.fleet.sites.iter().any(|s| s.id == site) {
            return Err(ApiError::invalid("body.site", format!("no site {site}")));
        }
    }
    if name == "reserved-capacity" {
        let t = b.body["tenant"].as_str().unwrap_or_default();
        if app.store.tenant(t).await.is_err() {
            return Err(ApiError::invalid("body.tenant", format!("no tenant {t}")));
        }
    }
    let before = app.store.policy(&name).await.ok();
    let version = app.store.put_policy(&name, &b.body.to_string(), b.expected_version, crate::wall_ms()).await?;
    app.store
        .audit(
            crate::wall_ms(),
            &p.actor(),
            "policy.put",
            &name,
            before.as_ref().map(|r| r.body.as_str()),
            Some(&b.body.to_string()),
        )
        .await?;
    // The engine (in this process or another) applies it to its next plan.
    let notice = crate::events::PolicyNotice { name: name.clone(), version, body: b.body.to_string() };
    let payload = serde_json::to_vec(&notice).map_err(ApiError::internal)?;
    app.bus.publish("hcp.policy", &payload).await.map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({ "name": name, "version": version })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantBody {
    /// 1 to 64 lowercase letters, digits or `-`.
    #[schema(pattern = "^[a-z0-9-]{1,64}$")]
    id: String,
    /// 1 to 200 characters, not all blank.
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    name: String,
    /// Its share of the capacity no guarantee holds, against the other tenants' weights: above 0,
    /// at most 1000.
    #[schema(exclusive_minimum = 0.0, maximum = 1000.0)]
    weight: f64,
    /// GPUs the router keeps for it (others' work is preempted to give them): 0 to the fleet's GPUs.
    #[serde(default)]
    #[schema(minimum = 0.0)]
    guaranteed_gpus: f64,
    /// GPUs it may use above its guarantee while others leave them idle: 0 to 1,000,000. With no
    /// guarantee and no borrowing a tenant can use nothing.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1_000_000.0)]
    borrow_limit_gpus: f64,
    /// Requests a minute over all its keys and every API process together: 1 to 100,000,000
    /// (default 60,000). Each key's own rate applies as well.
    #[serde(default = "default_rpm")]
    #[schema(minimum = 1, maximum = 100_000_000, default = 60_000)]
    requests_per_min: i64,
    /// Tokens (prompt and output) a minute over all its keys and every API process together: 1 to
    /// 100,000,000,000 (default 20,000,000).
    #[serde(default = "default_tpm")]
    #[schema(minimum = 1, maximum = 100_000_000_000_i64, default = 20_000_000)]
    tokens_per_min: i64,
}

fn default_rpm() -> i64 {
    hcp_store::DEFAULT_REQUESTS_PER_MIN
}

fn default_tpm() -> i64 {
    hcp_store::DEFAULT_TOKENS_PER_MIN
}

#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", security(("bearer" = [])), request_body = TenantBody, responses((status = 201, body = hcp_store::TenantRow), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody), (status = 409, description = "The id exists", body = crate::openapi::ErrorBody)))]
pub(crate) async fn create_tenant(
    State(app): AppState,
    Auth(p): Auth,
    Body(b): Body<TenantBody>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Admin)?;
    if !valid_name(&b.id) {
        return Err(ApiError::invalid("id", "1 to 64 lowercase letters, digits or -"));
    }
    if b.name.trim().is_empty() || b.name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "1 to 200 characters"));
    }
    if !(b.weight.is_finite() && b.weight > 0.0 && b.weight <= 1_000.0) {
        return Err(ApiError::invalid("weight", "must be a number above 0 and at most 1000"));
    }
    // A guarantee is capacity the router must be able to give: at most the fleet's GPUs.
    let gpus = app.fleet.devices.iter().filter(|d| matches!(d.model, hcp_model::ModelRef::Gpu(_))).count() as f64;
    if !(b.guaranteed_gpus.is_finite() && (0.0..=gpus).contains(&b.guaranteed_gpus)) {
        return Err(ApiError::invalid("guaranteed_gpus", format!("must be between 0 and the fleet's {gpus} GPUs")));
    }
    if !(b.borrow_limit_gpus.is_finite() && (0.0..=1_000_000.0).contains(&b.borrow_limit_gpus)) {
        return Err(ApiError::invalid("borrow_limit_gpus", "must be between 0 and 1000000"));
    }
    if !(1..=100_000_000).contains(&b.requests_per_min) {
        return Err(ApiError::invalid("requests_per_min", "must be between 1 and 100000000"));
    }
    if !(1..=100_000_000_000).contains(&b.tokens_per_min) {
        return Err(ApiError::invalid("tokens_per_min", "must be between 1 and 100000000000"));
    }
    let t = TenantRow {
        id: b.id,
        name: b.name,
        weight: b.weight,
        guaranteed_gpus: b.guaranteed_gpus,
        borrow_limit_gpus: b.borrow_limit_gpus,
        created_ms: crate::wall_ms(),
        requests_per_min: b.requests_per_min,
        tokens_per_min: b.tokens_per_min,
    };
    app.store.create_tenant(&t).await?;
    let after = serde_json::to_string(&t).map_err(ApiError::internal)?;
    app.store.audit(crate::wall_ms(), &p.actor(), "tenant.create", &t.id, None, Some(&after)).await?;
    // The router knows the tenant before the answer (other API processes hear the notice).
    app.router
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add_tenant(&t)
        .map_err(|e| ApiError::invalid(e.field, e.rule))?;
    let _ = app.bus.publish("hcp.tenants", after.as_bytes()).await;
    Ok((StatusCode::CREATED, Json(t)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyBody {
    /// The tier its requests get by default: 0 (critical), 1 (standard) or 2 (batch).
    #[serde(default = "default_band")]
    #[schema(minimum = 0, maximum = 2, default = 1)]
    default_band: i64,
    /// Requests a second this key may make: above 0, at most 100,000 (a tenant key minting
    /// another: at most its own).
    #[serde(default = "default_rate")]
    #[schema(exclusive_minimum = 0.0, maximum = 100_000.0, default = 100.0)]
    rate_per_s: f64,
}

fn default_band() -> i64 {
    1
}

fn default_rate() -> f64 {
    100.0
}

#[utoipa::path(post, path = "/api/v1/tenants/{id}/keys", tag = "tenants", security(("bearer" = [])), params(("id" = String, Path)), request_body = KeyBody, responses((status = 201, description = "The key; its secret is shown once"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn create_key(
    State(app): AppState,
    Auth(p): Auth,
    Path(tenant): Path<String>,
    Body(b): Body<KeyBody>,
) -> ApiResult<impl IntoResponse> {
    p.require_tenant(&tenant)?;
    if !(0..=2).contains(&b.default_band) {
        return Err(ApiError::invalid("default_band", "must be 0 (critical), 1 (standard) or 2 (batch)"));
    }
    if !(b.rate_per_s.is_finite() && b.rate_per_s > 0.0 && b.rate_per_s <= 100_000.0) {
        return Err(ApiError::invalid("rate_per_s", "must be > 0 and <= 100000"));
    }
    // A tenant minting its own keys cannot raise its rate or its priority.
    if let Principal::Tenant { band, rate_per_s, .. } = &p {
        if b.rate_per_s > *rate_per_s {
            return Err(ApiError::invalid("rate_per_s", format!("at most this key's own rate, {rate_per_s}")));
        }
        if b.default_band < *band {
            return Err(ApiError::invalid("default_band", format!("at least this key's own band, {band}")));
        }
    }
    let (id, sec) = (short_id(), secret());
    let hash = tokio::task::spawn_blocking({
        let s = sec.clone();
        move || hash_secret(&s)
    })
    .await
    .map_err(ApiError::internal)?;
    let k = ApiKeyRow {
        id: id.clone(),
        tenant_id: tenant.clone(),
        secret_hash: hash,
        default_band: b.default_band,
        rate_per_s: b.rate_per_s,
        created_ms: crate::wall_ms(),
        revoked_ms: None,
    };
    app.store.create_key(&k).await?;
    app.store.audit(crate::wall_ms(), &p.actor(), "key.create", &id, None, Some(&key_json(&k).to_string())).await?;
    let mut body = key_json(&k);
    body["key"] = serde_json::Value::String(format!("hcpk_{id}_{sec}"));
    Ok((StatusCode::CREATED, Json(body)))
}

#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "tenants", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "Revoked (idempotent)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 404, description = "Not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn revoke_key(
    State(app): AppState,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    // Another tenant's key is as unknown to a tenant as a key that does not exist: the answer
    // never names its owner.
    let unknown = || ApiError::not_found(format!("key {id} not found"));
    let k = match app.store.key(&id).await {
        Ok(k) => k,
        Err(hcp_store::StoreError::NotFound(_)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    if let Principal::Tenant { tenant, .. } = &p
        && *tenant != k.tenant_id
    {
        return Err(unknown());
    }
    p.require_tenant(&k.tenant_id)?;
    let was_active = app.store.revoke_key(&id, crate::wall_ms()).await?;
    app.gate.forget_key(&id);
    if was_active {
        app.store
            .audit(
                crate::wall_ms(),
                &p.actor(),
                "key.revoke",
                &id,
                Some(&key_json(&k).to_string()),
                Some(&key_json(&app.store.key(&id).await?).to_string()),
            )
            .await?;
    }
    Ok(Json(serde_json::json!({ "id": id, "revoked": true, "was_active": was_active })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountBody {
    /// 1 to 64 lowercase letters, digits or `-`.
    #[schema(pattern = "^[a-z0-9-]{1,64}$")]
    name: String,
    /// admin, operator or viewer.
    #[schema(pattern = "^(admin|operator|viewer)$")]
    role: String,
}

#[utoipa::path(get, path = "/api/v1/accounts", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "Operator accounts (no secrets)"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody)))]
pub(crate) async fn accounts(State(app): AppState, Auth(p): Auth) -> ApiResult<impl IntoResponse> {
    p.require(Role::Admin)?;
    let items: Vec<serde_json::Value> = app
        .store
        .accounts()
        .await?
        .into_iter()
        .map(|a| serde_json::json!({ "name": a.name, "role": a.role, "created_ms": a.created_ms }))
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

/// Creates an operator account (or replaces its secret and role); the token is shown once.
#[utoipa::path(post, path = "/api/v1/accounts", tag = "auth", security(("bearer" = [])), request_body = AccountBody, responses((status = 201, description = "The account; its token is shown once"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody)))]
pub(crate) async fn create_account(
    State(app): AppState,
    Auth(p): Auth,
    Body(b): Body<AccountBody>,
) -> ApiResult<impl IntoResponse> {
    p.require(Role::Admin)?;
    if !valid_name(&b.name) {
        return Err(ApiError::invalid("name", "1 to 64 lowercase letters, digits or -"));
    }
    let role = Role::parse(&b.role).ok_or_else(|| ApiError::invalid("role", "must be admin, operator or viewer"))?;
    let sec = secret();
    let hash = tokio::task::spawn_blocking({
        let s = sec.clone();
        move || hash_secret(&s)
    })
    .await
    .map_err(ApiError::internal)?;
    let before = app.store.accounts().await?.into_iter().find(|a| a.name == b.name);
    app.store
        .put_account(&hcp_store::AccountRow {
            name: b.name.clone(),
            role: role.as_str().into(),
            secret_hash: hash,
            created_ms: crate::wall_ms(),
        })
        .await?;
    let after = serde_json::json!({ "name": b.name, "role": role.as_str() }).to_string();
    let before = before.map(|a| serde_json::json!({ "name": a.name, "role": a.role }).to_string());
    app.store.audit(crate::wall_ms(), &p.actor(), "account.put", &b.name, before.as_deref(), Some(&after)).await?;
    // A new secret ends the account's dashboard sessions (opened with the old one).
    app.store.end_sessions_of("account", &b.name).await?;
    app.gate.forget_account(&b.name);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "name": b.name, "role": role.as_str(), "token": format!("hcpa_{}_{sec}", b.name) })),
    ))
}

// ---- live events -------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventQuery {
    /// Subjects under hcp. (default: everything): dot-separated tokens, `*` for one token, a
    /// final `>` for the rest.
    #[param(pattern = r"^(([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?|>)$")]
    topic: Option<String>,
}

/// Server-Sent Events from the bus; `Last-Event-ID` resumes after that sequence.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", security(("bearer" = [])), params(EventQuery, ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "Resume after this sequence")), responses((status = 200, description = "Server-Sent Events: id = bus sequence, event = subject", content_type = "text/event-stream"), (status = 401, description = "Missing or wrong credentials", body = crate::openapi::ErrorBody), (status = 403, description = "Role or tenant not allowed", body = crate::openapi::ErrorBody), (status = 422, description = "Invalid input, the field named", body = crate::openapi::ErrorBody), (status = 410, description = "History asked for is gone", body = crate::openapi::ErrorBody)))]
pub(crate) async fn events(
    State(app): AppState,
    Auth(p): Auth,
    headers: HeaderMap,
    Params(q): Params<EventQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    p.require(Role::Viewer)?;
    let filter = match &q.topic {
        Some(t) => format!("hcp.{t}"),
        None => "hcp.>".into(),
    };
    let from = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => {
            // A sequence as the document types it (int64, at least 0).
            let n: i64 = v.parse().map_err(|_| ApiError::invalid("Last-Event-ID", "must be a sequence number"))?;
            if n < 0 {
                return Err(ApiError::invalid("Last-Event-ID", "must be a sequence number (>= 0)"));
            }
            let next = n as u64 + 1;
            hcp_bus::From::Seq(next)
        }
        None => hcp_bus::From::New,
    };
    let sub = app.bus.subscribe(&filter, from).await.map_err(|e| match e {
        hcp_bus::BusError::Subject(_) => ApiError::invalid("topic", "dot-separated tokens, * and a final >"),
        hcp_bus::BusError::Gap { .. } => ApiError::new(StatusCode::GONE, "gone", e.to_string()),
        e => ApiError::internal(e),
    })?;
    let stream = futures::stream::unfold((sub, app), |(mut sub, app)| async move {
        match sub.next().await {
            Ok(m) => {
                // A client that fetches on this event must see the change.
                app.reads.note(&m.subject);
                let ev = Event::default()
                    .id(m.seq.to_string())
                    .event(m.subject.trim_start_matches("hcp."))
                    .data(String::from_utf8_lossy(&m.payload));
                Some((Ok(ev), (sub, app)))
            }
            Err(_) => None,
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
