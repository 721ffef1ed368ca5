//! The platform process: REST under `/api/v1`, health, Prometheus metrics and live events over
//! Server-Sent Events on one port, with auth; and the engine that runs the simulated sites and the
//! dispatcher, recording what happens in storage and announcing it on the event bus.
//!
//! Architecture invariant: an adapter. Decisions are made by the pure crates (`hcp-econ`,
//! `hcp-fleet`, `hcp-sched`); this crate feeds them inputs, stores and serves what they output.

pub mod agentlink;
pub mod auth;
pub mod billing;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod events;
pub mod gateway;
pub mod graphql;
pub mod limits;
pub mod live;
pub mod metering;
pub mod net;
pub mod openai;
pub mod openapi;
pub mod reads;
pub mod routes;
pub mod routing;
pub mod simbackend;
pub mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use anyhow::{Context, bail};
use hcp_bus::{Bus, Limits};
use hcp_model::fleet::Fleet;
use hcp_store::{AccountRow, ApiKeyRow, DeviceRow, SiteRow, Store, TenantRow};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{Gate, hash_secret, parse_token, secret, short_id, valid_name};

/// Resolved settings of one process.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://...`.
    pub store_url: String,
    /// None: in-process; `nats://...`: NATS JetStream.
    pub bus_url: Option<String>,
    pub fleet: Fleet,
    /// Run the engine (simulated sites and the dispatcher) in this process.
    pub engine: bool,
    /// Serve the API in this process.
    pub api: bool,
    pub seed: u64,
    /// Simulated seconds per wall-clock second.
    pub speed: f64,
    /// The control core's tunables (resolved once from the CLI and an optional file).
    pub engine_config: hcp_engine::EngineConfig,
    /// Where the engine's signals and time come from.
    pub mode: Mode,
    /// Bootstrap credentials from the environment (HCP_ADMIN_TOKEN, HCP_DEMO_TENANT_KEY).
    pub admin_token: Option<String>,
    pub demo_tenant_key: Option<String>,
    /// Requests per second an operator account may make (tenant keys carry their own rate).
    pub account_rate_per_s: f64,
    /// Where the simulated GPU backend listens (API processes only); None: not started.
    pub sim_backend_listen: Option<SocketAddr>,
    /// The gateway calls the simulated backend over HTTP/2 without TLS, every stream on one
    /// connection (less CPU per request under load); else over HTTP/1.1, a connection per stream
    /// (as vLLM, SGLang or TGI are called).
    pub sim_backend_http2: bool,
    /// Real OpenAI-compatible servers the gateway may route to, besides the simulated fleet.
    pub backends: Vec<gateway::BackendConfig>,
    /// Fleets a backtest from the API may run besides the platform's own.
    pub backtest_fleets: Vec<Fleet>,
    /// Connection limits, the metrics listener and the proxy trusted for client addresses.
    pub net: NetConfig,
}

/// How the platform's servers treat connections (every listener: the API, the metrics listener
/// and the simulated backend).
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The longest a client may take to send a request's headers; an HTTP/1 connection idle
    /// between requests for this long is closed too.
    pub header_read_timeout: std::time::Duration,
    /// A connection with no request in flight and no byte moved for this long is closed (HTTP/2
    /// and clients that never finish a first request line included).
    pub idle_timeout: std::time::Duration,
    /// Connections open at once, in total per listener.
    pub max_connections: usize,
    /// Connections open at once from one client address, per listener.
    pub max_connections_per_addr: usize,
    /// Serve `/metrics` here, without credentials (a listener on an internal network); the main
    /// listener's `/metrics` then answers 404. None: `/metrics` on the main listener, for an
    /// operator account's token (any role).
    pub metrics_listen: Option<SocketAddr>,
    /// Take the client's address from the last entry of `X-Forwarded-For` (set only behind a
    /// proxy that writes it; otherwise any client could pick the address its failures count
    /// against).
    pub trust_forwarded_for: bool,
    /// HTTP/2 streams one connection may carry at once.
    pub h2_max_streams: u32,
}

