//! Per-tenant allowances, shared by every API process: requests and tokens a minute over all of
//! a tenant's keys (`TenantRow::requests_per_min`, `tokens_per_min`). Each key's own rate is the
//! token bucket of `auth::Gate`; this is the tenant's ceiling above it, so more keys do not
//! mean more throughput.
//!
//! Counted in fixed one-minute windows (wall clock). Each process admits against what every
//! process had used when it last synchronised plus what it admitted since, and adds what it
//! admitted to the store's window a few times a second ([`SYNC_EVERY`], `Store::add_rate_usage`),
//! reading the total back; a tenant's first request of a minute on a process first reads what
//! the others used of it ([`admit`]). So N processes together may admit at most about
//! (N - 1) × [`SYNC_EVERY`] × the tenant's rate more than its allowance in a window; one process
//! never does.
//!
//! Tokens are reserved at admission (the prompt's estimate plus the most output asked for) and
//! settled to what was used when the request ends, as OpenAI counts tokens a minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hcp_store::RateDelta;

/// How often a process adds what it admitted to the shared windows and reads them back.
pub const SYNC_EVERY: Duration = Duration::from_millis(250);
/// A window's length.
pub const WINDOW_MS: i64 = 60_000;

#[derive(Default)]
struct Window {
    start_ms: i64,
    /// Every process's use as last read from the store (this one's included).
    known_requests: i64,
    known_tokens: i64,
    /// This process's use not yet added to the store.
    pending_requests: i64,
    pending_tokens: i64,
}

/// Why a request is over its tenant's allowance.
#[derive(Debug, PartialEq)]
pub struct Over {
    /// `requests_per_min` or `tokens_per_min`.
    pub limit: &'static str,
    pub allowed: i64,
    /// Seconds until the window ends.
    pub retry_after_s: u64,
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tenant's {} ({}) is used up for this minute, over all its keys; retry in {} s",
            self.limit, self.allowed, self.retry_after_s
        )
    }
}

/// A tenant's windows as this process knows them.
#[derive(Default)]
pub struct TenantLimits {
    windows: Mutex<HashMap<String, Window>>,
}

fn window_of(now_ms: i64) -> i64 {
    now_ms.div_euclid(WINDOW_MS) * WINDOW_MS
}

impl TenantLimits {
    /// Admits one request reserving `tokens`, or says which allowance it is over. Returns the
    /// window it was counted in (for [`TenantLimits::settle`]).
    pub fn admit(&self, tenant: &str, rpm: i64, tpm: i64, tokens: i64, now_ms: i64) -> Result<i64, Over> {
        let start = window_of(now_ms);
        let retry_after_s = ((start + WINDOW_MS - now_ms) as u64).div_ceil(1_000).max(1);
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let e = w.entry(tenant.to_string()).or_default();
        if e.start_ms != start {
            *e = Window { start_ms: start, ..Window::default() };
        }
        if e.known_requests + e.pending_requests + 1 > rpm {
            return Err(Over { limit: "requests_per_min", allowed: rpm, retry_after_s });
        }
        // A request larger than the whole allowance could never pass: it is let through alone
        // (at the start of a window), else it would be refused forever.
        let used = e.known_tokens + e.pending_tokens;
        if used + tokens > tpm && used > 0 {
            return Err(Over { limit: "tokens_per_min", allowed: tpm, retry_after_s });
        }
        e.pending_requests += 1;
        e.pending_tokens += tokens;
        Ok(start)
    }

    /// Whether this process has not counted anything for the tenant in the minute of `now_ms`
    /// (it does not know what the other processes used in it).
    pub fn unknown(&self, tenant: &str, now_ms: i64) -> bool {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.get(tenant).is_none_or(|e| e.start_ms != window_of(now_ms))
    }

    /// What every process had used of the tenant's window, read from the store before this
    /// process counts its first request in it.
    pub fn seed(&self, tenant: &str, window: i64, requests: i64, tokens: i64) {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let e = w.entry(tenant.to_string()).or_default();
        if e.start_ms != window {
            *e = Window { start_ms: window, ..Window::default() };
        }
        e.known_requests = e.known_requests.max(requests);
        e.known_tokens = e.known_tokens.max(tokens);
    }

