//! Metering: usage records reach storage through one writer task that commits whatever has
//! arrived as one transaction (group commit), so a busy gateway pays one commit per batch, not
//! per request. A caller that must not answer before its record is durable awaits
//! [`Meter::record`]; a record made while a request is being torn down (client gone) uses
//! [`Meter::record_detached`]. A failed write is retried with back-off until it succeeds: records
//! are never dropped, and a record's id makes a repeated write count once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hcp_store::{Store, UsageRow};
use tokio::sync::{mpsc, oneshot};

/// Most records in one transaction.
pub const MAX_BATCH: usize = 5_000;

// Nearly every message is a row: boxing it would add an allocation per record to shrink the rare
// flush.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Row(UsageRow, Option<oneshot::Sender<()>>),
    /// Acknowledged once every record sent before it is stored.
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
pub struct MeterStats {
    pub written: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
}

#[derive(Clone)]
pub struct Meter {
    tx: mpsc::UnboundedSender<Msg>,
    pub stats: Arc<MeterStats>,
}

impl Meter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Store) -> Meter {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(MeterStats::default());
        tokio::spawn(writer(store, rx, stats.clone()));
        Meter { tx, stats }
    }

    /// Records usage and returns once it is committed.
    pub async fn record(&self, row: UsageRow) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Row(row, Some(tx))).map_err(|_| anyhow::anyhow!("the metering writer has stopped"))?;
        rx.await.map_err(|_| anyhow::anyhow!("the metering writer has stopped"))
    }

    /// Records usage without waiting (a request torn down by its client).
    pub fn record_detached(&self, row: UsageRow) {
        if self.tx.send(Msg::Row(row.clone(), None)).is_err() {
            tracing::error!(usage = %row.id, tenant = %row.tenant_id, "metering writer stopped; usage record not written");
        }
    }

    /// Returns once everything recorded before the call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Msg>, stats: Arc<MeterStats>) {
    let mut rows = Vec::with_capacity(MAX_BATCH);
    let mut acks = vec![];
    let mut flushes = vec![];
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Row(r, ack) => {
                    rows.push(r);
                    acks.extend(ack);
                }
                Msg::Flush(ack) => flushes.push(ack),
            }
            if rows.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !rows.is_empty() {
            let started = Instant::now();
            let mut backoff = Duration::from_millis(50);
            loop {
                match store.put_usage(&rows).await {
                    Ok(new) => {
                        stats.written.fetch_add(new, Ordering::Relaxed);
                        stats.duplicates.fetch_add(rows.len() as u64 - new, Ordering::Relaxed);
                        stats.batches.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("hcp_usage_records_total").increment(new);
                        metrics::histogram!("hcp_usage_batch_seconds").record(started.elapsed().as_secs_f64());
                        break;
                    }
                    Err(e @ hcp_store::StoreError::Invalid { .. }) => {
                        // A record storage refuses would block every later one: write the others
                        // one by one and log the refused record whole.
                        tracing::error!(error = %e, "usage batch refused; writing records one by one");
                        for r in &rows {
                            if let Err(e) = store.put_usage(std::slice::from_ref(r)).await {
                                tracing::error!(error = %e, usage = ?r, "usage record refused by storage");
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        stats.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, rows = rows.len(), "usage write failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            rows.clear();
        }
        for a in acks.drain(..).chain(flushes.drain(..)) {
            let _ = a.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u32) -> UsageRow {
        UsageRow {
            seq: 0,
            id: format!("r{id}"),
            tenant_id: "demo".into(),
            key_id: "k".into(),
            kind: hcp_model::UsageKind::Tokens,
            tier: 1,
            model: "m".into(),
            site_id: "s".into(),
            input_tokens: 10,
            output_tokens: 20,
            gpu_ms: 0,
            spot: false,
            status: hcp_model::UsageStatus::Completed,
            tag: None,
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn every_record_is_written_once() {
        let dir = std::env::temp_dir().join(format!("hcp-meter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite:{}", dir.join("m.db").display())).await.unwrap();
        store.migrate().await.unwrap();
        let m = Meter::start(store.clone());
        let mut waits = vec![];
        for i in 0..3_000 {
            if i % 2 == 0 {
                let m = m.clone();
                waits.push(tokio::spawn(async move { m.record(row(i)).await }));
            } else {
                m.record_detached(row(i));
            }
        }
        // The same usage again (a retried write) counts once.
        m.record(row(0)).await.unwrap();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        m.flush().await;
        let all = store.usage(&Default::default(), &hcp_store::Page { after: None, limit: Some(1_000) }).await.unwrap();
        assert_eq!(all.len(), 1_000);
        assert_eq!(m.stats.written.load(Ordering::Relaxed), 3_000);
        assert_eq!(m.stats.duplicates.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
