//! Mutation fuzzing of every parser that takes outside input: fleet, engine and feeds TOML;
//! price, market and trace CSV; gateway request bodies; ERCOT and mempool.space responses; the
//! notices API processes take from the bus (capacity, tenants, live events), applied to a router.
//!
//! Each target starts from valid samples (the recorded data and the repository's examples) and
//! runs `HCP_FUZZ_CASES` inputs (default 20,000), each a sample with 1 to 8 random edits: bytes
//! flipped, inserted, deleted, ranges duplicated or swapped, lines dropped or repeated, and
//! "interesting" tokens spliced in (huge, negative, NaN numbers; empty fields; quotes; control
//! and multi-byte characters). Seeded, so a run is reproducible (`HCP_FUZZ_SEED`). A target
//! passes when no input panics: every input is accepted or refused with an error. The count of
//! executions and crashes per target is printed (`cargo test --test fuzz -- --nocapture`).

use std::panic::{AssertUnwindSafe, catch_unwind};

/// xorshift64*: small, seeded, good enough to pick edits.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const TOKENS: &[&str] = &[
    "",
    "0",
    "-1",
    "-0",
    "1e308",
    "-1e308",
    "1e-308",
    "NaN",
    "inf",
    "-inf",
    "18446744073709551616",
    "-9223372036854775808",
    "9223372036854775807",
    "99999999999999999999999999",
    "0x10",
    "1.5",
    "\"",
    "\"\"",
    ",",
    ",,,,",
    "\n",
    "\r\n",
    "\0",
    "\u{7f}",
    "é",
    "𝄞",
    "\u{202e}",
    "[",
    "]",
    "{",
    "}",
    "=",
    "[[x]]",
    "null",
    "true",
    "false",
    "2024-13-45",
    "2024-06-01T25:61:00",
    "1970-01-01",
    "9999-12-31T23:59:59",
    "'",
    "\\",
    "\\u0000",
    LONG,
];

const LONG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn mutate(rng: &mut Rng, sample: &[u8]) -> Vec<u8> {
    let mut b = sample.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = b.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len + 1);
                b.insert(i, rng.next() as u8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                b.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let piece = b[i..i + n].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, piece);
            }
            4 | 5 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let i = rng.below(len + 1);
                // Replace what stands there up to the next separator, or insert.
                let end = b[i..].iter().position(|c| b",\n=:\"[]{}".contains(c)).map_or(len, |p| i + p);
                if rng.below(2) == 0 {
                    b.splice(i..end, t.iter().copied());
                } else {
                    b.splice(i..i, t.iter().copied());
                }
            }
            6 => {
                // Drop or repeat a whole line.
                let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').collect();
                if lines.len() > 1 {
                    let k = rng.below(lines.len());
                    let mut out: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
                    if rng.below(2) == 0 {
                        out.remove(k);
                    } else {
                        let l = out[k].clone();
                        out.insert(k, l);
                    }
                    b = out.join(&b'\n');
                }
            }
            7 if len > 1 => {
                // Swap two ranges of bytes.
                let (i, j) = (rng.below(len), rng.below(len));
                b.swap(i, j);
            }
            _ => {
                let i = rng.below(len + 1);
                b.truncate(i);
            }
        }
    }
    b
}

fn cases() -> usize {
    std::env::var("HCP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("HCP_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x9E37_79B9_7F4A_7C15)
}

