//! Output: the per-site CSV rows and the one-screen summary.

use std::fmt::Write as _;
use std::fs::File;

use anyhow::Result;
use hcp_harness::{SiteRow, Summary, Totals};
use hcp_model::fleet::Fleet;
use hcp_model::units::MicroUsd;

pub const COLUMNS: [&str; 29] = [
    "interval_start",
    "site",
    "rt_price_usd_per_mwh",
    "hashprice_usd_per_ph_day",
    "ambient_c",
    "four_cp_alert",
    "grid_event",
    "cap_mw",
    "asic_hashing_mw",
    "asic_transition_mw",
    "asic_idle_mw",
    "gpu_serving_mw",
    "gpu_idle_mw",
    "total_mw",
    "peak_mw",
    "hashrate_ph_s",
    "reported_hashrate_ph_s",
    "asics_hashing",
    "asics_sleeping",
    "asics_off",
    "asics_faulted",
    "gpus_serving",
    "requests",
    "output_tokens",
    "energy_mwh",
    "mining_revenue_usd",
    "inference_revenue_usd",
    "energy_cost_usd",
    "margin_usd",
];

pub struct RowWriter {
    w: csv::Writer<File>,
}

impl RowWriter {
    pub fn new(mut w: csv::Writer<File>) -> Result<Self> {
        w.write_record(COLUMNS)?;
        Ok(RowWriter { w })
    }

    pub fn write(&mut self, r: &SiteRow) -> Result<()> {
        let f = |x: f64, d: usize| format!("{x:.d$}");
        let rec: [String; 29] = [
            r.at.to_string(),
            r.site.clone(),
            f(r.rt_price_usd_per_mwh, 2),
            f(r.hashprice_usd_per_ph_day, 3),
            f(r.ambient_c, 1),
            u8::from(r.four_cp_alert).to_string(),
            r.grid_event.clone(),
            f(r.cap_mw, 3),
            f(r.asic_hashing_mw, 6),
            f(r.asic_transition_mw, 6),
            f(r.asic_idle_mw, 6),
            f(r.gpu_serving_mw, 6),
            f(r.gpu_idle_mw, 6),
            f(r.total_mw(), 6),
            f(r.peak_mw, 6),
            f(r.hashrate_ph_s, 4),
            f(r.reported_hashrate_ph_s, 4),
            f(r.asics_hashing, 1),
            f(r.asics_sleeping, 1),
            f(r.asics_off, 1),
            f(r.asics_faulted, 1),
            f(r.gpus_serving, 1),
            f(r.requests, 0),
            f(r.output_tokens, 0),
            f(r.energy_mwh, 6),
            r.mining_revenue.to_string(),
            r.inference_revenue.to_string(),
            r.energy_cost.to_string(),
            r.margin().to_string(),
        ];
        self.w.write_record(&rec)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.w.flush()?;
        Ok(())
    }
}

fn usd(m: MicroUsd) -> String {
    let v = m.as_usd_f64();
    let whole = v.abs().round() as i64;
    let mut s = whole.to_string();
    let mut i = s.len() as i64 - 3;
    while i > 0 {
        s.insert(i as usize, ',');
        i -= 3;
    }
    if v < 0.0 { format!("-{s}") } else { s }
}

fn line(out: &mut String, name: &str, t: &Totals) {
    let mining_rev_per_mwh =
        if t.mining_energy_mwh > 0.0 { t.mining_revenue.as_usd_f64() / t.mining_energy_mwh } else { 0.0 };
    let _ = writeln!(
        out,
        "{name:<14} {:>11.1} {:>8.2} {:>8.2} {:>9.1} {:>13} {:>13} {:>13} {:>13} {:>8.1} {:>9.1}",
        t.energy_mwh,
        t.mean_mw(),
        t.peak_mw,
        t.mean_hashrate_ph_s(),
        usd(t.mining_revenue),
        usd(t.inference_revenue),
        usd(t.energy_cost),
        usd(t.margin()),
        t.mean_price(),
        mining_rev_per_mwh,
    );
}

/// The one-screen summary printed at the end of a run.
pub fn summary(s: &Summary, fleet: &Fleet, wall_s: f64) -> String {
    let mut out = String::new();
    let days = (s.to.0 - s.from.0) as f64 / 86_400_000.0;
    let _ = writeln!(
        out,
        "fleet {} ({} sites, {} ASICs, {} GPUs) | {} .. {} ({days:.1} days) | policy {} | fidelity {:?} | seed {}",
        s.fleet,
        fleet.sites.len(),
        fleet.asic_count(),
        fleet.gpu_count(),
        s.from,
        s.to,
        s.controller,
        s.fidelity,
        s.seed
    );
    for n in &s.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(
        out,
        "{:<14} {:>11} {:>8} {:>8} {:>9} {:>13} {:>13} {:>13} {:>13} {:>8} {:>9}",
        "site",
        "energy MWh",
        "mean MW",
        "peak MW",
        "PH/s",
        "mining USD",
        "inference USD",
        "energy USD",
        "margin USD",
        "USD/MWh",
        "rev/MWh"
    );
    for (name, t) in &s.sites {
        line(&mut out, name, t);
    }
    line(&mut out, "fleet", &s.total);
    let t = &s.total;
    let _ = writeln!(
        out,
        "hashprice {:.2} USD/PH/day (mean) | {} grid deployments announced | inference {:.0} requests, {:.2} M output tokens | ASIC faults {:.0}, GPU Xid events {:.0}",
        t.mean_hashprice(),
        t.deployments,
        t.requests,
        t.output_tokens / 1e6,
        t.asic_faults,
        t.gpu_xid_events
    );
    let _ = writeln!(
        out,
        "{} steps, {} device-steps in {wall_s:.2} s; invariants held at every step",
        s.steps, s.device_steps
    );
    out
}
