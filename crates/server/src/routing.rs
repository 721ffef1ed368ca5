//! The workload router as the API process holds it: its capacity follows the engine's plan
//! (replicas' sequences from the plan's GPU caps on the GPUs that may carry load), read from
//! storage when the process starts and kept current from `hcp.capacity` notices; its tenants
//! follow the tenants in storage (`hcp.tenants` notices). Requests reach it through the gateway:
//! each request in flight has a channel on which its placement (dispatched to a replica,
//! rejected, preempted) is delivered as the router decides it, whichever call caused it.
//! Replicas found unhealthy are held out of service (no sequences) until they answer again.

use std::collections::{HashMap, HashSet};

use hcp_model::{Invalid, TenantId};
use hcp_sched::{
    Decision, ModelId, RejectReason, ReplicaId, ReplicaSpec, ReqId, Router, RouterConfig, TenantSpec, Work,
};
use hcp_store::{ReplicaRow, TenantRow};
use tokio::sync::mpsc;

/// The fleet serves one model (`served_model` in the fleet file).
pub const SERVED_MODEL: ModelId = ModelId(0);

/// What the router decided for a request in flight.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    Dispatched(ReplicaId),
    Rejected(RejectReason),
    /// Taken off its replica (capacity shrink or quota reclaim) and queued again.
    Preempted,
}

pub struct RouterState {
    pub router: Router,
    tenants: HashMap<String, TenantId>,
    /// Each tenant's row as last known (its share and quota).
    tenant_rows: HashMap<String, TenantRow>,
    /// The reserved-capacity policy in force: its tenant is guaranteed at least that many GPUs.
    reserved: Option<(String, u32)>,
    replicas: HashMap<i64, ReplicaRow>,
    /// Model served by each replica not of the fleet (configured backends).
    replica_model: HashMap<i64, ModelId>,
    models: HashMap<String, ModelId>,
    /// Replicas held out of service because they failed (health check or a request).
    down: HashSet<i64>,
    /// Replicas held out of new placements, their running work untouched (a request failed
    /// there before its first byte); returned when the health check passes.
    cordoned: HashSet<i64>,
    flights: HashMap<ReqId, mpsc::UnboundedSender<Placement>>,
    next_id: ReqId,
    /// Whether the fleet's replicas have a backend here (the simulated one); without it only
    /// configured backends serve.
    pub serve_fleet: bool,
    /// Work preempted by capacity changes since start.
    pub preempted: u64,
}

impl Default for RouterState {
    fn default() -> Self {
        RouterState::new("llama-3-8b")
    }
}

impl RouterState {
    /// A router whose fleet replicas serve `served_model`.
    pub fn new(served_model: &str) -> Self {
        RouterState {
            router: Router::new(RouterConfig::three_bands()).expect("the three-band configuration is valid"),
            tenants: HashMap::new(),
            tenant_rows: HashMap::new(),
            reserved: None,
            replicas: HashMap::new(),
            replica_model: HashMap::new(),
            models: HashMap::from([(served_model.to_string(), SERVED_MODEL)]),
            down: HashSet::new(),
            cordoned: HashSet::new(),
            flights: HashMap::new(),
            next_id: 1,
            serve_fleet: true,
            preempted: 0,
        }
    }

    /// The router's id of a model name.
    pub fn model(&self, name: &str) -> Option<ModelId> {
        self.models.get(name).copied()
    }

    /// Model names and the replicas in service for each.
    pub fn models(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .models
            .iter()
            .map(|(n, m)| {
                let up = self
                    .replicas
                    .values()
                    .filter(|r| self.takes_work(r))
                    .filter(|r| self.replica_model.get(&r.id).copied().unwrap_or(SERVED_MODEL) == *m)
                    .count();
                (n.clone(), up)
            })
            .collect();
        v.sort();
        v
    }

    /// A replica that is not part of the fleet (a configured backend) serving `model`.
    pub fn add_backend(&mut self, row: ReplicaRow, model: &str, now_ms: i64) -> Result<(), Invalid> {
        let n = self.models.len() as u32;
        let m = *self.models.entry(model.to_string()).or_insert(ModelId(n));
        self.replica_model.insert(row.id, m);
        self.apply(&[row], now_ms).map(|_| ())
    }

    pub fn site_of(&self, replica: ReplicaId) -> Option<&str> {
        self.replicas.get(&i64::from(replica.0)).map(|r| r.site_id.as_str())
    }

