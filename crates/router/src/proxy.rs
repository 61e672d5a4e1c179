//! The request path: pick a color and an upstream from the table, forward, retry when safe, stream back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::TaskTracker;

use crate::drain::DrainMember;
use crate::error::ProxyError;
use crate::http1::{ClientUpgrade, Rewound};
use crate::metrics::Metrics;
use crate::mirror::{
    self, Answer, MIRROR_HEADER, Mirror, MirrorRule, MirroredRequest, PendingMirror, ReadBody,
};
use crate::pool::{self, SendError};
use crate::protocol::is_grpc;
use crate::table::{Color, PreviewOutcome, RoutingTable, bucket_of};
use crate::upstream::Upstream;
use crate::websocket;

/// Which forwarding headers the router sets on upstream requests.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardedHeaders {
    pub x_forwarded_for: bool,
    pub x_forwarded_proto: bool,
    pub x_forwarded_host: bool,
    /// RFC 7239 `Forwarded: for=…;proto=…;host=…`.
    pub forwarded: bool,
    /// Append to forwarding headers the client sent (only behind another trusted proxy);
    /// otherwise they are replaced, so clients cannot spoof their address.
    pub trust_incoming: bool,
}

#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the upstream's response headers.
    pub upstream_timeout: Duration,
    /// How many other upstreams of the same color a request may be retried on.
    pub retries: usize,
    pub forwarded: ForwardedHeaders,
    /// How long draining requests and tunnels may stay open after their color stops taking
    /// traffic, and how long a graceful stop waits.
    pub drain_timeout: Duration,
    /// How long, after the drain deadline, a tunnel may take to finish its current frame.
    pub close_grace: Duration,
}

/// One client connection: who it is from (precomputed for the forwarding headers) and how
/// many of its requests are in flight (for the idle timeout).
pub struct ClientConn {
    pub peer: SocketAddr,
    pub https: bool,
    /// The client's address as a header value, built once per connection.
    client_ip: HeaderValue,
    /// The client's address as an RFC 7239 node (`192.0.2.1` or `"[2001:db8::1]"`).
    forwarded_node: String,
    opened: Instant,
    in_flight: AtomicUsize,
    last_done_ms: AtomicU64,
    /// Requests begun on this connection: a parked connection's busy period ends only once
    /// one of its own has been answered.
    begun: AtomicU64,
    /// The last request leaves the connection alive in hyper's eyes (HTTP/1.1, no
    /// `Connection: close`, no upgrade) ...
    keeps_alive: AtomicBool,
    /// ... and its body, if it had one, was read to the end: nothing of it is left unread.
    body_unread: AtomicBool,
    /// Set on a parked connection: the tunnel of an upgraded request gets the socket through
    /// here once hyper has written the 101.
    handover: Option<Mutex<Option<oneshot::Sender<Rewound>>>>,
}

impl ClientConn {
    /// `parks`: the connection is parked between requests (see [`crate::http1`]), and hands
    /// its socket over to an upgraded request's tunnel itself.
    pub fn new(peer: SocketAddr, https: bool, parks: bool) -> Arc<ClientConn> {
        let ip = peer.ip();
        Arc::new(ClientConn {
            peer,
            https,
            client_ip: HeaderValue::from_str(&ip.to_string())
                .expect("an IP address is a valid header value"),
            forwarded_node: match ip {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
            },
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            begun: AtomicU64::new(0),
            keeps_alive: AtomicBool::new(false),
            body_unread: AtomicBool::new(false),
            handover: parks.then(|| Mutex::new(None)),
        })
    }

    /// Whether the connection is parked between requests.
    pub fn parks(&self) -> bool {
        self.handover.is_some()
    }

    /// How many requests have begun on the connection.
    pub fn begun(&self) -> u64 {
        self.begun.load(Ordering::Acquire)
    }

    /// Whether the connection can be parked now: a request begun after `mark` was answered,
    /// nothing is in flight, and hyper would keep the connection alive, with no request body
    /// left unread in the socket.
    pub fn may_park(&self, mark: u64) -> bool {
        self.begun() > mark
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.keeps_alive.load(Ordering::Acquire)
            && !self.body_unread.load(Ordering::Acquire)
    }

