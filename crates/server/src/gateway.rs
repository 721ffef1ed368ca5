//! The OpenAI-compatible inference gateway: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models` on the platform's port.
//!
//! A request is authenticated by its tenant key (`Authorization: Bearer hcpk_...`) and rate
//! limit, validated (errors in OpenAI's shape, naming the field), given a priority tier (the
//! key's default, or `X-HCP-Priority` no higher than it), and handed to the router, which
//! admits, queues or rejects it and places it on a replica. The gateway then calls the replica's
//! OpenAI API (the simulated backend or a configured vLLM/SGLang/TGI/llama.cpp server) and relays
//! the answer: whole, or as the backend's SSE chunks, ending `data: [DONE]`, with the usage chunk
//! only when the client asked (`stream_options.include_usage`; the gateway always asks the
//! backend, because usage is what it bills).
//!
//! Failures: a backend that fails before its first byte (connection refused, 5xx, a stream that
//! ends empty) takes no new work until its health check passes (the streams it is serving go on;
//! a failed health check takes it out of service) and the request goes back to the router for
//! another replica (at most [`MAX_ATTEMPTS`]). After the first byte a failure ends
//! the stream with an error event. Work preempted by a capacity change before its first byte is
//! placed again; after it, the stream ends with a `preempted` error. A client that goes away drops
//! the relay, which drops the upstream request (the backend stops generating).
//!
//! Metering: every request that reached a backend has exactly one usage record (id: the request
//! id, or the tenant's `Idempotency-Key`). A stream's is written before its `[DONE]` is sent; a
//! non-streamed answer's once its body has been handed to the connection; a request cut short
//! (client gone, backend failed, preempted, the process stopped) is recorded with what was
//! delivered (a non-streamed answer not handed over: its prompt only).
//!
//! Idempotency keys: the answer of a request with a key is kept with its usage (for
//! [`KEEP_ANSWERS_MS`], up to `MAX_OUTCOME_BYTES`) before it is sent. A retry with the key gets
//! that answer again (`Idempotent-Replayed: true`; a stream as its whole event text) and is
//! billed once, even when the process that answered stopped before its last byte left (or before
//! its usage reached storage: the replay writes it). A retry while the first is in flight on the
//! same process is 409 with `Retry-After`; a key whose request failed or was cut short (no answer
//! to give) is 409 and a new key is needed.

use hcp_model::{UsageKind, UsageStatus};
use std::borrow::Cow;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use hcp_sched::{RejectReason, ReplicaId, ReqId, Work};
use hcp_store::UsageRow;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::openai::{DEFAULT_MAX_TOKENS, Endpoint, OaiError, estimate_bytes, parse};
use crate::routes::Peer;
use crate::routing::Placement;
use crate::{App, wall_ms};
use std::net::IpAddr;

/// Tries of one request on different replicas when backends fail before their first byte.
pub const MAX_ATTEMPTS: usize = 3;
/// Replica ids of configured backends start here (fleet replicas are GPU indexes).
pub const BACKEND_ID_BASE: u32 = 1 << 30;

/// A real OpenAI-compatible server serving one replica.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    /// Base URL of its OpenAI API, e.g. `http://10.0.0.5:8000/v1`.
    pub url: String,
    pub model: String,
    /// Sequences it serves at once, its KV-cache tokens, its GPUs and site.
    pub slots: u32,
    pub kv_tokens: u64,
    pub gpus: u32,
    pub site: String,
    /// The server speaks HTTP/2 without TLS (h2c, prior knowledge): every stream to it shares
    /// one connection.
    pub http2: bool,
}

impl BackendConfig {
    /// `url=http://host:8000/v1,model=NAME[,slots=N][,kv_tokens=N][,gpus=N][,site=ID][,http2=true]`.
    pub fn parse(s: &str) -> Result<BackendConfig, String> {
        let mut b = BackendConfig {
            url: String::new(),
            model: String::new(),
            slots: 64,
            kv_tokens: 400_000,
            gpus: 1,
            site: "external".into(),
            http2: false,
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("backend: {part:?} must be key=value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|_| format!("backend.{k}: must be a whole number"));
            match k {
                "url" => b.url = v.trim_end_matches('/').to_string(),
                "model" => b.model = v.to_string(),
                "slots" => b.slots = u32::try_from(num(v)?).map_err(|_| "backend.slots: too large".to_string())?,
                "kv_tokens" => b.kv_tokens = num(v)?,
                "gpus" => b.gpus = u32::try_from(num(v)?).map_err(|_| "backend.gpus: too large".to_string())?,
                "site" => b.site = v.to_string(),
                "http2" => {
                    b.http2 = v.parse().map_err(|_| "backend.http2: must be true or false".to_string())?;
                }
                _ => return Err(format!("backend.{k}: unknown (url, model, slots, kv_tokens, gpus, site, http2)")),
            }
        }
        if !(b.url.starts_with("http://") || b.url.starts_with("https://")) {
            return Err("backend.url: must start with http:// or https://".into());
        }
        if b.http2 && !b.url.starts_with("http://") {
            return Err("backend.http2: is for http:// servers (HTTP/2 without TLS)".into());
        }
        if b.model.is_empty() {
            return Err("backend.model: is required".into());
        }
        if b.slots == 0 || b.gpus == 0 || b.kv_tokens == 0 {
            return Err("backend.slots, gpus, kv_tokens: must be >= 1".into());
        }
        Ok(b)
    }
}

/// The gateway's own state in the API process.
pub struct Gateway {
    /// HTTP/1.1: backends without `http2`, and health checks.
    client: reqwest::Client,
    /// HTTP/2 without TLS (h2c, prior knowledge): the simulated backend (unless told otherwise)
    /// and backends with `http2`. One connection per server carries every stream to it, so one
    /// write and one read move the tokens of many streams instead of one each.
    h2c: reqwest::Client,
    /// The simulated backend is called over HTTP/2.
    sim_http2: bool,
    /// Base URL of the simulated backend (`http://addr`), once it listens.
    pub sim_base: Mutex<Option<String>>,
    pub backends: Vec<BackendConfig>,
    /// Idempotency keys of requests in flight.
    idem: Mutex<HashSet<String>>,
    /// Batch jobs in flight here: their switches, and what those waiting for the planner need.
    pub jobs: Mutex<std::collections::HashMap<String, crate::billing::JobHandle>>,
}

impl Gateway {
    pub fn new(backends: Vec<BackendConfig>, sim_http2: bool) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(4_096)
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client with default TLS-less settings");
        let h2c = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_prior_knowledge()
            .build()
            .expect("an HTTP/2 client with default TLS-less settings");
        Gateway {
            client,
            h2c,
            sim_http2,
            sim_base: Mutex::new(None),
            backends,
            idem: Mutex::default(),
            jobs: Mutex::default(),
        }
    }

