//! Router scenarios and properties.

use hcp_model::TenantId;
use hcp_sched::*;
use proptest::prelude::*;

const M: ModelId = ModelId(1);

fn router() -> Router {
    Router::new(RouterConfig::three_bands()).unwrap()
}

fn tenant(r: &mut Router, id: u32, weight: f64, guaranteed: f64, borrow: f64) {
    r.add_tenant(TenantSpec { id: TenantId(id), weight, guaranteed_gpus: guaranteed, borrow_limit_gpus: borrow })
        .unwrap();
}

fn replica(r: &mut Router, id: u32, slots: u32, out: &mut Vec<Decision>) {
    r.set_replica(ReplicaSpec { id: ReplicaId(id), model: M, gpus: slots, slots, kv_tokens: 1_000_000 }, 0, out)
        .unwrap();
}

fn work(id: u64, t: u32, band: u8) -> Work {
    Work {
        id,
        tenant: TenantId(t),
        band,
        model: M,
        prompt_tokens: 100,
        max_output_tokens: 100,
        deadline_ms: None,
        gang: 1,
        preemptible: true,
        restart_cost: 0.0,
    }
}

fn dispatched(out: &[Decision]) -> Vec<u64> {
    out.iter().filter_map(|d| if let Decision::Dispatch { id, .. } = d { Some(*id) } else { None }).collect()
}

#[test]
fn places_on_the_least_saturated_replica_and_queues_when_full() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 2, &mut out);
    replica(&mut r, 2, 2, &mut out);
    for id in 1..=4 {
        r.arrive(work(id, 1, 1), 0, &mut out);
    }
    let placed: Vec<Vec<ReplicaId>> = out
        .iter()
        .filter_map(|d| if let Decision::Dispatch { replicas, .. } = d { Some(replicas.to_vec()) } else { None })
        .collect();
    assert_eq!(placed, vec![vec![ReplicaId(1)], vec![ReplicaId(2)], vec![ReplicaId(1)], vec![ReplicaId(2)]]);
    out.clear();
    r.arrive(work(5, 1, 1), 1, &mut out);
    assert_eq!(out, vec![Decision::Queue { id: 5 }]);
    out.clear();
    r.complete(2, 100, 2, &mut out);
    assert_eq!(dispatched(&out), vec![5]);
    r.check().unwrap();
}

#[test]
fn rejects_what_can_never_fit_and_unknown_tenants() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 2, &mut out);
    r.arrive(Work { model: ModelId(9), ..work(1, 1, 0) }, 0, &mut out);
    r.arrive(Work { prompt_tokens: 2_000_000, ..work(2, 1, 0) }, 0, &mut out);
    r.arrive(Work { gang: 3, ..work(3, 1, 2) }, 0, &mut out);
    r.arrive(work(4, 7, 0), 0, &mut out);
    r.arrive(work(5, 1, 5), 0, &mut out);
    let reasons: Vec<RejectReason> = out
        .iter()
        .filter_map(|d| if let Decision::Reject { reason, .. } = d { Some(reason.clone()) } else { None })
        .collect();
    assert_eq!(
        reasons[..4],
        [RejectReason::NeverFits, RejectReason::NeverFits, RejectReason::NeverFits, RejectReason::UnknownTenant]
    );
    assert!(matches!(reasons[4], RejectReason::Invalid(_)));
}

#[test]
fn strict_priority_with_an_anti_starvation_floor() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 1, &mut out);
    r.arrive(work(1_000, 1, 0), 0, &mut out);
    for i in 0..100 {
        r.arrive(work(i, 1, 0), 0, &mut out);
        r.arrive(work(500 + i, 1, 2), 0, &mut out);
    }
    out.clear();
    let mut order = vec![];
    let mut running = 1_000;
    for t in 1..=100 {
        r.complete(running, 10, t, &mut out);
        let d = dispatched(&out);
        out.clear();
        running = d[0];
        order.push(running);
    }
    let low = order.iter().filter(|&&id| id >= 500).count();
    // One decision in 20 goes to the backlogged lower band.
    assert_eq!(low, 5, "{order:?}");
    let at: Vec<usize> = order.iter().enumerate().filter(|(_, id)| **id >= 500).map(|(i, _)| i).collect();
    assert!(at.windows(2).all(|w| w[1] - w[0] == 20), "evenly spaced: {at:?}");
}

