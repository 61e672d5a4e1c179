//! The router as a whole: accepting connections (TLS, limits, timeouts), swapping tables, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drain::{DrainGroup, Drains};
use crate::error::SwitchError;
use crate::health::{self, HealthSettings};
use crate::http1::Rewound;
use crate::metrics::{self, ColorSnapshot, Metrics};
use crate::mirror::{MirrorRule, MirrorSnapshot};
use crate::protocol::{Connector, ConnectorError, UpstreamProtocol};
use crate::proxy::{ClientConn, Proxy, ProxySettings, ResponseBody};
use crate::table::{Color, Pool, PreviewRule, RoutingTable, Split, StickyRule};
use crate::upstream::{Health, Upstream};

/// Certificate chain and private key, PEM files, for serving HTTPS (h2 and http/1.1 by ALPN).
#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits that protect the router from slow or greedy clients.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    /// A client must send a request's headers (and, on HTTPS, finish the handshake) within this.
    /// For HTTP/1.1 this also bounds the wait for the next request on a keep-alive connection.
    pub header_read_timeout: Duration,
    /// A connection with nothing in flight for this long is closed (HTTP/2 gets a GOAWAY).
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub tls: Option<TlsFiles>,
    /// With more client connections open than this, a keep-alive HTTP/1.1 connection is
    /// parked as soon as it has answered, not after 200 ms idle (see [`crate::http1`]).
    pub park_at_once_above: usize,
}

/// Everything the router needs to start.
pub struct RouterConfig {
    pub upstreams: [Vec<SocketAddr>; 2],
    /// What each color's upstreams speak.
    pub upstream_protocols: [UpstreamProtocol; 2],
    pub split: Split,
    pub preview: Option<PreviewRule>,
    pub sticky: Option<StickyRule>,
    pub proxy: ProxySettings,
    pub listener: ListenerSettings,
    pub health: HealthSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("router.tls: cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("router.tls: {path} holds no {what}")]
    TlsEmpty { path: PathBuf, what: &'static str },
    #[error("router.tls: certificate and key do not make a valid server config: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("environments.{color}.upstream_tls: {source}")]
    UpstreamTls {
        color: Color,
        source: ConnectorError,
    },
}

/// After a stop began, how long an idle keep-alive connection stays open for a request its
/// client may be writing (answered with `Connection: close`) before it is closed.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// How often a connection is looked at while a stop is under way.
const STOP_POLL: Duration = Duration::from_millis(20);
/// A plain HTTP/1.1 connection idle for this long is parked (see [`crate::http1`]). Not at
/// once: a client that sends its next request within this keeps the connection hyper built,
/// which costs less than building it again.
const PARK_AFTER: Duration = Duration::from_millis(200);
/// With more client connections open than this (`BLUEGREEN_PARK_AT_ONCE_ABOVE` sets it), a
/// connection is parked as soon as it has answered, as nginx frees a keep-alive connection's
/// buffers: where connections are many, what each holds counts more than the cost of building
/// hyper's connection again (and a burst of new connections would otherwise hold their
/// buffers all at once for 200 ms).
pub const PARK_AT_ONCE_ABOVE: usize = 1_000;

/// A running router. Cloning shares it.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    proxy: Arc<Proxy>,
    drains: Drains,
    /// Parent of every drain group's token: cancelling it cuts everything still open.
    drain_root: CancellationToken,
    /// Cancelled when a graceful stop begins: stop accepting, ask connections to finish.
    stopping: CancellationToken,
    connections: TaskTracker,
    listener: ListenerSettings,
    tls: Option<TlsAcceptor>,
    limit: Arc<Semaphore>,
    /// Serializes table changes so two switches cannot interleave their check and swap.
    publish: Mutex<()>,
    health: HealthSettings,
    health_tasks: Mutex<JoinSet<()>>,
    /// How each color's new upstreams are connected to.
    connectors: [Arc<Connector>; 2],
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Router {
    pub fn new(config: RouterConfig) -> Result<Router, StartError> {
        let tls = config.listener.tls.as_ref().map(load_tls).transpose()?;
        let drain_root = CancellationToken::new();
        let connector = |color: Color| {
            Connector::new(&config.upstream_protocols[color.index()])
                .map(Arc::new)
                .map_err(|source| StartError::UpstreamTls { color, source })
        };
        let connectors = [connector(Color::Blue)?, connector(Color::Green)?];
        let pools = Color::ALL.map(|color| {
            let upstreams = config.upstreams[color.index()]
                .iter()
                .map(|addr| {
                    let connector = Arc::clone(&connectors[color.index()]);
                    Arc::new(Upstream::new(color, *addr, connector))
                })
                .collect();
            Arc::new(Pool::new(color, upstreams))
        });
        let table = RoutingTable {
            generation: 1,
            split: config.split,
            pools,
            drains: Color::ALL.map(|color| DrainGroup::new(color, &drain_root)),
            preview: config.preview,
            sticky: config.sticky,
            mirror: None,
        };
        let metrics = Arc::new(Metrics::default());
        let limit = Arc::new(Semaphore::new(config.listener.max_connections));
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.listener.header_read_timeout)
            .max_buf_size(config.listener.max_header_bytes.max(8192));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(config.listener.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(20)));
        Ok(Router {
            inner: Arc::new(Inner {
                proxy: Arc::new(Proxy::new(table, metrics, config.proxy)),
                drains: Drains::default(),
                drain_root,
                stopping: CancellationToken::new(),
                connections: TaskTracker::new(),
                listener: config.listener,
                tls,
                limit,
                publish: Mutex::new(()),
                health: config.health,
                health_tasks: Mutex::new(JoinSet::new()),
                connectors,
                http1,
                http2,
            }),
        })
    }

    fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let table = self.table();
        table
            .pools
            .iter()
            .flat_map(|p| p.upstreams.iter().cloned())
            .collect()
    }

    /// Checks every upstream once, then keeps checking in the background.
    pub async fn start_health_checks(&self) {
        let upstreams = self.upstreams();
        health::check_all_once(&upstreams, &self.inner.health).await;
        let mut tasks = self.inner.health_tasks.lock().expect("lock");
        health::spawn_checks(
            &mut tasks,
            &upstreams,
            &self.inner.health,
            &self.inner.stopping,
        );
    }

    /// Replaces a color's upstreams (a redeploy elsewhere, a scaled pool). Addresses already in
    /// the pool keep their health and in-flight counts; new ones are checked once before the
    /// swap. Refused, with the table unchanged, when the color takes traffic and none of its
    /// new upstreams is healthy.
    pub async fn set_upstreams(
        &self,
        color: Color,
        addrs: &[SocketAddr],
    ) -> Result<(), SwitchError> {
        if self.inner.stopping.is_cancelled() {
            return Err(SwitchError::ShuttingDown);
        }
        let (pool, fresh) = self.candidate_pool(color, addrs).await;
        {
            let _serial = self.inner.publish.lock().expect("lock");
            let old = self.table();
            refuse_replacing_blackhole(&old, color, &pool)?;
            let mut pools = old.pools.clone();
            pools[color.index()] = Arc::new(pool);
            let next = old.next(old.split, pools, old.drains.clone());
            self.inner.proxy.table.store(Arc::new(next));
        }
        tracing::info!(%color, upstreams = ?addrs, "upstreams replaced");
        let mut tasks = self.inner.health_tasks.lock().expect("lock");
        health::spawn_checks(&mut tasks, &fresh, &self.inner.health, &self.inner.stopping);
        Ok(())
    }

    /// Whether [`Router::set_upstreams`] would be accepted now, with the table untouched: a
    /// caller that records the change first can refuse it before recording anything.
    pub async fn check_upstreams(
        &self,
        color: Color,
        addrs: &[SocketAddr],
    ) -> Result<(), SwitchError> {
        if self.inner.stopping.is_cancelled() {
            return Err(SwitchError::ShuttingDown);
        }
        let (pool, _) = self.candidate_pool(color, addrs).await;
        refuse_replacing_blackhole(&self.table(), color, &pool)
    }

    /// The pool `addrs` would make: known upstreams as they are, new ones checked once.
    async fn candidate_pool(
        &self,
        color: Color,
        addrs: &[SocketAddr],
    ) -> (Pool, Vec<Arc<Upstream>>) {
        let current = self.table();
        let mut fresh = Vec::new();
        let upstreams: Vec<Arc<Upstream>> = addrs
            .iter()
            .map(|addr| {
                let known = current
                    .pool(color)
                    .upstreams
                    .iter()
                    .find(|u| u.addr == *addr);
                known.cloned().unwrap_or_else(|| {
                    let connector = Arc::clone(&self.inner.connectors[color.index()]);
                    let upstream = Arc::new(Upstream::new(color, *addr, connector));
                    fresh.push(Arc::clone(&upstream));
                    upstream
                })
            })
            .collect();
        health::check_all_once(&fresh, &self.inner.health).await;
        (Pool::new(color, upstreams), fresh)
    }

    /// True once [`Router::shutdown`] began.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.is_cancelled()
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.inner.proxy.table.load_full()
    }

    /// Whether the split could be applied now: every color that would get traffic has a
    /// healthy upstream ("never blackhole").
    pub fn check_split(&self, split: Split) -> Result<(), SwitchError> {
        if self.inner.stopping.is_cancelled() {
            return Err(SwitchError::ShuttingDown);
        }
        let table = self.table();
        for color in Color::ALL {
            refuse_blackhole(color, split.weight(color), table.pool(color))?;
        }
        Ok(())
    }

    /// Replaces the split. Refused, with the table left as it was, when a color that would get
    /// traffic has no healthy upstream. A color that stops getting traffic starts draining;
    /// one that gets traffic again keeps what was still draining on it.
    pub fn set_split(&self, split: Split) -> Result<Split, SwitchError> {
        let _serial = self.inner.publish.lock().expect("lock");
        self.check_split(split)?;
        let old = self.table();
        let drain_timeout = self.inner.proxy.settings.drain_timeout;
        let drains = Color::ALL.map(|color| {
            let was_live = old.split.weight(color) > 0;
            let is_live = split.weight(color) > 0;
            let current = old.drain_group(color);
            if was_live && !is_live {
                self.inner.drains.start(Arc::clone(current), drain_timeout);
                DrainGroup::new(color, &self.inner.drain_root)
            } else {
                if !was_live && is_live {
                    self.inner.drains.revive(color);
                }
                Arc::clone(current)
            }
        });
        let table = old.next(split, old.pools.clone(), drains);
        self.inner.proxy.table.store(Arc::new(table));
        tracing::info!(from = %old.split, to = %split, "traffic split changed");
        Ok(old.split)
    }

    /// Starts copying requests to `rule.to` (or stops, with `None`): one table swap; the
    /// copies already queued still go out and are compared.
    pub fn set_mirror(&self, rule: Option<MirrorRule>) {
        let _serial = self.inner.publish.lock().expect("lock");
        let old = self.table();
        let mut table = old.next(old.split, old.pools.clone(), old.drains.clone());
        table.mirror = rule.map(Arc::new);
        self.inner.proxy.table.store(Arc::new(table));
    }

    /// Accepts connections until a graceful stop begins.
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let router = self.clone();
        tokio::spawn(async move { router.accept_loop(listener).await })
    }

    async fn accept_loop(self, listener: TcpListener) {
        let inner = &self.inner;
        loop {
            let accepted = tokio::select! {
                _ = inner.stopping.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&inner.limit).try_acquire_owned() else {
                inner
                    .proxy
                    .metrics
                    .connections_rejected
                    .fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            };
            let router = self.clone();
            inner.connections.spawn(async move {
                let metrics = &router.inner.proxy.metrics;
                metrics.connections_total.fetch_add(1, Ordering::Relaxed);
                metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                router.serve_connection(stream, peer).await;
                metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }

    async fn serve_connection(&self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let inner = &self.inner;
        let patience = inner.listener.header_read_timeout;
        match &inner.tls {
            None => {
                // Boxed: the wait for the first bytes is done with before the connection is
                // parked, and its timers are not to stay in the connection's task.
                let first_bytes = Box::pin(tokio::time::timeout(patience, speaks_http2(&stream)));
                let Ok(http2) = first_bytes.await else {
                    tracing::debug!(%peer, "no request within header_read_timeout");
                    return;
                };
                // Each kind of connection gets a future of its own size (boxed), so a plain
                // HTTP/1.1 connection does not carry room for TLS or HTTP/2 state.
                if http2 {
                    let conn = ClientConn::new(peer, false, false);
                    Box::pin(self.serve_io(stream, conn, true)).await
                } else {
                    let conn = ClientConn::new(peer, false, true);
                    Box::pin(self.serve_parking(stream, conn)).await
                }
            }
            // Boxed whole: the TLS state is over a kilobyte, which a plain connection does not
            // carry.
            Some(acceptor) => Box::pin(self.serve_tls(acceptor, stream, peer)).await,
        }
    }

    async fn serve_tls(&self, acceptor: &TlsAcceptor, stream: TcpStream, peer: SocketAddr) {
        let patience = self.inner.listener.header_read_timeout;
        match tokio::time::timeout(patience, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let conn = ClientConn::new(peer, true, false);
                Box::pin(self.serve_io(tls, conn, http2)).await
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve_io<I>(&self, io: I, conn: Arc<ClientConn>, http2: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = Arc::clone(&self.inner.proxy);
        let service_conn = Arc::clone(&conn);
        let service = service_fn(move |request| {
            Arc::clone(&proxy).handle(request, Arc::clone(&service_conn))
        });
        let io = TokioIo::new(io);
        // One protocol per connection, chosen before serving, and each in a box of its own
        // size: an idle HTTP/1.1 connection carries no room for HTTP/2 state (measured: the
        // connection task went from 9.6 KB to 2.7 KB + 1.6 KB).
        if http2 {
            Box::pin(self.drive(self.inner.http2.serve_connection(io, service), &conn)).await;
        } else {
            Box::pin(
                self.drive(
                    self.inner
                        .http1
                        .serve_connection(io, service)
                        .with_upgrades(),
                    &conn,
                ),
            )
            .await;
        }
    }

    /// A plain HTTP/1.1 connection: hyper serves it while it is busy; between requests it is
    /// parked on the bare socket, holding no buffer (see [`crate::http1`]).
    async fn serve_parking(&self, stream: TcpStream, conn: Arc<ClientConn>) {
        let mut socket = Rewound::new(stream, Bytes::new());
        loop {
            // Boxed: a parked connection keeps no room for hyper's connection state.
            let Some(ended) = Box::pin(self.serve_busy_period(socket, &conn)).await else {
                return;
            };
            if let Some(tunnel) = conn.take_handover()
                && !tunnel.is_closed()
            {
                // hyper wrote the 101: the socket is the tunnel's from here on.
                let _ = tunnel.send(Rewound::new(ended.stream, ended.read_ahead));
                return;
            }
            let mut stream = ended.stream;
            if !ended.parked {
                // hyper ended the connection (the client closed it, asked to, or a stop):
                // the shutdown it leaves to whoever takes the socket back.
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                return;
            }
            if ended.read_ahead.is_empty() && !self.park(&stream, &conn).await {
                return;
            }
            socket = Rewound::new(stream, ended.read_ahead);
        }
    }

    /// hyper serving the connection until it can be parked (or has ended).
    async fn serve_busy_period(
        &self,
        socket: Rewound,
        conn: &Arc<ClientConn>,
    ) -> Option<PeriodEnded> {
        let proxy = Arc::clone(&self.inner.proxy);
        let service_conn = Arc::clone(conn);
        // Boxed: hyper hands a connection back only when the request future is `Unpin`.
        let service = service_fn(move |request| {
            Box::pin(Arc::clone(&proxy).handle(request, Arc::clone(&service_conn)))
        });
        let connection = self
            .inner
            .http1
            .serve_connection(TokioIo::new(socket), service);
        let busy = BusyPeriod {
            connection: Some(connection),
            conn,
            // Read once per period: `is_cancelled` takes the token's lock, shared by every
            // connection. A stop that begins mid-period is `drive`'s to see.
            after_stop: self.inner.stopping.is_cancelled(),
            connections_open: &self.inner.proxy.metrics.connections_open,
            park_at_once_above: self.inner.listener.park_at_once_above as i64,
            mark: conn.begun(),
            parking: false,
            closing: false,
        };
        self.drive(busy, conn).await
    }

    /// Waits on the bare socket for the client's next bytes (or its close); false when the
    /// connection is to be closed instead: idle for longer than a new request's headers may
    /// take or than `idle_timeout`, a stop's grace passed, or the drain deadline cut it.
    async fn park(&self, stream: &TcpStream, conn: &ClientConn) -> bool {
        let inner = &self.inner;
        // The connection has been idle since its last answer, before it was parked.
        let idle = conn.idle_for().unwrap_or_default();
        let patience = inner
            .listener
            .header_read_timeout
            .min(inner.listener.idle_timeout)
            .saturating_sub(idle);
        let parked = &inner.proxy.metrics.connections_parked;
        parked.fetch_add(1, Ordering::Relaxed);
        let woken = tokio::select! {
            ready = stream.readable() => ready.is_ok(),
            _ = tokio::time::sleep(patience) => false,
            // A client may be writing its next request right now: it gets the stop's grace.
            _ = inner.stopping.cancelled() => {
                matches!(tokio::time::timeout(STOP_GRACE, stream.readable()).await, Ok(Ok(())))
            }
            _ = inner.drain_root.cancelled() => false,
        };
        parked.fetch_sub(1, Ordering::Relaxed);
        woken
    }

    /// Runs a connection until it ends, asking it to finish gracefully on a stop or when idle;
    /// what it ended with, or `None` when it failed or the drain deadline cut it.
    async fn drive<C, T, E>(&self, connection: C, conn: &ClientConn) -> Option<T>
    where
        C: Future<Output = Result<T, E>> + GracefulShutdown,
        E: std::fmt::Display,
    {
        let inner = &self.inner;
        tokio::pin!(connection);
        let idle_timeout = inner.listener.idle_timeout;
        let mut closing = false;
        let mut check_every = idle_timeout.div_f32(4.0);
        if conn.parks() {
            check_every = check_every.min(PARK_AFTER / 2);
        }
        let mut idle_check = tokio::time::interval(check_every.max(Duration::from_millis(10)));
        // Set once a stop began: when it began, and a fast tick to watch the connection by
        // (made only then, so an idle connection carries no second timer).
        let mut stop: Option<(Instant, tokio::time::Interval)> = None;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    return match result {
                        Ok(ended) => Some(ended),
                        Err(error) => {
                            tracing::debug!(peer = %conn.peer, %error, "connection ended with an error");
                            None
                        }
                    };
                }
                // One branch for both phases of a stop, so a request's wake-ups poll no more
                // branches than before: first the stop itself, then a fast tick.
                _ = async {
                    match stop.as_mut() {
                        None => inner.stopping.cancelled().await,
                        Some((_, tick)) => { tick.tick().await; }
                    }
                }, if !closing => {
                    let Some((began, _)) = stop else {
                        stop = Some((Instant::now(), tokio::time::interval(STOP_POLL)));
                        continue;
                    };
                    // Busy: the response in progress is its last (`Connection: close`), and
                    // the client reconnects. Idle: a client may be writing its next request
                    // right now, so it is closed only once the grace has passed.
                    if conn.idle_for().is_none() || began.elapsed() >= STOP_GRACE {
                        closing = true;
                        connection.as_mut().shutdown_gracefully();
                    }
                }
                _ = idle_check.tick(), if !closing => match conn.idle_for() {
                    Some(idle) if idle >= idle_timeout => {
                        closing = true;
                        connection.as_mut().shutdown_gracefully();
                    }
                    Some(idle) if idle >= PARK_AFTER => {
                        connection.as_mut().park();
                    }
                    _ => {}
                },
                // A drain that outlived its deadline leaves nothing to wait for.
                _ = inner.drain_root.cancelled() => return None,
            }
        }
    }

    /// Stops accepting, lets in-flight requests and tunnels finish for up to the drain timeout
    /// (HTTP/2 clients get a GOAWAY, keep-alive HTTP/1.1 ones `Connection: close`), then closes
    /// what is left.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.cancel();
        inner.connections.close();
        inner.proxy.tunnels.close();
        let timeout = inner.proxy.settings.drain_timeout;
        let finished = async {
            inner.connections.wait().await;
            inner.proxy.tunnels.wait().await;
        };
        if tokio::time::timeout(timeout, finished).await.is_err() {
            tracing::info!("drain timeout reached at shutdown; closing what is left");
            inner.drain_root.cancel();
            let grace = inner.proxy.settings.close_grace + Duration::from_millis(500);
            let _ = tokio::time::timeout(grace, async {
                inner.connections.wait().await;
                inner.proxy.tunnels.wait().await;
            })
            .await;
        }
        inner.health_tasks.lock().expect("lock").abort_all();
    }

    pub fn status(&self) -> RouterStatus {
        let table = self.table();
        let metrics = &self.inner.proxy.metrics;
        let colors = Color::ALL
            .iter()
            .map(|&color| {
                let pool = table.pool(color);
                ColorStatus {
                    color,
                    weight: table.split.weight(color),
                    healthy_upstreams: pool.healthy_count(),
                    upstreams: pool
                        .upstreams
                        .iter()
                        .map(|u| UpstreamStatus {
                            address: u.addr,
                            health: u.health(),
                            in_flight: u.in_flight(),
                            last_error: u.last_error(),
                        })
                        .collect(),
                    metrics: metrics
                        .color(color)
                        .snapshot(color, self.inner.drains.draining(color)),
                }
            })
            .collect();
        RouterStatus {
            generation: table.generation,
            live: table.split.sole_color(),
            split: table.split,
            colors,
            connections_open: metrics.connections_open(),
            stopping: self.inner.stopping.is_cancelled(),
            mirror: self.inner.proxy.mirror.snapshot(table.mirror.as_deref()),
        }
    }

    pub fn prometheus(&self) -> String {
        let status = self.status();
        let snapshots: Vec<ColorSnapshot> = status.colors.into_iter().map(|c| c.metrics).collect();
        metrics::render_prometheus(&snapshots, &self.inner.proxy.metrics)
    }
}

