//! The scaled-out shape: a dispatcher process and an API process sharing PostgreSQL and NATS
//! JetStream (the machine's servers). What the dispatcher records, the API serves; what it
//! publishes, the API streams.

use std::time::Duration;

use hcp_model::fleet::Fleet;
use hcp_server::Config;
use hcp_store::Store;

const ADMIN: &str = "hcpa_admin_0123456789abcdef0123456789abcdef";

fn pg_admin_url() -> String {
    std::env::var("HCP_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn nats_url() -> String {
    std::env::var("HCP_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap()
}

/// Submits a job and waits (up to 10 s) until it runs; its id.
async fn submit_running_job(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> String {
    let r = http.post(format!("{url}/api/v1/jobs")).bearer_auth(ADMIN).json(body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    job_state(http, url, &id, "running").await;
    id
}

/// A job's state once it is `want`, or the last one seen after 10 s.
async fn job_state(http: &reqwest::Client, url: &str, id: &str, want: &str) -> serde_json::Value {
    let mut state = serde_json::Value::Null;
    for _ in 0..100 {
        state = get_json(http, &format!("{url}/api/v1/jobs/{id}")).await["state"].clone();
        if state == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state
}

#[tokio::test]
async fn a_dispatcher_and_an_api_share_postgres_and_nats() {
    let db = format!("hcp_scaled_{}", std::process::id());
    let admin = Store::open(&pg_admin_url()).await.expect("PostgreSQL at 127.0.0.1:5432 (see .ci/run)");
    admin.exec_admin(&format!("DROP DATABASE IF EXISTS {db}")).await.unwrap();
    admin.exec_admin(&format!("CREATE DATABASE {db}")).await.unwrap();
    let base = pg_admin_url();
    let store_url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
    let fleet = Fleet::from_toml(
        "small.toml",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml")),
    )
    .unwrap();
    let cfg = |engine: bool| Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        store_url: store_url.clone(),
        bus_url: Some(nats_url()),
        fleet: fleet.clone(),
        engine,
        api: !engine,
        seed: 11,
        speed: 900.0 * 20.0,
        engine_config: Default::default(),
        mode: Default::default(),
        admin_token: Some(ADMIN.into()),
        demo_tenant_key: None,
        account_rate_per_s: 1_000.0,
        sim_backend_listen: Some("127.0.0.1:0".parse().unwrap()),
        backends: vec![],
        // HTTP/1.1 here, HTTP/2 in the single-process tests: both ways to the backend are run.
        sim_backend_http2: false,
        backtest_fleets: vec![],
        net: Default::default(),
    };
    // The API first, subscribed, then the dispatcher: its first intervals reach the stream.
    let (store, _) = hcp_server::prepare(&cfg(false)).await.unwrap();
    let api = hcp_server::start(cfg(false), store).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}", api.addr);
    let mut events =
        http.get(format!("{url}/api/v1/events?topic=interval.tx-south")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(events.status(), 200);
    let (store, _) = hcp_server::prepare(&cfg(true)).await.unwrap();
    let dispatcher = hcp_server::start(cfg(true), store).await.unwrap();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while buf.matches("event: interval.tx-south").count() < 3 {
        let chunk = tokio::time::timeout_at(deadline, events.chunk()).await.expect("events via NATS").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(events);
    // What the dispatcher stored, the API serves.
    let mut signals = 0;
    for _ in 0..40 {
        let r = get_json(&http, &format!("{url}/api/v1/signals?kind=rt_price&key=HB_SOUTH&limit=100")).await;
        signals = r["items"].as_array().unwrap().len();
        if signals >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(signals >= 3, "the API reads what the dispatcher wrote: {signals}");
    // The router in the API process gets its capacity from the dispatcher's plans (NATS notices).
    let mut replicas = 0;
    for _ in 0..40 {
        let r = get_json(&http, &format!("{url}/api/v1/router")).await;
        replicas = r["replicas"].as_i64().unwrap();
        if replicas == 64 && r["slots"].as_i64().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(replicas, 64, "every GPU of the small fleet is a replica of the API's router");
    // An API process started later loads the capacity from storage.
    let (store, _) = hcp_server::prepare(&cfg(false)).await.unwrap();
    let late = hcp_server::start(cfg(false), store).await.unwrap();
    let r = get_json(&http, &format!("http://{}/api/v1/router", late.addr)).await;
    assert_eq!(r["replicas"].as_i64(), Some(64), "{r}");
    // A batch job submitted to one API process is cancelled through the other: its holder hears
    // the cancel on the bus, ends it and bills the time it ran.
    let body = serde_json::json!({"gpus": 1, "duration_s": 600, "tenant": "demo"});
    let id = submit_running_job(&http, &url, &body).await;
    let r = http.delete(format!("http://{}/api/v1/jobs/{id}", late.addr)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 202, "accepted by a process that does not run it");
    assert_eq!(job_state(&http, &url, &id, "cancelled").await, "cancelled");
    // A job whose holder stopped renewing it (its lease lapsed, as after a crash) is claimed and
    // ended by the process the cancel reaches, and billed for the time its last renewal recorded.
    let id = submit_running_job(&http, &url, &body).await;
    let direct = Store::open(&store_url).await.unwrap();
    let row = direct.workload(&id).await.unwrap();
    let mut lapsed = row.clone();
    let mut st: serde_json::Value = serde_json::from_str(&row.body).unwrap();
    st["ran_ms"] = serde_json::json!(5_000);
    lapsed.body = st.to_string();
    lapsed.updated_ms = hcp_server::wall_ms() - 2 * hcp_server::billing::JOB_LEASE_MS;
    assert!(direct.update_workload_if(&lapsed, row.updated_ms).await.unwrap());
    let r = http.delete(format!("http://{}/api/v1/jobs/{id}", late.addr)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // Ended by the cancel itself (unless a resume pass claimed the row in the few milliseconds
    // between: then its new holder ends it, a moment later).
    assert_eq!(job_state(&http, &url, &id, "cancelled").await, "cancelled");
    let usage = get_json(&http, &format!("{url}/api/v1/usage?tenant=demo&limit=1000")).await;
    let mine: Vec<&serde_json::Value> =
        usage["items"].as_array().unwrap().iter().filter(|u| u["id"] == id.as_str()).collect();
    assert_eq!(mine.len(), 1, "{usage}");
    let gpu_ms = mine[0]["gpu_ms"].as_i64().unwrap();
    assert!((5_000..6_000).contains(&gpu_ms), "billed {gpu_ms} GPU-ms for the 5,000 its last renewal recorded");
    assert_eq!(mine[0]["status"], "cancelled");
    // A tenant's allowance a minute holds over both API processes together (through the store).
    let r = http
        .post(format!("{url}/api/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(
            &serde_json::json!({"id": "lim", "name": "L", "weight": 1, "borrow_limit_gpus": 64, "requests_per_min": 6}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key: serde_json::Value = http
        .post(format!("{url}/api/v1/tenants/lim/keys"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    let chat =
        serde_json::json!({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let infer = |base: String| {
        let (http, key, chat) = (http.clone(), key.clone(), chat.clone());
        async move {
            http.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&chat).send().await.unwrap().status()
        }
    };
    let (a, b) = (url.clone(), format!("http://{}", late.addr));
    // The later process hears of the tenant on the bus.
    for _ in 0..40 {
        if late.app.router.lock().unwrap().tenant_limits("lim").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut statuses = vec![];
    for _ in 0..3 {
        statuses.push(infer(a.clone()).await.as_u16());
    }
    tokio::time::sleep(hcp_server::limits::SYNC_EVERY * 3).await;
    for _ in 0..4 {
        statuses.push(infer(b.clone()).await.as_u16());
    }
    tokio::time::sleep(hcp_server::limits::SYNC_EVERY * 3).await;
    statuses.push(infer(a.clone()).await.as_u16());
    // (A minute boundary in between would open a new window: the refusals would come later.)
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(statuses[..6].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(refused == 2 || (refused == 0 && statuses.iter().all(|s| *s == 200)), "{statuses:?}");
    late.stop().await.unwrap();
    // The dispatcher process answers health and metrics only.
    let d = format!("http://{}", dispatcher.addr);
    assert_eq!(http.get(format!("{d}/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{d}/api/v1/sites")).bearer_auth(ADMIN).send().await.unwrap().status(), 404);
    dispatcher.stop().await.unwrap();
    api.stop().await.unwrap();
    admin.exec_admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
}
