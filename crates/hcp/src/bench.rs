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
