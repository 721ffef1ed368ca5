//! Authentication and authorisation.
//!
//! Two kinds of bearer token:
//! - operator accounts, `hcpa_<account>_<secret>`, with a role: admin > operator > viewer;
//! - tenant API keys, `hcpk_<key id>_<secret>`, that act for one tenant.
//!
//! Secrets are stored only as Argon2id hashes. Verifying one costs tens of milliseconds by design,
//! so a verified token is remembered in memory for [`CACHE_TTL`] (bounded to [`CACHE_MAX`] tokens);
//! revoking a key drops it from the cache at once. Tokens are never logged. Each principal has a
//! token bucket (tenant keys: the key's rate; accounts: [`ACCOUNT_RATE_PER_S`]); an empty bucket
//! answers 429 with Retry-After.
//!
//! Wrong tokens cannot buy the process's memory and CPU ([`Guard`]): at most
//! [`Guard::slots`] Argon2 checks run at once (each holds about 19 MiB); a token that failed is
//! refused from memory for [`FAILED_TTL`] without a second check; a client address that failed
//! [`FAILURES_PER_ADDR`] times in a [`FAILURE_WINDOW`] is refused without a check until the window
//! ends, and so is any failing address trying a name (account or key id) that failed
//! [`FAILURES_PER_NAME`] times (an address with no failure still gets its check: a flood of guesses
//! does not lock the owner out). An unknown name is checked against a dummy hash, so it costs what
//! a known one costs and the time of the answer does not tell which names exist. Tokens already
//! verified are served from the cache and never wait for any of this.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::http::StatusCode;

use crate::error::ApiError;

pub const CACHE_TTL: Duration = Duration::from_secs(60);
pub const CACHE_MAX: usize = 10_000;
/// How long a token that failed verification is refused without another check.
pub const FAILED_TTL: Duration = Duration::from_secs(60);
/// The window in which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Failed verifications one client address may cause in a window.
pub const FAILURES_PER_ADDR: u32 = 20;
/// Failed verifications of one account name or key id in a window, after which failing
/// addresses are refused for that name without a check.
pub const FAILURES_PER_NAME: u32 = 20;
/// How long a request waits for a verification slot before it is told to come back.
pub const SLOT_WAIT: Duration = Duration::from_secs(5);
/// Default requests per second of an operator account (`Config::account_rate_per_s`).
pub const ACCOUNT_RATE_PER_S: f64 = 1_000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    Account { name: String, role: Role },
    Tenant { tenant: String, key: String, band: i64, rate_per_s: f64 },
}

impl Principal {
    /// Who, for the audit log.
    pub fn actor(&self) -> String {
        match self {
            Principal::Account { name, .. } => format!("account:{name}"),
            Principal::Tenant { tenant, key, .. } => format!("tenant:{tenant}/key:{key}"),
        }
    }

    /// An operator account with at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        match self {
            Principal::Account { role: r, .. } if *r >= role => Ok(()),
            Principal::Account { role: r, .. } => {
                Err(ApiError::forbidden(format!("needs the {} role; this account is {}", role.as_str(), r.as_str())))
            }
            Principal::Tenant { .. } => Err(ApiError::forbidden("needs an operator account, not a tenant key")),
        }
    }

    /// An admin, or the tenant itself.
    pub fn require_tenant(&self, tenant: &str) -> Result<(), ApiError> {
        match self {
            Principal::Tenant { tenant: t, .. } if t == tenant => Ok(()),
            Principal::Tenant { .. } => Err(ApiError::not_found(format!("tenant {tenant} not found"))),
            p => p.require(Role::Admin),
        }
    }
}

/// A new random secret: 32 bytes as hex.
pub fn secret() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random source");
    hex(&b)
}

/// A new random id: 8 bytes as hex.
pub fn short_id() -> String {
    hex(&random8())
}

fn random8() -> [u8; 8] {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b
}

