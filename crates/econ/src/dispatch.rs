//! The fast path: an event-driven merit-order dispatcher over pre-sorted efficiency curves.
//!
//! Every ASIC has power levels (0 = asleep, 1 = the lowest running target, ..., L = the highest).
//! Each step up is a *segment* with a power increment and a hashrate increment; its value is the
//! mining revenue per MWh it adds. The hashrate curve is concave, so a device's segments have
//! falling values and any prefix of a value-sorted list is a consistent plan (a device is never at
//! level 3 without levels 1 and 2). Values scale with hashprice and heat uniformly inside a group
//! (one feeder, one model), so each group's segments are sorted once, when the fleet or a device's
//! measured efficiency changes; a new price, cap or commitment only moves a cut in each sorted list
//! (binary searches on prefix sums of power), and the changed targets are the segments between the
//! old and the new cut. That makes a full-fleet re-plan cost O(groups x log n + changes).
//!
//! Rules the cut obeys, each recorded as a [`Reason`]:
//! - economics: a segment runs while its value exceeds the price plus the adder; to restore it
//!   must beat the price by the hysteresis band, to curtail it must fall below by the band;
//! - caps: site cap and feeder limits at every instant, after reserving the idle draw of every
//!   device, the fixed draw of devices the dispatcher may not touch, the GPUs' budget and the
//!   megawatts held for grid commitments;
//! - devices with stale telemetry, in maintenance, faulted or in their minimum on/off time are
//!   skipped (held where they are), each with its reason;
//! - a stale price feed switches the site to the configured safe policy within one interval.
//!
//! Architecture invariant: pure; time comes in as `now_ms`. Deterministic: ties break by device
//! index.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use hcp_model::fleet::Fleet;
use hcp_model::signals::GridProgram;
use hcp_model::{DeviceIdx, FeederIdx, ModelRef, SiteIdx};

/// Limits on one plan.
pub const MAX_LEVELS: usize = 16;
const FORCED: u8 = 0x80;

#[derive(Clone, Debug, PartialEq)]
pub struct DispatchConfig {
    /// Fixed charges added to the energy price (USD/MWh).
    pub energy_adder_usd_per_mwh: f64,
    /// Dead band against flapping (USD/MWh): restore above price + band, curtail below price - band.
    pub hysteresis_usd_per_mwh: f64,
    /// Running power levels per ASIC, evenly spaced from the lowest to the highest target.
    pub running_levels: usize,
    /// A device stays in a state at least this long after a change (wear and inrush).
    pub min_on_ms: i64,
    pub min_off_ms: i64,
    /// Telemetry older than this makes a device stale (skipped).
    pub stale_telemetry_ms: i64,
    /// A price older than this is stale: the site falls back to `safe_policy`.
    pub stale_price_ms: i64,
    pub safe_policy: SafePolicy,
    /// Staggered restarts: this many devices per feeder per batch, batches this far apart.
    pub batch_size: u32,
    pub batch_interval_ms: i64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            energy_adder_usd_per_mwh: 0.0,
            hysteresis_usd_per_mwh: 5.0,
            running_levels: 4,
            min_on_ms: 30 * 60_000,
            min_off_ms: 30 * 60_000,
            stale_telemetry_ms: 60_000,
            stale_price_ms: 20 * 60_000,
            safe_policy: SafePolicy::Curtail,
            batch_size: 10,
            batch_interval_ms: 5_000,
        }
    }
}

/// What a site does when its price feed is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafePolicy {
    /// ASICs sleep; GPUs keep serving (their paying demand is worth far more than any price cap).
    Curtail,
    /// Keep the last plan.
    Hold,
}

/// Why a device is held where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skip {
    StaleTelemetry,
    Maintenance,
    Faulted,
    /// Inside its minimum on or off time: a restart waits; an economic shutdown becomes the lowest
    /// running level (a cap or commitment still switches it off).
    Cooldown,
}

/// A grid commitment in force at a site.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Commitment {
    pub site: SiteIdx,
    pub program: GridProgram,
    pub kind: ReduceKind,
    pub respond_by_ms: i64,
    /// The version of the operator's grid-commitment policy this commitment comes from (`None`
    /// when it comes from elsewhere, such as a backtest's assumed commitment).
    pub policy_version: Option<u32>,
}

/// An operator's strike price holding one ASIC model of a site asleep: the price was above it for
/// the policy's dwell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StrikeHold {
    pub strike_usd_per_mwh: f64,
    /// The last known price the hold was decided on.
    pub price_usd_per_mwh: f64,
    pub policy_version: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReduceKind {
    /// Draw at most this much.
    To { mw: f64 },
    /// Draw this much less than the site drew when the deployment arrived.
    By { mw: f64, baseline_mw: f64 },
}

impl Commitment {
    fn limit_w(&self) -> f64 {
        match self.kind {
            ReduceKind::To { mw } => mw * 1e6,
            ReduceKind::By { mw, baseline_mw } => (baseline_mw - mw).max(0.0) * 1e6,
        }
    }
}

/// Machine-readable reasons for a plan's changes.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// Segments curtailed: the price (plus adder) is above their value.
    PriceAboveValue {
        site: SiteIdx,
        model: String,
        price_usd_per_mwh: f64,
        value_usd_per_mwh: f64,
    },
    /// Segments restored: their value beats the price by the hysteresis band.
    PriceBelowValue {
        site: SiteIdx,
        model: String,
        price_usd_per_mwh: f64,
        value_usd_per_mwh: f64,
    },
    /// The site cap (less reservations) binds: the cut is where the budget runs out.
    SiteCap {
        site: SiteIdx,
        cap_mw: f64,
        budget_for_asics_mw: f64,
    },
    FeederLimit {
        feeder: FeederIdx,
        limit_mw: f64,
    },
    /// A grid program's deployment: the site must draw at most `limit_mw` by `respond_by_ms`.
    GridCommitment {
        site: SiteIdx,
        program: GridProgram,
        limit_mw: f64,
        respond_by_ms: i64,
        policy_version: Option<u32>,
    },
    /// The operator's strike policy: the model sleeps while the price is above its strike.
    Strike {
        site: SiteIdx,
        model: String,
        price_usd_per_mwh: f64,
        strike_usd_per_mwh: f64,
        policy_version: u32,
    },
    /// The price feed is stale; the safe policy applies.
    StalePrice {
        site: SiteIdx,
        age_ms: i64,
        policy: SafePolicy,
    },
    /// The planning path holds the site below the cap (a 4CP window or a ramp).
    Scheduled {
        site: SiteIdx,
        limit_mw: f64,
    },
    /// The ASICs alone cannot make room for the limit: the GPUs are power-capped.
    GpusCapped {
        site: SiteIdx,
        planned_mw: f64,
        capped_mw: f64,
    },
    /// The limit binds and GPUs have no work: they idle, and their headroom goes to the ASICs
    /// until demand comes back.
    GpusIdle {
        site: SiteIdx,
        idle_gpus: u32,
        freed_mw: f64,
    },
    /// The price is above what the GPUs' work earns (the GPU price in force over their draw):
    /// they stop serving, except those reserved for tenants (`shed` false: serving again).
    GpusShed {
        site: SiteIdx,
        shed: bool,
        price_usd_per_mwh: f64,
        value_usd_per_mwh: f64,
        serving_gpus: u32,
        /// The reserved-capacity policy's version when it kept GPUs serving.
        policy_version: Option<u32>,
    },
}

