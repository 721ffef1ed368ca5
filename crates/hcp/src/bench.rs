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
    });
    if json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `hcp bench dispatch`: fast-path latency on the reference fleet, from a new price to the
/// complete list of changed targets; whole fleet and one site.
pub fn dispatch(json: bool, fleet: Option<&Path>, events: usize) -> Result<ExitCode> {
    use hcp_econ::dispatch::{DispatchConfig, Dispatcher, GpuBudget, SiteSignal};
    use hcp_model::DeviceIdx;
    use hcp_sim::grid::{self, GridParams, GridRun};
    if !(10..=100_000).contains(&events) {
        anyhow::bail!("--events: must be between 10 and 100000");
    }
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
    let t_build = Instant::now();
    let mut d = Dispatcher::new(&fleet, cfg, 0);
    let build_s = t_build.elapsed().as_secs_f64();
    let asics: Vec<DeviceIdx> =
        (0..fleet.devices.len() as u32).map(DeviceIdx).filter(|&i| d.power_w(i).is_some()).collect();
    let hashprice = 45.0;
    let mut full = Vec::with_capacity(events);
    let mut single = Vec::with_capacity(events);
    let mut changes = Vec::with_capacity(events);
    let step = 5 * 60_000;
    for e in 0..events {
        let now = e as i64 * step;
        // Telemetry keeps every device fresh (not timed).
        for &i in &asics {
            d.observe(i, now, 1.0, false);
        }
        // Every other event spikes, so that a large part of the fleet switches.
        let p = if e % 2 == 1 { prices[e % prices.len()] + 400.0 } else { prices[e % prices.len()] };
        let signals = vec![SiteSignal::new(p, now, 25.0); n_sites];
        let t = Instant::now();
        let plan = d.plan(now, &signals, hashprice, &gpus, &[]);
        full.push(t.elapsed().as_secs_f64() * 1e3);
        changes.push(plan.changes.len() as f64);
        // One site's price moves a little a second later.
        let mut one = signals.clone();
        one[0].price_usd_per_mwh += 3.0;
        one[0].price_at_ms = now + 1_000;
        let t = Instant::now();
        let plan = d.plan_sites(now + 1_000, &[hcp_model::SiteIdx(0)], &one, hashprice, &gpus, &[]);
        single.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(plan);
    }
    let mut f = full.clone();
    f.sort_by(f64::total_cmp);
    let mut s1 = single.clone();
    s1.sort_by(f64::total_cmp);
    let mut c = changes.clone();
    c.sort_by(f64::total_cmp);
    // Planning path: 10 sites x 96 intervals x every ASIC group, day-ahead prices of the series.
    let sites_da: Vec<Vec<f64>> = (0..n_sites)
        .map(|s| series.signals.iter().skip(s * 7).step_by(3).take(96).map(|x| x.da_price_usd_per_mwh).collect())
        .collect();
    let alerts: Vec<Vec<bool>> = (0..n_sites).map(|s| (0..96).map(|t| (t + s) % 40 < 4).collect()).collect();
    let ambient = vec![30.0; n_sites];
    let gpu_w: Vec<f64> = gpus.iter().map(|g| g.planned_w).collect();
    let current = vec![0.0; n_sites];
    let planner = hcp_econ::plan::PlannerConfig { four_cp_usd_per_kw_year: 100.0, ..Default::default() };
    let mut plan_s = vec![];
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
        let t = Instant::now();
        let schedule = hcp_econ::plan::solve(&fleet, &planner, &input)?;
        plan_s.push(t.elapsed().as_secs_f64());
        plan_size = (schedule.variables, schedule.constraints);
    }
    plan_s.sort_by(f64::total_cmp);
    let obj = serde_json::json!({
        "fleet": fleet.name,
        "asics": asics.len(),
        "sites": n_sites,
        "groups": d.group_count(),
        "events": events,
        "build_s": build_s,
        "full_fleet_plan_ms": { "p50": percentile(&f, 0.5), "p99": percentile(&f, 0.99), "max": f.last(), "target_p99": 5.0 },
        "changed_targets_per_event": { "p50": percentile(&c, 0.5), "max": c.last() },
        "single_site_plan_us": { "p50": percentile(&s1, 0.5), "p99": percentile(&s1, 0.99), "max": s1.last(), "target": 50.0 },
        "planner": {
            "sites": n_sites,
            "intervals": 96,
            "variables": plan_size.0,
            "constraints": plan_size.1,
            "solve_s_median_of_3": plan_s[1],
            "solver": "clarabel (good_lp)",
        },
    });
    if json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `hcp bench router`: routing decisions per second with 10,000 tenants, 3 bands and 1,000
/// replicas (10 models x 100), and the time to preempt after a 30 % capacity cut with 50,000 items
/// running.
pub fn router(json: bool, decisions_target: u64) -> Result<ExitCode> {
    use hcp_model::TenantId;
    use hcp_sched::{Decision, ModelId, ReplicaId, ReplicaSpec, Router, RouterConfig, TenantSpec, Work};
    if !(10_000..=100_000_000).contains(&decisions_target) {
        anyhow::bail!("--decisions: must be between 10000 and 100000000");
    }
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
    let mut r = build(64)?;
    let mut out = Vec::with_capacity(1_024);
    let mut running: Vec<u64> = Vec::with_capacity(70_000);
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
    // Warm up to a full fleet with a backlog.
    for _ in 0..80_000 {
        arrive(&mut r, &mut rnd, &mut out, 0);
    }
    let collect = |out: &mut Vec<Decision>, running: &mut Vec<u64>| -> u64 {
        let n = out.len() as u64;
        for d in out.drain(..) {
            if let Decision::Dispatch { id, .. } = d {
                running.push(id);
            }
        }
        n
    };
    collect(&mut out, &mut running);
    let mut decisions = 0u64;
    let t = Instant::now();
    let mut now = 1i64;
    while decisions < decisions_target {
        // One completion (frees a slot: the router dispatches from the backlog) and one arrival.
        let i = (rnd() % running.len().max(1) as u64) as usize;
        if !running.is_empty() {
            let id = running.swap_remove(i);
            r.complete(id, 200, now, &mut out);
        }
        arrive(&mut r, &mut rnd, &mut out, now);
        decisions += collect(&mut out, &mut running);
        now += 1;
    }
    let wall = t.elapsed().as_secs_f64();
    r.check().map_err(anyhow::Error::msg)?;
    // Shrink: 50,000 running items (1,000 replicas x 50 slots), every replica cut by 30 %. Fifteen
    // fresh routers, each cut once; the median and the fastest are reported.
    let mut walls = vec![];
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
        let t = Instant::now();
        s.resize_many(&sizes, 60_000, &mut out);
        walls.push(t.elapsed().as_secs_f64() * 1e3);
        preempted = out.iter().filter(|d| matches!(d, Decision::Preempt { .. })).count();
        s.check().map_err(anyhow::Error::msg)?;
    }
    walls.sort_by(f64::total_cmp);
    let shrink_ms = walls[walls.len() / 2];
    let obj = serde_json::json!({
        "tenants": tenants,
        "bands": 3,
        "replicas": 1_000,
        "models": 10,
        "decisions": decisions,
        "wall_s": wall,
        "decisions_per_s": decisions as f64 / wall,
        "target_decisions_per_s": 1_000_000,
        "shrink": {
            "running_before": before,
            "preempted": preempted,
            "runs": walls.len(),
            "wall_ms": shrink_ms,
            "wall_ms_min": walls[0],
            "target_ms": 10.0,
        },
    });
    if json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj)?);
    }
    Ok(ExitCode::SUCCESS)
}