impl NetConfig {
    /// The simulated backend's: its one client is this process's gateway (one address, as many
    /// connections as it has streams over HTTP/1.1, or all of them on one HTTP/2 connection),
    /// whose pooled connections idle up to 90 s: those are not closed under it.
    pub fn for_backend(net: &NetConfig) -> NetConfig {
        NetConfig {
            max_connections_per_addr: net.max_connections,
            h2_max_streams: H2_MAX_STREAMS,
            header_read_timeout: net.header_read_timeout.max(std::time::Duration::from_secs(120)),
            idle_timeout: net.idle_timeout.max(std::time::Duration::from_secs(120)),
            ..net.clone()
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            max_connections: 20_000,
            max_connections_per_addr: 2_000,
            metrics_listen: None,
            trust_forwarded_for: false,
            h2_max_streams: 256,
        }
    }
}

/// Where the engine's signals and time come from.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    /// A simulated world on accelerated time (`speed`), from 2025-06-01.
    #[default]
    Demo,
    /// Signals from feeds (and manual values), on the wall clock at the market's offset; or,
    /// with `rehearse_from`, on an accelerated clock (`speed`) from that market time.
    Live { feeds: Box<hcp_feeds::FeedsConfig>, rehearse_from: Option<hcp_model::SimTime> },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Demo => "demo",
            Mode::Live { rehearse_from: None, .. } => "live",
            Mode::Live { rehearse_from: Some(_), .. } => "rehearsal",
        }
    }
}

impl Config {
    pub fn data_dir_store(dir: &std::path::Path) -> String {
        let p: PathBuf = dir.join("hcp.db");
        format!("sqlite:{}", p.display())
    }
}

/// Shared state of the API handlers.
pub struct App {
    pub store: Store,
    pub bus: Bus,
    pub gate: Gate,
    pub fleet: Fleet,
    pub metrics: PrometheusHandle,
    /// Simulated time of the engine's latest interval (ms since the epoch), 0 before the first.
    pub engine_at_ms: AtomicI64,
    /// Wall time (ms) when the engine last produced an interval; 0 when no engine runs here.
    pub engine_wall_ms: AtomicI64,
    /// The engine's worker has ended (stopped, or its period is over).
    pub engine_stopped: std::sync::atomic::AtomicBool,
    pub engine_expected: bool,
    pub started_wall_ms: i64,
    /// Hot list pages, kept until storage announces a change (see `reads`).
    pub reads: reads::ReadCache,
    /// The workload router and its capacity (see `routing`).
    pub router: std::sync::Mutex<routing::RouterState>,
    /// The inference gateway's clients and backends (see `gateway`).
    pub gateway: gateway::Gateway,
    /// Usage records' writer (see `metering`).
    pub meter: metering::Meter,
    /// The simulated GPU backend, when this process runs it.
    pub sim: Option<Arc<simbackend::SimBackend>>,
    /// The latest announced intervals, plan, day ahead and device counts (see `live`).
    pub live: live::Live,
    pub backtest_fleets: Vec<Fleet>,
    /// The fleet's device models and their counts (see `dashboard::device_models`).
    pub device_models: Vec<(hcp_model::ModelRef, usize)>,
    /// One backtest at a time per process.
    pub backtest_slot: tokio::sync::Semaphore,
    /// The read-only GraphQL schema (see `graphql`).
    pub graphql: graphql::HcpSchema,
    /// The engine's bounds (manual values are checked against them before they are accepted).
    pub engine_config: hcp_engine::EngineConfig,
    /// The engine's mode as configured for this process (`demo`, `live`, `rehearsal`).
    pub mode: &'static str,
    /// The client's address is the last of `X-Forwarded-For` (behind a proxy this platform trusts).
    pub trust_forwarded_for: bool,
    /// Tenants' allowances a minute, shared with every API process through the store.
    pub limits: limits::TenantLimits,
    /// `/metrics` is served on its own listener (`NetConfig::metrics_listen`), not the main one.
    pub metrics_elsewhere: bool,
}

