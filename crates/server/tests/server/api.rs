//! The API over real HTTP on loopback: a platform on a temporary SQLite file with the in-process
//! bus and the engine running fast.

use std::time::Duration;

use hcp_model::fleet::Fleet;
use hcp_server::{Config, Running};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const ADMIN: &str = "hcpa_admin_0123456789abcdef0123456789abcdef";
const DEMO: &str = "hcpk_demo1_0123456789abcdef0123456789abcdef";

/// Platforms alive at once in this binary, whatever `--test-threads` is: each runs a whole
/// `hcp up` (an engine at 45,000 times real time, storage, the simulated backend), so memory and
/// the engines' pace would otherwise grow with the machine's core count.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

struct Platform {
    running: Option<Running>,
    base: String,
    http: Client,
    dir: std::path::PathBuf,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Platform {
    async fn start(name: &str) -> Platform {
        Platform::start_with(name, true, vec![]).await
    }

    /// A platform with or without the simulated backend, and with configured backends.
    async fn start_with(name: &str, sim: bool, backends: Vec<hcp_server::gateway::BackendConfig>) -> Platform {
        Platform::start_in(name, sim, backends, true).await
    }

    /// A platform with the simulated backend whose config `tune` changes first.
    async fn start_tuned(name: &str, tune: impl FnOnce(&mut Config)) -> Platform {
        Platform::start_full(name, true, vec![], true, tune).await
    }

    /// `fresh`: on an empty data directory; else on what a platform of that name left.
    async fn start_in(
        name: &str,
        sim: bool,
        backends: Vec<hcp_server::gateway::BackendConfig>,
        fresh: bool,
    ) -> Platform {
        Platform::start_full(name, sim, backends, fresh, |_| {}).await
    }

    async fn start_full(
        name: &str,
        sim: bool,
        backends: Vec<hcp_server::gateway::BackendConfig>,
        fresh: bool,
        tune: impl FnOnce(&mut Config),
    ) -> Platform {
        let slot = SLOTS.acquire().await.expect("never closed");
        let dir = std::env::temp_dir().join(format!("hcp-api-{name}-{}", std::process::id()));
        if fresh {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).unwrap();
        let fleet = Fleet::from_toml(
            "small.toml",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml")),
        )
        .unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            store_url: Config::data_dir_store(&dir),
            bus_url: None,
            fleet,
            engine: true,
            api: true,
            seed: 3,
            speed: 900.0 * 50.0,
            engine_config: Default::default(),
            mode: Default::default(),
            admin_token: Some(ADMIN.into()),
            demo_tenant_key: Some(DEMO.into()),
            account_rate_per_s: 1_000.0,
            sim_backend_listen: sim.then(|| "127.0.0.1:0".parse().unwrap()),
            backends,
            sim_backend_http2: true,
            backtest_fleets: vec![],
            net: Default::default(),
        };
        tune(&mut cfg);
        let (store, boot) = hcp_server::prepare(&cfg).await.unwrap();
        assert!(boot.admin_token.is_none() && boot.demo_tenant_key.is_none(), "given credentials are not printed");
        let running = hcp_server::start(cfg, store).await.unwrap();
        let base = format!("http://{}", running.addr);
        Platform { running: Some(running), base, http: Client::new(), dir, _slot: slot }
    }

    async fn stop(mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }

    /// Stops, keeping the data directory for a restart.
    async fn stop_keeping_data(mut self) {
        self.dir = std::path::PathBuf::new();
        self.running.take().unwrap().stop().await.unwrap();
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let mut r = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PUT" => self.http.put(url),
            "DELETE" => self.http.delete(url),
            _ => unreachable!(),
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn account(&self, name: &str, role: &str) -> String {
        let (s, b) =
            self.call("POST", "/api/v1/accounts", Some(ADMIN), Some(json!({"name": name, "role": role}))).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["token"].as_str().unwrap().to_string()
    }
}

/// Every route of the API, with a body where it takes one.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/api/v1/me", None),
        ("GET", "/api/v1/sites", None),
        ("GET", "/api/v1/devices", None),
        ("GET", "/api/v1/devices/1", None),
        ("GET", "/api/v1/devices/1/telemetry", None),
        ("GET", "/api/v1/commands?device=1", None),
        ("POST", "/api/v1/maintenance", Some(json!({"scope": "device", "id": "1", "on": true}))),
        ("GET", "/api/v1/plans", None),
        ("GET", "/api/v1/decisions", None),
        ("GET", "/api/v1/router", None),
        ("GET", "/api/v1/signals?kind=rt_price&key=HB_WEST", None),
        ("GET", "/api/v1/signals", None),
        ("PUT", "/api/v1/signals/manual", Some(json!({"kind": "gpu_price", "value": 2.0}))),
        ("GET", "/api/v1/sites/tx-west/power", None),
        ("GET", "/api/v1/policies", None),
        ("GET", "/api/v1/policies/strike", None),
        ("PUT", "/api/v1/policies/strike", Some(json!({"expected_version": 0, "body": {}}))),
        ("GET", "/api/v1/tenants", None),
        ("POST", "/api/v1/tenants", Some(json!({"id": "t", "name": "T", "weight": 1.0}))),
        ("GET", "/api/v1/tenants/demo", None),
        ("GET", "/api/v1/tenants/demo/keys", None),
        ("POST", "/api/v1/tenants/demo/keys", Some(json!({}))),
        ("GET", "/api/v1/usage", None),
        ("GET", "/api/v1/tenants/demo/price-plan", None),
        (
            "PUT",
            "/api/v1/tenants/demo/price-plan",
            Some(json!({"tokens": [], "gpu_hour_micro_usd": 1, "spot_discount_pct": 0})),
        ),
        ("GET", "/api/v1/tenants/demo/invoices/2026-11", None),
        ("GET", "/api/v1/invoices/2026-11", None),
        ("GET", "/api/v1/pnl?from_ms=0&to_ms=1", None),
        ("GET", "/api/v1/jobs", None),
        ("POST", "/api/v1/jobs", Some(json!({"gpus": 1, "duration_s": 0.01}))),
        ("GET", "/api/v1/jobs/job-x", None),
        ("DELETE", "/api/v1/jobs/job-x", None),
        ("GET", "/api/v1/fleet", None),
        ("GET", "/api/v1/economics", None),
        ("GET", "/api/v1/alerts", None),
        ("GET", "/api/v1/workloads", None),
        ("GET", "/api/v1/usage/daily?tenant=demo", None),
        ("GET", "/api/v1/backtests", None),
        ("POST", "/api/v1/backtests", Some(json!({"from": "2025-06-01", "days": 1, "policies": ["always-on"]}))),
        ("GET", "/graphql?query=%7Bme%7Btenant%7D%7D", None),
        ("POST", "/graphql", Some(json!({"query": "{ me { tenant account } }"}))),
        ("DELETE", "/api/v1/keys/demo1", None),
        ("GET", "/api/v1/audit", None),
        ("GET", "/api/v1/accounts", None),
        ("POST", "/api/v1/accounts", Some(json!({"name": "x", "role": "viewer"}))),
        ("GET", "/api/v1/events", None),
    ]
}

