//! `hcp bench switching --end-to-end`: from a price signal arriving at the platform to every
//! command of the plan acknowledged by the site agents, through the real store and bus (SQLite and
//! the in-process bus by default; `--store postgres://...` and `--bus nats://...` for the
//! scaled-out shape) and the agent link (`hcp_server::agentlink`: one agent per site, each on its
//! own subscription, the simulated devices behind them).

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hcp_bus::{Bus, From};
use hcp_econ::dispatch::{DispatchConfig, Dispatcher, SiteSignal};
use hcp_fleet::Command;
use hcp_fleet::wire::{self, Answer, Inbox};
use hcp_harness::plane::{DevicePlane, PlaneConfig};
use hcp_server::agentlink::{self, Sender, now_us};
use serde_json::json;

use crate::cli::{REFERENCE_FLEET, load_fleet};
use crate::measure::{Machine, percentiles, thread_cpu_s};

/// Where the link runs: the store and the bus, as URLs (none: a fresh SQLite file, in-process).
pub struct Link<'a> {
    pub store: Option<&'a str>,
    pub bus: Option<&'a str>,
    /// Commands one instant may send (default: every device, so that the whole plan leaves at
    /// once; the platform's default, 10,000, sends the rest at the following ticks).
    pub batch_max: Option<usize>,
}

/// One event's milestones, microseconds since the signal arrived.
struct Run {
    commands: usize,
    /// The plan's changed targets (the commands are all of them when `batch_max` lets the whole
    /// plan leave at once).
    changes: usize,
    batches: usize,
    bytes: usize,
    decided: f64,
    decide_cpu: f64,
    stored: f64,
    published: f64,
    last_received: f64,
    done: f64,
}