    /// The server of a replica: a configured backend (None: an id past the last one), or the
    /// simulated backend (fleet replicas).
    fn server(&self, id: i64) -> Option<Option<&BackendConfig>> {
        match u32::try_from(id) {
            Ok(i) if i >= BACKEND_ID_BASE => Some(self.backends.get((i - BACKEND_ID_BASE) as usize)),
            _ => None,
        }
    }

    /// The simulated backend's base URL, once it listens.
    fn sim(&self) -> Option<String> {
        self.sim_base.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The client that calls a replica's server.
    fn client(&self, id: i64) -> &reqwest::Client {
        let http2 = match self.server(id) {
            Some(b) => b.is_some_and(|b| b.http2),
            None => self.sim_http2,
        };
        if http2 { &self.h2c } else { &self.client }
    }

    /// The base URL of a replica's OpenAI API.
    fn base(&self, r: ReplicaId) -> Option<String> {
        match self.server(i64::from(r.0)) {
            Some(b) => b.map(|b| b.url.clone()),
            None => self.sim().map(|s| format!("{s}/r/{}/v1", r.0)),
        }
    }

    /// The URL a replica's health is checked at (one for all replicas of the simulated backend).
    fn health_url(&self, id: i64) -> Option<String> {
        match self.server(id) {
            Some(b) => b.map(|b| format!("{}/models", b.url)),
            None => self.sim().map(|s| format!("{s}/healthz")),
        }
    }
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// Every few seconds: replicas held out of service are checked again and returned when their
/// server answers; configured backends are checked and held out when they do not.
pub async fn health_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let mut ids: Vec<i64> = app.router.lock().unwrap_or_else(|e| e.into_inner()).down();
        ids.extend((0..app.gateway.backends.len()).map(|i| i64::from(BACKEND_ID_BASE) + i as i64));
        ids.sort_unstable();
        ids.dedup();
        let mut by_url: std::collections::HashMap<String, Vec<i64>> = Default::default();
        for id in ids {
            if let Some(u) = app.gateway.health_url(id) {
                by_url.entry(u).or_default().push(id);
            }
        }
        for (url, ids) in by_url {
            let ok = matches!(
                app.gateway.client(ids[0]).get(&url).timeout(Duration::from_secs(2)).send().await,
                Ok(r) if r.status().is_success()
            );
            metrics::gauge!("hcp_backend_up", "url" => url.clone()).set(if ok { 1.0 } else { 0.0 });
            let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
            // Answering: back in service. Not answering: out of service, and what runs there goes
            // back to the queue (its streams are cut anyway).
            r.set_down(&ids, !ok, wall_ms());
            if ok {
                r.set_cordoned(&ids, false, wall_ms());
            }
        }
    }
}

/// A notice this process announces when it changes, and every 30 s (so an engine that started
/// since hears it).
struct Announced<T> {
    subject: &'static str,
    last: Option<(T, i64)>,
}

