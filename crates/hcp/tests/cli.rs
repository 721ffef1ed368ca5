//! The CLI as a user runs it: the real binary, real files.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::Up;

fn hcp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hcp")).args(args).output().expect("run hcp")
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hcp-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn every_command_has_help() {
    for args in
        [&["--help"][..], &["up", "--help"], &["sim", "--help"], &["bench", "--help"], &["bench", "sim", "--help"]]
    {
        let o = hcp(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage:"), "{args:?}");
    }
}

fn http(method: &str, url: &str, token: &str, body: Option<&str>) -> (u16, String) {
    // A minimal HTTP/1.1 client, so that the test depends on nothing but the standard library.
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default())
}

#[test]
fn up_serves_prints_credentials_once_and_stops_on_sigterm() {
    let dir = tmp("up-data");
    let _ = std::fs::remove_dir_all(&dir);
    let mut up = Up::start(&["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[]);
    let admin = up.line_with("admin token").rsplit(' ').next().unwrap().to_string();
    assert!(admin.starts_with("hcpa_admin_"));
    let health = hcp(&["health", "--url", &up.base]);
    assert!(health.status.success(), "{}", text(&health));
    let (s, body) = http("GET", &format!("{}/api/v1/sites", up.base), &admin, None);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("tx-south"));
    let status = up.signal("-TERM");
    assert!(status.success(), "graceful stop: {status:?}");
    // Second start: the same data, no new credentials printed, the old token still works.
    let mut up = Up::start(&["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(http("GET", &format!("{}/api/v1/me", up.base), &admin, None).0, 200);
    assert!(up.signal("-INT").success());
    let rest: Vec<String> = up.lines.try_iter().collect();
    assert!(!rest.iter().any(|l| l.contains("token")), "{rest:?}");
    let m = hcp(&["migrate", "--data-dir", dir.to_str().unwrap()]);
    assert!(m.status.success() && text(&m).contains("schema version 7"), "{}", text(&m));
    // Recovery with local access: a new admin token; the old one no longer works.
    let r = hcp(&["admin-reset", "--data-dir", dir.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r));
    let token = String::from_utf8_lossy(&r.stdout).lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("hcpa_admin_") && token != admin, "{}", text(&r));
    let mut up = Up::start(&["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(http("GET", &format!("{}/api/v1/me", up.base), &token, None).0, 200);
    assert_eq!(http("GET", &format!("{}/api/v1/me", up.base), &admin, None).0, 401);
    assert!(up.signal("-INT").success());
    let none = hcp(&["admin-reset", "--data-dir", tmp("nowhere").to_str().unwrap()]);
    assert!(!none.status.success() && text(&none).contains("no such directory"), "{}", text(&none));
}

/// Live mode with a feeds file that does not hold: the start stops with the file, the field and
/// the rule, before anything listens.
#[test]
fn live_mode_refuses_a_bad_feeds_file_naming_the_field() {
    let feeds = tmp("bad-feeds.toml");
    for (body, field) in [
        ("[ercot]\npoll_s = 0\n", "ercot.poll_s: must be 1 to 3600 seconds, not 0"),
        ("[market]\nbase_url = \"mempool.space\"\n", "market.base_url: must be an http:// or https:// URL"),
        ("[[replay]]\ngrid = \"/nonexistent/prices.csv\"\n", "replay[0]"),
    ] {
        std::fs::write(&feeds, body).unwrap();
        let dir = tmp("live-data");
        let o = hcp(&[
            "up",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--live",
            "--feeds",
            feeds.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "{body}: {}", text(&o));
        assert!(text(&o).contains(field), "{body}: {}", text(&o));
    }
    let o = hcp(&["up", "--feeds", feeds.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("--live"), "--feeds needs --live: {}", text(&o));
}

#[test]
fn a_killed_platform_keeps_every_acknowledged_write() {
    let dir = tmp("crash-data");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = "hcpa_admin_0123456789abcdef0123456789abcdef";
    let args = ["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--speed", "90000"];
    let mut up = Up::start(&args, &[("HCP_ADMIN_TOKEN", admin)]);
    let base = up.base.clone();
    // Writers create tenants until the process dies under them; each 201 is an acknowledged write.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for i in 0.. {
                let body = format!(r#"{{"id":"crash-{i}","name":"T{i}","weight":1}}"#);
                let r =
                    std::panic::catch_unwind(|| http("POST", &format!("{base}/api/v1/tenants"), admin, Some(&body)));
                match r {
                    Ok((201, _)) => acked.lock().unwrap().push(i),
                    _ => break,
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let status = up.signal("-KILL");
    assert!(!status.success());
    let _ = writer.join();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "the writer got going: {}", acked.len());
    let mut up = Up::start(&args, &[("HCP_ADMIN_TOKEN", admin)]);
    for i in &acked {
        let (s, body) = http("GET", &format!("{}/api/v1/tenants/crash-{i}", up.base), admin, None);
        assert_eq!(s, 200, "acknowledged tenant crash-{i} lost: {body}");
    }
    assert!(up.signal("-TERM").success());
}

#[test]
fn sim_writes_one_row_per_site_and_interval() {
    let out = tmp("small.csv");
    let fleet = root().join("examples/fleets/small.toml");
    let o = hcp(&[
        "sim",
        "--fleet",
        fleet.to_str().unwrap(),
        "--from",
        "2024-06-01",
        "--to",
        "2024-06-03",
        "--seed",
        "5",
        "--fidelity",
        "device",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(&out).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    for col in [
        "interval_start",
        "site",
        "asic_hashing_mw",
        "hashrate_ph_s",
        "energy_mwh",
        "mining_revenue_usd",
        "energy_cost_usd",
    ] {
        assert!(header.split(',').any(|c| c == col), "missing {col}");
    }
    assert_eq!(lines.count(), 2 * 2 * 96);
}

#[test]
fn sim_replays_the_recorded_ercot_prices_and_trace() {
    let out = tmp("ercot.csv");
    let fleet = root().join("examples/fleets/small.toml");
    let prices = root().join("../shared/data/ercot/hb_south_15min_2024-06_2024-11.csv");
    let trace = root().join("../shared/data/llm-traces/azure_llm_inference_2023_code.csv");
    let o = hcp(&[
        "sim",
        "--fleet",
        fleet.to_str().unwrap(),
        "--prices",
        prices.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--from",
        "2024-08-01",
        "--to",
        "2024-08-08",
        "--step",
        "5m",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // The small fleet's second site is at HB_WEST: priced with HB_SOUTH's file, and told so.
    assert!(
        t.contains("warning: the price file holds only settlement point HB_SOUTH") && t.contains("(HB_WEST)"),
        "{t}"
    );
    assert!(t.contains("recorded trace of"), "{t}");
    let csv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(csv.lines().count() - 1, 2 * 7 * 288);
    // The first interval's price is the file's (5-minute prices average to it over three rows).
    let first: Vec<f64> =
        csv.lines().skip(1).step_by(2).take(3).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    let avg = first.iter().sum::<f64>() / 3.0;
    let file = std::fs::read_to_string(&prices).unwrap();
    let real: f64 = file
        .lines()
        .find(|l| l.starts_with("2024-08-01T00:00:00"))
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!((avg - real).abs() < 0.01, "{avg} vs {real}");
}

#[test]
fn bad_input_gets_a_clear_error_and_no_output() {
    let bad_prices = tmp("bad.csv");
    std::fs::write(
        &bad_prices,
        "interval_start,rt_price_usd_per_mwh\n2024-06-01T00:00:00,12\n2024-06-01T00:15:00,twelve\n",
    )
    .unwrap();
    let out = tmp("never.csv");
    let fleet = root().join("examples/fleets/small.toml");
    let o = hcp(&[
        "sim",
        "--fleet",
        fleet.to_str().unwrap(),
        "--prices",
        bad_prices.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("bad.csv: line 3, column rt_price_usd_per_mwh (#2): expected a number"), "{t}");
    assert!(!out.exists(), "nothing written on bad input");

    let bad_fleet = tmp("bad.toml");
    std::fs::write(&bad_fleet, "name = \"x\"\n[[site]]\nid = \"a\"\npower_cap_mw = 0\nsettlement_point = \"P\"\n")
        .unwrap();
    let o = hcp(&["sim", "--fleet", bad_fleet.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(text(&o).contains("bad.toml: site[0].power_cap_mw: must be a number > 0"), "{}", text(&o));

    let o = hcp(&["sim", "--fleet", fleet.to_str().unwrap(), "--step", "7x", "--out", out.to_str().unwrap()]);
    assert!(text(&o).contains("--step"), "{}", text(&o));
    let o = hcp(&["sim", "--fleet", fleet.to_str().unwrap(), "--from", "2024-02-30", "--out", out.to_str().unwrap()]);
    assert!(text(&o).contains("--from") && text(&o).contains("not a valid calendar date"), "{}", text(&o));
}

#[test]
fn bench_sim_prints_json() {
    let o = hcp(&[
        "bench",
        "sim",
        "--json",
        "--fleet",
        root().join("examples/fleets/small.toml").to_str().unwrap(),
        "--device-hours",
        "0.25",
        "--cohort-days",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["device_fidelity"]["wall_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["cohort_fidelity"]["steps"].as_u64(), Some(192));
    assert_eq!(v["devices"].as_u64(), Some(384));
    let o = hcp(&["bench", "sim", "--device-hours", "0.1"]);
    assert!(text(&o).contains("--device-hours: must be a whole number of quarter hours"), "{}", text(&o));
}

#[test]
fn backtest_compares_the_four_policies_and_draws_a_chart() {
    let fleet = root().join("examples/fleets/small.toml");
    let prices = root().join("../shared/data/ercot/hb_south_15min_2024-06_2024-11.csv");
    let chart = tmp("bt.svg");
    let args = [
        "backtest",
        "--fleet",
        fleet.to_str().unwrap(),
        "--prices",
        prices.to_str().unwrap(),
        "--hashprice-usd-per-ph-day",
        "50",
        "--from",
        "2024-08-01",
        "--to",
        "2024-08-15",
    ];
    let o = hcp(&[&args[..], &["--json", "--chart", chart.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let arr = v.as_array().unwrap();
    let names: Vec<&str> = arr.iter().map(|x| x["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["optimizer", "strike", "always-on", "perfect-foresight"]);
    for x in arr {
        for key in [
            "margin_usd",
            "always_on_margin_usd",
            "bound_margin_usd",
            "uplift_captured",
            "switches_per_device_day",
            "energy_mwh",
            "mining_revenue_usd",
            "inference_revenue_usd",
            "energy_cost_usd",
            "credits_usd",
        ] {
            assert!(x[key].is_number(), "{key} in {x}");
        }
    }
    let bound = arr[3]["margin_usd"].as_f64().unwrap();
    assert!(arr.iter().all(|x| x["margin_usd"].as_f64().unwrap() <= bound + 1e-6));
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("real-time price") && svg.contains("mining (ASIC) MW"));

    let o = hcp(&[&args[..], &["--policy", "strike"]].concat());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("strike") && t.contains("strike tuned on the period") && !t.contains("optimizer "), "{t}");
    // The text report ends with batch deferral on the same prices: at once, planner, oracle.
    let batch = t.split("batch jobs at HB_SOUTH").nth(1).unwrap_or_else(|| panic!("no batch table: {t}"));
    assert!(["at-once", "planner", "oracle"].iter().all(|p| batch.contains(p)), "{batch}");

    let o = hcp(&[
        "backtest",
        "--fleet",
        fleet.to_str().unwrap(),
        "--prices",
        prices.to_str().unwrap(),
        "--hashprice-usd-per-ph-day=-3",
    ]);
    assert!(text(&o).contains("--hashprice-usd-per-ph-day: must be a number > 0"), "{}", text(&o));
    let o = hcp(&[&args[..], &["--policy", "genius"]].concat());
    assert!(text(&o).contains("policy: must be one of"), "{}", text(&o));
}

#[test]
fn bench_dispatch_prints_json() {
    let o = hcp(&[
        "bench",
        "dispatch",
        "--json",
        "--fleet",
        root().join("examples/fleets/small.toml").to_str().unwrap(),
        "--events",
        "20",
        "--runs",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let run = &v["runs"][0]["full_fleet_plan_ms"];
    assert!(run["wall"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    assert!(run["thread_cpu"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    let cpu = &v["spread"]["full_fleet_plan_ms"]["thread_cpu"]["p99"];
    assert_eq!(cpu["runs"], 2, "{v}");
    assert!(cpu["min"].as_f64().unwrap() <= cpu["max"].as_f64().unwrap(), "{v}");
    assert!(v["machine"]["loadavg_1_5_15_start"].is_array(), "{v}");
    assert!(v["planner"]["variables"].as_u64().unwrap() > 0);
}

#[test]
fn bench_switching_and_telemetry_print_json() {
    let small = root().join("examples/fleets/small.toml");
    let o = hcp(&["bench", "switching", "--json", "--fleet", small.to_str().unwrap(), "--events", "10"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let grid = &v["grid_event_on_running_fleet"];
    assert!(grid["signal_to_first_batch_ms"]["wall"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    assert!(grid["signal_to_first_batch_ms"]["thread_cpu"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    assert!(grid["first_batch_commands"]["p50"].as_f64().unwrap() > 0.0, "a spike on a running fleet sends: {v}");
    assert!(v["flips"]["changes_per_event"]["max"].as_f64().unwrap() > 0.0, "a spike changes targets: {v}");
    assert!(v["one_site_signal_to_first_batch_ms"]["wall"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    // End to end: every command of each plan acknowledged by the site agents through the store, the
    // bus and the agent link; the parts add up to the whole.
    let o = hcp(&["bench", "switching", "--end-to-end", "--json", "--fleet", small.to_str().unwrap(), "--events", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let asics = v["commands_per_event"]["p50"].as_f64().unwrap();
    assert!(asics >= 300.0, "a spike sleeps the small fleet's ASICs: {v}");
    assert!(v["bytes_per_event"]["max"].as_f64().unwrap() < asics * 37.0, "commands travel as runs: {v}");
    let total = v["signal_to_all_acknowledged_ms"]["max"].as_f64().unwrap();
    assert!(total > 0.0 && v["parts_ms"]["persist"]["p50"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!((v["store"].as_str(), v["bus"].as_str()), (Some("Sqlite"), Some("inproc")), "{v}");
    let o = hcp(&["bench", "switching", "--store", "sqlite:x.db"]);
    assert!(!o.status.success() && text(&o).contains("--end-to-end"), "{}", text(&o));
    let o = hcp(&["bench", "telemetry", "--json", "--fleet", small.to_str().unwrap(), "--minutes", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 384 devices every 10 s over two minutes, and one rollup row per device and minute.
    let reports = v["reports"].as_u64().unwrap();
    assert!((384 * 11..=384 * 13).contains(&reports), "{v}");
    assert_eq!(v["minute_rows"].as_u64().unwrap(), 384 * 2, "{v}");
    let o = hcp(&["bench", "telemetry", "--minutes", "0"]);
    assert!(!o.status.success() && text(&o).contains("--minutes"), "{}", text(&o));
}

#[test]
fn replay_and_bench_router_print_json() {
    let trace = root().join("../shared/data/llm-traces/azure_llm_inference_2023_code.csv");
    let o = hcp(&["replay", "--trace", trace.to_str().unwrap(), "--tenants", "6", "--shrink", "0.3@20m", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bands"].as_array().unwrap().len(), 3);
    for key in ["queue_ms_p50_before", "queue_ms_p99_before", "queue_ms_p50_after", "queue_ms_p99_after"] {
        assert!(v["bands"][0][key].is_number(), "{key}");
    }
    let o = hcp(&["replay", "--trace", trace.to_str().unwrap(), "--shrink", "lots"]);
    assert!(text(&o).contains("--shrink: expected FRACTION@TIME"), "{}", text(&o));
    let o = hcp(&["bench", "router", "--json", "--placements", "20000", "--runs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Each loop step places one request and answers one arrival: answers are about twice the
    // placements, and the headline counts placements only.
    let run = &v["runs"][0];
    let (placed, answers) = (run["placements"].as_f64().unwrap(), run["answers"].as_f64().unwrap());
    assert!(placed >= 20_000.0 && (1.8..2.2).contains(&(answers / placed)), "{v}");
    assert_eq!(v["spread"]["placements_per_s"]["runs"], 2, "{v}");
    assert_eq!(v["shrink"]["running_before"].as_u64(), Some(50_000));
}

#[test]
fn traces_reach_an_otlp_collector_when_one_is_configured() {
    use std::io::{Read, Write};
    // A stand-in collector: accepts OTLP/HTTP posts and answers 200.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = vec![0u8; 1 << 16];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = tx.send(head);
        }
    });
    let dir = tmp("otel-data");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = "hcpa_admin_0123456789abcdef0123456789abcdef";
    let mut up = Up::start(
        &["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[("HCP_ADMIN_TOKEN", admin), ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "200")],
    );
    assert_eq!(http("GET", &format!("{}/api/v1/sites", up.base), admin, None).0, 200);
    let head = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("an OTLP export within 30 s");
    assert!(head.starts_with("POST /v1/traces"), "{head}");
    assert!(head.to_lowercase().contains("content-type: application/x-protobuf"), "{head}");
    assert!(up.signal("-TERM").success());
}

/// A Python virtual environment `name` under the test target directory with `package` installed
/// from PyPI (once: later runs find it, as `ready` run with its python says); its directory.
fn python_venv(name: &str, ready: &[&str], package: &str) -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let py = venv.join("bin/python");
    if !Command::new(&py).args(ready).status().is_ok_and(|s| s.success()) {
        let s = Command::new("python3").args(["-m", "venv", venv.to_str().unwrap()]).status().expect("python3");
        assert!(s.success(), "python3 -m venv");
        let s = Command::new(&py).args(["-m", "pip", "install", "-q", package]).status().unwrap();
        assert!(s.success(), "pip install {package}");
    }
    venv
}

/// A Python environment with the official `openai` package.
fn openai_python() -> PathBuf {
    python_venv("openai-venv", &["-c", "import openai"], "openai>=1.40,<3").join("bin/python")
}

#[test]
fn the_official_openai_client_works_against_the_gateway() {
    let py = openai_python();
    let dir = tmp("openai-data");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = "hcpa_admin_0123456789abcdef0123456789abcdef";
    let key = "hcpk_demo1_0123456789abcdef0123456789abcdef";
    let mut up = Up::start(
        &["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[("HCP_ADMIN_TOKEN", admin), ("HCP_DEMO_TENANT_KEY", key)],
    );
    // Serving once the engine's first plan gave the router capacity.
    let mut ready = false;
    for _ in 0..200 {
        let (s, b) = http("GET", &format!("{}/v1/models", up.base), key, None);
        if s == 200 && !b.contains("\"replicas_in_service\":0") {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ready, "replicas in service");
    let out = Command::new(&py)
        .args([root().join("tests/openai_client.py").to_str().unwrap(), &format!("{}/v1", up.base), key, admin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("openai client: ok"));
    assert!(up.signal("-TERM").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The OpenAPI document agrees with the server, as schemathesis (PyPI, pinned) judges it: every
/// operation, with an admin's token and with a tenant's key, a bounded number of examples, every
/// check but `positive_data_acceptance` (it counts as wrong a refusal the document cannot
/// express: a `to_ms` after `from_ms`, a tenant named only by an admin, a device index the fleet
/// has; docs/security.md lists them). Zero failures, or the test fails with the report.
#[test]
fn schemathesis_finds_the_server_as_the_document_says() {
    let venv = python_venv("schemathesis-venv", &["-c", "import schemathesis"], "schemathesis==4.32.5");
    let st = venv.join("bin/schemathesis");
    let dir = tmp("schemathesis-data");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = "hcpa_admin_0123456789abcdef0123456789abcdef";
    let key = "hcpk_demo1_0123456789abcdef0123456789abcdef";
    let mut up = Up::start(
        &["up", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[("HCP_ADMIN_TOKEN", admin), ("HCP_DEMO_TENANT_KEY", key)],
    );
    for token in [admin, key] {
        let out = Command::new(&st)
            .current_dir(&dir)
            .args([
                "run",
                &format!("{}/openapi.json", up.base),
                "-H",
                &format!("Authorization: Bearer {token}"),
                "--max-examples",
                "5",
                "--phases",
                "examples,coverage,fuzzing",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--workers",
                "2",
                "--seed",
                "1",
            ])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "schemathesis with {}: {}", &token[..5], text(&out));
    }
    assert!(up.signal("-TERM").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_gateway_uses_every_core_it_is_given() {
    // The platform on its own runtime with a worker per core, streams through the gateway: the
    // busiest platform threads, one per core, each carry a real share of the gateway's CPU time.
    let o = hcp(&["bench", "gateway", "--json", "--streams", "40", "--seconds", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let g = &v["points"][0]["fronts"][1];
    assert_eq!(g["front"], "gateway", "{v}");
    assert!(g["requests"].as_u64().unwrap() > 50 && g["failed"] == 0, "{v}");
    assert!(g["requests_per_cpu_s"].as_f64().unwrap() > 0.0, "{v}");
    let cores = v["platform_cores"].as_u64().unwrap() as usize;
    let shares: Vec<f64> =
        v["platform_threads_busiest_share"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(shares.len(), cores, "{v}");
    if cores >= 2 {
        let even = 1.0 / cores as f64;
        assert!(
            shares.iter().all(|&s| s >= 0.4 * even),
            "the gateway's work stays on fewer threads than cores: {shares:?}"
        );
    }
}
