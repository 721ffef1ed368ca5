//! `hcp loadtest`: sends a mix of streaming and non-streaming OpenAI requests to a gateway at an
//! even rate over a duration (sizes from a recorded trace, or a seeded default mix), shows a
//! progress bar, prints a summary, and then checks that the platform's usage records match what
//! it was served, request by request, exactly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hcp_sim::rng::{stream as rng_stream, unit};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// The platform's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A tenant API key (hcpk_...).
    #[arg(long)]
    pub key: String,
    #[arg(long, default_value_t = 10_000)]
    pub workloads: u64,
    /// Seconds over which the requests are started, evenly.
    #[arg(long = "duration", default_value_t = 300.0)]
    pub duration_s: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Request sizes from a recorded trace (CSV with context and generated tokens).
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    #[arg(long)]
    pub model: Option<String>,
    /// Share of requests that stream.
    #[arg(long, default_value_t = 0.5)]
    pub stream_fraction: f64,
    /// Output tokens per request at most (trace sizes are capped to it).
    #[arg(long, default_value_t = 512)]
    pub max_output_tokens: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Threads the generator runs on. One is the cheapest per request (no wake-ups between
    /// threads) and sends a few thousand requests a second; more, where one core is not enough.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
}

/// One request's size.
#[derive(Clone, Copy)]
struct Size {
    prompt: u32,
    output: u32,
}

/// What came back for one request.
#[derive(Default)]
struct Outcome {
    ok: bool,
    status: u16,
    latency: Duration,
    ttft: Duration,
    /// (request id, prompt tokens, output tokens) as the response reported them.
    usage: Option<(String, i64, i64)>,
}

fn sizes(a: &Args) -> Result<Vec<Size>> {
    let mut rng = rng_stream(a.seed, "loadtest-sizes", 0);
    let mut between = |lo: u32, hi: u32| lo + (unit(&mut rng) * f64::from(hi - lo)) as u32;
    let cap_out = a.max_output_tokens.max(1);
    // Keeps prompt + output within the model's 8,192-token context.
    let fit = |p: u32, o: u32| {
        let o = o.clamp(1, cap_out);
        Size { prompt: p.clamp(8, 8_000 - o), output: o }
    };
    match &a.trace {
        Some(path) => {
            let f = std::fs::File::open(path).with_context(|| format!("--trace {}", path.display()))?;
            let reqs = hcp_sim::replay::load_trace_csv(&path.display().to_string(), f)?;
            if reqs.is_empty() {
                bail!("--trace {}: has no requests", path.display());
            }
            Ok(reqs.iter().map(|r| fit(r.prompt_tokens, r.output_tokens)).collect())
        }
        // Chat-like default: prompts 64-1,024 tokens, answers 16-256.
        None => Ok((0..4_096).map(|_| fit(between(64, 1_024), between(16, 256))).collect()),
    }
}

/// A prompt of about `tokens` tokens as the platform counts them (one per four bytes, plus three
/// for the chat message).
fn prompt(tokens: u32) -> String {
    let bytes = (tokens.saturating_sub(3).max(1) * 4) as usize;
    "grid ".repeat(bytes / 5 + 1)[..bytes].to_string()
}

/// A chat completion request's JSON. `model` and `content` are JSON strings already (quoted and
/// escaped once per run), so a prompt of many kilobytes is copied into each request, not
/// serialized again.
fn chat_body(model: &str, content: &str, max_tokens: u32, stream: bool) -> String {
    let usage = if stream { r#","stream_options":{"include_usage":true}"# } else { "" };
    format!(
        r#"{{"model":{model},"messages":[{{"role":"user","content":{content}}}],"max_tokens":{max_tokens},"stream":{stream}{usage}}}"#
    )
}

/// The `q` quantile of `v` in milliseconds; None when `v` is empty.
pub(crate) fn pct(v: &mut [Duration], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3)
}