impl<T: serde::Serialize + PartialEq> Announced<T> {
    /// Publishes `notice` when it is due; the first one only when `first` says so.
    async fn offer(&mut self, app: &App, notice: T, now: i64, first: bool) {
        let due = match &self.last {
            Some((n, at)) => *n != notice || now - at >= 30_000,
            None => first,
        };
        if !due {
            return;
        }
        match serde_json::to_vec(&notice) {
            Ok(body) => {
                if let Err(e) = app.bus.publish(self.subject, &body).await {
                    tracing::warn!(error = %e, subject = self.subject, "not announced; tried again next tick");
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, subject = self.subject, "not announced"),
        }
        self.last = Some((notice, now));
    }
}

/// Expires queued work past its time-to-live, four times a second, and announces the router's
/// demand (`hcp.demand`) and the batch jobs waiting here for the planner (`hcp.jobs.waiting`).
pub async fn tick_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut instance = [0u8; 8];
    getrandom::fill(&mut instance).map_err(|e| anyhow::anyhow!("random instance id: {e}"))?;
    let instance: String = instance.iter().map(|b| format!("{b:02x}")).collect();
    let mut demand = Announced { subject: "hcp.demand", last: None };
    let mut waiting = Announced { subject: "hcp.jobs.waiting", last: None };
    loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let now = wall_ms();
        let (queued, running) = {
            let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
            r.tick(now);
            r.demand()
        };
        let notice = crate::events::DemandNotice { instance: instance.clone(), queued, running };
        demand.offer(&app, notice, now, true).await;
        let jobs = crate::billing::waiting_jobs(&app);
        let first = !jobs.is_empty();
        waiting.offer(&app, crate::events::WaitingNotice { instance: instance.clone(), jobs }, now, first).await;
    }
}

/// Why a tenant's work can never be placed, and what changes that.
pub fn no_capacity(tenant: &str) -> String {
    format!(
        "tenant {tenant} has no GPUs it may use: guaranteed_gpus and borrow_limit_gpus are both 0 (the defaults of \
         POST /api/v1/tenants); a tenant created with either above 0, or a reserved-capacity policy for it, can be served"
    )
}

async fn tenant_of(
    app: &Arc<App>,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<(String, String, i64), OaiError> {
    match crate::routes::authenticate(app, headers, peer, false).await.map_err(OaiError::from)? {
        Principal::Tenant { tenant, key, band, .. } => Ok((tenant, key, band)),
        Principal::Account { .. } => Err(OaiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            None,
            "inference needs a tenant API key (hcpk_...), not an operator account",
        )),
    }
}

async fn models(State(app): State<Arc<App>>, Peer(peer): Peer, headers: HeaderMap) -> Response {
    if let Err(e) = tenant_of(&app, &headers, peer).await {
        return e.into_response();
    }
    let models = app.router.lock().unwrap_or_else(|e| e.into_inner()).models();
    axum::Json(serde_json::json!({
        "object": "list",
        "data": models.iter().map(|(id, up)| serde_json::json!({
            "id": id, "object": "model", "created": 0, "owned_by": "hcp", "replicas_in_service": up,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn chat(State(app): State<Arc<App>>, Peer(peer): Peer, headers: HeaderMap, body: Bytes) -> Response {
    serve(app, Endpoint::Chat, headers, peer, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, Peer(peer): Peer, headers: HeaderMap, body: Bytes) -> Response {
    serve(app, Endpoint::Completions, headers, peer, body).await.unwrap_or_else(IntoResponse::into_response)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, OaiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| OaiError::invalid(name, "must be printable ASCII")),
    }
}

/// The tier asked for in `X-HCP-Priority` (0-2 or interactive/standard/batch), no higher than the
/// key allows; else the key's default.
fn tier(h: &HeaderMap, key_band: i64) -> Result<u8, OaiError> {
    let default = u8::try_from(key_band.clamp(0, 2)).unwrap_or(1);
    let Some(v) = header_str(h, "x-hcp-priority")? else { return Ok(default) };
    let t = match v.trim() {
        "0" | "interactive" => 0,
        "1" | "standard" => 1,
        "2" | "batch" => 2,
        _ => return Err(OaiError::invalid("x-hcp-priority", "must be 0-2, interactive, standard or batch")),
    };
    if t < default {
        return Err(OaiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            None,
            format!("x-hcp-priority: this key may use tier {default} or lower priority (a higher number)"),
        ));
    }
    Ok(t)
}

fn reject_error(r: &RejectReason) -> OaiError {
    let mut e = match r {
        RejectReason::QueueFull { .. } | RejectReason::Displaced => OaiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("engine_overloaded"),
            "the model's queue is full; retry later",
        ),
        RejectReason::Expired => OaiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("queue_timeout"),
            "waited past the tier's queue time-to-live without capacity; retry later",
        ),
        RejectReason::NeverFits => OaiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("no_capacity"),
            "no GPU capacity serves this model now (the power plan may have curtailed it); retry later",
        ),
        RejectReason::UnknownTenant => OaiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            None,
            "this key's tenant is not known to the router yet; retry shortly",
        ),
        RejectReason::Invalid(why) => {
            OaiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, why.clone())
        }
    };
    if e.status != StatusCode::BAD_REQUEST && e.status != StatusCode::FORBIDDEN {
        e.retry_after_s = Some(1);
    }
    e
}

/// An idempotency key held in flight on this process until a `Flight` takes it over or the
/// request ends before one is made.
struct IdemHold {
    app: Arc<App>,
    key: Option<String>,
}

impl Drop for IdemHold {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.app.gateway.idem.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        }
    }
}

/// How long an answer kept for an idempotency key is kept.
pub const KEEP_ANSWERS_MS: i64 = 24 * 3_600_000;

/// A request from admission to its usage record. Dropped before it finished (the client went
/// away, or the handler returned early), it takes the work out of the router and records what was
/// delivered.
struct Flight {
    app: Arc<App>,
    router_id: Option<ReqId>,
    usage: UsageRow,
    /// The backend started answering (prefill done): the request is billable.
    started: bool,
    /// Bytes of output text relayed so far (the token estimate of a stream cut short).
    relayed_bytes: usize,
    idem: Option<String>,
    done: bool,
    /// The tenant's allowance window the request was counted in, and the tokens it reserved.
    limit_window: Option<i64>,
    reserved: i64,
}

