//! The OpenAI API's shapes as both the gateway and the simulated backend read and write them:
//! requests of `/v1/chat/completions` and `/v1/completions` (validated, errors naming the field),
//! the error JSON, and the token estimate both sides count with.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::error::ApiError;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl OaiError {
    pub fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        OaiError { status, message: message.into(), kind, param: None, code, retry_after_s: None }
    }

    pub fn invalid(param: impl Into<String>, rule: impl Into<String>) -> Self {
        let param = param.into();
        OaiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", rule.into()),
            kind: "invalid_request_error",
            param: Some(param),
            code: Some("invalid_value"),
            retry_after_s: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        })
    }
}

/// A storage failure in the gateway answers as the API would, in OpenAI's shape.
impl From<hcp_store::StoreError> for OaiError {
    fn from(e: hcp_store::StoreError) -> Self {
        OaiError::from(ApiError::from(e))
    }
}

impl From<ApiError> for OaiError {
    fn from(e: ApiError) -> Self {
        let kind = match e.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let code = match e.status {
            StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
            StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
            _ => Some(e.code),
        };
        OaiError { status: e.status, message: e.message, kind, param: e.field, code, retry_after_s: e.retry_after_s }
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: std::borrow::Cow<'a, str>,
    #[serde(default)]
    content: TextLen,
}

/// The length in bytes of a message's text (a string, or the text parts of an array of parts),
/// read without copying the text: a prompt of many kilobytes is only scanned.
#[derive(Default)]
struct TextLen(usize);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of text parts")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                let mut n = 0;
                while let Some(TextPart(len)) = seq.next_element()? {
                    n += len;
                }
                Ok(TextLen(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// The length in bytes of a string (a text part's `text` is a string, not parts again).
struct StrLen(usize);

impl<'de> Deserialize<'de> for StrLen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StrLen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StrLen, E> {
                Ok(StrLen(s.len()))
            }
        }
        d.deserialize_str(V)
    }
}

/// One part of an array content: only `{"type": "text", "text": ...}` is supported.
struct TextPart(usize);

impl<'de> Deserialize<'de> for TextPart {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(default)]
            text: Option<StrLen>,
        }
        match Raw::deserialize(d)? {
            Raw { kind, text: Some(StrLen(n)) } if kind == "text" => Ok(TextPart(n)),
            _ => Err(serde::de::Error::custom("only text parts are supported")),
        }
    }
}

/// The fields the platform reads; every other field is passed to the backend as it came.
#[derive(Deserialize)]
struct RawRequest<'a> {
    model: String,
    #[serde(default, borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    prompt: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub model: String,
    pub prompt_tokens: u32,
    /// As asked (`max_tokens` or `max_completion_tokens`); None: the backend's default.
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Output tokens when a request does not say (`max_tokens` absent).
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// Tokens of a text as the platform counts them: one per four bytes, rounded up (OpenAI's rule of
/// thumb for English). The simulated backend's tokenizer is this same count, so usage it reports
/// and the gateway's admission estimate agree; a real backend reports its own tokenizer's usage,
/// which is what is billed.
pub fn estimate_tokens(text: &str) -> u32 {
    estimate_bytes(text.len())
}

