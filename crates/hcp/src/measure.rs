//! What every benchmark reports beside its figures: thread and process CPU time (so that
//! preemption by other processes shows as wall time without CPU time, instead of hiding in a p99),
//! the machine's load while it ran, and the spread (min/median/max) of repeated runs.

use std::time::Instant;

use serde_json::{Value, json};

fn clock_s(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clocks named here exist on Linux and only
    // write through the pointer they are given.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU time this thread has used, in seconds (user + system).
pub fn thread_cpu_s() -> f64 {
    clock_s(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time this process has used, in seconds, all threads (user + system).
pub fn process_cpu_s() -> f64 {
    clock_s(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Wall and thread CPU time of one call, in milliseconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c0, t0) = (thread_cpu_s(), Instant::now());
    let out = f();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    (out, wall, (thread_cpu_s() - c0) * 1e3)
}

/// A `/proc/.../stat` line's command name, parent pid and CPU time (user + system, seconds).
fn proc_stat(path: &std::path::Path) -> Option<(String, u32, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s.get(open + 1..close)?.to_string();
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // After the name: state, ppid, ..., utime (the 12th), stime (the 13th).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((comm, ppid, ticks / hz))
}

/// CPU time (seconds) of each thread of this process whose name is `name`, by thread id.
pub fn named_threads_cpu_s(name: &str) -> std::collections::BTreeMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return Default::default() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let (comm, _, cpu) = proc_stat(&e.path().join("stat"))?;
        (comm == name).then_some((tid, cpu))
    })
    .collect()
}

/// Per thread id, the CPU time used between two readings (a thread gone by the second reading
/// counts nothing after the first; a new one counts all it used).
pub fn threads_delta(
    before: &std::collections::BTreeMap<u32, f64>,
    after: &std::collections::BTreeMap<u32, f64>,
) -> Vec<f64> {
    after.iter().map(|(tid, a)| a - before.get(tid).copied().unwrap_or(0.0)).collect()
}

/// CPU time (seconds) of a process and every process below it (a server and its workers).
pub fn tree_cpu_s(root: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return f64::NAN };
    let procs: Vec<(u32, u32, f64)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let (_, ppid, cpu) = proc_stat(&e.path().join("stat"))?;
            Some((pid, ppid, cpu))
        })
        .collect();
    let mut inside = vec![root];
    let mut total = 0.0;
    while let Some(p) = inside.pop() {
        for &(pid, ppid, cpu) in &procs {
            if pid == p {
                total += cpu;
            }
            if ppid == p {
                inside.push(pid);
            }
        }
    }
    total
}

/// The 1-, 5- and 15-minute load averages (Linux), if known.
pub fn loadavg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// The machine as a run found it and left it: cores, load averages at start and end.
pub struct Machine {
    cores: usize,
    load_start: Option<[f64; 3]>,
    wall: Instant,
    cpu_start: f64,
}

impl Machine {
    pub fn start() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_start: loadavg(),
            wall: Instant::now(),
            cpu_start: process_cpu_s(),
        }
    }

    /// `{cores, loadavg_start, loadavg_end, wall_s, process_cpu_s}`: the process's CPU time over
    /// the whole run beside its wall time.
    pub fn report(&self) -> Value {
        json!({
            "cores": self.cores,
            "loadavg_1_5_15_start": self.load_start,
            "loadavg_1_5_15_end": loadavg(),
            "wall_s": self.wall.elapsed().as_secs_f64(),
            "process_cpu_s": process_cpu_s() - self.cpu_start,
        })
    }
}

/// The value at quantile `q` of sorted values (nearest rank); NaN when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `{p50, p99, max}` of the samples (sorted in place).
pub fn percentiles(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    json!({ "p50": quantile(v, 0.5), "p99": quantile(v, 0.99), "max": v.last().copied().unwrap_or(f64::NAN) })
}

/// `{min, median, max, runs}` of one figure over repeated runs.
pub fn spread(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({
        "min": s.first().copied().unwrap_or(f64::NAN),
        "median": quantile(&s, 0.5),
        "max": s.last().copied().unwrap_or(f64::NAN),
        "runs": s.len(),
    })
}

/// For each key path (`"a.b"`) present in every run's object, the spread over the runs, as a nested
/// object of the same shape. Runs missing a path or holding a non-number there leave it out.
pub fn spreads(runs: &[Value], paths: &[&str]) -> Value {
    let mut out = json!({});
    for p in paths {
        let vals: Vec<f64> = runs.iter().filter_map(|r| lookup(r, p).and_then(Value::as_f64)).collect();
        if vals.len() != runs.len() || vals.is_empty() {
            continue;
        }
        let mut cur = &mut out;
        let parts: Vec<&str> = p.split('.').collect();
        for (i, k) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cur[*k] = spread(&vals);
            } else {
                if cur.get(*k).is_none() {
                    cur[*k] = json!({});
                }
                cur = &mut cur[*k];
            }
        }
    }
    out
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, k| cur.get(k))
}

/// A bench's report on standard output: one JSON line with `--json`, else indented.
pub fn print_report(obj: &Value, json: bool) -> anyhow::Result<std::process::ExitCode> {
    if json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(obj)?);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Repeated runs: `--runs` must be 1..=50.
pub fn check_runs(runs: usize) -> anyhow::Result<()> {
    if !(1..=50).contains(&runs) {
        anyhow::bail!("--runs: must be between 1 and 50");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_moves_with_work_and_not_with_sleep() {
        let c0 = thread_cpu_s();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let slept = thread_cpu_s() - c0;
        let c1 = thread_cpu_s();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let worked = thread_cpu_s() - c1;
        assert!(slept < 0.02, "sleeping used {slept} s of CPU");
        assert!(worked > 0.01, "50 ms of work counted {worked} s of CPU");
    }

    #[test]
    fn named_threads_and_process_trees_report_their_cpu() {
        let h = std::thread::Builder::new()
            .name("hcp-measure-t".into())
            .spawn(|| {
                let t = Instant::now();
                let mut x = 0u64;
                while t.elapsed().as_millis() < 60 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                named_threads_cpu_s("hcp-measure-t")
            })
            .unwrap();
        let seen: Vec<f64> = h.join().unwrap().into_values().collect();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0] >= 0.02, "{seen:?}");
        let me = tree_cpu_s(std::process::id());
        assert!(me >= seen[0], "the process's tree holds its threads: {me} < {}", seen[0]);
    }

    #[test]
    fn spreads_follow_key_paths_and_skip_missing_ones() {
        let runs =
            vec![json!({"a": {"b": 3.0}, "c": 1.0}), json!({"a": {"b": 1.0}, "c": 2.0}), json!({"a": {"b": 2.0}})];
        let s = spreads(&runs, &["a.b", "c"]);
        assert_eq!(s["a"]["b"], json!({"min": 1.0, "median": 2.0, "max": 3.0, "runs": 3}));
        assert!(s.get("c").is_none(), "a path missing from one run is left out");
        assert!(quantile(&[], 0.5).is_nan());
    }
}