    /// A request admitted in `window` used `delta` tokens more (or fewer) than it reserved.
    pub fn settle(&self, tenant: &str, window: i64, delta: i64) {
        if delta == 0 {
            return;
        }
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = w.get_mut(tenant).filter(|e| e.start_ms == window) {
            e.pending_tokens += delta;
        }
    }

    /// What this process admitted since it last synchronised (now counted as sent): a delta
    /// for every window it has counted in, zero or not, in the minute of `now_ms` (a zero reads
    /// what the other processes used), and for older windows with something not yet sent.
    pub fn take_pending(&self, now_ms: i64) -> Vec<RateDelta> {
        let current = window_of(now_ms);
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![];
        for (tenant, e) in w.iter_mut() {
            if e.start_ms == current || e.pending_requests != 0 || e.pending_tokens != 0 {
                out.push(RateDelta {
                    tenant_id: tenant.clone(),
                    window_ms: e.start_ms,
                    requests: e.pending_requests,
                    tokens: e.pending_tokens,
                });
                e.known_requests += e.pending_requests;
                e.known_tokens += e.pending_tokens;
                e.pending_requests = 0;
                e.pending_tokens = 0;
            }
        }
        out
    }

    /// The store's totals for windows: every process's use.
    pub fn learn(&self, totals: &[(RateDelta, (i64, i64))]) {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for (d, (requests, tokens)) in totals {
            if let Some(e) = w.get_mut(&d.tenant_id).filter(|e| e.start_ms == d.window_ms) {
                e.known_requests = *requests;
                e.known_tokens = *tokens;
            }
        }
    }

    /// Sends back deltas a failed synchronisation did not deliver.
    pub fn restore(&self, deltas: Vec<RateDelta>) {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for d in deltas {
            if let Some(e) = w.get_mut(&d.tenant_id).filter(|e| e.start_ms == d.window_ms) {
                e.known_requests -= d.requests;
                e.known_tokens -= d.tokens;
                e.pending_requests += d.requests;
                e.pending_tokens += d.tokens;
            }
        }
    }

    /// The windows of tenants idle for a whole window are forgotten.
    fn forget_old(&self, now_ms: i64) {
        let start = window_of(now_ms);
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|_, e| e.start_ms >= start - WINDOW_MS);
    }
}

/// Admits a request as [`TenantLimits::admit`] does; the tenant's first request in a minute on
/// this process first reads what the others used of that minute (one store round trip a tenant
/// a minute), so a process that joins late does not start from zero.
pub async fn admit(app: &crate::App, tenant: &str, rpm: i64, tpm: i64, tokens: i64) -> Result<i64, Over> {
    let now = crate::wall_ms();
    if app.limits.unknown(tenant, now) {
        let probe = RateDelta { tenant_id: tenant.to_string(), window_ms: window_of(now), requests: 0, tokens: 0 };
        match app.store.add_rate_usage(std::slice::from_ref(&probe)).await {
            Ok(t) => {
                if let Some((requests, tokens)) = t.first() {
                    app.limits.seed(tenant, probe.window_ms, *requests, *tokens);
                }
            }
            // The store is the shared memory; without it this process counts alone until it
            // is back (the allowance then holds per process).
            Err(e) => tracing::warn!(error = %e, "tenant rate window not read; counted by this process alone"),
        }
    }
    app.limits.admit(tenant, rpm, tpm, tokens, now)
}

