//! The simulated GPU backend that `hcp up` starts: an OpenAI-compatible server for every replica
//! of the fleet (`/r/{replica}/v1/chat/completions`, `/r/{replica}/v1/completions`,
//! `/r/{replica}/v1/models`), so the gateway reaches the simulated fleet exactly as it reaches a
//! real vLLM or SGLang server.
//!
//! Timing comes from the GPU simulator ([`hcp_sim::gpu::sequence_timing`]): time to the first
//! token is the prompt's prefill, then one token per decode step, whose length depends on how many
//! sequences the replica is decoding and on the power cap the plan set (from `hcp.capacity`). The
//! text is placeholder words, one token each, as many as asked (`max_tokens`, else
//! [`DEFAULT_MAX_TOKENS`]). A stream's tokens due within [`CHUNK_MS`] go out as one chunk (as
//! vLLM's do when decoding outpaces the client). A dropped connection stops the generation
//! (`hcp_simbackend_cancelled_total`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hcp_model::device::{GpuModel, ModelRef};
use hcp_model::fleet::Fleet;

use crate::openai::{DEFAULT_MAX_TOKENS, Endpoint, OaiError, parse};

/// Tokens due within this window leave as one chunk.
pub const CHUNK_MS: u64 = 20;

const WORDS: [&str; 16] = [
    " power", " grid", " hash", " token", " model", " site", " price", " watt", " queue", " batch", " cap", " fleet",
    " GPU", " ASIC", " plan", " load",
];

pub struct SimBackend {
    fleet: Fleet,
    /// Each replica's power cap per GPU (W) as the plan last set it.
    caps: RwLock<HashMap<u32, f64>>,
    /// Sequences each replica is decoding now.
    running: Mutex<HashMap<u32, u32>>,
    pub served: AtomicU64,
    pub cancelled: AtomicU64,
}

impl SimBackend {
    pub fn new(fleet: Fleet) -> Self {
        SimBackend {
            fleet,
            caps: RwLock::default(),
            running: Mutex::default(),
            served: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }

    /// The plan's caps, from capacity rows.
    pub fn set_caps(&self, rows: &[hcp_store::ReplicaRow]) {
        let mut c = self.caps.write().unwrap_or_else(|e| e.into_inner());
        for r in rows {
            if let Ok(id) = u32::try_from(r.id) {
                c.insert(id, r.cap_w);
            }
        }
    }

    fn gpu(&self, replica: u32) -> Option<&GpuModel> {
        let d = self.fleet.devices.get(replica as usize)?;
        match d.model {
            ModelRef::Gpu(m) => Some(self.fleet.catalogue.gpu(m)),
            ModelRef::Asic(_) => None,
        }
    }

    /// (time to first token, time per output token) for one more sequence on the replica now.
    fn timing(&self, replica: u32, g: &GpuModel, prompt: u32, output: u32) -> (f64, f64) {
        let cap = self.caps.read().unwrap_or_else(|e| e.into_inner()).get(&replica).copied();
        let cap = cap.filter(|c| *c > 0.0).unwrap_or(g.max_power_w);
        let batch = self.running.lock().unwrap_or_else(|e| e.into_inner()).get(&replica).copied().unwrap_or(0) + 1;
        hcp_sim::gpu::sequence_timing(g, &self.fleet.served_model, cap, f64::from(batch), prompt.into(), output.into())
    }

    fn start(self: &Arc<Self>, replica: u32) -> Sequence {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()).entry(replica).or_insert(0) += 1;
        Sequence { backend: self.clone(), replica, finished: false }
    }
}

/// One sequence decoding on a replica; counted out when dropped (finished or cancelled).
struct Sequence {
    backend: Arc<SimBackend>,
    replica: u32,
    finished: bool,
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let mut r = self.backend.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = r.get_mut(&self.replica) {
            *n = n.saturating_sub(1);
        }
        drop(r);
        if self.finished {
            self.backend.served.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("hcp_simbackend_served_total").increment(1);
        } else {
            self.backend.cancelled.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("hcp_simbackend_cancelled_total").increment(1);
        }
    }
}

/// Serves the simulated backend on `listener` from the runtime this is called on, until that
/// runtime stops, and points the gateway at it: a benchmark gives the backend (load, not the
/// platform under test) other cores than the gateway's. Returns the base URL.
pub fn serve_elsewhere(app: &crate::App, listener: tokio::net::TcpListener) -> anyhow::Result<String> {
    let sim = app.sim.clone().ok_or_else(|| anyhow::anyhow!("the platform runs no simulated backend"))?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let net = crate::NetConfig::for_backend(&crate::NetConfig::default());
        crate::net::serve(listener, router(sim), net, std::future::pending()).await;
    });
    *app.gateway.sim_base.lock().unwrap_or_else(|e| e.into_inner()) = Some(base.clone());
    Ok(base)
}

