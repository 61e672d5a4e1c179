//! Keep-alive HTTP/1.1 connections to one upstream: reuse the most recent idle one, or open one.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::RequestBody;

pub type Sender = http1::SendRequest<RequestBody>;

/// Why a request did not get a response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the upstream.
    Connect(String),
    /// The connection failed after the request may have been sent.
    Failed(hyper::Error),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle connections of one upstream, most recently used last.
#[derive(Default)]
pub struct ConnPool {
    idle: Mutex<Vec<Idle>>,
}

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 1024;
/// Below the 60 s most servers keep idle connections, so the pool drops a connection before
/// the upstream closes it and a request is never written to a closing socket.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

impl ConnPool {
    /// Sends the request on a pooled connection, or on a new one. A request the pooled
    /// connection never sent (it was closing) goes out again on another connection, so a
    /// stale keep-alive connection costs no request. Returns the response and the connection
    /// to give back with [`ConnPool::put`] once the response body has been read to its end.
    pub async fn send(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        // Pooled connections that turn out closed cost nothing but the next try (there are at
        // most MAX_IDLE of them); only new connections that the upstream closes before taking
        // the request count against it, so stale keep-alive connections never eject it.
        let mut new_connections = 0;
        loop {
            let mut sender = match self.take() {
                Some(sender) => sender,
                None if new_connections < 2 => {
                    new_connections += 1;
                    connect(addr, connect_timeout).await?
                }
                None => {
                    return Err(SendError::Connect(format!(
                        "{addr} closed every new connection before taking the request"
                    )));
                }
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Failed(error.into_error())),
                },
            }
        }
    }

    /// Gives a connection back after its response was read to the end.
    pub fn put(&self, sender: Sender) {
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
        let mut idle = self.idle.lock().expect("lock");
        while let Some(candidate) = idle.pop() {
            if !candidate.sender.is_closed() && candidate.since.elapsed() < IDLE_TIMEOUT {
                return Some(candidate.sender);
            }
        }
        None
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(SendError::Connect(error.to_string())),
        Err(_) => {
            return Err(SendError::Connect(format!(
                "no connection within {}ms",
                timeout.as_millis()
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    // The connection runs on its own task; with upgrades, so a 101 hands the socket over.
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