/// The router's tenants and capacity from storage.
async fn load_router(app: &App) -> anyhow::Result<()> {
    let mut tenants = vec![];
    let mut page = hcp_store::Page { after: None, limit: Some(hcp_store::MAX_PAGE) };
    loop {
        let batch = app.store.tenants(&page).await?;
        let full = batch.len() == hcp_store::MAX_PAGE as usize;
        page.after = batch.last().map(|t| t.created_ms);
        tenants.extend(batch);
        if !full {
            break;
        }
    }
    let replicas = app.store.replicas().await?;
    if let Some(sim) = &app.sim {
        sim.set_caps(&replicas);
    }
    let mut reserved = None;
    for p in app.store.policies().await? {
        if p.name == "reserved-capacity" {
            match reserved_of(app, &p.name, p.version, &p.body) {
                Ok(r) => reserved = r,
                Err(e) => tracing::warn!(error = %e, "stored reserved-capacity policy not applied to the router"),
            }
        }
    }
    // A stored row the router refuses is logged and left out: it must not keep the API down.
    let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = r.set_reserved(reserved) {
        tracing::warn!(error = %e, "reserved-capacity policy not applied to the router");
    }
    for t in &tenants {
        if let Err(e) = r.add_tenant(t) {
            tracing::warn!(tenant = %t.id, error = %e, "tenant left out of the router");
        }
    }
    if let Err(e) = r.apply(&replicas, wall_ms()) {
        tracing::warn!(error = %e, "stored capacity refused; the router waits for the next notice");
    }
    Ok(())
}

/// The tenant and GPUs of a stored reserved-capacity policy.
fn reserved_of(app: &App, name: &str, version: i64, body: &str) -> anyhow::Result<Option<(String, u32)>> {
    match engine::policy_update(&app.fleet, name, version, body)? {
        hcp_engine::io::PolicyUpdate::Reserved(r) => Ok(Some((r.tenant, r.gpus))),
        _ => Ok(None),
    }
}

/// A bus notice the router follows: capacity from the engine, tenants from the API.
fn routing_notice(app: &App, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
    match subject {
        "hcp.capacity" => {
            let c: events::CapacityNotice = serde_json::from_slice(payload)?;
            if let Some(sim) = &app.sim {
                sim.set_caps(&c.replicas);
            }
            let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
            r.apply(&c.replicas, wall_ms()).map_err(|e| anyhow::anyhow!(e))?;
        }
        "hcp.policy" => {
            let n: events::PolicyNotice = serde_json::from_slice(payload)?;
            if n.name == "reserved-capacity" {
                let reserved = reserved_of(app, &n.name, n.version, &n.body)?;
                let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
                r.set_reserved(reserved).map_err(|e| anyhow::anyhow!(e))?;
            }
        }
        "hcp.job.cancel" => billing::cancel_notice(app, payload),
        "hcp.batch" => billing::batch_notice(app, &serde_json::from_slice(payload)?),
        "hcp.tenants" => {
            let t: hcp_store::TenantRow = serde_json::from_slice(payload)?;
            app.router.lock().unwrap_or_else(|e| e.into_inner()).add_tenant(&t).map_err(|e| anyhow::anyhow!(e))?;
        }
        _ => {}
    }
    Ok(())
}

pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The credentials a first start created (printed once by `hcp up`).
#[derive(Debug, Default)]
pub struct Bootstrap {
    pub admin_token: Option<String>,
    pub demo_tenant_key: Option<String>,
}

