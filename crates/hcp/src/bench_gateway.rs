//! `hcp bench metering` and `hcp bench gateway`.
//!
//! Metering: usage records through the platform's metering writer into a fresh SQLite file, as
//! many concurrent requests would write them (each waiting for its record to be durable), then a
//! count of what storage holds.
//!
//! Gateway: a platform in this process (small fleet, SQLite in a temporary directory, the
//! simulated backend), closed-loop clients keeping C streams open, first straight to the
//! simulated backend's replicas (round robin), then through the gateway, then (when a LiteLLM
//! binary is given) through a LiteLLM proxy in front of the same replicas. Same requests, same
//! backend, same run: the differences are each front's overhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hcp-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

pub fn metering(json_out: bool, events: u64, writers: usize) -> Result<std::process::ExitCode> {
    if events == 0 || writers == 0 {
        bail!("--events and --writers: must be >= 1");
    }
    let machine = crate::measure::Machine::start();
    let dir = tmpdir("metering");
    let out = crate::serve::runtime()?.block_on(async {
        let store = hcp_store::Store::open(&format!("sqlite:{}", dir.join("m.db").display())).await?;
        store.migrate().await?;
        let meter = hcp_server::metering::Meter::start(store.clone());
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = vec![];
        for w in 0..writers {
            let (meter, next) = (meter.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events {
                        break;
                    }
                    let row = hcp_store::UsageRow {
                        seq: 0,
                        id: format!("chatcmpl-bench-{i:012}"),
                        tenant_id: format!("tenant-{}", w % 50),
                        key_id: "key".into(),
                        kind: hcp_model::UsageKind::Tokens,
                        tier: (i % 3) as i64,
                        model: "llama-3-8b".into(),
                        site_id: "tx-west".into(),
                        input_tokens: 1_000,
                        output_tokens: 400,
                        gpu_ms: 0,
                        spot: false,
                        status: hcp_model::UsageStatus::Completed,
                        tag: None,
                        at_ms: 1_795_000_000_000 + i as i64,
                    };
                    meter.record(row).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        let mut stored = 0;
        for t in 0..50 {
            let sums = store.usage_sums(&format!("tenant-{t}"), 0, i64::MAX).await?;
            stored += sums.iter().map(|s| s.records).sum::<i64>();
        }
        anyhow::Ok(json!({
            "events": events,
            "writers": writers,
            "seconds": secs,
            "events_per_s": events as f64 / secs,
            "batches": meter.stats.batches.load(Ordering::Relaxed),
            "stored": stored,
            "lost": events as i64 - stored,
            "machine": machine.report(),
        }))
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "metering: {} usage events from {} concurrent writers, each durable before it returns: {:.0}/s in {} transactions; stored {}, lost {}",
            out["events"],
            out["writers"],
            out["events_per_s"].as_f64().unwrap_or(0.0),
            out["batches"],
            out["stored"],
            out["lost"]
        );
    }
    Ok(if out["lost"] == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

const ADMIN: &str = "hcpa_admin_0123456789abcdef0123456789abcdef";
const KEY: &str = "hcpk_bench_0123456789abcdef0123456789abcdef";
/// The proxy's master key (LiteLLM refuses to start without one).
const LITELLM_KEY: &str = "sk-hcp-bench-0123456789abcdef0123456789abcdef";

#[derive(Default)]
struct Lat {
    ttft: Vec<Duration>,
    total: Vec<Duration>,
    /// Requests completed, warm-up included (the CPU readings span the warm-up too).
    completed_all: u64,
    failed: u64,
    /// Failures by HTTP status (0: the connection failed or the stream did not end in [DONE]).
    by_status: std::collections::BTreeMap<u16, u64>,
}

/// One streamed request: time to the first chunk and to the end.
async fn stream_once(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> Result<(Duration, Duration), u16> {
    let t = Instant::now();
    let mut r = http.post(url).bearer_auth(key).json(body).send().await.map_err(|_| 0u16)?;
    if !r.status().is_success() {
        return Err(r.status().as_u16());
    }
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(c) = r.chunk().await.map_err(|_| 0u16)? {
        first.get_or_insert_with(|| t.elapsed());
        tail.extend_from_slice(&c[c.len().saturating_sub(16)..]);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 32);
        }
    }
    let done = String::from_utf8_lossy(&tail).contains("[DONE]");
    if done { Ok((first.unwrap_or_default(), t.elapsed())) } else { Err(0) }
}

/// C clients, each sending streamed requests back to back for `secs` (after a warm-up), to
/// `urls` in turn.
async fn closed_loop(urls: Arc<Vec<String>>, key: &str, clients: usize, secs: f64, max_tokens: u32) -> Lat {
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).tcp_nodelay(true).build().expect("client");
    let body = Arc::new(json!({
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "A short question about the grid and the hashprice today."}],
        "max_tokens": max_tokens,
        "stream": true,
    }));
    let warm = Instant::now() + Duration::from_secs(2);
    let end = warm + Duration::from_secs_f64(secs);
    let mut tasks = vec![];
    for c in 0..clients {
        let (http, body, urls, key) = (http.clone(), body.clone(), urls.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Lat::default();
            let mut i = c;
            while Instant::now() < end {
                let url = &urls[i % urls.len()];
                i += clients;
                let counted = Instant::now() >= warm;
                let once = tokio::time::timeout(Duration::from_secs(30), stream_once(&http, url, &key, &body));
                match once.await.unwrap_or(Err(0)) {
                    Ok((f, t)) if counted => {
                        lat.ttft.push(f);
                        lat.total.push(t);
                        lat.completed_all += 1;
                    }
                    Ok(_) => lat.completed_all += 1,
                    Err(status) => {
                        lat.failed += 1;
                        *lat.by_status.entry(status).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat
        }));
    }
    let mut all = Lat::default();
    for t in tasks {
        if let Ok(l) = t.await {
            all.ttft.extend(l.ttft);
            all.total.extend(l.total);
            all.completed_all += l.completed_all;
            all.failed += l.failed;
            for (k, v) in l.by_status {
                *all.by_status.entry(k).or_default() += v;
            }
        }
    }
    all
}

fn report(name: &str, l: &mut Lat, secs: f64) -> serde_json::Value {
    json!({
        "front": name,
        "requests": l.total.len(),
        "failed": l.failed,
        "failed_by_status": l.by_status,
        "requests_per_s": l.total.len() as f64 / secs,
        "ttft_ms_p50": crate::loadtest::pct(&mut l.ttft, 0.5).unwrap_or(f64::NAN),
        "ttft_ms_p99": crate::loadtest::pct(&mut l.ttft, 0.99).unwrap_or(f64::NAN),
        "total_ms_p50": crate::loadtest::pct(&mut l.total, 0.5).unwrap_or(f64::NAN),
        "total_ms_p99": crate::loadtest::pct(&mut l.total, 0.99).unwrap_or(f64::NAN),
    })
}

/// Starts LiteLLM's proxy in front of the replicas; returns the child and its base URL.
async fn start_litellm(
    bin: &str,
    replicas: &[String],
    dir: &std::path::Path,
    cpus: Option<&str>,
    workers: usize,
) -> Result<(std::process::Child, String)> {
    let mut cfg = String::from("model_list:\n");
    for r in replicas {
        cfg.push_str(&format!(
            "  - model_name: llama-3-8b\n    litellm_params:\n      model: openai/llama-3-8b\n      api_base: {r}\n      api_key: none\n"
        ));
    }
    // As LiteLLM's production advice has it: no verbose or per-request logging, no spend logs
    // (there is no database here), a request timeout, and one worker per core it is given.
    cfg.push_str("litellm_settings:\n  drop_params: true\n  set_verbose: false\n  request_timeout: 600\n");
    cfg.push_str("general_settings:\n  disable_spend_logs: true\n  disable_error_logs: true\n");
    let path = dir.join("litellm.yaml");
    std::fs::write(&path, cfg)?;
    let port = 4000 + (std::process::id() % 1000) as u16;
    // With --split-cores LiteLLM gets the platform's cores, as the gateway did.
    let mut cmd = match cpus {
        Some(c) => {
            let mut t = std::process::Command::new("taskset");
            t.args(["-c", c, bin]);
            t
        }
        None => std::process::Command::new(bin),
    };
    let child = cmd
        .args(["--config", path.to_str().unwrap_or_default(), "--port", &port.to_string()])
        .args(["--num_workers", &workers.to_string()])
        .env("LITELLM_MASTER_KEY", LITELLM_KEY)
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_MODE", "PRODUCTION")
        // No network here: use the bundled model cost map and do not fetch tokenizers (LiteLLM
        // falls back to tiktoken at once instead of retrying Hugging Face on every request).
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("litellm.log"))?)
        .spawn()
        .with_context(|| format!("start {bin}"))?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..240 {
        if http.get(format!("{url}/health/liveliness")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok((child, url));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("LiteLLM did not answer within 120 s (log: {})", dir.join("litellm.log").display())
}

/// A runtime whose threads run only on `cores` (one worker per core, each pinned to its own).
fn pinned_runtime(cores: Vec<core_affinity::CoreId>, name: &str) -> Result<tokio::runtime::Runtime> {
    let n = cores.len();
    let next = Arc::new(AtomicU64::new(0));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(n)
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
            core_affinity::set_for_current(cores[i % n]);
        })
        .build()
        .context("start a pinned runtime")
}