/// Adds what this process admitted to the shared windows and reads every process's totals, every
/// [`SYNC_EVERY`] until `stop`; once a minute, windows older than two minutes leave the store
/// (and answers kept for idempotency keys longer than a day).
pub async fn sync_loop(
    app: std::sync::Arc<crate::App>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = 0i64;
    loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            _ = tick.tick() => {}
        }
        sync_once(&app).await;
        let now = crate::wall_ms();
        if now - last_prune >= WINDOW_MS {
            last_prune = now;
            app.limits.forget_old(now);
            if let Err(e) = app.store.prune_rate_windows(window_of(now) - 2 * WINDOW_MS).await {
                tracing::warn!(error = %e, "old rate windows not pruned");
            }
            // (Answers kept for idempotency keys go after a day, on the same beat.)
            if let Err(e) = app.store.prune_outcomes(now - crate::gateway::KEEP_ANSWERS_MS).await {
                tracing::warn!(error = %e, "old kept answers not pruned");
            }
        }
    }
    sync_once(&app).await;
    Ok(())
}

/// One synchronisation: what this process admitted is added to the shared windows.
pub async fn sync_once(app: &crate::App) {
    let deltas = app.limits.take_pending(crate::wall_ms());
    if deltas.is_empty() {
        return;
    }
    match app.store.add_rate_usage(&deltas).await {
        Ok(totals) => {
            let pairs: Vec<(RateDelta, (i64, i64))> = deltas.into_iter().zip(totals).collect();
            app.limits.learn(&pairs);
        }
        Err(e) => {
            tracing::warn!(error = %e, "tenant rate windows not synchronised; kept for the next try");
            app.limits.restore(deltas);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_admits_up_to_the_allowance_and_settles_tokens() {
        let l = TenantLimits::default();
        let t0 = 120_000;
        for _ in 0..3 {
            l.admit("a", 3, 1_000, 100, t0).unwrap();
        }
        let over = l.admit("a", 3, 1_000, 100, t0 + 15_000).unwrap_err();
        assert_eq!((over.limit, over.retry_after_s), ("requests_per_min", 45));
        // Another tenant has its own window; the next minute starts afresh.
        assert!(l.admit("b", 3, 1_000, 100, t0).is_ok());
        assert!(l.admit("a", 3, 1_000, 100, t0 + 60_000).is_ok());
        // Tokens: reserved at admission, settled to what was used.
        let w = l.admit("c", 100, 1_000, 900, t0).unwrap();
        assert_eq!(l.admit("c", 100, 1_000, 200, t0).unwrap_err().limit, "tokens_per_min");
        l.settle("c", w, -800);
        assert!(l.admit("c", 100, 1_000, 200, t0).is_ok());
        // A request larger than the allowance passes alone, at the start of a window.
        assert!(l.admit("d", 100, 1_000, 5_000, t0).is_ok());
        assert!(l.admit("d", 100, 1_000, 1, t0).is_err());
    }

    #[test]
    fn what_other_processes_used_counts_once_learned() {
        let (p1, p2) = (TenantLimits::default(), TenantLimits::default());
        let t0 = 60_000;
        let mut store = (0i64, 0i64);
        let mut sync = |p: &TenantLimits| {
            let d = p.take_pending(t0);
            let totals: Vec<_> = d
                .into_iter()
                .map(|d| {
                    store.0 += d.requests;
                    store.1 += d.tokens;
                    (d, store)
                })
                .collect();
            p.learn(&totals);
        };
        for _ in 0..6 {
            p1.admit("a", 10, 1_000_000, 1, t0).unwrap();
        }
        sync(&p1);
        for _ in 0..4 {
            p2.admit("a", 10, 1_000_000, 1, t0).unwrap();
        }
        sync(&p2);
        // p2 has learned the 6 of p1: the tenant's 10 are used.
        assert!(p2.admit("a", 10, 1_000_000, 1, t0).is_err());
        // p1 learns the 4 of p2 at its next synchronisation, with nothing of its own to add.
        assert!(p1.admit("a", 10, 1_000_000, 1, t0).is_ok(), "before: it knows its own 6");
        sync(&p1);
        assert!(p1.admit("a", 10, 1_000_000, 1, t0).is_err());
        // A failed synchronisation keeps its deltas for the next.
        let p3 = TenantLimits::default();
        p3.admit("a", 10, 1_000_000, 1, t0).unwrap();
        let d = p3.take_pending(t0);
        p3.restore(d);
        assert_eq!(p3.take_pending(t0)[0].requests, 1);
    }
}