impl Flight {
    /// The tenant's allowance is settled to the tokens of the usage recorded (none if nothing
    /// was).
    fn settle(&mut self, used: i64) {
        if let Some(w) = self.limit_window.take() {
            self.app.limits.settle(&self.usage.tenant_id, w, used - self.reserved);
        }
    }

    fn release_router(&mut self, output_tokens: Option<u32>) {
        if let Some(id) = self.router_id.take() {
            self.app.router.lock().unwrap_or_else(|e| e.into_inner()).finish(id, output_tokens, wall_ms());
        }
    }

    /// The record of a request cut short: its prompt and the output delivered.
    fn cut_short(&mut self, status: UsageStatus) -> UsageRow {
        let mut u = self.usage.clone();
        u.output_tokens = i64::from(estimate_bytes(self.relayed_bytes));
        u.status = status;
        u.at_ms = wall_ms();
        u
    }

    /// Served: records usage durably, then frees the router. A request with an idempotency key
    /// first keeps its answer (`kept`: content type and body) for a retry, with the usage.
    async fn complete(
        &mut self,
        input: u32,
        output: u32,
        kept: Option<(&'static str, Vec<u8>)>,
    ) -> Result<(), OaiError> {
        let mut u = self.usage.clone();
        u.input_tokens = input.into();
        u.output_tokens = output.into();
        u.at_ms = wall_ms();
        self.done = true;
        self.release_router(Some(output));
        self.settle(u.input_tokens + u.output_tokens);
        let outcome = match kept {
            Some((content_type, body)) if self.idem.is_some() => Some(hcp_store::OutcomeRow {
                id: u.id.clone(),
                status: 200,
                content_type: content_type.into(),
                body: String::from_utf8_lossy(&body).into_owned(),
                usage: serde_json::to_string(&u).expect("a usage row serialises"),
                at_ms: u.at_ms,
            }),
            _ => None,
        };
        // The answer kept and the usage written by a task of their own: a client that goes
        // away meanwhile cancels neither (the request is `done`: nothing else would record it).
        let app = self.app.clone();
        let written = tokio::spawn(async move {
            if let Some(o) = outcome.filter(|o| o.body.len() <= hcp_store::MAX_OUTCOME_BYTES)
                && let Err(e) = app.store.put_outcome(&o).await
            {
                // Billed and answered still; a retry with the key is then told it was served.
                tracing::error!(error = %e, "answer not kept for its idempotency key");
            }
            app.meter.record(u).await
        });
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "usage not recorded");
                Err(OaiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    "usage could not be recorded",
                ))
            }
            Err(e) => Err(OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string())),
        }
    }

    /// Ended early after the backend started (failed or preempted): recorded, router freed.
    async fn end(&mut self, status: UsageStatus) {
        let u = self.cut_short(status);
        self.done = true;
        self.release_router(None);
        self.settle(u.input_tokens + u.output_tokens);
        if let Err(e) = self.app.meter.record(u).await {
            tracing::error!(error = %e, "usage not recorded");
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(k) = self.idem.take() {
            self.app.gateway.idem.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        }
        if self.done {
            // Ended without usage (refused, or the backend refused it): its tokens go back.
            self.settle(0);
            return;
        }
        self.release_router(None);
        if self.started {
            let u = self.cut_short(UsageStatus::Cancelled);
            self.settle(u.input_tokens + u.output_tokens);
            self.app.meter.record_detached(u);
        }
        self.settle(0);
        metrics::counter!("hcp_gateway_cancelled_total").increment(1);
    }
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// A choice's text; borrowed from the event when it holds no escapes (a streamed chunk usually
/// does not), so reading a chunk allocates nothing for it.
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Delta<'a>>,
}

/// The parts of a response or chunk the gateway reads.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

impl Answer<'_> {
    fn texts(&self) -> impl Iterator<Item = &str> {
        self.choices.iter().filter_map(|c| {
            c.delta
                .as_ref()
                .and_then(|d| d.content.as_deref())
                .or(c.text.as_deref())
                .or(c.message.as_ref().and_then(|m| m.content.as_deref()))
        })
    }

    /// Bytes of text in its choices.
    fn text_len(&self) -> usize {
        self.texts().map(str::len).sum()
    }
}

/// How one try on a replica ended before anything reached the client.
enum Try {
    /// A non-streamed answer, or a stream whose first bytes arrived.
    Answer(reqwest::Response, Option<Bytes>),
    /// The backend refused the request itself (4xx): passed to the client as it is.
    Refused(StatusCode, Bytes),
    /// The backend failed (or the work was preempted) before its first byte: try another.
    Again,
}

