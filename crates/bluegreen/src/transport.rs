//! One HTTP/1.1 exchange on a fresh connection, plain or over TLS: under the admin client, smoke checks and webhooks.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Sends one request on a fresh connection and hands back the answer with its body unread.
pub async fn open<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
}

/// One HTTP/1.1 request on a fresh connection; the whole answer body is read.
pub async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, http::HeaderMap, Bytes), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let response = open(stream, request).await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

/// A TLS client and the server name it verifies.
pub type TlsClient = (
    std::sync::Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// One request to a TCP address within `timeout` (over TLS when `tls` is given), for smoke
/// checks and webhooks.
pub async fn http_request(
    addr: std::net::SocketAddr,
    tls: Option<&TlsClient>,
    request: Request<Full<Bytes>>,
    timeout: std::time::Duration,
) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        match tls {
            None => exchange(stream, request).await,
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(config))
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS with {addr}: {e}"))?;
                exchange(stream, request).await
            }
        }
        .map_err(|e| format!("{addr}: {e}"))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer from {addr} within {}ms", timeout.as_millis()))?
}