/// Never blackhole: a color that is to take traffic must have a healthy upstream.
/// Refuses replacing `color`'s upstreams by `pool` when the color takes traffic and none of
/// `pool` is healthy. A live color that has no healthy upstream serves no one already (first
/// start, all instances down): new upstreams cannot make that worse.
fn refuse_replacing_blackhole(
    table: &RoutingTable,
    color: Color,
    pool: &Pool,
) -> Result<(), SwitchError> {
    if table.pool(color).healthy_count() == 0 {
        return Ok(());
    }
    refuse_blackhole(color, table.split.weight(color), pool)
}

fn refuse_blackhole(color: Color, weight: u8, pool: &Pool) -> Result<(), SwitchError> {
    if weight > 0 && pool.healthy_count() == 0 {
        return Err(SwitchError::NoHealthyUpstream {
            color,
            weight,
            upstreams: pool.upstreams.len(),
        });
    }
    Ok(())
}

/// The HTTP/2 connection preface; nothing that starts an HTTP/1.1 request begins with "PRI ".
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for the client's first bytes and tells whether they open HTTP/2 (h2c with prior
/// knowledge). Peeking leaves the bytes in the socket for the protocol's own parser.
async fn speaks_http2(stream: &TcpStream) -> bool {
    let mut first = [0u8; 24];
    loop {
        let Ok(n) = stream.peek(&mut first).await else {
            return false;
        };
        if n == 0 || first[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n >= 4 {
            return true;
        }
        // Only a prefix of "PRI " so far: wait for more without spinning.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One busy period of a parked connection: hyper serves it until what was sent has been
/// answered and nothing else is in flight, then is asked to finish (an idle hyper connection
/// does at once) and gives the socket back.
struct BusyPeriod<'a, S: hyper::service::HttpService<Incoming>> {
    connection: Option<http1::Connection<TokioIo<Rewound>, S>>,
    conn: &'a ClientConn,
    /// The period began after a stop did (a parked connection woken in the stop's grace):
    /// its request is the connection's last.
    after_stop: bool,
    /// Client connections open: over `park_at_once_above`, parked as soon as answered.
    connections_open: &'a AtomicI64,
    park_at_once_above: i64,
    /// Requests begun before the period: it parks once one of its own was answered.
    mark: u64,
    /// hyper was asked to finish so that the connection parks.
    parking: bool,
    /// hyper was asked to finish so that the connection closes (a stop, the idle timeout).
    closing: bool,
}

/// How a busy period ended.
struct PeriodEnded {
    stream: TcpStream,
    /// Bytes hyper read past what it answered (a pipelined request, the next one's start).
    read_ahead: Bytes,
    /// The connection is to be parked; otherwise hyper ended it and it is to be closed.
    parked: bool,
}

trait GracefulShutdown {
    fn shutdown_gracefully(self: Pin<&mut Self>);

    /// Asks an idle connection to hand its socket back to be parked; false when it cannot (or
    /// was asked already).
    fn park(self: Pin<&mut Self>) -> bool {
        false
    }
}

impl<S> Future for BusyPeriod<'_, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<PeriodEnded, hyper::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().get_mut();
            let connection = this
                .connection
                .as_mut()
                .expect("a busy period is not polled after it ended");
            match connection.poll_without_shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    let parts = this.connection.take().expect("checked above").into_parts();
                    let (stream, unread) = parts.io.into_inner().into_parts();
                    // hyper read `read_buf` before what is still unread of the bytes put
                    // back. Copied: even empty, `read_buf` keeps hyper's whole 8 KiB read
                    // buffer alive, which a parked connection is not to hold.
                    let read_ahead = if parts.read_buf.is_empty() && unread.is_empty() {
                        Bytes::new()
                    } else {
                        Bytes::from([&parts.read_buf[..], &unread[..]].concat())
                    };
                    return Poll::Ready(Ok(PeriodEnded {
                        stream,
                        read_ahead,
                        parked: this.parking && !this.closing,
                    }));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
            // Looked at on every wake, not on the stop's 20 ms tick: a request that woke a
            // parked connection in a stop's grace is answered with `Connection: close` however
            // fast it is.
            if this.after_stop && !this.closing && this.conn.idle_for().is_none() {
                self.as_mut().shutdown_gracefully();
                return Poll::Pending;
            }
            let many = this.connections_open.load(Ordering::Relaxed) > this.park_at_once_above;
            // Parking an idle hyper connection ends it at once: polled again to see it end.
            if !(many && self.as_mut().park()) {
                return Poll::Pending;
            }
        }
    }
}

