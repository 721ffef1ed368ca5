//! Batch deferral measured on recorded prices. One seeded stream of batch jobs (GPUs, run time,
//! deadline) runs three ways over a recorded period of one settlement point, its energy paid at
//! each interval's real-time price:
//! - `at-once`: each job starts when it arrives (the platform without the planner);
//! - `planner`: at each interval the waiting jobs are placed by [`hcp_econ::batch::schedule`] on
//!   what the engine knows then (the last real-time price published, for the current interval;
//!   then the day-ahead prices published so far: today's, and tomorrow's from 13:00), and those
//!   placed now start (the platform's behaviour: a started job runs to its end, so each is placed
//!   as one stretch);
//! - `oracle`: the same, placed on the actual real-time prices (what deferral could save with a
//!   perfect forecast; an upper bound on the planner's saving).
//!
//! The GPUs free for batch work are a fixed pool: the planner sees the room the started jobs leave
//! in each interval ahead; a job with no room when its latest start comes runs anyway (counted as
//! GPU-hours over the pool). Pure: no IO, no clock.

use hcp_econ::batch::{BatchJob, PricePath, schedule};
use hcp_model::SimTime;
use hcp_model::time::MS_PER_DAY;
use hcp_sim::replay::GridSeries;
use hcp_sim::rng;

/// The stream of batch jobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStream {
    pub jobs_per_day: f64,
    pub gpus_per_job: u32,
    /// Run time drawn uniformly in [low, high] hours.
    pub run_h: (f64, f64),
    /// Slack (deadline less arrival less run time) drawn uniformly in [low, high] hours.
    pub slack_h: (f64, f64),
    /// GPUs free for batch work.
    pub pool_gpus: u32,
    /// One GPU's draw at full load with its host share (W).
    pub gpu_draw_w: f64,
}

impl Default for BatchStream {
    /// 24 jobs a day of 8 GPUs, 1-6 h each with 4-24 h of slack, on a pool of 256 H100s drawing
    /// 1,275 W each with the host (a DGX H100's 10.2 kW over 8 GPUs).
    fn default() -> Self {
        BatchStream {
            jobs_per_day: 24.0,
            gpus_per_job: 8,
            run_h: (1.0, 6.0),
            slack_h: (4.0, 24.0),
            pool_gpus: 256,
            gpu_draw_w: 1_275.0,
        }
    }
}

/// One job of the stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    pub id: String,
    pub at: SimTime,
    pub gpus: u32,
    pub run_ms: i64,
    pub deadline: SimTime,
}

/// The stream's jobs arriving in `[from, to)`, from `seed`: Poisson arrivals, run times and slack
/// drawn uniformly, run times whole minutes.
pub fn arrivals(s: &BatchStream, from: SimTime, to: SimTime, seed: u64) -> Vec<Arrival> {
    let mut r = rng::stream(seed, "batch-jobs", 0);
    let mean_gap_ms = MS_PER_DAY as f64 / s.jobs_per_day.max(1e-9);
    let mut out = vec![];
    let mut t = from.0 as f64;
    loop {
        t += rng::exp_mean(&mut r, mean_gap_ms);
        if t >= to.0 as f64 {
            return out;
        }
        let uniform = |r: &mut rng::Rng, (a, b): (f64, f64)| a + (b - a) * rng::unit(r);
        let run_ms = (uniform(&mut r, s.run_h) * 60.0).round() as i64 * 60_000;
        let slack_ms = (uniform(&mut r, s.slack_h) * 3_600_000.0) as i64;
        let at = SimTime(t as i64);
        out.push(Arrival {
            id: format!("job-{}", out.len()),
            at,
            gpus: s.gpus_per_job,
            run_ms: run_ms.max(60_000),
            deadline: at.plus_ms(run_ms + slack_ms),
        });
    }
}

/// How a policy ran the stream.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRun {
    pub policy: &'static str,
    pub jobs: usize,
    pub energy_mwh: f64,
    pub cost_usd: f64,
    /// Energy-weighted mean price paid (USD/MWh).
    pub usd_per_mwh: f64,
    /// Jobs that finished after their deadline.
    pub late: usize,
    /// Mean wait from arrival to start (hours).
    pub mean_wait_h: f64,
    /// GPU-hours run above the pool (jobs started at their latest start with no room).
    pub over_pool_gpu_h: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    AtOnce,
    Planner,
    Oracle,
}

/// Runs the stream three ways on `series` (see the module's text); jobs arriving before the
/// series' last interval, each run to its end (prices past the series are its last).
pub fn run(series: &GridSeries, s: &BatchStream, jobs: &[Arrival]) -> Vec<BatchRun> {
    [(Policy::AtOnce, "at-once"), (Policy::Planner, "planner"), (Policy::Oracle, "oracle")]
        .into_iter()
        .map(|(p, name)| run_one(series, s, jobs, p, name))
        .collect()
}

