//! Plain HTTP/1.1 client connections: hyper serves them while a request is in flight, and between requests they wait parked, holding no buffer.
//!
//! hyper keeps an 8 KiB read and an 8 KiB write buffer (and room for a request) on every
//! connection for as long as it is open, idle or not. nginx frees a keep-alive connection's
//! buffers once its response is written; here, once a request has been answered and the
//! connection has been idle for 200 ms (at once when over `park_at_once_above` connections
//! are open), hyper is asked to finish, gives back the socket and whatever it had read past
//! the request, and the connection waits for its next bytes on the bare socket.
//! Only where hyper itself would have kept the connection alive: an HTTP/1.0 request, a
//! `Connection: close`, an upgrade or a request body not read to its end leave the
//! connection to hyper as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client socket with the bytes already read from it (a pipelined request, the start of
/// the next one) put back in front.
pub struct Rewound {
    read_ahead: Bytes,
    stream: TcpStream,
}

impl Rewound {
    pub fn new(stream: TcpStream, read_ahead: Bytes) -> Rewound {
        Rewound { read_ahead, stream }
    }

    /// The socket and what is still unread of the bytes put back.
    pub fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.read_ahead)
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// How the client's side of an upgraded request reaches the tunnel.
pub enum ClientUpgrade {
    /// hyper switches the connection itself (HTTPS connections, which are not parked).
    Hyper(hyper::upgrade::OnUpgrade),
    /// The parking loop hands the socket over once the 101 is written.
    HandedOver(tokio::sync::oneshot::Receiver<Rewound>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_bytes_put_back_are_read_before_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b" world").await.unwrap();
        let mut rewound = Rewound::new(server, Bytes::from_static(b"hello"));
        let mut read = vec![0u8; 11];
        rewound.read_exact(&mut read).await.unwrap();
        assert_eq!(read, b"hello world");
        let (_, rest) = rewound.into_parts();
        assert!(rest.is_empty());
    }
}