/// One device's new target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetChange {
    pub device: DeviceIdx,
    pub from_level: u8,
    pub to_level: u8,
    /// Commanded power at the new level (the idle draw for level 0).
    pub power_w: f64,
    /// Index into [`Plan::reasons`].
    pub reason: u32,
    /// Earliest time to send (restarts are staggered in batches per feeder).
    pub not_before_ms: i64,
}

/// The plan's view of one site.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SitePlan {
    pub asic_mw: f64,
    pub gpu_mw: f64,
    /// GPU power given to the ASICs by GPUs with no work (their planned draw is `gpu_mw`).
    pub gpu_idle_mw: f64,
    pub held_for_grid_mw: f64,
    pub limit_mw: f64,
    pub price_usd_per_mwh: f64,
    pub stale: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub at_ms: i64,
    pub changes: Vec<TargetChange>,
    pub reasons: Vec<Reason>,
    pub sites: Vec<SitePlan>,
    /// Devices skipped in this plan, by reason (counts).
    pub skipped: Vec<(Skip, u32)>,
    /// Moves held back by minimum on/off times.
    pub blocked: u32,
}

/// The signals of one site the fast path decides on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiteSignal {
    pub price_usd_per_mwh: f64,
    /// When the price was published (for staleness).
    pub price_at_ms: i64,
    pub ambient_c: f64,
    /// The planning path's limit on the site's draw for this interval (4CP window, ramp), or
    /// infinity when the plan holds nothing back.
    pub schedule_limit_w: f64,
}

impl SiteSignal {
    pub fn new(price_usd_per_mwh: f64, price_at_ms: i64, ambient_c: f64) -> Self {
        SiteSignal { price_usd_per_mwh, price_at_ms, ambient_c, schedule_limit_w: f64::INFINITY }
    }
}

/// Power the site's GPUs are planned to draw, and the least they can draw when obligated (every
/// serving GPU capped at its lowest cap). GPUs give power back only when the ASICs cannot make room
/// for a limit (economics.md section 4: by power capping, not by stopping).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GpuBudget {
    pub planned_w: f64,
    pub min_w: f64,
    /// What the GPUs with no work give back when they idle instead of serving (W), and how many
    /// they are: handed to the ASICs only when the limit binds.
    pub idle_flex_w: f64,
    pub idle_gpus: u32,
}

#[derive(Clone)]
struct Group {
    site: SiteIdx,
    feeder: FeederIdx,
    model_id: String,
    /// Power and hashrate per level (index 0 = asleep).
    level_w: Vec<f64>,
    level_ths: Vec<f64>,
    heat_rise_per_c: f64,
    heat_ref_c: f64,
    /// Members, in fleet order.
    devices: Vec<u32>,
    /// Segments sorted by value (desc): value per MWh at 1 USD/PH/day hashprice and no heat,
    /// the member (position in `devices`) and the level it raises the member to.
    seg_value: Vec<f64>,
    seg_member: Vec<u32>,
    seg_level: Vec<u8>,
    /// Prefix sums of the free members' segment power increments (skipped members count zero).
    prefix_w: Vec<f64>,
    /// Segments in force; `usize::MAX` when the free members' levels are not a prefix (after a
    /// re-sort or a change of skips), which makes the next cut recount every member.
    cut: usize,
    /// Draw of skipped members above idle, at their held levels.
    held_extra_w: f64,
    /// Idle draw of all members.
    idle_w: f64,
    /// Skips must be recomputed (a change of telemetry, maintenance, on/off, efficiency).
    dirty: bool,
    /// The segments were re-sorted: the prefix sums must be rebuilt whatever the skips do.
    resorted: bool,
    /// The price the group last decided on; prices within the hysteresis band of it keep it.
    anchor_price: Option<f64>,
    /// Members skipped, by reason (order of [`Skip`]), as of the last refresh.
    skip_counts: [u32; 4],
    /// Scratch: a pending new level per member (`u8::MAX` = none; bit 7 marks a forced move).
    pending: Vec<u8>,
    /// Per member, whether the dispatcher may move it (no skip): a copy of `skip` in member order,
    /// kept by `refresh` (the only writer of `skip`), so that a cut's walk over a million segments
    /// reads one contiguous array instead of two scattered ones.
    member_free: Vec<bool>,
    /// Exact draw of the free members when their levels are not the prefix (cooldowns held some).
    irregular_w: Option<f64>,
    /// Index of the feeder among its site's feeders.
    local_feeder: usize,
    /// Bumped whenever `prefix_w` changes (invalidates cached cap counts).
    version: u64,
    /// The operator's strike holds the group asleep.
    strike: Option<StrikeHold>,
}

/// Cap counts of a site, kept while nothing they depend on changes.
#[derive(Clone)]
struct CapCache {
    key: Vec<f64>,
    caps: Vec<usize>,
    hit: Vec<bool>,
    bound: bool,
}

impl Group {
    fn scale(&self, hashprice: f64, ambient_c: f64) -> f64 {
        hashprice / (1.0 + self.heat_rise_per_c * (ambient_c - self.heat_ref_c).max(0.0))
    }

    /// Segments whose value exceeds `v` (USD/MWh) at `scale`.
    fn count_above(&self, v: f64, scale: f64) -> usize {
        if scale <= 0.0 {
            return 0;
        }
        let unit = v / scale;
        self.seg_value.partition_point(|&x| x > unit)
    }