async fn serve(
    app: Arc<App>,
    ep: Endpoint,
    headers: HeaderMap,
    peer: Option<IpAddr>,
    body: Bytes,
) -> Result<Response, OaiError> {
    let (tenant, key, key_band) = tenant_of(&app, &headers, peer).await?;
    let req = parse(ep, &body)?;
    let tier = tier(&headers, key_band)?;
    let tag = header_str(&headers, "x-hcp-tag")?.map(str::to_string);
    if tag.as_ref().is_some_and(|t| t.is_empty() || t.len() > 64) {
        return Err(OaiError::invalid("x-hcp-tag", "must be 1 to 64 characters"));
    }
    let (model, tenant_ix) = {
        let r = app.router.lock().unwrap_or_else(|e| e.into_inner());
        (r.model(&req.model), r.tenant(&tenant))
    };
    let Some(model) = model else {
        let mut e = OaiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("model: {} is not served here (GET /v1/models lists what is)", req.model),
        );
        e.param = Some("model".into());
        return Err(e);
    };
    let max_out = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let context = app.fleet.served_model.context_tokens;
    if u64::from(req.prompt_tokens) + u64::from(max_out) > u64::from(context) {
        let mut e = OaiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "messages: this model's context is {context} tokens; the request has about {} prompt tokens and \
                 asks for {max_out} output tokens",
                req.prompt_tokens
            ),
        );
        e.param = Some(if ep == Endpoint::Chat { "messages" } else { "prompt" }.into());
        return Err(e);
    }
    let Some(tenant_ix) = tenant_ix else { return Err(reject_error(&RejectReason::UnknownTenant)) };
    if !app.router.lock().unwrap_or_else(|e| e.into_inner()).can_ever_serve(&tenant) {
        return Err(OaiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            Some("insufficient_quota"),
            no_capacity(&tenant),
        ));
    }
    let rid = format!("{}-{}", ep.id_prefix(), crate::auth::request_id());
    let idem = match header_str(&headers, "idempotency-key")? {
        None => None,
        Some(k) if k.is_empty() || k.len() > 128 => {
            return Err(OaiError::invalid("idempotency-key", "must be 1 to 128 characters"));
        }
        Some(k) => Some(format!("idem:{tenant}:{k}")),
    };
    // The key is held (in flight on this process) before anything is looked up, so a first
    // request finishing meanwhile cannot make its retry look like one with no answer kept.
    let mut hold = IdemHold { app: app.clone(), key: None };
    if let Some(k) = &idem {
        if !app.gateway.idem.lock().unwrap_or_else(|e| e.into_inner()).insert(k.clone()) {
            let mut e = OaiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_reused"),
                "idempotency-key: a request with this key is in flight; retry when it has ended",
            );
            e.retry_after_s = Some(1);
            return Err(e);
        }
        hold.key = Some(k.clone());
        // A retry of a request already answered gets that answer again, billed once.
        if let Some(o) = app.store.outcome(k).await? {
            return replay(&app, o).await;
        }
        if app.store.usage_by_id(k).await?.is_some() {
            return Err(OaiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_reused"),
                "idempotency-key: a request with this key was served or cut short, and no answer is kept for it \
                 (it failed, was cut short or was too large to keep): send a new key",
            ));
        }
    }
    // The tenant's allowance a minute over all its keys (and every API process): the prompt
    // and the most output asked for are reserved now, settled to what is used at the end.
    let reserved = i64::from(req.prompt_tokens) + i64::from(max_out);
    let limits = app.router.lock().unwrap_or_else(|e| e.into_inner()).tenant_limits(&tenant);
    let limit_window = match limits {
        Some((rpm, tpm)) => match crate::limits::admit(&app, &tenant, rpm, tpm, reserved).await {
            Ok(w) => Some(w),
            Err(over) => {
                metrics::counter!("hcp_gateway_tenant_limited_total", "limit" => over.limit).increment(1);
                let mut e = OaiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    Some("rate_limit_exceeded"),
                    over.to_string(),
                );
                e.retry_after_s = Some(over.retry_after_s);
                return Err(e);
            }
        },
        None => None,
    };
    let usage_id = idem.clone().unwrap_or_else(|| rid.clone());
    let mut flight = Flight {
        app: app.clone(),
        router_id: None,
        usage: UsageRow {
            seq: 0,
            id: usage_id,
            tenant_id: tenant,
            key_id: key,
            kind: UsageKind::Tokens,
            tier: i64::from(tier),
            model: req.model.clone(),
            site_id: String::new(),
            input_tokens: i64::from(req.prompt_tokens),
            output_tokens: 0,
            gpu_ms: 0,
            spot: false,
            status: UsageStatus::Completed,
            tag,
            at_ms: 0,
        },
        started: false,
        relayed_bytes: 0,
        idem: hold.key.take(),
        done: false,
        limit_window,
        reserved,
    };
    // The backend always reports usage on a stream; the client sees it only if it asked.
    let upstream_body = if req.stream && !req.include_usage {
        let mut v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| OaiError::invalid("body", e.to_string()))?;
        v["stream_options"] = serde_json::json!({ "include_usage": true });
        Bytes::from(serde_json::to_vec(&v).expect("a JSON value serialises"))
    } else {
        body
    };
    let work = Work {
        id: 0,
        tenant: tenant_ix,
        band: tier,
        model,
        prompt_tokens: req.prompt_tokens,
        max_output_tokens: max_out,
        deadline_ms: None,
        gang: 1,
        preemptible: true,
        restart_cost: f64::from(req.prompt_tokens),
    };
    let started = std::time::Instant::now();
    for _attempt in 0..MAX_ATTEMPTS {
        let (id, mut rx) = app.router.lock().unwrap_or_else(|e| e.into_inner()).arrive(work.clone(), wall_ms());
        flight.router_id = Some(id);
        let replica = loop {
            match rx.recv().await {
                Some(Placement::Dispatched(r)) => break r,
                Some(Placement::Rejected(why)) => {
                    flight.done = true;
                    flight.release_router(None);
                    metrics::counter!("hcp_gateway_rejected_total").increment(1);
                    return Err(reject_error(&why));
                }
                Some(Placement::Preempted) => continue,
                None => {
                    return Err(OaiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, "router stopped"));
                }
            }
        };
        metrics::histogram!("hcp_gateway_queue_seconds").record(started.elapsed().as_secs_f64());
        let site = app.router.lock().unwrap_or_else(|e| e.into_inner()).site_of(replica).unwrap_or("").to_string();
        flight.usage.site_id = site;
        let Some(base) = app.gateway.base(replica) else {
            flight.release_router(None);
            app.router.lock().unwrap_or_else(|e| e.into_inner()).set_down(&[i64::from(replica.0)], true, wall_ms());
            continue;
        };
        match try_replica(&app, i64::from(replica.0), &base, ep, &rid, &upstream_body, req.stream, &mut rx).await {
            Try::Again => {
                metrics::counter!("hcp_gateway_retries_total").increment(1);
                flight.release_router(None);
                continue;
            }
            Try::Refused(status, bytes) => {
                flight.done = true;
                flight.release_router(None);
                let mut r = Response::new(Body::from(bytes));
                *r.status_mut() = status;
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return Ok(r);
            }
            Try::Answer(resp, first) => {
                flight.started = true;
                if !req.stream {
                    return whole(flight, resp, &rid, &req, &mut rx).await;
                }
                let relay = relay(flight, resp, first.unwrap_or_default(), rx, req.include_usage);
                let mut r = Response::new(Body::from_stream(relay));
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                h.insert("x-request-id", HeaderValue::from_str(&rid).expect("ascii id"));
                return Ok(r);
            }
        }
    }
    flight.done = true;
    Err(OaiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        Some("backend_unavailable"),
        format!("{MAX_ATTEMPTS} replicas failed before answering; retry later"),
    ))
}

