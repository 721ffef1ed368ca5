//! The router replay on the real Azure trace: the cut hits low bands first, nothing is lost.

use std::path::PathBuf;

use hcp_harness::replay::{ReplaySpec, replay};
use hcp_sim::replay::load_trace_csv;

#[test]
fn a_thirty_percent_cut_hits_the_lower_bands_and_loses_nothing() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/llm-traces/azure_llm_inference_2023_code.csv");
    let trace = load_trace_csv(&p.display().to_string(), std::fs::File::open(&p).unwrap()).unwrap();
    let r = replay(&trace, &ReplaySpec::default()).unwrap();
    let rejected: u64 = r.bands.iter().map(|b| b.rejected).sum();
    assert_eq!(r.completed + rejected, r.requests, "every request completed or was rejected with a reason");
    assert_eq!((r.replicas_before, r.replicas_after), (10, 7));
    let (top, low) = (&r.bands[0], &r.bands[2]);
    assert!(top.queue_ms_p99_after <= low.queue_ms_p99_after, "{top:?} vs {low:?}");
    assert!(low.queue_ms_p50_after > low.queue_ms_p50_before, "the cut lengthens the low band's queue");
    assert!(r.bands.iter().map(|b| b.preempted).sum::<u64>() > 0, "removing replicas preempts their work");
    let again = replay(&trace, &ReplaySpec::default()).unwrap();
    assert_eq!(r, again, "deterministic");
}