/// A new request id, ordered by time: the wall-clock millisecond (12 hex digits) and 16 hex
/// digits unique in this process (a counter mixed with a random salt, so ids of two API processes
/// do not collide either). Usage rows are keyed by it: ids that grow with time land at the end of
/// the storage index instead of on a random page of it, so a metering commit writes a few pages,
/// not one per row.
pub fn request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SALT: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let salt = *SALT.get_or_init(|| u64::from_le_bytes(random8()));
    let ms = crate::wall_ms() as u64;
    // splitmix64: a bijection of the counter, so no two ids of this process share these digits.
    let mut z = salt.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    format!("{:012x}{z:016x}", ms & 0xFFFF_FFFF_FFFF)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

pub fn hash_secret(secret: &str) -> String {
    argon2::Argon2::default().hash_password(secret.as_bytes()).expect("argon2 hashes any input").to_string()
}

pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(secret.as_bytes(), &h).is_ok())
}

/// The hash an unknown name's secret is checked against: made once per process, with the same
/// parameters as every stored hash, of a secret nobody knows.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_secret(&secret()))
}

/// The failure count's key of a client address (an IPv4 address or an IPv6 /64).
fn addr_key(a: std::net::IpAddr) -> String {
    format!("a:{}", crate::net::client_key(a))
}

/// Counts in a fixed window.
struct Window {
    from: Instant,
    n: u32,
}

/// What stands between wrong tokens and the Argon2 checks (see the module's documentation).
pub struct Guard {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    slots_n: usize,
    /// Hashes of tokens that failed, with when.
    failed: Mutex<HashMap<u64, Instant>>,
    hasher: std::hash::RandomState,
    /// Failures by `a:<address>` and `n:<name>`.
    failures: Mutex<HashMap<String, Window>>,
    /// Checks run (of any outcome), for tests and metrics.
    pub checks: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicUsize,
    /// The most checks that ran at once.
    pub peak: std::sync::atomic::AtomicUsize,
}

/// The check a token may have now.
pub enum Admission {
    /// Run the check while holding this slot.
    Check(tokio::sync::OwnedSemaphorePermit),
    Refused(ApiError),
}

