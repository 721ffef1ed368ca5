//! Command-line interface. Every command has `--help`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hcp_harness::{Baseline, BaselineMode, DemandSource, GridSource, Harness, MarketSource, Scenario};
use hcp_model::fleet::Fleet;
use hcp_model::time::{MS_PER_DAY, SimTime, parse_duration_ms};
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::Fidelity;
use hcp_sim::market::MarketParams;
use hcp_sim::replay;

use crate::report;

/// The default fleet, built in so that `hcp up` works from any directory.
pub const SMALL_FLEET: (&str, &str) =
    ("examples/fleets/small.toml", include_str!("../../../examples/fleets/small.toml"));
pub const REFERENCE_FLEET: (&str, &str) =
    ("examples/fleets/reference.toml", include_str!("../../../examples/fleets/reference.toml"));

#[derive(Parser)]
#[command(
    name = "hcp",
    version,
    about = "HCP, the Hybrid Compute Platform: power split between Bitcoin ASICs, AI GPUs and curtailment"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The control core's tunables (docs/engine-config.md): defaults, then the file, then each --engine-set.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// TOML file of engine settings (docs/engine-config.md lists every field, unit and default).
    #[arg(long)]
    pub engine_config: Option<PathBuf>,
    /// One engine setting, NAME=VALUE, applied after the file (repeatable).
    #[arg(long = "engine-set", value_name = "NAME=VALUE")]
    pub engine_set: Vec<String>,
    /// Live mode: signals from the feeds of --feeds (and manual values set through the API) on
    /// the wall clock, instead of the simulated world (docs/feeds.md).
    #[arg(long)]
    pub live: bool,
    /// TOML file of live mode's feeds: ERCOT, a BTC market API, CSV replay, a GPU contract price.
    #[arg(long, requires = "live")]
    pub feeds: Option<PathBuf>,
    /// Rehearse live mode from this market time (2024-06-01T10:00) on an accelerated clock
    /// (--speed), against feeds that answer for that period (recorded responses, CSV replay).
    #[arg(long, requires = "live")]
    pub rehearse_from: Option<String>,
}

impl EngineArgs {
    /// Resolves the engine's configuration once; a bad file or setting names the field.
    pub fn resolve(&self) -> anyhow::Result<hcp_engine::EngineConfig> {
        let mut cfg = match &self.engine_config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--engine-config {}: {e}", p.display()))?;
                hcp_engine::EngineConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
            None => hcp_engine::EngineConfig::default(),
        };
        for kv in &self.engine_set {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--engine-set {kv:?}: expected NAME=VALUE"))?;
            cfg.set(k.trim(), v.trim()).map_err(|e| anyhow::anyhow!("--engine-set: {e}"))?;
        }
        Ok(cfg)
    }

    /// Demo or live mode; a feeds file that does not parse names the field.
    pub fn resolve_mode(&self) -> anyhow::Result<hcp_server::Mode> {
        if !self.live {
            return Ok(hcp_server::Mode::Demo);
        }
        let feeds = match &self.feeds {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--feeds {}: {e}", p.display()))?;
                let feeds =
                    hcp_feeds::FeedsConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                feeds.check().map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                feeds
            }
            None => hcp_feeds::FeedsConfig::default(),
        };
        if feeds.is_empty() {
            tracing::warn!("live mode with no feed: only manual values set through the API will drive the engine");
        }
        let rehearse_from = self
            .rehearse_from
            .as_deref()
            .map(|s| hcp_model::SimTime::parse(s).map_err(|e| anyhow::anyhow!("--rehearse-from: {e}")))
            .transpose()?;
        Ok(hcp_server::Mode::Live { feeds: Box::new(feeds), rehearse_from })
    }
}

/// The inference gateway's backends.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// Where the simulated GPU backend (OpenAI API per replica, /r/{replica}/v1) listens.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub sim_backend_listen: std::net::SocketAddr,
    /// Do not start the simulated backend (route only to --backend servers).
    #[arg(long)]
    pub no_sim_backend: bool,
    /// How the gateway calls the simulated backend.
    #[arg(long, value_enum, default_value = "http2")]
    pub sim_backend_protocol: Protocol,
    /// A real OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp):
    /// url=http://HOST:PORT/v1,model=NAME[,slots=N][,kv_tokens=N][,gpus=N][,site=ID][,http2=true]
    /// (http2: it speaks HTTP/2 without TLS; all streams to it share one connection). Repeatable.
    #[arg(long = "backend", value_parser = hcp_server::gateway::BackendConfig::parse)]
    pub backends: Vec<hcp_server::gateway::BackendConfig>,
    #[command(flatten)]
    pub net: NetArgs,
}

