//! The architecture rule, checked from `cargo metadata`: core crates are pure. They may depend on
//! other core crates but never on an adapter crate of this workspace, an async runtime, an HTTP,
//! SQL or messaging library (ARCHITECTURE.md, "Invariants").

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Crates that hold the deterministic core.
const CORE: &[&str] =
    &["hcp-model", "hcp-econ", "hcp-sim", "hcp-sched", "hcp-engine", "hcp-harness", "hcp-fleet", "hcp-billing"];

/// Libraries that do IO or bring a runtime; none may be reachable from a core crate.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "futures-executor",
    "axum",
    "hyper",
    "reqwest",
    "tower",
    "tower-http",
    "warp",
    "actix-web",
    "tonic",
    "sqlx",
    "rusqlite",
    "postgres",
    "tokio-postgres",
    "diesel",
    "sea-orm",
    "async-nats",
    "nats",
    "redis",
    "lapin",
    "rumqttc",
    "indicatif",
    "clap",
];

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    // Only this host's dependencies: they are the ones already downloaded, so no network is needed.
    let vv = Command::new("rustc").arg("-vV").output().expect("run rustc -vV");
    let host = String::from_utf8_lossy(&vv.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host, "--manifest-path", root])
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("metadata is JSON")
}

/// Package name -> names of its normal and build dependencies (not dev), from the resolve graph.
fn graph(meta: &Value) -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let members: BTreeSet<String> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| name_of[id.as_str().unwrap()].to_string())
        .collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let from = name_of[node["id"].as_str().unwrap()].to_string();
        let deps = g.entry(from).or_default();
        for d in node["deps"].as_array().unwrap() {
            let runtime = d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"));
            if runtime {
                deps.insert(name_of[d["pkg"].as_str().unwrap()].to_string());
            }
        }
    }
    (g, members)
}

fn reachable(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(n) = stack.pop() {
        for d in g.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    seen
}

fn violations(g: &BTreeMap<String, BTreeSet<String>>, members: &BTreeSet<String>) -> Vec<String> {
    let mut bad = vec![];
    for core in CORE {
        for dep in reachable(g, core) {
            if FORBIDDEN.contains(&dep.as_str()) {
                bad.push(format!("{core} depends (maybe indirectly) on {dep}"));
            }
            if members.contains(&dep) && !CORE.contains(&dep.as_str()) {
                bad.push(format!("{core} depends on the adapter crate {dep}"));
            }
        }
    }
    bad
}

#[test]
fn core_crates_are_pure() {
    let (g, members) = graph(&metadata());
    for core in CORE {
        assert!(members.contains(*core), "{core} is a workspace member");
    }
    let bad = violations(&g, &members);
    assert!(bad.is_empty(), "architecture violations:\n{}", bad.join("\n"));
}

/// The check itself can fail: a core crate that pulls in tokio, or an adapter, is reported.
#[test]
fn the_check_catches_a_violation() {
    let (mut g, mut members) = graph(&metadata());
    g.entry("hcp-sim".into()).or_default().insert("tokio".into());
    members.insert("hcp-store".into());
    g.entry("hcp-model".into()).or_default().insert("hcp-store".into());
    let bad = violations(&g, &members);
    assert!(bad.iter().any(|b| b == "hcp-sim depends (maybe indirectly) on tokio"), "{bad:?}");
    assert!(bad.iter().any(|b| b == "hcp-harness depends (maybe indirectly) on tokio"), "{bad:?}");
    assert!(bad.iter().any(|b| b == "hcp-model depends on the adapter crate hcp-store"), "{bad:?}");
}