    /// Largest cut whose power fits in `budget_w`.
    fn count_fitting(&self, budget_w: f64) -> usize {
        self.prefix_w.partition_point(|&p| p <= budget_w + 1e-6).saturating_sub(1)
    }

    fn planned_w(&self) -> f64 {
        let free = match self.irregular_w {
            Some(w) => w,
            None if self.cut == usize::MAX => 0.0,
            None => self.prefix_w[self.cut],
        };
        self.idle_w + self.held_extra_w + free
    }
}

/// A group's decided move: to `n` segments. `forced` is the reason when a cap, a commitment or the
/// safe policy (not the price) set the cut; `cap_cut` is the cut the caps alone allow.
#[derive(Clone, Copy, Debug)]
struct Cut {
    gi: usize,
    n: usize,
    cap_cut: usize,
    price: f64,
    scale: f64,
    forced: Option<u32>,
}

/// A plan being turned into device changes (see [`Dispatcher::start_plan_sites`]). It holds the
/// dispatcher until finished, so nothing else can observe a half-applied plan. A run dropped before
/// `finish` leaves the groups it did not reach at their old cuts (the next plan moves them).
pub struct PlanRun<'a> {
    d: &'a mut Dispatcher,
    plan: Plan,
    cuts: Vec<Cut>,
    next: usize,
    restarts: Vec<u32>,
    which: Vec<SiteIdx>,
    skipped: [u32; 4],
    /// Changes already handed out by `step`.
    handed: usize,
    /// Whether an increase came before a reduction in the changes so far (then `finish` has to
    /// reorder them; usually the cuts' order already puts every reduction first).
    seen_up: bool,
    mixed: bool,
}

impl PlanRun<'_> {
    /// Applies whole groups' cuts until at least `min_changes` new device changes exist (or every
    /// cut is applied) and returns those new changes.
    pub fn step(&mut self, min_changes: usize) -> &[TargetChange] {
        let from = self.handed;
        let now = self.plan.at_ms;
        while self.next < self.cuts.len() && self.plan.changes.len() - from < min_changes {
            let cut = self.cuts[self.next];
            self.next += 1;
            let before = self.plan.changes.len();
            self.d.apply_cut(&cut, now, &mut self.restarts, &mut self.plan);
            // The new changes are still in cache: note whether they break the order.
            for c in &self.plan.changes[before..] {
                if c.to_level > c.from_level {
                    self.seen_up = true;
                } else if self.seen_up {
                    self.mixed = true;
                }
            }
        }
        self.handed = self.plan.changes.len();
        &self.plan.changes[from..]
    }

    /// Whether every cut is applied.
    pub fn done(&self) -> bool {
        self.next == self.cuts.len()
    }

    /// Applies what is left and returns the plan: reductions before increases, so that no instant
    /// draws more than either plan; increases keep their staggered `not_before_ms`.
    pub fn finish(mut self) -> Plan {
        self.step(usize::MAX);
        let d = self.d;
        let mut plan = self.plan;
        for site in &self.which {
            let s = site.index();
            plan.sites[s].asic_mw = d.site_groups[s].iter().map(|&gi| d.groups[gi].planned_w()).sum::<f64>() / 1e6;
        }
        let mut skipped = self.skipped;
        skipped[Skip::Cooldown as usize] += plan.blocked;
        plan.skipped = [Skip::StaleTelemetry, Skip::Maintenance, Skip::Faulted, Skip::Cooldown]
            .into_iter()
            .zip(skipped)
            .filter(|&(_, n)| n > 0)
            .collect();
        if self.mixed {
            let mut ups = std::mem::take(&mut plan.changes);
            let mut downs = Vec::with_capacity(ups.len());
            ups.retain(|c| {
                let up = c.to_level > c.from_level;
                if !up {
                    downs.push(*c);
                }
                up
            });
            downs.append(&mut ups);
            plan.changes = downs;
        }
        plan
    }
}

/// The dispatcher's state: groups with sorted segments, each device's level and history.
#[derive(Clone)]
pub struct Dispatcher {
    pub cfg: DispatchConfig,
    groups: Vec<Group>,
    /// ASIC groups of each site, the feeders they sit on, and cached cap counts.
    site_groups: Vec<Vec<usize>>,
    site_feeders: Vec<Vec<FeederIdx>>,
    cap_cache: Vec<Option<CapCache>>,
    site_cap_w: Vec<f64>,
    feeder_limit_w: Vec<f64>,
    /// Per device (fleet index): level, group, efficiency factor, last on/off change, flags.
    level: Vec<u8>,
    group_of: Vec<u32>,
    efficiency: Vec<f32>,
    changed_ms: Vec<i64>,
    maintenance: Vec<bool>,
    faulted: Vec<bool>,
    seen_ms: Vec<i64>,
    skip: Vec<Option<Skip>>,
    /// Devices whose telemetry may go stale, by the report time they were last looked at (a
    /// device's key is at most its latest report time): a plan finds the devices gone stale
    /// without a pass over the fleet. `watched` says which devices have an entry.
    stale_watch: BinaryHeap<Reverse<(i64, u32)>>,
    watched: Vec<bool>,
}

fn asic_levels(m: &hcp_model::AsicModel, running: usize) -> (Vec<f64>, Vec<f64>) {
    let mut w = vec![m.sleep_power_w];
    let mut ths = vec![0.0];
    for k in 0..running {
        let f = if running == 1 { 1.0 } else { k as f64 / (running - 1) as f64 };
        let p = m.min_power_w + f * (m.max_power_w - m.min_power_w);
        w.push(p);
        ths.push(m.hashrate_ths * (p / m.power_w).powf(m.curve_exponent));
    }
    (w, ths)
}

