//! The CLI's side of the admin API: one HTTP/1.1 request over the unix socket or TCP.

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::config::AdminEndpoint;
use crate::transport::{exchange, open};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the bluegreen daemon at {endpoint}: {reason}. Is `bluegreen up` running with this config?"
    )]
    Unreachable { endpoint: String, reason: String },
    #[error("the daemon at {endpoint} broke off the request: {reason}")]
    Protocol { endpoint: String, reason: String },
}

pub struct AdminClient {
    pub endpoint: AdminEndpoint,
    pub token: Option<String>,
}

impl AdminClient {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let endpoint = self.endpoint.to_string();
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        };
        match &self.endpoint {
            AdminEndpoint::Unix(path_) => {
                let stream = UnixStream::connect(path_).await.map_err(unreachable)?;
                self.send(stream, method, path, body).await
            }
            AdminEndpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await.map_err(unreachable)?;
                self.send(stream, method, path, body).await
            }
        }
    }

    /// A GET whose answer body is read as it arrives (the `/v1/stream` of server-sent events).
    pub async fn stream(&self, path: &str) -> Result<hyper::body::Incoming, ClientError> {
        let endpoint = self.endpoint.to_string();
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        };
        let protocol = |e: hyper::Error| ClientError::Protocol {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        };
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::HOST, "bluegreen");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let response = match &self.endpoint {
            AdminEndpoint::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(unreachable)?;
                open(stream, request).await
            }
            AdminEndpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await.map_err(unreachable)?;
                open(stream, request).await
            }
        }
        .map_err(protocol)?;
        if !response.status().is_success() {
            return Err(ClientError::Protocol {
                endpoint,
                reason: format!("{path} answered {}", response.status()),
            });
        }
        Ok(response.into_body())
    }

    async fn send<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let protocol = |e: hyper::Error| ClientError::Protocol {
            endpoint: self.endpoint.to_string(),
            reason: e.to_string(),
        };
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "bluegreen")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(payload)).expect("a valid request");
        let (status, _, bytes) = exchange(stream, request).await.map_err(protocol)?;
        Ok((status, bytes))
    }
}
