//! `hcp bench sim`: simulator throughput on the reference fleet.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use hcp_harness::{Baseline, BaselineMode, DemandSource, GridSource, Harness, MarketSource, Scenario};
use hcp_model::time::{MS_PER_DAY, SimTime};
use hcp_sim::demand::DemandParams;
use hcp_sim::fleet::Fidelity;
use hcp_sim::market::MarketParams;

use crate::cli::{REFERENCE_FLEET, load_fleet};

/// Peak resident set size of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Run {
    wall_s: f64,
    steps: u64,
    device_steps: u64,
}

fn run(fleet: &hcp_model::fleet::Fleet, fidelity: Fidelity, span_ms: i64) -> Result<Run> {
    let from = SimTime::parse("2025-01-01").expect("valid");
    let scenario = Scenario {
        from,
        to: from.plus_ms(span_ms),
        interval_ms: 15 * 60_000,
        fidelity,
        seed: 1,
        energy_adder_usd_per_mwh: 0.0,
    };
    let mut h = Harness::new(
        fleet,
        scenario,
        GridSource::Simulated(Box::default()),
        MarketSource::Simulated(MarketParams::default()),
        DemandSource::Simulated(DemandParams::default()),
    )?;
    let t = Instant::now();
    let s = h.run(&mut Baseline { mode: BaselineMode::Breakeven }, &mut |_| {}, &mut |_, _| {})?;
    Ok(Run { wall_s: t.elapsed().as_secs_f64(), steps: s.steps, device_steps: s.device_steps })
}

pub fn sim(json: bool, fleet: Option<&Path>, device_hours: f64, cohort_days: u32) -> Result<ExitCode> {
    if !(0.25..=8_760.0).contains(&device_hours) || device_hours * 4.0 != (device_hours * 4.0).round() {
        anyhow::bail!("--device-hours: must be a whole number of quarter hours between 0.25 and 8760");
    }
    if !(1..=3_660).contains(&cohort_days) {
        anyhow::bail!("--cohort-days: must be between 1 and 3660");
    }
    let machine = crate::measure::Machine::start();
    let t = Instant::now();
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let load_s = t.elapsed().as_secs_f64();
    let device_span = (device_hours * 3.6e6).round() as i64;
    let device = run(&fleet, Fidelity::Device, device_span)?;
    let rss_after_device = peak_rss_mib();
    let cohort = run(&fleet, Fidelity::Cohort, i64::from(cohort_days) * MS_PER_DAY)?;
    let obj = serde_json::json!({
        "fleet": fleet.name,
        "devices": fleet.devices.len(),
        "asics": fleet.asic_count(),
        "gpus": fleet.gpu_count(),
        "fleet_load_s": load_s,
        "device_fidelity": {
            "simulated_hours": device_hours,
            "telemetry_step_s": 10,
            "steps": device.steps,
            "device_steps": device.device_steps,
            "wall_s": device.wall_s,
            "device_steps_per_s": device.device_steps as f64 / device.wall_s,
            "ns_per_device_step": device.wall_s * 1e9 / device.device_steps as f64,
            "peak_rss_mib": rss_after_device,
            "target_wall_s": 20.0,
            "target_rss_mib": 2048.0,
        },
        "cohort_fidelity": {
            "simulated_days": cohort_days,
            "step_min": 15,
            "steps": cohort.steps,
            "wall_s": cohort.wall_s,
            "target_wall_s": 10.0,
        },
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine.report(),
    });
    crate::measure::print_report(&obj, json)
}