/// One try on a replica, up to its first byte (streams) or its whole answer's headers.
#[allow(clippy::too_many_arguments)]
async fn try_replica(
    app: &App,
    replica: i64,
    base: &str,
    ep: Endpoint,
    rid: &str,
    body: &Bytes,
    stream: bool,
    rx: &mut mpsc::UnboundedReceiver<Placement>,
) -> Try {
    let send = app
        .gateway
        .client(replica)
        .post(format!("{base}{}", ep.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", rid)
        .body(body.clone())
        .send();
    let failed = |why: String| {
        tracing::warn!(base, why, "backend failed before its first byte; trying another replica");
        metrics::counter!("hcp_gateway_backend_failures_total").increment(1);
        // No new work until its health check passes; the streams it is serving go on.
        app.router.lock().unwrap_or_else(|e| e.into_inner()).set_cordoned(&[replica], true, wall_ms());
        Try::Again
    };
    let resp = tokio::select! {
        r = send => r,
        // Preempted (or the router gone) before the backend answered: place it again.
        _ = rx.recv() => return Try::Again,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    let status = resp.status();
    if status.is_server_error() {
        return failed(format!("status {status}"));
    }
    if status.is_client_error() {
        let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
        return Try::Refused(code, resp.bytes().await.unwrap_or_default());
    }
    if !stream {
        return Try::Answer(resp, None);
    }
    let mut resp = resp;
    let first = tokio::select! {
        c = resp.chunk() => c,
        _ = rx.recv() => return Try::Again,
    };
    match first {
        Ok(Some(b)) => Try::Answer(resp, Some(b)),
        Ok(None) => failed("stream ended before its first byte".into()),
        Err(e) => failed(e.to_string()),
    }
}

/// A non-streamed answer: read whole, usage recorded, then answered.
async fn whole(
    mut flight: Flight,
    resp: reqwest::Response,
    rid: &str,
    req: &crate::openai::Request,
    rx: &mut mpsc::UnboundedReceiver<Placement>,
) -> Result<Response, OaiError> {
    let bytes = tokio::select! {
        b = resp.bytes() => b,
        _ = rx.recv() => {
            flight.end(UsageStatus::Preempted).await;
            return Err(OaiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("preempted"),
                "the request was preempted by a capacity change; retry"));
        }
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => {
            flight.end(UsageStatus::Failed).await;
            return Err(OaiError::new(StatusCode::BAD_GATEWAY, "server_error", Some("backend_failed"), e.to_string()));
        }
    };
    let mut v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            flight.end(UsageStatus::Failed).await;
            return Err(OaiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("backend_failed"),
                format!("the backend's answer is not JSON: {e}"),
            ));
        }
    };
    let a: Answer = serde_json::from_slice(&bytes).unwrap_or(Answer { choices: vec![], usage: None, error: None });
    let (input, output) = match a.usage {
        Some(u) => (u.prompt_tokens, u.completion_tokens),
        None => (req.prompt_tokens, estimate_bytes(a.text_len())),
    };
    v["id"] = serde_json::Value::String(rid.to_string());
    let body = serde_json::to_vec(&v).expect("a JSON value serialises");
    let mut r = if flight.idem.is_some() {
        // Kept with its usage before it is sent: a retry with the key gets it again.
        flight.complete(input, output, Some(("application/json", body.clone()))).await?;
        Response::new(Body::from(body))
    } else {
        // Billed once it has been handed to the connection: a request cut before (the client
        // gone, the process stopped) is billed for its prompt only.
        let steps = futures::stream::unfold(Some((Some(Bytes::from(body)), flight)), move |st| async move {
            let (bytes, mut flight) = st?;
            match bytes {
                Some(b) => Some((Ok::<_, std::convert::Infallible>(b), Some((None, flight)))),
                None => {
                    if let Err(e) = flight.complete(input, output, None).await {
                        tracing::error!(error = %e.message, "an answer was delivered without its usage record");
                    }
                    None
                }
            }
        });
        Response::new(Body::from_stream(steps))
    };
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert("x-request-id", HeaderValue::from_str(rid).expect("ascii id"));
    Ok(r)
}