/// Opens storage and migrates it, writes the fleet's topology, and on the first start creates the
/// admin account and the demo tenant with a key.
pub async fn prepare(cfg: &Config) -> anyhow::Result<(Store, Bootstrap)> {
    let t = std::time::Instant::now();
    let store = Store::open(&cfg.store_url).await.with_context(|| "open the store")?;
    let version = store.migrate().await.context("migrate the store")?;
    tracing::info!(version, ms = t.elapsed().as_millis() as u64, "store open and migrated");
    let t = std::time::Instant::now();
    let (sites, devices) = topology(&cfg.fleet);
    let wrote = store
        .sync_topology(&fingerprint(&sites, &devices), &sites, &devices)
        .await
        .context("write the fleet topology")?;
    tracing::info!(devices = devices.len(), wrote, ms = t.elapsed().as_millis() as u64, "fleet topology");
    let mut boot = Bootstrap::default();
    let now = wall_ms();
    if store.accounts().await?.is_empty() {
        let token = match &cfg.admin_token {
            Some(t) => t.clone(),
            None => format!("hcpa_admin_{}", secret()),
        };
        let Some(auth::TokenKind::Account { name: "admin", secret }) = parse_token(&token) else {
            bail!("HCP_ADMIN_TOKEN: must look like hcpa_admin_<secret of 16 or more letters and digits>");
        };
        store
            .put_account(&AccountRow {
                name: "admin".into(),
                role: "admin".into(),
                secret_hash: hash_secret(secret),
                created_ms: now,
            })
            .await?;
        store.audit(now, "system", "account.create", "admin", None, Some("{\"role\":\"admin\"}")).await?;
        if cfg.admin_token.is_none() {
            boot.admin_token = Some(token);
        }
    }
    if matches!(store.tenant("demo").await, Err(hcp_store::StoreError::NotFound(_))) {
        store
            .create_tenant(&TenantRow {
                id: "demo".into(),
                name: "Demo tenant".into(),
                weight: 1.0,
                guaranteed_gpus: 0.0,
                borrow_limit_gpus: 1e6,
                created_ms: now,
                // The demo tenant carries load tests and benchmarks: room for them.
                requests_per_min: 10_000_000,
                tokens_per_min: 10_000_000_000,
            })
            .await?;
        let key = match &cfg.demo_tenant_key {
            Some(k) => k.clone(),
            None => format!("hcpk_{}_{}", short_id(), secret()),
        };
        let Some(auth::TokenKind::Key { id, secret }) = parse_token(&key) else {
            bail!("HCP_DEMO_TENANT_KEY: must look like hcpk_<id>_<secret of 16 or more letters and digits>");
        };
        if !valid_name(id) {
            bail!("HCP_DEMO_TENANT_KEY: the id part must be lowercase letters, digits or -");
        }
        store
            .create_key(&ApiKeyRow {
                id: id.into(),
                tenant_id: "demo".into(),
                secret_hash: hash_secret(secret),
                default_band: 1,
                rate_per_s: 100.0,
                created_ms: now,
                revoked_ms: None,
            })
            .await?;
        store.audit(now, "system", "tenant.create", "demo", None, None).await?;
        if cfg.demo_tenant_key.is_none() {
            boot.demo_tenant_key = Some(key);
        }
    }
    Ok((store, boot))
}

/// The fleet as storage rows.
pub fn topology(f: &Fleet) -> (Vec<SiteRow>, Vec<DeviceRow>) {
    let sites = f
        .sites
        .iter()
        .map(|s| SiteRow {
            id: s.id.clone(),
            idx: i64::from(s.idx.0),
            power_cap_w: s.power_cap_w,
            settlement_point: s.settlement_point.clone(),
        })
        .collect();
    let devices = f
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| DeviceRow {
            idx: i as i64,
            site_id: f.sites[d.site.index()].id.clone(),
            feeder_id: f.feeders[d.feeder.index()].id.clone(),
            rack_idx: i64::from(d.rack.0),
            model: f.model_id(d.model).to_string(),
            kind: match d.model {
                hcp_model::ModelRef::Asic(_) => "asic",
                hcp_model::ModelRef::Gpu(_) => "gpu",
            }
            .into(),
            maintenance: false,
            status: "unknown".into(),
            status_reason: None,
            status_ms: None,
            last_telemetry_ms: None,
        })
        .collect();
    (sites, devices)
}