/// How the platform's servers treat connections and where metrics are served.
#[derive(clap::Args, Clone, Debug)]
pub struct NetArgs {
    /// Seconds a client may take to send a request's headers (and an HTTP/1 connection may wait
    /// idle between requests).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_s: u64,
    /// Seconds a connection with no request in flight and no traffic stays open.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_s: u64,
    /// Connections open at once per listener.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Connections open at once from one client address (behind a proxy, every connection comes
    /// from the proxy: raise this to --max-connections there).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections_per_addr: u64,
    /// Serve /metrics on this address without credentials (bind it where only the scraper
    /// reaches); the main port's /metrics then answers 404. Without it, /metrics on the main
    /// port needs an operator account's token (any role: make a viewer account for the scraper).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Behind a proxy that writes X-Forwarded-For: take the client's address (which failed
    /// logins are counted against) from its last entry. Never set it without such a proxy.
    #[arg(long)]
    pub trust_forwarded_for: bool,
}

impl NetArgs {
    pub fn config(&self) -> hcp_server::NetConfig {
        hcp_server::NetConfig {
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
            max_connections: self.max_connections as usize,
            max_connections_per_addr: self.max_connections_per_addr as usize,
            metrics_listen: self.metrics_listen,
            trust_forwarded_for: self.trust_forwarded_for,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform, all in one process: embedded storage (SQLite in --data-dir), in-process
    /// event bus, simulated sites driven by the dispatcher, REST API, health and metrics on one port.
    /// On first start it creates an admin account and a demo tenant and prints their credentials
    /// (HCP_ADMIN_TOKEN and HCP_DEMO_TENANT_KEY, when set, are used instead). Stops on SIGINT/SIGTERM.
    Up {
        /// Fleet file (default: the built-in examples/fleets/small.toml).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Where the SQLite database lives.
        #[arg(long, default_value = "hcp-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per wall-clock second (900: one 15-minute interval per second).
        #[arg(long, default_value_t = 900.0)]
        speed: f64,
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Run one role of the scaled-out platform against shared storage and bus.
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: crate::serve::Role,
        /// sqlite:PATH or postgres://USER@HOST/DB.
        #[arg(long)]
        store: String,
        /// nats://HOST:PORT (default: in-process, only for a single process).
        #[arg(long)]
        bus: Option<String>,
        #[arg(long)]
        fleet: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 900.0)]
        speed: f64,
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Apply storage migrations (the store of --data-dir, or --store URL) and exit.
    Migrate {
        #[arg(long)]
        store: Option<String>,
        #[arg(long, default_value = "hcp-data")]
        data_dir: PathBuf,
    },
    /// Recovery with local access to the storage: create or reset an admin account and print its
    /// new token (once). For when no admin token is known any more; the platform may be running.
    AdminReset {
        #[arg(long)]
        store: Option<String>,
        #[arg(long, default_value = "hcp-data")]
        data_dir: PathBuf,
        /// The account to make admin (created if it does not exist).
        #[arg(long, default_value = "admin")]
        name: String,
    },
    /// Ask a running platform whether it is up and ready (exit 0 when ready).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Simulate a fleet over a period and write one CSV row per site and interval.
    Sim(SimArgs),
    /// Replay a recorded inference trace through the router, split across tenants, with part of
    /// the capacity removed partway (curtailment); per-band queue times and fairness.
    Replay {
        /// Inference trace (CSV: TIMESTAMP,ContextTokens,GeneratedTokens).
        #[arg(long)]
        trace: PathBuf,
        /// Tenants the trace is split across (weights 1-4, bands by tenant).
        #[arg(long, default_value_t = 12)]
        tenants: u32,
        /// Capacity cut as FRACTION@TIME, e.g. 0.3@20m.
        #[arg(long, default_value = "0.3@20m")]
        shrink: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the dispatcher and the baselines over a recorded period and compare what they earn.
    Backtest(crate::backtest_cmd::BacktestArgs),
    /// Load-test a gateway: a mix of streaming and non-streaming chat requests at an even rate,
    /// then a check that the platform's usage records match what was served, exactly.
    Loadtest(crate::loadtest::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Usage records into SQLite through the metering writer, each durable before its writer
    /// goes on; then a count of what was stored.
    Metering {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        /// Concurrent writers (requests finishing at once).
        #[arg(long, default_value_t = 2_000)]
        writers: usize,
    },
    /// Wrong tokens against a platform (from one address, then from many with fresh names)
    /// while a client sends good requests: their latency, the Argon2 checks run, CPU and memory.
    Auth {
        #[arg(long)]
        json: bool,
        /// Concurrent attackers, each sending wrong tokens as fast as they are answered.
        #[arg(long, default_value_t = 64)]
        attackers: usize,
        /// Measured seconds per phase.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Gateway overhead: streams straight to the simulated backend, then through the gateway (and
    /// through LiteLLM's proxy when --litellm names its binary), closed loop, same run.
    Gateway {
        #[arg(long)]
        json: bool,
        /// Concurrent streams, one measurement per value (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 50])]
        streams: Vec<usize>,
        /// Measured seconds per front (after 2 s of warm-up).
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Output tokens per request.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// LiteLLM's proxy binary (`pip install 'litellm[proxy]'`), to measure it side by side
        /// (one worker per core it is given, no per-request logging).
        #[arg(long)]
        litellm: Option<String>,
        /// The p99 time to first token at which each front's requests/s per core are compared.
        #[arg(long, default_value_t = 250.0)]
        p99_ttft_ms: f64,
        /// The platform (and LiteLLM in its turn) on half of the cores, the clients and the
        /// simulated backend on the other half: the gateway measured on cores of its own.
        #[arg(long)]
        split_cores: bool,
        /// How the gateway calls the simulated backend (HTTP/1.1: as vLLM, SGLang or TGI are
        /// called).
        #[arg(long, value_enum, default_value = "http1")]
        backend_protocol: Protocol,
    },
    /// Simulator throughput: one hour of the reference fleet per device at 10 s steps, and one
    /// year per cohort at 15-minute steps.
    Sim {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fleet file (default: the built-in reference fleet).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Simulated hours for the per-device run.
        #[arg(long, default_value_t = 1.0)]
        device_hours: f64,
        /// Simulated days for the per-cohort run.
        #[arg(long, default_value_t = 365)]
        cohort_days: u32,
    },
    /// Router placements per second (10,000 tenants, 3 bands, 1,000 replicas; admission answers
    /// counted apart) and capacity-shrink preemption, over repeated runs.
    Router {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Placements (requests dispatched to a replica) to time per run.
        #[arg(long, default_value_t = 1_000_000)]
        placements: u64,
        /// Runs, each on a fresh router; the report gives min/median/max over them.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Switching: from a price signal to the first command batch leaving for the devices (plan,
    /// intents, reconcile), reference fleet, every other event flipping the whole fleet.
    Switching {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fleet file (default: the built-in reference fleet).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Price events to time.
        #[arg(long, default_value_t = 200)]
        events: usize,
        /// From the signal to every command of the plan acknowledged by the site agents, through
        /// the store, the bus and the agent link (grid events on the running fleet).
        #[arg(long)]
        end_to_end: bool,
        /// With --end-to-end: the store's URL (default: a fresh SQLite file; `postgres://...`).
        #[arg(long, requires = "end_to_end")]
        store: Option<String>,
        /// With --end-to-end: the bus's URL (default: in-process; `nats://HOST:PORT`).
        #[arg(long, requires = "end_to_end")]
        bus: Option<String>,
        /// With --end-to-end: commands one instant may send (default: every device, the whole plan
        /// at once).
        #[arg(long, requires = "end_to_end")]
        batch_max: Option<usize>,
    },
    /// Telemetry ingestion: every device of the reference fleet reporting every 10 s, through the
    /// resource manager and dispatcher, rolled up per device-minute and stored.
    Telemetry {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fleet file (default: the built-in reference fleet).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Simulated minutes of reports.
        #[arg(long, default_value_t = 3)]
        minutes: u32,
        /// Store URL for the rollups (default: a fresh SQLite file).
        #[arg(long)]
        store: Option<String>,
    },
    /// Fast-path dispatcher latency: whole reference fleet and one site, per price event.
    Dispatch {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fleet file (default: the built-in reference fleet).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Price events to time per run.
        #[arg(long, default_value_t = 400)]
        events: usize,
        /// Runs, each with a fresh dispatcher; the report gives min/median/max over them.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// How the gateway calls the simulated backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1, a connection per stream in flight: each token is a write and a read of its own.
    Http1,
    /// HTTP/2 without TLS, every stream on one connection: one write and one read carry the
    /// tokens of many streams (less CPU per request under load; at light load a stream's first
    /// token passes two more tasks).
    Http2,
}

#[derive(Clone, Copy, ValueEnum)]
enum FidelityArg {
    Device,
    Cohort,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Everything that fits under the caps runs.
    AlwaysOn,
    /// ASIC models sleep while the last price plus adder is above their breakeven.
    Breakeven,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Fleet file (TOML).
    #[arg(long)]
    fleet: PathBuf,
    /// Recorded real-time prices (CSV, the layout of shared/data/ercot). Default: simulated.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Recorded market series (CSV: timestamp,btc_usd,difficulty[,fees_btc_per_block] or
    /// timestamp,hashprice_usd_per_ph_day). Default: simulated.
    #[arg(long)]
    market: Option<PathBuf>,
    /// Recorded inference trace (CSV: TIMESTAMP,ContextTokens,GeneratedTokens). Default: simulated.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// First day (YYYY-MM-DD or a date-time). Default: start of --prices, else 2025-06-01.
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive). Default: end of --prices, else 7 days after --from.
    #[arg(long)]
    to: Option<String>,
    /// Interval of decisions and output rows: 15m or 5m (or any whole minutes).
    #[arg(long, default_value = "15m")]
    step: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = FidelityArg::Cohort)]
    fidelity: FidelityArg,
    #[arg(long, value_enum, default_value_t = PolicyArg::Breakeven)]
    policy: PolicyArg,
    /// Fixed charges added to the energy price (USD/MWh).
    #[arg(long, default_value_t = 0.0)]
    adder_usd_per_mwh: f64,
    /// Output CSV.
    #[arg(long)]
    out: PathBuf,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up { fleet, data_dir, listen, seed, speed, gateway, engine } => engine
            .resolve()
            .and_then(|e| Ok((e, engine.resolve_mode()?)))
            .and_then(|(e, mode)| crate::serve::up(fleet.as_deref(), &data_dir, listen, seed, speed, gateway, e, mode)),
        Command::Serve { role, store, bus, fleet, listen, seed, speed, gateway, engine } => {
            engine.resolve().and_then(|e| Ok((e, engine.resolve_mode()?))).and_then(|(e, mode)| {
                crate::serve::serve(
                    fleet.as_deref(),
                    role,
                    &store,
                    bus.as_deref(),
                    listen,
                    seed,
                    speed,
                    gateway,
                    e,
                    mode,
                )
            })
        }
        Command::Migrate { store, data_dir } => crate::serve::migrate(store.as_deref(), &data_dir),
        Command::AdminReset { store, data_dir, name } => crate::serve::admin_reset(store.as_deref(), &data_dir, &name),
        Command::Health { url } => crate::serve::health(&url),
        Command::Sim(a) => sim(&a),
        Command::Backtest(a) => crate::backtest_cmd::run(&a),
        Command::Replay { trace, tenants, shrink, json } => replay(&trace, tenants, &shrink, json),
        Command::Loadtest(a) => crate::loadtest::run(a),
        Command::Bench { what: BenchWhat::Sim { json, fleet, device_hours, cohort_days } } => {
            crate::bench::sim(json, fleet.as_deref(), device_hours, cohort_days)
        }
        Command::Bench { what: BenchWhat::Router { json, placements, runs } } => {
            crate::bench::router(json, placements, runs)
        }
        Command::Bench { what: BenchWhat::Auth { json, attackers, seconds } } => {
            crate::bench_auth::auth(json, attackers, seconds)
        }
        Command::Bench { what: BenchWhat::Metering { json, events, writers } } => {
            crate::bench_gateway::metering(json, events, writers)
        }
        Command::Bench {
            what:
                BenchWhat::Gateway {
                    json,
                    streams,
                    seconds,
                    max_tokens,
                    litellm,
                    split_cores,
                    backend_protocol,
                    p99_ttft_ms,
                },
        } => {
            let backend_http2 = backend_protocol == Protocol::Http2;
            let arms = crate::bench_gateway::Arms { litellm, split_cores, backend_http2, p99_ttft_ms };
            crate::bench_gateway::gateway(json, &streams, seconds, max_tokens, arms)
        }
        Command::Bench { what: BenchWhat::Switching { json, fleet, events, end_to_end, store, bus, batch_max } } => {
            if end_to_end {
                let link = crate::bench_e2e::Link { store: store.as_deref(), bus: bus.as_deref(), batch_max };
                crate::bench_e2e::end_to_end(json, fleet.as_deref(), events, link)
            } else {
                crate::bench_plane::switching(json, fleet.as_deref(), events)
            }
        }
        Command::Bench { what: BenchWhat::Telemetry { json, fleet, minutes, store } } => {
            crate::bench_plane::telemetry(json, fleet.as_deref(), minutes, store.as_deref())
        }
        Command::Bench { what: BenchWhat::Dispatch { json, fleet, events, runs } } => {
            crate::bench::dispatch(json, fleet.as_deref(), events, runs)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub fn load_fleet(path: Option<&Path>, default: (&str, &str)) -> Result<Fleet> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("read fleet file {}", p.display()))?,
        ),
        None => (default.0.to_string(), default.1.to_string()),
    };
    Ok(Fleet::from_toml(&name, &text)?)
}

fn open(path: &Path, what: &str) -> Result<File> {
    File::open(path).with_context(|| format!("open {what} {}", path.display()))
}

fn parse_time(s: &str, flag: &str) -> Result<SimTime> {
    SimTime::parse(s).with_context(|| format!("--{flag}"))
}

fn replay(trace: &Path, tenants: u32, shrink: &str, json: bool) -> Result<ExitCode> {
    let requests = replay::load_trace_csv(&trace.display().to_string(), open(trace, "trace")?)?;
    let (fraction, at) = shrink
        .split_once('@')
        .ok_or_else(|| anyhow::anyhow!("--shrink: expected FRACTION@TIME like 0.3@20m, got {shrink:?}"))?;
    let fraction: f64 = fraction.parse().map_err(|_| anyhow::anyhow!("--shrink: {fraction:?} is not a number"))?;
    let at_ms = parse_duration_ms(at).context("--shrink")?;
    let spec = hcp_harness::replay::ReplaySpec {
        tenants,
        shrink_fraction: fraction,
        shrink_at_ms: at_ms,
        ..Default::default()
    };
    let r = hcp_harness::replay::replay(&requests, &spec).map_err(|e| anyhow::anyhow!("--tenants/--shrink: {e}"))?;
    let bands: Vec<serde_json::Value> = r
        .bands
        .iter()
        .map(|b| {
            serde_json::json!({
                "band": b.band,
                "requests": b.requests,
                "queue_ms_p50_before": b.queue_ms_p50_before,
                "queue_ms_p99_before": b.queue_ms_p99_before,
                "queue_ms_p50_after": b.queue_ms_p50_after,
                "queue_ms_p99_after": b.queue_ms_p99_after,
                "ttft_ms_p50_before": b.ttft_ms_p50_before,
                "ttft_ms_p99_before": b.ttft_ms_p99_before,
                "ttft_ms_p50_after": b.ttft_ms_p50_after,
                "ttft_ms_p99_after": b.ttft_ms_p99_after,
                "output_tokens_per_s": b.output_tokens_per_s,
                "preempted": b.preempted,
                "preempted_shrink": b.preempted_shrink,
                "preempted_reclaim": b.preempted_reclaim,
                "rejected": b.rejected,
                "fairness_before": b.fairness_before,
                "fairness_after": b.fairness_after,
            })
        })
        .collect();
    let obj = serde_json::json!({
        "requests": r.requests,
        "trace_copies": r.copies,
        "completed": r.completed,
        "tenants": tenants,
        "replicas_before": r.replicas_before,
        "replicas_after": r.replicas_after,
        "shrink_at_ms": at_ms,
        "bands": bands,
        "tenants": r.tenants.iter().map(|t| serde_json::json!({
            "tenant": t.tenant,
            "weight": t.weight,
            "band": t.band,
            "dispatched": t.dispatched,
            "queue_ms_mean": t.queue_ms_mean,
            "ttft_ms_mean": t.ttft_ms_mean,
            "output_tokens_per_s": t.output_tokens_per_s,
            "preempted": t.preempted,
            "share_vs_entitlement_before": t.share_vs_entitlement_before,
            "share_vs_entitlement_after": t.share_vs_entitlement_after,
        })).collect::<Vec<_>>(),
    });
    crate::measure::print_report(&obj, json)
}

fn run_and_report(h: &mut Harness, fleet: &Fleet, mode: BaselineMode, out: Option<&Path>) -> Result<ExitCode> {
    let mut writer = match out {
        Some(p) => {
            let w = csv::Writer::from_path(p).with_context(|| format!("create {}", p.display()))?;
            Some(report::RowWriter::new(w)?)
        }
        None => None,
    };
    let bar = indicatif::ProgressBar::new(h.intervals());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} intervals {eta}").expect("valid template"),
    );
    let mut write_err: Option<anyhow::Error> = None;
    let started = std::time::Instant::now();
    let result = h.run(
        &mut Baseline { mode },
        &mut |row| {
            if let (Some(w), None) = (writer.as_mut(), write_err.as_ref())
                && let Err(e) = w.write(row)
            {
                write_err = Some(e);
            }
        },
        &mut |done, _| bar.set_position(done),
    );
    bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e.context("write output CSV"));
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    match result {
        Ok(summary) => {
            print!("{}", report::summary(&summary, fleet, started.elapsed().as_secs_f64()));
            if let Some(p) = out {
                println!("rows written to {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(v) => Ok(violation_exit(&v)),
    }
}

/// A broken invariant: say what and where, and the seed that replays it; exit status 2.
pub fn violation_exit(v: &hcp_harness::Violation) -> ExitCode {
    eprintln!("{v}");
    eprintln!("seed={}", v.seed);
    ExitCode::from(2)
}

fn sim(a: &SimArgs) -> Result<ExitCode> {
    let fleet = load_fleet(Some(&a.fleet), SMALL_FLEET)?;
    let interval_ms = parse_duration_ms(&a.step).context("--step")?;
    let grid = match &a.prices {
        Some(p) => GridSource::Recorded(replay::load_grid_csv(&p.display().to_string(), open(p, "prices")?)?),
        None => GridSource::Simulated(Box::default()),
    };
    let (rec_from, rec_to) = match &grid {
        GridSource::Recorded(m) => {
            let from = m.values().map(|s| s.start()).max().expect("non-empty");
            let to = m.values().map(|s| s.end()).min().expect("non-empty");
            (Some(from), Some(to))
        }
        GridSource::Simulated(_) => (None, None),
    };
    let from = match &a.from {
        Some(s) => parse_time(s, "from")?,
        None => rec_from.unwrap_or(SimTime::parse("2025-06-01").expect("valid")),
    };
    let to = match &a.to {
        Some(s) => parse_time(s, "to")?,
        None => rec_to.unwrap_or(from.plus_ms(7 * MS_PER_DAY)),
    };
    let market = match &a.market {
        Some(p) => {
            MarketSource::Recorded(replay::load_market_csv(&p.display().to_string(), open(p, "market series")?)?)
        }
        None => MarketSource::Simulated(MarketParams::default()),
    };
    let demand = match &a.trace {
        Some(p) => DemandSource::Trace(replay::load_trace_csv(&p.display().to_string(), open(p, "trace")?)?),
        None => DemandSource::Simulated(DemandParams::default()),
    };
    let scenario = Scenario {
        from,
        to,
        interval_ms,
        fidelity: match a.fidelity {
            FidelityArg::Device => Fidelity::Device,
            FidelityArg::Cohort => Fidelity::Cohort,
        },
        seed: a.seed,
        energy_adder_usd_per_mwh: a.adder_usd_per_mwh,
    };
    let mut h = Harness::new(&fleet, scenario, grid, market, demand)?;
    let mode = match a.policy {
        PolicyArg::AlwaysOn => BaselineMode::AlwaysOn,
        PolicyArg::Breakeven => BaselineMode::Breakeven,
    };
    run_and_report(&mut h, &fleet, mode, Some(&a.out))
}