/// Runs `target` on mutations of `samples`; panics (after all cases) if any input panicked,
/// showing the first such input.
fn fuzz(name: &str, samples: &[Vec<u8>], target: impl Fn(&[u8]) -> bool) {
    assert!(!samples.is_empty());
    let mut rng =
        Rng(seed()
            ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)));
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let (mut runs, mut accepted, mut crashes) = (0usize, 0usize, vec![]);
    // The samples themselves first: each must pass (they are valid input).
    for s in samples {
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| target(s))).is_err() {
            crashes.push(s.clone());
        }
    }
    let started = std::time::Instant::now();
    for _ in 0..cases() {
        let s = &samples[rng.below(samples.len())];
        let input = mutate(&mut rng, s);
        runs += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => crashes.push(input),
        }
    }
    std::panic::set_hook(previous);
    eprintln!(
        "fuzz {name}: {runs} executions in {:.2} s, {accepted} accepted, the rest refused with an error, {} crashes",
        started.elapsed().as_secs_f64(),
        crashes.len()
    );
    if let Some(c) = crashes.first() {
        panic!("{name}: {} inputs panicked; the first:\n{}", crashes.len(), String::from_utf8_lossy(c));
    }
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The first `lines` lines of a file.
fn head(path: &str, lines: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out: Vec<&str> = text.lines().take(lines).collect();
    out.push("");
    out.join("\n").into_bytes()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn fleet_files() {
    let samples = vec![head("examples/fleets/small.toml", 10_000), head("examples/fleets/reference.toml", 10_000)];
    fuzz("fleet TOML", &samples, |b| hcp_model::fleet::Fleet::from_toml("f.toml", &text(b)).is_ok());
}

#[test]
fn engine_and_feeds_config_files() {
    let engine = vec![
        b"dispatch_interval_s = 900\nhysteresis_usd_per_mwh = 2.0\n".to_vec(),
        b"price_min_usd_per_mwh = -1000.0\nstale_market_s = 172800\nquarantine_s = 1800\n".to_vec(),
    ];
    fuzz("engine config TOML", &engine, |b| hcp_engine::EngineConfig::from_toml(&text(b)).is_ok());
    let feeds = vec![
        b"[ercot]\nsettlement_points = [\"HB_SOUTH\"]\n[market]\n".to_vec(),
        b"[[replay]]\ngrid = \"p.csv\"\nfrom = \"2024-06-03\"\nas_points = [\"HB_WEST\"]\npoll_s = 5\n".to_vec(),
        b"[gpu_price]\nusd_per_gpu_hour = 2.1\n".to_vec(),
    ];
    fuzz("feeds config TOML", &feeds, |b| hcp_feeds::FeedsConfig::from_toml(&text(b)).is_ok());
}

#[test]
fn price_market_and_trace_csv() {
    let grid = vec![
        head("../shared/data/ercot/hb_south_15min_2024-06_2024-11.csv", 60),
        b"interval_start,settlement_point,rt_price_usd_per_mwh,da_price_usd_per_mwh,temperature_c\n\
          2024-06-01T00:00:00,HB_SOUTH,20.5,21,30\n2024-06-01T00:15:00,HB_SOUTH,22,21,30\n\
          2024-06-01T00:00:00,HB_WEST,19,20,31\n2024-06-01T00:15:00,HB_WEST,-5,20,31\n"
            .to_vec(),
    ];
    fuzz("price CSV", &grid, |b| {
        let Ok(m) = hcp_sim::replay::load_grid_csv("p.csv", b) else { return false };
        for s in m.values() {
            let _ = s.resample_mean(s.interval_ms * 4);
        }
        true
    });
    let market = vec![head("../shared/data/bitcoin/btc_daily_price_difficulty_hashprice_2020-04_2025-04.csv", 40)];
    fuzz("market CSV", &market, |b| hcp_sim::replay::load_market_csv("m.csv", b).is_ok());
    let trace = vec![head("../shared/data/llm-traces/azure_llm_inference_2023_code.csv", 80)];
    fuzz("trace CSV", &trace, |b| hcp_sim::replay::load_trace_csv("t.csv", b).is_ok());
}

#[test]
fn gateway_request_bodies() {
    use hcp_server::openai::{Endpoint, parse};
    let samples = vec![
        br#"{"model":"llama-3-8b","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"How is the grid today?"}],"max_tokens":64,"stream":true,"stream_options":{"include_usage":true},"temperature":0.7}"#.to_vec(),
        br#"{"model":"llama-3-8b","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"n":1,"stop":["\n"]}"#.to_vec(),
        br#"{"model":"llama-3-8b","prompt":"Once upon a time","max_tokens":16,"stream":false}"#.to_vec(),
        br#"{"model":"llama-3-8b","prompt":["a","b"],"max_tokens":4}"#.to_vec(),
    ];
    fuzz("gateway bodies", &samples, |b| {
        let chat = parse(Endpoint::Chat, b).is_ok();
        parse(Endpoint::Completions, b).is_ok() || chat
    });
}

#[test]
fn feed_responses() {
    let dir = root().join("crates/feeds/tests/responses");
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
    let ercot = vec![
        read("ercot/spp_node_zone_hub.json"),
        read("ercot/lmp_node_zone_hub.json"),
        read("ercot/dam_stlmnt_pnt_prices.json"),
    ];
    fuzz("ERCOT reports", &ercot, |b| {
        use hcp_feeds::ercot::{dam_rows, parse_report, sced_rows, spp_rows};
        let Ok(r) = parse_report("fuzz", b) else { return false };
        let spp = spp_rows(&r).is_ok();
        let sced = sced_rows(&r).is_ok();
        dam_rows(&r).is_ok() || spp || sced
    });
    let mempool =
        vec![read("mempool/prices.json"), read("mempool/hashrate_3d.json"), read("mempool/reward_stats_144.json")];
    fuzz("mempool.space responses", &mempool, |b| {
        use hcp_feeds::mempool::{parse_difficulty, parse_prices, parse_reward_stats};
        let a = parse_prices(b).is_ok();
        let d = parse_difficulty(b).is_ok();
        parse_reward_stats(b).is_ok() || a || d
    });
}

#[test]
fn notices_from_the_bus() {
    use hcp_server::routing::RouterState;
    let capacity = br#"{"at_ms":1733500000000,"replicas":[{"id":1,"site_id":"tx-west","gpus":8,"slots":16,"kv_tokens":200000,"cap_w":700.0,"updated_ms":1733500000000},{"id":2,"site_id":"tx-south","gpus":8,"slots":0,"kv_tokens":0,"cap_w":0.0,"updated_ms":1733500000000}]}"#.to_vec();
    let tenant = br#"{"id":"acme","name":"Acme","weight":2.0,"guaranteed_gpus":4.0,"borrow_limit_gpus":8.0,"created_ms":1,"requests_per_min":600,"tokens_per_min":100000}"#.to_vec();
    let samples = vec![capacity, tenant];
    fuzz("capacity and tenant notices", &samples, |b| {
        let mut r = RouterState::new("llama-3-8b");
        let mut ok = false;
        if let Ok(t) = serde_json::from_slice::<hcp_store::TenantRow>(b) {
            ok |= r.add_tenant(&t).is_ok();
        }
        if let Ok(c) = serde_json::from_slice::<hcp_server::events::CapacityNotice>(b) {
            ok |= r.apply(&c.replicas, c.at_ms).is_ok();
            let _ = r.apply(&c.replicas, c.at_ms.saturating_add(1));
        }
        ok
    });
    let live = hcp_server::live::Live::default();
    let events = vec![
        br#"{"at_ms":1733500000000,"site":"tx-west","price_usd_per_mwh":31.5,"mining_mw":12.0,"inference_mw":3.0,"curtailed_mw":0.5}"#.to_vec(),
        br#"{"name":"reserved-capacity","version":3,"body":"{\"tenant\":\"acme\",\"gpus\":4}"}"#.to_vec(),
    ];
    let subjects =
        ["hcp.interval.tx-west", "hcp.plan", "hcp.ahead", "hcp.devices", "hcp.signals", "hcp.alert", "hcp.feed"];
    let n = std::sync::atomic::AtomicUsize::new(0);
    fuzz("live notices", &events, |b| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        live.note(subjects[i % subjects.len()], b).is_ok()
    });
}