pub fn router(b: Arc<SimBackend>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/r/{replica}/v1/models", get(models))
        .route("/r/{replica}/v1/chat/completions", post(chat))
        .route("/r/{replica}/v1/completions", post(completions))
        .fallback(|| async { OaiError::new(StatusCode::NOT_FOUND, "not_found_error", None, "no such route") })
        .with_state(b)
}

async fn models(State(b): State<Arc<SimBackend>>, Path(replica): Path<u32>) -> Response {
    if b.gpu(replica).is_none() {
        return no_replica(replica).into_response();
    }
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{ "id": b.fleet.served_model.id, "object": "model", "created": 0, "owned_by": "hcp" }],
    }))
    .into_response()
}

fn no_replica(replica: u32) -> OaiError {
    OaiError::new(StatusCode::NOT_FOUND, "not_found_error", None, format!("replica {replica}: not a GPU of this fleet"))
}

async fn chat(State(b): State<Arc<SimBackend>>, Path(r): Path<u32>, h: HeaderMap, body: Bytes) -> Response {
    generate(b, r, Endpoint::Chat, &h, &body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(b): State<Arc<SimBackend>>, Path(r): Path<u32>, h: HeaderMap, body: Bytes) -> Response {
    generate(b, r, Endpoint::Completions, &h, &body).await.unwrap_or_else(IntoResponse::into_response)
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn words(from: u32, n: u32) -> String {
    (from..from + n).map(|i| WORDS[i as usize % WORDS.len()]).collect()
}

/// A stream's chunks, rendered from the parts around the text that are the same in every chunk
/// (built once per stream, not as a JSON tree per token).
struct ChunkTemplate {
    ep: Endpoint,
    /// `data: {"id":...,"object":...,"created":...,"model":...,"choices":[{"index":0,`
    head: Vec<u8>,
    /// `}]` then `"usage":null` when the client asked for usage, then `}` and the blank line.
    tail: &'static [u8],
}

impl ChunkTemplate {
    fn new(ep: Endpoint, id: &str, object: &str, created: u64, model: &str, include_usage: bool) -> Self {
        let s = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let head = format!(
            "data: {{\"id\":{},\"object\":{},\"created\":{created},\"model\":{},\"choices\":[{{\"index\":0,",
            s(id),
            s(object),
            s(model)
        );
        let tail: &'static [u8] = if include_usage { b"}],\"usage\":null}\n\n" } else { b"}]}\n\n" };
        ChunkTemplate { ep, head: head.into_bytes(), tail }
    }

    fn render(&self, content: Option<&str>, finish: Option<&str>, first: bool) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + 96 + content.map_or(0, str::len));
        out.extend_from_slice(&self.head);
        let text = |out: &mut Vec<u8>, t: &str| serde_json::to_writer(out, t).expect("a string serialises");
        match self.ep {
            Endpoint::Chat => match (first, content) {
                (true, c) => {
                    out.extend_from_slice(b"\"delta\":{\"role\":\"assistant\",\"content\":");
                    text(&mut out, c.unwrap_or(""));
                    out.push(b'}');
                }
                (false, Some(c)) => {
                    out.extend_from_slice(b"\"delta\":{\"content\":");
                    text(&mut out, c);
                    out.push(b'}');
                }
                (false, None) => out.extend_from_slice(b"\"delta\":{}"),
            },
            Endpoint::Completions => {
                out.extend_from_slice(b"\"text\":");
                text(&mut out, content.unwrap_or(""));
            }
        }
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => text(&mut out, f),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(self.tail);
        Bytes::from(out)
    }
}

