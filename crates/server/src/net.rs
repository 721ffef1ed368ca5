//! How every server of the platform accepts and keeps connections: HTTP/1.1 and HTTP/2 without
//! TLS on one port, Nagle off, each request told its peer's address (`ConnectInfo`), and bounds
//! that a slow or hostile client cannot get around ([`crate::NetConfig`]):
//!
//! - a request's headers must arrive within `header_read_timeout` (hyper's timer; for HTTP/1 it
//!   also runs while a kept-alive connection waits for its next request);
//! - a connection with no request in flight and no byte read or written for `idle_timeout` is
//!   closed (a client that never finishes its first bytes, an idle HTTP/2 connection);
//! - at most `max_connections` open at once per listener, and `max_connections_per_addr` from one
//!   address: a connection over either is closed as soon as it is accepted.
//!
//! A request counts as in flight from its arrival until its response body is dropped (sent or
//! abandoned), so a long answer, a queued request or an event stream is never cut for idleness.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::NetConfig;

/// Streams one HTTP/2 connection to the simulated backend may carry at once. The gateway
/// multiplexes all its requests to it over one connection (hyper's default of 200 would queue the
/// rest); a bound still. Public listeners keep `NetConfig::h2_max_streams` (256).
pub const H2_MAX_STREAMS: u32 = 65_536;

/// The address a client is counted by: an IPv4 address (an IPv4-mapped IPv6 one as the IPv4 it
/// is), or an IPv6 /64 (one client's network: a host picks any of its 2^64 addresses).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections by client address, and in all, on one listener.
#[derive(Default)]
struct Counts {
    by_addr: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// One accepted connection's place in [`Counts`], given back when the connection ends.
struct Slot {
    counts: Arc<Counts>,
    addr: IpAddr,
}

impl Counts {
    fn take(self: &Arc<Self>, addr: IpAddr, cfg: &NetConfig) -> Option<Slot> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= cfg.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut m = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(addr).or_insert(0);
        if *n >= cfg.max_connections_per_addr {
            drop(m);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(Slot { counts: self.clone(), addr })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        let mut m = self.counts.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// What a connection's reader needs to know of its requests.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
}

/// A request in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The router as one connection's service: it adds the peer's address and tracks requests.
#[derive(Clone)]
struct ConnService {
    router: axum::Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl<B> tower_service::Service<Request<B>> for ConnService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let in_flight = InFlight::new(&self.activity);
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let fut = tower_service::Service::call(&mut self.router, req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| Body::new(Tracked { body, _in_flight: in_flight })))
        })
    }
}