    fn spec(&self, r: &ReplicaRow) -> Result<ReplicaSpec, Invalid> {
        let bad = |field: &str| Invalid::new(format!("replicas[{}].{field}", r.id), "out of range");
        let kv_tokens = u64::try_from(r.kv_tokens).map_err(|_| bad("kv_tokens"))?;
        let fleet = !self.replica_model.contains_key(&r.id);
        let out = kv_tokens == 0 || self.down.contains(&r.id) || (fleet && !self.serve_fleet);
        Ok(ReplicaSpec {
            id: ReplicaId(u32::try_from(r.id).map_err(|_| bad("id"))?),
            model: self.replica_model.get(&r.id).copied().unwrap_or(SERVED_MODEL),
            gpus: u32::try_from(r.gpus).ok().filter(|&g| g >= 1).ok_or_else(|| bad("gpus"))?,
            slots: if out { 0 } else { u32::try_from(r.slots).map_err(|_| bad("slots"))? },
            kv_tokens: kv_tokens.max(1),
        })
    }

    /// Sends each decision to the request it concerns.
    fn deliver(&mut self, out: &[Decision]) {
        for d in out {
            let (id, p) = match d {
                Decision::Dispatch { id, replicas } => (*id, Placement::Dispatched(replicas[0])),
                Decision::Reject { id, reason } => (*id, Placement::Rejected(reason.clone())),
                Decision::Preempt { id, .. } => (*id, Placement::Preempted),
                Decision::Queue { .. } => continue,
            };
            if let Some(tx) = self.flights.get(&id) {
                let _ = tx.send(p);
            }
        }
    }

    /// A request arrives: its id and the channel its placement comes on.
    pub fn arrive(&mut self, mut w: Work, now_ms: i64) -> (ReqId, mpsc::UnboundedReceiver<Placement>) {
        let id = self.next_id;
        self.next_id += 1;
        w.id = id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.flights.insert(id, tx);
        let mut out = vec![];
        self.router.arrive(w, now_ms, &mut out);
        self.deliver(&out);
        (id, rx)
    }

    /// Token progress of a request in flight: charges its tenant's virtual counter as tokens are
    /// delivered rather than at the end, and the first report is its time to first token.
    pub fn progress(&mut self, id: ReqId, output_tokens: u32, now_ms: i64) {
        self.router.progress(id, output_tokens, now_ms);
    }

    /// The request is over: served (`complete`) or not (cancelled, failed, rejected).
    pub fn finish(&mut self, id: ReqId, output_tokens: Option<u32>, now_ms: i64) {
        self.flights.remove(&id);
        let mut out = vec![];
        match output_tokens {
            Some(n) => self.router.complete(id, n, now_ms, &mut out),
            None => {
                self.router.cancel(id, now_ms, &mut out);
            }
        }
        self.deliver(&out);
    }

    /// Time passes: queued work past its time-to-live is rejected.
    pub fn tick(&mut self, now_ms: i64) {
        let mut out = vec![];
        self.router.tick(now_ms, &mut out);
        self.deliver(&out);
    }

    /// Holds replicas out of service (they failed), or returns them.
    pub fn set_down(&mut self, ids: &[i64], down: bool, now_ms: i64) {
        let mut rows = vec![];
        for id in ids {
            let changed = if down { self.down.insert(*id) } else { self.down.remove(id) };
            if changed && let Some(r) = self.replicas.get(id) {
                rows.push(r.clone());
            }
        }
        if let Err(e) = self.apply(&rows, now_ms) {
            tracing::warn!(error = %e, "replica health change not applied");
        }
    }

    /// Holds replicas out of new placements (or returns them) without touching what runs there.
    pub fn set_cordoned(&mut self, ids: &[i64], on: bool, now_ms: i64) {
        let mut out = vec![];
        for id in ids {
            let changed = if on { self.cordoned.insert(*id) } else { self.cordoned.remove(id) };
            if changed && let Ok(r) = u32::try_from(*id) {
                self.router.cordon(ReplicaId(r), on, now_ms, &mut out);
            }
        }
        self.deliver(&out);
    }

    /// Replicas held out of service or of new placements: the ones the health loop checks.
    pub fn down(&self) -> Vec<i64> {
        self.down.iter().chain(&self.cordoned).copied().collect()
    }

