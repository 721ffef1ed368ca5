//! The dashboard and the customer portal end to end, in real headless Chromium driven over
//! WebDriver (ChromeDriver), against `hcp up` as a user runs it: log in, watch live numbers
//! change, drill into a decision, toggle maintenance, run a small backtest, then as a tenant see
//! usage, create and revoke a key, download an invoice, submit a batch job. No console errors.
//! Screenshots of each view go to `target/screenshots/`; with `HCP_REFRESH_SCREENSHOTS=1` they
//! replace the README's pictures in `docs/screenshots/` (so a plain test run leaves the tree clean).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

mod common;
use common::Up;

const ADMIN: &str = "hcpa_admin_b1a2c3d4e5f60718293a4b5c6d7e8f90";
const DEMO: &str = "hcpk_demo1_0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const WAIT: Duration = Duration::from_secs(60);

fn screenshots() -> PathBuf {
    let refresh = std::env::var("HCP_REFRESH_SCREENSHOTS").is_ok_and(|v| v == "1");
    let dir = if refresh { "/../../docs/screenshots" } else { "/../../target/screenshots" };
    PathBuf::from(format!("{}{dir}", env!("CARGO_MANIFEST_DIR")))
}

/// ChromeDriver on a free port, killed when dropped.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn driver() -> Driver {
    let bin = find_on_path("chromedriver").unwrap_or_else(|| {
        panic!("chromedriver not found: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver); .ci/run does")
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver(child, port)
}

fn chromium() -> String {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|n| find_on_path(n))
        .map(|p| p.display().to_string())
        .expect("chromium not found: apt-get install -y chromium chromium-driver")
}

async fn browser(port: u16, profile: &Path, downloads: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1366,900", format!("--user-data-dir={}", profile.display()),
            ],
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session")
}

/// The text of the first element matching `css` once `ok` holds for it (polling, up to `WAIT`).
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if ok(&t) {
                return t;
            }
            last = t;
        }
        assert!(started.elapsed() < WAIT, "{css}: still {last:?} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.map(|v| v.len()).unwrap_or(0)
}

