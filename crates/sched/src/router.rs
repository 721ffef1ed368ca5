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
//!
//! Sharing borrowed capacity by weighted dominant share (Kueue's fair sharing) is done at
//! admission only: when free capacity would be borrowed, the candidate whose borrowed GPUs over its
//! weight are lowest after admission goes. It never preempts, so it adds no edge to a cycle.
//!
//! # Layout (why it is fast)
//!
//! Requests and jobs live in one slab of two-cache-line items; queues, replicas and the expiry
//! lists hold slab indexes, so moving work between queue and replica moves no data and re-hashes
//! nothing. Tenants, models and replicas get dense indexes when added; per tenant and band, the
//! counter, statistics and the handles of its queues sit together. Band choice is a bitmap;
//! placement reads the first entries of a per-model ordered index of replicas with room (sublinear
//! in replicas); expiry is a FIFO per band (every expiry is `now + ttl` of its band).

use smallvec::SmallVec;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use hcp_model::{Invalid, TenantId};

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

    pub fn validate(&self) -> Result<(), Invalid> {
        if !(1..=MAX_BANDS).contains(&self.bands) {
            return Err(Invalid::new("bands", format!("must be 1..={MAX_BANDS}")));
        }
        if self.queue_cap.len() != self.bands || self.ttl_ms.len() != self.bands {
            let field = if self.queue_cap.len() != self.bands { "queue_cap" } else { "ttl_ms" };
            return Err(Invalid::new(field, "one value per band"));
        }
        if self.floor_every < 2 {
            return Err(Invalid::new("floor_every", "must be >= 2"));
        }
        if !(self.input_weight > 0.0 && self.output_weight > 0.0) {
            let field = if self.input_weight > 0.0 { "output_weight" } else { "input_weight" };
            return Err(Invalid::new(field, "must be > 0"));
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
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// No replica of the model exists, or none in service could ever hold the request's KV cache
    /// or gang. (When every replica is out of service, work waits for them instead.)
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

/// The replicas a decision names: one, held inline (an online request), or several (a gang).
#[derive(Clone, Debug, Eq)]
pub enum Replicas {
    One(ReplicaId),
    Many(Vec<ReplicaId>),
}

impl std::ops::Deref for Replicas {
    type Target = [ReplicaId];
    fn deref(&self) -> &[ReplicaId] {
        match self {
            Replicas::One(r) => std::slice::from_ref(r),
            Replicas::Many(v) => v,
        }
    }
}

impl PartialEq for Replicas {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Dispatch {
        id: ReqId,
        replicas: Replicas,
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
        replicas: Replicas,
        reason: PreemptReason,
    },
}

/// Where an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Queued,
    Running,
}

/// One request or job, queued or running, in the router's slab. Queues and replicas refer to items
/// by slab index, so moving work between queue and replica never moves or re-hashes it. The fields
/// every decision reads come first and fill the first cache line (`repr(C)` keeps that order).
#[repr(C, align(64))]
struct Item {
    state: State,
    band: u8,
    preemptible: bool,
    /// Dense tenant and model indexes.
    tix: u32,
    mix: u32,
    output_done: u32,
    id: ReqId,
    seq: u64,
    arrived_ms: i64,
    expires_ms: i64,
    gpus: f64,
    /// Running with one slot: its replica index.
    slot0: u32,
    // Second line.
    started_ms: i64,
    /// KV-cache tokens it holds: prompt plus most output tokens.
    kv: u64,
    /// Deadline, `i64::MAX` for none.
    deadline_ms: i64,
    restart_cost: f64,
    /// Running with several slots (a gang): one replica index per slot (a replica's entries are
    /// adjacent). Kept allocated while the item is queued or free.
    slots: Vec<u32>,
    prompt_tokens: u32,
    gang: u32,
}

// Two cache lines.
const _: () = assert!(std::mem::size_of::<Item>() == 128);

impl Item {
    fn kv(&self) -> u64 {
        self.kv
    }

    /// The replica index of every slot it holds while running.
    fn slot_list(&self) -> &[u32] {
        if self.gang == 1 { std::slice::from_ref(&self.slot0) } else { &self.slots }
    }

    fn set_work(&mut self, w: &Work) {
        self.id = w.id;
        self.band = w.band;
        self.preemptible = w.preemptible;
        self.kv = u64::from(w.prompt_tokens) + u64::from(w.max_output_tokens);
        self.deadline_ms = w.deadline_ms.unwrap_or(i64::MAX);
        self.restart_cost = w.restart_cost;
        self.prompt_tokens = w.prompt_tokens;
        self.gang = w.gang;
    }
}

/// What choosing a victim needs of each item running on a replica, kept beside the replica so that
/// a shrink reads one array instead of every item.
#[derive(Clone, Copy)]
struct RunMeta {
    tix: u32,
    band: u8,
    /// Slots the item holds on this replica (1 unless a gang placed several here).
    here: u16,
    started_ms: i64,
}

/// A candidate victim of a capacity shrink and its order keys (see `fit_replica`).
#[derive(Clone, Copy)]
struct Victim {
    /// Not young, lowest band, most over its guarantee: the keys that need no item.
    head: u64,
    restart: i64,
    /// Milliseconds running (newest first).
    age: i64,
    id: ReqId,
    here: u16,
    ix: u32,
}

/// Bound of the packed "over its guarantee" key (micro-GPUs per unit weight): 2^47.
const OVER_RANGE: f64 = 140_737_488_355_328.0;

struct Replica {
    spec: ReplicaSpec,
    mix: u32,
    live: bool,
    /// Takes no new work; what runs here goes on (a backend that failed a request, held out of
    /// placement until its health check passes).
    cordoned: bool,
    used_slots: u32,
    kv_used: u64,
    /// Items running here (one entry per item, whatever its slots) and, in step, their metadata.
    run_ix: Vec<u32>,
    run_meta: Vec<RunMeta>,
    /// Key in the model's free index, if it has room: (saturation, replica id, index).
    key: Option<(u32, u32, u32)>,
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

/// One tenant's queued work on a (model, band): (deadline, arrival sequence) and item index, sorted.
type TenantQueue = VecDeque<((i64, u64), u32)>;

/// Backlog of one (model, band): tenants ordered by virtual counter.
#[derive(Default)]
struct BandQueue {
    /// (counter bits, tenant index, its queue in `Router::queues`): the queue rides in the key's
    /// padding, so serving the head reads no tenant record.
    order: BTreeSet<(u64, u32, u32)>,
    len: usize,
}

struct TenantState {
    spec: TenantSpec,
    usage_gpus: f64,
}

/// A tenant's state in one band (`Router::tband[tenant * bands + band]`, flat so that one access
/// touches one place). Aligned so that the counter and the queue list share one cache line.
#[derive(Default)]
#[repr(C, align(32))]
struct TenantBand {
    /// Virtual token counter.
    counter: f64,
    /// Where the tenant has queued work in this band: (model index, its queue in `Router::queues`).
    waiting_in: SmallVec<[(u32, u32); 2]>,
    stats: crate::metrics::TenantStats,
}

struct ModelState {
    id: ModelId,
    replicas: BTreeSet<u32>,
    free: BTreeSet<(u32, u32, u32)>,
    bands: Vec<BandQueue>,
    /// Bit b set when band b has queued work (the band choice is O(1)).
    nonempty: u32,
    turn: u32,
    max_kv: u64,
    total_slots: u64,
}

/// One tenant's capacity against what it is owed (`Router::shares`).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantShare {
    pub tenant: TenantId,
    pub weight: f64,
    /// GPUs its running work holds.
    pub usage_gpus: f64,
    pub guaranteed_gpus: f64,
    /// Usage above the guarantee.
    pub borrowed_gpus: f64,
    /// Its guarantee plus its weighted part of the capacity not guaranteed to active tenants,
    /// capped by guarantee plus borrowing limit; 0 when it has neither queued nor running work.
    pub entitled_gpus: f64,
    /// Borrowed GPUs over the lendable capacity, divided by the weight (Kueue's fair-sharing share;
    /// with one resource the dominant share is this one).
    pub weighted_borrowed_share: f64,
    pub active: bool,
}

/// Tenants looked at past the first borrowing candidate when choosing whose borrowing request goes
/// on free capacity (see `dispatch_one`).
const BORROW_LOOKAHEAD: u32 = 8;

/// An invariant of the router's own state that does not hold (a bug, never a bad input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("router state out of step: {0}")]
pub struct OutOfStep(pub String);

/// The router.
pub struct Router {
    cfg: RouterConfig,
    tenants: Vec<TenantState>,
    tband: Vec<TenantBand>,
    /// Bands (a copy of `cfg.bands`).
    nb: usize,
    tenant_ix: FastMap<TenantId, u32>,
    models: Vec<ModelState>,
    model_ix: FastMap<ModelId, u32>,
    reps: Vec<Replica>,
    rep_ix: FastMap<ReplicaId, u32>,
    items: Vec<Item>,
    free_items: Vec<u32>,
    ids: FastMap<ReqId, u32>,
    queued: usize,
    running: usize,
    /// Whether any tenant has a guarantee (else no reclaim can ever happen and nobody borrows
    /// beyond anyone's due: every use is of the shared pool, and VTC orders it).
    any_guarantee: bool,
    /// While fitting a replica, placement-index updates wait here and run once at the end.
    deferred: Option<Vec<u32>>,
    /// Per band, expiry times of queued work in order (every entry is `now + ttl` of its band and
    /// `now` never goes back); entries of work that has left the queue are skipped when reached.
    expiry: Vec<VecDeque<(i64, u32, ReqId)>>,
    band_len: Vec<usize>,
    /// Tenant queues, referred to from `TenantBand::waiting_in`; emptied ones are reused.
    queues: Vec<TenantQueue>,
    free_queues: Vec<u32>,
    /// Each tenant queue's key in its band's backlog order. Counters only rise, and a charge does
    /// not re-key the order at once: a stored key is at most the tenant's current one, and an
    /// entry is re-keyed when a walk of the order reaches it (`order_next`), so the walk sees the
    /// order by current counters.
    qkey: Vec<u64>,
    /// Scratch for placements, victims and deferred index updates.
    place_buf: Vec<u32>,
    victim_buf: Vec<Victim>,
    victim_keys: Vec<u128>,
    /// While a capacity change runs, its preempted work (tenant, band, item) waits here.
    requeue: Option<Vec<(u32, u8, u32)>>,
    requeue_buf: Vec<(u32, u8, u32)>,
    deferred_buf: Vec<u32>,
    seq: u64,
    /// Latest time seen; inputs with an earlier time are taken as happening now.
    now: i64,
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
    pub fn new(cfg: RouterConfig) -> Result<Self, Invalid> {
        cfg.validate()?;
        // Room for a large backlog up front, so a burst of re-queued work does not rehash.
        let reserve = cfg.queue_cap_total.min(1 << 16);
        Ok(Router {
            band_len: vec![0; cfg.bands],
            nb: cfg.bands,
            expiry: vec![VecDeque::new(); cfg.bands],
            metrics: Metrics::new(cfg.bands),
            cfg,
            tenants: Vec::new(),
            tband: Vec::new(),
            tenant_ix: FastMap::default(),
            models: Vec::new(),
            model_ix: FastMap::default(),
            reps: Vec::new(),
            rep_ix: FastMap::default(),
            items: Vec::with_capacity(reserve),
            free_items: Vec::new(),
            ids: FastMap::with_capacity_and_hasher(reserve, Default::default()),
            queued: 0,
            running: 0,
            any_guarantee: false,
            deferred: None,
            queues: Vec::new(),
            free_queues: Vec::new(),
            qkey: Vec::new(),
            place_buf: Vec::new(),
            victim_buf: Vec::new(),
            victim_keys: Vec::new(),
            requeue: None,
            requeue_buf: Vec::new(),
            deferred_buf: Vec::new(),
            seq: 0,
            now: i64::MIN,
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    fn advance(&mut self, now_ms: i64) -> i64 {
        self.now = self.now.max(now_ms);
        self.now
    }

    pub fn add_tenant(&mut self, spec: TenantSpec) -> Result<(), Invalid> {
        if !(spec.weight.is_finite() && spec.weight > 0.0) {
            return Err(Invalid::new("weight", "must be a finite number > 0"));
        }
        if !(spec.guaranteed_gpus >= 0.0 && spec.borrow_limit_gpus >= 0.0) {
            let field = if spec.guaranteed_gpus >= 0.0 { "borrow_limit_gpus" } else { "guaranteed_gpus" };
            return Err(Invalid::new(field, "must be >= 0"));
        }
        if let Some(&t) = self.tenant_ix.get(&spec.id) {
            self.any_guarantee |= spec.guaranteed_gpus > 0.0;
            self.tenants[t as usize].spec = spec;
            return Ok(());
        }
        if self.tenants.len() >= MAX_TENANTS {
            return Err(Invalid::new("id", format!("at most {MAX_TENANTS} tenants")));
        }
        self.any_guarantee |= spec.guaranteed_gpus > 0.0;
        let bands = self.cfg.bands;
        self.tenant_ix.insert(spec.id, self.tenants.len() as u32);
        self.tenants.push(TenantState { spec, usage_gpus: 0.0 });
        // Room for two models per band up front: a tenant waiting on a model allocates nothing.
        self.tband.extend((0..bands).map(|_| TenantBand::default()));
        Ok(())
    }

    pub fn queued_len(&self) -> usize {
        self.queued
    }

    pub fn running_len(&self) -> usize {
        self.running
    }

    fn item_of(&self, id: ReqId) -> Option<&Item> {
        self.ids.get(&id).map(|&ix| &self.items[ix as usize])
    }

    /// Whether a request is queued (Some(false)), running (Some(true)) or unknown (None).
    pub fn is_running(&self, id: ReqId) -> Option<bool> {
        self.item_of(id).map(|it| it.state == State::Running)
    }

    pub fn tenant_usage_gpus(&self, t: TenantId) -> f64 {
        self.tenant_ix.get(&t).map_or(0.0, |&x| self.tenants[x as usize].usage_gpus)
    }

    fn replica(&self, r: ReplicaId) -> Option<&Replica> {
        self.rep_ix.get(&r).map(|&x| &self.reps[x as usize]).filter(|x| x.live)
    }

    /// Slots in use and slots of a replica.
    pub fn replica_load(&self, r: ReplicaId) -> Option<(u32, u32)> {
        self.replica(r).map(|x| (x.used_slots, x.spec.slots))
    }

    /// Running work per replica, for checks.
    pub fn running_on(&self, r: ReplicaId) -> Vec<ReqId> {
        let mut v: Vec<ReqId> = self
            .replica(r)
            .map(|x| x.run_ix.iter().map(|&ix| self.items[ix as usize].id).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn reindex(&mut self, rix: u32) {
        let rep = &mut self.reps[rix as usize];
        let m = &mut self.models[rep.mix as usize];
        if let Some(k) = rep.key.take() {
            m.free.remove(&k);
        }
        if rep.live && !rep.cordoned && rep.used_slots < rep.spec.slots && rep.kv_used < rep.spec.kv_tokens {
            let k = (rep.score(), rep.spec.id.0, rix);
            m.free.insert(k);
            rep.key = Some(k);
        }
    }

    fn model_index(&mut self, model: ModelId) -> u32 {
        if let Some(&m) = self.model_ix.get(&model) {
            return m;
        }
        let m = self.models.len() as u32;
        self.model_ix.insert(model, m);
        self.models.push(ModelState {
            id: model,
            replicas: BTreeSet::new(),
            free: BTreeSet::new(),
            bands: (0..self.cfg.bands).map(|_| BandQueue::default()).collect(),
            nonempty: 0,
            turn: 0,
            max_kv: 0,
            total_slots: 0,
        });
        m
    }

    /// Adds or resizes a replica. Shrinking below its running work preempts victims.
    pub fn set_replica(&mut self, spec: ReplicaSpec, now_ms: i64, out: &mut Vec<Decision>) -> Result<(), Invalid> {
        self.set_replicas(&[spec], now_ms, out)
    }

    /// Adds or resizes many replicas at once (a plan's new capacity): each is fitted, then every
    /// affected model's capacity is recounted and its queue served once. A bad spec is named and
    /// nothing changes.
    pub fn set_replicas(&mut self, specs: &[ReplicaSpec], now_ms: i64, out: &mut Vec<Decision>) -> Result<(), Invalid> {
        for spec in specs {
            if spec.gpus == 0 || spec.kv_tokens == 0 {
                let field = if spec.gpus == 0 { "gpus" } else { "kv_tokens" };
                return Err(Invalid::new(format!("replica[{}].{field}", spec.id.0), "must be > 0"));
            }
            if let Some(old) = self.replica(spec.id)
                && old.spec.model != spec.model
            {
                return Err(Invalid::new(
                    format!("replica[{}].model", spec.id.0),
                    "cannot change; remove the replica first",
                ));
            }
        }
        let now = self.advance(now_ms);
        let mut models = BTreeSet::new();
        self.begin_requeue();
        for &spec in specs {
            let id = spec.id;
            let mix = self.model_index(spec.model);
            let rix = match self.rep_ix.get(&id) {
                Some(&rix) => {
                    let rep = &mut self.reps[rix as usize];
                    rep.spec = spec;
                    rep.mix = mix;
                    rep.live = true;
                    rix
                }
                None => {
                    let rix = self.reps.len() as u32;
                    self.rep_ix.insert(id, rix);
                    self.reps.push(Replica {
                        spec,
                        mix,
                        live: true,
                        cordoned: false,
                        used_slots: 0,
                        kv_used: 0,
                        run_ix: Vec::new(),
                        run_meta: Vec::new(),
                        key: None,
                    });
                    rix
                }
            };
            self.models[mix as usize].replicas.insert(rix);
            models.insert(mix);
            self.fit_replica(rix, now, out);
            self.reindex(rix);
        }
        self.end_requeue(now);
        for m in models {
            self.refresh_capacity(m);
            self.pump(m, now, out);
        }
        Ok(())
    }

    /// Resizes many replicas at once (a curtailment across a site): every replica is fitted first,
    /// then each affected model's queue is served once.
    pub fn resize_many(&mut self, sizes: &[(ReplicaId, u32)], now_ms: i64, out: &mut Vec<Decision>) {
        let now = self.advance(now_ms);
        let mut models = BTreeSet::new();
        self.begin_requeue();
        for &(id, slots) in sizes {
            let Some(&rix) = self.rep_ix.get(&id) else { continue };
            let rep = &mut self.reps[rix as usize];
            if !rep.live {
                continue;
            }
            rep.spec.slots = slots;
            models.insert(rep.mix);
            self.fit_replica(rix, now, out);
            self.reindex(rix);
        }
        self.end_requeue(now);
        for m in models {
            self.refresh_capacity(m);
            self.pump(m, now, out);
        }
    }

    /// Holds a replica out of new placements (`on`), or returns it. Unlike a resize to zero, the
    /// work running on it is not preempted: a backend that failed one request before its first
    /// byte may still be serving others. Returning it serves its model's queue. False when the
    /// replica is unknown or already so.
    pub fn cordon(&mut self, id: ReplicaId, on: bool, now_ms: i64, out: &mut Vec<Decision>) -> bool {
        let now = self.advance(now_ms);
        let Some(&rix) = self.rep_ix.get(&id) else { return false };
        let rep = &mut self.reps[rix as usize];
        if rep.cordoned == on {
            return false;
        }
        rep.cordoned = on;
        let mix = rep.mix;
        self.reindex(rix);
        if !on {
            self.pump(mix, now, out);
        }
        true
    }

    /// Whether a replica is held out of new placements.
    pub fn is_cordoned(&self, id: ReplicaId) -> bool {
        self.rep_ix.get(&id).is_some_and(|&x| self.reps[x as usize].cordoned)
    }

    /// Removes a replica (node loss, curtailment): its work is preempted back to the queue.
    pub fn remove_replica(&mut self, id: ReplicaId, now_ms: i64, out: &mut Vec<Decision>) {
        let now = self.advance(now_ms);
        let Some(&rix) = self.rep_ix.get(&id) else { return };
        if !self.reps[rix as usize].live {
            return;
        }
        self.reps[rix as usize].spec.slots = 0;
        self.begin_requeue();
        self.fit_replica(rix, now, out);
        self.end_requeue(now);
        self.reps[rix as usize].live = false;
        self.reindex(rix);
        let mix = self.reps[rix as usize].mix;
        self.models[mix as usize].replicas.remove(&rix);
        self.refresh_capacity(mix);
        self.pump(mix, now, out);
    }

    fn refresh_capacity(&mut self, mix: u32) {
        let m = &mut self.models[mix as usize];
        let reps = m.replicas.iter().map(|&r| &self.reps[r as usize]);
        m.max_kv = reps.clone().map(|r| r.spec.kv_tokens).max().unwrap_or(0);
        m.total_slots = reps.map(|r| u64::from(r.spec.slots)).sum();
    }

    /// Preempts work on a replica until its running work fits its slots: lowest band first, then the
    /// tenant most over its weighted guarantee, then the cheapest to restart, then the newest; work
    /// younger than the minimum runtime only when nothing else can go. Gangs go whole.
    fn fit_replica(&mut self, rix: u32, now_ms: i64, out: &mut Vec<Decision>) {
        let rep = &self.reps[rix as usize];
        if rep.used_slots <= rep.spec.slots {
            return;
        }
        // Order: not young first, lowest band, most over its weighted guarantee, cheapest restart,
        // newest, id. Only the order of the group the cut falls in changes which items go, so the
        // keys that need the item (restart cost, id) are read only there; groups wholly taken go
        // newest first.
        let mut deficit = i64::from(rep.used_slots - rep.spec.slots);
        out.reserve(deficit as usize);
        // One packed key per candidate: [not young][lowest band][most over][newest][position],
        // so the sort compares integers and reads no item.
        let mut keys = std::mem::take(&mut self.victim_keys);
        keys.clear();
        keys.extend(rep.run_meta.iter().enumerate().map(|(p, e)| {
            let t = &self.tenants[e.tix as usize];
            let over = -((t.usage_gpus - t.spec.guaranteed_gpus) / t.spec.weight * 1e6);
            let over = (over.clamp(-OVER_RANGE, OVER_RANGE - 1.0) as i64 + OVER_RANGE as i64) as u128;
            let young = u128::from(now_ms - e.started_ms < self.cfg.min_runtime_ms);
            let age = (now_ms - e.started_ms).clamp(0, (1 << 39) - 1) as u128;
            young << 127 | u128::from(u8::MAX - e.band) << 119 | over << 71 | age << 32 | p as u128
        }));
        keys.sort_unstable();
        let mut victims = std::mem::take(&mut self.victim_buf);
        victims.clear();
        victims.extend(keys.iter().map(|&k| {
            let p = k as u32 as usize;
            let (head, age) = ((k >> 71) as u64, (k >> 32) as i64 & ((1 << 39) - 1));
            Victim { head, restart: 0, age, id: 0, here: rep.run_meta[p].here, ix: rep.run_ix[p] }
        }));
        self.victim_keys = keys;
        let mut i = 0;
        while i < victims.len() && deficit > 0 {
            let head = victims[i].head;
            let mut j = i;
            let mut group = 0i64;
            while j < victims.len() && victims[j].head == head {
                group += i64::from(victims[j].here);
                j += 1;
            }
            if group > deficit && j - i > 1 {
                for v in &mut victims[i..j] {
                    let it = &self.items[v.ix as usize];
                    v.restart = ((it.restart_cost + f64::from(it.output_done)) * 1e3) as i64;
                    v.id = it.id;
                }
                victims[i..j].sort_unstable_by_key(|v| (v.restart, v.age, v.id));
            }
            deficit -= group;
            i = j;
        }
        // The victims' records are scattered: ask for all of them before the first is needed.
        for v in &victims[..i] {
            prefetch(&self.items[v.ix as usize]);
        }
        self.deferred = Some(std::mem::take(&mut self.deferred_buf));
        for v in &victims {
            let rep = &self.reps[rix as usize];
            if rep.used_slots <= rep.spec.slots {
                break;
            }
            if self.items[v.ix as usize].state == State::Running {
                let id = rep.spec.id;
                self.preempt(v.ix, PreemptReason::CapacityShrink { replica: id }, now_ms, out);
            }
        }
        self.victim_buf = victims;
        let mut touched = self.deferred.take().unwrap_or_default();
        touched.sort_unstable();
        touched.dedup();
        for &r in &touched {
            self.reindex(r);
        }
        touched.clear();
        self.deferred_buf = touched;
    }

    /// The distinct replica ids of a slot list (a replica's entries are adjacent).
    fn replica_ids(&self, slots: &[u32]) -> Replicas {
        if slots.iter().all(|&r| r == slots[0]) {
            return Replicas::One(self.reps[slots[0] as usize].spec.id);
        }
        let mut v = Vec::with_capacity(slots.len());
        for (k, &r) in slots.iter().enumerate() {
            if k == 0 || slots[k - 1] != r {
                v.push(self.reps[r as usize].spec.id);
            }
        }
        Replicas::Many(v)
    }

    fn preempt(&mut self, ix: u32, reason: PreemptReason, now_ms: i64, out: &mut Vec<Decision>) {
        let replicas = self.replica_ids(self.items[ix as usize].slot_list());
        self.release(ix);
        let it = &self.items[ix as usize];
        let (band, tix, id) = (it.band, it.tix, it.id);
        self.metrics.preempted(band, &reason);
        out.push(Decision::Preempt { id, replicas, reason });
        match self.requeue.as_mut() {
            Some(batch) => batch.push((tix, band, ix)),
            None => self.requeue_one(tix, band, ix, now_ms),
        }
    }

    /// Puts preempted work back in line at its original place (same sequence), with its service
    /// kept (the VTC is not refunded).
    fn requeue_one(&mut self, tix: u32, band: u8, ix: u32, now_ms: i64) {
        self.tband[tix as usize * self.nb + usize::from(band)].stats.preempted += 1;
        self.enqueue(ix, now_ms + self.cfg.ttl_ms[usize::from(band)]);
    }

    /// During a capacity change, preempted work is re-queued once every replica is fitted, in
    /// tenant order (neighbouring memory), before any queue is served.
    fn begin_requeue(&mut self) {
        self.requeue = Some(std::mem::take(&mut self.requeue_buf));
    }

    fn end_requeue(&mut self, now_ms: i64) {
        let Some(mut batch) = self.requeue.take() else { return };
        batch.sort_unstable();
        // The records are scattered: ask for them a few items ahead (a hint, no effect on results).
        const AHEAD: usize = 8;
        for k in 0..batch.len() {
            if let Some(&(tix, band, ix)) = batch.get(k + AHEAD) {
                prefetch(&self.items[ix as usize]);
                prefetch(&self.tband[tix as usize * self.nb + usize::from(band)]);
            }
            let (tix, band, ix) = batch[k];
            self.requeue_one(tix, band, ix, now_ms);
        }
        batch.clear();
        self.requeue_buf = batch;
    }

    /// Frees the capacity a running item holds.
    fn release(&mut self, ix: u32) {
        let it = &mut self.items[ix as usize];
        let (kv, tix, gpus) = (it.kv(), it.tix, it.gpus);
        let many = std::mem::take(&mut it.slots);
        let one = [it.slot0];
        let slots: &[u32] = if it.gang == 1 { &one } else { &many };
        for (k, &r) in slots.iter().enumerate() {
            let rep = &mut self.reps[r as usize];
            rep.used_slots -= 1;
            rep.kv_used -= kv;
            if k > 0 && slots[k - 1] == r {
                continue;
            }
            if let Some(p) = rep.run_ix.iter().position(|&x| x == ix) {
                rep.run_ix.swap_remove(p);
                rep.run_meta.swap_remove(p);
            }
            if let Some(d) = self.deferred.as_mut() {
                d.push(r);
            } else {
                self.reindex(r);
            }
        }
        let t = &mut self.tenants[tix as usize];
        t.usage_gpus = (t.usage_gpus - gpus).max(0.0);
        let it = &mut self.items[ix as usize];
        it.slots = many;
        it.slots.clear();
        it.state = State::Free;
        self.running -= 1;
    }

    /// Puts an item (new, or preempted) in its tenant's queue on its model and band.
    fn enqueue(&mut self, ix: u32, expires_ms: i64) {
        let it = &mut self.items[ix as usize];
        it.state = State::Queued;
        it.expires_ms = expires_ms;
        let (tix, mix, band, id) = (it.tix, it.mix, usize::from(it.band), it.id);
        let order_key = (it.deadline_ms, it.seq);
        // A tenant becoming backlogged again is lifted to the least counter among the backlogged,
        // so that idleness banks no credit.
        let tb = tix as usize * self.nb + band;
        let q = match self.tband[tb].waiting_in.iter().find(|w| w.0 == mix) {
            Some(&(_, q)) => q,
            None => {
                if let Some((k, _, _)) = self.order_next(mix, band, None)
                    && f64::from_bits(k) > self.tband[tb].counter
                {
                    self.set_counter(tix, band, f64::from_bits(k));
                }
                let q = match self.free_queues.pop() {
                    Some(q) => q,
                    None => {
                        self.queues.push(TenantQueue::new());
                        self.qkey.push(0);
                        (self.queues.len() - 1) as u32
                    }
                };
                self.tband[tb].waiting_in.push((mix, q));
                let k = key(self.tband[tb].counter);
                self.qkey[q as usize] = k;
                self.models[mix as usize].bands[band].order.insert((k, tix, q));
                q
            }
        };
        let m = &mut self.models[mix as usize];
        let bq = &mut m.bands[band];
        let tq = &mut self.queues[q as usize];
        // New work usually goes last; preempted work returns near the front (its old place).
        if tq.back().is_none_or(|e| e.0 < order_key) {
            tq.push_back((order_key, ix));
        } else {
            let at = tq.partition_point(|e| e.0 < order_key);
            tq.insert(at, (order_key, ix));
        }
        bq.len += 1;
        m.nonempty |= 1 << band;
        self.band_len[band] += 1;
        self.queued += 1;
        let ex = &mut self.expiry[band];
        ex.push_back((expires_ms, ix, id));
        // Entries of work that left the queue wait for their time; compact when they dominate.
        if ex.len() > 2 * self.band_len[band] + 4_096 {
            let items = &self.items;
            ex.retain(|&(t, ix, id)| {
                let it = &items[ix as usize];
                it.state == State::Queued && it.id == id && it.expires_ms == t
            });
        }
    }

    /// Takes a queued item out of its queue (the caller gives it its next state).
    fn unqueue(&mut self, ix: u32) {
        let it = &self.items[ix as usize];
        debug_assert_eq!(it.state, State::Queued);
        let (tix, mix, band) = (it.tix, it.mix, usize::from(it.band));
        let k = (it.deadline_ms, it.seq);
        let tb = &mut self.tband[tix as usize * self.nb + band];
        let w = tb.waiting_in.iter().position(|w| w.0 == mix).expect("tenant queue");
        let q = tb.waiting_in[w].1;
        let m = &mut self.models[mix as usize];
        let bq = &mut m.bands[band];
        let tq = &mut self.queues[q as usize];
        if tq.front().is_some_and(|e| e.1 == ix) {
            tq.pop_front();
        } else {
            let at = tq.partition_point(|e| e.0 < k);
            debug_assert_eq!(tq.get(at).map(|e| e.1), Some(ix));
            tq.remove(at);
        }
        if tq.is_empty() {
            if tq.capacity() > 64 {
                *tq = TenantQueue::new();
            }
            self.free_queues.push(q);
            bq.order.remove(&(self.qkey[q as usize], tix, q));
            tb.waiting_in.swap_remove(w);
        }
        bq.len -= 1;
        if bq.len == 0 {
            m.nonempty &= !(1 << band);
        }
        self.band_len[band] -= 1;
        self.queued -= 1;
        self.items[ix as usize].state = State::Free;
    }

    fn alloc(&mut self, work: &Work, tix: u32, mix: u32, arrived_ms: i64) -> u32 {
        self.seq += 1;
        let ix = match self.free_items.pop() {
            Some(ix) => ix,
            None => {
                self.items.push(Item {
                    state: State::Free,
                    band: 0,
                    preemptible: false,
                    tix: 0,
                    mix: 0,
                    output_done: 0,
                    id: 0,
                    seq: 0,
                    arrived_ms: 0,
                    expires_ms: 0,
                    gpus: 0.0,
                    slot0: 0,
                    started_ms: 0,
                    kv: 0,
                    deadline_ms: 0,
                    restart_cost: 0.0,
                    slots: Vec::new(),
                    prompt_tokens: 0,
                    gang: 0,
                });
                (self.items.len() - 1) as u32
            }
        };
        let it = &mut self.items[ix as usize];
        it.set_work(work);
        it.tix = tix;
        it.mix = mix;
        it.seq = self.seq;
        it.arrived_ms = arrived_ms;
        it.output_done = 0;
        it.gpus = 0.0;
        self.ids.insert(work.id, ix);
        ix
    }

    /// Forgets an item that has left the router (completed or rejected).
    fn dealloc(&mut self, ix: u32) {
        let it = &mut self.items[ix as usize];
        it.state = State::Free;
        self.ids.remove(&it.id);
        self.free_items.push(ix);
    }

    /// A new request or job.
    pub fn arrive(&mut self, w: Work, now_ms: i64, out: &mut Vec<Decision>) {
        let now = self.advance(now_ms);
        let id = w.id;
        let Some(&tix) = self.tenant_ix.get(&w.tenant) else {
            out.push(Decision::Reject { id, reason: RejectReason::UnknownTenant });
            return;
        };
        // The records this arrival will touch, asked for together while it is validated.
        if usize::from(w.band) < self.nb {
            prefetch(&self.tband[tix as usize * self.nb + usize::from(w.band)]);
        }
        if let Some(&ix) = self.free_items.last() {
            prefetch(&self.items[ix as usize]);
        }
        let why = if usize::from(w.band) >= self.cfg.bands {
            Some("band: beyond the configured bands")
        } else if w.gang == 0 {
            Some("gang: must be >= 1")
        } else if self.ids.contains_key(&id) {
            Some("id: already admitted")
        } else {
            None
        };
        if let Some(why) = why {
            out.push(Decision::Reject { id, reason: RejectReason::Invalid(why.into()) });
            return;
        }
        let kv = u64::from(w.prompt_tokens + w.max_output_tokens);
        let mix = self.model_ix.get(&w.model).copied();
        // Every replica of the model out of service (its GPUs idle or shed by the power plan) is
        // not "never": the work waits in its queue (its time-to-live bounds the wait), and the
        // waiting is the demand that brings the GPUs back.
        let Some(mix) = mix.filter(|&m| {
            let m = &self.models[m as usize];
            (m.max_kv >= kv && m.total_slots >= u64::from(w.gang)) || (m.total_slots == 0 && !m.replicas.is_empty())
        }) else {
            out.push(Decision::Reject { id, reason: RejectReason::NeverFits });
            return;
        };
        let band = usize::from(w.band);
        let total_full = self.queued >= self.cfg.queue_cap_total;
        if self.band_len[band] >= self.cfg.queue_cap[band] || (total_full && !self.displace(band, out)) {
            out.push(Decision::Reject { id, reason: RejectReason::QueueFull { band: w.band } });
            return;
        }
        self.metrics.arrived(w.band);
        let ix = self.alloc(&w, tix, mix, now);
        self.enqueue(ix, now + self.cfg.ttl_ms[band]);
        self.pump(mix, now, out);
        if self.items[ix as usize].state == State::Queued {
            out.push(Decision::Queue { id });
        }
    }

    /// Makes room in a full queue by displacing the newest work of a lower band (lowest first).
    fn displace(&mut self, band: usize, out: &mut Vec<Decision>) -> bool {
        for lower in (band + 1..self.cfg.bands).rev() {
            if self.band_len[lower] == 0 {
                continue;
            }
            let newest = (0..self.items.len() as u32)
                .filter(|&ix| {
                    let it = &self.items[ix as usize];
                    it.state == State::Queued && usize::from(it.band) == lower
                })
                .max_by_key(|&ix| (self.items[ix as usize].seq, self.items[ix as usize].id));
            if let Some(ix) = newest {
                let id = self.items[ix as usize].id;
                self.unqueue(ix);
                self.dealloc(ix);
                self.metrics.rejected(lower as u8);
                out.push(Decision::Reject { id, reason: RejectReason::Displaced });
                return true;
            }
        }
        false
    }

    /// Token progress of running work: charges its tenant's counter for output tokens.
    pub fn progress(&mut self, id: ReqId, output_tokens: u32, now_ms: i64) {
        let now = self.advance(now_ms);
        if let Some(&ix) = self.ids.get(&id) {
            self.progress_ix(ix, output_tokens, now);
        }
    }

    fn progress_ix(&mut self, ix: u32, output_tokens: u32, now: i64) {
        let it = &mut self.items[ix as usize];
        if it.state != State::Running {
            return;
        }
        let add = output_tokens.saturating_sub(it.output_done);
        let (tix, band) = (it.tix, usize::from(it.band));
        let first = it.output_done == 0 && add > 0;
        it.output_done = it.output_done.max(output_tokens);
        let waited = now - it.arrived_ms;
        if first {
            self.metrics.first_token(band as u8, waited);
        }
        let st = &mut self.tband[tix as usize * self.nb + band].stats;
        if first {
            st.first_tokens += 1;
            st.ttft_ms_sum += waited as f64;
        }
        st.output_tokens += u64::from(add);
        if add > 0 {
            self.charge(tix, band, f64::from(add) * self.cfg.output_weight);
        }
    }

    fn charge(&mut self, tix: u32, band: usize, cost: f64) {
        let new = self.tband[tix as usize * self.nb + band].counter + cost / self.tenants[tix as usize].spec.weight;
        self.set_counter(tix, band, new);
    }

    /// Raises a tenant's virtual counter in a band (counters never fall). The backlog orders it
    /// waits in are re-keyed lazily, by [`Router::order_next`].
    fn set_counter(&mut self, tix: u32, band: usize, new: f64) {
        let t = &mut self.tband[tix as usize * self.nb + band];
        debug_assert!(new >= t.counter, "a counter never falls");
        t.counter = new;
    }

    /// The first entry of a model's band's backlog order after `after` (from the start: None) by
    /// current counters. Entries met on the way whose stored key fell behind their tenant's counter
    /// move to their place first. Every entry before the one returned is current, so a walk from
    /// the start sees exactly the order a fully re-keyed set would have.
    fn order_next(&mut self, mix: u32, band: usize, after: Option<(u64, u32, u32)>) -> Option<(u64, u32, u32)> {
        loop {
            let o = &mut self.models[mix as usize].bands[band].order;
            let e = *match after {
                None => o.first(),
                Some(c) => o.range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)).next(),
            }?;
            let cur = key(self.tband[e.1 as usize * self.nb + band].counter);
            if cur == e.0 {
                return Some(e);
            }
            o.remove(&e);
            o.insert((cur, e.1, e.2));
            self.qkey[e.2 as usize] = cur;
        }
    }

    /// Work finished (or failed at the backend): its capacity frees.
    pub fn complete(&mut self, id: ReqId, output_tokens: u32, now_ms: i64, out: &mut Vec<Decision>) {
        let now = self.advance(now_ms);
        let Some(&ix) = self.ids.get(&id) else { return };
        let it = &self.items[ix as usize];
        if it.state != State::Running {
            return;
        }
        // Ask for the tenant's two records together rather than one after the other.
        prefetch(&self.tband[it.tix as usize * self.nb + usize::from(it.band)]);
        prefetch(&self.tenants[it.tix as usize]);
        self.progress_ix(ix, output_tokens, now);
        self.release(ix);
        let it = &self.items[ix as usize];
        let (tix, band, mix) = (it.tix, usize::from(it.band), it.mix);
        self.tband[tix as usize * self.nb + band].stats.completed += 1;
        self.dealloc(ix);
        self.pump(mix, now, out);
    }

    /// The client went away or cancelled: queued work leaves its queue, running work frees its
    /// capacity (which the queue may take at once). Unknown ids are ignored. Returns whether it
    /// was known.
    pub fn cancel(&mut self, id: ReqId, now_ms: i64, out: &mut Vec<Decision>) -> bool {
        let now = self.advance(now_ms);
        let Some(&ix) = self.ids.get(&id) else { return false };
        let it = &self.items[ix as usize];
        let mix = it.mix;
        match it.state {
            State::Queued => {
                self.unqueue(ix);
                self.dealloc(ix);
            }
            State::Running => {
                self.release(ix);
                self.dealloc(ix);
                self.pump(mix, now, out);
            }
            State::Free => return false,
        }
        true
    }

    /// Time passes: queued work past its time-to-live is rejected.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Decision>) {
        let now = self.advance(now_ms);
        for band in 0..self.cfg.bands {
            while let Some(&(t, ix, id)) = self.expiry[band].front() {
                if t > now {
                    break;
                }
                self.expiry[band].pop_front();
                // Only work still queued with this expiry (not dispatched, or re-queued since).
                let it = &self.items[ix as usize];
                if it.state == State::Queued && it.id == id && it.expires_ms == t {
                    self.unqueue(ix);
                    self.dealloc(ix);
                    self.metrics.rejected(band as u8);
                    out.push(Decision::Reject { id, reason: RejectReason::Expired });
                }
            }
        }
    }

    /// Which band gets the next decision on a model: the highest backlogged, except one decision in
    /// `floor_every`, which goes to the lower backlogged bands in turn.
    fn pick_band(&self, mix: u32) -> Option<usize> {
        let m = &self.models[mix as usize];
        if m.nonempty == 0 {
            return None;
        }
        let top = m.nonempty.trailing_zeros() as usize;
        let turn = m.turn.wrapping_add(1);
        if turn.is_multiple_of(self.cfg.floor_every) {
            let mut lower = m.nonempty & !((2u32 << top) - 1);
            let n = lower.count_ones();
            if n > 0 {
                for _ in 0..(turn / self.cfg.floor_every) % n {
                    lower &= lower - 1;
                }
                return Some(lower.trailing_zeros() as usize);
            }
        }
        Some(top)
    }

    /// Dispatches queued work on a model while capacity and quota allow.
    fn pump(&mut self, mix: u32, now_ms: i64, out: &mut Vec<Decision>) {
        if self.models[mix as usize].free.is_empty() && !self.any_guarantee {
            return;
        }
        // Every round dispatches one queued item; a reclaim re-queues less than it frees. More
        // rounds than items known to the router would be a bug (a livelock): stop and say so.
        let limit = 2 * (self.queued + self.running) + 16;
        for round in 0.. {
            assert!(round <= limit, "router livelock on model {}", self.models[mix as usize].id.0);
            let Some(band) = self.pick_band(mix) else { return };
            if !self.dispatch_one(mix, band, now_ms, out) {
                // Nothing in this band could go; try the others once before giving up.
                let others = self.models[mix as usize].nonempty & !(1 << band);
                if !(0..self.cfg.bands).any(|b| others & (1 << b) != 0 && self.dispatch_one(mix, b, now_ms, out)) {
                    return;
                }
            }
            // The floor counts decisions, not attempts.
            let m = &mut self.models[mix as usize];
            m.turn = m.turn.wrapping_add(1);
        }
    }

    /// Tries the tenants of a band in VTC order and dispatches one head item; returns whether it
    /// did. A head that fits within its tenant's guarantee (or when no tenant has one) goes at
    /// once. A head that would borrow competes with the next `BORROW_LOOKAHEAD` tenants: the one
    /// whose weighted borrowed share after admission is lowest goes (Kueue's "admit the lowest
    /// share"), so borrowed capacity is shared by weighted dominant share while VTC orders service.
    /// A head that finds no room may reclaim borrowed capacity if its tenant is within its
    /// guarantee.
    fn dispatch_one(&mut self, mix: u32, band: usize, now_ms: i64, out: &mut Vec<Decision>) -> bool {
        if self.models[mix as usize].free.is_empty() && !self.any_guarantee {
            return false;
        }
        let mut cursor: Option<(u64, u32, u32)> = None;
        let mut best: Option<(f64, u32)> = None;
        let mut after_best = 0;
        for _ in 0..64 {
            let next = self.order_next(mix, band, cursor).map(|k| (k, self.queues[k.2 as usize].front().map(|e| e.1)));
            let Some((k, Some(ix))) = next else { break };
            cursor = Some(k);
            if best.is_some() {
                after_best += 1;
                if after_best > BORROW_LOOKAHEAD {
                    break;
                }
            }
            let tix = k.1;
            let it = &self.items[ix as usize];
            let (gang, kv) = (it.gang, it.kv());
            if !self.place(mix, gang, kv) {
                // No room: a tenant within its guarantee may reclaim borrowed capacity.
                if best.is_none() && self.reclaim(mix, tix, gang, kv, now_ms, out) {
                    assert!(self.place(mix, gang, kv), "a reclaim makes room");
                    self.start(ix, now_ms, out);
                    return true;
                }
                continue;
            }
            let t = &self.tenants[tix as usize];
            let need: f64 = self.place_buf.iter().map(|&r| self.reps[r as usize].gpu_per_slot()).sum();
            let after = t.usage_gpus + need;
            if after > t.spec.guaranteed_gpus + t.spec.borrow_limit_gpus + 1e-9 {
                continue;
            }
            if !self.any_guarantee || after <= t.spec.guaranteed_gpus + 1e-9 {
                self.start(ix, now_ms, out);
                return true;
            }
            let share = (after - t.spec.guaranteed_gpus) / t.spec.weight;
            if best.is_none_or(|(s, _)| share < s) {
                best = Some((share, ix));
            }
        }
        let Some((_, ix)) = best else { return false };
        let it = &self.items[ix as usize];
        assert!(self.place(mix, it.gang, it.kv()), "placement unchanged since it was found");
        self.start(ix, now_ms, out);
        true
    }

    /// The least saturated replicas with room (one slot each for a gang), into `place_buf`; false
    /// if there are not enough.
    fn place(&mut self, mix: u32, gang: u32, kv: u64) -> bool {
        let m = &self.models[mix as usize];
        self.place_buf.clear();
        for &(_, _, r) in &m.free {
            let rep = &self.reps[r as usize];
            let room_slots = rep.spec.slots - rep.used_slots;
            let room_kv = ((rep.spec.kv_tokens - rep.kv_used) / kv.max(1)).min(u64::from(u32::MAX)) as u32;
            for _ in 0..room_slots.min(room_kv).min(gang - self.place_buf.len() as u32) {
                self.place_buf.push(r);
            }
            if self.place_buf.len() as u32 == gang {
                return true;
            }
        }
        false
    }

    /// Starts a queued item on the placement in `place_buf`.
    fn start(&mut self, ix: u32, now_ms: i64, out: &mut Vec<Decision>) {
        self.unqueue(ix);
        let it = &mut self.items[ix as usize];
        let (kv, tix, band, id) = (it.kv(), it.tix, it.band, it.id);
        if it.gang == 1 {
            it.slot0 = self.place_buf[0];
        } else {
            it.slots.clear();
            it.slots.extend_from_slice(&self.place_buf);
        }
        let mut gpus = 0.0;
        let replicas = self.replica_ids(&self.place_buf);
        for (k, &r) in self.place_buf.iter().enumerate() {
            let rep = &mut self.reps[r as usize];
            rep.used_slots += 1;
            rep.kv_used += kv;
            gpus += rep.gpu_per_slot();
            if k == 0 || self.place_buf[k - 1] != r {
                let here = self.place_buf[k..].iter().take_while(|&&x| x == r).count() as u16;
                rep.run_ix.push(ix);
                rep.run_meta.push(RunMeta { tix, band, here, started_ms: now_ms });
            }
        }
        for k in 0..self.place_buf.len() {
            if k == 0 || self.place_buf[k - 1] != self.place_buf[k] {
                self.reindex(self.place_buf[k]);
            }
        }
        let it = &mut self.items[ix as usize];
        it.state = State::Running;
        it.started_ms = now_ms;
        it.output_done = 0;
        it.gpus = gpus;
        let (waited, prompt) = (now_ms - it.arrived_ms, it.prompt_tokens);
        self.running += 1;
        let b = usize::from(band);
        let t = &mut self.tenants[tix as usize];
        t.usage_gpus += gpus;
        let st = &mut self.tband[tix as usize * self.nb + b].stats;
        st.dispatched += 1;
        st.queue_ms_sum += waited as f64;
        st.input_tokens += u64::from(prompt);
        // VTC charges input tokens when the prompt is admitted.
        self.charge(tix, b, f64::from(prompt) * self.cfg.input_weight);
        self.metrics.dispatched(band, waited);
        out.push(Decision::Dispatch { id, replicas });
    }

    /// Quota reclaim (see the module docs for why it cannot loop): tenant `tix`, within its
    /// guarantee after admitting one slot, preempts the one running item of the borrower with the
    /// highest weighted borrowed share on this model whose removal makes room for the request and
    /// leaves that borrower at or above its own guarantee. Nothing is preempted unless the request
    /// then fits, so a reclaim always ends in a dispatch. Gangs (batch jobs) do not reclaim: they
    /// wait for capacity.
    fn reclaim(&mut self, mix: u32, tix: u32, gang: u32, kv: u64, now_ms: i64, out: &mut Vec<Decision>) -> bool {
        let t = &self.tenants[tix as usize];
        if gang != 1 || t.usage_gpus >= t.spec.guaranteed_gpus {
            return false;
        }
        let mut best: Option<((bool, i64, ReqId), u32)> = None;
        for &r in &self.models[mix as usize].replicas {
            let rep = &self.reps[r as usize];
            if rep.spec.slots == 0 || rep.cordoned || t.usage_gpus + rep.gpu_per_slot() > t.spec.guaranteed_gpus + 1e-9
            {
                continue;
            }
            for (&ix, meta) in rep.run_ix.iter().zip(&rep.run_meta) {
                if meta.tix == tix {
                    continue;
                }
                let run = &self.items[ix as usize];
                let v = &self.tenants[meta.tix as usize];
                if !run.preemptible || run.gang != 1 {
                    continue;
                }
                if v.usage_gpus - run.gpus + 1e-9 < v.spec.guaranteed_gpus {
                    continue;
                }
                if rep.used_slots > rep.spec.slots || rep.kv_used - run.kv() + kv > rep.spec.kv_tokens {
                    continue;
                }
                let over = (v.usage_gpus - v.spec.guaranteed_gpus) / v.spec.weight;
                let young = now_ms - meta.started_ms < self.cfg.min_runtime_ms;
                let k = (young, -(over * 1e6) as i64, run.id);
                if best.as_ref().is_none_or(|(b, _)| k < *b) {
                    best = Some((k, ix));
                }
            }
        }
        match best {
            Some((_, ix)) => {
                let by = self.tenants[tix as usize].spec.id;
                self.preempt(ix, PreemptReason::QuotaReclaim { by }, now_ms, out);
                true
            }
            None => false,
        }
    }

    /// Tenants backlogged in a band (any model), by index.
    fn backlogged(&self, band: usize) -> BTreeSet<u32> {
        self.models.iter().flat_map(|m| m.bands[band].order.iter().map(|k| k.1)).collect()
    }

    /// Jain's fairness index of weighted service among tenants now backlogged in `band`.
    pub fn fairness_index(&self, band: usize) -> Option<f64> {
        let xs: Vec<f64> = self
            .backlogged(band)
            .into_iter()
            .map(|t| {
                let s = &self.tenants[t as usize];
                self.tband[t as usize * self.nb + band].stats.service() / s.spec.weight
            })
            .collect();
        crate::metrics::jain(&xs)
    }

    /// Every tenant's capacity against its entitlement. The capacity is the GPUs of live replicas
    /// with slots; active tenants (queued or running work) are each entitled to their guarantee
    /// plus a weighted part of what active tenants are not guaranteed, capped by guarantee plus
    /// borrowing limit.
    pub fn shares(&self) -> Vec<TenantShare> {
        let capacity: f64 =
            self.reps.iter().filter(|r| r.live && r.spec.slots > 0).map(|r| f64::from(r.spec.gpus)).sum();
        let active: Vec<bool> = self
            .tenants
            .iter()
            .enumerate()
            .map(|(x, t)| {
                t.usage_gpus > 1e-9 || (0..self.nb).any(|b| !self.tband[x * self.nb + b].waiting_in.is_empty())
            })
            .collect();
        let act = || self.tenants.iter().zip(&active).filter(|(_, a)| **a).map(|(t, _)| t);
        let guaranteed: f64 = act().map(|t| t.spec.guaranteed_gpus).sum();
        let weights: f64 = act().map(|t| t.spec.weight).sum();
        let lendable = (capacity - guaranteed).max(0.0);
        let all_guarantees: f64 = self.tenants.iter().map(|t| t.spec.guaranteed_gpus).sum();
        let pool = (capacity - all_guarantees).max(0.0).max(1e-9);
        self.tenants
            .iter()
            .zip(&active)
            .map(|(t, &a)| {
                let borrowed = (t.usage_gpus - t.spec.guaranteed_gpus).max(0.0);
                let entitled = if a {
                    (t.spec.guaranteed_gpus + lendable * t.spec.weight / weights)
                        .min(t.spec.guaranteed_gpus + t.spec.borrow_limit_gpus)
                } else {
                    0.0
                };
                TenantShare {
                    tenant: t.spec.id,
                    weight: t.spec.weight,
                    usage_gpus: t.usage_gpus,
                    guaranteed_gpus: t.spec.guaranteed_gpus,
                    borrowed_gpus: borrowed,
                    entitled_gpus: entitled,
                    weighted_borrowed_share: borrowed / pool / t.spec.weight,
                    active: a,
                }
            })
            .collect()
    }

    /// Queued requests per band (all models).
    pub fn band_lengths(&self) -> &[usize] {
        &self.band_len
    }

    /// Whether a tenant has queued work in a band (any model).
    pub fn band_backlog(&self, t: TenantId, band: usize) -> bool {
        band < self.nb
            && self.tenant_ix.get(&t).is_some_and(|&x| !self.tband[x as usize * self.nb + band].waiting_in.is_empty())
    }

    /// A tenant's figures in a band.
    pub fn tenant_stats(&self, t: TenantId, band: usize) -> Option<&crate::metrics::TenantStats> {
        self.tenant_ix.get(&t).filter(|_| band < self.nb).map(|&x| &self.tband[x as usize * self.nb + band].stats)
    }

    /// Virtual counter of a tenant in a band.
    pub fn counter(&self, t: TenantId, band: usize) -> f64 {
        self.tenant_ix
            .get(&t)
            .filter(|_| band < self.nb)
            .map_or(0.0, |&x| self.tband[x as usize * self.nb + band].counter)
    }

    /// Check used by tests and the harness: no replica runs beyond its slots or KV capacity, usage
    /// adds up, and every index agrees with the items.
    pub fn check(&self) -> Result<(), OutOfStep> {
        let mut slots = vec![0u32; self.reps.len()];
        let mut usage = vec![0.0f64; self.tenants.len()];
        let (mut queued, mut running) = (0, 0);
        for (ix, it) in self.items.iter().enumerate() {
            match it.state {
                State::Free => continue,
                State::Queued => queued += 1,
                State::Running => {
                    running += 1;
                    usage[it.tix as usize] += it.gpus;
                    for &r in it.slot_list() {
                        slots[r as usize] += 1;
                        if !self.reps[r as usize].run_ix.contains(&(ix as u32)) {
                            return Err(OutOfStep(format!(
                                "request {} runs on a replica that does not list it",
                                it.id
                            )));
                        }
                    }
                }
            }
            if self.ids.get(&it.id) != Some(&(ix as u32)) {
                return Err(OutOfStep(format!("request {}: id index out of step", it.id)));
            }
        }
        if queued != self.queued || running != self.running || self.ids.len() != queued + running {
            return Err(OutOfStep("queued/running counts out of step".into()));
        }
        for (rix, r) in self.reps.iter().enumerate() {
            if r.used_slots > r.spec.slots || r.kv_used > r.spec.kv_tokens {
                return Err(OutOfStep(format!(
                    "replica {} over capacity: {}/{} slots, {}/{} kv",
                    r.spec.id.0, r.used_slots, r.spec.slots, r.kv_used, r.spec.kv_tokens
                )));
            }
            if slots[rix] != r.used_slots || r.run_ix.len() != r.run_meta.len() {
                return Err(OutOfStep(format!("replica {}: slots in use out of step", r.spec.id.0)));
            }
        }
        for (t, u) in self.tenants.iter().zip(&usage) {
            if (u - t.usage_gpus).abs() > 1e-6 {
                return Err(OutOfStep(format!("tenant {} usage {} != {}", t.spec.id.0, t.usage_gpus, u)));
            }
        }
        if self.band_len.iter().sum::<usize>() != self.queued {
            return Err(OutOfStep("band lengths do not add up".into()));
        }
        for m in &self.models {
            for (b, bq) in m.bands.iter().enumerate() {
                let mut expect = BTreeSet::new();
                let mut len = 0;
                for (t, tb) in self.tband.iter().enumerate().skip(b).step_by(self.nb) {
                    for &(mix, q) in &tb.waiting_in {
                        if self.models[mix as usize].id == m.id {
                            if self.qkey[q as usize] > key(tb.counter) {
                                return Err(OutOfStep(format!("queue {q}: order key ahead of its counter")));
                            }
                            expect.insert((self.qkey[q as usize], (t / self.nb) as u32, q));
                            len += self.queues[q as usize].len();
                        }
                    }
                }
                if expect != bq.order || bq.len != len || (bq.len > 0) != (m.nonempty & (1 << b) != 0) {
                    return Err(OutOfStep(format!("model {} band {b}: backlog order out of step", m.id.0)));
                }
            }
        }
        Ok(())
    }
}

/// Asks the CPU to start loading the cache line of `r` (a hint: it changes no result).
#[inline(always)]
fn prefetch<T>(r: &T) {
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults or writes.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>((r as *const T).cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