fn run_one(series: &GridSeries, s: &BatchStream, jobs: &[Arrival], policy: Policy, name: &'static str) -> BatchRun {
    let iv = series.interval_ms;
    let n = series.signals.len();
    let start = series.start().0;
    let rt = |k: usize| series.signals[k.min(n - 1)].rt_price_usd_per_mwh;
    // GPUs in use per interval, by the jobs started so far.
    let horizon = n + (MS_PER_DAY * 60 / iv) as usize;
    let mut used = vec![0u32; horizon];
    let (mut energy_mwh, mut cost, mut late, mut wait_ms) = (0.0, 0.0, 0usize, 0i64);
    let mut waiting: Vec<&Arrival> = vec![];
    let mut next = 0;
    let mut started = 0usize;
    let mut start_job = |j: &Arrival, at: i64, used: &mut Vec<u32>| {
        let end = at + j.run_ms;
        let mut t = at;
        while t < end {
            let k = ((t - start).div_euclid(iv)) as usize;
            let b = (start + (k as i64 + 1) * iv).min(end);
            let mwh = f64::from(j.gpus) * s.gpu_draw_w * (b - t) as f64 / 3.6e12;
            energy_mwh += mwh;
            cost += mwh * rt(k);
            if let Some(u) = used.get_mut(k) {
                *u += j.gpus;
            }
            t = b;
        }
        late += usize::from(end > j.deadline.0);
        wait_ms += at - j.at.0;
    };
    for k in 0..n {
        let t0 = start + k as i64 * iv;
        let t1 = t0 + iv;
        // At once starts a job when it arrives, inside the interval; the planner decides at the
        // interval's start on the jobs that have arrived by then (a job arriving inside the
        // interval waits for the next decision: nothing is placed before it is known).
        let known_by = if policy == Policy::AtOnce { t1 } else { t0 + 1 };
        while next < jobs.len() && jobs[next].at.0 < known_by {
            waiting.push(&jobs[next]);
            next += 1;
        }
        let mut still = vec![];
        let free = s.pool_gpus.saturating_sub(used[k]);
        let path: Vec<f64> = match policy {
            Policy::AtOnce => vec![],
            Policy::Oracle => (k..n).map(rt).collect(),
            Policy::Planner => {
                // Known at t0: the real-time price of the interval before (published at its end),
                // the day-ahead prices of today, and of tomorrow from 13:00.
                let day_end = t0.div_euclid(MS_PER_DAY) * MS_PER_DAY + MS_PER_DAY;
                let known_to = if t0.rem_euclid(MS_PER_DAY) >= 13 * 3_600_000 { day_end + MS_PER_DAY } else { day_end };
                let last_rt = if k > 0 { rt(k - 1) } else { series.signals[0].da_price_usd_per_mwh };
                std::iter::once(last_rt)
                    .chain(
                        (k + 1..n)
                            .take_while(|&j| start + (j as i64) * iv < known_to)
                            .map(|j| series.signals[j].da_price_usd_per_mwh),
                    )
                    .collect()
            }
        };
        let mut free_now = free;
        let order: Vec<&Arrival> = std::mem::take(&mut waiting);
        let placements = if policy == Policy::AtOnce {
            vec![]
        } else {
            let batch: Vec<BatchJob> = order
                .iter()
                .map(|j| BatchJob {
                    id: j.id.clone(),
                    gpus: j.gpus,
                    remaining_ms: j.run_ms,
                    deadline: j.deadline,
                    preemptible: false,
                })
                .collect();
            // Room ahead: the pool less what the jobs started so far hold in each interval.
            let room: Vec<u32> = used[k..].iter().take(672).map(|u| s.pool_gpus.saturating_sub(*u)).collect();
            let p = PricePath {
                start: SimTime(t0),
                interval_ms: iv,
                usd_per_mwh: &path,
                gpu_draw_w: s.gpu_draw_w,
                free_gpus: &room,
                max_intervals: 672,
            };
            schedule(SimTime(t0), &p, &batch)
        };
        for (i, j) in order.into_iter().enumerate() {
            let at = j.at.0.max(t0);
            let latest = j.deadline.0 - j.run_ms;
            let wants = match policy {
                Policy::AtOnce => true,
                _ => placements[i].run_now || latest < t1,
            };
            // Room now (jobs that started earlier hold theirs); a job whose latest start comes before
            // the next decision starts now, room or not.
            if wants && (free_now >= j.gpus || latest < t1) {
                free_now = free_now.saturating_sub(j.gpus);
                start_job(j, at, &mut used);
                started += 1;
            } else {
                still.push(j);
            }
        }
        waiting = still;
    }
    // Jobs still waiting when the series ends run at its end.
    let end = start + n as i64 * iv;
    for j in std::mem::take(&mut waiting) {
        start_job(j, end.max(j.at.0), &mut used);
        started += 1;
    }
    BatchRun {
        policy: name,
        jobs: started,
        energy_mwh,
        cost_usd: cost,
        usd_per_mwh: if energy_mwh > 0.0 { cost / energy_mwh } else { f64::NAN },
        late,
        mean_wait_h: if started > 0 { wait_ms as f64 / started as f64 / 3.6e6 } else { 0.0 },
        over_pool_gpu_h: used.iter().map(|u| f64::from(u.saturating_sub(s.pool_gpus))).sum::<f64>() * iv as f64 / 3.6e6,
    }
}