#[tokio::test]
async fn every_endpoint_refuses_missing_or_wrong_credentials() {
    let p = Platform::start("auth").await;
    for (m, path, body) in routes() {
        let (s, b) = p.call(m, path, None, body.clone()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {path} without a token: {b}");
        assert_eq!(b["error"]["code"], "unauthorized");
        for bad in ["hcpa_admin_ffffffffffffffffffffffffffff", "hcpk_nokey_0123456789abcdef0123456789abcdef", "junk"] {
            let (s, _) = p.call(m, path, Some(bad), body.clone()).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {path} with a wrong token");
        }
    }
    // Nothing changed: no tenant "t", device 1 not in maintenance, one key.
    let (s, _) = p.call("GET", "/api/v1/tenants/t", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, d) = p.call("GET", "/api/v1/devices/1", Some(ADMIN), None).await;
    assert_eq!(d["maintenance"], false);
    p.stop().await;
}

/// Wrong tokens cannot buy the process's memory and CPU: checks run a few at a time, an address
/// that keeps failing is refused without a check, a name under attack still lets its owner in
/// from another address, and an unknown name costs what a known one does (so the time of the
/// answer does not tell which names exist). Good tokens are served throughout.
#[tokio::test]
async fn wrong_tokens_are_bounded_and_tell_nothing() {
    use hcp_server::auth::{FAILURES_PER_ADDR, FAILURES_PER_NAME};
    use std::sync::atomic::Ordering::Relaxed;
    let p = Platform::start("guard").await;
    let guard = || &p.running.as_ref().unwrap().app.gate.guard;
    let wrong = |name: &str| format!("{name}_{}", hcp_server::auth::secret());
    // Unknown and known names each cost one check.
    for t in [wrong("hcpa_admin"), wrong("hcpa_nobody"), wrong("hcpk_demo1"), wrong("hcpk_nokey")] {
        let before = guard().checks.load(Relaxed);
        let (s, b) = p.call("GET", "/api/v1/me", Some(&t), None).await;
        assert_eq!((s, b["error"]["message"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid token")));
        assert_eq!(guard().checks.load(Relaxed), before + 1, "{}", &t[..11]);
    }
    // The same wrong token again is refused from memory, without a check.
    let t = wrong("hcpa_admin");
    p.call("GET", "/api/v1/me", Some(&t), None).await;
    let before = guard().checks.load(Relaxed);
    let (s, _) = p.call("GET", "/api/v1/me", Some(&t), None).await;
    assert_eq!((s, guard().checks.load(Relaxed)), (StatusCode::UNAUTHORIZED, before));
    let ops = p.account("ops", "operator").await;
    // 64 wrong tokens for one account at once, from one address, while a good token is used.
    let before = guard().checks.load(Relaxed);
    let pr = &p;
    let attack = futures::future::join_all((0..64).map(|_| {
        let t = wrong("hcpa_ops");
        async move { pr.call("GET", "/api/v1/me", Some(&t), None).await }
    }));
    let good = async {
        let mut statuses = vec![];
        for _ in 0..20 {
            statuses.push(p.call("GET", "/api/v1/me", Some(ADMIN), None).await.0);
        }
        statuses
    };
    let (answers, good) = tokio::join!(attack, good);
    assert!(good.iter().all(|s| *s == StatusCode::OK), "{good:?}");
    let checks = guard().checks.load(Relaxed) - before;
    let slots = guard().slots() as u64;
    assert!(guard().peak.load(Relaxed) <= slots as usize, "more checks at once than slots");
    assert!(checks <= u64::from(FAILURES_PER_ADDR) + slots, "{checks} checks for 64 wrong tokens");
    let limited = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::TOO_MANY_REQUESTS && b["error"]["code"] == "too_many_failures")
        .count();
    let unauthorized = answers.iter().filter(|(s, _)| *s == StatusCode::UNAUTHORIZED).count();
    assert_eq!(limited + unauthorized, 64, "only 401 and 429: {answers:?}");
    assert!(limited >= 64 - FAILURES_PER_ADDR as usize - slots as usize, "{limited} refused without a check");
    // This address is refused even a right token it has not used yet, until the window ends...
    let (s, _) = p.call("GET", "/api/v1/me", Some(&ops), None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // ...but from an address with no failure, the owner of the name under attack gets in, while
    // a wrong token for it from there is checked once and then refused without a check.
    let from =
        |ip: &str| reqwest::Client::builder().local_address(ip.parse::<std::net::IpAddr>().ok()).build().unwrap();
    let me = |c: Client, t: String| {
        let url = format!("{}/api/v1/me", p.base);
        async move { c.get(url).bearer_auth(t).send().await.unwrap().status() }
    };
    // (This address's earlier failures count against it too: the name's count is topped up from
    // another address until the name is over its limit.)
    let mut name_failures = checks;
    while name_failures < u64::from(FAILURES_PER_NAME) {
        assert_eq!(me(from("127.0.0.4"), wrong("hcpa_ops")).await, StatusCode::UNAUTHORIZED);
        name_failures += 1;
    }
    assert_eq!(me(from("127.0.0.3"), wrong("hcpa_ops")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(from("127.0.0.3"), wrong("hcpa_ops")).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(me(from("127.0.0.2"), ops.clone()).await, StatusCode::OK);
    p.stop().await;
}

/// `/metrics` shows what tenants may not read: on the main port it needs an operator account's
/// token; on its own listener it is open (and the main port's answers 404). `/healthz` stays open.
#[tokio::test]
async fn metrics_need_an_account_or_their_own_listener() {
    let p = Platform::start("metrics").await;
    let get = |path: &str, token: Option<&str>| {
        let mut r = p.http.get(format!("{}{path}", p.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status() }
    };
    assert_eq!(get("/metrics", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get("/metrics", Some(DEMO)).await, StatusCode::FORBIDDEN);
    let viewer = p.account("scraper", "viewer").await;
    assert_eq!(get("/metrics", Some(&viewer)).await, StatusCode::OK);
    assert_eq!(get("/healthz", None).await, StatusCode::OK);
    p.stop().await;
    let p = Platform::start_tuned("metrics-own", |c| c.net.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let own = p.running.as_ref().unwrap().metrics_addr.expect("a metrics listener");
    let r = p.http.get(format!("http://{own}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("hcp_http_requests_total"));
    let r = p.http.get(format!("{}/metrics", p.base)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    p.stop().await;
}

#[tokio::test]
async fn roles_and_tenants_see_only_what_they_may() {
    let p = Platform::start("roles").await;
    let viewer = p.account("watcher", "viewer").await;
    let operator = p.account("ops", "operator").await;
    let admin_only = [
        "/api/v1/audit",
        "/api/v1/accounts",
        "/api/v1/usage",
        "/api/v1/invoices/2026-11",
        "/api/v1/usage/daily?tenant=demo",
    ];
    for (m, path, body) in routes() {
        if path == "/api/v1/events" {
            continue;
        }
        // Allowed means past auth: success, or an answer about the resource itself (404).
        let allowed = |s: StatusCode| s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN;
        let (s, b) = p.call(m, path, Some(&viewer), body.clone()).await;
        let tenant_scoped = path.contains("/keys")
            || path.contains("/price-plan")
            || path.contains("/invoices/")
            || path.starts_with("/api/v1/jobs");
        // GraphQL reads need only a token: what a query may see is checked field by field.
        let ok = (m == "GET" && !admin_only.contains(&path) && !tenant_scoped) || path == "/graphql";
        assert_eq!(allowed(s), ok, "viewer {m} {path}: {s} {b}");
        // A tenant key reaches only its own tenant; operator routes are forbidden to it.
        let (s, b) = p.call(m, path, Some(DEMO), body.clone()).await;
        let mine = (path.starts_with("/api/v1/tenants/demo") && !(m == "PUT" && path.ends_with("/price-plan")))
            || path == "/api/v1/me"
            || path == "/api/v1/keys/demo1"
            || path == "/api/v1/usage"
            || path.starts_with("/api/v1/usage/daily")
            || path == "/api/v1/workloads"
            || path.starts_with("/graphql")
            || path.starts_with("/api/v1/jobs");
        assert_eq!(allowed(s), mine, "tenant {m} {path}: {s} {b}");
        if path == "/api/v1/keys/demo1" {
            break; // the demo key revoked itself
        }
    }
    let (s, b) = p.call("GET", "/api/v1/me", Some(DEMO), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a revoked key is refused at once: {b}");
    let (s, _) = p
        .call("POST", "/api/v1/maintenance", Some(&operator), Some(json!({"scope": "rack", "id": "0", "on": true})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) =
        p.call("POST", "/api/v1/tenants", Some(&operator), Some(json!({"id": "z", "name": "Z", "weight": 1}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "tenants need admin");
    let (_, other) =
        p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(json!({"id": "other", "name": "O", "weight": 2}))).await;
    assert_eq!(other["id"], "other");
    let (_, k) = p.call("POST", "/api/v1/tenants/other/keys", Some(ADMIN), Some(json!({"rate_per_s": 5}))).await;
    let key = k["key"].as_str().unwrap_or_else(|| panic!("a key: {k}"));
    let (s, _) = p.call("GET", "/api/v1/tenants/demo/keys", Some(key), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another tenant's keys do not exist for it");
    // A tenant's own new keys cannot outrun or outrank the key that made them.
    let (s, b) = p.call("POST", "/api/v1/tenants/other/keys", Some(key), Some(json!({"rate_per_s": 50}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("rate_per_s")));
    let (s, b) = p
        .call("POST", "/api/v1/tenants/other/keys", Some(key), Some(json!({"rate_per_s": 5, "default_band": 0})))
        .await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("default_band")));
    let (s, _) = p.call("POST", "/api/v1/tenants/other/keys", Some(key), Some(json!({"rate_per_s": 5}))).await;
    assert_eq!(s, StatusCode::CREATED);
    // Another tenant's key id answers as a key that does not exist: the owner is never named.
    let (_, k2) = p.call("POST", "/api/v1/tenants/other/keys", Some(ADMIN), Some(json!({"rate_per_s": 5}))).await;
    let key2 = k2["key"].as_str().unwrap_or_else(|| panic!("a key: {k2}")).to_string();
    let (_, mine) =
        p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(json!({"id": "third", "name": "T", "weight": 1}))).await;
    assert_eq!(mine["id"], "third");
    let (_, k3) = p.call("POST", "/api/v1/tenants/third/keys", Some(ADMIN), Some(json!({"rate_per_s": 5}))).await;
    let third = k3["key"].as_str().unwrap().to_string();
    let other_id = k2["id"].as_str().unwrap_or_else(|| panic!("a key id: {k2}"));
    let (s1, b1) = p.call("DELETE", &format!("/api/v1/keys/{other_id}"), Some(&third), None).await;
    let (s2, b2) = p.call("DELETE", "/api/v1/keys/nosuchkey", Some(&third), None).await;
    assert_eq!((s1, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(
        b1["error"]["message"].as_str().unwrap().replace(other_id, "ID"),
        b2["error"]["message"].as_str().unwrap().replace("nosuchkey", "ID"),
        "the same answer"
    );
    assert!(!b1.to_string().contains("other"), "{b1}");
    let (s, _) = p.call("GET", "/api/v1/me", Some(&key2), None).await;
    assert_eq!(s, StatusCode::OK, "and the key was not revoked");
    p.stop().await;
}

#[tokio::test]
async fn malformed_bodies_name_the_field_and_change_nothing() {
    let p = Platform::start("bodies").await;
    let cases = [
        (json!({"id": "a", "name": "A", "weight": "heavy"}), "weight"),
        (json!({"id": "a", "name": "A"}), "body"),
        (json!({"id": "a", "name": "A", "weight": 1, "colour": "red"}), "colour"),
        (json!({"id": "a", "name": "A", "weight": -1}), "weight"),
        (json!({"id": "A B", "name": "A", "weight": 1}), "id"),
        (json!({"id": "a", "name": "A", "weight": 1, "guaranteed_gpus": -2}), "guaranteed_gpus"),
        (json!({"id": "a", "name": "A", "weight": 1e308}), "weight"),
        (json!({"id": "a", "name": "A", "weight": 1, "guaranteed_gpus": 1e308}), "guaranteed_gpus"),
        (json!({"id": "a", "name": "A", "weight": 1, "guaranteed_gpus": 100_000}), "guaranteed_gpus"),
        (json!({"id": "a", "name": "A", "weight": 1, "borrow_limit_gpus": 1e308}), "borrow_limit_gpus"),
        (json!({"id": "a", "name": "", "weight": 1}), "name"),
    ];
    for (body, field) in cases {
        let (s, b) = p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {b}");
        assert_eq!(b["error"]["code"], "invalid");
        let named = b["error"]["field"].as_str().unwrap_or("");
        assert!(named == field || b["error"]["message"].as_str().unwrap().contains(field), "{body}: {b}");
    }
    let r = p
        .http
        .post(format!("{}/api/v1/tenants", p.base))
        .bearer_auth(ADMIN)
        .header("content-type", "text/plain")
        .body("id=a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A token that is not ASCII is named at the dashboard's login (not "the header is missing").
    let (s, b) = p.call("POST", "/ui/login", None, Some(json!({"token": "hcpa_admin_é"}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("token")), "{b}");
    // Broken JSON names the body, not `?`.
    let r = p
        .http
        .post(format!("{}/api/v1/tenants", p.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(r#"{"id": "a", "name": "#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["field"], "body", "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("malformed JSON"), "{b}");
    let big = "x".repeat(300 * 1024);
    let (s, b) =
        p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(json!({"id": "a", "name": big, "weight": 1}))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(b["error"]["code"], "too_large", "the API's error shape: {b}");
    // The gateway answers in OpenAI's error shape, and every answer says nosniff.
    let r = p
        .http
        .post(format!("{}/v1/chat/completions", p.base))
        .bearer_auth(DEMO)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model":"llama-3-8b","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(300 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["type"], "invalid_request_error", "{b}");
    assert_eq!(b["error"]["code"], "too_large", "{b}");
    // Times and sequence numbers at the edge of their types are refused, naming the field.
    let (s, b) = p.call("GET", "/api/v1/usage/daily?to_ms=-9223372036854775808", Some(DEMO), None).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("to_ms")), "{b}");
    let r = p
        .http
        .get(format!("{}/api/v1/events", p.base))
        .bearer_auth(ADMIN)
        .header("last-event-id", "18446744073709551615")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["field"], "Last-Event-ID", "{b}");
    let (_, list) = p.call("GET", "/api/v1/tenants", Some(ADMIN), None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "only the demo tenant: {list}");
    // The last admin cannot step down (nothing could manage the platform after it).
    let (s, b) =
        p.call("POST", "/api/v1/accounts", Some(ADMIN), Some(json!({"name": "admin", "role": "viewer"}))).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("last_admin")), "{b}");
    let (s, _) = p.call("GET", "/api/v1/me", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK, "still admin, same token");
    // Policies: rules name the field; versions guard against lost updates.
    let (s, b) = p
        .call("PUT", "/api/v1/policies/strike", Some(ADMIN), Some(json!({"expected_version": 0, "body": {"strike_usd_per_mwh": 99999, "curtail_after": 2, "resume_after": 4}})))
        .await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("body.strike_usd_per_mwh")));
    let good = json!({"strike_usd_per_mwh": 80, "curtail_after": 2, "resume_after": 4});
    let (s, b) =
        p.call("PUT", "/api/v1/policies/strike", Some(ADMIN), Some(json!({"expected_version": 0, "body": good}))).await;
    assert_eq!((s, b["version"].as_i64()), (StatusCode::OK, Some(1)));
    let (s, _) =
        p.call("PUT", "/api/v1/policies/strike", Some(ADMIN), Some(json!({"expected_version": 0, "body": good}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, b) = p
        .call(
            "PUT",
            "/api/v1/policies/grid-commitment",
            Some(ADMIN),
            Some(json!({"expected_version": 0, "body": {"site": "nowhere", "program": "ERS-10", "mw": 1}})),
        )
        .await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("body.site")));
    // Query strings too.
    let (s, b) = p.call("GET", "/api/v1/devices?limit=5000", Some(ADMIN), None).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("limit")));
    let (s, _) = p.call("GET", "/api/v1/devices?colour=red", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    p.stop().await;
}

#[tokio::test]
async fn lists_page_audit_records_every_change_and_keys_are_rate_limited() {
    let p = Platform::start("pages").await;
    let (_, first) = p.call("GET", "/api/v1/devices?site=tx-west&limit=50", Some(ADMIN), None).await;
    let items = first["items"].as_array().unwrap();
    assert_eq!(items.len(), 50);
    assert!(items.iter().all(|d| d["site_id"] == "tx-west"));
    let after = first["next_after"].as_i64().unwrap();
    let (_, second) =
        p.call("GET", &format!("/api/v1/devices?site=tx-west&limit=50&after={after}"), Some(ADMIN), None).await;
    assert!(second["items"][0]["idx"].as_i64().unwrap() > after);
    // The page asked for before a change is not served after it.
    let (_, before) = p.call("GET", "/api/v1/devices?site=tx-west&limit=1000", Some(ADMIN), None).await;
    assert!(before["items"].as_array().unwrap().iter().all(|d| d["maintenance"] == false));
    let (s, _) = p
        .call("POST", "/api/v1/maintenance", Some(ADMIN), Some(json!({"scope": "site", "id": "tx-west", "on": true})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, all) = p.call("GET", "/api/v1/devices?site=tx-west&limit=1000", Some(ADMIN), None).await;
    let (_, m) = p.call("GET", "/api/v1/devices?maintenance=true&limit=1000", Some(ADMIN), None).await;
    let west: Vec<Value> = all["items"].as_array().unwrap().clone();
    assert!(!west.is_empty() && west.iter().all(|d| d["maintenance"] == true));
    assert_eq!(m["items"].as_array().unwrap().len(), west.len(), "exactly the site's devices");
    let (_, audit) = p.call("GET", "/api/v1/audit?limit=5", Some(ADMIN), None).await;
    let last = &audit["items"][0];
    assert_eq!((last["actor"].as_str(), last["action"].as_str()), (Some("account:admin"), Some("maintenance.set")));
    assert!(last["after_json"].as_str().unwrap().contains("\"on\":true") && last["before_json"].is_string());
    // A key with 1 request/s (burst 2) gets 429 with Retry-After.
    let (_, k) = p.call("POST", "/api/v1/tenants/demo/keys", Some(ADMIN), Some(json!({"rate_per_s": 1}))).await;
    let key = k["key"].as_str().unwrap().to_string();
    let mut statuses = vec![];
    for _ in 0..4 {
        let r = p.http.get(format!("{}/api/v1/me", p.base)).bearer_auth(&key).send().await.unwrap();
        statuses.push((r.status(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string())));
    }
    assert_eq!(statuses[0].0, StatusCode::OK);
    assert_eq!(statuses[3], (StatusCode::TOO_MANY_REQUESTS, Some("1".to_string())), "{statuses:?}");
    // Metrics: HTTP at once; the engine's once its first interval is recorded.
    let names = [
        "hcp_http_requests_total",
        "hcp_http_request_duration_seconds",
        "hcp_plan_seconds",
        "hcp_site_power_watts",
        "hcp_devices{",
        "hcp_engine_record_seconds",
    ];
    let mut text = String::new();
    for _ in 0..120 {
        text = p.http.get(format!("{}/metrics", p.base)).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
        if names.iter().all(|n| text.contains(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for name in names {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    p.stop().await;
}

#[tokio::test]
async fn the_engine_records_decisions_and_streams_live_events() {
    let p = Platform::start("engine").await;
    // Live events over SSE: interval updates arrive with sequence ids.
    let mut res =
        p.http.get(format!("{}/api/v1/events?topic=interval.*", p.base)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while buf.matches("event: interval.").count() < 4 {
        let chunk = tokio::time::timeout_at(deadline, res.chunk()).await.expect("events within 30 s").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(buf.contains("id: ") && buf.contains("\"mining_mw\""), "{buf}");
    drop(res);
    // Plans, decisions with reasons, signals and site power are in storage.
    let mut decided = false;
    for _ in 0..180 {
        let (_, d) = p.call("GET", "/api/v1/decisions?limit=5", Some(ADMIN), None).await;
        if let Some(first) = d["items"].as_array().and_then(|a| a.first()) {
            assert!(first["reason"].as_str().is_some_and(|r| !r.is_empty()));
            decided = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(decided, "the dispatcher made and recorded decisions");
    // A client that fetches on an event sees what the event announced (list pages are cached
    // until a change is announced; the event stream announces it before the client hears of it).
    let mut res =
        p.http.get(format!("{}/api/v1/events?topic=decision.*", p.base)).bearer_auth(ADMIN).send().await.unwrap();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let id = loop {
        let chunk =
            tokio::time::timeout_at(deadline, res.chunk()).await.expect("a decision within 60 s").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(data) = buf.lines().find_map(|l| l.strip_prefix("data: ")) {
            break serde_json::from_str::<Value>(data).unwrap()["id"].as_i64().unwrap();
        }
    };
    let (_, d) = p.call("GET", "/api/v1/decisions?limit=1000", Some(ADMIN), None).await;
    assert!(d["items"].as_array().unwrap().iter().any(|x| x["id"].as_i64() == Some(id)), "decision {id} listed");
    drop(res);
    let (_, sig) = p.call("GET", "/api/v1/signals?kind=rt_price&key=HB_WEST&limit=10", Some(ADMIN), None).await;
    assert!(!sig["items"].as_array().unwrap().is_empty());
    let (_, pw) = p.call("GET", "/api/v1/sites/tx-west/power", Some(ADMIN), None).await;
    let row = &pw["items"][0];
    assert!(row["power_w"].as_f64().unwrap() <= 750_000.0 * 1.0001, "under the site cap: {row}");
    let (s, ready) = p.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    // The device plane: simulated agents report, the resource manager marks them available,
    // commands go out and come back with outcomes, per-minute telemetry is stored.
    let mut available = 0;
    for _ in 0..60 {
        let (_, d) = p.call("GET", "/api/v1/devices?status=available&limit=1000", Some(ADMIN), None).await;
        available = d["items"].as_array().unwrap().len();
        if available > 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(available > 300, "most of the 336 devices report and are available: {available}");
    let (s, tm) = p.call("GET", "/api/v1/devices/0/telemetry", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);
    let first = &tm["items"][0];
    assert!(first["samples"].as_i64().unwrap() >= 1 && first["power_w_avg"].as_f64().unwrap() > 0.0, "{first}");
    let mut answered = false;
    for _ in 0..60 {
        let (_, c) = p.call("GET", "/api/v1/commands?limit=200", Some(ADMIN), None).await;
        answered = c["items"].as_array().unwrap().iter().any(|c| c["outcome"].as_str() == Some("applied"));
        if answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered, "commands were sent and applied");
    // Maintenance through the API reaches the engine's resource manager.
    let (s, _) = p
        .call("POST", "/api/v1/maintenance", Some(ADMIN), Some(json!({"scope": "site", "id": "tx-west", "on": true})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let mut seen = false;
    for _ in 0..60 {
        let m =
            p.http.get(format!("{}/metrics", p.base)).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
        seen = m.lines().any(|l| {
            l.starts_with("hcp_managed_devices{state=\"maintenance\"}")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
        });
        if seen {
            assert!(
                m.contains("hcp_switch_seconds") && m.contains("hcp_commands_total"),
                "switching and command metrics"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(seen, "the engine put the site in maintenance");
    // The router's capacity follows the plan and the devices: every GPU of the small fleet is a
    // replica; the site in maintenance has none in service once the engine has planned again.
    let mut west_out = false;
    for _ in 0..60 {
        let (s, r) = p.call("GET", "/api/v1/router", Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(r["replicas"].as_i64(), Some(64), "{r}");
        let site = |id: &str| r["by_site"].as_array().unwrap().iter().find(|x| x["site"] == id).cloned();
        let south = site("tx-south").expect("tx-south replicas");
        assert!(south["in_service"].as_i64().unwrap() > 0 && south["slots"].as_i64().unwrap() > 0, "{r}");
        west_out = site("tx-west").is_some_and(|w| w["in_service"] == 0);
        if west_out {
            let m = p
                .http
                .get(format!("{}/metrics", p.base))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(m.contains("hcp_router_slots"), "router metrics");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(west_out, "the site in maintenance serves nothing");
    p.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_docs_are_served() {
    let p = Platform::start("openapi").await;
    let (s, doc) = p.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    for (m, path, _) in routes() {
        // The document's path templates: /api/v1/devices/{idx} for /api/v1/devices/1, and so on.
        let bare = path.split('?').next().unwrap();
        let found = paths.iter().any(|(tpl, ops)| {
            let a: Vec<&str> = tpl.split('/').collect();
            let b: Vec<&str> = bare.split('/').collect();
            a.len() == b.len()
                && a.iter().zip(&b).all(|(x, y)| x.starts_with('{') || x == y)
                && ops.get(m.to_lowercase()).is_some()
        });
        assert!(found, "{m} {bare} is not in /openapi.json");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let r = p.http.get(format!("{}/docs/", p.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("swagger"), "Swagger UI is served from the binary");
    p.stop().await;
}

/// Same seed, same decisions: two platforms run the engine independently and record identical
/// decisions (time, site, kind, reason) over the first simulated day, whatever the wall-clock pace.
#[tokio::test]
async fn the_engine_is_deterministic_under_a_seed() {
    let a = Platform::start("det-a").await;
    let b = Platform::start("det-b").await;
    let horizon = hcp_model::SimTime::parse("2025-06-02").unwrap().0;
    let mut got = vec![];
    for p in [&a, &b] {
        let app = &p.running.as_ref().unwrap().app;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while app.engine_at_ms.load(std::sync::atomic::Ordering::Relaxed) <= horizon {
            assert!(tokio::time::Instant::now() < deadline, "the engine reached a simulated day");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut rows = vec![];
        let mut page = hcp_store::Page { after: None, limit: Some(1_000) };
        loop {
            let batch = app.store.decisions(None, &page).await.unwrap();
            let Some(last) = batch.last() else { break };
            page.after = Some(last.id);
            rows.extend(
                batch.into_iter().filter(|d| d.at_ms <= horizon).map(|d| (d.at_ms, d.site_id, d.kind, d.reason)),
            );
        }
        rows.sort();
        got.push(rows);
    }
    assert!(!got[0].is_empty(), "the dispatcher decided something in two days");
    assert_eq!(got[0], got[1]);
    a.stop().await;
    b.stop().await;
}

/// A strike policy saved through the REST API changes the next plan: the engine curtails with a
/// reason that names the policy and its version.
#[tokio::test]
async fn a_strike_policy_saved_through_the_api_changes_the_next_plan() {
    let p = Platform::start("strike").await;
    let app = p.running.as_ref().unwrap().app.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.engine_at_ms.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the engine decided");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asic = app.fleet.devices.iter().find(|d| matches!(d.model, hcp_model::ModelRef::Asic(_))).unwrap();
    let model = app.fleet.model_id(asic.model).to_string();
    // A strike below any price ERCOT clears at: every ASIC of the model is above it.
    let body = json!({"expected_version": 0, "body": {
        "strike_usd_per_mwh": 9_000.0, "models": {model.clone(): -999.0}, "curtail_after": 1, "resume_after": 1}});
    let (s, b) = p.call("PUT", "/api/v1/policies/strike", Some(ADMIN), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["version"], 1);
    let bad = json!({"expected_version": 1, "body": {"models": {"no-such-asic": 10.0}, "curtail_after": 1, "resume_after": 1}});
    let (s, b) = p.call("PUT", "/api/v1/policies/strike", Some(ADMIN), Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["field"], "body.models.no-such-asic", "{b}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, d) = p.call("GET", "/api/v1/decisions?limit=200", Some(ADMIN), None).await;
        let items = d["items"].as_array().cloned().unwrap_or_default();
        if let Some(x) = items.iter().find(|x| x["kind"] == "strike") {
            let reason = x["reason"].as_str().unwrap();
            assert!(reason.contains("policy strike v1") && reason.contains(&model), "{reason}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no strike decision: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop().await;
}

/// Stopping stops: the engine's worker ends within one interval of simulated time and well within
/// one interval of the default pace (1 s of wall time).
#[tokio::test]
async fn stop_ends_the_engine_within_one_interval() {
    let p = Platform::start("stop").await;
    let app = p.running.as_ref().unwrap().app.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.engine_at_ms.load(std::sync::atomic::Ordering::Relaxed)
        < hcp_model::SimTime::parse("2025-06-01T06:00").unwrap().0
    {
        assert!(tokio::time::Instant::now() < deadline, "the engine ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = app.engine_at_ms.load(std::sync::atomic::Ordering::Relaxed);
    let t = std::time::Instant::now();
    p.stop().await;
    let took = t.elapsed();
    assert!(app.engine_stopped.load(std::sync::atomic::Ordering::Relaxed), "the worker ended");
    let after = app.engine_at_ms.load(std::sync::atomic::Ordering::Relaxed);
    assert!(after - at <= 15 * 60_000, "{} ms of simulated time after stop", after - at);
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
}

// ---- the inference gateway and billing ----------------------------------------------------------

impl Platform {
    /// Waits until the router has replicas in service (the engine's first plan).
    async fn serving(&self) {
        for _ in 0..1200 {
            let (_, m) = self.call("GET", "/v1/models", Some(DEMO), None).await;
            if m["data"][0]["replicas_in_service"].as_u64().unwrap_or(0) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no replica came into service");
    }

    async fn infer(&self, path: &str, key: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.http.post(format!("{}{path}", self.base)).bearer_auth(key).json(&body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.unwrap()
    }

    /// A batch job once it is in `state` (polled every 50 ms, `tries` times), or as last seen.
    async fn job_in_state(&self, id: &str, state: &str, tries: u32) -> Value {
        let mut j = Value::Null;
        for _ in 0..tries {
            j = self.call("GET", &format!("/api/v1/jobs/{id}"), Some(DEMO), None).await.1;
            if j["state"] == state {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        j
    }

    async fn usage(&self, tag: &str) -> Vec<Value> {
        // A non-streamed answer is billed once handed to the connection, just after the client
        // has its headers: what was handed over is committed before the read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.running.as_ref().unwrap().app.meter.flush().await;
        let (s, u) = self.call("GET", &format!("/api/v1/usage?tag={tag}&limit=1000"), Some(DEMO), None).await;
        assert_eq!(s, StatusCode::OK, "{u}");
        u["items"].as_array().unwrap().clone()
    }
}

fn chat(max_tokens: u32, stream: bool, include_usage: bool) -> Value {
    let mut b = json!({
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "How is the grid today?"}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// SSE events of a whole streamed answer.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test]
async fn the_gateway_speaks_openai_and_meters_every_request_once() {
    let p = Platform::start("gateway").await;
    p.serving().await;
    let tag = [("x-hcp-tag", "t1")];
    // Whole answers.
    let r = p.infer("/v1/chat/completions", DEMO, chat(12, false, false), &tag).await;
    assert_eq!(r.status(), StatusCode::OK);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let b: Value = r.json().await.unwrap();
    assert_eq!((b["id"].as_str(), b["object"].as_str()), (Some(rid.as_str()), Some("chat.completion")));
    assert_eq!(b["usage"]["completion_tokens"], 12);
    let prompt = b["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(b["choices"][0]["message"]["content"].as_str().unwrap().split_whitespace().count() == 12);
    let r = p
        .infer("/v1/completions", DEMO, json!({"model": "llama-3-8b", "prompt": "The price is", "max_tokens": 3}), &tag)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b: Value = r.json().await.unwrap();
    assert_eq!((b["object"].as_str(), b["usage"]["completion_tokens"].as_i64()), (Some("text_completion"), Some(3)));
    // Streams: chunks, the usage chunk only when asked, [DONE] last.
    let r = p.infer("/v1/chat/completions", DEMO, chat(20, true, true), &tag).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let ev = events(&r.text().await.unwrap());
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(
        (usage["usage"]["completion_tokens"].as_i64(), usage["choices"].as_array().map(Vec::len)),
        (Some(20), Some(0))
    );
    let text: String = ev[..ev.len() - 2]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text.split_whitespace().count(), 20);
    let r = p.infer("/v1/chat/completions", DEMO, chat(5, true, false), &tag).await;
    let ev = events(&r.text().await.unwrap());
    assert!(ev.iter().all(|e| !e.contains("\"prompt_tokens\"")), "no usage chunk unless asked: {ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    // Exactly one usage record per served request, with the backend's token counts.
    let u = p.usage("t1").await;
    let got: Vec<(i64, i64)> =
        u.iter().map(|x| (x["input_tokens"].as_i64().unwrap(), x["output_tokens"].as_i64().unwrap())).collect();
    assert_eq!(got.len(), 4, "{u:?}");
    assert_eq!(got[0], (prompt, 12));
    assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), vec![12, 3, 20, 5]);
    assert!(u.iter().all(|x| x["tenant_id"] == "demo" && x["status"] == "completed" && x["tier"] == 1));
    assert_eq!(u[0]["id"].as_str(), Some(rid.as_str()));

    // Errors in OpenAI's shape.
    let r = p
        .infer("/v1/chat/completions", "hcpk_nokey_0123456789abcdef0123456789abcdef", chat(5, false, false), &[])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["error"]["type"].as_str(), e["error"]["code"].as_str()),
        (Some("authentication_error"), Some("invalid_api_key"))
    );
    let r = p.infer("/v1/chat/completions", DEMO, chat(9_000, false, false), &tag).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let r = p.infer("/v1/chat/completions", DEMO, json!({"model": "llama-3-8b", "messages": "hi"}), &tag).await;
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["error"]["type"].as_str(), e["error"]["param"].as_str()),
        (Some("invalid_request_error"), Some("messages"))
    );
    let r = p
        .infer(
            "/v1/chat/completions",
            DEMO,
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            &tag,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = p.infer("/v1/chat/completions", DEMO, chat(5, false, false), &[("x-hcp-priority", "0")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the key's default tier is 1: it may not ask for 0");
    let r = p
        .infer("/v1/chat/completions", DEMO, chat(5, false, false), &[("x-hcp-priority", "batch"), ("x-hcp-tag", "t2")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(p.usage("t2").await[0]["tier"], 2);
    // A client retry with the same idempotency key gets the same answer again, counted once.
    let idem = [("idempotency-key", "order-7"), ("x-hcp-tag", "t3")];
    let r = p.infer("/v1/chat/completions", DEMO, chat(4, false, false), &idem).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let first = r.text().await.unwrap();
    let r = p.infer("/v1/chat/completions", DEMO, chat(4, false, false), &idem).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.text().await.unwrap(), first);
    let u = p.usage("t3").await;
    assert_eq!((u.len(), u[0]["id"].as_str()), (1, Some("idem:demo:order-7")));
    assert_eq!(p.usage("t1").await.len(), 4, "refused requests leave no usage");

    // The invoice rates what was metered: list price, tier 1, 0.10 / 0.20 USD per million tokens.
    let period = {
        let (_, u) = p.call("GET", "/api/v1/usage?limit=1", Some(DEMO), None).await;
        let ms = u["items"][0]["at_ms"].as_i64().unwrap();
        hcp_billing::Period::containing(ms).label
    };
    let (s, inv) = p.call("GET", &format!("/api/v1/tenants/demo/invoices/{period}"), Some(DEMO), None).await;
    assert_eq!(s, StatusCode::OK, "{inv}");
    let lines = inv["lines"].as_array().unwrap();
    let sum: i64 = lines.iter().map(|l| l["amount_micro_usd"].as_i64().unwrap()).sum();
    assert_eq!(inv["total_micro_usd"].as_i64(), Some(sum));
    let out_t1 = lines.iter().find(|l| l["item"] == "output_tokens" && l["tier"] == 1).unwrap();
    assert_eq!(out_t1["quantity"].as_i64(), Some(12 + 3 + 20 + 5 + 4));
    assert_eq!(out_t1["amount_micro_usd"].as_i64(), Some(((44 * 200_000) as f64 / 1e6).round() as i64));
    let csv = p
        .http
        .get(format!("{}/api/v1/tenants/demo/invoices/{period}?format=csv", p.base))
        .bearer_auth(DEMO)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("tenant,period,description") && csv.trim_end().ends_with(&sum.to_string()), "{csv}");
    // Another tenant sees neither this usage nor this invoice.
    let (_, _) =
        p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(json!({"id": "rival", "name": "R", "weight": 1}))).await;
    let (_, k) = p.call("POST", "/api/v1/tenants/rival/keys", Some(ADMIN), Some(json!({}))).await;
    let rival = k["key"].as_str().unwrap().to_string();
    let (s, _) = p.call("GET", &format!("/api/v1/tenants/demo/invoices/{period}"), Some(&rival), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, u) = p.call("GET", "/api/v1/usage?tag=t1", Some(&rival), None).await;
    assert_eq!(u["items"].as_array().map(Vec::len), Some(0));
    let (s, _) = p.call("GET", "/api/v1/usage?tenant=demo", Some(&rival), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Admin's view of the month: every tenant's total, a balanced ledger.
    let (_, all) = p.call("GET", &format!("/api/v1/invoices/{period}"), Some(ADMIN), None).await;
    assert_eq!(all["items"][0]["total_micro_usd"].as_i64(), Some(sum));
    assert_eq!(all["ledger_balanced"], true);
    p.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_backend_and_pays_for_what_it_got() {
    let p = Platform::start("gateway-cancel").await;
    p.serving().await;
    let mut r = p.infer("/v1/chat/completions", DEMO, chat(4_000, true, false), &[("x-hcp-tag", "gone")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(r);
    let sim = p.running.as_ref().unwrap().app.sim.clone().unwrap();
    let mut u = vec![];
    for _ in 0..600 {
        u = p.usage("gone").await;
        if sim.cancelled.load(std::sync::atomic::Ordering::Relaxed) > 0 && !u.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim.cancelled.load(std::sync::atomic::Ordering::Relaxed) > 0, "the backend stopped generating");
    assert_eq!(u.len(), 1, "{u:?}");
    assert_eq!(u[0]["status"], "cancelled");
    let out = u[0]["output_tokens"].as_i64().unwrap();
    assert!((1..4_000).contains(&out), "billed what was delivered: {out}");
    p.stop().await;
}

#[tokio::test]
async fn batch_jobs_run_as_gangs_are_cancelled_and_billed_in_gpu_time() {
    let p = Platform::start("jobs").await;
    p.serving().await;
    let (s, j) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(json!({"gpus": 2, "duration_s": 0.3}))).await;
    assert_eq!(s, StatusCode::CREATED, "{j}");
    let id = j["id"].as_str().unwrap().to_string();
    let (s, long) = p
        .call("POST", "/api/v1/jobs", Some(DEMO), Some(json!({"gpus": 1, "duration_s": 600, "preemptible": false})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let long = long["id"].as_str().unwrap().to_string();
    let (s, b) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(json!({"gpus": 0, "duration_s": 1}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("gpus")));
    let done = p.job_in_state(&id, "completed", 600).await;
    assert_eq!(done["state"], "completed", "{done}");
    let (s, _) = p.call("DELETE", &format!("/api/v1/jobs/{long}"), Some(DEMO), None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    p.job_in_state(&long, "cancelled", 600).await;
    let (s, _) = p.call("DELETE", &format!("/api/v1/jobs/{long}"), Some(DEMO), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "already ended");
    let (_, list) = p.call("GET", "/api/v1/jobs", Some(DEMO), None).await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
    // One GPU-time record per job: 2 GPUs x >= 0.3 s, spot; the cancelled one on-demand.
    let (_, u) = p.call("GET", "/api/v1/usage?limit=100", Some(DEMO), None).await;
    let gpu: Vec<&Value> = u["items"].as_array().unwrap().iter().filter(|x| x["kind"] == "gpu").collect();
    assert_eq!(gpu.len(), 2, "{gpu:?}");
    let first = gpu.iter().find(|x| x["id"] == id.as_str()).unwrap();
    assert!(first["gpu_ms"].as_i64().unwrap() >= 600 && first["spot"] == true, "{first}");
    let second = gpu.iter().find(|x| x["id"] == long.as_str()).unwrap();
    assert_eq!((second["status"].as_str(), second["spot"].as_bool()), (Some("cancelled"), Some(false)));
    p.stop().await;
}

#[tokio::test]
async fn price_plans_apply_whole_periods_and_site_pnl_balances() {
    let p = Platform::start("plans").await;
    let mut plan = serde_json::to_value(hcp_billing::PricePlan::list()).unwrap();
    plan["tokens"][1]["output_micro_usd_per_mtok"] = json!(900_000);
    let (s, b) = p.call("PUT", "/api/v1/tenants/demo/price-plan", Some(ADMIN), Some(plan.clone())).await;
    assert_eq!((s, b["effective_ms"].as_i64()), (StatusCode::OK, Some(0)), "a first plan applies at once: {b}");
    plan["tokens"][1]["output_micro_usd_per_mtok"] = json!(1_000_000);
    let (_, b) = p.call("PUT", "/api/v1/tenants/demo/price-plan", Some(ADMIN), Some(plan.clone())).await;
    assert!(b["effective_ms"].as_i64().unwrap() > 0, "a change waits for the next period");
    let (_, now) = p.call("GET", "/api/v1/tenants/demo/price-plan", Some(DEMO), None).await;
    assert_eq!(now["plan"]["tokens"][1]["output_micro_usd_per_mtok"], 900_000);
    assert_eq!(now["pending"]["plan"]["tokens"][1]["output_micro_usd_per_mtok"], 1_000_000);
    plan["spot_discount_pct"] = json!(120);
    let (s, b) = p.call("PUT", "/api/v1/tenants/demo/price-plan", Some(ADMIN), Some(plan)).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("spot_discount_pct")));
    // The engine records each site's P&L per interval; the ledger of it balances.
    let mut pnl = Value::Null;
    for _ in 0..600 {
        let (_, v) = p
            .call("GET", &format!("/api/v1/pnl?from_ms=0&to_ms={}", hcp_server::routes::MAX_MS), Some(ADMIN), None)
            .await;
        if v["fleet"]["rows"].as_i64().unwrap_or(0) >= 4 {
            pnl = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pnl["sites"].as_array().map(Vec::len), Some(2), "{pnl}");
    assert_eq!(pnl["ledger_balanced"], true);
    let f = &pnl["fleet"];
    assert_eq!(pnl["simulated"], true, "demo mode's money is simulated");
    let margin = f["mining_revenue_micro_usd"].as_i64().unwrap()
        + f["inference_revenue_micro_usd"].as_i64().unwrap()
        + f["grid_credits_micro_usd"].as_i64().unwrap()
        - f["energy_cost_micro_usd"].as_i64().unwrap();
    assert_eq!(f["margin_micro_usd"].as_i64(), Some(margin));
    p.stop().await;
}

#[tokio::test]
async fn a_backend_that_fails_before_its_first_byte_is_skipped_and_the_request_retried() {
    // A working replica: the simulated backend alone on a port of its own; a dead one: a closed port.
    let replica = sim_replica().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let backend = |url: String| {
        hcp_server::gateway::BackendConfig::parse(&format!("url={url},model=llama-3-8b,slots=4")).unwrap()
    };
    let p = Platform::start_with("gateway-retry", false, vec![backend(format!("http://{dead}/v1")), backend(replica)])
        .await;
    let (_, m) = p.call("GET", "/v1/models", Some(DEMO), None).await;
    assert_eq!(m["data"][0]["replicas_in_service"], 2, "the two configured backends, no fleet replica: {m}");
    // Four at once: placement spreads them over both replicas, so some meet the dead one first.
    let mut all = vec![];
    for _ in 0..4 {
        all.push(p.infer("/v1/chat/completions", DEMO, chat(40, true, true), &[("x-hcp-tag", "retry")]));
    }
    for r in futures::future::join_all(all).await {
        assert_eq!(r.status(), StatusCode::OK);
        let ev = events(&r.text().await.unwrap());
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    }
    assert_eq!(p.usage("retry").await.len(), 4, "one record each");
    let (_, m) = p.call("GET", "/v1/models", Some(DEMO), None).await;
    assert_eq!(m["data"][0]["replicas_in_service"], 1, "the dead backend is held out: {m}");
    let metrics =
        p.http.get(format!("{}/metrics", p.base)).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("hcp_gateway_backend_failures_total"), "the failure is counted");
    p.stop().await;
}

/// The dashboard's read models: the fleet now, economics, alerts, workloads, usage by day and
/// backtests; the session login and its CSRF rule; the page and its assets.
#[tokio::test]
async fn the_dashboard_reads_backtests_and_session_login() {
    let p = Platform::start("dash").await;
    // The fleet now: per site, the split adds up to the cap; the totals are the sites' sums.
    let mut fleet = Value::Null;
    for _ in 0..300 {
        let (s, f) = p.call("GET", "/api/v1/fleet", Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK, "{f}");
        if f["sites"].as_array().unwrap().iter().all(|s| s["at_ms"].is_i64()) {
            fleet = f;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sites = fleet["sites"].as_array().expect("every site reported an interval");
    assert_eq!(sites.len(), 2);
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    let mut cap = 0.0;
    for s in sites {
        // Drawn, held off by a decision (by reason), and headroom nothing could use: the cap at least.
        let split = num(s, "mining_mw") + num(s, "inference_mw") + num(s, "curtailed_mw") + num(s, "headroom_mw");
        assert!((split - num(s, "cap_mw")).abs() < 1e-6 || split > num(s, "cap_mw"), "{s}");
        let held: f64 = s["held_off_mw"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((held - num(s, "curtailed_mw")).abs() < 1e-9, "{s}");
        assert!(num(s, "hashrate_ph_s") >= 0.0 && s["gpus_serving"].is_number() && s["margin_usd_per_h"].is_f64());
        cap += num(s, "cap_mw");
    }
    assert!((num(&fleet["totals"], "cap_mw") - cap).abs() < 1e-9);
    let models = fleet["models"].as_array().unwrap();
    assert_eq!(models.iter().map(|m| m["devices"].as_u64().unwrap()).sum::<u64>(), 384, "every device of the fleet");
    assert!(models.iter().any(|m| m["id"] == "h100-sxm" && m["kind"] == "gpu"), "{models:?}");
    // Economics: breakeven per model from the hashprice in force; the day ahead per site.
    let mut e = Value::Null;
    for _ in 0..300 {
        let (_, x) = p.call("GET", "/api/v1/economics", Some(ADMIN), None).await;
        if x["ahead"]["sites"].is_array() && x["hashprice_usd_per_ph_day"].is_f64() {
            e = x;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hp = num(&e, "hashprice_usd_per_ph_day");
    let models = e["breakeven"].as_array().unwrap();
    assert!(!models.is_empty());
    for m in models {
        let want = hp / 1_000.0 / (num(m, "j_per_th") * 0.024) * 1_000.0;
        assert!((num(m, "breakeven_usd_per_mwh") - want).abs() < 1e-9, "{m}");
    }
    for s in e["ahead"]["sites"].as_array().unwrap() {
        let n = s["day_ahead_usd_per_mwh"].as_array().unwrap().len();
        assert!(n > 0 && n <= 96, "{s}");
    }
    assert!(e["sites"].as_array().unwrap().iter().all(|s| s["rt_price_usd_per_mwh"].is_f64()));
    let (s, a) = p.call("GET", "/api/v1/alerts", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);
    for x in a["items"].as_array().unwrap() {
        assert!(["critical", "warning", "info"].contains(&x["severity"].as_str().unwrap()), "{x}");
    }
    // Workloads: an operator sees bands and tenants; a tenant only itself.
    let (_, w) = p.call("GET", "/api/v1/workloads", Some(ADMIN), None).await;
    assert_eq!(w["router"]["bands"].as_array().unwrap().len(), 3);
    let (_, w) = p.call("GET", "/api/v1/workloads", Some(DEMO), None).await;
    assert_eq!(w["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(w["tenants"][0]["tenant"], "demo");
    assert!(w.get("router").is_none());
    // Usage by day: a tenant's own; an operator names the tenant.
    let (s, b) = p.call("GET", "/api/v1/usage/daily", Some(ADMIN), None).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tenant")));
    let (s, b) = p.call("GET", "/api/v1/usage/daily", Some(DEMO), None).await;
    assert_eq!((s, b["tenant"].as_str()), (StatusCode::OK, Some("demo")), "{b}");
    let (s, _) = p.call("GET", "/api/v1/usage/daily?tenant=other", Some(DEMO), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Backtests: bad input names the field; a day of two policies runs.
    let operator = p.account("ops", "operator").await;
    for (body, field) in [
        (json!({"from": "2025-06-01", "days": 0}), "days"),
        (json!({"from": "2025-06-01", "days": 8}), "days"),
        (json!({"from": "junk", "days": 1}), "from"),
        (json!({"from": "2025-06-01", "days": 1, "policies": ["nope"]}), "policies"),
        (json!({"from": "2025-06-01", "days": 1, "policies": []}), "policies"),
        (json!({"from": "2025-06-01", "days": 1, "fleet": "nope"}), "fleet"),
        (json!({"from": "2025-06-01", "days": 1, "hashprice_usd_per_ph_day": -1.0}), "hashprice_usd_per_ph_day"),
        (json!({"from": "2025-06-01", "days": 1, "extra": 1}), "extra"),
    ] {
        let (s, b) = p.call("POST", "/api/v1/backtests", Some(&operator), Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {b}");
        assert!(b["error"]["field"].as_str().unwrap().starts_with(field), "{body}: {b}");
    }
    let body = json!({"from": "2025-06-01", "days": 1, "policies": ["always-on", "optimizer"]});
    let (s, b) = p.call("POST", "/api/v1/backtests", Some(&operator), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let names: Vec<&str> = b["outcomes"].as_array().unwrap().iter().map(|o| o["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["always-on", "optimizer"]);
    assert_eq!(b["chart"]["policy"], "optimizer");
    assert_eq!(b["chart"]["points"].as_array().unwrap().len(), 96, "a day of 15-minute intervals");
    let (_, list) = p.call("GET", "/api/v1/backtests", Some(&operator), None).await;
    assert_eq!(list["fleets"][0]["name"], "small");

    // The page: / leads to it; it and its assets come with a Content Security Policy.
    let no_redirect = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirect.get(format!("{}/", p.base)).send().await.unwrap();
    assert_eq!((r.status().is_redirection(), r.headers()["location"].to_str().unwrap()), (true, "/ui/"));
    for (path, kind) in [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let r = p.http.get(format!("{}{path}", p.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(kind));
        assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    }
    // Session login: a wrong token sets no cookie; the right one does, and it authenticates.
    let r = p
        .http
        .post(format!("{}/ui/login", p.base))
        .json(&json!({"token": "hcpa_admin_nopenopenopenopenope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());
    let r = p.http.post(format!("{}/ui/login", p.base)).json(&json!({"token": operator})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    // The cookie carries a session the server keeps, not the token; plain HTTP: not Secure.
    assert!(cookie.starts_with("hcp_session=hcps_") && !cookie.contains(&operator), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    let r = p.http.get(format!("{}/api/v1/me", p.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["account"], "ops");
    // A change by cookie needs the CSRF header; without it nothing changes.
    let body = json!({"scope": "device", "id": "2", "on": true});
    let r = p
        .http
        .post(format!("{}/api/v1/maintenance", p.base))
        .header("cookie", &session)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (_, d) = p.call("GET", "/api/v1/devices/2", Some(ADMIN), None).await;
    assert_eq!(d["maintenance"], false);
    let r = p
        .http
        .post(format!("{}/api/v1/maintenance", p.base))
        .header("cookie", &session)
        .header("x-hcp-csrf", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, d) = p.call("GET", "/api/v1/devices/2", Some(ADMIN), None).await;
    assert_eq!(d["maintenance"], true);
    // Behind a proxy that terminates TLS the cookie is Secure.
    let r = p
        .http
        .post(format!("{}/ui/login", p.base))
        .header("x-forwarded-proto", "https")
        .json(&json!({"token": operator}))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("; Secure"));
    // Logout ends the session on the server: the old cookie, replayed, is refused.
    let r = p.http.post(format!("{}/ui/logout", p.base)).header("cookie", &session).send().await.unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let r = p.http.get(format!("{}/api/v1/me", p.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A made-up session is refused too.
    let r = p.http.get(format!("{}/api/v1/me", p.base)).header("cookie", "hcp_session=hcps_00").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A new secret for the account ends the sessions opened with the old one.
    let r = p.http.post(format!("{}/ui/login", p.base)).json(&json!({"token": operator})).send().await.unwrap();
    let session = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let me = |c: String| p.http.get(format!("{}/api/v1/me", p.base)).header("cookie", c).send();
    assert_eq!(me(session.clone()).await.unwrap().status(), StatusCode::OK);
    p.account("ops", "operator").await;
    assert_eq!(me(session).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    p.stop().await;
}

async fn graphql(p: &Platform, token: &str, query: &str) -> Value {
    let (s, b) = p.call("POST", "/graphql", Some(token), Some(json!({ "query": query }))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// GraphQL: the same auth and tenant isolation as REST, depth and complexity limits.
#[tokio::test]
async fn graphql_reads_with_the_rest_rules_and_limits() {
    let p = Platform::start("graphql").await;
    p.serving().await;
    for i in 0..3 {
        let r = p.infer("/v1/chat/completions", DEMO, chat(4, false, false), &[("x-hcp-tag", "gql")]).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        // The whole answer read: its usage is committed before the body's end is sent.
        r.text().await.unwrap();
    }
    let b = graphql(
        &p,
        ADMIN,
        "{ me { account role } fleet { name sites { site capMw } } sites { id devices(limit: 3) { idx status telemetry { minuteMs } } } decisions(limit: 2) { kind reason } plans(limit: 1) { atMs summary } usage(tag: \"gql\") { tenantId outputTokens } }",
    )
    .await;
    assert!(b.get("errors").is_none(), "{b}");
    let d = &b["data"];
    assert_eq!((d["me"]["account"].as_str(), d["me"]["role"].as_str()), (Some("admin"), Some("admin")));
    assert_eq!(d["fleet"]["name"], "small");
    assert_eq!(d["sites"].as_array().unwrap().len(), 2);
    assert_eq!(d["sites"][0]["devices"].as_array().unwrap().len(), 3);
    assert_eq!(d["usage"].as_array().unwrap().len(), 3);
    assert!(d["usage"].as_array().unwrap().iter().all(|u| u["outputTokens"] == 4));
    // A tenant key: fleet data is forbidden; its usage is its own, another tenant's is not found.
    let b = graphql(&p, DEMO, "{ sites { id } }").await;
    assert_eq!(b["errors"][0]["extensions"]["code"], "forbidden", "{b}");
    assert!(b["data"].is_null());
    let b = graphql(&p, DEMO, "{ usage(limit: 10) { tenantId } }").await;
    let rows = b["data"]["usage"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|u| u["tenantId"] == "demo"), "{b}");
    let b = graphql(&p, DEMO, "{ usage(tenant: \"other\") { id } }").await;
    assert_eq!(b["errors"][0]["extensions"]["code"], "forbidden", "{b}");
    // Limits: too deep, too costly, a limit out of range.
    let b = graphql(&p, ADMIN, "{ __schema { types { fields { type { ofType { ofType { ofType { name } } } } } } } }")
        .await;
    assert!(b["errors"][0]["message"].as_str().unwrap().contains("nested too deep"), "{b}");
    let b = graphql(&p, ADMIN, "{ devices(limit: 1000) { idx telemetry { minuteMs powerWAvg } } }").await;
    assert!(b["errors"][0]["message"].as_str().unwrap().contains("too complex"), "{b}");
    let b = graphql(&p, ADMIN, "{ devices(limit: 5000) { idx } }").await;
    assert!(b["errors"][0]["message"].as_str().unwrap().contains("limit"), "{b}");
    // GET works too; a body that is not GraphQL names the field.
    let (s, b) = p.call("GET", "/graphql?query=%7Bme%7Brole%7D%7D", Some(ADMIN), None).await;
    assert_eq!((s, b["data"]["me"]["role"].as_str()), (StatusCode::OK, Some("admin")));
    let (s, b) = p.call("POST", "/graphql", Some(ADMIN), Some(json!({"nope": 1}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("body")));
    p.stop().await;
}

/// The simulated backend alone on a port of its own: the base URL of one GPU replica's OpenAI API.
async fn sim_replica() -> String {
    let fleet = Fleet::from_toml(
        "small.toml",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml")),
    )
    .unwrap();
    let gpu = fleet.devices.iter().position(|d| matches!(d.model, hcp_model::ModelRef::Gpu(_))).unwrap();
    let sim = std::sync::Arc::new(hcp_server::simbackend::SimBackend::new(fleet));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, hcp_server::simbackend::router(sim)).await });
    format!("http://{addr}/r/{gpu}/v1")
}

/// Serves a test backend on a port of its own; its configuration for the gateway (4 slots).
async fn serve_backend(router: axum::Router) -> hcp_server::gateway::BackendConfig {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    hcp_server::gateway::BackendConfig::parse(&format!("url=http://{addr}/v1,model=llama-3-8b,slots=4")).unwrap()
}

/// Passes a chat completion request on to the replica at `up`.
async fn upstream_chat(up: &str, body: axum::body::Bytes) -> reqwest::Response {
    Client::new()
        .post(format!("{up}/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The replica at `up`'s answer to a chat completion request, relayed as it comes.
async fn relay_chat(up: &str, body: axum::body::Bytes) -> axum::response::Response {
    let r = upstream_chat(up, body).await;
    axum::response::Response::builder()
        .status(r.status().as_u16())
        .header("content-type", r.headers()["content-type"].clone())
        .body(axum::body::Body::from_stream(r.bytes_stream()))
        .unwrap()
}

/// A test server's `/v1/models` (the gateway's health check), answered by the replica at `up`.
fn replica_models(up: String) -> axum::Router {
    axum::Router::new().route(
        "/v1/models",
        axum::routing::get(move || {
            let up = up.clone();
            async move { reqwest::get(format!("{up}/models")).await.unwrap().text().await.unwrap() }
        }),
    )
}

/// After `[DONE]` the gateway reads the rest of the backend's body (the end of its chunked
/// encoding), so the connection goes back to the pool: requests one after the other use one
/// connection instead of opening (and the backend accepting) a new one each.
#[tokio::test]
async fn a_finished_stream_leaves_its_backend_connection_open_for_the_next_request() {
    use futures::StreamExt;
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    let upstream = sim_replica().await;
    let peers: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    let backend = {
        let peers = peers.clone();
        replica_models(upstream).route(
            "/v1/chat/completions",
            axum::routing::post(move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| {
                let peers = peers.clone();
                async move {
                    peers.lock().unwrap().insert(peer);
                    let chunk = |v: Value| axum::body::Bytes::from(format!("data: {v}\n\n"));
                    let events = vec![
                        chunk(json!({"choices": [{"index": 0, "delta": {"content": "abcd"}}]})),
                        chunk(json!({"choices": [{"index": 0, "delta": {"content": "efgh"}}]})),
                        chunk(json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})),
                        axum::body::Bytes::from_static(b"data: [DONE]\n\n"),
                    ];
                    // The body ends a moment after `[DONE]`, in a write of its own (as servers do
                    // that finish the response after the generator returns).
                    let body = futures::stream::iter(events.into_iter().map(Ok::<_, std::io::Error>)).chain(
                        futures::stream::once(async {
                            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                            Ok(axum::body::Bytes::new())
                        }),
                    );
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::from_stream(body))
                        .unwrap()
                }
            }),
        )
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, backend.into_make_service_with_connect_info::<SocketAddr>()).await });
    let backend =
        hcp_server::gateway::BackendConfig::parse(&format!("url=http://{addr}/v1,model=llama-3-8b,slots=4")).unwrap();
    let p = Platform::start_with("gateway-keepalive", false, vec![backend]).await;
    for _ in 0..6 {
        let r = p.infer("/v1/chat/completions", DEMO, chat(2, true, true), &[("x-hcp-tag", "keepalive")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let used = peers.lock().unwrap().len();
    assert!(used <= 2, "6 streams one after the other opened {used} connections to the backend");
    assert_eq!(p.usage("keepalive").await.len(), 6);
    p.stop().await;
}

/// A backend configured with `http2=true` is called over HTTP/2 without TLS, and its streams
/// share one connection: requests at once, each answered in full and metered once.
#[tokio::test]
async fn an_http2_backend_serves_concurrent_streams_over_one_connection() {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    let upstream = sim_replica().await;
    let seen: Arc<Mutex<Vec<(SocketAddr, axum::http::Version)>>> = Arc::default();
    let backend = {
        let seen = seen.clone();
        replica_models(upstream.clone()).route(
            "/v1/chat/completions",
            axum::routing::post(
                move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
                      req: axum::extract::Request| {
                    let (seen, up) = (seen.clone(), upstream.clone());
                    async move {
                        seen.lock().unwrap().push((peer, req.version()));
                        let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
                        relay_chat(&up, body).await
                    }
                },
            ),
        )
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, backend.into_make_service_with_connect_info::<SocketAddr>()).await });
    let config = format!("url=http://{addr}/v1,model=llama-3-8b,slots=4,http2=true");
    let backend = hcp_server::gateway::BackendConfig::parse(&config).unwrap();
    assert!(backend.http2);
    let p = Platform::start_with("gateway-http2", false, vec![backend]).await;
    let all = (0..4).map(|i| p.infer("/v1/chat/completions", DEMO, chat(30, i % 2 == 0, true), &[("x-hcp-tag", "h2")]));
    for r in futures::future::join_all(all).await {
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n") || text.contains("\"choices\""), "{text}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|(_, v)| *v == axum::http::Version::HTTP_2), "{seen:?}");
    let peers: HashSet<_> = seen.iter().map(|(peer, _)| *peer).collect();
    assert_eq!(peers.len(), 1, "four requests at once share one connection: {seen:?}");
    assert_eq!(p.usage("h2").await.len(), 4);
    p.stop().await;
}

/// A backend that fails one request before its first byte takes no new work until its health
/// check passes, but the stream it is serving goes on to its end.
#[tokio::test]
async fn a_failed_request_holds_its_replica_out_of_new_work_without_cutting_its_streams() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let upstream = sim_replica().await;
    // In front of it, a server whose second completion request fails with a 500.
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = calls.clone();
        replica_models(upstream.clone()).route(
            "/v1/chat/completions",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (calls, up) = (calls.clone(), upstream.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                        return axum::response::Response::builder()
                            .status(500)
                            .body(axum::body::Body::from("down"))
                            .unwrap();
                    }
                    relay_chat(&up, body).await
                }
            }),
        )
    };
    let backend = serve_backend(flaky).await;
    let p = Platform::start_with("gateway-cordon", false, vec![backend]).await;
    // A long stream starts; once it has its first bytes, a second request meets the failure.
    let mut long = p.infer("/v1/chat/completions", DEMO, chat(400, true, true), &[("x-hcp-tag", "cordon")]).await;
    assert_eq!(long.status(), StatusCode::OK);
    let mut text = String::from_utf8_lossy(&long.chunk().await.unwrap().unwrap()).to_string();
    let second = p.infer("/v1/chat/completions", DEMO, chat(8, true, true), &[("x-hcp-tag", "cordon")]).await;
    assert_eq!(second.status(), StatusCode::OK, "placed again once the health check passed");
    let ev = events(&second.text().await.unwrap());
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    while let Some(c) = long.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    let ev = events(&text);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "the long stream was not cut");
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 400);
    assert!(!text.contains("preempted"), "{text}");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the first, the failed one, its retry");
    let records = p.usage("cordon").await;
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["status"] == "completed"), "{records:?}");
    p.stop().await;
}

/// A batch job survives a restart of the API process: handed back with the time it ran, resumed
/// at the next start, billed once for all of it.
#[tokio::test]
async fn a_running_job_is_resumed_after_a_restart_and_billed_once() {
    let p = Platform::start("jobs-resume").await;
    p.serving().await;
    let body = json!({"gpus": 2, "duration_s": 6, "preemptible": false});
    let (s, j) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{j}");
    let id = j["id"].as_str().unwrap().to_string();
    let j = p.job_in_state(&id, "running", 300).await;
    assert_eq!(j["state"], "running", "the job started: {j}");
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    p.stop_keeping_data().await;

    let restarted = std::time::Instant::now();
    let p = Platform::start_in("jobs-resume", true, vec![], false).await;
    let (_, j) = p.call("GET", &format!("/api/v1/jobs/{id}"), Some(DEMO), None).await;
    assert!(j["ran_ms"].as_i64().unwrap() >= 2_800, "the time it ran before the stop is kept: {j}");
    let done = p.job_in_state(&id, "completed", 600).await;
    assert_eq!(done["state"], "completed", "{done}");
    // It ran what was left (about 3 s), not its 6 s again from the start (when no capacity change
    // after the restart preempted it: then it also waits to be placed again).
    if done["preemptions"] == j["preemptions"] {
        assert!(restarted.elapsed() < Duration::from_millis(5_500), "resumed, not rerun: {done}");
    }
    let ran = done["ran_ms"].as_i64().unwrap();
    assert_eq!(ran, 6_000, "its time, once: {done}");
    let (_, u) = p.call("GET", "/api/v1/usage?limit=100", Some(DEMO), None).await;
    let gpu: Vec<&Value> = u["items"].as_array().unwrap().iter().filter(|x| x["id"] == id.as_str()).collect();
    assert_eq!(gpu.len(), 1, "billed once: {gpu:?}");
    assert_eq!(gpu[0]["gpu_ms"].as_i64().unwrap(), 2 * ran);
    p.stop().await;
}

/// A tenant created with the defaults (no guarantee, no borrowing) can never be served: its
/// requests and jobs are refused at once, saying which settings make that so, instead of waiting
/// for the queue's timeout.
#[tokio::test]
async fn a_tenant_that_can_never_be_served_is_told_at_once() {
    let p = Platform::start("no-capacity").await;
    let (s, b) =
        p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(json!({"id": "idle", "name": "I", "weight": 1}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (_, k) = p.call("POST", "/api/v1/tenants/idle/keys", Some(ADMIN), Some(json!({}))).await;
    let key = k["key"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let r = p.infer("/v1/chat/completions", &key, chat(8, false, false), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_none(), "retrying does not help");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "insufficient_quota", "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("borrow_limit_gpus"), "{b}");
    assert!(started.elapsed() < Duration::from_secs(5), "at once, not after the queue's timeout");
    let (s, b) = p.call("POST", "/api/v1/jobs", Some(&key), Some(json!({"gpus": 1, "duration_s": 1}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tenant")), "{b}");
    p.stop().await;
}

/// What a new user meets first: `/` says where things are (and sends a browser to the dashboard),
/// and the decisions are not empty once the engine has planned: the initial plan is recorded for
/// each site, whether or not it changed a device.
#[tokio::test]
async fn the_root_says_where_things_are_and_the_initial_plan_is_recorded() {
    let p = Platform::start("first-hour").await;
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/ui/");
    let body = r.text().await.unwrap();
    assert!(body.contains("/docs") && body.contains("/v1") && body.contains("/ui/"), "{body}");
    let mut initial = vec![];
    for _ in 0..200 {
        // The first two decisions recorded (newest first below id 3).
        let (s, v) = p.call("GET", "/api/v1/decisions?after=3&limit=10", Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        initial = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"] == "initial_plan")
            .map(|d| (d["site_id"].as_str().unwrap().to_string(), d["reason"].as_str().unwrap().to_string()))
            .collect::<Vec<_>>();
        if initial.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    initial.sort();
    assert_eq!(initial.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["tx-south", "tx-west"], "{initial:?}");
    assert!(initial.iter().all(|(_, r)| r.starts_with("engine started: ASICs")), "{initial:?}");
    p.stop().await;
}

/// A batch job with a deadline waits for the engine's planner (state `deferred`), is placed where
/// its energy costs least before its deadline, starts when the plan says and completes, billed
/// once; a deferred job can be cancelled; a deadline shorter than the run is refused, naming it.
#[tokio::test]
async fn a_job_with_a_deadline_waits_for_the_planner_and_completes_in_time() {
    let p = Platform::start("jobs-defer").await;
    p.serving().await;
    let bad = json!({"gpus": 2, "duration_s": 3, "deadline_s": 2});
    let (s, e) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e.to_string().contains("deadline_s"), "{e}");
    // The demo runs 45,000 times as fast: 0.3 s is 15 intervals, 10 s is 500.
    let body = json!({"gpus": 2, "duration_s": 0.3, "deadline_s": 10, "preemptible": false});
    let (s, j) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{j}");
    assert_eq!(j["state"], "deferred", "{j}");
    let deadline = j["deadline_ms"].as_i64().unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    let done = p.job_in_state(&id, "completed", 300).await;
    assert_eq!(done["state"], "completed", "{done}");
    let planned = &done["planned"];
    assert!(planned.is_object(), "the planner placed it: {done}");
    assert!(planned["finish_ms"].as_i64().unwrap() <= deadline, "planned to finish in time: {done}");
    assert!(planned["planned_usd"].as_f64().unwrap() <= planned["now_usd"].as_f64().unwrap() + 1e-9, "{done}");
    // Placement by the router and model loading take wall time the demo's 20 ms intervals do not
    // plan for: completion is within a second of the deadline.
    assert!(done["updated_ms"].as_i64().unwrap() <= deadline + 1_000, "{done}");
    let (_, u) = p.call("GET", "/api/v1/usage?limit=100", Some(DEMO), None).await;
    let gpu: Vec<&Value> = u["items"].as_array().unwrap().iter().filter(|x| x["id"] == id.as_str()).collect();
    assert_eq!(gpu.len(), 1, "billed once: {gpu:?}");

    let body = json!({"gpus": 2, "duration_s": 0.3, "deadline_s": 86_400});
    let (_, j) = p.call("POST", "/api/v1/jobs", Some(DEMO), Some(body)).await;
    let id = j["id"].as_str().unwrap().to_string();
    let (s, _) = p.call("DELETE", &format!("/api/v1/jobs/{id}"), Some(DEMO), None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let j = p.job_in_state(&id, "cancelled", 100).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    p.stop().await;
}

/// A backend that frames its events with CRLF pairs is relayed and metered exactly; a stream whose
/// replica leaves service after its first byte ends with a `preempted` error event and a usage
/// record of what was delivered.
#[tokio::test]
async fn crlf_framed_streams_are_relayed_and_a_stream_preempted_midway_is_recorded() {
    let upstream = sim_replica().await;
    // In front of it, a server that turns every LF of the stream into CRLF.
    let crlf = {
        replica_models(upstream.clone()).route(
            "/v1/chat/completions",
            axum::routing::post(move |body: axum::body::Bytes| {
                let up = upstream.clone();
                async move {
                    use futures::StreamExt;
                    let r = upstream_chat(&up, body).await;
                    let stream = r.bytes_stream().map(|c| {
                        c.map(|b| {
                            let s = String::from_utf8_lossy(&b).replace('\n', "\r\n");
                            axum::body::Bytes::from(s)
                        })
                    });
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::from_stream(stream))
                        .unwrap()
                }
            }),
        )
    };
    let backend = serve_backend(crlf).await;
    let p = Platform::start_with("gateway-crlf", false, vec![backend]).await;
    let r = p.infer("/v1/chat/completions", DEMO, chat(24, true, true), &[("x-hcp-tag", "crlf")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let ev = events(&text.replace('\r', ""));
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{text}");
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 24, "the usage chunk was found in CRLF framing");
    let records = p.usage("crlf").await;
    assert_eq!((records.len(), records[0]["output_tokens"].as_i64()), (1, Some(24)));
    // Time to first token is the first chunk's, not the end's: a long stream reports its progress.
    let started = std::time::Instant::now();
    let r = p.infer("/v1/chat/completions", DEMO, chat(600, true, false), &[("x-hcp-tag", "long")]).await;
    let text = r.text().await.unwrap();
    let whole_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(text.contains("[DONE]"));
    let (_, w) = p.call("GET", "/api/v1/workloads", Some(DEMO), None).await;
    let band = w["tenants"][0]["bands"].as_array().unwrap().iter().find(|b| b["dispatched"] == 2).cloned().unwrap();
    let ttft = band["ttft_ms_mean"].as_f64().unwrap();
    assert!(ttft < whole_ms / 3.0, "mean first token {ttft} ms of two streams, the long one took {whole_ms} ms");
    // Preempted after its first byte: the backend leaves service (capacity gone).
    let mut r = p.infer("/v1/chat/completions", DEMO, chat(2_000, true, true), &[("x-hcp-tag", "preempt")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut text = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).to_string();
    let id = i64::from(hcp_server::gateway::BACKEND_ID_BASE);
    p.running.as_ref().unwrap().app.router.lock().unwrap().set_down(&[id], true, hcp_server::wall_ms());
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("preempted"), "{text}");
    assert!(!text.contains("[DONE]"), "a cut stream does not claim to be done: {text}");
    let records = p.usage("preempt").await;
    assert_eq!(records.len(), 1, "one record of what was delivered");
    assert_eq!(records[0]["status"], "preempted");
    assert!(records[0]["output_tokens"].as_i64().unwrap() < 2_000, "{:?}", records[0]);
    p.stop().await;
}

/// A tenant's allowance a minute holds over all its keys (ten keys are not ten times the
/// throughput), for requests and for tokens; and a tenant holds at most
/// `MAX_KEYS_PER_TENANT` keys unrevoked.
#[tokio::test]
async fn a_tenant_is_limited_over_all_its_keys() {
    let p = Platform::start("tenant-limits").await;
    p.serving().await;
    let tenant = |id: &str, rpm: i64, tpm: i64| json!({"id": id, "name": id, "weight": 1, "borrow_limit_gpus": 64, "requests_per_min": rpm, "tokens_per_min": tpm});
    let (s, b) = p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(tenant("few", 4, 1_000_000))).await;
    assert_eq!((s, b["requests_per_min"].as_i64()), (StatusCode::CREATED, Some(4)), "{b}");
    let mut keys = vec![];
    for _ in 0..3 {
        let (_, k) = p.call("POST", "/api/v1/tenants/few/keys", Some(ADMIN), Some(json!({}))).await;
        keys.push(k["key"].as_str().unwrap().to_string());
    }
    let mut statuses = vec![];
    for i in 0..6 {
        let r = p.infer("/v1/chat/completions", &keys[i % 3], chat(4, false, false), &[]).await;
        statuses.push(r.status());
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers().get("retry-after").is_some());
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"]["code"], "rate_limit_exceeded", "{b}");
            assert!(b["error"]["message"].as_str().unwrap().contains("requests_per_min"), "{b}");
        }
    }
    // (A minute boundary between the requests would start a new window: then at most 4 more.)
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!((4..=5).contains(&served) && statuses[..4].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    // Tokens: each request reserves its prompt and max_tokens; 100 a minute is about three.
    let (s, _) = p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(tenant("thin", 1_000, 100))).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, k) = p.call("POST", "/api/v1/tenants/thin/keys", Some(ADMIN), Some(json!({}))).await;
    let key = k["key"].as_str().unwrap().to_string();
    let mut refused = None;
    for i in 0..10 {
        let r = p.infer("/v1/chat/completions", &key, chat(20, false, false), &[]).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let b: Value = r.json().await.unwrap();
            assert!(b["error"]["message"].as_str().unwrap().contains("tokens_per_min"), "{b}");
            refused = Some(i);
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert!(refused.is_some_and(|i| (2..=8).contains(&i)), "refused at request {refused:?}");
    // Bounds are named.
    let (s, b) = p.call("POST", "/api/v1/tenants", Some(ADMIN), Some(tenant("zero", 0, 1))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("requests_per_min")));
    // The key cap: 3 keys so far, up to the cap, then refused naming the tenant; a revoked key
    // frees its place.
    let mut last = String::new();
    for _ in 3..hcp_store::MAX_KEYS_PER_TENANT {
        let (s, k) = p.call("POST", "/api/v1/tenants/few/keys", Some(ADMIN), Some(json!({}))).await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        last = k["id"].as_str().unwrap().to_string();
    }
    let (s, b) = p.call("POST", "/api/v1/tenants/few/keys", Some(ADMIN), Some(json!({}))).await;
    assert_eq!((s, b["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tenant")), "{b}");
    let (s, _) = p.call("DELETE", &format!("/api/v1/keys/{last}"), Some(ADMIN), None).await;
    assert!(s.is_success());
    let (s, _) = p.call("POST", "/api/v1/tenants/few/keys", Some(ADMIN), Some(json!({}))).await;
    assert_eq!(s, StatusCode::CREATED);
    p.stop().await;
}

/// Idempotency keys make a retry safe after anything: a streamed answer is given again whole; an
/// answer whose process stopped after keeping it but before its usage reached storage is given
/// again and billed then, once; a request without a key is billed once its answer has been
/// handed over.
#[tokio::test]
async fn a_retried_idempotency_key_gets_its_answer_and_is_billed_once() {
    let p = Platform::start("idem").await;
    p.serving().await;
    let idem = [("idempotency-key", "stream-1"), ("x-hcp-tag", "s1")];
    let r = p.infer("/v1/chat/completions", DEMO, chat(6, true, true), &idem).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.text().await.unwrap();
    assert!(first.ends_with("data: [DONE]\n\n"), "{first}");
    let r = p.infer("/v1/chat/completions", DEMO, chat(6, true, true), &idem).await;
    assert_eq!((r.status(), r.headers()["content-type"].to_str().unwrap()), (StatusCode::OK, "text/event-stream"));
    assert_eq!(r.text().await.unwrap(), first, "the same events, whole");
    assert_eq!(p.usage("s1").await.len(), 1);
    // As after a crash: the answer was kept, the usage never written. The retry answers and bills.
    let app = &p.running.as_ref().unwrap().app;
    let usage = json!({
        "seq": 0, "id": "idem:demo:lost-1", "tenant_id": "demo", "key_id": "demo1", "kind": "tokens", "tier": 1,
        "model": "llama-3-8b", "site_id": "tx-west", "input_tokens": 7, "output_tokens": 9, "gpu_ms": 0,
        "spot": false, "status": "completed", "tag": "s2", "at_ms": hcp_server::wall_ms(),
    });
    app.store
        .put_outcome(&hcp_store::OutcomeRow {
            id: "idem:demo:lost-1".into(),
            status: 200,
            content_type: "application/json".into(),
            body: r#"{"id":"chatcmpl-kept","choices":[]}"#.into(),
            usage: usage.to_string(),
            at_ms: hcp_server::wall_ms(),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let r = p.infer("/v1/chat/completions", DEMO, chat(4, false, false), &[("idempotency-key", "lost-1")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.json::<Value>().await.unwrap()["id"], "chatcmpl-kept");
    }
    let u = p.usage("s2").await;
    assert_eq!((u.len(), u[0]["output_tokens"].as_i64()), (1, Some(9)), "billed once, as kept");
    // Another tenant's key of the same name is another key.
    let (_, t) = p
        .call(
            "POST",
            "/api/v1/tenants",
            Some(ADMIN),
            Some(json!({"id": "other", "name": "O", "weight": 1, "borrow_limit_gpus": 64})),
        )
        .await;
    assert_eq!(t["id"], "other");
    let (_, k) = p.call("POST", "/api/v1/tenants/other/keys", Some(ADMIN), Some(json!({}))).await;
    let other = k["key"].as_str().unwrap().to_string();
    let r = p.infer("/v1/chat/completions", &other, chat(4, false, false), &[("idempotency-key", "lost-1")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_ne!(r.json::<Value>().await.unwrap()["id"], "chatcmpl-kept");
    // Without a key: the usage follows the answer.
    let r = p.infer("/v1/chat/completions", DEMO, chat(4, false, false), &[("x-hcp-tag", "s3")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let mut u = vec![];
    for _ in 0..50 {
        u = p.usage("s3").await;
        if !u.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((u.len(), u[0]["id"].as_str()), (1, Some(id.as_str())));
    p.stop().await;
}