#[test]
fn weighted_fairness_between_backlogged_tenants() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    tenant(&mut r, 2, 3.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 1, &mut out);
    for i in 0..400 {
        r.arrive(work(i, 1, 1), 0, &mut out);
        r.arrive(work(10_000 + i, 2, 1), 0, &mut out);
    }
    let mut running = dispatched(&out)[0];
    let mut served = [0u32; 2];
    for t in 1..=200 {
        out.clear();
        r.complete(running, 100, t, &mut out);
        running = dispatched(&out)[0];
        served[usize::from(running >= 10_000)] += 1;
    }
    // Weights 1:3 -> about 50 and 150 of 200.
    assert!((45..=55).contains(&served[0]), "{served:?}");
    let j = r.fairness_index(1).unwrap();
    assert!(j > 0.99, "weighted service is fair: {j}");
}

#[test]
fn guaranteed_quota_is_reclaimed_from_a_borrower() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 2.0, 0.0);
    tenant(&mut r, 2, 1.0, 0.0, 10.0);
    let mut out = vec![];
    replica(&mut r, 1, 4, &mut out);
    for i in 0..4 {
        r.arrive(work(100 + i, 2, 1), 0, &mut out);
    }
    assert_eq!(r.tenant_usage_gpus(TenantId(2)), 4.0, "idle capacity is borrowed");
    out.clear();
    r.arrive(work(1, 1, 1), 10_000, &mut out);
    r.arrive(work(2, 1, 1), 10_000, &mut out);
    r.arrive(work(3, 1, 1), 10_000, &mut out);
    let reclaims = out
        .iter()
        .filter(|d| matches!(d, Decision::Preempt { reason: PreemptReason::QuotaReclaim { by: TenantId(1) }, .. }))
        .count();
    assert_eq!(reclaims, 2);
    assert_eq!(r.tenant_usage_gpus(TenantId(1)), 2.0, "guarantee honoured, not exceeded by reclaim");
    assert_eq!(out.last(), Some(&Decision::Queue { id: 3 }));
    r.check().unwrap();
}

#[test]
fn borrowed_capacity_goes_to_the_lowest_weighted_dominant_share() {
    // A and B are each guaranteed 1 GPU; A borrows 4 more, B borrows nothing. When a slot frees,
    // VTC alone would pick A (its counter is far lower: tiny prompts), but both would borrow, and
    // B's weighted borrowed share after admission (1) is lower than A's (4): B goes.
    let mut r = router();
    tenant(&mut r, 1, 1.0, 1.0, 10.0);
    tenant(&mut r, 2, 1.0, 1.0, 10.0);
    let mut out = vec![];
    replica(&mut r, 1, 6, &mut out);
    for i in 0..5 {
        r.arrive(Work { prompt_tokens: 1, ..work(100 + i, 1, 1) }, 0, &mut out);
    }
    r.arrive(Work { prompt_tokens: 1_000, ..work(200, 2, 1) }, 0, &mut out);
    assert_eq!(r.replica_load(ReplicaId(1)), Some((6, 6)));
    r.arrive(Work { prompt_tokens: 1, ..work(101_000, 1, 1) }, 1, &mut out);
    r.arrive(Work { prompt_tokens: 1_000, ..work(201_000, 2, 1) }, 1, &mut out);
    assert!(r.counter(TenantId(1), 1) < r.counter(TenantId(2), 1));
    out.clear();
    r.complete(100, 0, 2, &mut out);
    assert_eq!(dispatched(&out), vec![201_000]);
    let shares = r.shares();
    let (a, b) = (&shares[0], &shares[1]);
    assert_eq!((a.usage_gpus, a.borrowed_gpus), (4.0, 3.0));
    assert_eq!((b.usage_gpus, b.borrowed_gpus), (2.0, 1.0));
    // Both active, equal weights: 1 guaranteed + half of the 4 not guaranteed each.
    assert_eq!((a.entitled_gpus, b.entitled_gpus), (3.0, 3.0));
    assert!(a.weighted_borrowed_share > b.weighted_borrowed_share);
    // A tenant within its guarantee reclaims from the borrower with the highest weighted share (A).
    tenant(&mut r, 3, 1.0, 1.0, 0.0);
    out.clear();
    r.arrive(Work { prompt_tokens: 10_000, ..work(300, 3, 1) }, 3, &mut out);
    let victims: Vec<u64> =
        out.iter().filter_map(|d| if let Decision::Preempt { id, .. } = d { Some(*id) } else { None }).collect();
    assert_eq!(victims.len(), 1);
    assert!((101..105).contains(&victims[0]), "a borrowed item of A: {out:?}");
    assert_eq!(dispatched(&out), vec![300]);
    r.check().unwrap();
}

