//! One contract, two backends: the same checks against SQLite (a temporary file) and PostgreSQL
//! (a fresh database on the machine's server, `HCP_TEST_PG` or postgres://postgres@127.0.0.1/test).

use hcp_store::*;

fn pg_admin_url() -> String {
    std::env::var("HCP_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh PostgreSQL database for one test; dropped by the next run's cleanup if left behind.
async fn fresh_pg(name: &str) -> Store {
    let admin = Store::open(&pg_admin_url()).await.expect("PostgreSQL at 127.0.0.1:5432 (see .ci/run)");
    let db = format!("hcp_contract_{name}_{}", std::process::id());
    admin.exec_admin(&format!("DROP DATABASE IF EXISTS {db}")).await.unwrap();
    admin.exec_admin(&format!("CREATE DATABASE {db}")).await.unwrap();
    admin.close().await;
    let base = pg_admin_url();
    let url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
    Store::open(&url).await.unwrap()
}

async fn fresh_sqlite(name: &str) -> (Store, tempdir::Dir) {
    let dir = tempdir::Dir::new(name);
    let s = Store::open(&format!("sqlite:{}", dir.path.join("hcp.db").display())).await.unwrap();
    (s, dir)
}

mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("hcp-store-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn page(limit: u32) -> Page {
    Page { after: None, limit: Some(limit) }
}

async fn contract(s: &Store) {
    assert_eq!(s.migrate().await.unwrap(), 7);
    assert_eq!(s.migrate().await.unwrap(), 7, "migrating twice is a no-op");
    s.ping().await.unwrap();

    // Topology.
    let sites = vec![
        SiteRow { id: "a".into(), idx: 0, power_cap_w: 1e6, settlement_point: "HB_WEST".into() },
        SiteRow { id: "b".into(), idx: 1, power_cap_w: 2e6, settlement_point: "HB_SOUTH".into() },
    ];
    let devices: Vec<DeviceRow> = (0..1_200)
        .map(|i| DeviceRow {
            idx: i,
            site_id: if i < 700 { "a" } else { "b" }.into(),
            feeder_id: "f".into(),
            rack_idx: i / 100,
            model: if i % 10 == 0 { "h100-sxm" } else { "antminer-s21" }.into(),
            kind: if i % 10 == 0 { "gpu" } else { "asic" }.into(),
            maintenance: false,
            status: "unknown".into(),
            status_reason: None,
            status_ms: None,
            last_telemetry_ms: None,
        })
        .collect();
    assert!(s.sync_topology("f1", &sites, &devices).await.unwrap());
    assert_eq!(s.sites().await.unwrap(), sites);
    let p1 = s.devices(&DeviceFilter { site: Some("b"), ..Default::default() }, &page(300)).await.unwrap();
    assert_eq!((p1.len(), p1[0].idx, p1[299].idx), (300, 700, 999));
    let p2 = s
        .devices(
            &DeviceFilter { site: Some("b"), ..Default::default() },
            &Page { after: Some(999), limit: Some(1_000) },
        )
        .await
        .unwrap();
    assert_eq!(p2.len(), 200);
    assert!(s.devices(&DeviceFilter::default(), &page(MAX_PAGE + 1)).await.is_err(), "page size is capped");
    assert_eq!(
        s.devices(&DeviceFilter { model: Some("h100-sxm"), ..Default::default() }, &page(1_000)).await.unwrap().len(),
        120
    );
    assert_eq!(s.set_maintenance(&[1, 2, 3], true).await.unwrap(), 3);
    assert_eq!(s.set_maintenance(&[1, 2, 3], true).await.unwrap(), 0, "idempotent");
    assert_eq!(
        s.devices(&DeviceFilter { maintenance: Some(true), ..Default::default() }, &page(10)).await.unwrap().len(),
        3
    );
    // The same fingerprint skips the write; a new one re-syncs and keeps maintenance flags.
    assert!(!s.sync_topology("f1", &sites, &devices).await.unwrap());
    assert!(s.sync_topology("f2", &sites, &devices).await.unwrap());
    assert!(s.device(2).await.unwrap().maintenance);
    assert!(matches!(s.device(99_999).await, Err(StoreError::NotFound(_))));
    // Live status, written on changes; the last change for a device wins; the topology sync
    // leaves it alone.
    let st = |idx, status: &str, at_ms| DeviceStatusRow { idx, status: status.into(), reason: None, at_ms };
    s.set_device_status(&[st(5, "available", 10), st(6, "quarantined", 11), st(5, "unknown", 12)]).await.unwrap();
    let d5 = s.device(5).await.unwrap();
    assert_eq!((d5.status.as_str(), d5.status_ms), ("unknown", Some(12)));
    let q = s.devices(&DeviceFilter { status: Some("quarantined"), ..Default::default() }, &page(10)).await.unwrap();
    assert_eq!(q.iter().map(|d| d.idx).collect::<Vec<_>>(), vec![6]);
    assert!(matches!(
        s.set_device_status(&[st(7, "sleepy", 1)]).await,
        Err(StoreError::Invalid { field: "status", .. })
    ));
    assert_eq!(s.device(7).await.unwrap().status, "unknown", "a bad batch changes nothing");
    assert!(s.sync_topology("f3", &sites, &devices).await.unwrap());
    assert_eq!(s.device(6).await.unwrap().status, "quarantined");
    // Replicas' capacity: written on changes, a known id replaced, a bad row refused whole.
    let rep = |id, slots, at| ReplicaRow {
        id,
        site_id: "s1".into(),
        gpus: 1,
        slots,
        kv_tokens: 400_000,
        cap_w: 700.0,
        updated_ms: at,
    };
    s.put_replicas(&[rep(3, 256, 1), rep(1, 256, 1)]).await.unwrap();
    s.put_replicas(&[rep(3, 0, 2)]).await.unwrap();
    let r = s.replicas().await.unwrap();
    assert_eq!(r.iter().map(|x| (x.id, x.slots, x.updated_ms)).collect::<Vec<_>>(), vec![(1, 256, 1), (3, 0, 2)]);
    assert!(matches!(
        s.put_replicas(&[rep(4, 10, 3), rep(5, -1, 3)]).await,
        Err(StoreError::Invalid { field: "replicas", .. })
    ));
    assert_eq!(s.replicas().await.unwrap().len(), 2, "a bad batch changes nothing");

    // Tenants, accounts, keys.
    let t = TenantRow {
        id: "acme".into(),
        name: "Acme".into(),
        weight: 2.0,
        guaranteed_gpus: 4.0,
        borrow_limit_gpus: 8.0,
        created_ms: 1_000,
        requests_per_min: hcp_store::DEFAULT_REQUESTS_PER_MIN,
        tokens_per_min: hcp_store::DEFAULT_TOKENS_PER_MIN,
    };
    s.create_tenant(&t).await.unwrap();
    assert!(matches!(s.create_tenant(&t).await, Err(StoreError::Conflict(_))));
    let bad = TenantRow { id: "x".into(), weight: -1.0, ..t.clone() };
    assert!(matches!(s.create_tenant(&bad).await, Err(StoreError::Invalid { field: "weight", .. })));
    assert!(matches!(s.tenant("x").await, Err(StoreError::NotFound(_))), "a refused write changes nothing");
    assert_eq!(s.tenants(&page(10)).await.unwrap(), vec![t.clone()]);
    let a = AccountRow { name: "root".into(), role: "admin".into(), secret_hash: "h".into(), created_ms: 1 };
    s.put_account(&a).await.unwrap();
    assert!(s.put_account(&AccountRow { role: "king".into(), ..a.clone() }).await.is_err());
    assert_eq!(s.accounts().await.unwrap(), vec![a.clone()]);
    // The last admin stays admin (its secret may change); with a second admin it may step down.
    let demoted = AccountRow { role: "viewer".into(), ..a.clone() };
    assert!(matches!(s.put_account(&demoted).await, Err(StoreError::LastAdmin(n)) if n == "root"));
    assert_eq!(s.accounts().await.unwrap(), vec![a.clone()], "a refused write changes nothing");
    let rotated = AccountRow { secret_hash: "h2".into(), ..a.clone() };
    s.put_account(&rotated).await.unwrap();
    let b = AccountRow { name: "second".into(), ..a.clone() };
    s.put_account(&b).await.unwrap();
    s.put_account(&demoted).await.unwrap();
    assert!(matches!(
        s.put_account(&AccountRow { role: "operator".into(), ..b.clone() }).await,
        Err(StoreError::LastAdmin(_))
    ));
    s.put_account(&rotated).await.unwrap();
    // Two admins demoting each other at once: one succeeds, the other is the last admin.
    for _ in 0..5 {
        let (dx, dy) = (
            AccountRow { role: "viewer".into(), ..rotated.clone() },
            AccountRow { role: "viewer".into(), ..b.clone() },
        );
        let (x, y) = tokio::join!(s.put_account(&dx), s.put_account(&dy));
        let ok = [x.is_ok(), y.is_ok()];
        assert_eq!(ok.iter().filter(|o| **o).count(), 1, "{x:?} {y:?}");
        assert!([x, y].iter().any(|r| matches!(r, Err(StoreError::LastAdmin(_)))));
        let admins = s.accounts().await.unwrap().iter().filter(|a| a.role == "admin").count();
        assert_eq!(admins, 1);
        s.put_account(&rotated).await.unwrap();
        s.put_account(&b).await.unwrap();
    }
    s.put_account(&rotated).await.unwrap();
    let k = ApiKeyRow {
        id: "k1".into(),
        tenant_id: "acme".into(),
        secret_hash: "hash".into(),
        default_band: 1,
        rate_per_s: 50.0,
        created_ms: 2_000,
        revoked_ms: None,
    };
    s.create_key(&k).await.unwrap();
    assert!(matches!(s.create_key(&k).await, Err(StoreError::Conflict(_))));
    assert!(matches!(
        s.create_key(&ApiKeyRow { id: "k2".into(), tenant_id: "nobody".into(), ..k.clone() }).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.revoke_key("k1", 3_000).await.unwrap());
    assert!(!s.revoke_key("k1", 4_000).await.unwrap());
    assert_eq!(s.key("k1").await.unwrap().revoked_ms, Some(3_000));
    assert_eq!(s.keys_of("acme").await.unwrap().len(), 1);
    // At most MAX_KEYS_PER_TENANT unrevoked keys (k1 is revoked: it does not count).
    for i in 0..hcp_store::MAX_KEYS_PER_TENANT {
        s.create_key(&ApiKeyRow { id: format!("cap{i}"), ..k.clone() }).await.unwrap();
    }
    let over = s.create_key(&ApiKeyRow { id: "cap-over".into(), ..k.clone() }).await;
    assert!(matches!(over, Err(StoreError::Invalid { field: "tenant", .. })), "{over:?}");
    assert!(matches!(s.key("cap-over").await, Err(StoreError::NotFound(_))));

    // Sessions: found until they expire or end.
    let sess = hcp_store::SessionRow {
        id_hash: "h1".into(),
        kind: "account".into(),
        subject: "root".into(),
        created_ms: 1_000,
        expires_ms: 5_000,
    };
    s.create_session(&sess).await.unwrap();
    assert_eq!(s.session("h1", 4_999).await.unwrap(), Some(sess.clone()));
    assert_eq!(s.session("h1", 5_000).await.unwrap(), None, "expired");
    assert!(s.create_session(&hcp_store::SessionRow { kind: "robot".into(), ..sess.clone() }).await.is_err());
    assert!(s.end_session("h1").await.unwrap());
    assert_eq!(s.session("h1", 2_000).await.unwrap(), None, "ended");
    assert!(!s.end_session("h1").await.unwrap());

    // Shared rate windows: deltas add up; the totals come back in order.
    let d = |t: &str, r: i64, k: i64| hcp_store::RateDelta {
        tenant_id: t.into(),
        window_ms: 60_000,
        requests: r,
        tokens: k,
    };
    assert_eq!(s.add_rate_usage(&[d("a", 2, 10), d("b", 1, 1)]).await.unwrap(), vec![(2, 10), (1, 1)]);
    assert_eq!(s.add_rate_usage(&[d("a", 3, -4)]).await.unwrap(), vec![(5, 6)]);
    assert_eq!(s.prune_rate_windows(120_000).await.unwrap(), 2);
    assert_eq!(s.add_rate_usage(&[d("a", 0, 0)]).await.unwrap(), vec![(0, 0)]);

    // Kept answers: the first stays; pruned by age; bounded in size.
    let o = hcp_store::OutcomeRow {
        id: "idem:acme:1".into(),
        status: 200,
        content_type: "application/json".into(),
        body: "{}".into(),
        usage: "{}".into(),
        at_ms: 1_000,
    };
    s.put_outcome(&o).await.unwrap();
    s.put_outcome(&hcp_store::OutcomeRow { body: "{\"second\":1}".into(), ..o.clone() }).await.unwrap();
    assert_eq!(s.outcome("idem:acme:1").await.unwrap(), Some(o.clone()));
    let big = hcp_store::OutcomeRow {
        id: "idem:acme:2".into(),
        body: "x".repeat(hcp_store::MAX_OUTCOME_BYTES + 1),
        ..o.clone()
    };
    assert!(matches!(s.put_outcome(&big).await, Err(StoreError::Invalid { field: "outcome.body", .. })));
    assert_eq!(s.prune_outcomes(1_001).await.unwrap(), 1);
    assert_eq!(s.outcome("idem:acme:1").await.unwrap(), None);

    // Policies with optimistic concurrency.
    assert_eq!(s.put_policy("strike", "{\"a\":1}", 0, 10).await.unwrap(), 1);
    assert!(matches!(s.put_policy("strike", "{}", 0, 11).await, Err(StoreError::Conflict(_))));
    assert_eq!(s.put_policy("strike", "{\"a\":2}", 1, 12).await.unwrap(), 2);
    assert!(matches!(s.put_policy("strike", "{}", 1, 13).await, Err(StoreError::Conflict(_))));
    assert_eq!(s.policy("strike").await.unwrap().body, "{\"a\":2}");
    assert_eq!(s.policies().await.unwrap().len(), 1);

    // Plans, decisions, commands.
    let p = s.add_plan(5, "{}").await.unwrap();
    assert_eq!(s.plans(&page(5)).await.unwrap()[0].id, p);
    let rows: Vec<DecisionRow> = (0..30)
        .map(|i| DecisionRow {
            id: 0,
            at_ms: i,
            site_id: if i % 3 == 0 { "a" } else { "b" }.into(),
            kind: "reduce".into(),
            reason: format!("price {i}"),
            body: "{}".into(),
        })
        .collect();
    let ids = s.add_decisions(&rows).await.unwrap();
    assert_eq!(ids.len(), 30);
    assert!(ids.windows(2).all(|w| w[1] > w[0]));
    let newest = s.decisions(Some("a"), &page(4)).await.unwrap();
    assert_eq!(newest.len(), 4);
    assert!(newest.iter().all(|d| d.site_id == "a") && newest[0].at_ms == 27);
    let older = s.decisions(Some("a"), &Page { after: Some(newest[3].id), limit: Some(100) }).await.unwrap();
    assert_eq!(older.len(), 6);
    let c = CommandRow {
        id: 77,
        device_idx: 5,
        target: "sleep".into(),
        attempt: 1,
        issued_ms: 1,
        outcome: None,
        outcome_ms: None,
    };
    s.add_commands(std::slice::from_ref(&c)).await.unwrap();
    s.add_commands(&[CommandRow { attempt: 2, issued_ms: 2, ..c.clone() }]).await.unwrap();
    s.set_command_outcome(77, "applied", 3).await.unwrap();
    let got = s.commands(Some(5), &page(10)).await.unwrap();
    assert_eq!((got.len(), got[0].attempt, got[0].outcome.as_deref()), (1, 2, Some("applied")));
    assert!(s.set_command_outcome(78, "applied", 3).await.is_err());
    // Many at once (more than one VALUES chunk), answers in a batch; the first answer stays.
    let many: Vec<CommandRow> = (100..250).map(|id| CommandRow { id, device_idx: id % 7, ..c.clone() }).collect();
    s.add_commands(&many).await.unwrap();
    assert_eq!(s.max_command_id().await.unwrap(), 249);
    // Command batches as sent: bytes kept exactly, in the order written, per site; their ids
    // count for the next engine's first id.
    let batch = |site: &str, first: i64, body: Vec<u8>| CommandBatchRow {
        seq: 0,
        epoch: 2,
        site_id: site.into(),
        issued_ms: 50,
        first_id: first,
        last_id: first + 9,
        commands: 10,
        body,
    };
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    s.add_command_batches(&[batch("a", 300, bytes.clone()), batch("b", 310, vec![1]), batch("a", 320, vec![])])
        .await
        .unwrap();
    let got = s.command_batches("a", 0, 10).await.unwrap();
    assert_eq!(got.iter().map(|b| b.first_id).collect::<Vec<_>>(), vec![300, 320]);
    assert_eq!(got[0].body, bytes);
    assert!(got[0].seq < got[1].seq && got[1].body.is_empty());
    assert!(s.command_batches("a", 51, 10).await.unwrap().is_empty());
    assert_eq!(s.max_command_id().await.unwrap(), 329);
    let answers: Vec<(i64, String, i64)> = vec![
        (100, "applied".into(), 9),
        (101, "failed: x".into(), 9),
        (100, "failed: late".into(), 10),
        (999, "applied".into(), 9),
    ];
    assert_eq!(s.set_command_outcomes(&answers).await.unwrap(), 2, "a repeated and an unknown answer are skipped");
    let got = s.commands(Some(100 % 7), &Page { after: Some(101), limit: Some(1) }).await.unwrap();
    assert_eq!((got[0].id, got[0].outcome.as_deref()), (100, Some("applied")));

    // Signals and telemetry with retention.
    let sig: Vec<SignalRow> = (0..10)
        .map(|i| SignalRow { kind: "rt_price".into(), key: "HB_WEST".into(), at_ms: i * 1_000, value: i as f64 })
        .collect();
    s.add_signals(&sig).await.unwrap();
    s.add_signals(&sig[..2]).await.unwrap();
    assert_eq!(s.signals("rt_price", "HB_WEST", 2_000, 5_000, 100).await.unwrap().len(), 3);
    assert!(s.add_signals(&[SignalRow { value: f64::NAN, ..sig[0].clone() }]).await.is_err());
    let mins: Vec<DeviceMinuteRow> = (0..5)
        .map(|m| DeviceMinuteRow {
            device_idx: 3,
            minute_ms: m * 60_000,
            samples: 6,
            power_w_avg: 3_400.0,
            hashrate_ths_avg: if m == 0 { None } else { Some(195.0) },
            temp_c_max: 70.0,
            errors: 0,
        })
        .collect();
    s.put_device_minutes(&mins).await.unwrap();
    s.put_device_minutes(&mins[..1]).await.unwrap();
    assert_eq!(s.device_minutes(3, 0, 1 << 40).await.unwrap(), mins);
    assert_eq!(s.device(3).await.unwrap().last_telemetry_ms, Some(4 * 60_000), "the latest minute stored");
    assert_eq!(s.device(4).await.unwrap().last_telemetry_ms, None);
    let secs: Vec<SiteSecondRow> = (0..5)
        .map(|i| SiteSecondRow { site_id: "a".into(), at_ms: i * 1_000, power_w: 9e5, mining_w: 7e5, inference_w: 2e5 })
        .collect();
    s.put_site_seconds(&secs).await.unwrap();
    assert_eq!(s.site_seconds("a", 0, 10_000).await.unwrap().len(), 5);
    assert_eq!(s.prune_telemetry(120_000, 2_000).await.unwrap(), 2 + 2);
    assert_eq!(s.device_minutes(3, 0, 1 << 40).await.unwrap().len(), 3);

    // Workloads and audit.
    let w = WorkloadRow {
        id: "job-1".into(),
        tenant_id: "acme".into(),
        kind: "batch".into(),
        state: hcp_model::JobState::Queued,
        body: "{}".into(),
        created_ms: 10,
        updated_ms: 10,
    };
    s.put_workload(&w).await.unwrap();
    s.put_workload(&WorkloadRow { state: hcp_model::JobState::Running, updated_ms: 11, ..w.clone() }).await.unwrap();
    assert_eq!(s.workload("job-1").await.unwrap().state, hcp_model::JobState::Running);
    assert_eq!(s.workloads_of("acme", &page(10)).await.unwrap().len(), 1);
    assert!(s.put_workload(&WorkloadRow { tenant_id: "nobody".into(), ..w.clone() }).await.is_err());
    // Leases: a write succeeds only from the row's last write; stale rows are found by age.
    let next = WorkloadRow { state: hcp_model::JobState::Queued, updated_ms: 20, ..w.clone() };
    assert!(!s.update_workload_if(&next, 10).await.unwrap(), "the row moved on to 11");
    assert!(s.update_workload_if(&next, 11).await.unwrap());
    assert!(!s.update_workload_if(&WorkloadRow { updated_ms: 21, ..next.clone() }, 11).await.unwrap(), "lost");
    assert!(matches!(s.update_workload_if(&next, 20).await, Err(StoreError::Invalid { field: "updated_ms", .. })));
    assert_eq!(s.stale_workloads("batch", 20, 10).await.unwrap().len(), 0, "written at 20");
    assert_eq!(s.stale_workloads("batch", 21, 10).await.unwrap()[0].id, "job-1");
    assert_eq!(s.stale_workloads("job", 21, 10).await.unwrap().len(), 0, "another kind");
    let deferred = WorkloadRow { state: hcp_model::JobState::Deferred, updated_ms: 21, ..next.clone() };
    assert!(s.update_workload_if(&deferred, 20).await.unwrap());
    assert_eq!(s.stale_workloads("batch", 22, 10).await.unwrap()[0].id, "job-1", "a deferred job is resumed too");
    s.put_workload(&WorkloadRow { state: hcp_model::JobState::Completed, updated_ms: 22, ..w }).await.unwrap();
    assert_eq!(s.stale_workloads("batch", 1_000, 10).await.unwrap().len(), 0, "finished work is not stale");
    let id1 = s.audit(1, "root", "tenant.create", "acme", None, Some("{}")).await.unwrap();
    let id2 = s.audit(2, "root", "key.revoke", "k1", Some("{}"), Some("{}")).await.unwrap();
    assert!(id2 > id1);
    let au = s.audits(&page(10)).await.unwrap();
    assert_eq!(au.iter().map(|a| a.id).collect::<Vec<_>>(), vec![id2, id1]);

    // Metering: idempotent by id, filtered lists in write order, sums by line.
    let u = |id: &str, tier, input, output, at_ms| UsageRow {
        seq: 0,
        id: id.into(),
        tenant_id: "acme".into(),
        key_id: "k1".into(),
        kind: hcp_model::UsageKind::Tokens,
        tier,
        model: "llama".into(),
        site_id: "s1".into(),
        input_tokens: input,
        output_tokens: output,
        gpu_ms: 0,
        spot: false,
        status: hcp_model::UsageStatus::Completed,
        tag: Some("run1".into()),
        at_ms,
    };
    assert_eq!(s.put_usage(&[u("r1", 1, 10, 20, 100), u("r2", 1, 5, 5, 200), u("r3", 0, 1, 1, 300)]).await.unwrap(), 3);
    assert_eq!(s.put_usage(&[u("r2", 1, 999, 999, 200), u("r4", 1, 1, 1, 5_000)]).await.unwrap(), 1, "r2 counts once");
    let mut job = u("job-1", 2, 0, 0, 400);
    job.kind = hcp_model::UsageKind::Gpu;
    job.gpu_ms = 7_200_000;
    job.spot = true;
    job.tag = None;
    s.put_usage(&[job]).await.unwrap();
    assert!(matches!(s.put_usage(&[u("r5", 1, -1, 0, 1)]).await, Err(StoreError::Invalid { field: "usage", .. })));
    let tagged = s.usage(&UsageFilter { tag: Some("run1"), ..Default::default() }, &page(2)).await.unwrap();
    assert_eq!(tagged.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["r1", "r2"]);
    assert_eq!(tagged[1].input_tokens, 5, "the first write of r2 stands");
    let next = Page { after: Some(tagged[1].seq), limit: Some(10) };
    let rest = s.usage(&UsageFilter { tag: Some("run1"), ..Default::default() }, &next).await.unwrap();
    assert_eq!(rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["r3", "r4"]);
    let f = UsageFilter { tenant: Some("acme"), from_ms: Some(0), to_ms: Some(1_000), ..Default::default() };
    assert_eq!(s.usage(&f, &page(10)).await.unwrap().len(), 4);
    let sums = s.usage_sums("acme", 0, 1_000).await.unwrap();
    let got: Vec<_> =
        sums.iter().map(|x| (x.kind.as_str(), x.tier, x.spot, x.records, x.input_tokens, x.gpu_ms)).collect();
    assert_eq!(
        got,
        vec![("gpu", 2, true, 1, 0, 7_200_000), ("tokens", 0, false, 1, 1, 0), ("tokens", 1, false, 2, 15, 0)]
    );
    assert!(s.usage_sums("nobody", 0, 1_000).await.unwrap().is_empty());
    // By UTC day: r4 (at 5,000 ms) is on day 0 too; a record on the next day is its own row.
    s.put_usage(&[u("r6", 1, 7, 3, 86_400_000 + 5)]).await.unwrap();
    let days = s.usage_daily("acme", 0, 2 * 86_400_000).await.unwrap();
    let got: Vec<_> =
        days.iter().map(|x| (x.day_ms, x.kind.as_str(), x.tier, x.records, x.input_tokens, x.output_tokens)).collect();
    assert_eq!(
        got,
        vec![
            (0, "gpu", 2, 1, 0, 0),
            (0, "tokens", 0, 1, 1, 1),
            (0, "tokens", 1, 3, 16, 26),
            (86_400_000, "tokens", 1, 1, 7, 3)
        ]
    );
    assert_eq!(s.usage_tenants(0, 10_000).await.unwrap(), vec!["acme".to_string()]);

    // Price plans in force by time.
    let plan =
        |at, body: &str| PricePlanRow { tenant_id: "acme".into(), effective_ms: at, body: body.into(), updated_ms: at };
    s.put_price_plan(&plan(0, "a")).await.unwrap();
    s.put_price_plan(&plan(1_000, "b")).await.unwrap();
    assert_eq!(s.price_plan_at("acme", 999).await.unwrap().unwrap().body, "a");
    assert_eq!(s.price_plan_at("acme", 1_000).await.unwrap().unwrap().body, "b");
    assert!(s.price_plan_at("other", 1_000).await.unwrap().is_none());
    assert!(s.put_price_plan(&PricePlanRow { tenant_id: "nobody".into(), ..plan(0, "c") }).await.is_err());

    // Site P&L rows: a repeated interval replaces its row.
    let pnl = |site: &str, at, m| SitePnlRow {
        site_id: site.into(),
        at_ms: at,
        hours: 0.25,
        mining_revenue: m,
        inference_revenue: 1,
        energy_cost: 2,
        grid_credits: 0,
    };
    s.put_site_pnl(&[pnl("s1", 0, 5), pnl("s1", 900, 6), pnl("s2", 0, 7)]).await.unwrap();
    s.put_site_pnl(&[pnl("s1", 900, 8)]).await.unwrap();
    let rows = s.site_pnl(Some("s1"), 0, 10_000).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.mining_revenue).collect::<Vec<_>>(), vec![5, 8]);
    assert_eq!(s.site_pnl(None, 0, 10_000).await.unwrap().len(), 3);
}

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    let (s, _dir) = fresh_sqlite("contract").await;
    assert_eq!(s.backend(), Backend::Sqlite);
    contract(&s).await;
}

#[tokio::test]
async fn postgres_keeps_the_contract() {
    let s = fresh_pg("contract").await;
    assert_eq!(s.backend(), Backend::Postgres);
    contract(&s).await;
    s.close().await;
    let admin = Store::open(&pg_admin_url()).await.unwrap();
    admin.exec_admin(&format!("DROP DATABASE IF EXISTS hcp_contract_contract_{}", std::process::id())).await.unwrap();
}

#[tokio::test]
async fn a_bad_url_is_refused() {
    assert!(matches!(Store::open("mysql://x").await, Err(StoreError::Url(_))));
}

#[tokio::test]
async fn sqlite_writes_survive_reopening() {
    let dir = tempdir::Dir::new("reopen");
    let url = format!("sqlite:{}", dir.path.join("hcp.db").display());
    let s = Store::open(&url).await.unwrap();
    s.migrate().await.unwrap();
    let id = s.audit(1, "root", "x", "y", None, None).await.unwrap();
    drop(s);
    let s = Store::open(&url).await.unwrap();
    assert_eq!(s.migrate().await.unwrap(), 7);
    assert_eq!(s.audits(&page(1)).await.unwrap()[0].id, id);
}