    /// The upgraded request's tunnel waiting for the socket, if any (taken: asked once).
    pub fn take_handover(&self) -> Option<oneshot::Sender<Rewound>> {
        self.handover.as_ref()?.lock().expect("lock").take()
    }

    /// Where the client side of an upgraded request will come from.
    fn on_upgrade(&self, request: &mut Request<Incoming>) -> ClientUpgrade {
        match &self.handover {
            None => ClientUpgrade::Hyper(hyper::upgrade::on(request)),
            Some(slot) => {
                let (sender, receiver) = oneshot::channel();
                *slot.lock().expect("lock") = Some(sender);
                ClientUpgrade::HandedOver(receiver)
            }
        }
    }

    /// The request's whole body has been read.
    fn body_read(&self) {
        self.body_unread.store(false, Ordering::Release);
    }

    /// How long the connection has had nothing in flight, or `None` while it has.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(last))
    }

    fn begin<B>(&self, request: &Request<B>, upgrade: bool, bodyless: bool) {
        // Only a parking connection asks whether it may park.
        if self.parks() {
            let keeps_alive = request.version() == Version::HTTP_11
                && !upgrade
                && !connection_has_token(request.headers(), "close");
            self.keeps_alive.store(keeps_alive, Ordering::Release);
            self.body_unread.store(!bodyless, Ordering::Release);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_done_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// State shared by every request: the table, the upstream client and the counters.
pub struct Proxy {
    pub(crate) table: ArcSwap<RoutingTable>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: ProxySettings,
    pub(crate) tunnels: TaskTracker,
    /// Shadow traffic's queue and counters (idle while the table has no mirror rule).
    pub(crate) mirror: Arc<Mirror>,
}

/// Attributes of the sticky cookie: whole site, not readable by scripts, sent on top-level
/// navigation.
const STICKY_COOKIE_ATTRS: &str = "; Path=/; HttpOnly; SameSite=Lax";

const PREVIEW_REFUSED: HeaderValue =
    HeaderValue::from_static("refused: unknown environment or missing secret; routed by weight");

impl Proxy {
    pub fn new(table: RoutingTable, metrics: Arc<Metrics>, settings: ProxySettings) -> Proxy {
        Proxy {
            table: ArcSwap::from_pointee(table),
            metrics,
            mirror: Arc::new(Mirror::new(settings.connect_timeout)),
            settings,
            tunnels: TaskTracker::new(),
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        conn: Arc<ClientConn>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if request.method() == Method::CONNECT {
            let refused = ProxyError::MethodNotProxied {
                method: Method::CONNECT,
            };
            return Ok(refused.to_response());
        }
        let started = Instant::now();
        let table = self.table.load_full();
        let route = route(&table, request.headers());
        let color = route.color;
        let color_metrics = self.metrics.color(color);
        color_metrics.request_started();
        let upgrade = is_upgrade(&request);
        conn.begin(&request, upgrade, request.body().is_end_stream());
        let mut guard = RequestGuard {
            metrics: Arc::clone(&self.metrics),
            color,
            member: table.drain_group(color).join(),
            conn,
            upstream: None,
        };

        let client_upgrade = upgrade.then(|| guard.conn.on_upgrade(&mut request));
        let websocket = client_upgrade.is_some()
            && request
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let (mut parts, body) = request.into_parts();
        let bodyless = body.is_end_stream();
        let mirror_rule = table.mirror.as_ref().filter(|rule| {
            client_upgrade.is_none()
                && !matches!(route.preview, PreviewOutcome::Granted(_))
                && self
                    .mirror
                    .wants(rule, color, &parts.method, &parts.headers, bodyless)
        });
        let (body, copy) = match mirror_rule {
            None => (
                (!bodyless)
                    .then(|| RequestBody::streaming(body, &self.metrics, &guard.conn, color)),
                None,
            ),
            Some(rule) => {
                // A body to copy is read first, up to the limit.
                let read = if bodyless {
                    ReadBody::Whole(Bytes::new())
                } else {
                    match mirror::read_body(body, rule.max_request_body).await {
                        Ok(read) => read,
                        Err(reason) => {
                            let response = ProxyError::ClientBody { reason }.to_response();
                            color_metrics.response(response.status().as_u16(), started.elapsed());
                            return Ok(response);
                        }
                    }
                };
                match read {
                    ReadBody::Whole(bytes) => {
                        guard.conn.body_read();
                        color_metrics.bytes_in(bytes.len() as u64);
                        let copy =
                            self.mirrored_request(&table, rule, &parts, &guard.conn, bytes.clone());
                        if copy.is_none() {
                            self.mirror.skip();
                        }
                        let body = (!bodyless).then(|| RequestBody::Buffered(Some(bytes)));
                        (body, copy.map(|copy| (Arc::clone(rule), copy)))
                    }
                    // Too long to copy: the live request goes on, the rest streamed after
                    // what was read.
                    ReadBody::Longer { read, rest } => {
                        self.mirror.skip();
                        color_metrics.bytes_in(read.len() as u64);
                        let rest = RequestBody::streaming(rest, &self.metrics, &guard.conn, color);
                        (
                            Some(RequestBody::Prefixed(Some(read), Box::new(rest))),
                            None,
                        )
                    }
                }
            }
        };
        let outcome = self
            .forward(
                &table,
                &mut parts,
                body,
                &mut guard,
                client_upgrade.is_some(),
            )
            .await;

        let (response, sender) = match outcome {
            Ok(answer) => answer,
            Err(error) => {
                if copy.is_some() {
                    self.mirror.skip();
                }
                tracing::warn!(%error, "request failed");
                let response: Response<ResponseBody> = error.to_response();
                color_metrics.response(response.status().as_u16(), started.elapsed());
                return Ok(response);
            }
        };
        color_metrics.response(response.status().as_u16(), started.elapsed());

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            return Ok(self.open_tunnel(response, client_upgrade, sender, guard, websocket));
        }
        let pending = copy.map(|(rule, request)| {
            let mut headers = response.headers().clone();
            strip_hop_by_hop(&mut headers, false);
            let live = Answer {
                color,
                status: response.status(),
                headers,
                body: Default::default(),
                trailers: HeaderMap::new(),
                latency: started.elapsed(),
            };
            let pool = table.pool(rule.to);
            Box::new(self.mirror.pending(&rule, pool, request, live))
        });
        Ok(stream_back(&table, route, response, sender, guard, pending))
    }

    /// Sends the request to an upstream of the guard's color, and to others of that color
    /// while a failure allows a retry; the guard holds the upstream being tried. A request
    /// with a body goes out once: it streams, so there is nothing to send again.
    async fn forward(
        &self,
        table: &RoutingTable,
        parts: &mut Parts,
        mut body: Option<RequestBody>,
        guard: &mut RequestGuard,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, pool::Sender), ProxyError> {
        let color = guard.color;
        let color_metrics = self.metrics.color(color);
        let idempotent = is_idempotent(&parts.method);
        let pool = table.pool(color);
        // Without a second try the headers can be moved into the upstream request, not copied.
        let may_retry = body.is_none() && self.settings.retries > 0 && pool.upstreams.len() > 1;
        if upgrade && pool.speaks_http2() {
            return Err(ProxyError::UpgradeToHttp2 { color });
        }
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error = None;
        loop {
            let Some(index) = pool.pick(&tried) else {
                // Nothing (more) to try: the failure that led here says more than "none left".
                return Err(last_error.unwrap_or(ProxyError::NoHealthyUpstream { color }));
            };
            let upstream = Arc::clone(&pool.upstreams[index]);
            upstream.begin_request();
            guard.upstream = Some(Arc::clone(&upstream));
            let headers = if may_retry {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let outgoing = self.upstream_request(
                table,
                parts,
                headers,
                &upstream,
                body.take().unwrap_or(RequestBody::Empty),
                &guard.conn,
                upgrade,
            );
            let waiting = tokio::time::timeout(
                self.settings.upstream_timeout,
                upstream.pool.send(
                    upstream.addr,
                    &upstream.authority,
                    self.settings.connect_timeout,
                    outgoing,
                ),
            );
            let sent = tokio::select! {
                biased;
                sent = waiting => sent,
                // The color stopped taking traffic and its drain deadline passed while the
                // upstream still had not answered.
                _ = guard.member.token().cancelled() => return Err(ProxyError::DrainTimeout { color }),
            };
            let error = match sent {
                Ok(Ok(answer)) => return Ok(answer),
                Err(_) => ProxyError::UpstreamTimeout {
                    color,
                    addr: upstream.addr,
                    timeout: self.settings.upstream_timeout,
                },
                Ok(Err(failure)) => send_error(color, &upstream, failure),
            };
            guard.release_upstream();
            // The client broke its own body: no fault of the upstream, nothing to retry.
            if let ProxyError::ClientBody { .. } = error {
                return Err(error);
            }
            color_metrics.upstream_error();
            if !(may_retry && is_retryable(&error, idempotent))
                || tried.len() >= self.settings.retries
            {
                return Err(error);
            }
            tracing::debug!(%error, "retrying on another upstream");
            tried.push(index);
            last_error = Some(error);
        }
    }

    /// Hands both upgraded connections to a tunnel task (which keeps the guard, so the request
    /// counts until the tunnel closes) and answers the client's 101 with an empty body.
    fn open_tunnel(
        &self,
        mut response: Response<Incoming>,
        client_upgrade: ClientUpgrade,
        sender: pool::Sender,
        guard: RequestGuard,
        websocket: bool,
    ) -> Response<ResponseBody> {
        let color = guard.color;
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let grace = self.settings.close_grace;
        let metrics = Arc::clone(&self.metrics);
        self.tunnels.spawn(async move {
            // Held until both sides have switched protocols; the upgraded connection is
            // never given back to the pool.
            let _upstream_connection = sender;
            let token = guard.member.token().clone();
            let relayed = match client_upgrade {
                ClientUpgrade::Hyper(client) => {
                    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream_upgrade) else {
                        return;
                    };
                    relay(TokioIo::new(client), upstream, websocket, &token, grace).await
                }
                ClientUpgrade::HandedOver(client) => {
                    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream_upgrade) else {
                        return;
                    };
                    relay(client, upstream, websocket, &token, grace).await
                }
            };
            match relayed {
                Ok((sent, received)) => {
                    metrics.color(color).bytes_in(sent);
                    metrics.color(color).bytes_out(received);
                }
                Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
            }
            drop(guard);
        });
        let (head, _) = response.into_parts();
        Response::from_parts(head, ResponseBody::empty())
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        &self,
        table: &RoutingTable,
        parts: &Parts,
        headers: HeaderMap,
        upstream: &Upstream,
        body: RequestBody,
        conn: &ClientConn,
        upgrade: bool,
    ) -> Request<RequestBody> {
        let http2 = upstream.pool.connector().is_http2();
        let headers = self.upstream_headers(
            table,
            parts,
            headers,
            &upstream.authority,
            conn,
            upgrade,
            http2,
        );
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = origin_form(&parts.uri);
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        request
    }

    /// The headers an upstream gets: the end-to-end ones, `Host` kept (else the target's
    /// authority, else `fallback_host`), the forwarding headers set, the preview secret removed.
    /// An HTTP/2 upstream also gets `te: trailers` when the client sent it (gRPC asks for it).
    #[allow(clippy::too_many_arguments)]
    fn upstream_headers(
        &self,
        table: &RoutingTable,
        parts: &Parts,
        mut headers: HeaderMap,
        fallback_host: &http::uri::Authority,
        conn: &ClientConn,
        upgrade: bool,
        http2: bool,
    ) -> HeaderMap {
        let trailers = http2 && header_has_token(&headers, &header::TE, "trailers");
        strip_hop_by_hop(&mut headers, upgrade);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let host = headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            })
            .unwrap_or_else(|| {
                HeaderValue::from_str(fallback_host.as_str()).expect("authority is a valid header")
            });
        headers.insert(header::HOST, host.clone());
        self.set_forwarded(&mut headers, conn, &host);
        if let Some(preview) = &table.preview {
            headers.remove(&preview.secret_header);
        }
        headers
    }

    /// The copy of a request for the mirrored color: the headers the live upstream gets
    /// (forwarding headers included, so the two answer the same client), marked as a copy;
    /// `None` when the mirrored color has no upstream to send it to.
    fn mirrored_request(
        &self,
        table: &RoutingTable,
        rule: &MirrorRule,
        parts: &Parts,
        conn: &ClientConn,
        body: Bytes,
    ) -> Option<MirroredRequest> {
        let pool = table.pool(rule.to);
        let fallback_host = &pool.upstreams.first()?.authority;
        let mut headers = self.upstream_headers(
            table,
            parts,
            parts.headers.clone(),
            fallback_host,
            conn,
            false,
            pool.speaks_http2(),
        );
        headers.insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        Some(MirroredRequest {
            method: parts.method.clone(),
            uri: origin_form(&parts.uri),
            headers,
            body,
        })
    }

    fn set_forwarded(&self, headers: &mut HeaderMap, conn: &ClientConn, host: &HeaderValue) {
        let f = &self.settings.forwarded;
        let proto = if conn.https { "https" } else { "http" };
        if f.x_forwarded_for {
            let prior = headers.get(X_FORWARDED_FOR).filter(|_| f.trust_incoming);
            let value = match prior.and_then(|v| v.to_str().ok()) {
                Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", conn.peer.ip())).ok(),
                None => Some(conn.client_ip.clone()),
            };
            if let Some(value) = value {
                headers.insert(X_FORWARDED_FOR, value);
            }
        } else if !f.trust_incoming {
            headers.remove(X_FORWARDED_FOR);
        }
        if f.x_forwarded_proto {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if f.x_forwarded_host {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        if f.forwarded {
            let mut element = format!("for={};proto={proto}", conn.forwarded_node);
            if let Ok(host) = host.to_str() {
                element.push_str(&format!(";host=\"{host}\""));
            }
            let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
                Some(prior) if f.trust_incoming => format!("{prior}, {element}"),
                _ => element,
            };
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header::FORWARDED, value);
            }
        } else if !f.trust_incoming {
            headers.remove(header::FORWARDED);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Where one request goes and what the response must carry because of it.
pub(crate) struct Route {
    pub color: Color,
    pub preview: PreviewOutcome,
    /// A sticky id to hand the client in a cookie, when it had none.
    pub new_sticky_id: Option<String>,
}

pub(crate) fn route(table: &RoutingTable, headers: &HeaderMap) -> Route {
    let preview = match &table.preview {
        Some(rule) => rule.evaluate(headers),
        None => PreviewOutcome::NotRequested,
    };
    if let PreviewOutcome::Granted(color) = preview {
        return Route {
            color,
            preview,
            new_sticky_id: None,
        };
    }
    if let Some(color) = table.split.sole_color() {
        return Route {
            color,
            preview,
            new_sticky_id: None,
        };
    }
    let (bucket, new_sticky_id) = match &table.sticky {
        Some(sticky) => match sticky.bucket(headers) {
            Some(bucket) => (bucket, None),
            None => {
                let id = format!("{:016x}", fastrand::u64(..));
                (bucket_of(&id), Some(id))
            }
        },
        None => (fastrand::u8(0..100), None),
    };
    Route {
        color: table.split.color_for_bucket(bucket),
        preview,
        new_sticky_id,
    }
}

/// The upstream's response on its way to the client: its body streamed through (the guard
/// and the connection go with it), plus what the route adds (a sticky cookie, a refused
/// preview).
#[inline]
fn stream_back(
    table: &RoutingTable,
    route: Route,
    response: Response<Incoming>,
    sender: pool::Sender,
    guard: RequestGuard,
    mirror: Option<Box<PendingMirror>>,
) -> Response<ResponseBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers, false);
    if head.version == Version::HTTP_2 {
        // From an HTTP/2 upstream; the client's connection says what it speaks.
        head.version = Version::HTTP_11;
    }
    // gRPC runs on HTTP/2 only: an HTTP/1.1 answer is not looked at.
    let grpc = matches!(sender, pool::Sender::Http2(_)) && is_grpc(&head.headers);
    let mut body = ProxiedBody {
        inner: body,
        cut: None,
        guard,
        sender: Some(sender),
        mirror,
        grpc,
        cut_off: false,
    };
    // A response without a body (204, HEAD, Content-Length: 0) frees its connection now.
    body.give_back_if_done();
    if let Some(id) = route.new_sticky_id
        && let Some(sticky) = &table.sticky
        && let Ok(value) =
            HeaderValue::from_str(&format!("{}={id}{}", sticky.cookie, STICKY_COOKIE_ATTRS))
    {
        head.headers.append(header::SET_COOKIE, value);
    }
    if route.preview == PreviewOutcome::Refused {
        head.headers.insert("x-bluegreen-preview", PREVIEW_REFUSED);
    }
    Response::from_parts(head, ResponseBody::Proxied(body))
}

