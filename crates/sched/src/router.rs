//! The router state machine. See the crate docs for the rules.
//!
//! # Why preemption cannot loop
//!
//! Preemption happens for two causes only.
//! 1. Capacity shrink: victims are taken from the replica that lost capacity until its running work
//!    fits again. Nothing is admitted by this step, so it cannot be half of a cycle.
//! 2. Quota reclaim: a tenant whose usage after admission stays within its guaranteed quota may
//!    preempt work of a tenant that is borrowing (usage above its own guarantee), and only if the
//!    victim's tenant still uses at least its guarantee after losing the work. After the step the
//!    preemptor is within its guarantee and the victim is at or above its own, so the victim is not
//!    eligible to reclaim from anyone (reclaiming requires staying within the guarantee while the
//!    target borrows; to reclaim from the preemptor it would need the preemptor to be borrowing,
//!    which it is not). A sequence of reclaims therefore only moves capacity from borrowers to
//!    tenants under their guarantee; each step strictly lowers total borrowed capacity, which is
//!    bounded below by zero, so no cycle A preempts B preempts A exists.
//!    `tests/router.rs::router_invariants` checks the victim condition over random workloads.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use hcp_model::TenantId;

use crate::metrics::Metrics;

/// Limits.
pub const MAX_BANDS: usize = 8;
pub const MAX_TENANTS: usize = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub u32);

pub type ReqId = u64;

#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    /// Number of priority bands; 0 is the highest.
    pub bands: usize,
    /// Queue cap per band (all models together), and for all bands together; when the total is
    /// reached, newer work of a lower band is displaced to make room for higher-band work.
    pub queue_cap: Vec<usize>,
    pub queue_cap_total: usize,
    /// Time-to-live in the queue per band.
    pub ttl_ms: Vec<i64>,
    /// Anti-starvation floor: one decision in `floor_every` on a model goes to the lower bands in
    /// turn when they are backlogged.
    pub floor_every: u32,
    /// VTC weights of input and output tokens.
    pub input_weight: f64,
    pub output_weight: f64,
    /// Running work younger than this is not chosen as a victim while older work can be.
    pub min_runtime_ms: i64,
}

impl RouterConfig {
    pub fn three_bands() -> Self {
        RouterConfig {
            bands: 3,
            queue_cap: vec![100_000, 100_000, 100_000],
            queue_cap_total: 200_000,
            ttl_ms: vec![30_000, 120_000, 3_600_000],
            floor_every: 20,
            input_weight: 1.0,
            output_weight: 2.0,
            min_runtime_ms: 5_000,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_BANDS).contains(&self.bands) {
            return Err(format!("bands: must be 1..={MAX_BANDS}"));
        }
        if self.queue_cap.len() != self.bands || self.ttl_ms.len() != self.bands {
            return Err("queue_cap, ttl_ms: one value per band".into());
        }
        if self.floor_every < 2 {
            return Err("floor_every: must be >= 2".into());
        }
        if !(self.input_weight > 0.0 && self.output_weight > 0.0) {
            return Err("input_weight, output_weight: must be > 0".into());
        }
        Ok(())
    }
}

/// A tenant's share and quota. Capacity is counted in GPUs (a replica's slot is its GPUs divided by
/// its slots).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantSpec {
    pub id: TenantId,
    pub weight: f64,
    pub guaranteed_gpus: f64,
    /// Most it may use above its guarantee while others leave capacity idle.
    pub borrow_limit_gpus: f64,
}

/// An inference request, or a batch job when `gang` > 1 (all its slots placed at once).
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub id: ReqId,
    pub tenant: TenantId,
    pub band: u8,
    pub model: ModelId,
    pub prompt_tokens: u32,
    pub max_output_tokens: u32,
    pub deadline_ms: Option<i64>,
    /// Slots placed all-or-nothing (1 for an online request).
    pub gang: u32,
    pub preemptible: bool,
    /// Cost of restarting, in token-equivalents (batch jobs: work lost).
    pub restart_cost: f64,
}