/// `hcp bench dispatch`: fast-path latency on the reference fleet, from a new price to the
/// complete list of changed targets; whole fleet and one site. Each plan's wall time and the CPU
/// time of the planning thread beside it (a plan whose wall time is far above its CPU time was
/// preempted, not slow); `runs` fresh dispatchers over the same events, and the spread of each
/// figure over them.
pub fn dispatch(json: bool, fleet: Option<&Path>, events: usize, runs: usize) -> Result<ExitCode> {
    use crate::measure::{percentiles, quantile, timed};
    use hcp_econ::dispatch::{DispatchConfig, Dispatcher, GpuBudget, SiteSignal};
    use hcp_model::DeviceIdx;
    use hcp_sim::grid::{self, GridParams, GridRun};
    if !(10..=100_000).contains(&events) {
        anyhow::bail!("--events: must be between 10 and 100000");
    }
    crate::measure::check_runs(runs)?;
    let machine = crate::measure::Machine::start();
    let fleet = load_fleet(fleet, REFERENCE_FLEET)?;
    let n_sites = fleet.sites.len();
    // Prices: a simulated ERCOT-like series (spikes included), one event per 5 minutes.
    let from = SimTime::parse("2024-07-01").expect("valid");
    let params = GridParams::default();
    let points = ["HB_SOUTH".to_string()];
    let days = (events as i64 * 5 * 60_000 / MS_PER_DAY + 2).max(2);
    let series = grid::five_minute(
        &grid::simulate(&GridRun {
            params: &params,
            from,
            to: from.plus_ms(days * MS_PER_DAY),
            seed: 7,
            settlement_points: &points,
        })[0],
        7,
    );
    let prices: Vec<f64> = series.rt_prices();
    // No minimum on/off time here: every spike flips the whole fleet (the worst case).
    let cfg = DispatchConfig { min_on_ms: 0, min_off_ms: 0, ..DispatchConfig::default() };
    let gpus: Vec<GpuBudget> = fleet
        .sites
        .iter()
        .map(|s| {
            let n = fleet
                .devices
                .iter()
                .filter(|d| d.site == s.idx && matches!(d.model, hcp_model::ModelRef::Gpu(_)))
                .count();
            GpuBudget { planned_w: n as f64 * 1_275.0, min_w: n as f64 * 775.0, ..Default::default() }
        })
        .collect();
    let hashprice = 45.0;
    let step = 5 * 60_000;
    let mut per_run = vec![];
    let mut groups = 0;
    let mut asic_count = 0;
    for _ in 0..runs {
        let ((mut d, asics), build_ms, _) = timed(|| {
            let d = Dispatcher::new(&fleet, cfg.clone(), 0);
            let asics: Vec<DeviceIdx> =
                (0..fleet.devices.len() as u32).map(DeviceIdx).filter(|&i| d.power_w(i).is_some()).collect();
            (d, asics)
        });
        groups = d.group_count();
        asic_count = asics.len();
        let (mut full, mut full_cpu) = (Vec::with_capacity(events), Vec::with_capacity(events));
        let (mut single, mut single_cpu) = (Vec::with_capacity(events), Vec::with_capacity(events));
        let mut changes = Vec::with_capacity(events);
        for e in 0..events {
            let now = e as i64 * step;
            // Telemetry keeps every device fresh (not timed).
            for &i in &asics {
                d.observe(i, now, 1.0, false);
            }
            // Every other event spikes, so that a large part of the fleet switches.
            let p = if e % 2 == 1 { prices[e % prices.len()] + 400.0 } else { prices[e % prices.len()] };
            let signals = vec![SiteSignal::new(p, now, 25.0); n_sites];
            let (plan, wall, cpu) = timed(|| d.plan(now, &signals, hashprice, &gpus, &[]));
            full.push(wall);
            full_cpu.push(cpu);
            changes.push(plan.changes.len() as f64);
            drop(plan);
            // One site's price moves a little a second later.
            let mut one = signals.clone();
            one[0].price_usd_per_mwh += 3.0;
            one[0].price_at_ms = now + 1_000;
            let (plan, wall, cpu) =
                timed(|| d.plan_sites(now + 1_000, &[hcp_model::SiteIdx(0)], &one, hashprice, &gpus, &[]));
            single.push(wall * 1e3);
            single_cpu.push(cpu * 1e3);
            std::hint::black_box(plan);
        }
        // Plans whose wall time exceeds their CPU time by more than 1 ms: the thread was off its core.
        let preempted = full.iter().zip(&full_cpu).filter(|(w, c)| **w - **c > 1.0).count();
        changes.sort_by(f64::total_cmp);
        per_run.push(serde_json::json!({
            "build_ms": build_ms,
            "full_fleet_plan_ms": { "wall": percentiles(&mut full), "thread_cpu": percentiles(&mut full_cpu) },
            "plans_preempted_over_1ms": preempted,
            "changed_targets_per_event": { "p50": quantile(&changes, 0.5), "max": changes.last() },
            "single_site_plan_us": { "wall": percentiles(&mut single), "thread_cpu": percentiles(&mut single_cpu) },
        }));
    }
    // Planning path: 10 sites x 96 intervals x every ASIC group, day-ahead prices of the series.
    let sites_da: Vec<Vec<f64>> = (0..n_sites)
        .map(|s| series.signals.iter().skip(s * 7).step_by(3).take(96).map(|x| x.da_price_usd_per_mwh).collect())
        .collect();
    let alerts: Vec<Vec<bool>> = (0..n_sites).map(|s| (0..96).map(|t| (t + s) % 40 < 4).collect()).collect();
    let ambient = vec![30.0; n_sites];
    let gpu_w: Vec<f64> = gpus.iter().map(|g| g.planned_w).collect();
    let current = vec![0.0; n_sites];
    let planner = hcp_econ::plan::PlannerConfig { four_cp_usd_per_kw_year: 100.0, ..Default::default() };
    let (mut plan_s, mut plan_cpu) = (vec![], vec![]);
    let mut plan_size = (0, 0);
    for _ in 0..3 {
        let input = hcp_econ::plan::PlanInput {
            price: &sites_da,
            four_cp_alert: &alerts,
            ambient_c: &ambient,
            hashprice_usd_per_ph_day: hashprice,
            gpu_w: &gpu_w,
            current_asic_w: &current,
        };
        let (schedule, wall, cpu) = timed(|| hcp_econ::plan::solve(&fleet, &planner, &input));
        let schedule = schedule?;
        plan_s.push(wall / 1e3);
        plan_cpu.push(cpu / 1e3);
        plan_size = (schedule.variables, schedule.constraints);
    }
    let obj = serde_json::json!({
        "fleet": fleet.name,
        "asics": asic_count,
        "sites": n_sites,
        "groups": groups,
        "events_per_run": events,
        "target_full_fleet_plan_cpu_ms_p99": 5.0,
        "target_single_site_plan_us": 50.0,
        "spread": crate::measure::spreads(&per_run, &[
            "full_fleet_plan_ms.wall.p50", "full_fleet_plan_ms.wall.p99",
            "full_fleet_plan_ms.thread_cpu.p50", "full_fleet_plan_ms.thread_cpu.p99", "full_fleet_plan_ms.thread_cpu.max",
            "single_site_plan_us.wall.p50", "single_site_plan_us.wall.p99",
            "single_site_plan_us.thread_cpu.p50", "single_site_plan_us.thread_cpu.p99",
            "plans_preempted_over_1ms",
        ]),
        "runs": per_run,
        "planner": {
            "sites": n_sites,
            "intervals": 96,
            "variables": plan_size.0,
            "constraints": plan_size.1,
            "solve_s": crate::measure::spread(&plan_s),
            "solve_thread_cpu_s": crate::measure::spread(&plan_cpu),
            "solver": "clarabel (good_lp)",
        },
        "machine": machine.report(),
    });
    crate::measure::print_report(&obj, json)
}

