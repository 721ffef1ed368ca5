//! The fast-path dispatcher: golden merit order and breakevens, caps, commitments, hysteresis,
//! cooldowns, skips, stale prices, staggering, and a property test of the caps.

use hcp_econ::dispatch::*;
use hcp_model::fleet::Fleet;
use hcp_model::signals::GridProgram;
use hcp_model::{DeviceIdx, SiteIdx};
use proptest::prelude::*;

const FLEET: &str = r#"
name = "two-models"
[[site]]
id = "s"
power_cap_mw = 2.0
settlement_point = "HB_SOUTH"
  [[site.feeder]]
  id = "old"
  limit_kw = 400
    [[site.feeder.rack]]
    count = 10
    devices = [{ model = "antminer-s19-xp", count = 10 }]
  [[site.feeder]]
  id = "new"
  limit_kw = 400
    [[site.feeder.rack]]
    count = 10
    devices = [{ model = "antminer-s21-xp", count = 10 }]
"#;

fn fleet(src: &str) -> Fleet {
    Fleet::from_toml("t.toml", src).unwrap()
}

fn cfg() -> DispatchConfig {
    DispatchConfig { hysteresis_usd_per_mwh: 0.0, min_on_ms: 0, min_off_ms: 0, ..Default::default() }
}

fn sig(price: f64, at: i64) -> Vec<SiteSignal> {
    vec![SiteSignal::new(price, at, 20.0)]
}

fn levels(d: &Dispatcher, range: std::ops::Range<u32>) -> Vec<u8> {
    range.map(|i| d.level(DeviceIdx(i))).collect()
}

fn site_w(d: &Dispatcher, f: &Fleet) -> f64 {
    (0..f.devices.len() as u32).filter_map(|i| d.power_w(DeviceIdx(i))).sum()
}

/// Hand-computed values at 50 USD/PH/day, 4 running levels from 80 % to 100 % of nameplate:
/// S19 XP segments 107.06, 62.55, 60.65, 58.94 USD/MWh; S21 XP 170.19, 99.61, 96.59, 93.87.
#[test]
fn golden_merit_order_and_breakevens() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    let check = |d: &mut Dispatcher, price: f64, s19: u8, s21: u8, t: i64| {
        let p = d.plan(t, &sig(price, t), 50.0, &[GpuBudget::default()], &[]);
        assert!(levels(d, 0..100).iter().all(|&l| l == s19), "S19 XP at {price}: {:?}", levels(d, 0..3));
        assert!(levels(d, 100..200).iter().all(|&l| l == s21), "S21 XP at {price}: {:?}", levels(d, 100..103));
        p
    };
    check(&mut d, 20.0, 4, 4, 0);
    check(&mut d, 59.5, 3, 4, 1);
    check(&mut d, 61.0, 2, 4, 2);
    check(&mut d, 95.0, 1, 3, 3);
    check(&mut d, 100.0, 1, 1, 4);
    let p = check(&mut d, 110.0, 0, 1, 5);
    // The S19 XP curtailment says why, with the value of the segment it gave up.
    let c = p.changes.iter().find(|c| c.device == DeviceIdx(0)).unwrap();
    match &p.reasons[c.reason as usize] {
        Reason::PriceAboveValue { model, price_usd_per_mwh, value_usd_per_mwh, .. } => {
            assert_eq!(model, "antminer-s19-xp");
            assert_eq!(*price_usd_per_mwh, 110.0);
            assert!((value_usd_per_mwh - 107.057).abs() < 0.01, "{value_usd_per_mwh}");
        }
        r => panic!("unexpected reason {r:?}"),
    }
    check(&mut d, 171.0, 0, 0, 6);
    // Restored most efficient first.
    let p = check(&mut d, 150.0, 0, 1, 7);
    assert!(p.changes.iter().all(|c| c.device.0 >= 100 && c.to_level == 1));
    assert!(matches!(p.reasons[p.changes[0].reason as usize], Reason::PriceBelowValue { .. }));
}

