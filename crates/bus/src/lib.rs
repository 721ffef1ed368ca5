//! The event bus: one interface ([`Bus`]) with two implementations, in-process (the default, for
//! `hcp up`) and NATS JetStream (by URL, for the scaled-out shape). One contract test-suite
//! (`tests/contract.rs`) runs against both.
//!
//! Contract: `publish` returns once the message is stored, with its sequence number (JetStream's
//! stream sequence; a counter in process); a subscriber gets every message on its subjects from
//! the sequence it asked for, in order, once; subjects are dot-separated tokens and filters take
//! `*` (one token) and a final `>` (the rest); payloads are at most [`MAX_PAYLOAD`] bytes. History
//! is bounded ([`Limits`]): a subscriber that asks for what has been dropped gets
//! [`BusError::Gap`], never silently less.
//!
//! Architecture invariant: an adapter; it moves bytes and knows nothing of what they mean.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;

pub const MAX_PAYLOAD: usize = 1 << 20;
/// The JetStream stream that holds the platform's subjects (`hcp.>`).
pub const STREAM: &str = "HCP";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus URL {0:?}: must be `inproc` or start with nats://")]
    Url(String),
    #[error("subject {0:?}: must be dot-separated tokens of letters, digits, - and _, starting with hcp.")]
    Subject(String),
    #[error("payload: {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("messages from {from} on were asked for, but the oldest kept is {oldest}")]
    Gap { from: u64, oldest: u64 },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the bus is closed")]
    Closed,
}

pub type Result<T> = std::result::Result<T, BusError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// Only messages published after subscribing.
    New,
    /// From this sequence number on (inclusive).
    Seq(u64),
}

/// How much history is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub max_messages: usize,
    pub max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_messages: 100_000, max_age: Duration::from_secs(24 * 3_600) }
    }
}

fn check_subject(s: &str, filter: bool) -> Result<()> {
    let tokens: Vec<&str> = s.split('.').collect();
    let ok = tokens.len() >= 2
        && tokens[0] == "hcp"
        && tokens.iter().enumerate().all(|(i, t)| {
            (filter && (*t == "*" || (*t == ">" && i == tokens.len() - 1)))
                || (!t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        });
    if ok { Ok(()) } else { Err(BusError::Subject(s.into())) }
}

/// Whether `subject` matches `filter` (NATS rules).
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The bus.
#[derive(Clone)]
pub enum Bus {
    Local(Arc<Local>),
    Nats(Arc<Nats>),
}

impl Bus {
    /// `inproc` (or nothing) for the in-process bus; `nats://HOST:PORT` for NATS JetStream.
    pub async fn connect(url: Option<&str>, limits: Limits) -> Result<Bus> {
        match url {
            None | Some("inproc") => Ok(Bus::Local(Arc::new(Local::new(limits)))),
            Some(u) if u.starts_with("nats://") => Ok(Bus::Nats(Arc::new(Nats::connect(u, limits).await?))),
            Some(u) => Err(BusError::Url(u.into())),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Bus::Local(_) => "inproc",
            Bus::Nats(_) => "nats",
        }
    }

    /// Stores a message and returns its sequence number.
    pub async fn publish(&self, subject: &str, payload: &[u8]) -> Result<u64> {
        check_subject(subject, false)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(BusError::TooLarge(payload.len()));
        }
        match self {
            Bus::Local(l) => l.publish(subject, payload),
            Bus::Nats(n) => n.publish(subject, payload).await,
        }
    }

    pub async fn subscribe(&self, filter: &str, from: From) -> Result<Subscription> {
        check_subject(filter, true)?;
        match self {
            Bus::Local(l) => l.subscribe(filter, from),
            Bus::Nats(n) => n.subscribe(filter, from).await,
        }
    }

    /// Drops the kept history of the subjects matching `filter` (a benchmark's bulk traffic, for
    /// example); live subscriptions are not affected. Returns the messages dropped.
    pub async fn purge(&self, filter: &str) -> Result<u64> {
        check_subject(filter, true)?;
        match self {
            Bus::Local(l) => Ok(l.purge(filter)),
            Bus::Nats(n) => {
                let stream = n.js.get_stream(STREAM).await.map_err(nats_err)?;
                Ok(stream.purge().filter(filter).await.map_err(nats_err)?.purged)
            }
        }
    }

    /// Whether the bus answers (for readiness).
    pub async fn ping(&self) -> Result<()> {
        match self {
            Bus::Local(_) => Ok(()),
            Bus::Nats(n) => n.ping().await,
        }
    }
}

/// A subscription: `next` gives messages in order.
pub struct Subscription {
    inner: SubInner,
}

enum SubInner {
    Local { bus: Arc<Local>, filter: String, backlog: VecDeque<Message>, rx: broadcast::Receiver<Message>, next: u64 },
    Nats(Box<async_nats::jetstream::consumer::pull::Ordered>),
}