impl Guard {
    /// `slots` checks at once (at least one).
    pub fn new(slots: usize) -> Guard {
        let slots = slots.max(1);
        Guard {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(slots)),
            slots_n: slots,
            failed: Mutex::default(),
            hasher: std::hash::RandomState::new(),
            failures: Mutex::default(),
            checks: Default::default(),
            running: Default::default(),
            peak: Default::default(),
        }
    }

    /// Checks at once by default: half the cores (at least one), so that good requests keep
    /// the other half while wrong tokens pour in.
    pub fn default_slots() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1)
    }

    pub fn slots(&self) -> usize {
        self.slots_n
    }

    fn token_hash(&self, token: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(token)
    }

    /// The failures counted for `key` in its current window, and the time left in it.
    fn window(&self, key: &str, now: Instant) -> Option<(u32, Duration)> {
        let f = self.failures.lock().expect("failures lock");
        let w = f.get(key)?;
        let age = now.duration_since(w.from);
        (age < FAILURE_WINDOW).then(|| (w.n, FAILURE_WINDOW - age))
    }

    /// How long `key` stays refused, when it has `limit` failures in its window.
    fn over(&self, key: &str, limit: u32, now: Instant) -> Option<Duration> {
        self.window(key, now).filter(|(n, _)| *n >= limit).map(|(_, left)| left)
    }

    /// Why a check of `token` from `addr` for `name` is refused now, if it is.
    fn refusal(&self, token: &str, name: &str, addr: Option<std::net::IpAddr>) -> Option<ApiError> {
        let now = Instant::now();
        let refused = |why: String, wait: Duration| {
            let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_failures", why);
            e.retry_after_s = Some(wait.as_secs().max(1));
            e
        };
        {
            let failed = self.failed.lock().expect("failed lock");
            if failed.get(&self.token_hash(token)).is_some_and(|at| now.duration_since(*at) < FAILED_TTL) {
                return Some(ApiError::unauthorized("invalid token"));
            }
        }
        let addr_key = addr.map(addr_key);
        if let Some(wait) = addr_key.as_deref().and_then(|k| self.over(k, FAILURES_PER_ADDR, now)) {
            return Some(refused(
                format!("too many invalid tokens from this address; retry in {} s", wait.as_secs()),
                wait,
            ));
        }
        // A name under attack: addresses that have failed are refused for it; one that has not
        // (its owner, most likely) still gets its check.
        let failing = addr_key.as_deref().is_none_or(|k| self.window(k, now).is_some_and(|(n, _)| n > 0));
        if failing && let Some(wait) = self.over(&format!("n:{name}"), FAILURES_PER_NAME, now) {
            return Some(refused(
                format!("too many invalid tokens for this name; retry in {} s", wait.as_secs()),
                wait,
            ));
        }
        None
    }

    /// Whether `token` (naming `name`, sent from `addr`) may be checked now; waits up to
    /// [`SLOT_WAIT`] for a slot. The limits are looked at again once a slot is held: the
    /// failures of the checks that ran meanwhile count.
    pub async fn admit(&self, token: &str, name: &str, addr: Option<std::net::IpAddr>) -> Admission {
        if let Some(e) = self.refusal(token, name, addr) {
            return Admission::Refused(e);
        }
        match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => match self.refusal(token, name, addr) {
                Some(e) => Admission::Refused(e),
                None => Admission::Check(p),
            },
            _ => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many token verifications in progress; retry shortly",
                );
                e.retry_after_s = Some(1);
                Admission::Refused(e)
            }
        }
    }

    /// Runs one check off the async threads, counting it.
    pub async fn check(&self, secret: String, hash: String) -> Result<bool, ApiError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.checks.fetch_add(1, Relaxed);
        let running = self.running.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(running, Relaxed);
        let r = tokio::task::spawn_blocking(move || verify_secret(&secret, &hash)).await;
        self.running.fetch_sub(1, Relaxed);
        r.map_err(ApiError::internal)
    }

    /// The token failed its check: remembered, and counted against its address and name.
    pub fn failed(&self, token: &str, name: &str, addr: Option<std::net::IpAddr>) {
        let now = Instant::now();
        {
            let mut failed = self.failed.lock().expect("failed lock");
            if failed.len() >= CACHE_MAX {
                failed.retain(|_, at| now.duration_since(*at) < FAILED_TTL);
                if failed.len() >= CACHE_MAX {
                    failed.clear();
                }
            }
            failed.insert(self.token_hash(token), now);
        }
        let mut f = self.failures.lock().expect("failures lock");
        if f.len() >= CACHE_MAX {
            f.retain(|_, w| now.duration_since(w.from) < FAILURE_WINDOW);
        }
        let keys = addr.map(addr_key).into_iter().chain(std::iter::once(format!("n:{name}")));
        for k in keys {
            let w = f.entry(k).or_insert(Window { from: now, n: 0 });
            if now.duration_since(w.from) >= FAILURE_WINDOW {
                *w = Window { from: now, n: 0 };
            }
            w.n += 1;
        }
        metrics::counter!("hcp_auth_failures_total").increment(1);
    }
}

/// What a token says it is, before verification.
#[derive(Debug, PartialEq)]
pub enum TokenKind<'a> {
    Account { name: &'a str, secret: &'a str },
    Key { id: &'a str, secret: &'a str },
}

pub fn parse_token(t: &str) -> Option<TokenKind<'_>> {
    let (kind, rest) = t.split_once('_')?;
    let (name, secret) = rest.rsplit_once('_')?;
    if name.is_empty() || secret.len() < 16 || !secret.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    match kind {
        "hcpa" => Some(TokenKind::Account { name, secret }),
        "hcpk" => Some(TokenKind::Key { id: name, secret }),
        _ => None,
    }
}

/// The format every account name and key id follows.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The verified-token cache and the rate limiters.
pub struct Gate {
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
    /// Tokens being verified now, each with the lock its other requests wait on.
    verifying: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    account_rate_per_s: f64,
    /// The bounds on checks of tokens not in the cache.
    pub guard: Guard,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(ACCOUNT_RATE_PER_S)
    }
}

impl Gate {
    pub fn new(account_rate_per_s: f64) -> Self {
        Gate {
            cache: Mutex::default(),
            verifying: Mutex::default(),
            buckets: Mutex::default(),
            account_rate_per_s,
            guard: Guard::new(Guard::default_slots()),
        }
    }

