//! Unix-domain stream sockets to PostgreSQL, watched by the reactor for readability only.
//!
//! tokio registers a socket for both directions, and on a Unix stream the kernel reports "writable" each time the
//! peer consumes data. So every query PostgreSQL read woke pgrelay once for nothing: one more `epoll_wait` and
//! one more context switch per transaction. Here a write goes straight to the socket; only a write that would
//! block registers a second descriptor (a `dup` of the socket) for writability, dropped again once the write
//! went through. Reads work as tokio's do, including clearing readiness after a short read.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream; see the module notes.
pub struct UdsStream {
    read: AsyncFd<std::os::unix::net::UnixStream>,
    /// Present only while a write waits for room in the socket buffer.
    write_wait: Option<AsyncFd<OwnedFd>>,
}

impl UdsStream {
    /// Connects to a socket path (asynchronously, then re-registers for readability only).
    pub async fn connect(path: &Path) -> io::Result<UdsStream> {
        let s = tokio::net::UnixStream::connect(path).await?.into_std()?;
        UdsStream::from_std(s)
    }

    /// Takes a connected standard stream.
    pub fn from_std(s: std::os::unix::net::UnixStream) -> io::Result<UdsStream> {
        s.set_nonblocking(true)?;
        // SAFETY: the stream owns its descriptor for as long as the AsyncFd holds it, and as_raw_fd never changes.
        let read = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }?;
        Ok(UdsStream { read, write_wait: None })
    }

    /// One non-blocking send; `WouldBlock` when the socket buffer is full.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        send(self.as_raw_fd(), buf)
    }
}

impl AsRawFd for UdsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.read.get_ref().as_raw_fd()
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: sends from a live slice on a descriptor this stream owns; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for UdsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.read.poll_read_ready(cx))?;
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: recv writes at most `len` bytes into the unfilled part of the buffer; exactly the `n` bytes
            // it reports are then marked initialised and filled.
            let (n, len) = unsafe {
                let dst = buf.unfilled_mut();
                let len = dst.len();
                (libc::recv(fd, dst.as_mut_ptr().cast(), len, 0), len)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Poll::Ready(Err(e));
            }
            let n = n as usize;
            // Edge-triggered: a short read emptied the socket, so the next read waits for the next edge instead
            // of costing a syscall that returns EAGAIN (what tokio does for its own streams).
            if n > 0 && n < len {
                guard.clear_ready();
            }
            // SAFETY: recv initialised the first n bytes of the unfilled part.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for UdsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let fd = this.as_raw_fd();
        loop {
            if let Some(w) = &this.write_wait {
                let mut guard = ready!(w.poll_write_ready(cx))?;
                match send(fd, buf) {
                    Ok(n) => {
                        this.write_wait = None;
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            match send(fd, buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // SAFETY: dup of a descriptor we own; the copy is owned by the OwnedFd and closed on drop.
                    let copy = unsafe { libc::dup(fd) };
                    if copy < 0 {
                        return Poll::Ready(Err(io::Error::last_os_error()));
                    }
                    // SAFETY: `copy` is a fresh descriptor nobody else owns.
                    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
                    // SAFETY: as above; the OwnedFd keeps the copy open until the AsyncFd drops it.
                    this.write_wait = Some(unsafe { AsyncFd::register_with_interest(owned, Interest::WRITABLE) }?);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown of the write side of a descriptor we own.
        let r = unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads and writes both ways, and a write far bigger than the socket buffer (it must wait for room, through
    /// the temporary writable registration, while the other side reads slowly).
    #[tokio::test(flavor = "current_thread")]
    async fn round_trip_and_a_write_that_blocks() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = UdsStream::from_std(a).unwrap();
        let mut b = tokio::net::UnixStream::from_std({
            b.set_nonblocking(true).unwrap();
            b
        })
        .unwrap();
        a.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            a.read_buf(&mut got).await.unwrap();
        }
        assert_eq!(&got, b"pong");
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut chunk = vec![0u8; 65536];
            while all.len() < expect.len() {
                let n = b.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                all.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
            assert!(all == expect);
        });
        a.write_all(&big).await.unwrap();
        assert!(a.write_wait.is_none(), "the writable registration is dropped after the write went through");
        reader.await.unwrap();
        // End of stream after the peer shuts down its side.
        a.shutdown().await.unwrap();
    }
}