/// `hcp bench router`: placements per second (a request dispatched to a replica) with 10,000
/// tenants, 3 bands and 1,000 replicas (10 models x 100), each loop step one completion (a slot
/// frees: the router places a waiting request) and one arrival (answered `Queue`: the backlog is
/// kept full); admission answers are counted apart. Then the time to preempt after a 30 % capacity
/// cut with 50,000 items running. `runs` fresh routers; the spread over them.
pub fn router(json: bool, placements_target: u64, runs: usize) -> Result<ExitCode> {
    use hcp_model::TenantId;
    use hcp_sched::{Decision, ModelId, ReplicaId, ReplicaSpec, Router, RouterConfig, TenantSpec, Work};
    if !(10_000..=100_000_000).contains(&placements_target) {
        anyhow::bail!("--placements: must be between 10000 and 100000000");
    }
    crate::measure::check_runs(runs)?;
    let machine = crate::measure::Machine::start();
    // A small deterministic generator (SplitMix64) for the synthetic load.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let tenants = 10_000u32;
    let build = |slots: u32| -> Result<Router> {
        let mut r = Router::new(RouterConfig::three_bands()).map_err(anyhow::Error::msg)?;
        for t in 0..tenants {
            r.add_tenant(TenantSpec {
                id: TenantId(t),
                weight: f64::from(1 + t % 4),
                guaranteed_gpus: 0.0,
                borrow_limit_gpus: 1e9,
            })
            .map_err(anyhow::Error::msg)?;
        }
        let mut out = vec![];
        for k in 0..1_000u32 {
            let spec = ReplicaSpec {
                id: ReplicaId(k),
                model: ModelId(k % 10),
                gpus: 8,
                slots,
                kv_tokens: u64::from(slots) * 4_000,
            };
            r.set_replica(spec, 0, &mut out).map_err(anyhow::Error::msg)?;
        }
        Ok(r)
    };
    let mut next = 0u64;
    let mut arrive = |r: &mut Router, rnd: &mut dyn FnMut() -> u64, out: &mut Vec<Decision>, now: i64| {
        next += 1;
        let x = rnd();
        let w = Work {
            id: next,
            tenant: TenantId((x % u64::from(tenants)) as u32),
            band: ((x >> 20) % 3) as u8,
            model: ModelId(((x >> 30) % 10) as u32),
            prompt_tokens: 200 + ((x >> 40) % 1_000) as u32,
            max_output_tokens: 200,
            deadline_ms: None,
            gang: 1,
            preemptible: true,
            restart_cost: 0.0,
        };
        r.arrive(w, now, out);
    };
    // Every decision is an answer; a placement is a `Dispatch`.
    let collect = |out: &mut Vec<Decision>, running: &mut Vec<u64>| -> (u64, u64) {
        let (mut answers, mut placed) = (0, 0);
        for d in out.drain(..) {
            answers += 1;
            if let Decision::Dispatch { id, .. } = d {
                running.push(id);
                placed += 1;
            }
        }
        (answers, placed)
    };
    let mut per_run = vec![];
    for _ in 0..runs {
        let mut r = build(64)?;
        let mut out = Vec::with_capacity(1_024);
        let mut running: Vec<u64> = Vec::with_capacity(70_000);
        // Warm up to a full fleet with a backlog.
        for _ in 0..80_000 {
            arrive(&mut r, &mut rnd, &mut out, 0);
        }
        collect(&mut out, &mut running);
        let (mut answers, mut placements) = (0u64, 0u64);
        let (c0, t) = (crate::measure::thread_cpu_s(), Instant::now());
        let mut now = 1i64;
        while placements < placements_target {
            // One completion (frees a slot: the router places from the backlog) and one arrival.
            let i = (rnd() % running.len().max(1) as u64) as usize;
            if !running.is_empty() {
                let id = running.swap_remove(i);
                r.complete(id, 200, now, &mut out);
            }
            arrive(&mut r, &mut rnd, &mut out, now);
            let (a, p) = collect(&mut out, &mut running);
            answers += a;
            placements += p;
            now += 1;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = crate::measure::thread_cpu_s() - c0;
        r.check().map_err(anyhow::Error::msg)?;
        per_run.push(serde_json::json!({
            "placements": placements,
            "answers": answers,
            "wall_s": wall,
            "thread_cpu_s": cpu,
            "placements_per_s": placements as f64 / wall,
            "placements_per_cpu_s": placements as f64 / cpu,
            "answers_per_s": answers as f64 / wall,
            "ns_per_placement_cpu": cpu * 1e9 / placements as f64,
        }));
    }
    // Shrink: 50,000 running items (1,000 replicas x 50 slots), every replica cut by 30 %. Fifteen
    // fresh routers, each cut once.
    let (mut walls, mut cpus) = (vec![], vec![]);
    let (mut before, mut preempted) = (0, 0);
    for _ in 0..15 {
        let mut s = build(50)?;
        let mut out = vec![];
        for _ in 0..60_000 {
            arrive(&mut s, &mut rnd, &mut out, 0);
        }
        out.clear();
        before = s.running_len();
        let sizes: Vec<(ReplicaId, u32)> = (0..1_000u32).map(|k| (ReplicaId(k), 35)).collect();
        let ((), wall, cpu) = crate::measure::timed(|| s.resize_many(&sizes, 60_000, &mut out));
        walls.push(wall);
        cpus.push(cpu);
        preempted = out.iter().filter(|d| matches!(d, Decision::Preempt { .. })).count();
        s.check().map_err(anyhow::Error::msg)?;
    }
    let obj = serde_json::json!({
        "tenants": tenants,
        "bands": 3,
        "replicas": 1_000,
        "models": 10,
        "placements_per_run": placements_target,
        "target_placements_per_s": 1_000_000,
        "spread": crate::measure::spreads(&per_run, &[
            "placements_per_s", "placements_per_cpu_s", "answers_per_s", "ns_per_placement_cpu",
        ]),
        "runs": per_run,
        "shrink": {
            "running_before": before,
            "preempted": preempted,
            "cuts": walls.len(),
            "wall_ms": crate::measure::spread(&walls),
            "thread_cpu_ms": crate::measure::spread(&cpus),
            "target_ms": 10.0,
        },
        "machine": machine.report(),
    });
    crate::measure::print_report(&obj, json)
}