#[test]
fn the_site_cap_curtails_the_least_valuable_segments_first() {
    let f = fleet(&FLEET.replace("power_cap_mw = 2.0", "power_cap_mw = 0.5"));
    let mut d = Dispatcher::new(&f, cfg(), 0);
    let p = d.plan(
        0,
        &sig(20.0, 0),
        50.0,
        &[GpuBudget { planned_w: 50_000.0, min_w: 50_000.0, ..Default::default() }],
        &[],
    );
    let w = site_w(&d, &f);
    assert!(w + 50_000.0 <= 500_000.0 + 1e-6, "{w}");
    assert!(w + 50_000.0 > 500_000.0 - 3_700.0, "the cap is used up to one segment: {w}");
    // The S21 XP (more valuable everywhere) keep running; S19 XP underclock or sleep.
    assert!(levels(&d, 100..200).iter().all(|&l| l >= 1));
    assert!(levels(&d, 0..100).iter().any(|&l| l < 4));
    assert!(p.reasons.iter().any(|r| matches!(r, Reason::SiteCap { .. })));
    assert!((p.sites[0].asic_mw - w / 1e6).abs() < 1e-9);
}

#[test]
fn a_feeder_limit_binds_on_its_own() {
    let f = fleet(&FLEET.replace(
        "limit_kw = 400\n    [[site.feeder.rack]]\n    count = 10\n    devices = [{ model = \"antminer-s21-xp\"",
        "limit_kw = 300\n    [[site.feeder.rack]]\n    count = 10\n    devices = [{ model = \"antminer-s21-xp\"",
    ));
    let mut d = Dispatcher::new(&f, cfg(), 0);
    let p = d.plan(0, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    let s21: f64 = (100..200).filter_map(|i| d.power_w(DeviceIdx(i))).sum();
    assert!(s21 <= 300_000.0 + 1e-6, "{s21}");
    assert!(levels(&d, 0..100).iter().all(|&l| l == 4), "the other feeder is unaffected");
    assert!(p.reasons.iter().any(|r| matches!(r, Reason::FeederLimit { .. })));
}

#[test]
fn a_grid_commitment_is_met_at_once_with_its_reason() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    d.plan(0, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    let before = site_w(&d, &f);
    let c = Commitment {
        site: SiteIdx(0),
        program: GridProgram::Ers10,
        kind: ReduceKind::By { mw: 0.3, baseline_mw: before / 1e6 },
        respond_by_ms: 600_000,
        policy_version: None,
    };
    let p = d.plan(1, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[c]);
    let after = site_w(&d, &f);
    assert!(after <= before - 300_000.0 + 1e-6, "{before} -> {after}");
    assert!(p.changes.iter().all(|c| c.not_before_ms <= 600_000), "within the response time");
    let r = &p.reasons[p.changes[0].reason as usize];
    assert!(matches!(r, Reason::GridCommitment { program: GridProgram::Ers10, .. }), "{r:?}");
    assert!((p.sites[0].held_for_grid_mw - (2.0 - (before - 300_000.0) / 1e6)).abs() < 1e-9);
}

#[test]
fn gpus_are_capped_only_when_the_asics_cannot_make_room() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    let gpu = GpuBudget { planned_w: 300_000.0, min_w: 120_000.0, ..Default::default() };
    let p = d.plan(0, &sig(20.0, 0), 50.0, &[gpu], &[]);
    assert_eq!(p.sites[0].gpu_mw, 0.3, "no obligation: GPUs keep their budget");
    // An ERS deployment to 0.2 MW: every ASIC sleeps (5 kW idle) and the GPUs give the rest.
    let ers = Commitment {
        site: SiteIdx(0),
        program: GridProgram::Ers10,
        kind: ReduceKind::To { mw: 0.2 },
        respond_by_ms: 600_000,
        policy_version: None,
    };
    let p = d.plan(1, &sig(20.0, 1), 50.0, &[gpu], &[ers]);
    assert!(levels(&d, 0..200).iter().all(|&l| l == 0));
    assert!((p.sites[0].gpu_mw - (0.2 - 0.005)).abs() < 1e-9, "{}", p.sites[0].gpu_mw);
    assert!(p.reasons.iter().any(|r| matches!(r, Reason::GpusCapped { .. })));
    // Deeper than the GPUs' lowest caps: they stop at their floor.
    let deep = Commitment { kind: ReduceKind::To { mw: 0.05 }, ..ers };
    let p = d.plan(2, &sig(20.0, 2), 50.0, &[gpu], &[deep]);
    assert_eq!(p.sites[0].gpu_mw, 0.12);
}

