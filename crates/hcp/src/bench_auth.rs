//! `hcp bench auth`: what wrong tokens cost the platform, and what good requests see meanwhile.
//!
//! A platform in this process (small fleet, SQLite in a temporary directory) on a runtime of its
//! own. One client sends good requests one after another (`GET /api/v1/me` with a token already
//! verified) through three phases of the same length, in one run:
//!
//! - `quiet`: nothing else;
//! - `one_address`: A attackers on 127.0.0.1 send wrong tokens for a known account, each with
//!   its own secret, as fast as they are answered (the attack of issue 23: 64 of them took the
//!   process from 141 to 1,403 MiB and good requests from 0.3 to 22 ms median);
//! - `distributed`: A attackers, each from its own loopback address, each request for a name
//!   never tried before: no address and no name reaches its failure limit, so every wrong token
//!   costs a check. The bound here is the verification slots, not the throttle.
//!
//! Per phase: the good requests' latency (min, median, p99, max), how many wrong tokens were
//! answered and how (401, 429, 503), the Argon2 checks run and the most at once, the process's
//! CPU seconds and its resident memory at the end (the whole bench process: platform and
//! clients).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

const ADMIN: &str = "hcpa_admin_0123456789abcdef0123456789abcdef";

/// Resident memory now and at its peak (MiB), from /proc.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[derive(Clone, Copy, PartialEq)]
enum Attack {
    Quiet,
    OneAddress,
    Distributed,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::Quiet => "quiet",
            Attack::OneAddress => "one_address",
            Attack::Distributed => "distributed",
        }
    }
}

