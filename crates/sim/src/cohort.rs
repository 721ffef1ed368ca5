//! Bookkeeping shared by the per-cohort ASIC and GPU groups: devices on their way to running
//! (booting, waking, loading) and the rule that moves counts towards a target.

use std::collections::VecDeque;

/// Devices in a timed transition, by when it completes (non-decreasing is not required).
#[derive(Clone, Debug, Default)]
pub(crate) struct Pipeline(VecDeque<(i64, f64)>);

/// What a pipeline did over one step.
pub(crate) struct Drained {
    /// Device-time (in steps) spent in transition during the step.
    pub in_transition: f64,
    /// Device-time (in steps) spent running after completing during the step.
    pub running_after: f64,
    /// Devices whose transition completed by the end of the step.
    pub completed: f64,
}

impl Pipeline {
    pub fn total(&self) -> f64 {
        self.0.iter().map(|e| e.1).sum()
    }

    pub fn push(&mut self, ready_ms: i64, count: f64) {
        if count > 0.0 {
            self.0.push_back((ready_ms, count));
        }
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Removes up to `amount`, the latest entries first; returns what could not be removed.
    fn shed_latest(&mut self, mut amount: f64) -> f64 {
        while amount > 1e-12 {
            let Some(last) = self.0.back_mut() else { break };
            let take = amount.min(last.1);
            last.1 -= take;
            amount -= take;
            if last.1 <= 1e-12 {
                self.0.pop_back();
            }
        }
        amount.max(0.0)
    }

    /// Completed entries (ready by `now_ms`) leave; their count is returned.
    pub fn take_ready(&mut self, now_ms: i64) -> f64 {
        let mut done = 0.0;
        self.0.retain(|&(t, c)| {
            let ready = t <= now_ms;
            if ready {
                done += c;
            }
            !ready
        });
        done
    }

    /// Time-weights `[now, now + dt)`: each entry is in transition until its ready time, then runs.
    /// Entries ready by the end of the step leave the pipeline.
    pub fn drain_step(&mut self, now_ms: i64, dt_ms: i64) -> Drained {
        let mut d = Drained { in_transition: 0.0, running_after: 0.0, completed: 0.0 };
        let end = now_ms + dt_ms;
        self.0.retain(|&(t, c)| {
            let f = ((t - now_ms) as f64 / dt_ms as f64).clamp(0.0, 1.0);
            d.in_transition += c * f;
            d.running_after += c * (1.0 - f);
            let done = t <= end;
            if done {
                d.completed += c;
            }
            !done
        });
        d
    }
}

/// Counts of a group that can be moved towards a target.
pub(crate) struct Pools<'a> {
    pub running: &'a mut f64,
    /// Idle and quick to start (asleep, or powered with no model).
    pub warm: &'a mut f64,
    /// Off: slow to start.
    pub cold: &'a mut f64,
    pub starting: &'a mut Pipeline,
}

/// Moves counts so that running plus starting equals `want`: starts warm devices first (ready after
/// `warm_ms`), then cold ones (`cold_ms`); stops running devices first, then the latest starters,
/// into the warm pool. The same rule as the per-device groups, in expectation.
pub(crate) fn rebalance(p: Pools, want: f64, now_ms: i64, warm_ms: i64, cold_ms: i64) {
    let active = *p.running + p.starting.total();
    if want > active + 1e-9 {
        let from_warm = (want - active).min(*p.warm);
        *p.warm -= from_warm;
        p.starting.push(now_ms + warm_ms, from_warm);
        let from_cold = (want - active - from_warm).min(*p.cold);
        *p.cold -= from_cold;
        p.starting.push(now_ms + cold_ms, from_cold);
    } else if want < active - 1e-9 {
        let shed = active - want;
        let from_running = shed.min(*p.running);
        *p.running -= from_running;
        let left = p.starting.shed_latest(shed - from_running);
        *p.warm += shed - left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebalance_starts_warm_first_and_stops_running_first() {
        let (mut running, mut warm, mut cold, mut starting) = (2.0, 3.0, 5.0, Pipeline::default());
        let pools = |r: &mut f64, w: &mut f64, c: &mut f64, s: &mut Pipeline| {
            rebalance(Pools { running: r, warm: w, cold: c, starting: s }, 7.0, 0, 60, 300)
        };
        pools(&mut running, &mut warm, &mut cold, &mut starting);
        assert_eq!((running, warm, cold, starting.total()), (2.0, 0.0, 3.0, 5.0));
        rebalance(
            Pools { running: &mut running, warm: &mut warm, cold: &mut cold, starting: &mut starting },
            1.0,
            0,
            60,
            300,
        );
        // Two running stop, then four of the five starters (the latest, from cold, first).
        assert_eq!((running, warm, cold, starting.total()), (0.0, 6.0, 3.0, 1.0));
        let d = starting.drain_step(0, 120);
        assert_eq!((d.in_transition, d.running_after, d.completed), (0.5, 0.5, 1.0));
    }
}
