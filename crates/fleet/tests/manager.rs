//! Resource manager scenarios and the convergence property.

use hcp_fleet::*;
use hcp_model::fleet::Fleet;
use hcp_model::ids::{DeviceIdx, RackIdx, SiteIdx};
use proptest::prelude::*;

/// One site, one feeder, two racks of four S21s.
const FLEET: &str = r#"
name = "t"
[[site]]
id = "a"
power_cap_mw = 1.0
settlement_point = "HB_WEST"
[[site.feeder]]
id = "f1"
limit_kw = 500.0
[[site.feeder.rack]]
count = 2
devices = [{ model = "antminer-s21", count = 4 }]
"#;

fn fleet() -> Fleet {
    Fleet::from_toml("t.toml", FLEET).unwrap()
}

fn report(state: Target, power_w: f64) -> Report {
    // S21: 200 TH/s at 3,500 W.
    let hashrate_ths = match state {
        Target::Run { .. } => Some(200.0 * power_w / 3_500.0),
        Target::Sleep => Some(0.0),
    };
    Report { state, power_w, hashrate_ths, temp_c: 60.0, errors: 0 }
}

fn run(w: f64) -> Target {
    Target::Run { power_w: w }
}

fn manager() -> Manager {
    Manager::new(&fleet(), ManagerConfig { per_feeder_per_tick: 3, ..Default::default() }).unwrap()
}

#[test]
fn commands_move_devices_to_their_intent_staggered_and_idempotent() {
    let mut m = manager();
    for i in 0..8 {
        m.telemetry(DeviceIdx(i), report(Target::Sleep, 10.0), 0).unwrap();
        m.set_intent(DeviceIdx(i), run(3_500.0)).unwrap();
    }
    let (mut cmds, mut ev) = (vec![], vec![]);
    m.tick(1_000, &mut cmds, &mut ev);
    assert_eq!(cmds.len(), 3, "wake-ups are staggered per feeder");
    // A second tick at the same instant (the rest of a plan sent in steps) shares its budget.
    m.tick(1_000, &mut cmds, &mut ev);
    assert_eq!(cmds.len(), 3, "one budget per instant");
    let first = cmds.clone();
    cmds.clear();
    m.tick(2_000, &mut cmds, &mut ev);
    assert_eq!(cmds.len(), 3, "the next three, not the same again");
    assert!(cmds.iter().all(|c| !first.iter().any(|f| f.device == c.device)));
    // The agent answers; a duplicate answer changes nothing.
    let e = m.command_result(first[0].id, first[0].device, Outcome::Applied, 2_500);
    assert_eq!(e.len(), 1);
    assert!(m.command_result(first[0].id, first[0].device, Outcome::Applied, 2_600).is_empty());
    // A device already in its target gets nothing; reductions are not staggered.
    for i in 0..8 {
        m.telemetry(DeviceIdx(i), report(run(3_500.0), 3_450.0), 2_900).unwrap();
    }
    cmds.clear();
    m.tick(2_950, &mut cmds, &mut ev);
    assert!(cmds.is_empty(), "{cmds:?}");
    for i in 0..8 {
        m.set_intent(DeviceIdx(i), Target::Sleep).unwrap();
    }
    cmds.clear();
    m.tick(3_000, &mut cmds, &mut ev);
    assert_eq!(cmds.len(), 8, "{cmds:?}");
    assert!(cmds.iter().all(|c| c.target == Target::Sleep));
}

#[test]
fn timeouts_retry_with_the_same_id_then_give_up() {
    let mut m = manager();
    m.set_intent(DeviceIdx(0), run(3_500.0)).unwrap();
    let mut ev = vec![];
    let mut sent = vec![];
    // The device stays alive (it reports) but never answers and never changes.
    for now in (0..120_000).step_by(1_000) {
        m.telemetry(DeviceIdx(0), report(Target::Sleep, 10.0), now).unwrap();
        let mut cmds = vec![];
        m.tick(now, &mut cmds, &mut ev);
        sent.extend(cmds.iter().map(|c| (c.id, c.attempt)));
    }
    assert_eq!(sent.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2, 3], "{sent:?}");
    assert!(sent.iter().all(|x| x.0 == sent[0].0), "one id across retries: {sent:?}");
    assert!(ev.iter().any(|e| matches!(e, Event::GaveUp { .. })), "{ev:?}");
}

#[test]
fn silent_devices_turn_unknown_and_leave_capacity() {
    let mut m = manager();
    m.telemetry(DeviceIdx(2), report(run(3_500.0), 3_500.0), 0).unwrap();
    assert!(m.availability()[2]);
    let mut ev = vec![];
    m.tick(31_000, &mut vec![], &mut ev);
    assert_eq!(ev, vec![Event::Unknown { device: DeviceIdx(2) }]);
    assert!(!m.availability()[2]);
    let back = m.telemetry(DeviceIdx(2), report(run(3_500.0), 3_500.0), 32_000).unwrap();
    assert_eq!(back, vec![Event::Back { device: DeviceIdx(2) }]);
    assert!(m.availability()[2]);
}

