//! How the router speaks to an environment's upstreams: HTTP/1.1, h2c (HTTP/2 in clear text) or h2 (HTTP/2 over TLS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version, header};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pool::{SendError, Sender};
use crate::proxy::RequestBody;

/// What an environment's upstreams speak, as configured.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge on a plain TCP connection (gRPC services mostly speak this).
    H2c,
    /// HTTP/2 over TLS, agreed by ALPN. The certificate is checked against `ca` (PEM), or
    /// Mozilla's roots without it, for `server_name`, or the upstream's IP address without it.
    H2 {
        ca: Option<PathBuf>,
        server_name: Option<String>,
    },
}

impl UpstreamProtocol {
    pub fn name(&self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 { .. } => "h2",
        }
    }
}

/// Why an `h2` upstream's TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("cannot read the upstream CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the upstream CA file {path} holds no PEM certificate")]
    CaEmpty { path: PathBuf },
    #[error("the upstream CA file {path} holds a certificate rustls refuses: {source}")]
    CaInvalid {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{name:?} is not a valid TLS server name; use a DNS name like api.internal")]
    ServerName { name: String },
}

/// Opens connections to an environment's upstreams in its protocol (the TLS client is set up
/// once, here, not per connection).
pub enum Connector {
    Http1,
    H2c,
    H2 {
        tls: TlsConnector,
        server_name: Option<ServerName<'static>>,
    },
}

impl Connector {
    pub fn new(protocol: &UpstreamProtocol) -> Result<Connector, ConnectorError> {
        Ok(match protocol {
            UpstreamProtocol::Http1 => Connector::Http1,
            UpstreamProtocol::H2c => Connector::H2c,
            UpstreamProtocol::H2 { ca, server_name } => {
                let roots = match ca {
                    Some(path) => roots_from(path)?,
                    None => rustls::RootCertStore {
                        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                    },
                };
                let mut config = rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                let server_name = server_name
                    .as_ref()
                    .map(|name| {
                        ServerName::try_from(name.clone())
                            .map_err(|_| ConnectorError::ServerName { name: name.clone() })
                    })
                    .transpose()?;
                Connector::H2 {
                    tls: TlsConnector::from(Arc::new(config)),
                    server_name,
                }
            }
        })
    }

    pub fn is_http2(&self) -> bool {
        !matches!(self, Connector::Http1)
    }

    /// A new connection to `addr`, handshakes done, within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<Sender, SendError> {
        match tokio::time::timeout(timeout, self.connect_now(addr)).await {
            Ok(connected) => connected,
            Err(_) => Err(SendError::Connect(format!(
                "no connection within {}ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn connect_now(&self, addr: SocketAddr) -> Result<Sender, SendError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match self {
            Connector::Http1 => {
                let (sender, connection) = http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| SendError::Connect(e.to_string()))?;
                // The connection runs on its own task; with upgrades, so a 101 hands the
                // socket over.
                tokio::spawn(async move {
                    if let Err(error) = connection.with_upgrades().await {
                        tracing::debug!(%error, "upstream connection ended with an error");
                    }
                });
                Ok(Sender::Http1(sender))
            }
            Connector::H2c => http2_handshake(stream).await,
            Connector::H2 { tls, server_name } => {
                let name = server_name
                    .clone()
                    .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
                let stream = tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| SendError::Connect(format!("TLS handshake: {e}")))?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(SendError::Connect(
                        "the upstream did not agree to HTTP/2 (ALPN h2) in its TLS handshake"
                            .into(),
                    ));
                }
                http2_handshake(stream).await
            }
        }
    }

    /// Makes a request built for HTTP/1.1 (origin-form target, `Host` header) fit this
    /// protocol: for HTTP/2 the target carries the scheme and the authority (the `Host` the
    /// client sent, else `fallback`), and `Host` goes.
    pub fn adapt(&self, request: &mut Request<RequestBody>, fallback: &Authority) {
        let scheme = match self {
            Connector::Http1 => return,
            Connector::H2c => Scheme::HTTP,
            Connector::H2 { .. } => Scheme::HTTPS,
        };
        let authority = request
            .headers_mut()
            .remove(header::HOST)
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
            .unwrap_or_else(|| fallback.clone());
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        *request.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        *request.version_mut() = Version::HTTP_2;
    }
}

/// A gRPC answer's `grpc-status` or `grpc-message`: in the trailers, or in the headers of a
/// trailers-only answer.
pub(crate) fn grpc_field<'a>(
    name: &str,
    headers: &'a http::HeaderMap,
    trailers: &'a http::HeaderMap,
) -> Option<&'a str> {
    trailers
        .get(name)
        .or_else(|| headers.get(name))
        .and_then(|v| v.to_str().ok())
}

/// Whether an answer is gRPC's (`content-type: application/grpc`, `application/grpc+proto` …).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

async fn http2_handshake<S>(stream: S) -> Result<Sender, SendError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Pings find a connection the upstream lost without closing it (a host gone away).
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(format!("HTTP/2 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Sender::Http2(sender))
}

fn roots_from(path: &PathBuf) -> Result<rustls::RootCertStore, ConnectorError> {
    let pem = std::fs::read(path).map_err(|source| ConnectorError::CaFile {
        path: path.clone(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|source| ConnectorError::CaFile {
            path: path.clone(),
            source,
        })?;
        roots
            .add(cert)
            .map_err(|source| ConnectorError::CaInvalid {
                path: path.clone(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(ConnectorError::CaEmpty { path: path.clone() });
    }
    Ok(roots)
}