pub fn end_to_end(json_out: bool, fleet: Option<&Path>, events: usize, link: Link<'_>) -> Result<ExitCode> {
    if !(1..=1_000).contains(&events) {
        bail!("--events: must be between 1 and 1000 with --end-to-end");
    }
    let machine = Machine::start();
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let batch_max = link.batch_max.unwrap_or(fleet.devices.len()).max(1);
    let mut cfg = PlaneConfig::default();
    cfg.manager.batch_max = batch_max;
    let dcfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..DispatchConfig::default() };
    let mut d = Dispatcher::new(&fleet, dcfg, 0);
    let gpus = hcp_harness::policies::gpu_budgets(&fleet, &fleet.groups());
    let mut plane = DevicePlane::new(&fleet, cfg, 7, 0, &d, 1).map_err(|e| anyhow::anyhow!("plane: {e}"))?;
    let sites = fleet.sites.len();
    // Every device has reported once; a low price runs the fleet and it settles (in memory).
    plane.advance_to(20_000, &mut d);
    let low = vec![SiteSignal::new(25.0, 20_000, 25.0); sites];
    plane.apply_plan(&d.plan(20_000, &low, 45.0, &gpus, &[]));
    plane.reconcile_now(&mut d);
    plane.advance_to(200_000, &mut d);
    plane.take_output();
    let now_ms = plane.now_ms();

    let dir = std::env::temp_dir().join(format!("hcp-bench-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store_url = match link.store {
        Some(u) => u.to_string(),
        None => format!("sqlite:{}", dir.join("bench.db").display()),
    };
    let rt = crate::serve::runtime()?;
    let out = rt.block_on(async {
        let store = hcp_store::Store::open(&store_url).await.context("store")?;
        store.migrate().await?;
        let bus = Bus::connect(link.bus, Default::default()).await.context("bus")?;
        // The simulated devices, one world; each site's agent commands its own.
        let devices = Arc::new(Mutex::new(plane.agents().clone()));
        let mut agents = vec![];
        for s in &fleet.sites {
            let members = (0..fleet.devices.len() as u32)
                .map(hcp_model::DeviceIdx)
                .filter(|x| fleet.devices[x.index()].site == s.idx);
            let inbox = Inbox::new(fleet.devices.len(), members);
            let devices = devices.clone();
            let apply = move |cmds: &[Command]| {
                let mut g = devices.lock().unwrap_or_else(|e| e.into_inner());
                for c in cmds {
                    g.command(c, now_ms);
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            agents.push(tokio::spawn(agentlink::run_agent(
                bus.clone(),
                s.id.clone(),
                u32::from(s.idx.0),
                inbox,
                apply,
                tx,
            )));
            rx.await.context("an agent did not subscribe")?;
        }
        let mut acks = bus.subscribe("hcp.agent.*.acks", From::New).await?;
        let mut runs = vec![];
        let result: Result<()> = async {
            for k in 0..events {
                // A fresh copy of the settled fleet (not timed); the epoch grows with each event so
                // that every agent takes every command (a new dispatcher generation each time).
                let (mut p, mut dd) = (plane.clone(), d.clone());
                *devices.lock().unwrap_or_else(|e| e.into_inner()) = p.agents().clone();
                let sender = Sender::new(&fleet, store.clone(), bus.clone(), 1 + k as u64)?;
                let signals = vec![SiteSignal::new(900.0 + k as f64, now_ms, 25.0); sites];
                let (t0, c0) = (now_us(), thread_cpu_s());
                // Decide: the plan in steps, the first batch's intents and commands first, as the
                // engine does it; then the rest.
                let (cmds, changes): (Vec<Command>, usize) = {
                    let pl = p.plane_mut();
                    let mut run = dd.start_plan(now_ms, &signals, 45.0, &gpus, &[]);
                    let first = run.step(pl.batch_max());
                    pl.apply_changes(first);
                    pl.send_now(first);
                    pl.apply_changes(run.step(usize::MAX));
                    let changes = run.finish().changes.len();
                    pl.reconcile_now(&mut dd);
                    // Each event starts from a copy of the same state, so its commands carry the same
                    // ids as the last event's: give each event ids of its own (an agent rightly
                    // answers a repeated id as a duplicate).
                    let stride = 1_000_000_000 * k as u64;
                    (pl.drain_commands().map(|c| Command { id: c.id + stride, ..c }).collect(), changes)
                };
                if cmds.is_empty() {
                    bail!("the grid event sent no command (the fleet has no ASIC running?)");
                }
                let decided = now_us();
                let decide_cpu = (thread_cpu_s() - c0) * 1e3;
                let sent = sender.send(&cmds, now_ms).await?;
                let mut answered = 0;
                let mut last_received = 0;
                while answered < cmds.len() {
                    let m = tokio::time::timeout(Duration::from_secs(30), acks.next())
                        .await
                        .context("no acknowledgement within 30 s")??;
                    let a = wire::decode_acks(&m.payload)?;
                    if a.header.epoch != sender.epoch {
                        continue;
                    }
                    if let Some(bad) = a.acks.iter().find(|x| x.2 != Answer::Accepted) {
                        bail!("command {} to device {} was answered {:?}", bad.0, bad.1.0, bad.2);
                    }
                    answered += a.acks.len();
                    last_received = last_received.max(a.received_us);
                }
                let done = now_us();
                let rel = |t: i64| (t - t0) as f64 / 1e3;
                runs.push(Run {
                    commands: cmds.len(),
                    changes,
                    batches: sent.batches,
                    bytes: sent.bytes,
                    decided: rel(decided),
                    decide_cpu,
                    stored: rel(sent.stored_us),
                    published: rel(sent.published_us),
                    last_received: rel(last_received),
                    done: rel(done),
                });
            }
            Ok(())
        }
        .await;
        // Cleaned up whatever happened: the bench's batches leave the store (their ids, made
        // unique per event, must not become the next engine's first id) and its traffic the bus.
        for a in agents {
            a.abort();
        }
        let deleted = store
            .exec_admin(&format!(
                "DELETE FROM command_batches WHERE issued_ms = {now_ms} AND epoch BETWEEN 1 AND {events}"
            ))
            .await;
        let purged = bus.purge("hcp.agent.>").await;
        store.close().await;
        result?;
        deleted?;
        anyhow::Ok((runs, purged?, bus.kind(), store.backend()))
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    let (runs, purged, bus_kind, backend) = out;
    let col = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let obj = json!({
        "fleet": fleet.name,
        "devices": fleet.devices.len(),
        "sites": sites,
        "case": "grid event on the running fleet: a spike sleeps every ASIC (from a copy of the settled fleet each time)",
        "events": runs.len(),
        "store": format!("{backend:?}"),
        "bus": bus_kind,
        "batch_max": batch_max,
        "commands_per_event": percentiles(&mut col(&|r| r.commands as f64)),
        "plan_changes_per_event": percentiles(&mut col(&|r| r.changes as f64)),
        // Changes that sent no command: devices already where the plan puts them, or not
        // commandable; with `--batch-max` below the plan, also what waits for the next ticks.
        "changes_without_a_command": percentiles(&mut col(&|r| r.changes.saturating_sub(r.commands) as f64)),
        "messages_per_event": percentiles(&mut col(&|r| r.batches as f64)),
        "bytes_per_event": percentiles(&mut col(&|r| r.bytes as f64)),
        "signal_to_all_acknowledged_ms": percentiles(&mut col(&|r| r.done)),
        "target_ms": 100.0,
        "parts_ms": {
            "decide": percentiles(&mut col(&|r| r.decided)),
            "decide_thread_cpu": percentiles(&mut col(&|r| r.decide_cpu)),
            "persist": percentiles(&mut col(&|r| r.stored - r.decided)),
            "publish": percentiles(&mut col(&|r| r.published - r.stored)),
            "deliver": percentiles(&mut col(&|r| (r.last_received - r.published).max(0.0))),
            "apply_and_acknowledge": percentiles(&mut col(&|r| r.done - r.last_received.max(r.published))),
        },
        "bus_messages_purged_after": purged,
        "machine": machine.report(),
    });
    crate::measure::print_report(&obj, json_out)
}