#[test]
fn capacity_shrink_picks_victims_minimally_and_keeps_their_place() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    tenant(&mut r, 2, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 4, &mut out);
    r.arrive(work(1, 1, 0), 0, &mut out);
    r.arrive(work(2, 1, 2), 0, &mut out);
    r.arrive(work(3, 2, 1), 0, &mut out);
    r.arrive(Work { restart_cost: 1_000.0, ..work(4, 2, 2) }, 0, &mut out);
    r.arrive(work(5, 2, 2), 60_000, &mut out);
    assert_eq!(out.last(), Some(&Decision::Queue { id: 5 }));
    out.clear();
    // Curtailment: the replica keeps 2 of its 4 slots. The batch band goes first, the cheaper to
    // restart of the two first; then nothing more.
    r.set_replica(
        ReplicaSpec { id: ReplicaId(1), model: M, gpus: 2, slots: 2, kv_tokens: 1_000_000 },
        120_000,
        &mut out,
    )
    .unwrap();
    let preempted: Vec<u64> =
        out.iter().filter_map(|d| if let Decision::Preempt { id, .. } = d { Some(*id) } else { None }).collect();
    assert_eq!(preempted, vec![2, 4]);
    assert_eq!(r.replica_load(ReplicaId(1)), Some((2, 2)));
    // Capacity returns: the preempted work goes before the later arrival (id 5) of the same band.
    out.clear();
    r.set_replica(
        ReplicaSpec { id: ReplicaId(1), model: M, gpus: 3, slots: 3, kv_tokens: 1_000_000 },
        130_000,
        &mut out,
    )
    .unwrap();
    assert_eq!(dispatched(&out), vec![2]);
    r.check().unwrap();
}

#[test]
fn gangs_are_placed_and_preempted_whole() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 2, &mut out);
    replica(&mut r, 2, 2, &mut out);
    r.arrive(Work { gang: 3, ..work(1, 1, 2) }, 0, &mut out);
    let Decision::Dispatch { replicas, .. } = &out[0] else { panic!("{out:?}") };
    assert_eq!(replicas.len(), 2);
    assert_eq!(r.replica_load(ReplicaId(1)).unwrap().0 + r.replica_load(ReplicaId(2)).unwrap().0, 3);
    out.clear();
    r.remove_replica(ReplicaId(2), 60_000, &mut out);
    assert!(matches!(out[0], Decision::Preempt { id: 1, .. }));
    assert_eq!(r.replica_load(ReplicaId(1)), Some((0, 2)), "the whole gang released its slots");
    assert_eq!(r.queued_len(), 1, "and waits for room for all three");
    r.check().unwrap();
}