#[test]
fn hysteresis_holds_inside_the_band() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(
        &f,
        DispatchConfig { hysteresis_usd_per_mwh: 5.0, min_on_ms: 0, min_off_ms: 0, ..Default::default() },
        0,
    );
    d.plan(0, &sig(105.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(levels(&d, 0..1), vec![1]);
    // 107.06 is the S19 XP on-segment: prices of 108-109 are inside the band of 105.
    for (t, price) in [(1, 108.0), (2, 109.0), (3, 106.0)] {
        let p = d.plan(t, &sig(price, t), 50.0, &[GpuBudget::default()], &[]);
        assert!(p.changes.is_empty(), "price {price}: {} changes", p.changes.len());
    }
    let p = d.plan(4, &sig(111.0, 4), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(p.changes.len(), 100);
}

#[test]
fn cooldown_and_skips_hold_devices_with_reasons() {
    let f = fleet(FLEET);
    let c = DispatchConfig {
        hysteresis_usd_per_mwh: 0.0,
        min_on_ms: 300_000,
        min_off_ms: 300_000,
        stale_telemetry_ms: 60_000,
        ..Default::default()
    };
    let mut d = Dispatcher::new(&f, c, 0);
    d.set_maintenance(DeviceIdx(100), true);
    let p = d.plan(0, &sig(200.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert!(levels(&d, 0..100).iter().all(|&l| l == 0));
    assert_eq!(d.level(DeviceIdx(100)), 4, "maintenance holds");
    assert!(p.skipped.contains(&(Skip::Maintenance, 1)));
    // Price falls a minute later: everything is inside its minimum off time.
    for i in 0..200 {
        d.observe(DeviceIdx(i), 60_000, 1.0, false);
    }
    let p = d.plan(60_000, &sig(10.0, 60_000), 50.0, &[GpuBudget::default()], &[]);
    assert!(p.changes.is_empty());
    assert!(p.skipped.contains(&(Skip::Cooldown, 199)), "{:?}", p.skipped);
    for i in 0..200 {
        d.observe(DeviceIdx(i), 300_000, 1.0, i == 5);
    }
    let p = d.plan(300_000, &sig(10.0, 300_000), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(levels(&d, 0..5), vec![4; 5]);
    assert_eq!(d.level(DeviceIdx(5)), 0, "a faulted miner is not restarted");
    assert!(p.skipped.contains(&(Skip::Faulted, 1)));
    // Telemetry goes quiet for device 7: it is held, stale.
    for i in (0..200).filter(|&i| i != 7) {
        d.observe(DeviceIdx(i), 400_000, 1.0, false);
    }
    let p = d.plan(400_000, &sig(10.0, 400_000), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(d.skip(DeviceIdx(7)), Some(Skip::StaleTelemetry));
    assert!(p.skipped.contains(&(Skip::StaleTelemetry, 1)));
}

/// A device that only stops reporting (nothing else about its group changes) is found stale by the
/// next plan, held, and planned again once it reports.
#[test]
fn a_silent_device_goes_stale_by_itself_and_returns_when_it_reports() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    d.plan(0, &sig(200.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(levels(&d, 0..100), vec![0; 100]);
    for t in (10_000..=120_000).step_by(10_000) {
        for i in (0..200).filter(|&i| i != 42) {
            d.observe(DeviceIdx(i), t, 1.0, false);
        }
    }
    let p = d.plan(120_000, &sig(10.0, 120_000), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(d.skip(DeviceIdx(42)), Some(Skip::StaleTelemetry));
    assert!(p.skipped.contains(&(Skip::StaleTelemetry, 1)), "{:?}", p.skipped);
    assert_eq!(d.level(DeviceIdx(42)), 0, "held where it was");
    assert_eq!(d.level(DeviceIdx(41)), 4);
    d.observe(DeviceIdx(42), 130_000, 1.0, false);
    let p = d.plan(130_000, &sig(10.0, 130_000), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(d.skip(DeviceIdx(42)), None);
    assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    assert_eq!(d.level(DeviceIdx(42)), 4);
}

#[test]
fn minimum_on_time_underclocks_instead_of_stopping_unless_a_cap_forces_it() {
    let f = fleet(FLEET);
    let c = DispatchConfig { hysteresis_usd_per_mwh: 0.0, min_on_ms: 300_000, min_off_ms: 0, ..Default::default() };
    let mut d = Dispatcher::new(&f, c, 0);
    d.plan(0, &sig(500.0, 0), 50.0, &[GpuBudget::default()], &[]);
    d.plan(1_000, &sig(10.0, 1_000), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(levels(&d, 0..2), vec![4, 4]);
    // A spike a minute after the restart: economic shutdowns stop at the lowest running level.
    let p = d.plan(60_000, &sig(500.0, 60_000), 50.0, &[GpuBudget::default()], &[]);
    assert!(levels(&d, 0..200).iter().all(|&l| l == 1));
    assert_eq!(p.blocked, 200);
    assert!(p.skipped.contains(&(Skip::Cooldown, 200)));
    assert!((p.sites[0].asic_mw - site_w(&d, &f) / 1e6).abs() < 1e-9);
    // An ERS deployment forces the reduction despite the minimum on time.
    let ers = Commitment {
        site: SiteIdx(0),
        program: GridProgram::Ers10,
        kind: ReduceKind::To { mw: 0.1 },
        respond_by_ms: 660_000,
        policy_version: None,
    };
    for i in 0..200 {
        d.observe(DeviceIdx(i), 61_000, 1.0, false);
    }
    d.plan(61_000, &sig(500.0, 61_000), 50.0, &[GpuBudget::default()], &[ers]);
    assert!(site_w(&d, &f) <= 100_000.0 + 1e-6, "{}", site_w(&d, &f));
}

#[test]
fn restarts_are_staggered_per_feeder() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    d.plan(0, &sig(500.0, 0), 50.0, &[GpuBudget::default()], &[]);
    let p = d.plan(1, &sig(10.0, 1), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(p.changes.len(), 200);
    let batches: std::collections::BTreeSet<i64> = p.changes.iter().map(|c| c.not_before_ms).collect();
    assert_eq!(batches.len(), 10, "100 per feeder in batches of 10");
    assert_eq!(*batches.iter().max().unwrap(), 1 + 9 * 5_000);
    assert_eq!(p.changes.iter().filter(|c| c.not_before_ms == 1).count(), 20);
}

#[test]
fn a_stale_price_falls_back_to_the_safe_policy() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    d.plan(0, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    let t = 21 * 60_000;
    for i in 0..200 {
        d.observe(DeviceIdx(i), t, 1.0, false);
    }
    let p = d.plan(t, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert!(levels(&d, 0..200).iter().all(|&l| l == 0));
    assert!(p.sites[0].stale);
    assert!(matches!(p.reasons[p.changes[0].reason as usize], Reason::StalePrice { policy: SafePolicy::Curtail, .. }));
    let mut hold = Dispatcher::new(&f, DispatchConfig { safe_policy: SafePolicy::Hold, ..cfg() }, 0);
    hold.plan(0, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    for i in 0..200 {
        hold.observe(DeviceIdx(i), t, 1.0, false);
    }
    let p = hold.plan(t, &sig(500.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert!(p.changes.is_empty() && p.skipped.is_empty());
    assert!(matches!(p.reasons[0], Reason::StalePrice { policy: SafePolicy::Hold, .. }));
}

#[test]
fn measured_efficiency_reorders_the_merit_order() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    // One S21 XP runs 80 % worse than nameplate: its on-segment falls to 170.19 / 1.8 = 94.5.
    d.observe(DeviceIdx(150), 0, 1.8, false);
    d.plan(0, &sig(100.0, 0), 50.0, &[GpuBudget::default()], &[]);
    assert_eq!(d.level(DeviceIdx(150)), 0);
    assert_eq!(d.level(DeviceIdx(151)), 1);
}

const MODELS: [&str; 7] = [
    "antminer-s19-xp",
    "antminer-s21",
    "antminer-s21-pro",
    "antminer-s21-xp",
    "antminer-s21-plus-hydro",
    "whatsminer-m66s-plus",
    "whatsminer-m60s",
];

fn random_fleet(cap_mw: f64, a: (usize, u32), b: (usize, u32), limit_kw: f64) -> Fleet {
    fleet(&format!(
        r#"
name = "random"
[[site]]
id = "s"
power_cap_mw = {cap_mw}
settlement_point = "P"
  [[site.feeder]]
  id = "a"
  limit_kw = {limit_kw}
    [[site.feeder.rack]]
    devices = [{{ model = "{}", count = {} }}, {{ model = "{}", count = {} }}]
  [[site.feeder]]
  id = "b"
  limit_kw = {limit_kw}
    [[site.feeder.rack]]
    devices = [{{ model = "{}", count = {} }}]
"#,
        MODELS[a.0],
        a.1,
        MODELS[b.0],
        b.1,
        MODELS[(a.0 + b.0) % 7],
        a.1.max(b.1)
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For random fleets and any sequence of prices, caps, GPU budgets, commitments and
    /// maintenance, the draw never exceeds the site limit or a feeder limit: not after the plan,
    /// and not at any instant while its changes execute in order (reductions first, restarts
    /// staggered), counting held devices and idle draw.
    #[test]
    fn plans_never_exceed_caps_at_any_instant(
        cap_mw in 0.05f64..1.0,
        a in (0usize..7, 1u32..60),
        b in (0usize..7, 1u32..60),
        prices in proptest::collection::vec(-50.0f64..400.0, 1..12),
        gpu_kw in 0.0f64..40.0,
        reduce in proptest::option::of(0.0f64..0.5),
        hp in 20.0f64..80.0,
        maint in proptest::collection::vec(0u32..40, 0..8),
    ) {
        let f = random_fleet(cap_mw, a, b, 800.0);
        let n = f.devices.len() as u32;
        // Minimum on/off times of 2 s against 1 s between plans: cooldowns hold devices often.
        let mut d = Dispatcher::new(&f, DispatchConfig { min_on_ms: 2_000, min_off_ms: 2_000, ..Default::default() }, 0);
        let mut held: Vec<u32> = maint.iter().copied().filter(|m| *m < n).collect();
        held.sort_unstable();
        held.dedup();
        for m in &held {
            d.set_maintenance(DeviceIdx(*m), true);
        }
        let commitments: Vec<Commitment> = reduce
            .map(|mw| Commitment { site: SiteIdx(0), program: GridProgram::Ecrs, kind: ReduceKind::To { mw }, respond_by_ms: 0, policy_version: None })
            .into_iter()
            .collect();
        for (t, price) in prices.iter().enumerate() {
            let t = t as i64 * 1_000;
            for i in 0..n {
                d.observe(DeviceIdx(i), t, 1.0, false);
            }
            let mut power: Vec<f64> = (0..n).map(|i| d.power_w(DeviceIdx(i)).unwrap()).collect();
            let gpu = GpuBudget { planned_w: gpu_kw * 1e3, min_w: gpu_kw * 0.5e3, ..Default::default() };
            let p = d.plan(t, &sig(*price, t), hp, &[gpu], &commitments);
            let gpu_w = p.sites[0].gpu_mw * 1e6;
            prop_assert!(gpu_w >= gpu.min_w - 1e-6 && gpu_w <= gpu.planned_w + 1e-6);
            let limit = p.sites[0].limit_mw * 1e6 - gpu_w;
            let idle: f64 = (0..n).map(|i| d.level_powers_w(DeviceIdx(i)).unwrap()[0]).sum();
            let fixed: f64 = held.iter().map(|&m| power[m as usize] - d.level_powers_w(DeviceIdx(m)).unwrap()[0]).sum::<f64>() + idle;
            let feeder_of = |i: u32| f.devices[i as usize].feeder.index();
            let mut total: f64 = power.iter().sum();
            let start = total;
            let mut worst: f64 = total;
            let mut feeders = [0.0f64; 2];
            for (i, w) in power.iter().enumerate() {
                feeders[feeder_of(i as u32)] += w;
            }
            let start_feeders = feeders;
            let mut worst_feeders = feeders;
            for c in &p.changes {
                let i = c.device.0 as usize;
                total += c.power_w - power[i];
                feeders[feeder_of(c.device.0)] += c.power_w - power[i];
                power[i] = c.power_w;
                worst = worst.max(total);
                for k in 0..2 {
                    worst_feeders[k] = worst_feeders[k].max(feeders[k]);
                }
            }
            let end: f64 = (0..n).map(|i| d.power_w(DeviceIdx(i)).unwrap()).sum();
            prop_assert!((end - total).abs() < 1e-6, "changes replay to the final levels");
            prop_assert!((p.sites[0].asic_mw - end / 1e6).abs() < 1e-9);
            // Where the limit leaves room for the fixed draw, the plan fits at every instant, or
            // (when it started above a lowered limit) only ever comes down towards it.
            if fixed + gpu.min_w <= p.sites[0].limit_mw * 1e6 {
                prop_assert!(end <= limit + 1e-3, "site {end} > {limit}");
                prop_assert!(worst <= limit.max(start) + 1e-3, "an instant at {worst} above {limit}");
            }
            for k in 0..2 {
                prop_assert!(feeders[k] <= 800_000.0 + 1e-3 || feeders[k] <= start_feeders[k] + 1e-3, "feeder {k}: {}", feeders[k]);
                prop_assert!(worst_feeders[k] <= 800_000.0_f64.max(start_feeders[k]) + 1e-3, "feeder {k} instant {}", worst_feeders[k]);
            }
        }
    }
}

/// Two sites of the random fleet's shape (their prices move independently, so in one plan some
/// groups shed while others add).
fn two_sites(cap_mw: f64, a: (usize, u32), b: (usize, u32)) -> Fleet {
    let site = |id: &str, m: usize, n: u32| {
        format!(
            r#"
[[site]]
id = "{id}"
power_cap_mw = {cap_mw}
settlement_point = "P"
  [[site.feeder]]
  id = "{id}-f"
  limit_kw = 800
    [[site.feeder.rack]]
    devices = [{{ model = "{}", count = {n} }}, {{ model = "{}", count = {n} }}]
"#,
            MODELS[m],
            MODELS[(m + 3) % 7]
        )
    };
    fleet(&format!("name = \"two\"\n{}{}", site("x", a.0, a.1), site("y", b.0, b.1)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A plan taken in steps (the first command batch leaves before the rest exists) is the plan
    /// taken at once, its steps hand out every change exactly once, and once no group needs a
    /// recount every reduction is handed out before any increase.
    #[test]
    fn a_plan_taken_in_steps_is_the_plan_taken_at_once(
        cap_mw in 0.05f64..1.0,
        a in (0usize..7, 1u32..60),
        b in (0usize..7, 1u32..60),
        prices in proptest::collection::vec((-50.0f64..400.0, -50.0f64..400.0), 2..10),
        step in 1usize..40,
        hp in 20.0f64..80.0,
    ) {
        let f = two_sites(cap_mw, a, b);
        let n = f.devices.len() as u32;
        let mut whole = Dispatcher::new(&f, cfg(), 0);
        let mut stepped = Dispatcher::new(&f, cfg(), 0);
        let gpu = [GpuBudget::default(); 2];
        for (t, (px, py)) in prices.iter().enumerate() {
            let t = t as i64 * 1_000;
            for i in 0..n {
                whole.observe(DeviceIdx(i), t, 1.0, false);
                stepped.observe(DeviceIdx(i), t, 1.0, false);
            }
            let sig = [SiteSignal::new(*px, t, 20.0), SiteSignal::new(*py, t, 20.0)];
            let expect = whole.plan(t, &sig, hp, &gpu, &[]);
            let mut run = stepped.start_plan(t, &sig, hp, &gpu, &[]);
            let mut handed = vec![];
            while !run.done() {
                let chunk = run.step(step).to_vec();
                prop_assert!(!chunk.is_empty() || run.done());
                handed.extend_from_slice(&chunk);
            }
            prop_assert!(run.step(step).is_empty());
            let got = run.finish();
            prop_assert_eq!(&got, &expect);
            let key = |c: &TargetChange| c.device.0;
            let mut sorted = handed.clone();
            sorted.sort_by_key(key);
            let mut all = got.changes.clone();
            all.sort_by_key(key);
            prop_assert_eq!(sorted, all);
            if t > 0 {
                let first_up = handed.iter().position(|c| c.to_level > c.from_level).unwrap_or(handed.len());
                prop_assert!(handed[first_up..].iter().all(|c| c.to_level > c.from_level), "a reduction after an increase");
            }
            for i in 0..n {
                prop_assert_eq!(whole.level(DeviceIdx(i)), stepped.level(DeviceIdx(i)));
            }
        }
    }
}

#[test]
fn a_strike_hold_sleeps_its_model_with_the_policy_named() {
    let f = fleet(FLEET);
    let mut d = Dispatcher::new(&f, cfg(), 0);
    d.plan(0, &sig(20.0, 0), 50.0, &[GpuBudget::default()], &[]);
    let model = f.catalogue.asics[0].id.clone();
    let hold = hcp_econ::dispatch::StrikeHold { strike_usd_per_mwh: 15.0, price_usd_per_mwh: 20.0, policy_version: 3 };
    assert!(d.hold_by_strike(SiteIdx(0), &model, Some(hold)) > 0);
    assert_eq!(d.hold_by_strike(SiteIdx(0), "no-such-model", Some(hold)), 0);
    // The price alone would keep every ASIC running; the strike sleeps them, and says so.
    let p = d.plan(1, &sig(20.0, 1), 50.0, &[GpuBudget::default()], &[]);
    assert!(!p.changes.is_empty());
    for c in &p.changes {
        assert_eq!(c.to_level, 0);
        let r = &p.reasons[c.reason as usize];
        assert!(matches!(r, Reason::Strike { policy_version: 3, .. }), "{r:?}");
    }
    // Freed: the next plan restores them on price.
    d.hold_by_strike(SiteIdx(0), &model, None);
    let p = d.plan(2, &sig(20.0, 2), 50.0, &[GpuBudget::default()], &[]);
    assert!(p.changes.iter().all(|c| c.to_level > 0));
    assert!(!p.changes.is_empty());
}
