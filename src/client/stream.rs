//! The client's byte stream: plain TCP, or TLS after an accepted SSLRequest or a direct TLS handshake.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::WriteThrough;

/// A client socket, plain or encrypted.
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsClient>),
}

/// An encrypted client connection and what authentication needs to know about it.
pub struct TlsClient {
    pub io: WriteThrough<tokio_rustls::server::TlsStream<TcpStream>>,
    /// tls-server-end-point data of the certificate this handshake used (for SCRAM-SHA-256-PLUS).
    pub end_point: Option<Arc<[u8]>>,
}

impl ClientStream {
    /// True once the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Channel binding data, when encrypted with a certificate that has it.
    pub fn end_point(&self) -> Option<Arc<[u8]>> {
        match self {
            ClientStream::Tls(t) => t.end_point.clone(),
            ClientStream::Tcp(_) => None,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => {
                // The relay polls the client on every turn of its loop, mostly when nothing arrived. With no
                // plaintext buffered, rustls wants socket data, and tokio-rustls would find the socket not
                // ready only after setting up a read through its adapters: ask the socket first. Pending here
                // registers the same waker the failed read would have.
                let (tcp, tls) = s.io.inner.get_ref();
                if tls.wants_read() && tcp.poll_read_ready(cx).is_pending() {
                    return Poll::Pending;
                }
                Pin::new(&mut s.io).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut s.io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut s.io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut s.io).poll_shutdown(cx),
        }
    }
}