/// A stable fingerprint of the topology rows (FNV-1a, 64 bits, over their JSON).
pub fn fingerprint(sites: &[SiteRow], devices: &[DeviceRow]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for x in b {
            h = (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(serde_json::to_string(sites).unwrap_or_default().as_bytes());
    for d in devices {
        feed(serde_json::to_string(d).unwrap_or_default().as_bytes());
    }
    format!("{h:016x}-{}-{}", sites.len(), devices.len())
}

/// Installs the Prometheus recorder once per process and returns its handle.
///
/// The recorder keeps each histogram's samples until they are folded into its buckets, which
/// happens at a scrape or at upkeep; a thread runs upkeep every 5 s, so a platform nobody scrapes
/// does not keep every request's samples (before, one `hcp up` grew by the samples of every
/// request it served).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let h = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
                .expect("static buckets")
                .install_recorder()
                .expect("one recorder per process");
            let upkeep = h.clone();
            std::thread::Builder::new()
                .name("hcp-metrics".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("a thread for metrics upkeep");
            h
        })
        .clone()
}

/// A running platform: its address and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served without credentials, if it has its own listener.
    pub metrics_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests and the engine's current write, and returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.await??;
        }
        // Then (nothing resumes jobs any more) the jobs this process runs are handed back with
        // the time they ran, for the next start or another API process to resume.
        billing::release_jobs(&self.app).await;
        // Every request has finished: its usage is committed before storage closes.
        self.app.meter.flush().await;
        self.app.store.close().await;
        Ok(())
    }
}

pub use net::H2_MAX_STREAMS;

