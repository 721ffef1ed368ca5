//! Batch jobs that may wait: which run now and which wait for cheaper power.
//!
//! A batch job with a deadline does not need to run the moment it is submitted. Its GPUs draw the
//! same energy whenever they run and it is billed per GPU-hour it runs, so the only thing its
//! start time changes is the price of that energy. [`schedule`] places each waiting job on the
//! price path ahead (intervals of the dispatcher's length) where its energy is cheapest and it
//! still finishes by its deadline, within the GPUs left free for batch work in each interval:
//! - a preemptible job may run in any intervals: it takes the cheapest ones that hold its run time;
//! - a job that may not stop runs its time in one stretch: it takes the cheapest stretch.
//!
//! Jobs are placed earliest deadline first, so a tight job gets its interval before a loose one
//! takes it. A job runs now when the current interval is part of its cheapest placement, when
//! its run no longer fits before its deadline (it is late already: it runs at once, holds its
//! GPUs, and says so), or when no price path is known (nothing to defer on). A job that finds no
//! GPUs free but could still start later waits (`no_room`) rather than overbook them. Ties go to
//! the earlier interval, so a flat price path never delays anything.
//!
//! Pure: no clock, no IO. The engine calls it at every decision and when the waiting jobs change.

use hcp_model::SimTime;

/// A job waiting to start (or to resume, for a preempted preemptible one).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchJob {
    pub id: String,
    pub gpus: u32,
    /// Run time it still needs, ms.
    pub remaining_ms: i64,
    /// When it must have finished.
    pub deadline: SimTime,
    /// May stop and resume later; otherwise its time runs in one stretch.
    pub preemptible: bool,
}

/// The prices ahead and the room for batch work.
#[derive(Clone, Copy, Debug)]
pub struct PricePath<'a> {
    /// Start of interval 0, the interval that holds `now`.
    pub start: SimTime,
    pub interval_ms: i64,
    /// Energy price of each interval from `start` (USD/MWh); intervals past the end take the last
    /// price (persistence).
    pub usd_per_mwh: &'a [f64],
    /// One GPU's draw at full load, host share included (W).
    pub gpu_draw_w: f64,
    /// GPUs free for batch work in each interval from `start` (past the end, the last; none when
    /// empty).
    pub free_gpus: &'a [u32],
    /// Intervals looked at, at most (bounds the work for a far deadline).
    pub max_intervals: usize,
}

/// Why a job runs now or waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// Its cheapest placement starts now.
    CheapestNow,
    /// A later placement costs less and still meets the deadline.
    CheaperLater,
    /// Its run time no longer fits before its deadline: it runs at once.
    Late,
    /// No room for it now or ahead at the GPUs free, though its deadline still allows a later
    /// start: it waits (the platform starts it at its latest start in any case).
    NoRoom,
    /// No prices ahead are known: nothing to defer on.
    NoPrices,
}

/// One job's place.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub id: String,
    /// Start now (hand it to the router) or keep it waiting.
    pub run_now: bool,
    /// When it is planned to start (now for a job that runs now).
    pub start: SimTime,
    /// When it is planned to finish.
    pub finish: SimTime,
    pub why: Why,
    /// Energy cost of the placement, and of running at once in one stretch (USD).
    pub planned_usd: f64,
    pub now_usd: f64,
}

impl Placement {
    /// What waiting saves (USD; 0 for a job that runs now).
    pub fn saves_usd(&self) -> f64 {
        (self.now_usd - self.planned_usd).max(0.0)
    }
}