/// Where the bench's parts run: all on every core, or the platform (gateway, router, metering;
/// LiteLLM in its turn) on one half of the cores and the load (clients and the simulated
/// backend) on the other.
struct Placement {
    platform: tokio::runtime::Runtime,
    load: tokio::runtime::Runtime,
    /// The platform's cores as `taskset -c` takes them, when split.
    platform_cpus: Option<String>,
    /// How many cores the platform (or LiteLLM in its turn) is given.
    platform_cores: usize,
}

/// The platform runtime's threads' name: its CPU time is read by it.
const PLATFORM_THREADS: &str = "hcp-platform";

fn placement(split: bool) -> Result<Placement> {
    if !split {
        let platform = tokio::runtime::Builder::new_multi_thread()
            .thread_name(PLATFORM_THREADS)
            .enable_all()
            .build()
            .context("start the platform's runtime")?;
        return Ok(Placement {
            platform,
            load: tokio::runtime::Builder::new_multi_thread()
                .thread_name(LOAD_THREADS)
                .enable_all()
                .build()
                .context("start the load's runtime")?,
            platform_cpus: None,
            platform_cores: cores(),
        });
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() < 2 {
        bail!("--split-cores: needs at least 2 cores this process may run on; it has {}", cores.len());
    }
    let (load, platform) = cores.split_at(cores.len() / 2);
    let cpus = platform.iter().map(|c| c.id.to_string()).collect::<Vec<_>>().join(",");
    Ok(Placement {
        platform: pinned_runtime(platform.to_vec(), PLATFORM_THREADS)?,
        load: pinned_runtime(load.to_vec(), LOAD_THREADS)?,
        platform_cpus: Some(cpus),
        platform_cores: platform.len(),
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What `hcp bench gateway` compares and how it places the load.
pub struct Arms {
    /// LiteLLM's proxy binary, for a third arm.
    pub litellm: Option<String>,
    pub split_cores: bool,
    /// The gateway calls the simulated backend over HTTP/2 (else HTTP/1.1).
    pub backend_http2: bool,
    /// The p99 time to first token at which requests/s per core are compared.
    pub p99_ttft_ms: f64,
}

/// One front's run at one concurrency: latency, throughput and the CPU it used.
fn measured(name: &str, l: &mut Lat, secs: f64, cpu_s: Option<f64>) -> serde_json::Value {
    let mut v = report(name, l, secs);
    if let Some(cpu) = cpu_s {
        v["cpu_s"] = json!(cpu);
        // Requests per CPU-second: the requests/s one core of this front serves (the CPU readings
        // span the warm-up, so the requests counted do too).
        v["requests_per_cpu_s"] = json!(l.completed_all as f64 / cpu.max(1e-9));
    }
    v
}

/// The threads of the load (clients and the simulated backend).
const LOAD_THREADS: &str = "hcp-load";

/// The platform's CPU time so far: the whole process less the load's threads (so the platform's
/// storage workers, metrics upkeep and engine count, not only its runtime's threads).
fn platform_cpu_s() -> f64 {
    crate::measure::process_cpu_s() - crate::measure::named_threads_cpu_s(LOAD_THREADS).values().sum::<f64>()
}

pub fn gateway(
    json_out: bool,
    streams: &[usize],
    secs: f64,
    max_tokens: u32,
    arms: Arms,
) -> Result<std::process::ExitCode> {
    let Arms { litellm, split_cores, backend_http2, p99_ttft_ms } = arms;
    if streams.is_empty() || streams.iter().any(|&s| s == 0 || s > 20_000) || secs.is_nan() || secs <= 0.0 {
        bail!("--streams: each between 1 and 20000; --seconds: must be > 0");
    }
    if p99_ttft_ms.is_nan() || p99_ttft_ms <= 0.0 {
        bail!("--p99-ttft-ms: must be > 0");
    }
    let machine = crate::measure::Machine::start();
    let place = placement(split_cores)?;
    let dir = tmpdir("gateway");
    let fleet = crate::cli::load_fleet(None, crate::cli::SMALL_FLEET)?;
    let cfg = hcp_server::Config {
        listen: "127.0.0.1:0".parse()?,
        store_url: hcp_server::Config::data_dir_store(&dir),
        bus_url: None,
        fleet,
        engine: true,
        api: true,
        seed: 1,
        // An interval every 15 s: the first plans find the GPUs reporting (the very first, at
        // start, has heard from no device yet and gives them no capacity); the engine's work on
        // the small fleet is a few milliseconds per plan.
        speed: 60.0,
        engine_config: Default::default(),
        mode: Default::default(),
        admin_token: Some(ADMIN.into()),
        demo_tenant_key: Some(KEY.into()),
        account_rate_per_s: 1e6,
        sim_backend_listen: Some("127.0.0.1:0".parse()?),
        backends: vec![],
        sim_backend_http2: backend_http2,
        backtest_fleets: vec![],
        // A load generator on this machine: every connection from one address.
        net: hcp_server::NetConfig {
            max_connections_per_addr: 1_000_000,
            max_connections: 1_000_000,
            ..Default::default()
        },
    };
    // The platform on a runtime of its own, the clients on another: a client task never waits in
    // the platform's run queue (with --split-cores they do not share cores either).
    let running = place.platform.block_on(async {
        let (store, _) = hcp_server::prepare(&cfg).await?;
        // Every GPU reserved for the bench's tenant: they serve whatever the simulated price
        // (the engine sheds GPUs whose work is worth less than their power, and idles those with
        // no work), so the capacity under test is there from the first plan.
        let gpus = cfg.fleet.gpu_count();
        let body = json!({"tenant": "demo", "gpus": gpus}).to_string();
        store.put_policy("reserved-capacity", &body, 0, 0).await?;
        hcp_server::start(cfg, store).await
    })?;
    let out = place.load.block_on(async {
        let base = format!("http://{}", running.addr);
        // The simulated backend is load, not the platform under test: it runs with the clients,
        // so that the platform runtime's CPU time is the gateway's.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        hcp_server::simbackend::serve_elsewhere(&running.app, l)?;
        let http = reqwest::Client::new();
        // A key with room for the load (the demo key's rate is 100/s).
        let k: serde_json::Value = http
            .post(format!("{base}/api/v1/tenants/demo/keys"))
            .bearer_auth(ADMIN)
            .json(&json!({"rate_per_s": 100000}))
            .send()
            .await?
            .json()
            .await?;
        let key = k["key"].as_str().context("a bench key")?.to_string();
        let mut replicas = vec![];
        for _ in 0..600 {
            let ids = {
                let r = running.app.router.lock().unwrap_or_else(|e| e.into_inner());
                if r.models().first().is_some_and(|m| m.1 > 0) { r.in_service_ids() } else { vec![] }
            };
            if !ids.is_empty() {
                replicas = ids;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if replicas.is_empty() {
            let summary = running.app.router.lock().unwrap_or_else(|e| e.into_inner()).summary();
            bail!("no replica came into service within 30 s; the router: {summary}");
        }
        replicas.sort_unstable();
        let sim = running.app.gateway.sim_base.lock().unwrap_or_else(|e| e.into_inner()).clone().context("sim")?;
        let direct: Vec<String> = replicas.iter().map(|r| format!("{sim}/r/{r}/v1")).collect();
        let d = Arc::new(direct.iter().map(|b| format!("{b}/chat/completions")).collect::<Vec<_>>());
        let g = Arc::new(vec![format!("{base}/v1/chat/completions")]);
        let mut lite = match &litellm {
            Some(bin) => {
                let workers = place.platform_cores;
                let (child, url) = start_litellm(bin, &direct, &dir, place.platform_cpus.as_deref(), workers).await?;
                Some((child, Arc::new(vec![format!("{url}/v1/chat/completions")])))
            }
            None => None,
        };
        let threads_before = crate::measure::named_threads_cpu_s(PLATFORM_THREADS);
        let mut points = vec![];
        for &c in streams {
            let mut fronts = vec![];
            let mut l = closed_loop(d.clone(), &key, c, secs, max_tokens).await;
            fronts.push(measured("direct", &mut l, secs, None));
            let cpu0 = platform_cpu_s();
            let mut l = closed_loop(g.clone(), &key, c, secs, max_tokens).await;
            let cpu = platform_cpu_s() - cpu0;
            fronts.push(measured("gateway", &mut l, secs, Some(cpu)));
            if let Some((child, u)) = &lite {
                let cpu0 = crate::measure::tree_cpu_s(child.id());
                let mut l = closed_loop(u.clone(), LITELLM_KEY, c, secs, max_tokens).await;
                let cpu = crate::measure::tree_cpu_s(child.id()) - cpu0;
                fronts.push(measured("litellm", &mut l, secs, Some(cpu)));
            }
            let f = |i: usize, k: &str| fronts.get(i).and_then(|r| r[k].as_f64()).unwrap_or(f64::NAN);
            let mut point = json!({
                "streams": c,
                "fronts": fronts.clone(),
                "gateway_added_ttft_ms": { "p50": f(1, "ttft_ms_p50") - f(0, "ttft_ms_p50"), "p99": f(1, "ttft_ms_p99") - f(0, "ttft_ms_p99") },
            });
            if lite.is_some() {
                let (gp50, lp50) = (f(1, "ttft_ms_p50") - f(0, "ttft_ms_p50"), f(2, "ttft_ms_p50") - f(0, "ttft_ms_p50"));
                point["litellm_added_ttft_ms"] =
                    json!({ "p50": lp50, "p99": f(2, "ttft_ms_p99") - f(0, "ttft_ms_p99") });
                // Added time is a difference of two medians: below the direct path's noise (about
                // 0.1 ms) a ratio means nothing, so the gateway's side is floored there.
                point["litellm_over_gateway_added_ttft_p50"] = json!(lp50 / gp50.max(0.1));
                point["gateway_over_litellm_requests_per_cpu_s"] =
                    json!(f(1, "requests_per_cpu_s") / f(2, "requests_per_cpu_s"));
            }
            points.push(point);
        }
        // Each platform thread's share of the gateway runs' CPU: the gateway uses every core it is
        // given when its busiest threads share the work.
        let threads_after = crate::measure::named_threads_cpu_s(PLATFORM_THREADS);
        let mut per_thread = crate::measure::threads_delta(&threads_before, &threads_after);
        per_thread.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = per_thread.iter().sum();
        let busiest: Vec<f64> =
            per_thread.iter().take(place.platform_cores).map(|t| t / total.max(1e-9)).collect();
        // At the fixed p99 time to first token: each front's best throughput among the points
        // that keep it, and its requests per CPU-second there.
        let at_target = |i: usize| {
            points
                .iter()
                .filter_map(|p| p["fronts"].get(i))
                .filter(|f| f["ttft_ms_p99"].as_f64().is_some_and(|x| x <= p99_ttft_ms) && f["failed"] == 0)
                .max_by(|a, b| {
                    a["requests_per_s"].as_f64().unwrap_or(0.0).total_cmp(&b["requests_per_s"].as_f64().unwrap_or(0.0))
                })
                .map(|f| json!({"requests_per_s": f["requests_per_s"], "requests_per_cpu_s": f["requests_per_cpu_s"], "ttft_ms_p99": f["ttft_ms_p99"]}))
        };
        let router = running.app.router.lock().unwrap_or_else(|e| e.into_inner()).summary();
        if let Some((mut child, _)) = lite.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        anyhow::Ok(json!({
            "seconds_per_front": secs,
            "max_tokens": max_tokens,
            "replicas": replicas.len(),
            "platform_cores": place.platform_cores,
            "split_cores": place.platform_cpus.as_ref().map(|c| json!({"platform_cpus": c})),
            "litellm_workers": litellm.as_ref().map(|_| place.platform_cores),
            "gateway_to_backend": if backend_http2 { "HTTP/2 (h2c)" } else { "HTTP/1.1" },
            "router_slots": router["slots"],
            "points": points,
            "at_p99_ttft": {
                "p99_ttft_ms": p99_ttft_ms,
                "gateway": at_target(1),
                "litellm": litellm.as_ref().and_then(|_| at_target(2)),
            },
            "platform_threads_busiest_share": busiest,
            "machine": machine.report(),
        }))
    })?;
    place.platform.block_on(running.stop())?;
    let _ = std::fs::remove_dir_all(&dir);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in out["points"].as_array().into_iter().flatten() {
            println!("{} concurrent streams:", p["streams"]);
            for r in p["fronts"].as_array().into_iter().flatten() {
                println!(
                    "  {:8} {:>7} req ({:.0}/s, {} failed, {:.0} req per CPU-s): first token p50 {:.2} ms p99 {:.2} ms; whole stream p50 {:.2} ms",
                    r["front"].as_str().unwrap_or(""),
                    r["requests"],
                    r["requests_per_s"].as_f64().unwrap_or(0.0),
                    r["failed"],
                    r["requests_per_cpu_s"].as_f64().unwrap_or(f64::NAN),
                    r["ttft_ms_p50"].as_f64().unwrap_or(0.0),
                    r["ttft_ms_p99"].as_f64().unwrap_or(0.0),
                    r["total_ms_p50"].as_f64().unwrap_or(0.0),
                );
            }
            println!(
                "  gateway adds p50 {:.2} ms to the first token; LiteLLM {:.2} ms",
                p["gateway_added_ttft_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                p["litellm_added_ttft_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