#[test]
fn queues_are_bounded_and_expire() {
    let mut cfg = RouterConfig::three_bands();
    cfg.queue_cap = vec![3, 2, 2];
    cfg.queue_cap_total = 4;
    cfg.ttl_ms = vec![1_000, 1_000, 1_000];
    let mut r = Router::new(cfg).unwrap();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 1, &mut out);
    r.arrive(work(1, 1, 0), 0, &mut out);
    r.arrive(work(2, 1, 2), 0, &mut out);
    r.arrive(work(3, 1, 2), 0, &mut out);
    r.arrive(work(4, 1, 2), 0, &mut out);
    assert!(out.contains(&Decision::Reject { id: 4, reason: RejectReason::QueueFull { band: 2 } }));
    r.arrive(work(5, 1, 0), 0, &mut out);
    r.arrive(work(6, 1, 0), 0, &mut out);
    r.arrive(work(7, 1, 0), 0, &mut out);
    assert!(out.contains(&Decision::Reject { id: 3, reason: RejectReason::Displaced }), "{out:?}");
    out.clear();
    r.tick(1_000, &mut out);
    assert_eq!(out.iter().filter(|d| matches!(d, Decision::Reject { reason: RejectReason::Expired, .. })).count(), 4);
    assert_eq!(r.queued_len(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random arrivals, completions, shrinks and regrowth across tenants with quotas: capacity is
    /// never exceeded, every admitted request is queued, running, completed or rejected with a
    /// reason (nothing vanishes), every quota reclaim leaves the victim's tenant at or above its
    /// guarantee (the condition under which reclaims cannot loop), no tenant exceeds its
    /// guarantee plus borrowing limit, and the guarantee is honoured: a tenant below its guarantee
    /// with online work waiting never sees another tenant borrow a slot it could reclaim.
    #[test]
    fn router_invariants(ops in proptest::collection::vec((0u8..5, 0u32..6, 0u8..3, 1u32..2_000, 1u32..4), 1..300)) {
        let mut r = router();
        let guarantee = |t: u32| f64::from(t % 2) * 2.0;
        for t in 0..6u32 {
            r.add_tenant(TenantSpec { id: TenantId(t), weight: 1.0 + f64::from(t % 3), guaranteed_gpus: guarantee(t), borrow_limit_gpus: 6.0 }).unwrap();
        }
        let mut out = vec![];
        for k in 0..3 {
            r.set_replica(ReplicaSpec { id: ReplicaId(k), model: M, gpus: 4, slots: 4, kv_tokens: 20_000 }, 0, &mut out).unwrap();
        }
        let mut next = 0u64;
        let mut live: std::collections::BTreeMap<u64, u32> = Default::default();
        let mut gangs: std::collections::BTreeMap<u64, u32> = Default::default();
        for (i, (op, t, band, size, gang)) in ops.into_iter().enumerate() {
            let now = i as i64 * 1_000;
            out.clear();
            match op {
                0 | 1 => {
                    next += 1;
                    let w = Work { prompt_tokens: size, max_output_tokens: size.min(1_000), gang: if band == 2 { gang } else { 1 }, ..work(next, t, band) };
                    live.insert(next, t);
                    gangs.insert(next, w.gang);
                    r.arrive(w, now, &mut out);
                }
                2 => {
                    if let Some((&id, _)) = live.iter().nth(size as usize % live.len().max(1)) {
                        if r.is_running(id) == Some(true) {
                            live.remove(&id);
                        }
                        r.complete(id, size.min(1_000), now, &mut out);
                    }
                }
                3 => {
                    let slots = size % 5;
                    r.set_replica(ReplicaSpec { id: ReplicaId(t % 3), model: M, gpus: slots.max(1), slots, kv_tokens: 20_000 }, now, &mut out).unwrap();
                }
                _ => r.tick(now, &mut out),
            }
            prop_assert!(r.check().is_ok(), "{}", r.check().unwrap_err());
            for d in &out {
                match d {
                    Decision::Reject { id, .. } => {
                        live.remove(id);
                    }
                    Decision::Preempt { reason: PreemptReason::QuotaReclaim { by }, id, .. } => {
                        let victim = live[id];
                        prop_assert!(victim != by.0, "a tenant never reclaims from itself");
                        prop_assert!(r.tenant_usage_gpus(TenantId(victim)) >= guarantee(victim) - 1e-9, "victim still at its guarantee");
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(live.len(), r.queued_len() + r.running_len(), "every admitted request is accounted for");
            for t in 0..6u32 {
                prop_assert!(r.tenant_usage_gpus(TenantId(t)) <= guarantee(t) + 6.0 + 1e-9);
            }
            prop_assert!(live.keys().all(|id| r.is_running(*id).is_some()));
            for t in 0..6u32 {
                let waiting = r.band_backlog(TenantId(t), 0) || r.band_backlog(TenantId(t), 1);
                if !waiting || r.tenant_usage_gpus(TenantId(t)) + 1.0 > guarantee(t) + 1e-9 {
                    continue;
                }
                for k in 0..3 {
                    let (used, slots) = r.replica_load(ReplicaId(k)).unwrap();
                    if slots == 0 || used > slots {
                        continue;
                    }
                    for id in r.running_on(ReplicaId(k)) {
                        let v = live[&id];
                        prop_assert!(
                            v == t || gangs[&id] != 1 || r.tenant_usage_gpus(TenantId(v)) - 1.0 < guarantee(v) - 1e-9,
                            "tenant {} below its guarantee waits while tenant {} borrows request {}", t, v, id
                        );
                    }
                }
            }
        }
    }

    /// VTC bound: among tenants continuously backlogged in a band, virtual counters stay within
    /// twice the largest weighted request cost of each other, and a backlogged tenant is served
    /// within a bounded number of dispatches.
    #[test]
    fn backlogged_tenants_stay_within_the_vtc_bound(
        weights in proptest::collection::vec(1u32..5, 2..6),
        sizes in proptest::collection::vec(10u32..500, 400),
    ) {
        let mut r = router();
        for (t, w) in weights.iter().enumerate() {
            tenant(&mut r, t as u32, f64::from(*w), 0.0, 1e9);
        }
        let mut out = vec![];
        replica(&mut r, 1, 1, &mut out);
        let n = weights.len();
        let mut next = 0u64;
        let mut owner = std::collections::BTreeMap::new();
        // Keep every tenant backlogged: 200 requests each up front.
        for round in 0..200 {
            for t in 0..n {
                next += 1;
                let s = sizes[(round * n + t) % sizes.len()];
                owner.insert(next, t);
                r.arrive(Work { prompt_tokens: s, max_output_tokens: 0, ..work(next, t as u32, 1) }, 0, &mut out);
            }
        }
        let max_cost = *sizes.iter().max().unwrap() as f64;
        let min_cost = *sizes.iter().min().unwrap() as f64;
        let min_w = f64::from(*weights.iter().min().unwrap());
        let max_w = f64::from(*weights.iter().max().unwrap());
        let mut running = dispatched(&out)[0];
        let mut last_served = vec![0usize; n];
        for k in 1..200 {
            out.clear();
            r.complete(running, 0, k as i64, &mut out);
            running = dispatched(&out)[0];
            let t = owner[&running];
            // Counter spread among tenants still backlogged.
            let cs: Vec<f64> = (0..n).map(|x| r.counter(TenantId(x as u32), 1)).collect();
            let spread = cs.iter().cloned().fold(f64::MIN, f64::max) - cs.iter().cloned().fold(f64::MAX, f64::min);
            prop_assert!(spread <= 2.0 * max_cost / min_w + 1e-9, "spread {spread}");
            // Between two services of a tenant, every other tenant gets at most what fits in
            // the spread bound.
            let bound = (n - 1) * ((2.0 * max_cost / min_w) / (min_cost / max_w)).ceil() as usize + 1;
            prop_assert!(k - last_served[t] <= bound || last_served[t] == 0, "tenant {t} waited {} dispatches (bound {bound})", k - last_served[t]);
            last_served[t] = k;
        }
    }
}

#[test]
fn cancelled_work_leaves_its_queue_or_frees_its_slot() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    replica(&mut r, 1, 1, &mut out);
    for id in 1..=3 {
        r.arrive(work(id, 1, 1), 0, &mut out);
    }
    assert_eq!((r.running_len(), r.queued_len()), (1, 2));
    out.clear();
    // Queued work goes without a decision; the running one frees its slot for the next.
    assert!(r.cancel(2, 1, &mut out));
    assert!(out.is_empty() && r.queued_len() == 1);
    assert!(r.cancel(1, 2, &mut out));
    assert_eq!(dispatched(&out), vec![3]);
    assert!(!r.cancel(1, 3, &mut out), "gone already");
    assert_eq!(r.is_running(3), Some(true));
    r.check().unwrap();
}

#[test]
fn a_cordoned_replica_keeps_its_work_takes_no_new_work_and_is_not_reclaimed_from() {
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    tenant(&mut r, 2, 1.0, 2.0, 0.0);
    let mut out = vec![];
    replica(&mut r, 1, 2, &mut out);
    replica(&mut r, 2, 2, &mut out);
    r.arrive(work(1, 1, 1), 0, &mut out);
    r.arrive(work(2, 1, 1), 0, &mut out);
    assert_eq!(dispatched(&out), vec![1, 2]);
    let on_first = r.running_on(ReplicaId(1));
    out.clear();
    assert!(r.cordon(ReplicaId(1), true, 1, &mut out));
    assert!(!r.cordon(ReplicaId(1), true, 1, &mut out), "already cordoned");
    assert!(out.is_empty(), "nothing running is preempted: {out:?}");
    assert_eq!(r.running_on(ReplicaId(1)), on_first);
    assert!(r.is_cordoned(ReplicaId(1)));
    // New work goes only to replica 2; when it is full, work queues rather than using replica 1.
    for id in 3..=5 {
        r.arrive(work(id, 1, 1), 2, &mut out);
    }
    let placed: Vec<ReplicaId> = out
        .iter()
        .filter_map(|d| if let Decision::Dispatch { replicas, .. } = d { Some(replicas[0]) } else { None })
        .collect();
    assert_eq!(placed, vec![ReplicaId(2)], "{out:?}");
    assert!(out.contains(&Decision::Queue { id: 4 }) && out.contains(&Decision::Queue { id: 5 }), "{out:?}");
    // A tenant within its guarantee reclaims from borrowers, but not on the cordoned replica.
    out.clear();
    r.arrive(work(6, 2, 1), 3, &mut out);
    assert!(out.iter().any(|d| matches!(d, Decision::Preempt { .. })), "a reclaim on replica 2: {out:?}");
    for d in &out {
        if let Decision::Preempt { id, .. } = d {
            assert!(!on_first.contains(id), "work on the cordoned replica was reclaimed: {out:?}");
        }
    }
    // Returned: the queue is served on it again.
    out.clear();
    r.complete(1, 10, 4, &mut out);
    assert!(dispatched(&out).is_empty(), "its slot stays empty while cordoned: {out:?}");
    assert!(r.cordon(ReplicaId(1), false, 5, &mut out));
    assert!(!dispatched(&out).is_empty(), "returning it serves the queue: {out:?}");
    r.check().unwrap();
}

#[test]
fn work_waits_for_replicas_out_of_service_instead_of_being_refused() {
    // The power plan idles a model's GPUs (no work, headroom lent to the ASICs): its replicas are
    // out, not gone. New work waits (that waiting is the demand that brings them back) and is
    // placed when they return.
    let mut r = router();
    tenant(&mut r, 1, 1.0, 0.0, 100.0);
    let mut out = vec![];
    let spec = |slots: u32, kv_tokens: u64| ReplicaSpec { id: ReplicaId(1), model: M, gpus: 2, slots, kv_tokens };
    // Out of service, as the platform announces it: no slots, the least KV cache it may state.
    r.set_replica(spec(2, 1_000_000), 0, &mut out).unwrap();
    r.set_replica(spec(0, 1), 0, &mut out).unwrap();
    out.clear();
    r.arrive(work(1, 1, 0), 1, &mut out);
    assert!(out.iter().all(|d| !matches!(d, Decision::Reject { .. })), "{out:?}");
    assert_eq!(r.queued_len(), 1);
    r.check().unwrap();
    r.set_replica(spec(2, 1_000_000), 2, &mut out).unwrap();
    assert_eq!(dispatched(&out), vec![1]);
    r.check().unwrap();
    // A model with no replica at all still refuses at once.
    out.clear();
    r.arrive(Work { model: ModelId(9), ..work(2, 1, 0) }, 3, &mut out);
    assert!(matches!(out[..], [Decision::Reject { reason: RejectReason::NeverFits, .. }]), "{out:?}");
}