pub fn auth(json_out: bool, attackers: usize, secs: f64) -> Result<std::process::ExitCode> {
    if attackers == 0 || attackers > 250 || !(secs.is_finite() && secs > 0.0) {
        bail!("--attackers: 1 to 250; --seconds: > 0");
    }
    let machine = crate::measure::Machine::start();
    let dir = std::env::temp_dir().join(format!("hcp-bench-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cfg = hcp_server::Config {
        listen: "127.0.0.1:0".parse()?,
        store_url: hcp_server::Config::data_dir_store(&dir),
        bus_url: None,
        fleet: crate::cli::load_fleet(None, crate::cli::SMALL_FLEET)?,
        engine: true,
        api: true,
        seed: 1,
        // One interval at start, then quiet: the engine stays out of the measurement.
        speed: 1.0,
        engine_config: Default::default(),
        mode: Default::default(),
        admin_token: Some(ADMIN.into()),
        demo_tenant_key: None,
        account_rate_per_s: 1e6,
        sim_backend_listen: None,
        backends: vec![],
        sim_backend_http2: true,
        backtest_fleets: vec![],
        net: hcp_server::NetConfig { max_connections_per_addr: 100_000, ..Default::default() },
    };
    let platform = crate::serve::runtime()?;
    let running = platform.block_on(async {
        let (store, _) = hcp_server::prepare(&cfg).await?;
        hcp_server::start(cfg, store).await
    })?;
    let base = format!("http://{}", running.addr);
    let app = running.app.clone();
    let load = crate::serve::runtime()?;
    let phases = load.block_on(async {
        let http = reqwest::Client::new();
        // Verified once: from here on the good token is served from the cache.
        let r = http.get(format!("{base}/api/v1/me")).bearer_auth(ADMIN).send().await?;
        if !r.status().is_success() {
            bail!("the admin token was refused: {}", r.status());
        }
        let mut phases = vec![];
        for attack in [Attack::Quiet, Attack::OneAddress, Attack::Distributed] {
            let stop = Arc::new(AtomicBool::new(false));
            let answers: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
            let next_name = Arc::new(AtomicU64::new(0));
            let mut tasks = vec![];
            if attack != Attack::Quiet {
                for a in 0..attackers {
                    let (stop, answers, next_name, base) =
                        (stop.clone(), answers.clone(), next_name.clone(), base.clone());
                    let local: std::net::IpAddr = match attack {
                        Attack::Distributed => format!("127.0.{}.{}", 1 + a / 250, 1 + a % 250).parse()?,
                        _ => "127.0.0.1".parse()?,
                    };
                    let c = reqwest::Client::builder().local_address(local).build()?;
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let name = match attack {
                                Attack::Distributed => format!("x{}", next_name.fetch_add(1, Ordering::Relaxed)),
                                _ => "admin".to_string(),
                            };
                            let token = format!("hcpa_{name}_{}", hcp_server::auth::secret());
                            let slot = match c.get(format!("{base}/api/v1/me")).bearer_auth(token).send().await {
                                Ok(r) => match r.status().as_u16() {
                                    401 => 0,
                                    429 => 1,
                                    503 => 2,
                                    _ => 3,
                                },
                                Err(_) => 3,
                            };
                            answers[slot].fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
            }
            // Let the attack reach its pace before measuring.
            tokio::time::sleep(Duration::from_millis(if attack == Attack::Quiet { 200 } else { 1_000 })).await;
            let guard = &app.gate.guard;
            let checks0 = guard.checks.load(Ordering::Relaxed);
            guard.peak.store(0, Ordering::Relaxed);
            let answers0: Vec<u64> = answers.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            let (cpu0, t0) = (cpu_s(), Instant::now());
            let mut lat = vec![];
            let mut good_failed = 0u64;
            while t0.elapsed().as_secs_f64() < secs {
                let t = Instant::now();
                let ok = http
                    .get(format!("{base}/api/v1/me"))
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    good_failed += 1;
                }
            }
            let wall = t0.elapsed().as_secs_f64();
            let cpu = cpu_s() - cpu0;
            let checks = guard.checks.load(Ordering::Relaxed) - checks0;
            let peak = guard.peak.load(Ordering::Relaxed);
            let counted: Vec<u64> = answers.iter().zip(&answers0).map(|(a, b)| a.load(Ordering::Relaxed) - b).collect();
            let (rss, hwm) = memory_mib();
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            lat.sort_by(f64::total_cmp);
            phases.push(json!({
                "phase": attack.name(),
                "attackers": if attack == Attack::Quiet { 0 } else { attackers },
                "seconds": wall,
                "good_requests": lat.len(),
                "good_failed": good_failed,
                "good_ms": {
                    "min": quantile(&lat, 0.0), "median": quantile(&lat, 0.5),
                    "p99": quantile(&lat, 0.99), "max": quantile(&lat, 1.0),
                },
                "wrong_tokens": {"401": counted[0], "429": counted[1], "503": counted[2], "other": counted[3]},
                "wrong_per_s": counted.iter().sum::<u64>() as f64 / wall,
                "argon2_checks": checks,
                "argon2_checks_per_s": checks as f64 / wall,
                "argon2_at_once_max": peak,
                "slots": guard.slots(),
                "cpu_s": cpu,
                "rss_mib": rss,
                "rss_peak_mib": hwm,
            }));
        }
        Ok(phases)
    })?;
    platform.block_on(running.stop())?;
    let _ = std::fs::remove_dir_all(&dir);
    let out = json!({ "bench": "auth", "phases": phases, "machine": machine.report() });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "phase        attackers  good: n  min ms  median ms  p99 ms  max ms  wrong/s  401/429/503   checks/s  at once  cpu s  rss MiB (peak)"
        );
        for p in &phases {
            let g = &p["good_ms"];
            let w = &p["wrong_tokens"];
            println!(
                "{:<12} {:>9}  {:>7}  {:>6.2}  {:>9.2}  {:>6.2}  {:>6.1}  {:>7.0}  {}/{}/{}  {:>8.1}  {:>7}  {:>5.1}  {:.0} ({:.0})",
                p["phase"].as_str().unwrap_or(""),
                p["attackers"],
                p["good_requests"],
                g["min"].as_f64().unwrap_or(f64::NAN),
                g["median"].as_f64().unwrap_or(f64::NAN),
                g["p99"].as_f64().unwrap_or(f64::NAN),
                g["max"].as_f64().unwrap_or(f64::NAN),
                p["wrong_per_s"].as_f64().unwrap_or(f64::NAN),
                w["401"],
                w["429"],
                w["503"],
                p["argon2_checks_per_s"].as_f64().unwrap_or(f64::NAN),
                p["argon2_at_once_max"],
                p["cpu_s"].as_f64().unwrap_or(f64::NAN),
                p["rss_mib"].as_f64().unwrap_or(f64::NAN),
                p["rss_peak_mib"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