/// The target in origin form (`/path?query`): a request goes straight to the upstream's socket.
fn origin_form(uri: &Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// What the client is told when sending to `upstream` failed; a connection the upstream
/// refused also takes it out of rotation until its health check passes.
#[inline]
fn send_error(color: Color, upstream: &Upstream, failure: SendError) -> ProxyError {
    match failure {
        SendError::Connect(reason) => {
            upstream.eject(format!("connect failed while proxying: {reason}"));
            ProxyError::UpstreamConnect {
                color,
                addr: upstream.addr,
                reason,
            }
        }
        // hyper reports a failure of the body it was sending as the user's: the body is the
        // client's, streamed through, so the client broke it, not the upstream.
        SendError::Failed(error) if error.is_user() => ProxyError::ClientBody {
            reason: error_chain(&error),
        },
        SendError::Failed(error) => ProxyError::UpstreamFailed {
            color,
            addr: upstream.addr,
            reason: error_chain(&error),
        },
    }
}

/// Only a request with no body can be sent again (bodies stream, never buffer), which the
/// caller checks; after a connect failure nothing reached the upstream, otherwise the method
/// must be idempotent.
#[inline]
fn is_retryable(error: &ProxyError, idempotent: bool) -> bool {
    match error {
        ProxyError::UpstreamConnect { .. } => true,
        ProxyError::UpstreamFailed { .. } => idempotent,
        _ => false,
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Relays an upgraded client connection to the upgraded upstream one.
async fn relay<C>(
    client: C,
    upstream: hyper::upgrade::Upgraded,
    websocket: bool,
    drain: &tokio_util::sync::CancellationToken,
    grace: Duration,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    websocket::tunnel(client, TokioIo::new(upstream), websocket, drain, grace).await
}

fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_has_token(request.headers(), "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    header_has_token(headers, &header::CONNECTION, token)
}

fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the headers that describe one hop, not the message (RFC 9110 §7.6.1). An upgrade
/// keeps `Connection: upgrade` and `Upgrade`, which the upstream needs to switch protocols.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Counts a request against its color, drain group, upstream and connection until dropped.
struct RequestGuard {
    metrics: Arc<Metrics>,
    color: Color,
    member: DrainMember,
    conn: Arc<ClientConn>,
    upstream: Option<Arc<Upstream>>,
}

impl RequestGuard {
    fn release_upstream(&mut self) {
        if let Some(upstream) = self.upstream.take() {
            upstream.end_request();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.release_upstream();
        self.metrics.color(self.color).request_ended();
        self.conn.end();
    }
}

/// The body sent upstream: nothing, the client's body streamed through and counted, or a
/// body read whole (a mirrored request's, bounded by the mirror's limit).
pub enum RequestBody {
    Empty,
    Buffered(Option<Bytes>),
    /// What was read of a body too long to copy, then the rest of it.
    Prefixed(Option<Bytes>, Box<RequestBody>),
    Streaming {
        inner: Incoming,
        metrics: Arc<Metrics>,
        /// Told when the body has been read to its end.
        conn: Arc<ClientConn>,
        color: Color,
    },
}

impl RequestBody {
    fn streaming(
        inner: Incoming,
        metrics: &Arc<Metrics>,
        conn: &Arc<ClientConn>,
        color: Color,
    ) -> RequestBody {
        RequestBody::Streaming {
            inner,
            metrics: Arc::clone(metrics),
            conn: Arc::clone(conn),
            color,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Prefixed(read, rest) => match read.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
            RequestBody::Streaming {
                inner,
                metrics,
                conn,
                color,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            metrics.color(*color).bytes_in(data.len() as u64);
                        }
                        if inner.is_end_stream() {
                            conn.body_read();
                        }
                    }
                    Poll::Ready(None) => conn.body_read(),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Buffered(bytes) => bytes.is_none(),
            RequestBody::Prefixed(read, rest) => read.is_none() && rest.is_end_stream(),
            RequestBody::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Prefixed(read, rest) => {
                let read = read.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
            RequestBody::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}

/// The error a streamed response ends with when its color's drain deadline passes.
#[derive(Debug, thiserror::Error)]
#[error("drain timeout reached: the stream was cut")]
pub struct DrainCut;

/// The body sent to the client: a short message of the router's own, or the upstream's body
/// streamed through, counted, and cut at its color's drain deadline.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Proxied(ProxiedBody),
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody::Full(None)
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        ResponseBody::Full(Some(bytes))
    }
}

pub struct ProxiedBody {
    inner: Incoming,
    /// The upstream connection, given back to its pool once the body has been read to the end.
    sender: Option<pool::Sender>,
    /// Created the first time the upstream makes us wait, so short responses never pay for it.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    guard: RequestGuard,
    /// A mirrored request's live answer, taken in as it streams by; boxed, as most requests
    /// are not mirrored.
    mirror: Option<Box<PendingMirror>>,
    /// A gRPC answer: cut at the drain deadline with `grpc-status: 14` (UNAVAILABLE, which
    /// gRPC clients may retry), as a WebSocket gets a close frame, not a reset stream.
    grpc: bool,
    /// The drain deadline ended this body.
    cut_off: bool,
}

impl ProxiedBody {
    /// At the body's end the connection goes back to its pool and a mirrored request's copy
    /// goes out.
    fn give_back_if_done(&mut self) {
        if !self.inner.is_end_stream() {
            return;
        }
        if let Some(sender) = self.sender.take()
            && let Some(upstream) = &self.guard.upstream
        {
            upstream.pool.put(sender);
        }
        if let Some(mirror) = self.mirror.take() {
            mirror.finish();
        }
    }

    /// The drain deadline passed with the body still streaming.
    fn cut_at_deadline(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.grpc {
            return Poll::Ready(Some(Err(DrainCut.into())));
        }
        self.cut_off = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "bluegreen: the environment stopped taking traffic and its drain timeout passed",
            ),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl Drop for ProxiedBody {
    fn drop(&mut self) {
        // Read to the end but not polled past it: the connection is still reusable. Otherwise
        // the sender drops with it and the connection closes, as a half-read response demands.
        self.give_back_if_done();
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Proxied(body) => {
                if body.cut_off {
                    return Poll::Ready(None);
                }
                if body.guard.member.token().is_cancelled() {
                    return body.cut_at_deadline();
                }
                match Pin::new(&mut body.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            body.guard
                                .metrics
                                .color(body.guard.color)
                                .bytes_out(data.len() as u64);
                            if let Some(mirror) = body.mirror.as_mut() {
                                mirror.feed(data);
                            }
                        } else if let Some(trailers) = frame.trailers_ref()
                            && let Some(mirror) = body.mirror.as_mut()
                        {
                            mirror.trailers(trailers);
                        }
                        body.give_back_if_done();
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
                    Poll::Ready(None) => {
                        body.give_back_if_done();
                        Poll::Ready(None)
                    }
                    Poll::Pending => {
                        let token = body.guard.member.token();
                        let cut = body
                            .cut
                            .get_or_insert_with(|| Box::pin(token.clone().cancelled_owned()));
                        match cut.as_mut().poll(cx) {
                            Poll::Ready(()) => body.cut_at_deadline(),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Proxied(body) => body.cut_off || body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Proxied(body) => body.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret-hop", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-end-to-end"));
    }

    #[test]
    fn an_upgrade_keeps_what_the_upstream_needs() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
/// hyper's HTTP/1.1 server allocates room for one request's future per client connection,
/// for as long as the connection is open, idle or not: that future's size is memory per idle
/// connection.
#[cfg(test)]
mod request_future_size {
    use super::*;

    fn size_of_return<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Arc<Proxy>, Request<Incoming>, Arc<ClientConn>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_request_future_carries_no_room_for_connecting() {
        let size = size_of_return(Proxy::handle);
        // 10.5 KB when the upstream connect (TCP, TLS, handshakes) was inline; 3 KB boxed.
        assert!(size <= 4096, "Proxy::handle's future is {size} bytes");
    }
}