impl Dispatcher {
    /// Builds the merit order of a fleet. Every ASIC starts at its highest level, with fresh
    /// telemetry at `now_ms` and no cooldown.
    pub fn new(fleet: &Fleet, cfg: DispatchConfig, now_ms: i64) -> Self {
        assert!((1..MAX_LEVELS).contains(&cfg.running_levels), "running_levels must be 1..{MAX_LEVELS}");
        let n = fleet.devices.len();
        let mut d = Dispatcher {
            groups: vec![],
            site_groups: vec![vec![]; fleet.sites.len()],
            site_feeders: vec![vec![]; fleet.sites.len()],
            cap_cache: (0..fleet.sites.len()).map(|_| None).collect(),
            site_cap_w: fleet.sites.iter().map(|s| s.power_cap_w).collect(),
            feeder_limit_w: fleet.feeders.iter().map(|f| f.limit_w).collect(),
            level: vec![0; n],
            group_of: vec![u32::MAX; n],
            efficiency: vec![1.0; n],
            changed_ms: vec![i64::MIN / 2; n],
            maintenance: vec![false; n],
            faulted: vec![false; n],
            seen_ms: vec![now_ms; n],
            skip: vec![None; n],
            stale_watch: BinaryHeap::new(),
            watched: vec![false; n],
            cfg,
        };
        for g in fleet.groups() {
            let ModelRef::Asic(a) = g.model else { continue };
            let m = fleet.catalogue.asic(a);
            let (level_w, level_ths) = asic_levels(m, d.cfg.running_levels);
            let gi = d.groups.len();
            for dev in &g.devices {
                d.group_of[dev.index()] = gi as u32;
                d.level[dev.index()] = d.cfg.running_levels as u8;
            }
            d.site_groups[g.site.index()].push(gi);
            d.groups.push(Group {
                site: g.site,
                feeder: g.feeder,
                model_id: m.id.clone(),
                idle_w: g.devices.len() as f64 * level_w[0],
                level_w,
                level_ths,
                heat_rise_per_c: m.jth_rise_per_c,
                heat_ref_c: m.efficiency_ref_c,
                devices: g.devices.iter().map(|x| x.0).collect(),
                seg_value: vec![],
                seg_member: vec![],
                seg_level: vec![],
                prefix_w: vec![0.0],
                cut: usize::MAX,
                held_extra_w: 0.0,
                dirty: true,
                resorted: true,
                anchor_price: None,
                skip_counts: [0; 4],
                pending: vec![u8::MAX; g.devices.len()],
                member_free: g.devices.iter().map(|x| d.skip[x.index()].is_none()).collect(),
                irregular_w: None,
                local_feeder: 0,
                version: 0,
                strike: None,
            });
            d.resort(gi);
        }
        for gi in 0..d.groups.len() {
            let (site, feeder) = (d.groups[gi].site.index(), d.groups[gi].feeder);
            let list = &mut d.site_feeders[site];
            d.groups[gi].local_feeder = match list.iter().position(|&f| f == feeder) {
                Some(p) => p,
                None => {
                    list.push(feeder);
                    list.len() - 1
                }
            };
        }
        let watch: Vec<Reverse<(i64, u32)>> =
            (0..n as u32).filter(|&i| d.group_of[i as usize] != u32::MAX).map(|i| Reverse((now_ms, i))).collect();
        for Reverse((_, i)) in &watch {
            d.watched[*i as usize] = true;
        }
        d.stale_watch = BinaryHeap::from(watch);
        d
    }

    /// Number of ASIC groups (feeder x model).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Current level of a device (ASICs; 0 for GPUs).
    pub fn level(&self, device: DeviceIdx) -> u8 {
        self.level[device.index()]
    }

    /// Commanded power of an ASIC at its current level.
    pub fn power_w(&self, device: DeviceIdx) -> Option<f64> {
        let g = self.groups.get(*self.group_of.get(device.index())? as usize)?;
        Some(g.level_w[self.level[device.index()] as usize])
    }

    /// Power of each level of an ASIC's group (index 0 = asleep).
    pub fn level_powers_w(&self, device: DeviceIdx) -> Option<&[f64]> {
        let g = self.groups.get(*self.group_of.get(device.index())? as usize)?;
        Some(&g.level_w)
    }

    /// The skip that held a device in the last plan.
    pub fn skip(&self, device: DeviceIdx) -> Option<Skip> {
        self.skip[device.index()]
    }

    fn mark(&mut self, i: usize) {
        if let Some(g) = self.groups.get_mut(self.group_of[i] as usize) {
            g.dirty = true;
        }
    }

    /// Telemetry arrived for a device: fresh, its measured efficiency (J/TH over nameplate J/TH;
    /// 1.0 = nameplate) and whether it reports a fault. A changed efficiency re-sorts its group.
    pub fn observe(&mut self, device: DeviceIdx, now_ms: i64, efficiency_factor: f64, faulted: bool) {
        let i = device.index();
        if self.group_of[i] == u32::MAX {
            return;
        }
        if self.skip[i] == Some(Skip::StaleTelemetry) || self.faulted[i] != faulted {
            self.mark(i);
        }
        self.seen_ms[i] = now_ms;
        self.faulted[i] = faulted;
        if !self.watched[i] {
            self.watched[i] = true;
            self.stale_watch.push(Reverse((now_ms, device.0)));
        }
        // Staleness is kept up to date a little at a time with the reports, so that a plan finds
        // little left to do.
        self.expire_stale(now_ms, 4);
        let e = efficiency_factor.clamp(0.5, 5.0) as f32;
        if (self.efficiency[i] - e).abs() > 0.005 {
            self.efficiency[i] = e;
            self.resort(self.group_of[i] as usize);
        }
    }

    /// Holds (or, with `None`, frees) the ASICs of `model` at `site` asleep by the operator's
    /// strike price. Returns how many groups it touched (0: the site has no such model).
    pub fn hold_by_strike(&mut self, site: SiteIdx, model: &str, hold: Option<StrikeHold>) -> usize {
        let mut n = 0;
        for &gi in &self.site_groups[site.index()] {
            let g = &mut self.groups[gi];
            if g.model_id == model {
                g.strike = hold;
                n += 1;
            }
        }
        n
    }

    pub fn set_maintenance(&mut self, device: DeviceIdx, on: bool) {
        let i = device.index();
        if self.group_of[i] != u32::MAX && self.maintenance[i] != on {
            self.maintenance[i] = on;
            self.mark(i);
        }
    }

    fn skip_of(&self, i: usize, now_ms: i64) -> Option<Skip> {
        if self.maintenance[i] {
            Some(Skip::Maintenance)
        } else if self.faulted[i] {
            Some(Skip::Faulted)
        } else if now_ms - self.seen_ms[i] > self.cfg.stale_telemetry_ms {
            Some(Skip::StaleTelemetry)
        } else {
            None
        }
    }