async fn wait_count(c: &Client, css: &str, at_least: usize) {
    let started = Instant::now();
    while count(c, css).await < at_least {
        assert!(started.elapsed() < WAIT, "{css}: fewer than {at_least} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks the first element matching `css`, finding it again when a live refresh replaced it
/// between the finding and the click.
async fn click(c: &Client, css: &str) {
    let started = Instant::now();
    loop {
        let found =
            c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        match found.click().await {
            Ok(()) => return,
            Err(e) => {
                assert!(started.elapsed() < WAIT, "{css}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn nav(c: &Client, view: &str) {
    click(c, &format!("nav a[data-view='{view}']")).await;
    wait_text(c, &format!("nav a[data-view='{view}'][aria-current='page']"), |_| true).await;
}

async fn shot(c: &Client, name: &str) {
    // Let the view's first refresh draw its charts.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// ChromeDriver's browser log since the last read (`goog:loggingPrefs` asks for all of it): what
/// the DevTools console shows, including failed loads.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// The console's errors since the last read.
async fn console_errors(c: &Client) -> Vec<String> {
    let v = c.issue_cmd(BrowserLog).await.expect("the browser log");
    v.as_array()
        .expect("log entries")
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// What the page recorded as errors (uncaught errors, rejected promises, console.error, CSP
/// violations): none.
async fn no_errors(c: &Client) {
    let v = c.execute("return window.hcpErrors || ['the script did not load'];", vec![]).await.unwrap();
    assert_eq!(v, json!([]), "errors in the page");
    assert_eq!(console_errors(c).await, Vec::<String>::new(), "errors in the console");
}

async fn login(c: &Client, token: &str) {
    let field = c.wait().at_most(WAIT).for_element(Locator::Css("#token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(token).await.unwrap();
    click(c, "#login-form button[type=submit]").await;
}

async fn rest(method: reqwest::Method, url: &str, token: &str, body: Option<Value>) -> (u16, String) {
    let mut r = reqwest::Client::new().request(method, url).bearer_auth(token);
    if let Some(b) = body {
        r = r.header("content-type", "application/json").body(b.to_string());
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_portal_work_in_a_real_browser() {
    let dir = std::env::temp_dir().join(format!("hcp-browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (data, profile, downloads) = (dir.join("data"), dir.join("profile"), dir.join("downloads"));
    for d in [&data, &profile, &downloads] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::create_dir_all(screenshots()).unwrap();
    let up = Up::start(
        // Ten simulated intervals a second: decisions and live changes come quickly.
        &["up", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0", "--speed", "9000"],
        &[("HCP_ADMIN_TOKEN", ADMIN), ("HCP_DEMO_TENANT_KEY", DEMO)],
    );
    let base = up.base.clone();
    // Some traffic from the demo tenant (the workloads view and the portal show it).
    for i in 0..5 {
        let body = json!({"model": "llama-3-8b", "messages": [{"role": "user", "content": format!("hello {i}")}], "max_tokens": 16});
        let started = Instant::now();
        loop {
            let (s, b) =
                rest(reqwest::Method::POST, &format!("{base}/v1/chat/completions"), DEMO, Some(body.clone())).await;
            if s == 200 {
                break;
            }
            // Until the engine's first plan gives the router capacity, there is none.
            assert!(started.elapsed() < WAIT && s == 503, "{s} {b}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let d = driver();
    let c = browser(d.1, &profile, &downloads).await;

    // Log in: a wrong token is refused with a message, the admin token opens the dashboard.
    c.goto(&format!("{base}/")).await.unwrap();
    login(&c, "hcpa_admin_wrongwrongwrongwrongwrong").await;
    wait_text(&c, "#login-error", |t| t.contains("not accepted")).await;
    shot(&c, "login").await;
    // The refused login is the console's only error so far: Chromium logs the 401 it got (which
    // also shows that the console is read).
    let refused = console_errors(&c).await;
    assert!(refused.len() == 1 && refused[0].contains("/ui/login") && refused[0].contains("401"), "{refused:?}");
    login(&c, ADMIN).await;
    wait_text(&c, "#whoami", |t| t.contains("admin")).await;

    // Fleet overview: live numbers change without a reload.
    let first = wait_text(&c, "#fleet-at", |t| t.ends_with("UTC")).await;
    let later = wait_text(&c, "#fleet-at", |t| t.ends_with("UTC") && t != first).await;
    assert_ne!(first, later);
    wait_text(&c, "#fleet-margin", |t| t.contains('$')).await;
    wait_count(&c, "#fleet-sites section.card svg[role=img]", 2).await;
    shot(&c, "fleet").await;

    // Economics: prices, breakeven per model, the day ahead.
    nav(&c, "economics").await;
    wait_text(&c, "#econ-hashprice", |t| t != "—").await;
    wait_count(&c, "#econ-breakeven tbody tr", 1).await;
    wait_count(&c, "#econ-ahead svg", 2).await;
    shot(&c, "economics").await;

    // Decisions: the timeline, filtered by site, and a drill into one decision's commands.
    nav(&c, "decisions").await;
    wait_count(&c, "#decision-list tbody tr", 1).await;
    click(&c, "#decision-list tbody tr").await;
    wait_text(&c, "#decision-detail", |t| t.contains("commands in this interval")).await;
    shot(&c, "decisions").await;

    // Devices: search, open one, toggle maintenance (and the API agrees), toggle it back.
    nav(&c, "devices").await;
    wait_count(&c, "#dev-list tbody tr", 25).await;
    shot(&c, "devices").await;
    click(&c, "#dev-list tbody tr").await;
    wait_text(&c, "#dev-maint-v", |t| t == "off").await;
    let idx = c.current_url().await.unwrap().fragment().unwrap().rsplit('/').next().unwrap().to_string();
    click(&c, "#maint-toggle").await;
    wait_text(&c, "#dev-maint-v", |t| t == "on").await;
    let (s, b) = rest(reqwest::Method::GET, &format!("{base}/api/v1/devices/{idx}"), ADMIN, None).await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["maintenance"], true, "the API sees the change");
    wait_count(&c, "#dev-charts svg[role=img]", 2).await;
    shot(&c, "device").await;
    click(&c, "#maint-toggle").await;
    wait_text(&c, "#dev-maint-v", |t| t == "off").await;
    // Search by model: the fleet's model ids are offered; the list shows only that model.
    c.goto(&format!("{base}/ui/#/devices")).await.unwrap();
    wait_count(&c, "#dev-models option[value='h100-sxm']", 1).await;
    c.find(Locator::Css("#dev-model")).await.unwrap().send_keys("h100-sxm").await.unwrap();
    click(&c, "form[role=search] button[type=submit]").await;
    wait_text(&c, "#dev-list tbody", |t| t.contains("h100-sxm") && !t.contains("antminer")).await;

    // Workloads and alerts.
    nav(&c, "workloads").await;
    wait_text(&c, "#wl-gpus", |t| t.parse::<u32>().is_ok()).await;
    wait_count(&c, "#wl-bands tbody tr", 3).await;
    shot(&c, "workloads").await;
    nav(&c, "alerts").await;
    wait_text(&c, "#alert-list", |t| !t.is_empty()).await;
    shot(&c, "alerts").await;

    // A small backtest: one day, the platform's fleet, all four policies.
    nav(&c, "backtest").await;
    wait_count(&c, "#bt-fleet option", 1).await;
    wait_count(&c, "#bt-policies input:checked", 4).await;
    click(&c, "#bt-run").await;
    wait_text(&c, "#bt-status", |t| t.starts_with("Done")).await;
    wait_count(&c, "#bt-result tbody tr", 4).await;
    wait_count(&c, "#bt-result svg[role=img]", 2).await;
    shot(&c, "backtest").await;
    no_errors(&c).await;

    // A viewer sees the dashboard but its changes are disabled.
    click(&c, "#logout").await;
    wait_text(&c, "#login-error", |t| t.contains("Logged out")).await;
    let (s, b) = rest(
        reqwest::Method::POST,
        &format!("{base}/api/v1/accounts"),
        ADMIN,
        Some(json!({"name": "watcher", "role": "viewer"})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let viewer: Value = serde_json::from_str(&b).unwrap();
    login(&c, viewer["token"].as_str().unwrap()).await;
    wait_text(&c, "#whoami", |t| t.contains("viewer")).await;
    c.goto(&format!("{base}/ui/#/devices/{idx}")).await.unwrap();
    wait_text(&c, "#dev-maint-v", |t| t == "off").await;
    let disabled = c.find(Locator::Css("#maint-toggle")).await.unwrap().attr("disabled").await.unwrap();
    assert!(disabled.is_some(), "a viewer cannot toggle maintenance");
    nav(&c, "backtest").await;
    let disabled = c.find(Locator::Css("#bt-run")).await.unwrap().attr("disabled").await.unwrap();
    assert!(disabled.is_some(), "a viewer cannot run a backtest");
    no_errors(&c).await;

    // Log out; log in with the demo tenant's key: the portal.
    click(&c, "#logout").await;
    wait_text(&c, "#login-error", |t| t.contains("Logged out")).await;
    login(&c, DEMO).await;
    wait_text(&c, "#whoami", |t| t.contains("tenant demo")).await;
    wait_text(&c, "#use-requests", |t| t.replace(',', "").parse::<u64>().is_ok_and(|n| n >= 5)).await;
    wait_count(&c, "#use-table tbody tr", 1).await;
    wait_count(&c, "#use-latency tbody tr", 1).await;
    shot(&c, "portal-usage").await;

    // API keys: create one (its secret shown once works), revoke it (then it does not).
    nav(&c, "keys").await;
    wait_count(&c, "#key-list tbody tr", 1).await;
    click(&c, "#key-create").await;
    let secret = wait_text(&c, "#key-secret", |t| t.starts_with("hcpk_")).await;
    let (s, _) = rest(reqwest::Method::GET, &format!("{base}/api/v1/me"), &secret, None).await;
    assert_eq!(s, 200, "the new key works");
    let id = secret.split('_').nth(1).unwrap().to_string();
    let button = format!("#key-list button.revoke[data-key='{id}']");
    click(&c, &button).await;
    wait_text(&c, &button, |t| t == "Confirm revoke").await;
    shot(&c, "portal-keys").await;
    click(&c, &button).await;
    wait_text(&c, &format!("#key-list tr[data-id='{id}']"), |t| t.contains("revoked")).await;
    let (s, _) = rest(reqwest::Method::GET, &format!("{base}/api/v1/me"), &secret, None).await;
    assert_eq!(s, 401, "the revoked key is refused");

    // Invoices: this month's, with its lines, downloaded as CSV.
    nav(&c, "invoices").await;
    wait_count(&c, "#inv-list tbody tr", 3).await;
    click(&c, "#inv-list tbody tr").await;
    wait_count(&c, "#inv-detail tbody tr", 1).await;
    shot(&c, "portal-invoices").await;
    // The list redraws every two seconds: read the link and click it in one go, again if it was
    // replaced meanwhile.
    let started = Instant::now();
    let (name, href) = loop {
        let link = c.find(Locator::Css("#inv-list tbody tr a.download")).await.unwrap();
        let got = async {
            let name = link.attr("download").await?.expect("a file name");
            let href = link.attr("href").await?.expect("a link");
            link.click().await?;
            Ok::<_, fantoccini::error::CmdError>((name, href))
        }
        .await;
        match got {
            Ok(x) => break x,
            Err(e) => assert!(started.elapsed() < WAIT, "the download link: {e}"),
        }
    };
    let file = downloads.join(&name);
    let started = Instant::now();
    while !file.is_file() {
        assert!(started.elapsed() < WAIT, "{name} was not downloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let csv = std::fs::read_to_string(&file).unwrap();
    let (s, api_csv) = rest(reqwest::Method::GET, &format!("{base}{href}"), DEMO, None).await;
    assert_eq!(s, 200);
    assert_eq!(csv, api_csv, "the download is the API's CSV");
    assert!(csv.lines().count() >= 2, "a header and the tokens lines: {csv}");

    // Batch jobs: submit one, see it listed.
    nav(&c, "jobs").await;
    click(&c, "#job-form button[type=submit]").await;
    wait_text(&c, "#job-status", |t| t.contains("submitted")).await;
    wait_count(&c, "#job-list tbody tr", 1).await;
    shot(&c, "portal-jobs").await;
    no_errors(&c).await;

    c.close().await.unwrap();
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}