/// The answer kept for an idempotency key, sent again (`Idempotent-Replayed: true`). If the
/// process that answered stopped before the usage reached storage, it is recorded now: the
/// request is billed once either way.
async fn replay(app: &App, o: hcp_store::OutcomeRow) -> Result<Response, OaiError> {
    if app.store.usage_by_id(&o.id).await?.is_none() {
        let u: UsageRow = serde_json::from_str(&o.usage)
            .map_err(|e| OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string()))?;
        app.meter.record(u).await.map_err(|e| {
            OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, format!("usage: {e}"))
        })?;
    }
    metrics::counter!("hcp_gateway_replayed_total").increment(1);
    let mut r = Response::new(Body::from(o.body));
    *r.status_mut() = StatusCode::from_u16(u16::try_from(o.status).unwrap_or(200)).unwrap_or(StatusCode::OK);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&o.content_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(r)
}

/// Output tokens between two progress reports of a stream to the router (its tenant's virtual
/// counter is charged as tokens are delivered, and its first report is the time to first token).
const PROGRESS_EVERY: u32 = 16;

struct Relay {
    flight: Flight,
    /// Output tokens last reported to the router.
    reported: u32,
    resp: reqwest::Response,
    rx: mpsc::UnboundedReceiver<Placement>,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of an event.
    scanned: usize,
    include_usage: bool,
    usage: Option<(u32, u32)>,
    usage_line: Vec<u8>,
    pending: Option<Bytes>,
    over: bool,
    /// The backend sent `[DONE]`: what is left of its body is read before the relay ends.
    finished: bool,
    /// What the client has been sent, kept for a request with an idempotency key (None once
    /// over `MAX_OUTCOME_BYTES`: then no answer is kept).
    sent: Option<Vec<u8>>,
}

fn error_event(code: &str, message: &str) -> Vec<u8> {
    let v = serde_json::json!({ "error": { "message": message, "type": "server_error", "param": null, "code": code } });
    format!("data: {v}\n\n").into_bytes()
}