/// A replica: GPUs serving one model, with concurrent slots and KV-cache capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    pub model: ModelId,
    pub gpus: u32,
    pub slots: u32,
    pub kv_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectReason {
    UnknownTenant,
    /// No replica of the model exists, or none could ever hold the request's KV cache or gang.
    NeverFits,
    QueueFull {
        band: u8,
    },
    /// Displaced from a full queue by higher-priority work.
    Displaced,
    Expired,
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PreemptReason {
    /// The replica lost capacity (curtailment, grid event, fault).
    CapacityShrink { replica: ReplicaId },
    /// A tenant within its guarantee reclaimed borrowed capacity.
    QuotaReclaim { by: TenantId },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Dispatch {
        id: ReqId,
        replicas: Vec<ReplicaId>,
    },
    Queue {
        id: ReqId,
    },
    Reject {
        id: ReqId,
        reason: RejectReason,
    },
    /// The work stopped and went back to the queue in its original place.
    Preempt {
        id: ReqId,
        replicas: Vec<ReplicaId>,
        reason: PreemptReason,
    },
}

struct Replica {
    spec: ReplicaSpec,
    used_slots: u32,
    kv_used: u64,
    /// Work running here, with what choosing a victim needs (order does not matter: victims and
    /// reclaims sort by key and id).
    running: Vec<RunRef>,
    /// Key in the model's free index, if it has room.
    key: Option<(u32, u32)>,
}

impl Replica {
    fn score(&self) -> u32 {
        let slots = f64::from(self.used_slots) / f64::from(self.spec.slots.max(1));
        let kv = self.kv_used as f64 / self.spec.kv_tokens.max(1) as f64 / 0.8;
        (slots.max(kv) * 1_000_000.0) as u32
    }
    fn gpu_per_slot(&self) -> f64 {
        f64::from(self.spec.gpus) / f64::from(self.spec.slots.max(1))
    }
}

#[derive(Clone, Copy)]
struct RunRef {
    id: ReqId,
    tenant: TenantId,
    band: u8,
    started_ms: i64,
}

struct Running {
    work: Work,
    /// One entry per slot held (a replica's entries are adjacent).
    slots: Vec<ReplicaId>,
    started_ms: i64,
    output_done: u32,
    gpus: f64,
    seq: u64,
    arrived_ms: i64,
}

struct Queued {
    work: Work,
    seq: u64,
    arrived_ms: i64,
    expires_ms: i64,
}

/// One tenant's queued work on a (model, band), sorted by (deadline, arrival sequence).
type TenantQueue = VecDeque<((i64, u64), ReqId)>;

/// Backlog of one (model, band): tenants ordered by virtual counter.
#[derive(Default)]
struct BandQueue {
    /// Per tenant: its queued work sorted by (deadline, arrival sequence).
    by_tenant: FastMap<TenantId, TenantQueue>,
    order: BTreeSet<(u64, TenantId)>,
    len: usize,
}

struct TenantState {
    spec: TenantSpec,
    /// VTC per band.
    counter: Vec<f64>,
    usage_gpus: f64,
    /// Per band: the models where the tenant has queued work, and its figures.
    waiting_in: Vec<Vec<ModelId>>,
    stats: Vec<crate::metrics::TenantStats>,
}

#[derive(Default)]
struct ModelState {
    replicas: BTreeSet<ReplicaId>,
    free: BTreeSet<(u32, u32)>,
    bands: Vec<BandQueue>,
    turn: u32,
    max_kv: u64,
    total_slots: u64,
}

/// The router.
pub struct Router {
    cfg: RouterConfig,
    tenants: FastMap<TenantId, TenantState>,
    models: BTreeMap<ModelId, ModelState>,
    replicas: FastMap<ReplicaId, Replica>,
    queued: FastMap<ReqId, Queued>,
    running: FastMap<ReqId, Running>,
    /// Whether any tenant has a guarantee (else no reclaim can ever happen).
    any_guarantee: bool,
    /// While fitting a replica, placement-index updates wait here and run once at the end.
    deferred: Option<Vec<ReplicaId>>,
    /// Expiry times of queued work; entries of work that has left the queue are skipped lazily.
    expiry: BinaryHeap<Reverse<(i64, ReqId)>>,
    band_len: Vec<usize>,
    seq: u64,
    pub metrics: Metrics,
}

/// A fast hasher for the router's integer keys (ids are not attacker-chosen hash inputs: they
/// come from our own gateway). Multiply-xorshift over the written words.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 32;
        z
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0 ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(29);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

fn key(c: f64) -> u64 {
    c.max(0.0).to_bits()
}

impl Router {
    pub fn new(cfg: RouterConfig) -> Result<Self, String> {
        cfg.validate()?;
        // Room for a large backlog up front, so a burst of re-queued work does not rehash.
        let reserve = cfg.queue_cap_total.min(1 << 16);
        Ok(Router {
            band_len: vec![0; cfg.bands],
            metrics: Metrics::new(cfg.bands),
            cfg,
            tenants: FastMap::default(),
            models: BTreeMap::new(),
            replicas: FastMap::default(),
            queued: FastMap::with_capacity_and_hasher(reserve, Default::default()),
            running: FastMap::default(),
            any_guarantee: false,
            deferred: None,
            expiry: BinaryHeap::new(),
            seq: 0,
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    pub fn add_tenant(&mut self, spec: TenantSpec) -> Result<(), String> {
        if !(spec.weight.is_finite() && spec.weight > 0.0) {
            return Err("weight: must be a finite number > 0".into());
        }
        if !(spec.guaranteed_gpus >= 0.0 && spec.borrow_limit_gpus >= 0.0) {
            return Err("guaranteed_gpus, borrow_limit_gpus: must be >= 0".into());
        }
        if self.tenants.len() >= MAX_TENANTS && !self.tenants.contains_key(&spec.id) {
            return Err(format!("at most {MAX_TENANTS} tenants"));
        }
        self.any_guarantee |= spec.guaranteed_gpus > 0.0;
        let bands = self.cfg.bands;
        self.tenants.entry(spec.id).and_modify(|t| t.spec = spec.clone()).or_insert(TenantState {
            spec,
            counter: vec![0.0; bands],
            usage_gpus: 0.0,
            waiting_in: vec![vec![]; bands],
            stats: vec![Default::default(); bands],
        });
        Ok(())
    }

    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Whether a request is queued (Some(false)), running (Some(true)) or unknown (None).
    pub fn is_running(&self, id: ReqId) -> Option<bool> {
        if self.running.contains_key(&id) {
            Some(true)
        } else if self.queued.contains_key(&id) {
            Some(false)
        } else {
            None
        }
    }

    pub fn tenant_usage_gpus(&self, t: TenantId) -> f64 {
        self.tenants.get(&t).map_or(0.0, |s| s.usage_gpus)
    }

    /// Slots in use and slots of a replica.
    pub fn replica_load(&self, r: ReplicaId) -> Option<(u32, u32)> {
        self.replicas.get(&r).map(|x| (x.used_slots, x.spec.slots))
    }

    /// Running work per replica, for checks.
    pub fn running_on(&self, r: ReplicaId) -> Vec<ReqId> {
        let mut v: Vec<ReqId> =
            self.replicas.get(&r).map(|x| x.running.iter().map(|e| e.id).collect()).unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn reindex(&mut self, r: ReplicaId) {
        let rep = self.replicas.get_mut(&r).expect("known replica");
        let m = self.models.get_mut(&rep.spec.model).expect("known model");
        if let Some(k) = rep.key.take() {
            m.free.remove(&k);
        }
        if rep.used_slots < rep.spec.slots && rep.kv_used < rep.spec.kv_tokens {
            let k = (rep.score(), r.0);
            m.free.insert(k);
            rep.key = Some(k);
        }
    }

    /// Adds or resizes a replica. Shrinking below its running work preempts victims.
    pub fn set_replica(&mut self, spec: ReplicaSpec, now_ms: i64, out: &mut Vec<Decision>) -> Result<(), String> {
        if spec.gpus == 0 || spec.kv_tokens == 0 {
            return Err("gpus, kv_tokens: must be > 0".into());
        }
        let id = spec.id;
        if let Some(old) = self.replicas.get(&id)
            && old.spec.model != spec.model
        {
            return Err(format!("replica {}: cannot change model; remove it first", id.0));
        }
        let bands = self.cfg.bands;
        let m = self.models.entry(spec.model).or_insert_with(|| ModelState {
            bands: (0..bands).map(|_| BandQueue::default()).collect(),
            ..Default::default()
        });
        m.replicas.insert(id);
        let rep = self.replicas.entry(id).or_insert(Replica {
            spec: spec.clone(),
            used_slots: 0,
            kv_used: 0,
            running: Default::default(),
            key: None,
        });
        rep.spec = spec.clone();
        self.refresh_max_kv(spec.model);
        self.fit_replica(id, now_ms, out);
        self.reindex(id);
        self.pump(spec.model, now_ms, out);
        Ok(())
    }

    /// Resizes many replicas at once (a curtailment across a site): every replica is fitted first,
    /// then each affected model's queue is served once.
    pub fn resize_many(&mut self, sizes: &[(ReplicaId, u32)], now_ms: i64, out: &mut Vec<Decision>) {
        let mut models = BTreeSet::new();
        for &(id, slots) in sizes {
            let Some(rep) = self.replicas.get_mut(&id) else { continue };
            rep.spec.slots = slots;
            models.insert(rep.spec.model);
            self.fit_replica(id, now_ms, out);
            self.reindex(id);
        }
        for m in models {
            self.refresh_max_kv(m);
            self.pump(m, now_ms, out);
        }
    }

    /// Removes a replica (node loss, curtailment): its work is preempted back to the queue.
    pub fn remove_replica(&mut self, id: ReplicaId, now_ms: i64, out: &mut Vec<Decision>) {
        let Some(rep) = self.replicas.get_mut(&id) else { return };
        rep.spec.slots = 0;
        let model = rep.spec.model;
        self.fit_replica(id, now_ms, out);
        let rep = self.replicas.remove(&id).expect("present");
        let m = self.models.get_mut(&model).expect("model");
        if let Some(k) = rep.key {
            m.free.remove(&k);
        }
        m.replicas.remove(&id);
        self.refresh_max_kv(model);
        self.pump(model, now_ms, out);
    }

    fn refresh_max_kv(&mut self, model: ModelId) {
        let m = self.models.get_mut(&model).expect("model");
        let reps = m.replicas.iter().filter_map(|r| self.replicas.get(r));
        m.max_kv = reps.clone().map(|r| r.spec.kv_tokens).max().unwrap_or(0);
        m.total_slots = reps.map(|r| u64::from(r.spec.slots)).sum();
    }

    /// Preempts work on a replica until its running work fits its slots: lowest band first, then the
    /// tenant most over its fair share, then the cheapest to restart, then the newest; work younger
    /// than the minimum runtime only when nothing else can go. Gangs go whole.
    fn fit_replica(&mut self, id: ReplicaId, now_ms: i64, out: &mut Vec<Decision>) {
        let rep = &self.replicas[&id];
        if rep.used_slots <= rep.spec.slots {
            return;
        }
        // Order: not young first, lowest band, most over its weighted share, cheapest restart,
        // newest, id. The restart cost needs the running record, so it is looked up only where
        // the cheaper keys tie (items of one tenant and band).
        let mut over_of: FastMap<TenantId, i64> =
            FastMap::with_capacity_and_hasher(rep.running.len(), Default::default());
        let mut victims: Vec<(bool, u8, i64, i64, i64, ReqId)> = rep
            .running
            .iter()
            .map(|e| {
                let over = *over_of.entry(e.tenant).or_insert_with(|| {
                    let t = &self.tenants[&e.tenant];
                    -((t.usage_gpus - t.spec.guaranteed_gpus) / t.spec.weight * 1e6) as i64
                });
                let young = now_ms - e.started_ms < self.cfg.min_runtime_ms;
                (young, u8::MAX - e.band, over, 0, -e.started_ms, e.id)
            })
            .collect();
        victims.sort_unstable();
        let mut i = 0;
        while i < victims.len() {
            let mut j = i + 1;
            let head = (victims[i].0, victims[i].1, victims[i].2);
            while j < victims.len() && (victims[j].0, victims[j].1, victims[j].2) == head {
                j += 1;
            }
            if j - i > 1 {
                for v in &mut victims[i..j] {
                    let r = &self.running[&v.5];
                    v.3 = ((r.work.restart_cost + f64::from(r.output_done)) * 1e3) as i64;
                }
                victims[i..j].sort_unstable();
            }
            i = j;
        }
        self.deferred = Some(Vec::new());
        for v in victims {
            let rep = &self.replicas[&id];
            if rep.used_slots <= rep.spec.slots {
                break;
            }
            if self.running.contains_key(&v.5) {
                self.preempt(v.5, PreemptReason::CapacityShrink { replica: id }, now_ms, out);
            }
        }
        let mut touched = self.deferred.take().unwrap_or_default();
        touched.sort_unstable();
        touched.dedup();
        for r in touched {
            if self.replicas.contains_key(&r) {
                self.reindex(r);
            }
        }
    }

    fn preempt(&mut self, rid: ReqId, reason: PreemptReason, now_ms: i64, out: &mut Vec<Decision>) {
        let mut r = self.running.remove(&rid).expect("running");
        self.release(&r);
        self.metrics.preempted(r.work.band, &reason);
        if let Some(t) = self.tenants.get_mut(&r.work.tenant) {
            t.stats[usize::from(r.work.band)].preempted += 1;
        }
        let mut replicas = std::mem::take(&mut r.slots);
        replicas.dedup();
        out.push(Decision::Preempt { id: rid, replicas, reason });
        // Back in line at its original place, with its service kept (the VTC is not refunded).
        let expires = now_ms + self.cfg.ttl_ms[usize::from(r.work.band)];
        self.enqueue(Queued { work: r.work, seq: r.seq, arrived_ms: r.arrived_ms, expires_ms: expires });
    }

    fn release(&mut self, r: &Running) {
        let kv = u64::from(r.work.prompt_tokens + r.work.max_output_tokens);
        for id in &r.slots {
            if let Some(rep) = self.replicas.get_mut(id) {
                rep.used_slots -= 1;
                rep.kv_used -= kv;
                if let Some(p) = rep.running.iter().position(|e| e.id == r.work.id) {
                    rep.running.swap_remove(p);
                }
            }
        }
        for (k, id) in r.slots.iter().enumerate() {
            if k > 0 && r.slots[k - 1] == *id {
                continue;
            }
            if let Some(d) = self.deferred.as_mut() {
                d.push(*id);
            } else if self.replicas.contains_key(id) {
                self.reindex(*id);
            }
        }
        if let Some(t) = self.tenants.get_mut(&r.work.tenant) {
            t.usage_gpus = (t.usage_gpus - r.gpus).max(0.0);
        }
    }

    fn enqueue(&mut self, q: Queued) {
        let (model, band, tenant) = (q.work.model, usize::from(q.work.band), q.work.tenant);
        let order_key = (q.work.deadline_ms.unwrap_or(i64::MAX), q.seq);
        // A tenant becoming backlogged again is lifted to the least counter among the backlogged,
        // so that idleness banks no credit.
        let bq = &self.models[&model].bands[band];
        if !bq.by_tenant.contains_key(&tenant)
            && let Some(m) = bq.order.iter().next().map(|(k, _)| f64::from_bits(*k))
        {
            let c = self.tenants[&tenant].counter[band];
            if m > c {
                self.set_counter(tenant, band, m);
            }
        }
        let counter = self.tenants[&tenant].counter[band];
        let bq = &mut self.models.get_mut(&model).expect("model").bands[band];
        let tq = bq.by_tenant.entry(tenant).or_default();
        if tq.is_empty() {
            bq.order.insert((key(counter), tenant));
            self.tenants.get_mut(&tenant).expect("tenant").waiting_in[band].push(model);
        }
        // New work usually goes last; preempted work returns near the front (its old place).
        let at = tq.partition_point(|e| e.0 < order_key);
        tq.insert(at, (order_key, q.work.id));
        bq.len += 1;
        self.band_len[band] += 1;
        self.expiry.push(Reverse((q.expires_ms, q.work.id)));
        self.queued.insert(q.work.id, q);
    }

    fn dequeue(&mut self, id: ReqId) -> Option<Queued> {
        let q = self.queued.remove(&id)?;
        let (model, band, tenant) = (q.work.model, usize::from(q.work.band), q.work.tenant);
        let counter = self.tenants[&tenant].counter[band];
        let bq = &mut self.models.get_mut(&model).expect("model").bands[band];
        let tq = bq.by_tenant.get_mut(&tenant).expect("tenant queue");
        let k = (q.work.deadline_ms.unwrap_or(i64::MAX), q.seq);
        let at = tq.partition_point(|e| e.0 < k);
        debug_assert_eq!(tq.get(at).map(|e| e.1), Some(id));
        tq.remove(at);
        if tq.is_empty() {
            bq.by_tenant.remove(&tenant);
            bq.order.remove(&(key(counter), tenant));
            self.tenants.get_mut(&tenant).expect("tenant").waiting_in[band].retain(|m| *m != model);
        }
        bq.len -= 1;
        self.band_len[band] -= 1;
        Some(q)
    }

    /// A new request or job.
    pub fn arrive(&mut self, w: Work, now_ms: i64, out: &mut Vec<Decision>) {
        let id = w.id;
        if !self.tenants.contains_key(&w.tenant) {
            out.push(Decision::Reject { id, reason: RejectReason::UnknownTenant });
            return;
        }
        if usize::from(w.band) >= self.cfg.bands
            || w.gang == 0
            || self.queued.contains_key(&id)
            || self.running.contains_key(&id)
        {
            let why = if usize::from(w.band) >= self.cfg.bands {
                "band: beyond the configured bands"
            } else if w.gang == 0 {
                "gang: must be >= 1"
            } else {
                "id: already admitted"
            };
            out.push(Decision::Reject { id, reason: RejectReason::Invalid(why.into()) });
            return;
        }
        let kv = u64::from(w.prompt_tokens + w.max_output_tokens);
        let fits_ever = self.models.get(&w.model).is_some_and(|m| m.max_kv >= kv && m.total_slots >= u64::from(w.gang));
        if !fits_ever {
            out.push(Decision::Reject { id, reason: RejectReason::NeverFits });
            return;
        }
        let band = usize::from(w.band);
        let total_full = self.queued.len() >= self.cfg.queue_cap_total;
        if self.band_len[band] >= self.cfg.queue_cap[band] || (total_full && !self.displace(band, out)) {
            out.push(Decision::Reject { id, reason: RejectReason::QueueFull { band: w.band } });
            return;
        }
        self.seq += 1;
        self.metrics.arrived(w.band);
        let model = w.model;
        let expires = now_ms + self.cfg.ttl_ms[band];
        self.enqueue(Queued { work: w, seq: self.seq, arrived_ms: now_ms, expires_ms: expires });
        let before = out.len();
        self.pump(model, now_ms, out);
        if !out[before..].iter().any(|d| matches!(d, Decision::Dispatch { id: x, .. } if *x == id)) {
            out.push(Decision::Queue { id });
        }
    }

    /// Makes room in a full band by displacing the newest work of a lower band (lowest first).
    fn displace(&mut self, band: usize, out: &mut Vec<Decision>) -> bool {
        for lower in (band + 1..self.cfg.bands).rev() {
            if self.band_len[lower] == 0 {
                continue;
            }
            let newest = self
                .queued
                .values()
                .filter(|q| usize::from(q.work.band) == lower)
                .max_by_key(|q| (q.seq, q.work.id))
                .map(|q| q.work.id);
            if let Some(id) = newest {
                self.dequeue(id);
                self.metrics.rejected(lower as u8);
                out.push(Decision::Reject { id, reason: RejectReason::Displaced });
                return true;
            }
        }
        false
    }

    /// Token progress of running work: charges its tenant's counter for output tokens.
    pub fn progress(&mut self, id: ReqId, output_tokens: u32, now_ms: i64) {
        let Some(r) = self.running.get_mut(&id) else { return };
        let add = output_tokens.saturating_sub(r.output_done);
        if r.output_done == 0 && add > 0 {
            self.metrics.first_token(r.work.band, now_ms - r.arrived_ms);
            let st = &mut self.tenants.get_mut(&r.work.tenant).expect("tenant").stats[usize::from(r.work.band)];
            st.first_tokens += 1;
            st.ttft_ms_sum += (now_ms - r.arrived_ms) as f64;
        }
        r.output_done = r.output_done.max(output_tokens);
        let (tenant, band) = (r.work.tenant, r.work.band);
        self.charge(tenant, usize::from(band), f64::from(add) * self.cfg.output_weight);
        self.tenants.get_mut(&tenant).expect("tenant").stats[usize::from(band)].output_tokens += u64::from(add);
    }

    fn charge(&mut self, tenant: TenantId, band: usize, cost: f64) {
        let t = &self.tenants[&tenant];
        let new = t.counter[band] + cost / t.spec.weight;
        self.set_counter(tenant, band, new);
    }

    /// Sets a tenant's virtual counter in a band, keeping the backlog order keys in step for
    /// every model the tenant waits on in that band.
    fn set_counter(&mut self, tenant: TenantId, band: usize, new: f64) {
        let t = self.tenants.get_mut(&tenant).expect("tenant");
        let old = std::mem::replace(&mut t.counter[band], new);
        for model in &t.waiting_in[band] {
            let bq = &mut self.models.get_mut(model).expect("model").bands[band];
            if bq.order.remove(&(key(old), tenant)) {
                bq.order.insert((key(new), tenant));
            }
        }
    }

    /// Work finished (or failed at the backend): its capacity frees.
    pub fn complete(&mut self, id: ReqId, output_tokens: u32, now_ms: i64, out: &mut Vec<Decision>) {
        self.progress(id, output_tokens, now_ms);
        let Some(r) = self.running.remove(&id) else { return };
        self.release(&r);
        if let Some(t) = self.tenants.get_mut(&r.work.tenant) {
            t.stats[usize::from(r.work.band)].completed += 1;
        }
        let model = r.work.model;
        self.pump(model, now_ms, out);
    }

    /// Time passes: queued work past its time-to-live is rejected.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Decision>) {
        while let Some(&Reverse((t, id))) = self.expiry.peek() {
            if t > now_ms {
                break;
            }
            self.expiry.pop();
            // Only work still queued with this expiry (not dispatched, or re-queued since).
            if self.queued.get(&id).is_some_and(|q| q.expires_ms == t)
                && let Some(q) = self.dequeue(id)
            {
                self.metrics.rejected(q.work.band);
                out.push(Decision::Reject { id, reason: RejectReason::Expired });
            }
        }
    }

    /// Which band gets the next decision on a model: the highest backlogged, except one decision in
    /// `floor_every`, which goes to the lower backlogged bands in turn.
    fn pick_band(&self, model: ModelId) -> Option<usize> {
        let floor = self.cfg.floor_every;
        let m = self.models.get(&model)?;
        let top = m.bands.iter().position(|b| b.len > 0)?;
        let turn = m.turn.wrapping_add(1);
        if turn.is_multiple_of(floor) {
            let lower = m.bands.iter().enumerate().skip(top + 1).filter(|(_, b)| b.len > 0).count();
            if lower > 0 {
                let k = (turn / floor) as usize % lower;
                return m.bands.iter().enumerate().skip(top + 1).filter(|(_, b)| b.len > 0).nth(k).map(|(i, _)| i);
            }
        }
        Some(top)
    }

    /// Dispatches queued work on a model while capacity and quota allow.
    fn pump(&mut self, model: ModelId, now_ms: i64, out: &mut Vec<Decision>) {
        // Every round dispatches one queued item; a reclaim re-queues less than it frees. More
        // rounds than items known to the router would be a bug (a livelock): stop and say so.
        let limit = 2 * (self.queued.len() + self.running.len()) + 16;
        for round in 0.. {
            assert!(round <= limit, "router livelock on model {}", model.0);
            let Some(band) = self.pick_band(model) else { return };
            if !self.dispatch_one(model, band, now_ms, out) {
                // Nothing in this band could go; try the others once before giving up.
                let others: Vec<usize> =
                    (0..self.cfg.bands).filter(|&b| b != band && self.models[&model].bands[b].len > 0).collect();
                if !others.into_iter().any(|b| self.dispatch_one(model, b, now_ms, out)) {
                    return;
                }
            }
            // The floor counts decisions, not attempts.
            let m = self.models.get_mut(&model).expect("model");
            m.turn = m.turn.wrapping_add(1);
        }
    }

    /// Tries the tenants of a band in VTC order; the first whose head fits (capacity, quota, or a
    /// reclaim) goes. Returns whether something was dispatched.
    fn dispatch_one(&mut self, model: ModelId, band: usize, now_ms: i64, out: &mut Vec<Decision>) -> bool {
        if self.models[&model].free.is_empty() && !self.any_guarantee {
            return false;
        }
        // Tenants in VTC order, looked at lazily (the first usually goes).
        let mut cursor: Option<(u64, TenantId)> = None;
        let mut tried = 0;
        while tried < 64 {
            tried += 1;
            let next = {
                let bq = &self.models[&model].bands[band];
                let mut it = match cursor {
                    None => bq.order.range(..),
                    Some(c) => bq.order.range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)),
                };
                it.next().copied().map(|k| (k, bq.by_tenant.get(&k.1).and_then(|q| q.front()).map(|e| e.1)))
            };
            let Some((k, Some(id))) = next else { return false };
            cursor = Some(k);
            let tenant = k.1;
            let w = &self.queued[&id].work;
            let (gang, kv) = (w.gang, u64::from(w.prompt_tokens + w.max_output_tokens));
            let Some(placement) = self.place(model, gang, kv) else {
                // No room: a tenant within its guarantee may reclaim borrowed capacity.
                if self.reclaim(model, tenant, gang, kv, now_ms, out) {
                    let p = self.place(model, gang, kv).expect("a reclaim makes room");
                    self.start(id, p, now_ms, out);
                    return true;
                }
                continue;
            };
            let t = &self.tenants[&tenant];
            let need: f64 = placement.iter().map(|r| self.replicas[r].gpu_per_slot()).sum();
            if t.usage_gpus + need > t.spec.guaranteed_gpus + t.spec.borrow_limit_gpus + 1e-9 {
                continue;
            }
            self.start(id, placement, now_ms, out);
            return true;
        }
        false
    }

    /// The least saturated replicas with room (one slot each for a gang), or none.
    fn place(&self, model: ModelId, gang: u32, kv: u64) -> Option<Vec<ReplicaId>> {
        let m = self.models.get(&model)?;
        let mut chosen = Vec::with_capacity(gang as usize);
        for &(_, r) in &m.free {
            let rep = &self.replicas[&ReplicaId(r)];
            let room_slots = rep.spec.slots - rep.used_slots;
            let room_kv = ((rep.spec.kv_tokens - rep.kv_used) / kv.max(1)) as u32;
            for _ in 0..room_slots.min(room_kv).min(gang - chosen.len() as u32) {
                chosen.push(ReplicaId(r));
            }
            if chosen.len() as u32 == gang {
                return Some(chosen);
            }
        }
        None
    }

    fn start(&mut self, id: ReqId, placement: Vec<ReplicaId>, now_ms: i64, out: &mut Vec<Decision>) {
        let q = self.dequeue(id).expect("queued");
        let kv = u64::from(q.work.prompt_tokens + q.work.max_output_tokens);
        let mut gpus = 0.0;
        for r in &placement {
            let rep = self.replicas.get_mut(r).expect("replica");
            rep.used_slots += 1;
            rep.kv_used += kv;
            if rep.running.last().is_none_or(|e| e.id != id) {
                rep.running.push(RunRef { id, tenant: q.work.tenant, band: q.work.band, started_ms: now_ms });
            }
            gpus += rep.gpu_per_slot();
        }
        for (k, r) in placement.iter().enumerate() {
            if k == 0 || placement[k - 1] != *r {
                self.reindex(*r);
            }
        }
        let (tenant, band) = (q.work.tenant, usize::from(q.work.band));
        self.tenants.get_mut(&tenant).expect("tenant").usage_gpus += gpus;
        // VTC charges input tokens when the prompt is admitted.
        self.charge(tenant, band, f64::from(q.work.prompt_tokens) * self.cfg.input_weight);
        self.metrics.dispatched(q.work.band, now_ms - q.arrived_ms);
        let st = &mut self.tenants.get_mut(&tenant).expect("tenant").stats[band];
        st.dispatched += 1;
        st.queue_ms_sum += (now_ms - q.arrived_ms) as f64;
        st.input_tokens += u64::from(q.work.prompt_tokens);
        let mut replicas = placement.clone();
        replicas.dedup();
        out.push(Decision::Dispatch { id, replicas });
        self.running.insert(
            id,
            Running {
                slots: placement,
                started_ms: now_ms,
                output_done: 0,
                gpus,
                seq: q.seq,
                arrived_ms: q.arrived_ms,
                work: q.work,
            },
        );
    }

    /// Quota reclaim (see the module docs for why it cannot loop): `tenant`, within its guarantee
    /// after admitting one slot, preempts the one running item of the most over-quota borrower on
    /// this model whose removal makes room for the request and leaves that borrower at or above
    /// its own guarantee. Nothing is preempted unless the request then fits, so a reclaim always
    /// ends in a dispatch. Gangs (batch jobs) do not reclaim: they wait for capacity.
    fn reclaim(
        &mut self,
        model: ModelId,
        tenant: TenantId,
        gang: u32,
        kv: u64,
        now_ms: i64,
        out: &mut Vec<Decision>,
    ) -> bool {
        let t = &self.tenants[&tenant];
        if gang != 1 || t.usage_gpus >= t.spec.guaranteed_gpus {
            return false;
        }
        let mut best: Option<((bool, i64, ReqId), ReqId)> = None;
        for r in &self.models[&model].replicas {
            let rep = &self.replicas[r];
            if rep.spec.slots == 0 || t.usage_gpus + rep.gpu_per_slot() > t.spec.guaranteed_gpus + 1e-9 {
                continue;
            }
            for e in &rep.running {
                let rid = &e.id;
                let run = &self.running[rid];
                let v = &self.tenants[&run.work.tenant];
                if run.work.tenant == tenant || !run.work.preemptible || run.work.gang != 1 {
                    continue;
                }
                if v.usage_gpus - run.gpus + 1e-9 < v.spec.guaranteed_gpus {
                    continue;
                }
                let run_kv = u64::from(run.work.prompt_tokens + run.work.max_output_tokens);
                if rep.used_slots > rep.spec.slots || rep.kv_used - run_kv + kv > rep.spec.kv_tokens {
                    continue;
                }
                let over = (v.usage_gpus - v.spec.guaranteed_gpus) / v.spec.weight;
                let young = now_ms - run.started_ms < self.cfg.min_runtime_ms;
                let k = (young, -(over * 1e6) as i64, *rid);
                if best.as_ref().is_none_or(|(b, _)| k < *b) {
                    best = Some((k, *rid));
                }
            }
        }
        match best {
            Some((_, rid)) => {
                self.preempt(rid, PreemptReason::QuotaReclaim { by: tenant }, now_ms, out);
                true
            }
            None => false,
        }
    }

    /// Jain's fairness index of weighted service among tenants now backlogged in `band`.
    pub fn fairness_index(&self, band: usize) -> Option<f64> {
        let mut xs = vec![];
        let mut seen = BTreeSet::new();
        for m in self.models.values() {
            for t in m.bands[band].by_tenant.keys() {
                if seen.insert(*t) {
                    let s = &self.tenants[t];
                    xs.push(s.stats[band].service() / s.spec.weight);
                }
            }
        }
        crate::metrics::jain(&xs)
    }

    /// Queued requests per band (all models).
    pub fn band_lengths(&self) -> &[usize] {
        &self.band_len
    }

    /// Whether a tenant has queued work in a band (any model).
    pub fn band_backlog(&self, t: TenantId, band: usize) -> bool {
        self.tenants.get(&t).is_some_and(|s| !s.waiting_in[band].is_empty())
    }

    /// A tenant's figures in a band.
    pub fn tenant_stats(&self, t: TenantId, band: usize) -> Option<&crate::metrics::TenantStats> {
        self.tenants.get(&t).and_then(|s| s.stats.get(band))
    }

    /// Virtual counter of a tenant in a band.
    pub fn counter(&self, t: TenantId, band: usize) -> f64 {
        self.tenants.get(&t).map_or(0.0, |s| s.counter[band])
    }

    /// Check used by tests and the harness: no replica runs beyond its slots or KV capacity, and
    /// usage adds up.
    pub fn check(&self) -> Result<(), String> {
        for (id, r) in &self.replicas {
            if r.used_slots > r.spec.slots || r.kv_used > r.spec.kv_tokens {
                return Err(format!(
                    "replica {} over capacity: {}/{} slots, {}/{} kv",
                    id.0, r.used_slots, r.spec.slots, r.kv_used, r.spec.kv_tokens
                ));
            }
        }
        let mut usage: FastMap<TenantId, f64> = FastMap::default();
        for r in self.running.values() {
            *usage.entry(r.work.tenant).or_default() += r.gpus;
        }
        for (id, t) in &self.tenants {
            let u = usage.get(id).copied().unwrap_or(0.0);
            if (u - t.usage_gpus).abs() > 1e-6 {
                return Err(format!("tenant {} usage {} != {}", id.0, t.usage_gpus, u));
            }
        }
        let queued: usize = self.band_len.iter().sum();
        if queued != self.queued.len() {
            return Err("band lengths do not add up".into());
        }
        for (mid, m) in &self.models {
            for (b, bq) in m.bands.iter().enumerate() {
                let expect: BTreeSet<(u64, TenantId)> =
                    bq.by_tenant.keys().map(|t| (key(self.tenants[t].counter[b]), *t)).collect();
                if expect != bq.order || bq.len != bq.by_tenant.values().map(|q| q.len()).sum::<usize>() {
                    return Err(format!("model {} band {b}: backlog order out of step", mid.0));
                }
            }
        }
        Ok(())
    }
}
