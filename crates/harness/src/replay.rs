//! Router replay: a recorded inference trace split across tenants of unequal weights and three
//! bands, served by a pool of replicas through the real router, with part of the capacity removed
//! partway through (curtailment). Reports per band the queue time and time to first token before
//! and after the cut, throughput, preemptions by reason and the fairness between backlogged tenants;
//! per tenant its queue time, time to first token, throughput and capacity against entitlement.
//!
//! Load and service model (stated so the figures can be read): the pool is `replicas` replicas of
//! `slots` concurrent sequences each; a request holds a slot for `prompt / prefill_tokens_per_s +
//! output * s_per_output_token`, and its first token comes after the prefill; the trace is overlaid `copies` times (each copy shifted by a share of
//! the trace's span, wrapping around, and its requests going to other tenants) so that the pool runs
//! at `target_utilisation` of its slots on average before the cut.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use hcp_model::Invalid;
use hcp_model::TenantId;
use hcp_model::signals::Request;
use hcp_sched::metrics::{Histogram, jain};
use hcp_sched::{Decision, ModelId, ReplicaId, ReplicaSpec, Router, RouterConfig, TenantSpec, Work};

#[derive(Clone, Debug, PartialEq)]
pub struct ReplaySpec {
    pub tenants: u32,
    /// Share of the replicas removed, and when (ms after the trace starts).
    pub shrink_fraction: f64,
    pub shrink_at_ms: i64,
    pub replicas: u32,
    pub slots: u32,
    pub target_utilisation: f64,
    pub prefill_tokens_per_s: f64,
    pub s_per_output_token: f64,
}