impl Relay {
    /// Takes the complete SSE events out of the buffer: forwards content chunks, keeps the usage
    /// chunk, and on `[DONE]` records usage before passing it on. Returns the bytes for the client.
    async fn events(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len());
        // Events are framed by a blank line; only bytes not yet scanned are searched.
        let mut at = 0;
        loop {
            let search = self.scanned.max(at);
            let Some(n) = self.buf[search..].windows(2).position(|w| w == b"\n\n") else { break };
            let (from, to) = (at, search + n + 2);
            at = to;
            self.scanned = to;
            let line = std::str::from_utf8(&self.buf[from..to]).unwrap_or("").trim();
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                let (input, output) = self.usage.unwrap_or((
                    u32::try_from(self.flight.usage.input_tokens).unwrap_or(0),
                    estimate_bytes(self.flight.relayed_bytes),
                ));
                let mut tail = std::mem::take(&mut out);
                if self.include_usage {
                    tail.extend_from_slice(&self.usage_line);
                }
                tail.extend_from_slice(b"data: [DONE]\n\n");
                let kept = self.sent.take().map(|mut all| {
                    all.extend_from_slice(&tail);
                    ("text/event-stream", all)
                });
                match self.flight.complete(input, output, kept).await {
                    Ok(()) => out = tail,
                    Err(e) => {
                        out = tail;
                        out.truncate(out.len() - b"data: [DONE]\n\n".len());
                        out.extend(error_event("usage_not_recorded", &e.message));
                    }
                }
                self.over = true;
                self.finished = true;
                return out;
            }
            let (usage, text, error, no_choices) = match serde_json::from_str::<Answer>(data) {
                Ok(a) => (
                    a.usage.as_ref().map(|u| (u.prompt_tokens, u.completion_tokens)),
                    a.text_len(),
                    a.error.is_some(),
                    a.choices.is_empty(),
                ),
                Err(_) => {
                    out.extend_from_slice(&self.buf[from..to]);
                    continue;
                }
            };
            if usage.is_some() {
                self.usage = usage;
            }
            if usage.is_some() && no_choices {
                // The usage chunk: the client gets it only if it asked, just before `[DONE]`.
                self.usage_line.clear();
                self.usage_line.extend_from_slice(&self.buf[from..to]);
                continue;
            }
            self.flight.relayed_bytes += text;
            let delivered = estimate_bytes(self.flight.relayed_bytes);
            if delivered > 0
                && (self.reported == 0 || delivered >= self.reported + PROGRESS_EVERY)
                && let Some(id) = self.flight.router_id
            {
                self.reported = delivered;
                self.flight.app.router.lock().unwrap_or_else(|e| e.into_inner()).progress(id, delivered, wall_ms());
            }
            out.extend_from_slice(&self.buf[from..to]);
            if error {
                // The backend reports a failure in the stream: pass it on and end.
                self.flight.end(UsageStatus::Failed).await;
                self.over = true;
                return out;
            }
        }
        self.buf.drain(..at);
        // No event ends in what is left but possibly at its last byte.
        self.scanned = self.buf.len().saturating_sub(1);
        out
    }

    async fn next(&mut self) -> Option<Bytes> {
        if self.over {
            if self.finished {
                // After `[DONE]` the backend's body still has its end to send (the last chunk of
                // its chunked encoding). Read it, so that the connection goes back to the pool
                // instead of being closed and a new one opened for the next request.
                self.finished = false;
                let drain = async { while let Ok(Some(_)) = self.resp.chunk().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            }
            return None;
        }
        if let Some(first) = self.pending.take() {
            self.buf.extend_from_slice(&first);
            self.buf.retain(|&c| c != b'\r');
            let out = self.events().await;
            if !out.is_empty() {
                return Some(Bytes::from(out));
            }
        }
        loop {
            if self.over {
                return None;
            }
            let next = tokio::select! {
                c = self.resp.chunk() => c,
                p = self.rx.recv() => {
                    if matches!(p, Some(Placement::Preempted)) {
                        self.flight.end(UsageStatus::Preempted).await;
                        self.over = true;
                        return Some(Bytes::from(error_event("preempted",
                            "the request was preempted by a capacity change after it started")));
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(b)) => {
                    self.buf.extend_from_slice(&b);
                    // Events may end in CRLF pairs (the SSE spec allows them); JSON payloads never
                    // hold a raw CR, so dropping every CR leaves blank-line framing.
                    if b.contains(&b'\r') {
                        self.buf.retain(|&c| c != b'\r');
                    }
                    let out = self.events().await;
                    if !out.is_empty() {
                        return Some(Bytes::from(out));
                    }
                }
                Ok(None) | Err(_) => {
                    self.flight.end(UsageStatus::Failed).await;
                    self.over = true;
                    return Some(Bytes::from(error_event("backend_failed", "the backend stopped mid-stream")));
                }
            }
        }
    }
}

fn relay(
    flight: Flight,
    resp: reqwest::Response,
    first: Bytes,
    rx: mpsc::UnboundedReceiver<Placement>,
    include_usage: bool,
) -> Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>> {
    let sent = flight.idem.is_some().then(Vec::new);
    let r = Relay {
        flight,
        sent,
        reported: 0,
        resp,
        rx,
        buf: Vec::with_capacity(1024),
        scanned: 0,
        include_usage,
        usage: None,
        usage_line: vec![],
        pending: Some(first),
        over: false,
        finished: false,
    };
    Box::pin(futures::stream::unfold(r, |mut r| async move {
        let b = r.next().await?;
        if let Some(sent) = &mut r.sent {
            if sent.len() + b.len() <= hcp_store::MAX_OUTCOME_BYTES {
                sent.extend_from_slice(&b);
            } else {
                r.sent = None;
            }
        }
        Some((Ok(b), r))
    }))
}

#[cfg(test)]
mod tests {
    use super::BackendConfig;

    /// A backend's configuration parses with its defaults, and each bad part is refused with
    /// the field and the rule.
    #[test]
    fn backend_configs_parse_and_name_what_is_wrong() {
        let b = BackendConfig::parse("url=http://10.0.0.5:8000/v1/,model=llama-3-8b").unwrap();
        assert_eq!((b.url.as_str(), b.slots, b.gpus, b.http2), ("http://10.0.0.5:8000/v1", 64, 1, false));
        let b = BackendConfig::parse("url=http://h:8000/v1,model=m,slots=8,site=tx-west,http2=true").unwrap();
        assert_eq!((b.slots, b.site.as_str(), b.http2), (8, "tx-west", true));
        for (bad, says) in [
            ("model=m", "backend.url: must start with http:// or https://"),
            ("url=http://h/v1", "backend.model: is required"),
            ("url=http://h/v1,model=m,slots=0", "backend.slots, gpus, kv_tokens: must be >= 1"),
            ("url=http://h/v1,model=m,slots=many", "backend.slots: must be a whole number"),
            ("url=http://h/v1,model=m,http2=yes", "backend.http2: must be true or false"),
            ("url=https://h/v1,model=m,http2=true", "backend.http2: is for http:// servers (HTTP/2 without TLS)"),
            ("url=http://h/v1,model=m,colour=red", "backend.colour: unknown"),
            ("url=http://h/v1,model", "backend: \"model\" must be key=value"),
        ] {
            let e = BackendConfig::parse(bad).unwrap_err();
            assert!(e.starts_with(says), "{bad}: {e}");
        }
    }
}