    /// Inside the minimum on (or off) time since the device last switched.
    fn cooling(&self, i: usize, now_ms: i64) -> bool {
        let min = if self.level[i] == 0 { self.cfg.min_off_ms } else { self.cfg.min_on_ms };
        now_ms - self.changed_ms[i] < min
    }

    /// Re-sorts a group's segments by value (after its members' efficiencies changed).
    fn resort(&mut self, gi: usize) {
        let g = &mut self.groups[gi];
        let levels = g.level_w.len() - 1;
        let mut segs: Vec<(f64, u32, u8)> = Vec::with_capacity(g.devices.len() * levels);
        for (k, &dev) in g.devices.iter().enumerate() {
            let e = f64::from(self.efficiency[dev as usize]);
            for l in 1..=levels {
                let dw = g.level_w[l] - g.level_w[l - 1];
                let dths = (g.level_ths[l] - g.level_ths[l - 1]) / e;
                // USD per MWh at 1 USD/PH/day: (TH/s / 1000) PH/s earn 1/24 USD per hour, per MW.
                segs.push((dths / 1_000.0 / 24.0 / (dw / 1e6), k as u32, l as u8));
            }
        }
        // Value descending; ties by member then level, so a member's levels stay in order.
        segs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        g.seg_value = segs.iter().map(|s| s.0).collect();
        g.seg_member = segs.iter().map(|s| s.1).collect();
        g.seg_level = segs.iter().map(|s| s.2).collect();
        g.prefix_w = vec![0.0; segs.len() + 1];
        g.dirty = true;
        g.resorted = true;
        g.cut = usize::MAX;
        g.version += 1;
    }

    /// Brings the derived state (who is stale, skipped, each group's prefix sums) up to date with
    /// the telemetry, maintenance and faults seen so far. Called as telemetry is taken in, so that
    /// a plan, when a signal arrives, finds it done; a plan does whatever is still left itself.
    pub fn settle(&mut self, now_ms: i64) {
        self.expire_stale(now_ms, usize::MAX);
        for gi in 0..self.groups.len() {
            self.refresh(gi, now_ms);
        }
    }

    /// Marks the groups of devices whose telemetry is stale at `now_ms` (at most `budget` entries
    /// looked at). A device still fresh gets a new entry at its latest report time; a stale one
    /// leaves the watch until it reports again.
    fn expire_stale(&mut self, now_ms: i64, budget: usize) {
        let stale = self.cfg.stale_telemetry_ms;
        for _ in 0..budget {
            let Some(&Reverse((seen, dev))) = self.stale_watch.peek() else { return };
            if now_ms - seen <= stale {
                return;
            }
            self.stale_watch.pop();
            let i = dev as usize;
            if now_ms - self.seen_ms[i] > stale {
                self.watched[i] = false;
                self.mark(i);
            } else {
                self.stale_watch.push(Reverse((self.seen_ms[i], dev)));
            }
        }
    }

    /// Recomputes a group's skips, prefix sums and held draw if anything could have changed (a
    /// member's telemetry, maintenance, fault or staleness: see `mark` and `expire_stale`).
    fn refresh(&mut self, gi: usize, now_ms: i64) {
        let g = &self.groups[gi];
        if !g.dirty {
            return;
        }
        // A member marked (stale by the clock, a report, maintenance, a fault) matters only if its
        // skip really changed; re-sorted segments always need their prefix sums.
        let mut changed = g.resorted;
        let mut freed = false;
        let mut counts = [0u32; 4];
        let mut free = std::mem::take(&mut self.groups[gi].member_free);
        for (k, &dev) in self.groups[gi].devices.iter().enumerate() {
            let i = dev as usize;
            let s = self.skip_of(i, now_ms);
            changed |= s != self.skip[i];
            freed |= s.is_none() && self.skip[i].is_some();
            if let Some(x) = s {
                counts[x as usize] += 1;
            }
            self.skip[i] = s;
            free[k] = s.is_none();
        }
        let g = &mut self.groups[gi];
        g.member_free = free;
        g.dirty = false;
        g.resorted = false;
        g.skip_counts = counts;
        if !changed {
            return;
        }
        let mut acc = 0.0;
        let mut held = 0.0;
        for (j, (&m, &l)) in g.seg_member.iter().zip(&g.seg_level).enumerate() {
            let dev = g.devices[m as usize] as usize;
            let dw = g.level_w[l as usize] - g.level_w[l as usize - 1];
            if self.skip[dev].is_none() {
                acc += dw;
            } else if l <= self.level[dev] {
                held += dw;
            }
            g.prefix_w[j + 1] = acc;
        }
        g.held_extra_w = held;
        g.version += 1;
        // A member that was held may sit at a level the cut does not imply: recount.
        if freed {
            g.cut = usize::MAX;
        }
    }

    /// Plans every site for the signals at `now_ms` (see [`Dispatcher::plan_sites`]).
    pub fn plan(
        &mut self,
        now_ms: i64,
        sites: &[SiteSignal],
        hashprice: f64,
        gpus: &[GpuBudget],
        commitments: &[Commitment],
    ) -> Plan {
        self.start_plan(now_ms, sites, hashprice, gpus, commitments).finish()
    }

    /// Plans the listed sites (an event at one site re-plans only that site). `sites` and `gpus`
    /// are indexed by site; `hashprice` is USD/PH/day. Returns the changed targets, shutdowns
    /// first, with their reasons; `Plan::sites` is filled for the listed sites only.
    pub fn plan_sites(
        &mut self,
        now_ms: i64,
        which: &[SiteIdx],
        sites: &[SiteSignal],
        hashprice: f64,
        gpus: &[GpuBudget],
        commitments: &[Commitment],
    ) -> Plan {
        self.start_plan_sites(now_ms, which, sites, hashprice, gpus, commitments).finish()
    }