#[test]
fn sick_devices_are_quarantined_slept_and_return_on_probation() {
    let mut m = manager();
    let d = DeviceIdx(1);
    m.set_intent(d, run(3_500.0)).unwrap();
    // Hashrate at half the expected, three reports in a row.
    let mut sick = report(run(3_500.0), 3_500.0);
    sick.hashrate_ths = Some(100.0);
    let mut ev = vec![];
    for t in 0..3 {
        ev.extend(m.telemetry(d, sick, t * 1_000).unwrap());
    }
    let Some(Event::Quarantined { until_ms, .. }) = ev.last().cloned() else { panic!("{ev:?}") };
    assert_eq!(until_ms, 2_000 + 1_800_000);
    assert!(!m.availability()[1]);
    let mut cmds = vec![];
    m.tick(3_000, &mut cmds, &mut ev);
    assert_eq!(cmds.iter().map(|c| (c.device, c.target)).collect::<Vec<_>>(), vec![(d, Target::Sleep)]);
    // It returns on probation; a relapse (over temperature: at once) doubles the period.
    m.telemetry(d, report(Target::Sleep, 10.0), until_ms - 1).unwrap();
    ev.clear();
    m.tick(until_ms, &mut vec![], &mut ev);
    assert!(ev.contains(&Event::Returned { device: d }), "{ev:?}");
    let mut hot = report(run(3_500.0), 3_500.0);
    hot.temp_c = 95.0;
    let e = m.telemetry(d, hot, until_ms + 1).unwrap();
    assert!(matches!(&e[0], Event::Quarantined { until_ms: u, .. } if *u == until_ms + 1 + 3_600_000), "{e:?}");
    assert!(m.release_quarantine(d).unwrap());
    assert!(m.availability()[1]);
}

#[test]
fn maintenance_by_rack_or_site_excludes_and_keeps_intent() {
    let mut m = manager();
    for i in 0..8 {
        m.telemetry(DeviceIdx(i), report(Target::Sleep, 10.0), 0).unwrap();
        m.set_intent(DeviceIdx(i), Target::Sleep).unwrap();
    }
    assert_eq!(m.set_maintenance(Scope::Rack(RackIdx(1)), true).unwrap(), 4);
    assert_eq!(m.availability().iter().filter(|a| **a).count(), 4);
    assert_eq!(m.set_maintenance(Scope::Site(SiteIdx(0)), false).unwrap(), 4);
    assert!(m.set_maintenance(Scope::Site(SiteIdx(7)), true).is_err());
    assert!(m.set_maintenance(Scope::Device(DeviceIdx(99)), true).is_err());
    m.set_maintenance(Scope::Device(DeviceIdx(3)), true).unwrap();
    m.set_intent(DeviceIdx(3), run(3_000.0)).unwrap();
    let mut cmds = vec![];
    m.tick(1_000, &mut cmds, &mut vec![]);
    assert!(cmds.is_empty(), "no commands to a device in maintenance: {cmds:?}");
    assert_eq!(m.view(DeviceIdx(3)).unwrap().intent, Some(run(3_000.0)));
}

#[test]
fn bad_inputs_are_refused_and_change_nothing() {
    let mut m = manager();
    assert!(m.set_intent(DeviceIdx(0), run(f64::NAN)).is_err());
    assert!(m.set_intent(DeviceIdx(100), Target::Sleep).is_err());
    let mut r = report(Target::Sleep, 10.0);
    r.power_w = -1.0;
    assert!(m.telemetry(DeviceIdx(0), r, 0).is_err());
    assert_eq!(m.view(DeviceIdx(0)).unwrap().last_seen_ms, None);
    assert!(Manager::new(&fleet(), ManagerConfig { batch_max: 0, ..Default::default() }).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Devices that apply commands after a delay, lose some answers and fail some commands still
    /// reach their intents once the plan stops changing; no tick sends two commands to one device
    /// or more than the batch cap.
    #[test]
    fn reconcile_converges(
        intents in proptest::collection::vec((0u32..8, 0u8..3), 1..40),
        faults in proptest::collection::vec(0u8..10, 50..200),
    ) {
        let cfg = ManagerConfig { batch_max: 5, per_feeder_per_tick: 2, ..Default::default() };
        let mut m = Manager::new(&fleet(), cfg).unwrap();
        let mut state: Vec<Target> = vec![Target::Sleep; 8];
        let mut want: Vec<Option<Target>> = vec![None; 8];
        for (d, t) in &intents {
            let t = match t { 0 => Target::Sleep, 1 => run(2_500.0), _ => run(3_500.0) };
            m.set_intent(DeviceIdx(*d), t).unwrap();
            want[*d as usize] = Some(t);
        }
        let mut queue: Vec<(i64, Command)> = vec![];
        for step in 0..400usize {
            let now = step as i64 * 1_000;
            for (i, s) in state.iter().enumerate() {
                let p = match s { Target::Run { power_w } => *power_w, Target::Sleep => 10.0 };
                m.telemetry(DeviceIdx(i as u32), report(*s, p), now).unwrap();
            }
            // Commands land 1.5 s after they are sent; fault 0 fails one, fault 1 loses its answer.
            let (due, later): (Vec<_>, Vec<_>) = queue.drain(..).partition(|(t, _)| *t <= now);
            queue = later;
            for (k, (_, c)) in due.into_iter().enumerate() {
                match faults[(step + k) % faults.len()] {
                    0 => { m.command_result(c.id, c.device, Outcome::Failed("busy".into()), now); }
                    1 => state[c.device.index()] = c.target,
                    _ => {
                        state[c.device.index()] = c.target;
                        m.command_result(c.id, c.device, Outcome::Applied, now);
                    }
                }
            }
            let mut cmds = vec![];
            m.tick(now, &mut cmds, &mut vec![]);
            prop_assert!(cmds.len() <= 5);
            let mut seen = std::collections::BTreeSet::new();
            for c in &cmds {
                prop_assert!(seen.insert(c.device), "two commands to one device in one tick");
                queue.push((now + 1_500, *c));
            }
        }
        for (i, w) in want.iter().enumerate() {
            if let Some(t) = w {
                prop_assert_eq!(state[i], *t, "device {} did not converge", i);
            }
        }
    }
}
