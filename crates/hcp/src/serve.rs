//! `hcp up`, `hcp serve`, `hcp migrate`, `hcp health`: the platform process and its helpers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hcp_server::Config;

use crate::cli::{GatewayArgs, REFERENCE_FLEET, SMALL_FLEET, load_fleet};

/// Which parts of the platform a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// REST API (and, later, the gateway and dashboard).
    Api,
    /// The engine: signals, dispatcher, simulated sites.
    Dispatcher,
    /// Both (what `hcp up` runs).
    All,
}

/// JSON logs to stderr (filter: `HCP_LOG`, default info) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set, traces over OTLP/HTTP (protobuf) to `<endpoint>/v1/traces`. Returns the tracer provider
/// to flush at shutdown.
fn logging() -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HCP_LOG").unwrap_or_else(|_| "info".into());
    let json = tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        let _ = tracing_subscriber::registry().with(filter).with(json).try_init();
        return Ok(None);
    };
    if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
        bail!("OTEL_EXPORTER_OTLP_ENDPOINT: must start with http:// or https://, got {endpoint:?}");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .context("OTLP exporter")?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("hcp").build())
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("hcp"));
    let _ = tracing_subscriber::registry().with(filter).with(json).with(otel).try_init();
    Ok(Some(provider))
}

fn secret_env(name: &str) -> Option<String> {
    // From the variable, or from the file `NAME_FILE` points at (container secrets).
    std::env::var(name).ok().filter(|v| !v.is_empty()).or_else(|| {
        let f = std::env::var(format!("{name}_FILE")).ok()?;
        std::fs::read_to_string(f).ok().map(|s| s.trim().to_string())
    })
}

/// HCP_ACCOUNT_RATE_PER_S: requests per second per operator account (default 1000).
fn account_rate() -> Result<f64> {
    match std::env::var("HCP_ACCOUNT_RATE_PER_S") {
        Err(_) => Ok(hcp_server::auth::ACCOUNT_RATE_PER_S),
        Ok(v) => match v.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
            _ => bail!("HCP_ACCOUNT_RATE_PER_S: must be a number > 0, got {v:?}"),
        },
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the async runtime")
}