/// Serves on `listener` until `stop` turns true, then finishes the requests in flight.
async fn serve_until(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    net: NetConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    net::serve(listener, router, net, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await;
    Ok(())
}

/// Starts the roles the config names; returns once listening.
pub async fn start(cfg: Config, store: Store) -> anyhow::Result<Running> {
    let bus = Bus::connect(cfg.bus_url.as_deref(), Limits::default()).await.context("connect the event bus")?;
    let app = Arc::new(App {
        store: store.clone(),
        bus,
        gate: Gate::new(cfg.account_rate_per_s),
        fleet: cfg.fleet.clone(),
        metrics: metrics_handle(),
        engine_at_ms: AtomicI64::new(0),
        engine_wall_ms: AtomicI64::new(0),
        engine_stopped: std::sync::atomic::AtomicBool::new(false),
        engine_expected: cfg.engine,
        started_wall_ms: wall_ms(),
        reads: reads::ReadCache::default(),
        router: std::sync::Mutex::new(routing::RouterState::new(&cfg.fleet.served_model.id)),
        gateway: gateway::Gateway::new(cfg.backends.clone(), cfg.sim_backend_http2),
        meter: metering::Meter::start(store.clone()),
        sim: (cfg.api && cfg.sim_backend_listen.is_some())
            .then(|| Arc::new(simbackend::SimBackend::new(cfg.fleet.clone()))),
        live: live::Live::default(),
        backtest_fleets: cfg.backtest_fleets.clone(),
        device_models: dashboard::device_models(&cfg.fleet),
        backtest_slot: tokio::sync::Semaphore::new(1),
        graphql: graphql::schema(),
        engine_config: cfg.engine_config.clone(),
        mode: cfg.mode.name(),
        trust_forwarded_for: cfg.net.trust_forwarded_for,
        metrics_elsewhere: cfg.net.metrics_listen.is_some(),
        limits: limits::TenantLimits::default(),
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = vec![];
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match cfg.net.metrics_listen {
        Some(listen) => {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("the metrics listener: listen on {listen}"))?;
            let addr = l.local_addr()?;
            tasks.push(tokio::spawn(serve_until(l, routes::metrics_router(app.clone()), cfg.net.clone(), rx.clone())));
            Some(addr)
        }
        None => None,
    };
    let backend_net = NetConfig::for_backend(&cfg.net);
    if cfg.api {
        // Change notices for the read cache and the router: subscribed before the first request
        // is served and before the router is loaded from storage (a change in between arrives
        // again as a notice).
        let mut sub = app.bus.subscribe("hcp.>", hcp_bus::From::New).await.context("subscribe to change notices")?;
        app.reads.set_live(true);
        app.router.lock().unwrap_or_else(|e| e.into_inner()).serve_fleet = app.sim.is_some();
        load_router(&app).await.context("load the router's tenants and capacity")?;
        if let Some(p) = app.store.plans(&hcp_store::Page { after: None, limit: Some(1) }).await?.first() {
            app.live.seed_plan(serde_json::from_str(&p.body).unwrap_or_default());
        }
        {
            let mut r = app.router.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in cfg.backends.iter().enumerate() {
                let row = hcp_store::ReplicaRow {
                    id: i64::from(gateway::BACKEND_ID_BASE) + i as i64,
                    site_id: b.site.clone(),
                    gpus: i64::from(b.gpus),
                    slots: i64::from(b.slots),
                    kv_tokens: i64::try_from(b.kv_tokens).unwrap_or(i64::MAX),
                    cap_w: 0.0,
                    updated_ms: wall_ms(),
                };
                r.add_backend(row, &b.model, wall_ms()).map_err(|e| anyhow::anyhow!("backend {}: {e}", b.url))?;
            }
        }
        if let (Some(sim), Some(listen)) = (&app.sim, cfg.sim_backend_listen) {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("the simulated backend: listen on {listen}"))?;
            let addr = l.local_addr()?;
            *app.gateway.sim_base.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("http://{addr}"));
            tasks.push(tokio::spawn(serve_until(l, simbackend::router(sim.clone()), backend_net, rx.clone())));
        }
        tasks.push(tokio::spawn(gateway::health_loop(app.clone(), rx.clone())));
        tasks.push(tokio::spawn(gateway::tick_loop(app.clone(), rx.clone())));
        tasks.push(tokio::spawn(billing::resume_loop(app.clone(), rx.clone())));
        tasks.push(tokio::spawn(limits::sync_loop(app.clone(), rx.clone())));
        let (a, mut stop) = (app.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                    m = sub.next() => match m {
                        Ok(m) => {
                            a.reads.note(&m.subject);
                            if m.subject == ui::SESSION_ENDED {
                                a.gate.forget(&routes::session_cache_key(&String::from_utf8_lossy(&m.payload)));
                            }
                            if let Err(e) = a.live.note(&m.subject, &m.payload) {
                                tracing::warn!(subject = %m.subject, error = %e, "notice not kept for the dashboard");
                            }
                            if let Err(e) = routing_notice(&a, &m.subject, &m.payload) {
                                tracing::warn!(subject = %m.subject, error = %e, "notice not applied to the router");
                            }
                        }
                        Err(e) => {
                            a.reads.set_live(false);
                            tracing::warn!(error = %e, "change notices lost: reads go to storage until resubscribed");
                            // Retry once a second until it works or the process stops.
                            let resubscribed = loop {
                                if *stop.borrow() {
                                    break None;
                                }
                                match a.bus.subscribe("hcp.>", hcp_bus::From::New).await {
                                    Ok(s) => break Some(s),
                                    Err(_) => {
                                        let gone = tokio::select! {
                                            r = stop.changed() => r.is_err(),
                                            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
                                        };
                                        if gone {
                                            break None;
                                        }
                                    }
                                }
                            };
                            let Some(s) = resubscribed else { break };
                            sub = s;
                            a.reads.set_live(true);
                            if let Err(e) = load_router(&a).await {
                                tracing::warn!(error = %e, "router not reloaded from storage");
                            }
                        }
                    },
                }
            }
            Ok(())
        }));
        tasks.push(tokio::spawn(serve_until(listener, routes::router(app.clone()), cfg.net.clone(), rx.clone())));
    } else {
        // A dispatcher-only process still answers health and metrics.
        let router = routes::ops_router().with_state(app.clone());
        tasks.push(tokio::spawn(serve_until(listener, router, cfg.net.clone(), rx.clone())));
    }
    if cfg.engine {
        tasks.push(tokio::spawn(engine::run(
            app.clone(),
            cfg.seed,
            cfg.speed,
            cfg.engine_config.clone(),
            cfg.mode.clone(),
            rx.clone(),
        )));
    }
    Ok(Running { addr, metrics_addr, app, shutdown: tx, tasks })
}