    pub fn cached(&self, token: &str) -> Option<Principal> {
        let c = self.cache.lock().expect("cache lock");
        c.get(token).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(p, _)| p.clone())
    }

    /// The lock that requests with this token take while it is verified.
    pub fn verifying(&self, token: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut v = self.verifying.lock().expect("verifying lock");
        v.entry(token.to_string()).or_default().clone()
    }

    /// The token's verification is over (whatever its outcome).
    pub fn verified(&self, token: &str) {
        self.verifying.lock().expect("verifying lock").remove(token);
    }

    pub fn remember(&self, token: &str, p: &Principal) {
        let mut c = self.cache.lock().expect("cache lock");
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(token.to_string(), (p.clone(), Instant::now()));
    }

    /// Forgets every cached token of a key (revocation).
    pub fn forget_key(&self, key_id: &str) {
        let mut c = self.cache.lock().expect("cache lock");
        c.retain(|_, (p, _)| !matches!(p, Principal::Tenant { key, .. } if key == key_id));
    }

    /// Forgets one cached entry (an ended session).
    pub fn forget(&self, key: &str) {
        self.cache.lock().expect("cache lock").remove(key);
    }

    /// Forgets every cached token of an account (its secret or role changed).
    pub fn forget_account(&self, account: &str) {
        let mut c = self.cache.lock().expect("cache lock");
        c.retain(|_, (p, _)| !matches!(p, Principal::Account { name, .. } if name == account));
    }

    /// Takes one request from the principal's bucket, or says how long to wait.
    pub fn admit(&self, p: &Principal) -> Result<(), ApiError> {
        let (id, rate) = match p {
            Principal::Account { name, .. } => (format!("a:{name}"), self.account_rate_per_s),
            Principal::Tenant { key, rate_per_s, .. } => (format!("k:{key}"), *rate_per_s),
        };
        let burst = (rate * 2.0).max(1.0);
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("bucket lock");
        let e = b.entry(id).or_insert(Bucket { tokens: burst, at: now });
        e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * rate).min(burst);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - e.tokens) / rate).ceil().max(1.0) as u64;
        let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("over {rate} requests/s"));
        err.retry_after_s = Some(wait);
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_grow_with_time() {
        let ids: Vec<String> = (0..200_000).map(|_| request_id()).collect();
        assert!(ids.iter().all(|i| i.len() == 28 && i.bytes().all(|c| c.is_ascii_hexdigit())));
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // The time prefix never goes back, and it is the wall clock's millisecond.
        assert!(ids.windows(2).all(|w| w[0][..12] <= w[1][..12]));
        let now = crate::wall_ms() as u64;
        let last = u64::from_str_radix(&ids[ids.len() - 1][..12], 16).unwrap();
        assert!(now - last < 60_000, "{now} vs {last}");
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    #[test]
    fn tokens_parse_and_secrets_verify() {
        let s = secret();
        assert_eq!(s.len(), 64);
        let t = format!("hcpa_admin_{s}");
        assert_eq!(parse_token(&t), Some(TokenKind::Account { name: "admin", secret: &s }));
        assert_eq!(parse_token(&format!("hcpk_ab12_{s}")), Some(TokenKind::Key { id: "ab12", secret: &s }));
        assert_eq!(parse_token("hcpa_admin_short"), None);
        assert_eq!(parse_token("bearer"), None);
        let h = hash_secret(&s);
        assert!(verify_secret(&s, &h));
        assert!(!verify_secret("x", &h));
        assert!(!verify_secret(&s, "not a hash"));
    }

    #[test]
    fn roles_order_and_buckets_refill() {
        let viewer = Principal::Account { name: "v".into(), role: Role::Viewer };
        assert!(viewer.require(Role::Viewer).is_ok());
        assert!(viewer.require(Role::Operator).is_err());
        let t = Principal::Tenant { tenant: "t".into(), key: "k".into(), band: 1, rate_per_s: 1.0 };
        assert!(t.require(Role::Viewer).is_err());
        assert!(t.require_tenant("t").is_ok() && t.require_tenant("u").is_err());
        let g = Gate::default();
        assert!(g.admit(&t).is_ok() && g.admit(&t).is_ok());
        let e = g.admit(&t).unwrap_err();
        assert_eq!((e.status, e.retry_after_s), (StatusCode::TOO_MANY_REQUESTS, Some(1)));
    }
}