async fn generate(
    b: Arc<SimBackend>,
    replica: u32,
    ep: Endpoint,
    h: &HeaderMap,
    body: &[u8],
) -> Result<Response, OaiError> {
    let g = b.gpu(replica).ok_or_else(|| no_replica(replica))?.clone();
    let req = parse(ep, body)?;
    let served = &b.fleet.served_model;
    if req.model != served.id {
        return Err(OaiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("model: {} is not served here (this replica serves {})", req.model, served.id),
        ));
    }
    let output = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if u64::from(req.prompt_tokens) + u64::from(output) > u64::from(served.context_tokens) {
        let mut e = OaiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "messages: {} prompt and {output} output tokens exceed the model's context of {} tokens",
                req.prompt_tokens, served.context_tokens
            ),
        );
        e.param = Some("messages".into());
        return Err(e);
    }
    let finish = if req.max_tokens.is_some() { "length" } else { "stop" };
    let id = h
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map_or_else(|| format!("{}-{}", ep.id_prefix(), crate::auth::short_id()), str::to_string);
    let model = served.id.clone();
    let created = now_s();
    let usage = serde_json::json!({
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": output,
        "total_tokens": req.prompt_tokens + output,
    });
    let (ttft, _) = b.timing(replica, &g, req.prompt_tokens, output);
    let mut seq = b.start(replica);
    if !req.stream {
        tokio::time::sleep(Duration::from_secs_f64(ttft)).await;
        let mut done = 1;
        while done < output {
            let (_, tpot) = b.timing(replica, &g, req.prompt_tokens, output);
            let n = ((CHUNK_MS as f64 / 1000.0 / tpot).floor() as u32).clamp(1, output - done);
            tokio::time::sleep(Duration::from_secs_f64(tpot * f64::from(n))).await;
            done += n;
        }
        seq.finished = true;
        let text = words(0, output);
        let choice = match ep {
            Endpoint::Chat => serde_json::json!({
                "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Completions => {
                serde_json::json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish })
            }
        };
        let object = if ep == Endpoint::Chat { "chat.completion" } else { "text_completion" };
        return Ok(axum::Json(serde_json::json!({
            "id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage,
        }))
        .into_response());
    }
    let include_usage = req.include_usage;
    let prompt = req.prompt_tokens;
    let object = if ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    let usage_line = if include_usage {
        let v = serde_json::json!({
            "id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage,
        });
        format!("data: {v}\n\n")
    } else {
        String::new()
    };
    let tpl = ChunkTemplate::new(ep, &id, object, created, &model, include_usage);
    // (tokens sent, whether the closing chunks went)
    let state = (0u32, false, seq, tpl, usage_line);
    let stream = futures::stream::unfold(state, move |(sent, closed, mut seq, tpl, usage_line)| {
        let b = b.clone();
        let g = g.clone();
        async move {
            if closed {
                return None;
            }
            if sent == output {
                let mut out = tpl.render(None, Some(finish), false).to_vec();
                out.extend_from_slice(usage_line.as_bytes());
                out.extend_from_slice(b"data: [DONE]\n\n");
                seq.finished = true;
                return Some((Ok::<_, std::io::Error>(Bytes::from(out)), (sent, true, seq, tpl, usage_line)));
            }
            let (ttft, tpot) = b.timing(replica, &g, prompt, output);
            let (wait, n) = if sent == 0 {
                (ttft, 1)
            } else {
                let n = ((CHUNK_MS as f64 / 1000.0 / tpot).floor() as u32).clamp(1, output - sent);
                (tpot * f64::from(n), n)
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            let text = words(sent, n);
            let bytes = tpl.render(Some(&text), None, sent == 0);
            Some((Ok(bytes), (sent + n, false, seq, tpl, usage_line)))
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    res.headers_mut().insert(header::CONTENT_TYPE, "text/event-stream".parse().expect("static"));
    res.headers_mut().insert(header::CACHE_CONTROL, "no-cache".parse().expect("static"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The rendered chunks are the JSON a chunk of the OpenAI API is.
    #[test]
    fn chunks_render_as_the_api_shapes_them() {
        for include_usage in [false, true] {
            let t = ChunkTemplate::new(Endpoint::Chat, "chatcmpl-1", "chat.completion.chunk", 7, "m\"x", include_usage);
            let parse = |b: Bytes| {
                let s = String::from_utf8(b.to_vec()).unwrap();
                let body = s.strip_prefix("data: ").and_then(|s| s.strip_suffix("\n\n")).expect("one SSE event");
                serde_json::from_str::<serde_json::Value>(body).unwrap()
            };
            let mut want = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m\"x",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": " a\"b"}, "logprobs": null, "finish_reason": null}]});
            if include_usage {
                want["usage"] = serde_json::Value::Null;
            }
            assert_eq!(parse(t.render(Some(" a\"b"), None, true)), want);
            want["choices"][0]["delta"] = json!({"content": " c"});
            assert_eq!(parse(t.render(Some(" c"), None, false)), want);
            want["choices"][0]["delta"] = json!({});
            want["choices"][0]["finish_reason"] = json!("length");
            assert_eq!(parse(t.render(None, Some("length"), false)), want);
            let t = ChunkTemplate::new(Endpoint::Completions, "cmpl-1", "text_completion", 7, "m", include_usage);
            let mut want = json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "text": " d", "logprobs": null, "finish_reason": null}]});
            if include_usage {
                want["usage"] = serde_json::Value::Null;
            }
            assert_eq!(parse(t.render(Some(" d"), None, true)), want);
        }
    }
}
