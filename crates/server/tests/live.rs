//! Live mode end to end, rehearsed on a recorded afternoon: a local HTTP server answers as ERCOT's
//! public data API (token, real-time, SCED and day-ahead reports) and mempool.space's API do,
//! from the responses in crates/feeds/tests/responses; the platform runs live mode on an
//! accelerated clock from that afternoon. Checked through the REST API: the signals view names
//! the mode, each signal's source and age; a feed that fails (HTTP error, malformed answer) is an
//! alert naming the reason, its prices go stale and the safe policy applies; when it answers again
//! the alert clears and the prices are fresh; a manual value is taken with source `manual` and a
//! bad one is refused naming the field; a saved strike policy and a GPU reservation change the
//! next plan, each named with its version.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hcp_model::fleet::Fleet;
use hcp_server::{Config, Mode};
use serde_json::{Value, json};

const ADMIN: &str = "hcpa_admin_0123456789abcdef0123456789abcdef";

/// 0: answer; 1: HTTP 503; 2: an HTML error page with status 200.
#[derive(Default)]
struct Feeds {
    failing: AtomicU8,
    tokens: AtomicU8,
}

fn responses(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../feeds/tests/responses");
    std::fs::read_to_string(root.join(path)).unwrap()
}

async fn answer(s: &Feeds, headers: &HeaderMap, file: &str, ercot: bool) -> axum::response::Response {
    if ercot {
        // ERCOT wants the id_token as a bearer token and the subscription key.
        let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
        let key = headers.get("ocp-apim-subscription-key").and_then(|v| v.to_str().ok());
        if bearer != Some("Bearer eyJhbGciOiJSUzI1NiJ9.test.sig") || key != Some("sub-key-1") {
            return (StatusCode::UNAUTHORIZED, "no token").into_response();
        }
    }
    match s.failing.load(Ordering::Relaxed) {
        1 => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        2 => (StatusCode::OK, "<html>maintenance</html>").into_response(),
        _ => ([("content-type", "application/json")], responses(file)).into_response(),
    }
}

async fn serve_feeds(state: Arc<Feeds>) -> String {
    let app = axum::Router::new()
        .route(
            "/token",
            post(|State(s): State<Arc<Feeds>>, body: String| async move {
                let ok = body.contains("grant_type=password")
                    && body.contains("username=api-user")
                    && body.contains("password=api-pass")
                    && body.contains("response_type=id_token");
                if !ok {
                    return (StatusCode::BAD_REQUEST, "bad form").into_response();
                }
                s.tokens.fetch_add(1, Ordering::Relaxed);
                ([("content-type", "application/json")], responses("ercot/token.json")).into_response()
            }),
        )
        .route(
            "/api/public-reports/np6-905-cd/spp_node_zone_hub",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "ercot/spp_node_zone_hub.json", true).await
            }),
        )
        .route(
            "/api/public-reports/np6-788-cd/lmp_node_zone_hub",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "ercot/lmp_node_zone_hub.json", true).await
            }),
        )
        .route(
            "/api/public-reports/np4-190-cd/dam_stlmnt_pnt_prices",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "ercot/dam_stlmnt_pnt_prices.json", true).await
            }),
        )
        .route(
            "/api/v1/prices",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "mempool/prices.json", false).await
            }),
        )
        .route(
            "/api/v1/mining/hashrate/3d",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "mempool/hashrate_3d.json", false).await
            }),
        )
        .route(
            "/api/v1/mining/reward-stats/144",
            get(|State(s): State<Arc<Feeds>>, h: HeaderMap| async move {
                answer(&s, &h, "mempool/reward_stats_144.json", false).await
            }),
        )
        .with_state(state);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