async fn until_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn serve_with(
    fleet: Option<&Path>,
    store_url: String,
    bus_url: Option<String>,
    listen: SocketAddr,
    role: Role,
    seed: u64,
    speed: f64,
    gateway: GatewayArgs,
    print_credentials: bool,
    engine_config: hcp_engine::EngineConfig,
    mode: hcp_server::Mode,
) -> Result<ExitCode> {
    let traces = logging()?;
    if !(speed.is_finite() && speed > 0.0 && speed <= 1e6) {
        bail!("--speed: must be > 0 and <= 1000000 simulated seconds per second");
    }
    let fleet = load_fleet(fleet, SMALL_FLEET)?;
    let cfg = Config {
        listen,
        store_url,
        bus_url,
        fleet,
        engine: role != Role::Api,
        api: role != Role::Dispatcher,
        seed,
        speed,
        engine_config,
        mode,
        admin_token: secret_env("HCP_ADMIN_TOKEN"),
        demo_tenant_key: secret_env("HCP_DEMO_TENANT_KEY"),
        account_rate_per_s: account_rate()?,
        sim_backend_listen: (!gateway.no_sim_backend).then_some(gateway.sim_backend_listen),
        sim_backend_http2: gateway.sim_backend_protocol == crate::cli::Protocol::Http2,
        net: gateway.net.config(),
        backends: gateway.backends,
        backtest_fleets: vec![load_fleet(None, SMALL_FLEET)?, load_fleet(None, REFERENCE_FLEET)?],
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let (store, boot) = hcp_server::prepare(&cfg).await?;
        let running = hcp_server::start(cfg.clone(), store).await?;
        println!("hcp: listening on http://{}", running.addr);
        println!("hcp: OpenAI-compatible API at http://{}/v1", running.addr);
        if let Some(m) = running.metrics_addr {
            println!("hcp: metrics at http://{m}/metrics (no credentials: keep this address internal)");
        }
        if cfg.api {
            println!("hcp: dashboard and customer portal at http://{}/", running.addr);
        }
        if let Some(b) = running.app.gateway.sim_base.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            println!("hcp: simulated GPU backend at {b}/r/<replica>/v1");
        }
        println!(
            "hcp: fleet {} ({} sites, {} devices); store {}; bus {}",
            cfg.fleet.name,
            cfg.fleet.sites.len(),
            cfg.fleet.devices.len(),
            redact(&cfg.store_url),
            cfg.bus_url.as_deref().unwrap_or("inproc")
        );
        if print_credentials {
            if let Some(t) = &boot.admin_token {
                println!("hcp: first start: admin token (shown once): {t}");
            }
            if let Some(k) = &boot.demo_tenant_key {
                println!("hcp: first start: demo tenant key (shown once): {k}");
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        until_signal().await;
        println!("hcp: stopping");
        running.stop().await?;
        println!("hcp: stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    if let Some(p) = traces {
        // Sends what the batch holds; an unreachable collector costs at most its timeout.
        let _ = p.shutdown();
    }
    Ok(ExitCode::SUCCESS)
}

/// A URL with its password, if any, hidden.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => {
            let creds = &url[s + 3..a];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[a..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn up(
    fleet: Option<&Path>,
    data_dir: &Path,
    listen: SocketAddr,
    seed: u64,
    speed: f64,
    gateway: GatewayArgs,
    engine: hcp_engine::EngineConfig,
    mode: hcp_server::Mode,
) -> Result<ExitCode> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create data directory {}", data_dir.display()))?;
    serve_with(
        fleet,
        Config::data_dir_store(data_dir),
        None,
        listen,
        Role::All,
        seed,
        speed,
        gateway,
        true,
        engine,
        mode,
    )
}

#[allow(clippy::too_many_arguments)]
pub fn serve(
    fleet: Option<&Path>,
    role: Role,
    store: &str,
    bus: Option<&str>,
    listen: SocketAddr,
    seed: u64,
    speed: f64,
    gateway: GatewayArgs,
    engine: hcp_engine::EngineConfig,
    mode: hcp_server::Mode,
) -> Result<ExitCode> {
    serve_with(
        fleet,
        store.to_string(),
        bus.map(str::to_string),
        listen,
        role,
        seed,
        speed,
        gateway,
        true,
        engine,
        mode,
    )
}

pub fn migrate(store: Option<&str>, data_dir: &Path) -> Result<ExitCode> {
    let url = match store {
        Some(s) => s.to_string(),
        None => {
            std::fs::create_dir_all(data_dir)?;
            Config::data_dir_store(data_dir)
        }
    };
    runtime()?.block_on(async {
        let s = hcp_store::Store::open(&url).await?;
        let v = s.migrate().await?;
        println!("hcp: {} migrated to schema version {v}", redact(&url));
        s.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Creates or resets the admin account `name` in the store (of `data_dir`, or `store`) and prints
/// its new token once. Needs the storage itself (the SQLite file, or the database's credentials):
/// the recovery when no admin token is known. Audited as `account.reset` by `local`.
pub fn admin_reset(store: Option<&str>, data_dir: &Path, name: &str) -> Result<ExitCode> {
    if !hcp_server::auth::valid_name(name) {
        anyhow::bail!("--name: 1 to 64 lowercase letters, digits or -");
    }
    let url = match store {
        Some(s) => s.to_string(),
        None => {
            if !data_dir.exists() {
                anyhow::bail!("--data-dir {}: no such directory (no platform has run there)", data_dir.display());
            }
            Config::data_dir_store(data_dir)
        }
    };
    runtime()?.block_on(async {
        let s = hcp_store::Store::open(&url).await?;
        s.migrate().await?;
        let secret = hcp_server::auth::secret();
        let now = hcp_server::wall_ms();
        s.put_account(&hcp_store::AccountRow {
            name: name.to_string(),
            role: "admin".into(),
            secret_hash: hcp_server::auth::hash_secret(&secret),
            created_ms: now,
        })
        .await?;
        s.audit(now, "local", "account.reset", name, None, Some(&format!(r#"{{"name":"{name}","role":"admin"}}"#)))
            .await?;
        s.close().await;
        println!("hcp: admin account {name} reset in {}; its token (shown once):", redact(&url));
        println!("hcpa_{name}_{secret}");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Asks a running platform whether it is up and ready; exit 0 when ready, 1 otherwise.
pub fn health(url: &str) -> Result<ExitCode> {
    let base = url.trim_end_matches('/').to_string();
    runtime()?.block_on(async move {
        let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build()?;
        let up = client.get(format!("{base}/healthz")).send().await.with_context(|| format!("reach {base}"))?;
        if !up.status().is_success() {
            println!("{base}/healthz: {}", up.status());
            return Ok(ExitCode::from(1));
        }
        let r = client.get(format!("{base}/readyz")).send().await?;
        let ok = r.status().is_success();
        println!("{}", r.text().await?);
        Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}