/// The same estimate for `n` bytes of text.
pub fn estimate_bytes(n: usize) -> u32 {
    u32::try_from(n.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Parses and validates a request body; the error names the field and the rule.
pub fn parse(ep: Endpoint, body: &[u8]) -> Result<Request, OaiError> {
    let d = &mut serde_json::Deserializer::from_slice(body);
    let r: RawRequest = serde_path_to_error::deserialize(d).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        if path == "." { OaiError::invalid("body", msg) } else { OaiError::invalid(path, msg) }
    })?;
    if r.model.is_empty() || r.model.len() > 256 {
        return Err(OaiError::invalid("model", "must be 1 to 256 characters"));
    }
    if r.n.is_some_and(|n| n != 1) {
        return Err(OaiError::invalid("n", "only 1 is supported"));
    }
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    if max_tokens == Some(0) {
        return Err(OaiError::invalid("max_tokens", "must be >= 1"));
    }
    let prompt_tokens = match ep {
        Endpoint::Chat => {
            let Some(msgs) = r.messages else { return Err(OaiError::invalid("messages", "is required")) };
            if msgs.is_empty() {
                return Err(OaiError::invalid("messages", "must hold at least one message"));
            }
            let mut t: u32 = 0;
            for (i, m) in msgs.iter().enumerate() {
                if !matches!(&*m.role, "system" | "developer" | "user" | "assistant" | "tool") {
                    return Err(OaiError::invalid(
                        format!("messages[{i}].role"),
                        "must be system, developer, user, assistant or tool",
                    ));
                }
                // Each message costs its text and 3 tokens of chat format.
                t = t.saturating_add(estimate_bytes(m.content.0)).saturating_add(3);
            }
            t
        }
        Endpoint::Completions => match r.prompt {
            Some(serde_json::Value::String(s)) => estimate_tokens(&s).max(1),
            Some(serde_json::Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                estimate_tokens(a[0].as_str().unwrap_or_default()).max(1)
            }
            Some(serde_json::Value::Array(_)) => {
                return Err(OaiError::invalid("prompt", "only one prompt per request is supported"));
            }
            _ => return Err(OaiError::invalid("prompt", "is required and must be a string")),
        },
    };
    let stream = r.stream.unwrap_or(false);
    let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
    Ok(Request { model: r.model, prompt_tokens, max_tokens, stream, include_usage })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_validate_with_the_field_named() {
        let ok = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":5,"stream":true,
            "stream_options":{"include_usage":true},"temperature":0.2}"#;
        let r = parse(Endpoint::Chat, ok).unwrap();
        assert_eq!((r.prompt_tokens, r.max_tokens, r.stream, r.include_usage), (3 + 3, Some(5), true, true));
        let parts = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"abcd"}]}]}"#;
        assert_eq!(parse(Endpoint::Chat, parts).unwrap().prompt_tokens, 4);
        // The text's length is its decoded bytes (an escape is one byte), null is empty, and the
        // parts of an array add up.
        let escaped = br#"{"model":"m","messages":[{"role":"user","content":"a\"b\n\u00e9\u0041"}]}"#;
        assert_eq!(parse(Endpoint::Chat, escaped).unwrap().prompt_tokens, 3 + 2);
        let mixed = br#"{"model":"m","messages":[{"role":"system","content":null},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"text","text":"efghi"}]}]}"#;
        assert_eq!(parse(Endpoint::Chat, mixed).unwrap().prompt_tokens, 3 + 3 + 3);
        for (body, param) in [
            (&br#"{"messages":[]}"#[..], "body"),
            (br#"{"model":"m","messages":[]}"#, "messages"),
            (br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages[0].role"),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, "max_tokens"),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#, "n"),
            (
                br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text"}]}]}"#,
                "messages[0].content[1]",
            ),
            (br#"{"model":"m","messages":[{"role":"user","content":5}]}"#, "messages[0].content"),
            (
                br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":[{"type":"text","text":"a"}]}]}]}"#,
                "messages[0].content[0].text",
            ),
            (br#"{"model":"m","messages":[{"role":"user","content":{"text":"x"}}]}"#, "messages[0].content"),
        ] {
            let e = parse(Endpoint::Chat, body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{}", e.message);
        }
        let c = parse(Endpoint::Completions, br#"{"model":"m","prompt":"12345678"}"#).unwrap();
        assert_eq!((c.prompt_tokens, c.stream), (2, false));
        assert_eq!(parse(Endpoint::Completions, br#"{"model":"m"}"#).unwrap_err().param.as_deref(), Some("prompt"));
    }
}
