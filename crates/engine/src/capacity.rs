//! The router's capacity from the power plan and the devices' state (pure).
//!
//! A replica is the fleet's served model on `gpus_per_replica` consecutive GPUs of one GPU group;
//! its id is the fleet index of its first GPU (stable across restarts while the fleet file is the
//! same). It holds sequences when the plan has its GPUs serving and every one of them is
//! available (alive, healthy, not in maintenance): as many as memory and the plan's power cap
//! allow ([`hcp_sim::gpu::replica_capacity`]); otherwise none.

use hcp_model::device::ModelRef;
use hcp_model::fleet::{Fleet, Group};
use hcp_model::ids::SiteIdx;

/// Mean request the capacity is sized for (economics.md: Llama-3-8B chat, 1,000 prompt and 400
/// output tokens).
pub const SIZING_PROMPT_TOKENS: f64 = 1_000.0;
pub const SIZING_OUTPUT_TOKENS: f64 = 400.0;

#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaCapacity {
    pub id: u32,
    pub site: SiteIdx,
    pub gpus: u32,
    /// Concurrent sequences it may hold now (0: out of service).
    pub slots: u32,
    pub kv_tokens: u64,
    /// The plan's power cap per GPU (W).
    pub cap_w: f64,
}

/// Every replica's capacity. `serving_cap_w[g]` is the plan's power cap for group `g` of `groups`
/// and how many of its GPUs serve (`None` for groups that are not GPUs); `available[d]` whether
/// device `d` may carry load.
pub fn replicas(
    fleet: &Fleet,
    groups: &[Group],
    serving_cap_w: &[Option<(u32, f64)>],
    available: &[bool],
) -> Vec<ReplicaCapacity> {
    let served = &fleet.served_model;
    let per = served.gpus_per_replica.max(1) as usize;
    let mut out = vec![];
    for (g, plan) in groups.iter().zip(serving_cap_w) {
        let (ModelRef::Gpu(m), Some((serving, cap_w))) = (g.model, plan) else { continue };
        let model = fleet.catalogue.gpu(m);
        let (slots, kv_tokens) =
            hcp_sim::gpu::replica_capacity(model, served, *cap_w, SIZING_PROMPT_TOKENS, SIZING_OUTPUT_TOKENS);
        let serving_replicas = *serving as usize / per;
        for (k, chunk) in g.devices.chunks(per).enumerate() {
            if chunk.len() < per {
                break;
            }
            let up = k < serving_replicas && chunk.iter().all(|d| available.get(d.index()).copied().unwrap_or(false));
            out.push(ReplicaCapacity {
                id: chunk[0].0,
                site: g.site,
                gpus: per as u32,
                slots: if up { slots } else { 0 },
                kv_tokens,
                cap_w: *cap_w,
            });
        }
    }
    out
}

/// The replicas whose capacity differs from `before` (all of them when `before` is empty).
pub fn changed<'a>(before: &[ReplicaCapacity], now: &'a [ReplicaCapacity]) -> Vec<&'a ReplicaCapacity> {
    if before.len() != now.len() {
        return now.iter().collect();
    }
    now.iter().zip(before).filter(|(a, b)| a != b).map(|(a, _)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet::from_toml("small.toml", include_str!("../../../examples/fleets/small.toml")).unwrap()
    }

    #[test]
    fn replicas_follow_the_plan_caps_and_availability() {
        let f = fleet();
        let groups = f.groups();
        let gpus: Vec<usize> =
            f.devices.iter().enumerate().filter(|(_, d)| matches!(d.model, ModelRef::Gpu(_))).map(|(i, _)| i).collect();
        let plan = |cap: f64| -> Vec<Option<(u32, f64)>> {
            groups.iter().map(|g| matches!(g.model, ModelRef::Gpu(_)).then(|| (g.count(), cap))).collect()
        };
        let mut avail = vec![true; f.devices.len()];
        let full = replicas(&f, &groups, &plan(700.0), &avail);
        assert_eq!(full.len(), gpus.len(), "one GPU per replica for Llama-3-8B");
        assert!(full.iter().all(|r| r.slots > 0 && r.kv_tokens > 0));
        assert!(changed(&[], &full).len() == full.len());
        // A deep cap leaves fewer sequences on every replica.
        let capped = replicas(&f, &groups, &plan(200.0), &avail);
        assert!(capped.iter().zip(&full).all(|(c, f)| c.slots < f.slots || c.id != f.id));
        // A GPU in maintenance takes its replica out; only that one changes.
        avail[gpus[3]] = false;
        let one_out = replicas(&f, &groups, &plan(700.0), &avail);
        let diff = changed(&full, &one_out);
        assert_eq!(diff.len(), 1);
        assert_eq!((diff[0].id, diff[0].slots), (gpus[3] as u32, 0));
        // GPUs the plan does not have serving hold nothing.
        let half: Vec<Option<(u32, f64)>> =
            groups.iter().map(|g| matches!(g.model, ModelRef::Gpu(_)).then(|| (g.count() / 2, 700.0))).collect();
        let h = replicas(&f, &groups, &half, &vec![true; f.devices.len()]);
        assert_eq!(h.iter().filter(|r| r.slots > 0).count(), gpus.len() / 2);
    }
}
