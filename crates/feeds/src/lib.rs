//! Signal feeds for live mode: each reads the outside world and turns what it reads into the
//! engine's typed inputs ([`hcp_engine::Input`]), with its name as the signals' source.
//!
//! - [`ercot`]: ERCOT's public data API: real-time settlement point prices (NP6-905-CD, 15 min),
//!   SCED locational prices (NP6-788-CD, 5 min) and day-ahead prices (NP4-190-CD), behind ERCOT's
//!   token (B2C ROPC flow) and subscription key.
//! - [`mempool`]: BTC price, difficulty, block height and fees from mempool.space's JSON API (or a
//!   server with its API), turned into a hashprice.
//! - [`replay`]: recorded series (the CSV layouts of `shared/data/ercot` and `shared/data/bitcoin`)
//!   replayed on the clock, each value published when it would have been known.
//! - a GPU contract price from the configuration ([`config::GpuPriceConfig`]).
//!
//! Manual values are set through the API (the server turns them into inputs with source `manual`).
//!
//! Architecture invariant: an adapter. The parsers are pure functions of a response body (tested on
//! recorded responses); the clients do the IO. A response that does not parse, or a value out of
//! range, changes nothing: the poll fails with the field and the rule named, and the engine's
//! `feed:<name>` alert says so until a poll succeeds.

pub mod config;
pub mod ercot;
pub mod mempool;
pub mod replay;
pub mod run;
pub mod time;

pub use config::FeedsConfig;
pub use run::{Clock, FeedMsg, spawn};

/// Why a poll of a feed failed. Its text names the request or field and the rule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FeedError {
    #[error("{url}: no answer within {timeout_s} s")]
    Timeout { url: String, timeout_s: u64 },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{what}: {field}: {rule}")]
    Malformed { what: String, field: String, rule: String },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("{0}")]
    Ended(String),
}

impl FeedError {
    pub(crate) fn malformed(what: &str, field: impl Into<String>, rule: impl Into<String>) -> Self {
        FeedError::Malformed { what: what.into(), field: field.into(), rule: rule.into() }
    }

    /// From a failed HTTP request.
    pub(crate) fn from_reqwest(url: &str, timeout_s: u64, e: reqwest::Error) -> Self {
        if e.is_timeout() {
            FeedError::Timeout { url: url.into(), timeout_s }
        } else if let Some(s) = e.status() {
            FeedError::Http { url: url.into(), status: s.as_u16() }
        } else {
            // The chain of sources says what went wrong (connection refused, TLS, ...).
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            FeedError::Transport { url: url.into(), reason }
        }
    }
}

/// The HTTP client every feed uses: rustls (reqwest's own provider) with the system's root
/// certificates; a timeout per request.
pub fn http_client(timeout_s: u64) -> Result<reqwest::Client, FeedError> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(timeout_s.max(1)))
        .user_agent(concat!("hcp/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FeedError::Transport { url: "-".into(), reason: format!("HTTP client: {e}") })
}

/// GET a URL with a query and headers; the body when the status is 2xx.
pub(crate) async fn get(
    client: &reqwest::Client,
    url: &str,
    query: &[(&str, String)],
    headers: &[(&str, &str)],
    timeout_s: u64,
) -> Result<Vec<u8>, FeedError> {
    let mut req = client.get(url).query(query);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.map_err(|e| FeedError::from_reqwest(url, timeout_s, e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(FeedError::Http { url: url.into(), status: status.as_u16() });
    }
    let body = resp.bytes().await.map_err(|e| FeedError::from_reqwest(url, timeout_s, e))?;
    Ok(body.to_vec())
}