/// A connection's socket that fails its read once the connection has been idle too long.
struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> Watched<IO> {
    fn new(io: IO, activity: Arc<Activity>, idle: Duration) -> Self {
        let now = Instant::now();
        Watched { io, activity, idle, last: now, timer: Box::pin(tokio::time::sleep(idle)) }
    }

    /// A write that moved bytes is activity.
    fn wrote(&mut self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        r
    }

    /// Ready(error) once idle for too long; else the timer is armed to wake the reader.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let busy = self.activity.in_flight.load(Ordering::Acquire) > 0;
            if !busy && now.duration_since(self.last) >= self.idle {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            let from = if busy { now } else { self.last };
            self.timer.as_mut().reset((from + self.idle).into());
        }
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` (see the module's documentation) until `stop` resolves; then
/// stops accepting and lets every connection finish what it serves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cfg: NetConfig,
    stop: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(cfg.h2_max_streams);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let counts = Arc::new(Counts::default());
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            c = accept(&listener) => c,
            () = &mut stop => break,
        };
        let Some(slot) = counts.take(client_key(peer.ip()), &cfg) else {
            metrics::counter!("hcp_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        tune(&tcp);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched::new(tcp, activity.clone(), cfg.idle_timeout));
        let service = TowerToHyperService::new(ConnService { router: router.clone(), peer, activity });
        let conn = graceful.watch(builder.serve_connection_with_upgrades(io, service).into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    graceful.shutdown().await;
}

/// Every accepted connection sends small writes at once (no Nagle delay): an SSE stream writes
/// a chunk of a few hundred bytes per token, and each must leave when it is written.
fn tune(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
    }
}

/// The next connection; an error (out of file descriptors, a connection reset before it was
/// accepted) is logged and waited out as `axum::serve` does, never ending the server.
async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            // The peer gave up before it was accepted: nothing wrong here.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every connection the platform's servers accept sends each write at once: a streamed
    /// chunk does not wait for the client's acknowledgement of the one before (with Nagle's
    /// algorithm on, the first token of a stream whose headers went out just before waited for
    /// the client's delayed ACK, up to 40 ms).
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (io, _) = super::accept(&l).await;
        // A socket as the operating system makes it has Nagle on: tuning is what turns it off.
        assert!(!io.nodelay().unwrap() && !plain.nodelay().unwrap());
        super::tune(&io);
        assert!(io.nodelay().unwrap());
    }

    fn limits(header_s: f64, idle_s: f64, per_addr: usize) -> crate::NetConfig {
        crate::NetConfig {
            header_read_timeout: Duration::from_secs_f64(header_s),
            idle_timeout: Duration::from_secs_f64(idle_s),
            max_connections_per_addr: per_addr,
            ..Default::default()
        }
    }

    /// A server with `/` (answers at once) and `/slow` (after 2.5 s), under `cfg`.
    async fn server(cfg: crate::NetConfig) -> std::net::SocketAddr {
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" })).route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                "slow"
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(super::serve(l, router, cfg, std::future::pending()));
        addr
    }

    /// Reads until the server closes; how long that took (None: still open after `within`).
    async fn closed_after(c: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(within.saturating_sub(t.elapsed()), c.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(t.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Half a request line, or nothing at all, or a kept-alive connection with nothing more to
    /// ask: each is closed within its timeout (the slow-client attack held 3,000 connections open
    /// for 45 s before these bounds).
    #[tokio::test]
    async fn slow_and_idle_clients_are_closed() {
        let addr = server(limits(1.0, 1.5, 100)).await;
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HT").await.unwrap();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let (a, b, c) = tokio::join!(
            closed_after(&mut half, Duration::from_secs(8)),
            closed_after(&mut silent, Duration::from_secs(8)),
            closed_after(&mut kept, Duration::from_secs(8)),
        );
        for (what, t) in [("half a request line", a), ("nothing sent", b), ("kept alive, idle", c)] {
            let t = t.unwrap_or_else(|| panic!("{what}: still open after 8 s"));
            assert!(t >= Duration::from_millis(900), "{what}: closed after {t:?}, before its timeout");
        }
    }

    /// A request in flight is never idle: a handler that takes longer than the idle timeout
    /// answers, on HTTP/1.1 and on HTTP/2.
    #[tokio::test]
    async fn a_long_request_is_not_cut_for_idleness() {
        let addr = server(limits(1.0, 1.0, 100)).await;
        let h1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
        for c in [h1, h2] {
            let r = c.get(format!("http://{addr}/slow")).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "slow");
        }
    }

    /// Connections from one address past the cap are closed at once; others are served, and a
    /// closed one frees its place.
    #[tokio::test]
    async fn connections_per_address_are_capped() {
        let addr = server(limits(10.0, 30.0, 3)).await;
        let mut held = vec![];
        for _ in 0..3 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 256];
            assert!(c.read(&mut buf).await.unwrap() > 0, "one of the first three is served");
            held.push(c);
        }
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let closed = closed_after(&mut fourth, Duration::from_secs(5)).await;
        assert!(closed.is_some_and(|t| t < Duration::from_secs(2)), "the fourth is closed at once: {closed:?}");
        held.pop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }

    /// A backend server of this process answers HTTP/1.1 and HTTP/2 without TLS; one HTTP/2
    /// connection carries more streams at once than hyper's default limit (200); and on stop it
    /// finishes the request in flight before it returns.
    #[tokio::test]
    async fn backend_servers_speak_http1_and_h2c_with_many_streams_per_connection() {
        use std::sync::Arc;
        use std::time::Duration;
        const STREAMS: usize = 300;
        let together = Arc::new(tokio::sync::Barrier::new(STREAMS));
        let started = Arc::new(tokio::sync::Notify::new());
        let router = {
            let started = started.clone();
            axum::Router::new()
                .route(
                    "/version",
                    axum::routing::get(|req: axum::extract::Request| async move { format!("{:?}", req.version()) }),
                )
                // Each answers only once all STREAMS have arrived (or, if they cannot, after 20 s).
                .route(
                    "/together",
                    axum::routing::get(move || {
                        let b = together.clone();
                        async move {
                            match tokio::time::timeout(Duration::from_secs(20), b.wait()).await {
                                Ok(_) => "met",
                                Err(_) => "alone",
                            }
                        }
                    }),
                )
                .route(
                    "/slow",
                    axum::routing::get(move || {
                        let started = started.clone();
                        async move {
                            started.notify_one();
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            "finished"
                        }
                    }),
                )
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let cfg = crate::NetConfig { h2_max_streams: super::H2_MAX_STREAMS, ..Default::default() };
        let server = tokio::spawn(super::serve(l, router, cfg, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let h1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
        let get = |c: &reqwest::Client, path: &str| c.get(format!("http://{addr}{path}")).send();
        assert_eq!(get(&h1, "/version").await.unwrap().text().await.unwrap(), "HTTP/1.1");
        assert_eq!(get(&h2, "/version").await.unwrap().text().await.unwrap(), "HTTP/2.0");
        let all = futures::future::join_all(
            (0..STREAMS).map(|_| async { get(&h2, "/together").await.unwrap().text().await.unwrap() }),
        )
        .await;
        let alone = all.iter().filter(|t| *t != "met").count();
        assert_eq!(alone, 0, "{alone} of {STREAMS} streams did not run at the same time as the others");
        let slow = tokio::spawn(get(&h2, "/slow"));
        started.notified().await;
        stop.send(true).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().text().await.unwrap(), "finished");
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server returns once idle").unwrap();
    }
}
