//! Connections to one upstream: keep-alive HTTP/1.1 connections (the most recent idle one reused, or a new one), or one HTTP/2 connection every request shares.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};

use crate::protocol::Connector;
use crate::proxy::RequestBody;

/// A connection to send one request on.
pub enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    /// A handle on the shared HTTP/2 connection.
    Http2(http2::SendRequest<RequestBody>),
}

impl Sender {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::Http1(sender) => sender.ready().await,
            Sender::Http2(sender) => sender.ready().await,
        }
    }

    pub async fn try_send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            Sender::Http1(sender) => sender.try_send_request(request).await,
            Sender::Http2(sender) => sender.try_send_request(request).await,
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(sender) => sender.is_closed(),
            Sender::Http2(sender) => sender.is_closed(),
        }
    }
}

/// Why a request did not get a response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the upstream.
    Connect(String),
    /// The connection failed after the request may have been sent.
    Failed(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(reason) => f.write_str(reason),
            SendError::Failed(error) => error.fmt(f),
        }
    }
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// The connections of one upstream.
pub struct ConnPool {
    connector: Arc<Connector>,
    /// HTTP/1.1: idle connections, most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// HTTP/2: the connection every request is multiplexed on. Held across a connect, so
    /// requests that find none wait for one new connection instead of each opening theirs.
    shared: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
}

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 1024;
/// Below the 60 s most servers keep idle connections, so the pool drops a connection before
/// the upstream closes it and a request is never written to a closing socket.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

impl ConnPool {
    pub fn new(connector: Arc<Connector>) -> ConnPool {
        ConnPool {
            connector,
            idle: Mutex::default(),
            shared: tokio::sync::Mutex::default(),
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Sends the request (built for HTTP/1.1; adapted here to the upstream's protocol, with
    /// `authority` when it has no `Host`) on a pooled connection, or on a new one. A request
    /// the pooled connection never sent (it was closing) goes out again on another
    /// connection, so a stale connection costs no request. Returns the response and the
    /// connection to give back with [`ConnPool::put`] once the response body has been read to
    /// its end.
    pub async fn send(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        connect_timeout: Duration,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        self.connector.adapt(&mut request, authority);
        // Pooled connections that turn out closed cost nothing but the next try (there are at
        // most MAX_IDLE of them); only new connections that the upstream closes before taking
        // the request count against it, so stale keep-alive connections never eject it.
        let mut new_connections = 0;
        loop {
            let mut sender = match self.take() {
                Some(sender) => sender,
                None if new_connections < 2 => {
                    new_connections += 1;
                    // Boxed: connecting (TCP, TLS, handshakes) is an 8 KB future, and every
                    // request's future (which hyper allocates once per client connection,
                    // idle or not) would otherwise carry room for it.
                    Box::pin(self.open(addr, connect_timeout)).await?
                }
                None => {
                    return Err(SendError::Connect(format!(
                        "{addr} closed every new connection before taking the request"
                    )));
                }
            };
            if sender.ready().await.is_err() {
                self.forget_shared();
                continue;
            }
            match sender.try_send(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => {
                        self.forget_shared();
                        request = unsent;
                    }
                    None => return Err(SendError::Failed(error.into_error())),
                },
            }
        }
    }

    /// Gives a connection back after its response was read to the end (an HTTP/2 handle is
    /// only dropped: its connection stays shared).
    pub fn put(&self, sender: Sender) {
        let Sender::Http1(sender) = sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("lock");
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn take(&self) -> Option<Sender> {
        if self.connector.is_http2() {
            // Busy means another request is connecting: `open` waits for it.
            let shared = self.shared.try_lock().ok()?;
            return shared
                .as_ref()
                .filter(|sender| !sender.is_closed())
                .map(|sender| Sender::Http2(sender.clone()));
        }
        let mut idle = self.idle.lock().expect("lock");
        while let Some(candidate) = idle.pop() {
            if !candidate.sender.is_closed() && candidate.since.elapsed() < IDLE_TIMEOUT {
                return Some(Sender::Http1(candidate.sender));
            }
        }
        None
    }

    async fn open(&self, addr: SocketAddr, timeout: Duration) -> Result<Sender, SendError> {
        if !self.connector.is_http2() {
            return self.connector.connect(addr, timeout).await;
        }
        let mut shared = self.shared.lock().await;
        if let Some(sender) = shared.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(Sender::Http2(sender.clone()));
        }
        let sender = self.connector.connect(addr, timeout).await?;
        if let Sender::Http2(handle) = &sender {
            *shared = Some(handle.clone());
        }
        Ok(sender)
    }

    /// The shared HTTP/2 connection refused a request (it is going away): the next request
    /// opens a new one. Requests still on the old connection finish there.
    fn forget_shared(&self) {
        if let Ok(mut shared) = self.shared.try_lock() {
            *shared = None;
        }
    }
}