async fn call(http: &reqwest::Client, base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{base}{path}");
    let mut r = if method == "PUT" { http.put(url) } else { http.get(url) };
    r = r.bearer_auth(ADMIN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let res = r.send().await.unwrap();
    let s = res.status().as_u16();
    (s, res.json().await.unwrap_or(Value::Null))
}

/// Polls `GET path` until `ok` holds (or panics after `secs` with the last answer).
async fn wait_for(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    secs: u64,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (_, v) = call(http, base, "GET", path, None).await;
        if ok(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s; last answer {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signal<'a>(v: &'a Value, kind: &str, key: &str) -> Option<&'a Value> {
    v["signals"].as_array()?.iter().find(|s| s["kind"] == kind && s["key"] == key)
}

fn alert<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v["items"].as_array()?.iter().find(|a| a["key"] == key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_on_recorded_feeds_goes_stale_recovers_and_takes_policies() {
    // The API account's credentials, as an operator would set them (this test binary's only
    // test: setting the environment is sound only while no other thread reads it).
    unsafe {
        std::env::set_var("HCP_TEST_ERCOT_USER", "api-user");
        std::env::set_var("HCP_TEST_ERCOT_PASS", "api-pass");
        std::env::set_var("HCP_TEST_ERCOT_KEY", "sub-key-1");
    }
    let feeds_state = Arc::new(Feeds::default());
    let feeds_base = serve_feeds(feeds_state.clone()).await;
    let feeds = hcp_feeds::FeedsConfig::from_toml(&format!(
        r#"
[ercot]
base_url = "{feeds_base}/api/public-reports"
token_url = "{feeds_base}/token"
settlement_points = ["HB_SOUTH"]
poll_s = 1
day_ahead_poll_s = 5
timeout_s = 2
username_env = "HCP_TEST_ERCOT_USER"
password_env = "HCP_TEST_ERCOT_PASS"
subscription_key_env = "HCP_TEST_ERCOT_KEY"

[market]
base_url = "{feeds_base}"
poll_s = 1
timeout_s = 2

[gpu_price]
usd_per_gpu_hour = 2.4
"#
    ))
    .unwrap();
    let dir = std::env::temp_dir().join(format!("hcp-live-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // One site on HB_SOUTH (the recorded point); the other site's point gets no feed.
    let fleet = Fleet::from_toml(
        "small.toml",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml")),
    )
    .unwrap();
    // The default staleness: a price older than 20 market minutes (ten wall seconds at this
    // speed) is stale. (Any less and a feed of 15-minute prices alone is stale at every decision,
    // whose interval's price arrives just after it.)
    let engine_config = hcp_engine::EngineConfig::default();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        store_url: Config::data_dir_store(&dir),
        bus_url: None,
        fleet,
        engine: true,
        api: true,
        seed: 7,
        // Two market minutes per wall second, from 13:00 CST (14:00 CDT) of the recorded day.
        speed: 120.0,
        engine_config,
        mode: Mode::Live {
            feeds: Box::new(feeds),
            rehearse_from: Some(hcp_model::SimTime::parse("2024-06-01T13:00:00").unwrap()),
        },
        admin_token: Some(ADMIN.into()),
        demo_tenant_key: None,
        account_rate_per_s: 1_000.0,
        sim_backend_listen: None,
        backends: vec![],
        sim_backend_http2: true,
        backtest_fleets: vec![],
        net: Default::default(),
    };
    let (store, _) = hcp_server::prepare(&cfg).await.unwrap();
    let running = hcp_server::start(cfg, store).await.unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    // The signals view: the mode, each signal's source and age, the feeds' health.
    let v = wait_for(&http, &base, "/api/v1/signals", 30, "signals from both feeds", |v| {
        signal(v, "rt_price", "HB_SOUTH").is_some()
            && signal(v, "rt5_price", "HB_SOUTH").is_some()
            && signal(v, "hashprice", "network").is_some()
            && signal(v, "gpu_price", "fleet").is_some()
    })
    .await;
    assert_eq!(v["mode"], "rehearsal");
    assert_eq!(signal(&v, "rt_price", "HB_SOUTH").unwrap()["source"], "ercot");
    assert_eq!(signal(&v, "hashprice", "network").unwrap()["source"], "mempool");
    assert_eq!(signal(&v, "gpu_price", "fleet").unwrap()["source"], "contract");
    assert_eq!(signal(&v, "gpu_price", "fleet").unwrap()["value"], 2.4);
    let age = signal(&v, "rt_price", "HB_SOUTH").unwrap()["age_s"].as_f64().unwrap();
    assert!((-30.0..1800.0).contains(&age), "a settlement price known within the interval after: {age} s");
    let hp = signal(&v, "hashprice", "network").unwrap()["value"].as_f64().unwrap();
    assert!((20.0..200.0).contains(&hp), "hashprice {hp}");
    let feeds_now = v["feeds"].as_array().unwrap();
    assert!(feeds_now.iter().any(|f| f["feed"] == "ercot" && f["ok"] == true), "{v:#}");
    assert!(feeds_state.tokens.load(Ordering::Relaxed) >= 1, "a token was asked for");
    // A price's history is stored.
    let (s, h) = call(&http, &base, "GET", "/api/v1/signals?kind=rt_price&key=HB_SOUTH", None).await;
    assert_eq!(s, 200);
    assert!(!h["items"].as_array().unwrap().is_empty(), "{h}");

    // The feed fails: HTTP 503. The alert names it; the prices go stale and the safe policy applies.
    feeds_state.failing.store(1, Ordering::Relaxed);
    let a = wait_for(&http, &base, "/api/v1/alerts", 20, "feed alert", |v| alert(v, "feed:ercot").is_some()).await;
    let text = alert(&a, "feed:ercot").unwrap()["message"].as_str().unwrap().to_string();
    assert!(text.contains("HTTP 503"), "{text}");
    let (_, v) = call(&http, &base, "GET", "/api/v1/signals", None).await;
    let f = v["feeds"].as_array().unwrap().iter().find(|f| f["feed"] == "ercot").unwrap().clone();
    assert_eq!(f["ok"], false);
    assert!(f["reason"].as_str().unwrap().contains("HTTP 503"), "{f}");
    wait_for(&http, &base, "/api/v1/alerts", 60, "stale price alert", |v| alert(v, "stale_price:HB_SOUTH").is_some())
        .await;
    wait_for(&http, &base, "/api/v1/decisions?limit=50", 60, "a stale-price decision", |v| {
        v["items"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["kind"] == "stale_price" && d["site_id"] == "tx-south"))
    })
    .await;

    // It answers again: the alerts clear and the price is fresh.
    feeds_state.failing.store(0, Ordering::Relaxed);
    wait_for(&http, &base, "/api/v1/alerts", 30, "alerts cleared", |v| {
        alert(v, "feed:ercot").is_none() && alert(v, "stale_price:HB_SOUTH").is_none()
    })
    .await;

    // A malformed answer is refused with the field named.
    feeds_state.failing.store(2, Ordering::Relaxed);
    let a = wait_for(&http, &base, "/api/v1/alerts", 20, "malformed feed alert", |v| {
        alert(v, "feed:ercot").is_some_and(|a| a["message"].as_str().unwrap_or("").contains("body: not JSON"))
    })
    .await;
    assert!(alert(&a, "feed:ercot").is_some());
    feeds_state.failing.store(0, Ordering::Relaxed);

    // Manual values: taken with source manual; a bad one refused, naming the field.
    let (s, b) = call(
        &http,
        &base,
        "PUT",
        "/api/v1/signals/manual",
        Some(json!({"kind": "rt_price", "key": "HB_WEST", "value": 31.5})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    wait_for(&http, &base, "/api/v1/signals", 20, "manual price", |v| {
        signal(v, "rt5_price", "HB_WEST").is_some_and(|s| s["source"] == "manual" && s["value"] == 31.5)
    })
    .await;
    for (body, field) in [
        (json!({"kind": "rt_price", "key": "HB_NOWHERE", "value": 31.5}), "key"),
        (json!({"kind": "rt_price", "key": "HB_WEST", "value": 1e9}), "value"),
        (json!({"kind": "da_price", "key": "HB_WEST", "value": 20.0}), "at_ms"),
        (json!({"kind": "wind", "key": "HB_WEST", "value": 2.0}), "kind"),
        (json!({"kind": "gpu_price", "value": "two"}), "value"),
    ] {
        let (s, b) = call(&http, &base, "PUT", "/api/v1/signals/manual", Some(body.clone())).await;
        assert_eq!(s, 422, "{body}: {b}");
        assert!(b["error"].to_string().contains(field), "{body}: {b}");
    }

    // A strike policy below every price curtails the recorded site at the next plan, naming it.
    let (s, b) = call(
        &http,
        &base,
        "PUT",
        "/api/v1/policies/strike",
        Some(json!({"expected_version": 0, "body": {"strike_usd_per_mwh": -100.0, "curtail_after": 1, "resume_after": 1}})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_for(&http, &base, "/api/v1/decisions?limit=50", 60, "a strike decision", |v| {
        v["items"].as_array().is_some_and(|d| {
            d.iter().any(|d| d["kind"] == "strike" && d["reason"].as_str().unwrap_or("").contains("policy strike v1"))
        })
    })
    .await;

    // A reservation keeps its GPUs serving when the price is above what their work earns (a GPU
    // price set by hand far below the power's cost), the decision naming the policy's version.
    let (s, b) = call(
        &http,
        &base,
        "PUT",
        "/api/v1/policies/reserved-capacity",
        Some(json!({"expected_version": 0, "body": {"tenant": "demo", "gpus": 8}})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // The router holds the reserved GPUs for the tenant: its guarantee is at least them.
    wait_for(&http, &base, "/api/v1/workloads", 10, "the router's guarantee for demo", |v| {
        v["tenants"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["tenant"] == "demo" && t["guaranteed_gpus"].as_f64() == Some(8.0)))
    })
    .await;
    let (s, b) =
        call(&http, &base, "PUT", "/api/v1/signals/manual", Some(json!({"kind": "gpu_price", "value": 0.01}))).await;
    assert_eq!(s, 202, "{b}");
    let v = wait_for(&http, &base, "/api/v1/decisions?limit=50", 60, "GPUs shed but the reserved", |v| {
        v["items"].as_array().is_some_and(|d| {
            d.iter().any(|d| {
                d["kind"] == "gpus_shed" && d["reason"].as_str().unwrap_or("").contains("policy reserved-capacity v1")
            })
        })
    })
    .await;
    let d = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "gpus_shed" && d["site_id"] == "tx-south")
        .unwrap()
        .clone();
    assert!(d["reason"].as_str().unwrap().contains("8 reserved GPUs serve"), "{d}");

    let stopped = Instant::now();
    running.stop().await.unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(10), "stop took {:?}", stopped.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