    /// The most sequences a fleet replica holds now.
    pub fn max_slots(&self) -> u32 {
        self.replicas
            .values()
            .filter(|r| !self.replica_model.contains_key(&r.id))
            .map(|r| u32::try_from(r.slots).unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// Whether a replica takes work now: it has sequences, is not held out, and has a backend here.
    fn takes_work(&self, r: &ReplicaRow) -> bool {
        r.slots > 0
            && !self.down.contains(&r.id)
            && !self.cordoned.contains(&r.id)
            && (self.serve_fleet || self.replica_model.contains_key(&r.id))
    }

    /// The work of the fleet's replicas, for the engine: requests waiting (the router's queue is
    /// the fleet's, not a site's) and, per site, sequences running.
    pub fn demand(&self) -> (u32, std::collections::BTreeMap<String, u32>) {
        let mut running = std::collections::BTreeMap::new();
        for r in self.replicas.values().filter(|r| !self.replica_model.contains_key(&r.id)) {
            let used = u32::try_from(r.id)
                .ok()
                .and_then(|id| self.router.replica_load(ReplicaId(id)))
                .map_or(0, |(used, _)| used);
            *running.entry(r.site_id.clone()).or_insert(0) += used;
        }
        (u32::try_from(self.router.queued_len()).unwrap_or(u32::MAX), running)
    }

    /// Ids of the replicas that take work now.
    pub fn in_service_ids(&self) -> Vec<i64> {
        self.replicas.values().filter(|r| self.takes_work(r)).map(|r| r.id).collect()
    }

    /// A tenant known to storage, new or changed (a known id keeps its router identity and the
    /// work it runs; its share and quota are the row's). The tenant of the reserved-capacity
    /// policy is guaranteed at least the GPUs reserved for it.
    pub fn add_tenant(&mut self, t: &TenantRow) -> Result<(), Invalid> {
        let id = self.tenants.get(&t.id).copied().unwrap_or(TenantId(self.tenants.len() as u32));
        let reserved = match &self.reserved {
            Some((tenant, gpus)) if *tenant == t.id => f64::from(*gpus),
            _ => 0.0,
        };
        self.router.add_tenant(TenantSpec {
            id,
            weight: t.weight,
            guaranteed_gpus: t.guaranteed_gpus.max(reserved),
            borrow_limit_gpus: t.borrow_limit_gpus,
        })?;
        self.tenants.insert(t.id.clone(), id);
        self.tenant_rows.insert(t.id.clone(), t.clone());
        Ok(())
    }

    /// A tenant's allowances a minute (requests, tokens), as last known.
    pub fn tenant_limits(&self, tenant: &str) -> Option<(i64, i64)> {
        self.tenant_rows.get(tenant).map(|t| (t.requests_per_min, t.tokens_per_min))
    }

    /// The reserved-capacity policy in force (tenant, GPUs), or none: the router holds those GPUs
    /// for the tenant (its guarantee is at least them) as the plan keeps them serving.
    pub fn set_reserved(&mut self, reserved: Option<(String, u32)>) -> Result<(), Invalid> {
        let old = std::mem::replace(&mut self.reserved, reserved);
        let touched = [old.map(|o| o.0), self.reserved.as_ref().map(|r| r.0.clone())];
        for name in touched.into_iter().flatten() {
            if let Some(row) = self.tenant_rows.get(&name).cloned() {
                self.add_tenant(&row)?;
            }
        }
        Ok(())
    }

    /// Whether work of a tenant can ever be placed: it has a guarantee (its own or the reserved
    /// one) or may borrow. A tenant with neither would wait until its work times out.
    pub fn can_ever_serve(&self, tenant: &str) -> bool {
        let reserved = matches!(&self.reserved, Some((t, g)) if t == tenant && *g > 0);
        self.tenant_rows.get(tenant).is_some_and(|t| t.guaranteed_gpus > 0.0 || t.borrow_limit_gpus > 0.0 || reserved)
    }

    /// The guarantee the router holds for a tenant now (GPUs).
    pub fn guaranteed_gpus(&self, tenant: &str) -> Option<f64> {
        let id = self.tenants.get(tenant)?;
        self.router.shares().into_iter().find(|s| s.tenant == *id).map(|s| s.guaranteed_gpus)
    }

    pub fn tenant(&self, id: &str) -> Option<TenantId> {
        self.tenants.get(id).copied()
    }

    /// Replicas' new capacity (a replica with no sequences is out of service: its work is
    /// preempted back to its queue). Returns the decisions the change caused.
    /// A bad row is named and nothing is applied. A replica whose model leaves no KV cache is
    /// out of service.
    pub fn apply(&mut self, rows: &[ReplicaRow], now_ms: i64) -> Result<Vec<Decision>, Invalid> {
        let specs = rows.iter().map(|r| self.spec(r)).collect::<Result<Vec<_>, Invalid>>()?;
        let mut out = vec![];
        self.router.set_replicas(&specs, now_ms, &mut out)?;
        self.deliver(&out);
        for r in rows {
            self.replicas.insert(r.id, r.clone());
        }
        self.preempted += out.iter().filter(|d| matches!(d, Decision::Preempt { .. })).count() as u64;
        let in_service = self.replicas.values().filter(|r| r.slots > 0 && !self.down.contains(&r.id)).count();
        metrics::gauge!("hcp_router_replicas", "state" => "in_service").set(in_service as f64);
        metrics::gauge!("hcp_router_replicas", "state" => "out").set((self.replicas.len() - in_service) as f64);
        metrics::gauge!("hcp_router_slots").set(self.replicas.values().map(|r| r.slots as f64).sum::<f64>());
        Ok(out)
    }

    /// Per tenant (all, or one): weight, GPUs held, guarantee, entitlement, and per band the
    /// requests dispatched, completed and preempted, tokens, mean queue time and time to first
    /// token since this process started. The busiest `limit` tenants by GPUs held then tokens.
    pub fn tenants_summary(&self, only: Option<&str>, limit: usize) -> Vec<serde_json::Value> {
        let shares: HashMap<TenantId, hcp_sched::TenantShare> =
            self.router.shares().into_iter().map(|s| (s.tenant, s)).collect();
        let bands = self.router.metrics.bands.len();
        let mut rows: Vec<(f64, u64, serde_json::Value)> = self
            .tenants
            .iter()
            .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
            .map(|(name, &t)| {
                let mut tokens = 0u64;
                let per_band: Vec<serde_json::Value> = (0..bands)
                    .filter_map(|b| self.router.tenant_stats(t, b).map(|s| (b, s)))
                    .map(|(b, s)| {
                        tokens += s.input_tokens + s.output_tokens;
                        let mean = |sum: f64, n: u64| if n == 0 { None } else { Some(sum / n as f64) };
                        serde_json::json!({
                            "band": b,
                            "backlogged": self.router.band_backlog(t, b),
                            "dispatched": s.dispatched,
                            "completed": s.completed,
                            "preempted": s.preempted,
                            "input_tokens": s.input_tokens,
                            "output_tokens": s.output_tokens,
                            "queue_ms_mean": mean(s.queue_ms_sum, s.dispatched),
                            "ttft_ms_mean": mean(s.ttft_ms_sum, s.first_tokens),
                        })
                    })
                    .collect();
                let sh = shares.get(&t);
                let held = sh.map_or(0.0, |s| s.usage_gpus);
                let v = serde_json::json!({
                    "tenant": name,
                    "weight": sh.map(|s| s.weight),
                    "gpus_held": held,
                    "guaranteed_gpus": sh.map(|s| s.guaranteed_gpus),
                    "entitled_gpus": sh.map(|s| s.entitled_gpus),
                    "borrowed_gpus": sh.map(|s| s.borrowed_gpus),
                    "active": sh.is_some_and(|s| s.active),
                    "bands": per_band,
                });
                (held, tokens, v)
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        rows.into_iter().take(limit).map(|r| r.2).collect()
    }

    /// What the router holds now: capacity by site, queues and figures by band.
    pub fn summary(&self) -> serde_json::Value {
        let mut sites: std::collections::BTreeMap<&str, (i64, i64, i64, i64)> = Default::default();
        for r in self.replicas.values() {
            let s = sites.entry(r.site_id.as_str()).or_default();
            s.0 += 1;
            if r.slots > 0 {
                s.1 += 1;
                s.2 += r.slots;
                s.3 += r.gpus;
            }
        }
        let bands: Vec<serde_json::Value> = self
            .router
            .metrics
            .bands
            .iter()
            .enumerate()
            .map(|(b, m)| {
                serde_json::json!({
                    "band": b,
                    "queued": self.router.band_lengths().get(b).copied().unwrap_or(0),
                    "arrived": m.arrived,
                    "rejected": m.rejected,
                    "queue_ms_p50": m.queue.quantile_ms(0.5),
                    "queue_ms_p99": m.queue.quantile_ms(0.99),
                    "ttft_ms_p50": m.ttft.quantile_ms(0.5),
                    "preempted_shrink": m.preempted_shrink,
                    "preempted_reclaim": m.preempted_reclaim,
                    "fairness_index": self.router.fairness_index(b),
                })
            })
            .collect();
        serde_json::json!({
            "replicas": self.replicas.len(),
            "in_service": sites.values().map(|s| s.1).sum::<i64>(),
            "slots": sites.values().map(|s| s.2).sum::<i64>(),
            "gpus_in_service": sites.values().map(|s| s.3).sum::<i64>(),
            "by_site": sites.iter().map(|(id, s)| serde_json::json!({
                "site": id, "replicas": s.0, "in_service": s.1, "slots": s.2, "gpus_in_service": s.3,
            })).collect::<Vec<_>>(),
            "queued": self.router.queued_len(),
            "running": self.router.running_len(),
            "preempted": self.preempted,
            "bands": bands,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_model::TenantId;
    use hcp_sched::Work;

    fn row(id: i64, slots: i64) -> ReplicaRow {
        ReplicaRow { id, site_id: "s".into(), gpus: 1, slots, kv_tokens: 400_000, cap_w: 700.0, updated_ms: 0 }
    }

    /// A changed tenant row reaches the router (same identity, new share and quota), and the
    /// reserved-capacity policy raises its tenant's guarantee to the GPUs reserved, and only
    /// while it is in force.
    #[test]
    fn tenant_changes_and_the_reserved_capacity_policy_reach_the_router() {
        let mut s = RouterState::default();
        let mut t = TenantRow {
            id: "demo".into(),
            name: "Demo".into(),
            weight: 1.0,
            guaranteed_gpus: 2.0,
            borrow_limit_gpus: 1e9,
            created_ms: 0,
            requests_per_min: hcp_store::DEFAULT_REQUESTS_PER_MIN,
            tokens_per_min: hcp_store::DEFAULT_TOKENS_PER_MIN,
        };
        s.add_tenant(&t).unwrap();
        assert_eq!(s.guaranteed_gpus("demo"), Some(2.0));
        t.guaranteed_gpus = 4.0;
        s.add_tenant(&t).unwrap();
        assert_eq!(s.tenant("demo"), Some(TenantId(0)), "same identity");
        assert_eq!(s.guaranteed_gpus("demo"), Some(4.0), "the new quota");
        s.set_reserved(Some(("demo".into(), 16))).unwrap();
        assert_eq!(s.guaranteed_gpus("demo"), Some(16.0));
        s.set_reserved(Some(("other".into(), 16))).unwrap();
        assert_eq!(s.guaranteed_gpus("demo"), Some(4.0), "the reservation moved away");
        s.set_reserved(Some(("demo".into(), 1))).unwrap();
        assert_eq!(s.guaranteed_gpus("demo"), Some(4.0), "the tenant's own guarantee is larger");
        s.set_reserved(None).unwrap();
        assert_eq!(s.guaranteed_gpus("demo"), Some(4.0));
    }

    #[test]
    fn capacity_changes_reach_the_router_and_preempt_what_no_longer_fits() {
        let mut s = RouterState::default();
        let t = TenantRow {
            id: "demo".into(),
            name: "Demo".into(),
            weight: 1.0,
            guaranteed_gpus: 0.0,
            borrow_limit_gpus: 1e9,
            created_ms: 0,
            requests_per_min: hcp_store::DEFAULT_REQUESTS_PER_MIN,
            tokens_per_min: hcp_store::DEFAULT_TOKENS_PER_MIN,
        };
        s.add_tenant(&t).unwrap();
        s.add_tenant(&t).unwrap();
        assert_eq!(s.tenant("demo"), Some(TenantId(0)));
        s.apply(&[row(1, 2), row(2, 0)], 0).unwrap();
        let mut out = vec![];
        for id in 0..3 {
            let w = Work {
                id,
                tenant: TenantId(0),
                band: 1,
                model: SERVED_MODEL,
                prompt_tokens: 100,
                max_output_tokens: 100,
                deadline_ms: None,
                gang: 1,
                preemptible: true,
                restart_cost: 0.0,
            };
            s.router.arrive(w, 1, &mut out);
        }
        assert_eq!((s.router.running_len(), s.router.queued_len()), (2, 1), "two sequences fit");
        // The plan takes replica 1 out: its work goes back to the queue.
        let d = s.apply(&[row(1, 0)], 2).unwrap();
        assert_eq!(d.iter().filter(|d| matches!(d, Decision::Preempt { .. })).count(), 2);
        assert_eq!((s.router.running_len(), s.router.queued_len()), (0, 3));
        let sum = s.summary();
        assert_eq!(
            (sum["replicas"].as_i64(), sum["in_service"].as_i64(), sum["preempted"].as_i64()),
            (Some(2), Some(0), Some(2))
        );
        // It comes back: the queue drains onto it.
        s.apply(&[row(2, 4)], 3).unwrap();
        assert_eq!(s.router.running_len(), 3);
        let e = s.apply(&[row(3, 5), row(-1, 1)], 4).unwrap_err();
        assert_eq!(e.field, "replicas[-1].id", "{e}");
        assert_eq!(s.summary()["replicas"].as_i64(), Some(2), "a bad batch changes nothing");
    }
}