impl<S> GracefulShutdown for BusyPeriod<'_, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        let this = self.get_mut();
        this.closing = true;
        if let Some(connection) = this.connection.as_mut() {
            Pin::new(connection).graceful_shutdown();
        }
    }

    fn park(self: Pin<&mut Self>) -> bool {
        let this = self.get_mut();
        if this.parking || this.closing || !this.conn.may_park(this.mark) {
            return false;
        }
        let Some(connection) = this.connection.as_mut() else {
            return false;
        };
        // Answered, idle, and hyper would keep the connection alive: it finishes at once.
        this.parking = true;
        Pin::new(connection).graceful_shutdown();
        true
    }
}

impl<I, S> GracefulShutdown for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> GracefulShutdown for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RouterStatus {
    pub generation: u64,
    /// The color taking all traffic, or `None` during a split.
    pub live: Option<Color>,
    pub split: Split,
    pub colors: Vec<ColorStatus>,
    pub connections_open: u64,
    pub stopping: bool,
    /// Shadow traffic: the mirror in force (if any) and what it counted.
    pub mirror: MirrorSnapshot,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ColorStatus {
    pub color: Color,
    pub weight: u8,
    pub healthy_upstreams: usize,
    pub upstreams: Vec<UpstreamStatus>,
    pub metrics: ColorSnapshot,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct UpstreamStatus {
    #[schema(value_type = String, example = "127.0.0.1:9001")]
    pub address: SocketAddr,
    pub health: Health,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

fn load_tls(files: &TlsFiles) -> Result<TlsAcceptor, StartError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| StartError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| StartError::TlsFile {
            path: files.cert.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(StartError::TlsEmpty {
            path: files.cert.clone(),
            what: "PEM certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| StartError::TlsFile {
            path: files.key.clone(),
            source,
        })?
        .ok_or_else(|| StartError::TlsEmpty {
            path: files.key.clone(),
            what: "PEM private key",
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
