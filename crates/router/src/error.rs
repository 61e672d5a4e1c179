//! Typed errors of the data plane, and the one place that turns them into HTTP responses.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::table::Color;

/// A request the router could not complete. Each variant becomes a short response that
/// names the cause, so an operator reading a client's error knows where to look.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy upstream in environment {color}")]
    NoHealthyUpstream { color: Color },
    #[error("upstream {addr} ({color}) refused or dropped the connection: {reason}")]
    UpstreamConnect {
        color: Color,
        addr: SocketAddr,
        reason: String,
    },
    #[error("upstream {addr} ({color}) sent no response headers within {}ms", timeout.as_millis())]
    UpstreamTimeout {
        color: Color,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {addr} ({color}) failed: {reason}")]
    UpstreamFailed {
        color: Color,
        addr: SocketAddr,
        reason: String,
    },
    #[error(
        "environment {color} stopped taking traffic and its drain timeout passed before the upstream answered"
    )]
    DrainTimeout { color: Color },
    #[error("router is shutting down")]
    ShuttingDown,
    /// The client's own request body broke (a bad chunk, a connection cut mid-body): the
    /// client's error, never counted against the color.
    #[error("the request body could not be read: {reason}")]
    ClientBody { reason: String },
    /// A WebSocket (or other HTTP/1.1 upgrade) cannot be carried to an HTTP/2 upstream.
    #[error(
        "environment {color} speaks HTTP/2 to its upstreams (upstream_protocol h2c or h2): protocol upgrades such as WebSocket are not forwarded to it"
    )]
    UpgradeToHttp2 { color: Color },
    /// CONNECT asks the router to be a tunnel to anywhere: answered here, never forwarded.
    #[error("{method} is not proxied; bluegreen routes HTTP requests to its environments")]
    MethodNotProxied { method: http::Method },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoHealthyUpstream { .. }
            | ProxyError::ShuttingDown
            | ProxyError::DrainTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotProxied { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UpgradeToHttp2 { .. } => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A machine-readable name for the cause, sent as `x-bluegreen-error`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoHealthyUpstream { .. } => "no-healthy-upstream",
            ProxyError::UpstreamConnect { .. } => "upstream-connect",
            ProxyError::UpstreamTimeout { .. } => "upstream-timeout",
            ProxyError::UpstreamFailed { .. } => "upstream-failed",
            ProxyError::DrainTimeout { .. } => "drain-timeout",
            ProxyError::ShuttingDown => "shutting-down",
            ProxyError::ClientBody { .. } => "client-body",
            ProxyError::MethodNotProxied { .. } => "method-not-proxied",
            ProxyError::UpgradeToHttp2 { .. } => "upgrade-to-http2",
        }
    }

    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let status = self.status();
        let body = format!("{} {}: {self}\n", status.as_u16(), self.kind());
        let mut response = Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert("x-bluegreen-error", HeaderValue::from_static(self.kind()));
        if matches!(
            self,
            ProxyError::NoHealthyUpstream { .. } | ProxyError::ShuttingDown
        ) {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A table change the router refused; the table in service is unchanged.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SwitchError {
    #[error(
        "environment {color} has no healthy upstream (0 of {upstreams} healthy); \
         refusing to send it {weight}% of traffic. Fix its upstreams (see `bluegreen status`) and try again"
    )]
    NoHealthyUpstream {
        color: Color,
        weight: u8,
        upstreams: usize,
    },
    #[error("the router is shutting down")]
    ShuttingDown,
}