async fn one(
    http: &reqwest::Client,
    a: &Args,
    model_json: &str,
    tag: &str,
    size: Size,
    stream: bool,
    content_json: &str,
) -> Outcome {
    let started = Instant::now();
    let res = http
        .post(format!("{}/v1/chat/completions", a.url))
        .bearer_auth(&a.key)
        .header("x-hcp-tag", tag)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(chat_body(model_json, content_json, size.output, stream))
        .send()
        .await;
    let mut out = Outcome::default();
    let Ok(mut res) = res else { return out };
    out.status = res.status().as_u16();
    let rid = res.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if !res.status().is_success() {
        let _ = res.bytes().await;
        out.latency = started.elapsed();
        return out;
    }
    if !stream {
        let v: serde_json::Value = match res.json().await {
            Ok(v) => v,
            Err(_) => return out,
        };
        out.latency = started.elapsed();
        out.ttft = out.latency;
        let u = &v["usage"];
        out.usage =
            Some((rid, u["prompt_tokens"].as_i64().unwrap_or(-1), u["completion_tokens"].as_i64().unwrap_or(-1)));
        out.ok = true;
        return out;
    }
    let mut buf = Vec::new();
    let mut first = None;
    loop {
        match res.chunk().await {
            Ok(Some(c)) => {
                first.get_or_insert_with(|| started.elapsed());
                buf.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(_) => return out,
        }
    }
    out.latency = started.elapsed();
    out.ttft = first.unwrap_or(out.latency);
    let text = String::from_utf8_lossy(&buf);
    let events: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    if events.last() != Some(&"[DONE]") {
        return out;
    }
    let usage = events
        .iter()
        .rev()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .find(|v| v["usage"].is_object());
    if let Some(v) = usage {
        let u = &v["usage"];
        out.usage =
            Some((rid, u["prompt_tokens"].as_i64().unwrap_or(-1), u["completion_tokens"].as_i64().unwrap_or(-1)));
        out.ok = true;
    }
    out
}

/// Every usage record the platform holds for this run's tag: id -> (input, output, status).
async fn usage_of(http: &reqwest::Client, a: &Args, tag: &str) -> Result<HashMap<String, (i64, i64, String)>> {
    let mut out = HashMap::new();
    let mut after: Option<i64> = None;
    loop {
        let mut url = format!("{}/api/v1/usage?tag={tag}&limit=1000", a.url);
        if let Some(x) = after {
            url.push_str(&format!("&after={x}"));
        }
        let v: serde_json::Value = loop {
            let r = http.get(&url).bearer_auth(&a.key).send().await?;
            if r.status().as_u16() == 429 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if !r.status().is_success() {
                bail!("GET {url}: {}", r.status());
            }
            break r.json().await?;
        };
        for u in v["items"].as_array().into_iter().flatten() {
            let id = u["id"].as_str().unwrap_or("").to_string();
            let rec = (
                u["input_tokens"].as_i64().unwrap_or(-1),
                u["output_tokens"].as_i64().unwrap_or(-1),
                u["status"].as_str().unwrap_or("").to_string(),
            );
            if out.insert(id.clone(), rec).is_some() {
                bail!("usage record {id} listed twice");
            }
        }
        match v["next_after"].as_i64() {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    Ok(out)
}

pub fn run(mut a: Args) -> Result<std::process::ExitCode> {
    a.url = a.url.trim_end_matches('/').to_string();
    if a.workloads == 0 {
        bail!("--workloads: must be >= 1");
    }
    if !(a.duration_s.is_finite() && a.duration_s > 0.0) {
        bail!("--duration: must be > 0 seconds");
    }
    if a.concurrency == 0 {
        bail!("--concurrency: must be >= 1");
    }
    if !(0.0..=1.0).contains(&a.stream_fraction) {
        bail!("--stream-fraction: must be 0 to 1");
    }
    if a.threads == 0 {
        bail!("--threads: must be >= 1");
    }
    let sizes = sizes(&a)?;
    let rt = if a.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads).enable_all().build()
    };
    rt.context("start the generator's runtime")?.block_on(async move {
        let http = reqwest::Client::builder().pool_max_idle_per_host(a.concurrency).tcp_nodelay(true).build()?;
        let model = match &a.model {
            Some(m) => m.clone(),
            None => {
                let r = http.get(format!("{}/v1/models", a.url)).bearer_auth(&a.key).send().await?;
                if !r.status().is_success() {
                    bail!("GET {}/v1/models: {}", a.url, r.status());
                }
                let v: serde_json::Value = r.json().await?;
                v["data"][0]["id"].as_str().context("the gateway lists no model")?.to_string()
            }
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tag = format!("lt-{:x}", nanos & 0xffff_ffff_ffff);
        let a = Arc::new(a);
        let bar = indicatif::ProgressBar::new(a.workloads);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
                .expect("a valid template"),
        );
        let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let gap = a.duration_s / a.workloads as f64;
        let mut rng = rng_stream(a.seed, "loadtest-mix", 0);
        // The model and each prompt as JSON strings, once.
        let model_json = serde_json::to_string(&model)?;
        let texts: Arc<HashMap<u32, String>> = Arc::new(
            sizes.iter().map(|s| (s.prompt, json!(prompt(s.prompt)).to_string())).collect::<HashMap<_, _>>(),
        );
        let sender = {
            let (a, http, model, tag) = (a.clone(), http.clone(), model_json, tag.clone());
            tokio::spawn(async move {
                let mut late = 0u64;
                for i in 0..a.workloads {
                    let due = started + Duration::from_secs_f64(gap * i as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let permit = sem.clone().acquire_owned().await.expect("open semaphore");
                    if Instant::now() > due + Duration::from_millis(100) {
                        late += 1;
                    }
                    let size = sizes[i as usize % sizes.len()];
                    let stream = unit(&mut rng) < a.stream_fraction;
                    let (a, http, model, tag, tx, texts) =
                        (a.clone(), http.clone(), model.clone(), tag.clone(), tx.clone(), texts.clone());
                    tokio::spawn(async move {
                        let o = one(&http, &a, &model, &tag, size, stream, &texts[&size.prompt]).await;
                        drop(permit);
                        let _ = tx.send((o, stream));
                    });
                }
                late
            })
        };
        let mut outcomes = Vec::with_capacity(a.workloads as usize);
        while outcomes.len() < a.workloads as usize {
            let Some(o) = rx.recv().await else { break };
            bar.inc(1);
            outcomes.push(o);
        }
        let late = sender.await?;
        let wall = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let ok: Vec<&Outcome> = outcomes.iter().map(|(o, _)| o).filter(|o| o.ok).collect();
        let failed = outcomes.len() - ok.len();
        let mut by_status: std::collections::BTreeMap<u16, u64> = Default::default();
        for (o, _) in outcomes.iter().filter(|(o, _)| !o.ok) {
            *by_status.entry(o.status).or_default() += 1;
        }
        let mut lat: Vec<Duration> = ok.iter().map(|o| o.latency).collect();
        let mut ttft: Vec<Duration> = outcomes.iter().filter(|(o, s)| o.ok && *s).map(|(o, _)| o.ttft).collect();
        let out_tokens: i64 = ok.iter().filter_map(|o| o.usage.as_ref()).map(|u| u.2).sum();
        // Afterwards: the platform's records for this run, request by request.
        let records = usage_of(&http, &a, &tag).await?;
        let mut mismatched = 0u64;
        let mut missing = 0u64;
        for o in &ok {
            let (id, i, out) = o.usage.clone().expect("ok has usage");
            match records.get(&id) {
                None => missing += 1,
                Some((ri, ro, st)) if (*ri, *ro) != (i, out) || st != "completed" => mismatched += 1,
                Some(_) => {}
            }
        }
        let extra = records.values().filter(|r| r.2 == "completed").count() as i64 - ok.len() as i64;
        let exact = missing == 0 && mismatched == 0 && extra == 0;
        let summary = json!({
            "workloads": a.workloads,
            "ok": ok.len(),
            "failed": failed,
            "failed_by_status": by_status,
            "streaming": outcomes.iter().filter(|(_, s)| *s).count(),
            "wall_s": wall,
            "requests_per_s": outcomes.len() as f64 / wall,
            "started_late": late,
            "latency_ms_p50": pct(&mut lat, 0.5).unwrap_or(0.0),
            "latency_ms_p99": pct(&mut lat, 0.99).unwrap_or(0.0),
            "ttft_ms_p50": pct(&mut ttft, 0.5).unwrap_or(0.0),
            "ttft_ms_p99": pct(&mut ttft, 0.99).unwrap_or(0.0),
            "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens as f64 / wall,
            "usage": {
                "tag": tag,
                "records": records.len(),
                "missing": missing,
                "mismatched": mismatched,
                "extra_completed": extra,
                "exact": exact,
            },
        });
        if a.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!(
                "requests: {} ok, {} failed {:?} ({} streaming) in {:.1} s ({:.0}/s, {} started late)",
                ok.len(),
                failed,
                by_status,
                summary["streaming"],
                wall,
                summary["requests_per_s"].as_f64().unwrap_or(0.0),
                late
            );
            println!(
                "latency p50 {:.1} ms p99 {:.1} ms; time to first token p50 {:.1} ms p99 {:.1} ms; {:.0} output tokens/s",
                summary["latency_ms_p50"].as_f64().unwrap_or(0.0),
                summary["latency_ms_p99"].as_f64().unwrap_or(0.0),
                summary["ttft_ms_p50"].as_f64().unwrap_or(0.0),
                summary["ttft_ms_p99"].as_f64().unwrap_or(0.0),
                summary["output_tokens_per_s"].as_f64().unwrap_or(0.0)
            );
            println!(
                "usage records (tag {tag}): {} for {} served: {}",
                records.len(),
                ok.len(),
                if exact {
                    "every served request has exactly one record with its tokens".to_string()
                } else {
                    format!("MISMATCH: {missing} missing, {mismatched} differ, {extra} extra")
                }
            );
        }
        Ok(if exact { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    /// The request body assembled from pieces is the JSON the OpenAI API expects, escapes
    /// included.
    #[test]
    fn a_chat_body_is_the_json_of_its_parts() {
        let (model, text) = ("llama-3-8b", "say \"hi\"\n\\ grid");
        for stream in [false, true] {
            let mut want = json!({
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 17,
                "stream": stream,
            });
            if stream {
                want["stream_options"] = json!({"include_usage": true});
            }
            let body = super::chat_body(&json!(model).to_string(), &json!(text).to_string(), 17, stream);
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), want, "{body}");
        }
    }
}