/// Places every job (see the module's text); the result is in the jobs' order.
pub fn schedule(now: SimTime, path: &PricePath<'_>, jobs: &[BatchJob]) -> Vec<Placement> {
    let iv = path.interval_ms.max(1);
    // Intervals that any deadline reaches, bounded.
    let last_deadline = jobs.iter().map(|j| j.deadline.0).max().unwrap_or(now.0);
    let span = ((last_deadline - path.start.0).max(0) / iv + 1) as usize;
    // Room for the longest job's stretch even past the look-ahead (priced at the last price).
    let longest = jobs.iter().map(|j| (j.remaining_ms.max(0) / iv) as usize + 2).max().unwrap_or(1);
    let n = span.clamp(1, path.max_intervals.max(1)).max(longest.min(span.max(1)));
    let price = |k: usize| -> f64 {
        match path.usd_per_mwh.get(k).or(path.usd_per_mwh.last()) {
            Some(p) if p.is_finite() => *p,
            _ => f64::NAN,
        }
    };
    let prices: Vec<f64> = (0..n).map(price).collect();
    let known = !path.usd_per_mwh.is_empty() && prices.iter().all(|p| p.is_finite());
    let mut free: Vec<u32> =
        (0..n).map(|k| path.free_gpus.get(k).or(path.free_gpus.last()).copied().unwrap_or(0)).collect();
    // Usable run time of interval k before `deadline` (not before now).
    let usable = |k: usize, deadline: i64| -> i64 {
        let a = (path.start.0 + k as i64 * iv).max(now.0);
        let b = (path.start.0 + (k as i64 + 1) * iv).min(deadline);
        (b - a).max(0)
    };
    // USD for `gpus` GPUs over `ms` at `usd_per_mwh`.
    let usd = |gpus: u32, ms: i64, p: f64| f64::from(gpus) * path.gpu_draw_w * ms as f64 / 3.6e12 * p;
    // Cost of one stretch from now, deadline or not, past the path's end at its last price.
    let at_once = |j: &BatchJob| -> f64 {
        let mut left = j.remaining_ms;
        let mut cost = 0.0;
        let mut k = 0usize;
        while left > 0 {
            let ms = usable(k, i64::MAX).min(left);
            cost += usd(j.gpus, ms, price(k));
            left -= ms;
            k += 1;
        }
        cost
    };
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| jobs[a].deadline.cmp(&jobs[b].deadline).then_with(|| jobs[a].id.cmp(&jobs[b].id)));
    let mut out: Vec<Option<Placement>> = vec![None; jobs.len()];
    for i in order {
        let j = &jobs[i];
        let now_usd = if known { at_once(j) } else { 0.0 };
        let run_at_once = |why: Why| Placement {
            id: j.id.clone(),
            run_now: true,
            start: now,
            finish: now.plus_ms(j.remaining_ms.max(0)),
            why,
            planned_usd: now_usd,
            now_usd,
        };
        if !known {
            out[i] = Some(run_at_once(Why::NoPrices));
            continue;
        }
        let fits = |k: usize, free: &[u32]| free[k] >= j.gpus && usable(k, j.deadline.0) > 0;
        // (intervals taken with the ms run in each, cost)
        let mut best: Option<(Vec<(usize, i64)>, f64)> = None;
        if j.preemptible {
            let mut ks: Vec<usize> = (0..n).filter(|&k| fits(k, &free)).collect();
            ks.sort_by(|&a, &b| prices[a].total_cmp(&prices[b]).then(a.cmp(&b)));
            let mut left = j.remaining_ms;
            let mut taken = vec![];
            let mut cost = 0.0;
            for k in ks {
                if left <= 0 {
                    break;
                }
                let ms = usable(k, j.deadline.0).min(left);
                taken.push((k, ms));
                cost += usd(j.gpus, ms, prices[k]);
                left -= ms;
            }
            if left <= 0 {
                taken.sort_unstable();
                best = Some((taken, cost));
            }
        } else {
            // One stretch from interval s: interval 0 holds only what is left of it after now,
            // every other is whole. Prefix sums make each start O(1): the price x ms of the
            // whole intervals, and how many intervals have no room.
            let mut pre = vec![0.0; n + 1];
            let mut blocked = vec![0usize; n + 1];
            for k in 0..n {
                pre[k + 1] = pre[k] + prices[k];
                blocked[k + 1] = blocked[k] + usize::from(free[k] < j.gpus);
            }
            for s in 0..n {
                let first = usable(s, i64::MAX);
                if first <= 0 {
                    continue;
                }
                // Intervals s..e-1 run to their end; e (if `rest` > 0) runs `rest` ms.
                let (e, rest) = if j.remaining_ms <= first {
                    (s, j.remaining_ms)
                } else {
                    let after = j.remaining_ms - first;
                    (s + 1 + (after / iv) as usize, after % iv)
                };
                let last = if rest > 0 { e } else { e - 1 };
                if last >= n || blocked[last + 1] > blocked[s] {
                    continue; // past the path's end, or no room somewhere in it
                }
                let finish = path.start.0 + last as i64 * iv + if rest > 0 { rest } else { iv };
                let finish =
                    if s == last { (path.start.0 + s as i64 * iv).max(now.0) + j.remaining_ms } else { finish };
                if finish > j.deadline.0 {
                    break; // later starts finish later still
                }
                let whole = if e > s { (pre[e] - pre[s + 1]) * iv as f64 + prices[s] * first as f64 } else { 0.0 };
                let part = if rest > 0 { prices[e] * rest as f64 } else { 0.0 };
                let ms_price = if s == last { prices[s] * j.remaining_ms as f64 } else { whole + part };
                let cost = f64::from(j.gpus) * path.gpu_draw_w * ms_price / 3.6e12;
                if best.as_ref().is_none_or(|(_, c)| cost < *c - 1e-9) {
                    let mut taken = vec![(s, first.min(j.remaining_ms))];
                    taken.extend((s + 1..e).map(|k| (k, iv)));
                    if e > s && rest > 0 {
                        taken.push((e, rest));
                    }
                    best = Some((taken, cost));
                }
            }
        }
        let Some((taken, cost)) = best else {
            let next = path.start.0 + iv;
            if next.max(now.0) + j.remaining_ms <= j.deadline.0 {
                // No room now: wait for room rather than overbook (its deadline allows it).
                out[i] = Some(Placement {
                    id: j.id.clone(),
                    run_now: false,
                    start: SimTime(next),
                    finish: SimTime(next + j.remaining_ms),
                    why: Why::NoRoom,
                    planned_usd: now_usd,
                    now_usd,
                });
            } else {
                // Late: it runs at once, and holds its GPUs for the placements after it.
                let end = now.0 + j.remaining_ms;
                for (k, f) in free.iter_mut().enumerate() {
                    if path.start.0 + (k as i64) * iv < end {
                        *f = f.saturating_sub(j.gpus);
                    }
                }
                out[i] = Some(run_at_once(Why::Late));
            }
            continue;
        };
        for (k, _) in &taken {
            free[*k] -= j.gpus;
        }
        let (k0, _) = taken[0];
        let (kn, ms_last) = *taken.last().expect("a placement holds an interval");
        let start = SimTime((path.start.0 + k0 as i64 * iv).max(now.0));
        let finish = SimTime((path.start.0 + kn as i64 * iv).max(now.0) + ms_last);
        out[i] = Some(Placement {
            id: j.id.clone(),
            run_now: k0 == 0,
            start,
            finish,
            why: if k0 == 0 { Why::CheapestNow } else { Why::CheaperLater },
            planned_usd: cost,
            now_usd,
        });
    }
    out.into_iter().map(|p| p.expect("every job placed")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IV: i64 = 900_000;

    fn job(id: &str, gpus: u32, intervals: i64, deadline_iv: i64, preemptible: bool) -> BatchJob {
        BatchJob { id: id.into(), gpus, remaining_ms: intervals * IV, deadline: SimTime(deadline_iv * IV), preemptible }
    }

    fn path<'a>(prices: &'a [f64], free: &'a [u32]) -> PricePath<'a> {
        PricePath {
            start: SimTime(0),
            interval_ms: IV,
            usd_per_mwh: prices,
            gpu_draw_w: 1_000.0,
            free_gpus: free,
            max_intervals: 672,
        }
    }

    #[test]
    fn a_job_waits_for_the_cheap_hours_and_still_meets_its_deadline() {
        let prices = [80.0, 90.0, 20.0, 10.0, 15.0, 200.0];
        let p = schedule(SimTime(0), &path(&prices, &[100]), &[job("a", 8, 2, 6, true)]);
        assert!(!p[0].run_now);
        assert_eq!(p[0].why, Why::CheaperLater);
        assert_eq!(p[0].start, SimTime(3 * IV), "the two cheapest intervals are 3 and 4");
        assert_eq!(p[0].finish, SimTime(5 * IV));
        // 8 GPUs x 1 kW x 0.25 h = 2 MWh... per interval 0.002 MWh: (10 + 15) x 0.002.
        assert!((p[0].planned_usd - 25.0 * 0.002).abs() < 1e-9, "{}", p[0].planned_usd);
        assert!((p[0].now_usd - 170.0 * 0.002).abs() < 1e-9, "{}", p[0].now_usd);
        assert!(p[0].saves_usd() > 0.0);
    }

    #[test]
    fn a_job_that_may_not_stop_takes_the_cheapest_stretch() {
        // The two cheapest intervals (1 and 4) are apart; the cheapest stretch of two is 3-4.
        let prices = [50.0, 5.0, 90.0, 12.0, 6.0, 95.0];
        let p = schedule(SimTime(0), &path(&prices, &[100]), &[job("a", 1, 2, 6, false)]);
        assert_eq!(p[0].start, SimTime(3 * IV));
        let q = schedule(SimTime(0), &path(&prices, &[100]), &[job("a", 1, 2, 6, true)]);
        assert_eq!(q[0].start, SimTime(IV), "a preemptible one takes 1 and 4");
        assert_eq!(q[0].finish, SimTime(5 * IV));
    }

    #[test]
    fn a_flat_path_or_no_path_runs_at_once() {
        let p = schedule(SimTime(0), &path(&[40.0; 8], &[100]), &[job("a", 1, 2, 8, true)]);
        assert!(p[0].run_now);
        assert_eq!(p[0].why, Why::CheapestNow);
        let q = schedule(SimTime(0), &path(&[], &[100]), &[job("a", 1, 2, 8, true)]);
        assert!(q[0].run_now);
        assert_eq!(q[0].why, Why::NoPrices);
    }

    #[test]
    fn a_tight_deadline_runs_now_and_a_missed_one_is_late() {
        let prices = [90.0, 10.0, 10.0, 10.0];
        let p = schedule(SimTime(0), &path(&prices, &[100]), &[job("a", 1, 2, 2, true)]);
        assert!(p[0].run_now, "needs both intervals before its deadline");
        assert_eq!(p[0].why, Why::CheapestNow);
        let q = schedule(SimTime(0), &path(&prices, &[100]), &[job("a", 1, 3, 2, true)]);
        assert!(q[0].run_now);
        assert_eq!(q[0].why, Why::Late);
    }

    /// No GPUs free now or ahead: a job whose deadline allows waits for room (it is not released
    /// to overbook the GPUs), one that cannot wait runs late and holds its GPUs.
    #[test]
    fn with_no_room_a_job_waits_unless_it_is_late() {
        let prices = [10.0, 10.0, 10.0, 10.0];
        let p = schedule(SimTime(0), &path(&prices, &[0]), &[job("a", 8, 1, 4, false)]);
        assert!(!p[0].run_now);
        assert_eq!(p[0].why, Why::NoRoom);
        let q = schedule(SimTime(0), &path(&prices, &[8]), &[job("late", 8, 3, 2, false), job("b", 8, 1, 4, false)]);
        assert_eq!((q[0].why, q[0].run_now), (Why::Late, true));
        assert!(!q[1].run_now, "the late job holds the 8 GPUs through interval 2: {:?}", q[1]);
        assert_eq!(q[1].start, SimTime(3 * IV));
    }

    #[test]
    fn the_gpus_free_are_shared_earliest_deadline_first() {
        // One cheap interval with room for one job of 8: the tighter job gets it.
        let prices = [100.0, 10.0, 100.0, 100.0];
        let jobs = [job("loose", 8, 1, 4, true), job("tight", 8, 1, 2, true)];
        let p = schedule(SimTime(0), &path(&prices, &[8]), &jobs);
        assert_eq!(p[1].start, SimTime(IV), "tight takes interval 1");
        assert_eq!(p[0].start, SimTime(0), "loose takes the next cheapest with room: 0 (ties go early)");
        assert!(p[0].run_now && !p[1].run_now);
        // Room that varies by interval: the cheap interval is full, the next cheapest is taken.
        let q = schedule(SimTime(0), &path(&prices, &[8, 0, 8, 8]), &jobs[1..]);
        assert_eq!(q[0].start, SimTime(0));
    }

    #[test]
    fn now_inside_an_interval_counts_only_what_is_left_of_it() {
        // Half of interval 0 is left: a job of one interval needs half of interval 1 too.
        let prices = [10.0, 10.0, 500.0];
        let p = schedule(SimTime(IV / 2), &path(&prices, &[10]), &[job("a", 1, 1, 3, false)]);
        assert!(p[0].run_now);
        assert_eq!(p[0].start, SimTime(IV / 2));
        assert_eq!(p[0].finish, SimTime(IV + IV / 2));
    }
}