impl Subscription {
    /// The next message, or an error (a gap after falling too far behind, or a closed bus).
    pub async fn next(&mut self) -> Result<Message> {
        match &mut self.inner {
            SubInner::Local { bus, filter, backlog, rx, next } => loop {
                if let Some(m) = backlog.pop_front() {
                    *next = m.seq + 1;
                    return Ok(m);
                }
                match rx.recv().await {
                    Ok(m) => {
                        if m.seq < *next || !matches(filter, &m.subject) {
                            continue;
                        }
                        *next = m.seq + 1;
                        return Ok(m);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live channel: catch up from the kept history.
                        *backlog = bus.history(filter, *next)?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(BusError::Closed),
                }
            },
            SubInner::Nats(stream) => match stream.next().await {
                Some(Ok(m)) => {
                    let info = m.info().map_err(|e| BusError::Nats(e.to_string()))?;
                    Ok(Message {
                        seq: info.stream_sequence,
                        subject: m.subject.to_string(),
                        payload: m.payload.to_vec(),
                    })
                }
                Some(Err(e)) => Err(BusError::Nats(e.to_string())),
                None => Err(BusError::Closed),
            },
        }
    }
}

/// The in-process bus: a bounded history and a broadcast channel for live delivery.
pub struct Local {
    limits: Limits,
    state: Mutex<LocalState>,
    tx: broadcast::Sender<Message>,
}

struct LocalState {
    log: VecDeque<(std::time::Instant, Message)>,
    next_seq: u64,
    /// The oldest sequence the limits have kept (a purge of some subjects does not move it: the
    /// other subjects' history from here on is whole).
    kept_from: u64,
}

impl Local {
    fn new(limits: Limits) -> Self {
        let (tx, _) = broadcast::channel(4_096);
        Local { limits, state: Mutex::new(LocalState { log: VecDeque::new(), next_seq: 1, kept_from: 1 }), tx }
    }

    fn publish(&self, subject: &str, payload: &[u8]) -> Result<u64> {
        let mut st = self.state.lock().expect("bus lock");
        let seq = st.next_seq;
        st.next_seq += 1;
        let m = Message { seq, subject: subject.into(), payload: payload.to_vec() };
        let now = std::time::Instant::now();
        st.log.push_back((now, m.clone()));
        while st.log.len() > self.limits.max_messages
            || st.log.front().is_some_and(|(t, _)| now.duration_since(*t) > self.limits.max_age)
        {
            if let Some((_, m)) = st.log.pop_front() {
                st.kept_from = m.seq + 1;
            }
        }
        // Sent under the lock, so that a subscriber's snapshot and its live channel meet exactly.
        let _ = self.tx.send(m);
        Ok(seq)
    }

    fn purge(&self, filter: &str) -> u64 {
        let mut st = self.state.lock().expect("bus lock");
        let before = st.log.len();
        st.log.retain(|(_, m)| !matches(filter, &m.subject));
        (before - st.log.len()) as u64
    }

    fn history(&self, filter: &str, from: u64) -> Result<VecDeque<Message>> {
        let st = self.state.lock().expect("bus lock");
        let oldest = st.kept_from;
        if from < oldest && from < st.next_seq {
            return Err(BusError::Gap { from, oldest });
        }
        Ok(st.log.iter().map(|(_, m)| m).filter(|m| m.seq >= from && matches(filter, &m.subject)).cloned().collect())
    }

    fn subscribe(self: &Arc<Self>, filter: &str, from: From) -> Result<Subscription> {
        let st = self.state.lock().expect("bus lock");
        let rx = self.tx.subscribe();
        let next = match from {
            From::New => st.next_seq,
            From::Seq(s) => s.max(1),
        };
        drop(st);
        let backlog = match from {
            From::New => VecDeque::new(),
            From::Seq(_) => self.history(filter, next)?,
        };
        Ok(Subscription { inner: SubInner::Local { bus: self.clone(), filter: filter.into(), backlog, rx, next } })
    }
}

/// NATS JetStream: one stream `HCP` over `hcp.>`, file storage, bounded by [`Limits`].
pub struct Nats {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

impl Nats {
    async fn connect(url: &str, limits: Limits) -> Result<Nats> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(nats_err)?;
        let js = async_nats::jetstream::new(client.clone());
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec!["hcp.>".into()],
            max_messages: limits.max_messages as i64,
            max_age: limits.max_age,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
        Ok(Nats { client, js })
    }

    async fn publish(&self, subject: &str, payload: &[u8]) -> Result<u64> {
        let ack = self.js.publish(subject.to_string(), payload.to_vec().into()).await.map_err(nats_err)?;
        let ack = ack.await.map_err(nats_err)?;
        Ok(ack.sequence)
    }

    async fn subscribe(&self, filter: &str, from: From) -> Result<Subscription> {
        use async_nats::jetstream::consumer::DeliverPolicy;
        let mut stream = self.js.get_stream(STREAM).await.map_err(nats_err)?;
        let deliver_policy = match from {
            From::New => DeliverPolicy::New,
            From::Seq(s) => {
                let info = stream.info().await.map_err(nats_err)?;
                let oldest = info.state.first_sequence;
                if s < oldest && s <= info.state.last_sequence {
                    return Err(BusError::Gap { from: s, oldest });
                }
                DeliverPolicy::ByStartSequence { start_sequence: s.max(1) }
            }
        };
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.into(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let messages = consumer.messages().await.map_err(nats_err)?;
        Ok(Subscription { inner: SubInner::Nats(Box::new(messages)) })
    }

    async fn ping(&self) -> Result<()> {
        self.client.flush().await.map_err(nats_err)
    }
}
