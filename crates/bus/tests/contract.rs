//! One contract, two buses: the same checks in process and on NATS JetStream (the machine's server
//! at `HCP_TEST_NATS` or nats://127.0.0.1:4222; each test uses its own subject prefix).

use std::time::Duration;

use hcp_bus::*;

fn nats_url() -> String {
    std::env::var("HCP_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn next(s: &mut Subscription) -> Message {
    tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("a message within 10 s").unwrap()
}

async fn contract(bus: &Bus, prefix: &str) {
    bus.ping().await.unwrap();
    let a = format!("hcp.{prefix}.plan.site-a");
    let b = format!("hcp.{prefix}.plan.site-b");
    let t = format!("hcp.{prefix}.telemetry.site-a");
    let plans = format!("hcp.{prefix}.plan.*");
    let all = format!("hcp.{prefix}.>");

    let mut live = bus.subscribe(&plans, From::New).await.unwrap();
    let s1 = bus.publish(&a, b"one").await.unwrap();
    let s2 = bus.publish(&t, b"two").await.unwrap();
    let s3 = bus.publish(&b, b"three").await.unwrap();
    assert!(s1 < s2 && s2 < s3, "sequence numbers rise");
    let m = next(&mut live).await;
    assert_eq!((m.seq, m.subject.as_str(), m.payload.as_slice()), (s1, a.as_str(), &b"one"[..]));
    let m = next(&mut live).await;
    assert_eq!((m.seq, m.payload.as_slice()), (s3, &b"three"[..]), "the filter skips telemetry");

    // Replay from a sequence: everything on the subjects from there on, in order, once.
    let mut again = bus.subscribe(&all, From::Seq(s2)).await.unwrap();
    assert_eq!(next(&mut again).await.seq, s2);
    assert_eq!(next(&mut again).await.seq, s3);
    let s4 = bus.publish(&a, b"four").await.unwrap();
    assert_eq!(next(&mut again).await.seq, s4);
    assert_eq!(next(&mut live).await.seq, s4);

    // Many messages arrive in order.
    let mut burst = bus.subscribe(&all, From::New).await.unwrap();
    let mut seqs = vec![];
    for i in 0..500u32 {
        seqs.push(bus.publish(&t, &i.to_le_bytes()).await.unwrap());
    }
    for (i, s) in seqs.iter().enumerate() {
        let m = next(&mut burst).await;
        assert_eq!((m.seq, m.payload.as_slice()), (*s, &(i as u32).to_le_bytes()[..]));
    }

    // Bad input is refused and publishes nothing.
    assert!(matches!(bus.publish("other.x", b"").await, Err(BusError::Subject(_))));
    assert!(matches!(bus.publish(&format!("hcp.{prefix}.a b"), b"").await, Err(BusError::Subject(_))));
    assert!(matches!(bus.publish(&a, &vec![0u8; MAX_PAYLOAD + 1]).await, Err(BusError::TooLarge(_))));
    assert!(matches!(bus.subscribe("hcp.>.x", From::New).await, Err(BusError::Subject(_))));
    let s5 = bus.publish(&a, b"five").await.unwrap();
    assert_eq!(next(&mut live).await.seq, s5, "nothing was published by the refused calls");
}

#[tokio::test]
async fn in_process_bus_keeps_the_contract() {
    let bus = Bus::connect(None, Limits::default()).await.unwrap();
    assert_eq!(bus.kind(), "inproc");
    contract(&bus, "local").await;
}

#[tokio::test]
async fn nats_jetstream_keeps_the_contract() {
    let bus = Bus::connect(Some(&nats_url()), Limits::default()).await.expect("NATS at 127.0.0.1:4222 (see .ci/run)");
    assert_eq!(bus.kind(), "nats");
    let prefix = format!("t{}", std::process::id());
    contract(&bus, &prefix).await;
}

#[tokio::test]
async fn history_is_bounded_and_a_gap_is_reported() {
    let bus = Bus::connect(None, Limits { max_messages: 10, ..Limits::default() }).await.unwrap();
    for i in 0..25u32 {
        bus.publish("hcp.g.x", &i.to_le_bytes()).await.unwrap();
    }
    assert!(matches!(bus.subscribe("hcp.g.>", From::Seq(1)).await, Err(BusError::Gap { from: 1, oldest: 16 })));
    let mut s = bus.subscribe("hcp.g.>", From::Seq(16)).await.unwrap();
    assert_eq!(next(&mut s).await.seq, 16);
    assert!(matches!(Bus::connect(Some("kafka://x"), Limits::default()).await, Err(BusError::Url(_))));
}

#[test]
fn subject_filters_follow_nats_rules() {
    assert!(matches("hcp.plan.*", "hcp.plan.a"));
    assert!(!matches("hcp.plan.*", "hcp.plan.a.b"));
    assert!(matches("hcp.>", "hcp.plan.a.b"));
    assert!(!matches("hcp.plan", "hcp.plan.a"));
}