    /// [`Dispatcher::start_plan_sites`] for every site.
    pub fn start_plan(
        &mut self,
        now_ms: i64,
        sites: &[SiteSignal],
        hashprice: f64,
        gpus: &[GpuBudget],
        commitments: &[Commitment],
    ) -> PlanRun<'_> {
        let all: Vec<SiteIdx> = (0..self.site_cap_w.len()).map(|s| SiteIdx(s as u16)).collect();
        self.start_plan_sites(now_ms, &all, sites, hashprice, gpus, commitments)
    }

    /// Decides every group's new cut on the listed sites (work per group, not per device) and
    /// returns the run that turns those cuts into device changes, group by group: groups that
    /// shed power first, then groups recounted, then groups that add power. The caller may act on
    /// the first changes (send the first command batch) before the rest exist; the finished plan
    /// is the same whether it was taken in steps or at once.
    pub fn start_plan_sites(
        &mut self,
        now_ms: i64,
        which: &[SiteIdx],
        sites: &[SiteSignal],
        hashprice: f64,
        gpus: &[GpuBudget],
        commitments: &[Commitment],
    ) -> PlanRun<'_> {
        let mut plan =
            Plan { at_ms: now_ms, sites: vec![SitePlan::default(); self.site_cap_w.len()], ..Default::default() };
        let mut skipped = [0u32; 4];
        let mut cuts = vec![];
        self.expire_stale(now_ms, usize::MAX);
        for &site in which {
            let s = site.index();
            for k in 0..self.site_groups[s].len() {
                let gi = self.site_groups[s][k];
                self.refresh(gi, now_ms);
                for (a, b) in skipped.iter_mut().zip(self.groups[gi].skip_counts) {
                    *a += b;
                }
            }
            let gpu = gpus.get(s).copied().unwrap_or_default();
            self.plan_site(now_ms, s, &sites[s], hashprice, gpu, commitments, &mut cuts, &mut plan);
        }
        // Shedding first (a grid event's first batch is reductions), then recounts (either way),
        // then additions; each class keeps group order.
        cuts.sort_by_key(|c| {
            let old = self.groups[c.gi].cut;
            if old == usize::MAX || self.groups[c.gi].irregular_w.is_some() {
                1
            } else if c.n < old {
                0
            } else {
                2
            }
        });
        // Room for every change the cuts can make (a member changes at most once per cut), so
        // that a whole-fleet flip does not grow its list by doubling and copying.
        let bound: usize = cuts
            .iter()
            .map(|c| {
                let g = &self.groups[c.gi];
                let m = g.devices.len();
                if g.cut == usize::MAX || g.irregular_w.is_some() { m } else { c.n.abs_diff(g.cut).min(m) }
            })
            .sum();
        plan.changes.reserve(bound);
        PlanRun {
            seen_up: false,
            mixed: false,
            restarts: vec![0; self.feeder_limit_w.len()],
            d: self,
            plan,
            cuts,
            next: 0,
            which: which.to_vec(),
            skipped,
            handed: 0,
        }
    }

    /// How many members of each group the budget holds (cached while its inputs stay the same).
    fn site_caps(
        &mut self,
        s: usize,
        gs: &[usize],
        budget: f64,
        feeder_budget: &[f64],
        scale: &[f64],
    ) -> (Vec<usize>, Vec<bool>, bool) {
        let mut key = Vec::with_capacity(1 + feeder_budget.len() + 2 * gs.len());
        key.push(budget);
        key.extend_from_slice(feeder_budget);
        key.extend_from_slice(scale);
        key.extend(gs.iter().map(|&gi| self.groups[gi].version as f64));
        match &self.cap_cache[s] {
            Some(c) if c.key == key => (c.caps.clone(), c.hit.clone(), c.bound),
            _ => {
                let (caps, hit, bound) = self.cap_counts(gs, budget, feeder_budget, scale);
                self.cap_cache[s] = Some(CapCache { key, caps: caps.clone(), hit: hit.clone(), bound });
                (caps, hit, bound)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_site(
        &mut self,
        now_ms: i64,
        s: usize,
        sig: &SiteSignal,
        hashprice: f64,
        gpu: GpuBudget,
        commitments: &[Commitment],
        cuts: &mut Vec<Cut>,
        plan: &mut Plan,
    ) {
        let site = SiteIdx(s as u16);
        let mut limit = self.site_cap_w[s];
        let mut site_reason = None;
        for c in commitments.iter().filter(|c| c.site == site) {
            if c.limit_w() < limit {
                limit = c.limit_w();
                plan.reasons.push(Reason::GridCommitment {
                    site,
                    program: c.program,
                    limit_mw: limit / 1e6,
                    respond_by_ms: c.respond_by_ms,
                    policy_version: c.policy_version,
                });
                site_reason = Some(plan.reasons.len() as u32 - 1);
            }
        }
        if sig.schedule_limit_w < limit {
            limit = sig.schedule_limit_w.max(0.0);
            plan.reasons.push(Reason::Scheduled { site, limit_mw: limit / 1e6 });
            site_reason = Some(plan.reasons.len() as u32 - 1);
        }
        let age = now_ms - sig.price_at_ms;
        let stale = age > self.cfg.stale_price_ms;
        if stale {
            plan.reasons.push(Reason::StalePrice { site, age_ms: age, policy: self.cfg.safe_policy });
            site_reason = Some(plan.reasons.len() as u32 - 1);
        }
        let price = sig.price_usd_per_mwh + self.cfg.energy_adder_usd_per_mwh;
        plan.sites[s] = SitePlan {
            gpu_mw: gpu.planned_w / 1e6,
            gpu_idle_mw: 0.0,
            held_for_grid_mw: (self.site_cap_w[s] - limit) / 1e6,
            limit_mw: limit / 1e6,
            price_usd_per_mwh: sig.price_usd_per_mwh,
            stale,
            asic_mw: 0.0,
        };
        let gs = self.site_groups[s].clone();
        if !(stale && self.cfg.safe_policy == SafePolicy::Hold) {
            // Budgets after every member's idle draw, the held members and the GPUs; the GPUs are
            // capped only as far as the limit requires with every ASIC asleep.
            let mut budget = limit;
            let mut feeder_budget: Vec<f64> =
                self.site_feeders[s].iter().map(|f| self.feeder_limit_w[f.index()]).collect();
            for &gi in &gs {
                let g = &self.groups[gi];
                let fixed = g.idle_w + g.held_extra_w;
                budget -= fixed;
                feeder_budget[g.local_feeder] -= fixed;
            }
            let gpu_w = budget.clamp(gpu.min_w.min(gpu.planned_w), gpu.planned_w);
            if gpu_w < gpu.planned_w - 1e-6 {
                plan.reasons.push(Reason::GpusCapped { site, planned_mw: gpu.planned_w / 1e6, capped_mw: gpu_w / 1e6 });
                plan.sites[s].gpu_mw = gpu_w / 1e6;
            }
            let scale: Vec<f64> = gs.iter().map(|&gi| self.groups[gi].scale(hashprice, sig.ambient_c)).collect();
            let (mut caps, mut hit, mut bound) =
                self.site_caps(s, &gs, (budget - gpu_w).max(0.0), &feeder_budget, &scale);
            let mut budget = (budget - gpu_w).max(0.0);
            // The limit binds with every GPU serving: the GPUs with no work idle and give their
            // headroom to the ASICs (it comes back when demand does, see `GpusIdle`).
            if bound && gpu.idle_flex_w > 0.0 && gpu_w >= gpu.planned_w - 1e-6 {
                budget += gpu.idle_flex_w;
                (caps, hit, bound) = self.site_caps(s, &gs, budget, &feeder_budget, &scale);
                plan.reasons.push(Reason::GpusIdle { site, idle_gpus: gpu.idle_gpus, freed_mw: gpu.idle_flex_w / 1e6 });
                plan.sites[s].gpu_mw = (gpu_w - gpu.idle_flex_w) / 1e6;
                plan.sites[s].gpu_idle_mw = gpu.idle_flex_w / 1e6;
            }
            let mut cap_reason = site_reason;
            if bound && cap_reason.is_none() {
                plan.reasons.push(Reason::SiteCap {
                    site,
                    cap_mw: self.site_cap_w[s] / 1e6,
                    budget_for_asics_mw: budget / 1e6,
                });
                cap_reason = Some(plan.reasons.len() as u32 - 1);
            }
            let h = self.cfg.hysteresis_usd_per_mwh;
            for (k, &gi) in gs.iter().enumerate() {
                // Hysteresis: a price within the band of the last decided price keeps it.
                let decided = match self.groups[gi].anchor_price {
                    Some(a) if (price - a).abs() <= h => a,
                    _ => price,
                };
                if !stale {
                    self.groups[gi].anchor_price = Some(decided);
                }
                let g = &self.groups[gi];
                let held = if stale { None } else { g.strike };
                let econ = if stale || held.is_some() { 0 } else { g.count_above(decided, scale[k]) };
                let n = econ.min(caps[k]);
                let mut forced = if stale { site_reason } else { None };
                if let Some(h) = held
                    && (g.cut != n || g.irregular_w.is_some())
                {
                    plan.reasons.push(Reason::Strike {
                        site,
                        model: g.model_id.clone(),
                        price_usd_per_mwh: h.price_usd_per_mwh,
                        strike_usd_per_mwh: h.strike_usd_per_mwh,
                        policy_version: h.policy_version,
                    });
                    forced = Some(plan.reasons.len() as u32 - 1);
                }
                if n < econ {
                    forced = cap_reason;
                    if hit[k] && site_reason.is_none() {
                        let f = g.feeder;
                        plan.reasons
                            .push(Reason::FeederLimit { feeder: f, limit_mw: self.feeder_limit_w[f.index()] / 1e6 });
                        forced = Some(plan.reasons.len() as u32 - 1);
                    }
                }
                // The safe policy's shutdowns are forced like a cap's: no minimum on time holds them.
                let cap_cut = if stale { 0 } else { caps[k] };
                let g = &self.groups[gi];
                if g.cut != n || g.irregular_w.is_some() {
                    cuts.push(Cut { gi, n, cap_cut, price, scale: scale[k], forced });
                }
            }
        }
    }

    /// The counts the caps allow, independent of price (so that hysteresis can hold a group inside
    /// its band): every segment if all fit, else the most valuable ones up to the site budget, each
    /// feeder filled within its own budget. Returns the counts, whether each group's feeder bound
    /// it, and whether the site budget bound.
    fn cap_counts(
        &self,
        gs: &[usize],
        budget: f64,
        feeder_budget: &[f64],
        scale: &[f64],
    ) -> (Vec<usize>, Vec<bool>, bool) {
        let mut used = vec![0.0; feeder_budget.len()];
        // Site load when every segment worth more than `v` runs, each feeder filled in group order.
        let mut fit = |v: f64, out: &mut Vec<usize>, hit: &mut Vec<bool>| -> f64 {
            out.clear();
            hit.clear();
            used.iter_mut().for_each(|u| *u = 0.0);
            let mut total = 0.0;
            for (k, &gi) in gs.iter().enumerate() {
                let g = &self.groups[gi];
                let room = (feeder_budget[g.local_feeder] - used[g.local_feeder]).max(0.0);
                let want = g.count_above(v, scale[k]);
                let fits = g.count_fitting(room);
                hit.push(fits < want);
                let n = want.min(fits);
                used[g.local_feeder] += g.prefix_w[n];
                total += g.prefix_w[n];
                out.push(n);
            }
            total
        };
        let (mut caps, mut hit) = (Vec::with_capacity(gs.len()), Vec::with_capacity(gs.len()));
        if fit(f64::NEG_INFINITY, &mut caps, &mut hit) <= budget + 1e-6 {
            return (caps, hit, false);
        }
        // Raise the value threshold until the site fits: the least valuable segments go first.
        let (mut lo, mut hi) = (-1.0f64, 1.0f64);
        while fit(hi, &mut caps, &mut hit) > budget + 1e-6 && hi < 1e12 {
            hi *= 2.0;
        }
        while fit(lo, &mut caps, &mut hit) <= budget + 1e-6 && lo > -1e12 {
            lo *= 2.0;
        }
        while hi - lo > 1e-7 * hi.abs().max(1.0) {
            let mid = 0.5 * (lo + hi);
            if fit(mid, &mut caps, &mut hit) > budget + 1e-6 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        // Segments of equal value (identical devices) straddle the threshold: hand what is left
        // of the budget to the groups between `hi` and `lo`, most valuable first.
        let mut more = Vec::with_capacity(gs.len());
        let mut more_hit = Vec::with_capacity(gs.len());
        fit(lo, &mut more, &mut more_hit);
        let mut left = budget - fit(hi, &mut caps, &mut hit);
        let mut order: Vec<usize> = (0..gs.len()).filter(|&k| more[k] > caps[k]).collect();
        order.sort_by(|&a, &b| {
            let va = self.groups[gs[a]].seg_value[caps[a]] * scale[a];
            let vb = self.groups[gs[b]].seg_value[caps[b]] * scale[b];
            vb.total_cmp(&va).then(a.cmp(&b))
        });
        let mut feeder_used = vec![0.0; feeder_budget.len()];
        for (k, &gi) in gs.iter().enumerate() {
            feeder_used[self.groups[gi].local_feeder] += self.groups[gi].prefix_w[caps[k]];
        }
        for k in order {
            let g = &self.groups[gs[k]];
            let used = &mut feeder_used[g.local_feeder];
            let room = left.min(feeder_budget[g.local_feeder] - *used).max(0.0);
            let n = g.count_fitting(g.prefix_w[caps[k]] + room).min(more[k]).max(caps[k]);
            let add = g.prefix_w[n] - g.prefix_w[caps[k]];
            left -= add;
            *used += add;
            caps[k] = n;
        }
        (caps, hit, true)
    }

    /// Moves a group to its new cut and records the device changes.
    fn apply_cut(&mut self, cut: &Cut, now_ms: i64, restarts: &mut [u32], plan: &mut Plan) {
        let Cut { gi, n, cap_cut, price, scale, forced } = *cut;
        let g = &self.groups[gi];
        let old = g.cut;
        if old == n && g.irregular_w.is_none() {
            return;
        }
        // New level of each free member whose segments cross the cut. A member's segments appear
        // in level order, so moving the cut up raises it to its highest segment now inside, and
        // moving it down lowers it to just below its lowest segment now outside. An unknown cut
        // recounts every free member.
        let mut pending = std::mem::take(&mut self.groups[gi].pending);
        let g = &self.groups[gi];
        let mut touched: Vec<u32> = Vec::new();
        let free = |m: u32| g.member_free[m as usize];
        if old == usize::MAX {
            for j in 0..n {
                let m = g.seg_member[j] as usize;
                pending[m] = if pending[m] == u8::MAX { g.seg_level[j] } else { pending[m].max(g.seg_level[j]) };
            }
            // Level each member may keep under the caps: a move below it is forced.
            let mut at_cap = vec![0u8; g.devices.len()];
            for j in 0..cap_cut.min(g.seg_member.len()) {
                let m = g.seg_member[j] as usize;
                at_cap[m] = at_cap[m].max(g.seg_level[j]);
            }
            for m in 0..g.devices.len() as u32 {
                let mu = m as usize;
                if free(m) {
                    if pending[mu] == u8::MAX {
                        pending[mu] = 0;
                    }
                    if self.level[g.devices[mu] as usize] > at_cap[mu] {
                        pending[mu] |= FORCED;
                    }
                    touched.push(m);
                } else {
                    pending[mu] = u8::MAX;
                }
            }
        } else if n > old {
            for j in old..n {
                let m = g.seg_member[j];
                if free(m) {
                    let p = &mut pending[m as usize];
                    if *p == u8::MAX {
                        touched.push(m);
                        *p = g.seg_level[j];
                    } else {
                        *p = (*p).max(g.seg_level[j]);
                    }
                }
            }
        } else {
            for j in n..old {
                let m = g.seg_member[j];
                if free(m) {
                    let p = &mut pending[m as usize];
                    let forced = if j >= cap_cut { FORCED } else { 0 };
                    if *p == u8::MAX {
                        touched.push(m);
                        *p = (g.seg_level[j] - 1) | forced;
                    } else {
                        *p = ((*p & !FORCED).min(g.seg_level[j] - 1)) | (*p & FORCED) | forced;
                    }
                }
            }
        }
        let edge = |j: usize| g.seg_value.get(j).map_or(0.0, |v| v * scale);
        let (site, feeder, model) = (g.site, g.feeder, &g.model_id);
        let mut up_reason = None;
        let mut down_reason = forced;
        plan.changes.reserve(touched.len());
        let mut irregular = false;
        let mut blocked = 0u32;
        for m in touched {
            let p = std::mem::replace(&mut pending[m as usize], u8::MAX);
            let (mut to, forced_move) = (p & !FORCED, p & FORCED != 0);
            let dev = self.groups[gi].devices[m as usize];
            let i = dev as usize;
            let from = self.level[i];
            // Minimum on/off times: a restart waits; an economic shutdown stops at the lowest
            // running level. Moves the caps force are not held.
            if self.cooling(i, now_ms) {
                if from == 0 && to > 0 {
                    to = 0;
                } else if to == 0 && from > 0 && !forced_move {
                    to = 1;
                }
                if to != p & !FORCED {
                    irregular = true;
                    blocked += 1;
                }
            }
            if from == to {
                continue;
            }
            let reason = if to > from {
                *up_reason.get_or_insert_with(|| {
                    plan.reasons.push(Reason::PriceBelowValue {
                        site,
                        model: model.clone(),
                        price_usd_per_mwh: price,
                        value_usd_per_mwh: edge(n.saturating_sub(1)),
                    });
                    plan.reasons.len() as u32 - 1
                })
            } else {
                *down_reason.get_or_insert_with(|| {
                    plan.reasons.push(Reason::PriceAboveValue {
                        site,
                        model: model.clone(),
                        price_usd_per_mwh: price,
                        value_usd_per_mwh: edge(n),
                    });
                    plan.reasons.len() as u32 - 1
                })
            };
            let not_before_ms = if from == 0 {
                let r = &mut restarts[feeder.index()];
                let batch = *r / self.cfg.batch_size.max(1);
                *r += 1;
                now_ms + i64::from(batch) * self.cfg.batch_interval_ms
            } else {
                now_ms
            };
            if (from == 0) != (to == 0) {
                self.changed_ms[i] = now_ms;
            }
            self.level[i] = to;
            plan.changes.push(TargetChange {
                device: DeviceIdx(dev),
                from_level: from,
                to_level: to,
                power_w: self.groups[gi].level_w[to as usize],
                reason,
                not_before_ms,
            });
        }
        plan.blocked += blocked;
        let g = &mut self.groups[gi];
        g.pending = pending;
        g.cut = n;
        g.irregular_w = None;
        if irregular {
            // Some members sit off the prefix: account their exact draw and recount next time.
            let w: f64 = g
                .devices
                .iter()
                .filter(|&&d| self.skip[d as usize].is_none())
                .map(|&d| g.level_w[self.level[d as usize] as usize] - g.level_w[0])
                .sum();
            g.irregular_w = Some(w);
            g.cut = usize::MAX;
        }
    }
}