impl Default for ReplaySpec {
    fn default() -> Self {
        ReplaySpec {
            tenants: 12,
            shrink_fraction: 0.3,
            shrink_at_ms: 20 * 60_000,
            replicas: 10,
            slots: 4,
            target_utilisation: 0.6,
            prefill_tokens_per_s: 20_000.0,
            s_per_output_token: 0.01,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BandReport {
    pub band: u8,
    pub requests: u64,
    pub queue_ms_p50_before: f64,
    pub queue_ms_p99_before: f64,
    pub queue_ms_p50_after: f64,
    pub queue_ms_p99_after: f64,
    pub ttft_ms_p50_before: f64,
    pub ttft_ms_p99_before: f64,
    pub ttft_ms_p50_after: f64,
    pub ttft_ms_p99_after: f64,
    /// Output tokens per second over the whole replay.
    pub output_tokens_per_s: f64,
    pub preempted: u64,
    pub preempted_shrink: u64,
    pub preempted_reclaim: u64,
    pub rejected: u64,
    pub fairness_before: Option<f64>,
    pub fairness_after: Option<f64>,
}

/// One tenant's figures over the replay.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantReport {
    pub tenant: u32,
    pub weight: f64,
    pub band: u8,
    pub dispatched: u64,
    pub queue_ms_mean: f64,
    pub ttft_ms_mean: f64,
    pub output_tokens_per_s: f64,
    pub preempted: u64,
    /// GPUs held over GPUs entitled (`Router::shares`), summed over the 10-s ticks at which the
    /// tenant was active, before and after the cut; None when it was never active.
    pub share_vs_entitlement_before: Option<f64>,
    pub share_vs_entitlement_after: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    pub requests: u64,
    pub copies: u32,
    pub completed: u64,
    pub replicas_before: u32,
    pub replicas_after: u32,
    pub bands: Vec<BandReport>,
    pub tenants: Vec<TenantReport>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    FirstToken(u64, u32),
    Complete(u64, u32),
    Shrink,
    Tick,
}

/// Why a replay did not run: a bad spec, or the router's state out of step (a bug).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Router(#[from] hcp_sched::OutOfStep),
}

pub fn replay(trace: &[Request], spec: &ReplaySpec) -> Result<ReplayReport, ReplayError> {
    if trace.is_empty() {
        return Err(ReplayError::Invalid(Invalid::new("trace", "no requests")));
    }
    if !(1..=100_000).contains(&spec.tenants) {
        return Err(ReplayError::Invalid(Invalid::new("tenants", "must be between 1 and 100000")));
    }
    if !(0.0..1.0).contains(&spec.shrink_fraction) {
        return Err(ReplayError::Invalid(Invalid::new("shrink", "the fraction must be in [0, 1)")));
    }
    let t0 = trace[0].at.0;
    let prefill = |prompt: u32| -> i64 { ((f64::from(prompt) / spec.prefill_tokens_per_s) * 1e3).ceil() as i64 };
    let duration = |r: &Request| -> i64 {
        ((f64::from(r.prompt_tokens) / spec.prefill_tokens_per_s
            + f64::from(r.output_tokens) * spec.s_per_output_token)
            * 1e3)
            .ceil()
            .max(1.0) as i64
    };
    let span_ms = (trace[trace.len() - 1].at.0 - t0).max(1) as f64;
    let busy_ms: f64 = trace.iter().map(|r| duration(r) as f64).sum();
    let slots_total = f64::from(spec.replicas * spec.slots);
    let copies = ((spec.target_utilisation * slots_total * span_ms / busy_ms).round() as u32).max(1);
    let mut router = Router::new(RouterConfig::three_bands())?;
    for t in 0..spec.tenants {
        router.add_tenant(TenantSpec {
            id: TenantId(t),
            weight: f64::from(t % 4 + 1),
            guaranteed_gpus: 0.0,
            borrow_limit_gpus: 1e9,
        })?;
    }
    let model = ModelId(0);
    let kv =
        trace.iter().map(|r| u64::from(r.prompt_tokens + r.output_tokens)).max().unwrap_or(1) * u64::from(spec.slots);
    let mut out = vec![];
    for k in 0..spec.replicas {
        router.set_replica(
            ReplicaSpec { id: ReplicaId(k), model, gpus: 1, slots: spec.slots, kv_tokens: kv },
            0,
            &mut out,
        )?;
    }
    // Requests: copy c of trace entry i goes to tenant (i * 7 + c * 13) % tenants; band = tenant % 3.
    let mut works: Vec<(i64, Work, i64)> = Vec::with_capacity(trace.len() * copies as usize);
    for c in 0..copies {
        for (i, r) in trace.iter().enumerate() {
            let tenant = ((i as u64 * 7 + u64::from(c) * 13) % u64::from(spec.tenants)) as u32;
            let id = works.len() as u64;
            let w = Work {
                id,
                tenant: TenantId(tenant),
                band: (tenant % 3) as u8,
                model,
                prompt_tokens: r.prompt_tokens,
                max_output_tokens: r.output_tokens,
                deadline_ms: None,
                gang: 1,
                preemptible: true,
                restart_cost: 0.0,
            };
            // Copy c is shifted by c/copies of the span, wrapping around, so that copies spread.
            let shift = (span_ms as i64) * i64::from(c) / i64::from(copies);
            works.push(((r.at.0 - t0 + shift) % (span_ms as i64 + 1), w, duration(r)));
        }
    }
    works.sort_by_key(|w| (w.0, w.1.id));
    let mut heap: BinaryHeap<Reverse<(i64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(i64, u64, Ev)>>, t: i64, e: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, e)));
    };
    for (k, w) in works.iter().enumerate() {
        push(&mut heap, w.0, Ev::Arrive(k));
    }
    push(&mut heap, spec.shrink_at_ms, Ev::Shrink);
    let end = works.last().map_or(0, |w| w.0) + 60_000;
    let mut t = 10_000;
    while t < end {
        push(&mut heap, t, Ev::Tick);
        t += 10_000;
    }
    let index: BTreeMap<u64, usize> = works.iter().enumerate().map(|(k, w)| (w.1.id, k)).collect();
    let mut epoch = vec![0u32; works.len()];
    let bands = 3usize;
    let mut queue_before = vec![Histogram::default(); bands];
    let mut queue_after = vec![Histogram::default(); bands];
    let mut ttft = [vec![Histogram::default(); bands], vec![Histogram::default(); bands]];
    // Per tenant, before and after the cut: GPUs held and GPUs entitled, summed over ticks.
    let mut held = vec![[(0.0f64, 0.0f64); 2]; spec.tenants as usize];
    let mut requests = vec![0u64; bands];
    let mut preempted = vec![0u64; bands];
    let mut rejected = vec![0u64; bands];
    let mut completed = 0u64;
    // Fairness windows: the 10 minutes before the cut, and the 10 minutes from 2 minutes after it.
    let windows =
        [(spec.shrink_at_ms - 600_000, spec.shrink_at_ms), (spec.shrink_at_ms + 120_000, spec.shrink_at_ms + 720_000)];
    // Fairness: every 10 s, Jain's index of the weighted service each tenant backlogged at the tick
    // received over the last 10 s; averaged over the ticks of each window (sum, count).
    let mut prev_service = vec![vec![0.0f64; spec.tenants as usize]; bands];
    let mut fair: Vec<Vec<(f64, u32)>> = vec![vec![(0.0, 0); bands]; 2];
    let removed = (f64::from(spec.replicas) * spec.shrink_fraction).round() as u32;
    while let Some(Reverse((now, _, ev))) = heap.pop() {
        out.clear();
        match ev {
            Ev::Arrive(k) => {
                let w = works[k].1.clone();
                requests[usize::from(w.band)] += 1;
                router.arrive(w, now, &mut out);
            }
            Ev::FirstToken(id, e) => {
                let k = index[&id];
                if epoch[k] == e {
                    let w = &works[k].1;
                    router.progress(id, w.max_output_tokens.min(1), now);
                    let after = usize::from(now >= spec.shrink_at_ms);
                    ttft[after][usize::from(w.band)].record(now - works[k].0);
                }
            }
            Ev::Complete(id, e) => {
                let k = index[&id];
                if epoch[k] == e {
                    completed += 1;
                    router.complete(id, works[k].1.max_output_tokens, now, &mut out);
                }
            }
            Ev::Shrink => {
                for r in spec.replicas - removed..spec.replicas {
                    router.remove_replica(ReplicaId(r), now, &mut out);
                }
            }
            Ev::Tick => {
                router.tick(now, &mut out);
                let after = usize::from(now >= spec.shrink_at_ms);
                for s in router.shares() {
                    if s.active {
                        let h = &mut held[s.tenant.0 as usize][after];
                        h.0 += s.usage_gpus;
                        h.1 += s.entitled_gpus;
                    }
                }
                for (b, prev) in prev_service.iter_mut().enumerate() {
                    let mut xs = vec![];
                    for tnt in 0..spec.tenants {
                        let service = router.tenant_stats(TenantId(tnt), b).map_or(0.0, |s| s.service());
                        let delta = service - std::mem::replace(&mut prev[tnt as usize], service);
                        if router.band_backlog(TenantId(tnt), b) {
                            xs.push(delta / f64::from(tnt % 4 + 1));
                        }
                    }
                    if xs.len() >= 2 {
                        for (w, (from, to)) in windows.iter().enumerate() {
                            if now > *from && now <= *to {
                                let j = jain(&xs).unwrap_or(1.0);
                                fair[w][b].0 += j;
                                fair[w][b].1 += 1;
                            }
                        }
                    }
                }
            }
        }
        for d in &out {
            match d {
                Decision::Dispatch { id, .. } => {
                    let k = index[id];
                    epoch[k] += 1;
                    let band = usize::from(works[k].1.band);
                    let waited = now - works[k].0;
                    if now < spec.shrink_at_ms { &mut queue_before[band] } else { &mut queue_after[band] }
                        .record(waited);
                    push(&mut heap, now + prefill(works[k].1.prompt_tokens), Ev::FirstToken(*id, epoch[k]));
                    push(&mut heap, now + works[k].2, Ev::Complete(*id, epoch[k]));
                }
                Decision::Preempt { id, .. } => {
                    let k = index[id];
                    epoch[k] += 1;
                    preempted[usize::from(works[k].1.band)] += 1;
                }
                Decision::Reject { id, .. } => {
                    rejected[usize::from(works[index[id]].1.band)] += 1;
                }
                Decision::Queue { .. } => {}
            }
        }
        router.check()?;
    }
    let span_s = (end as f64 / 1e3).max(1e-3);
    let ratio = |h: (f64, f64)| (h.1 > 0.0).then(|| h.0 / h.1);
    let tenants = (0..spec.tenants)
        .map(|t| {
            let id = TenantId(t);
            let band = (t % 3) as usize;
            let st = router.tenant_stats(id, band).cloned().unwrap_or_default();
            let per = |sum: f64, n: u64| if n == 0 { 0.0 } else { sum / n as f64 };
            TenantReport {
                tenant: t,
                weight: f64::from(t % 4 + 1),
                band: band as u8,
                dispatched: st.dispatched,
                queue_ms_mean: per(st.queue_ms_sum, st.dispatched),
                ttft_ms_mean: per(st.ttft_ms_sum, st.first_tokens),
                output_tokens_per_s: st.output_tokens as f64 / span_s,
                preempted: st.preempted,
                share_vs_entitlement_before: ratio(held[t as usize][0]),
                share_vs_entitlement_after: ratio(held[t as usize][1]),
            }
        })
        .collect();
    let band_output: Vec<u64> = (0..bands)
        .map(|b| (0..spec.tenants).filter_map(|t| router.tenant_stats(TenantId(t), b)).map(|s| s.output_tokens).sum())
        .collect();
    let fairness = |w: usize, b: usize| -> Option<f64> {
        let (sum, n) = fair[w][b];
        (n > 0).then(|| sum / f64::from(n))
    };
    Ok(ReplayReport {
        requests: works.len() as u64,
        copies,
        completed,
        replicas_before: spec.replicas,
        replicas_after: spec.replicas - removed,
        bands: (0..bands)
            .map(|b| BandReport {
                band: b as u8,
                requests: requests[b],
                queue_ms_p50_before: queue_before[b].quantile_ms(0.5),
                queue_ms_p99_before: queue_before[b].quantile_ms(0.99),
                queue_ms_p50_after: queue_after[b].quantile_ms(0.5),
                queue_ms_p99_after: queue_after[b].quantile_ms(0.99),
                ttft_ms_p50_before: ttft[0][b].quantile_ms(0.5),
                ttft_ms_p99_before: ttft[0][b].quantile_ms(0.99),
                ttft_ms_p50_after: ttft[1][b].quantile_ms(0.5),
                ttft_ms_p99_after: ttft[1][b].quantile_ms(0.99),
                output_tokens_per_s: band_output[b] as f64 / span_s,
                preempted: preempted[b],
                preempted_shrink: router.metrics.bands[b].preempted_shrink,
                preempted_reclaim: router.metrics.bands[b].preempted_reclaim,
                rejected: rejected[b],
                fairness_before: fairness(0, b),
                fairness_after: fairness(1, b),
            })
            .collect(),
        tenants,
    })
}
