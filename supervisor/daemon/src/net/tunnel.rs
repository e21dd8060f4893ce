//! Tunnels: the bytes of an allowed connection, counted, with the TLS
//! server name checked against the host the tunnel was opened for.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::os::fd::AsRawFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use warden_policy::Host;

use super::sni::{server_name, Hello, MAX_HELLO};
use super::{Egress, Protocol, Traffic};

/// A stream whose bytes count towards a worker's traffic to one host.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, egress: Arc<Egress>, host: String) -> Self {
        Counted {
            inner,
            traffic: Arc::new(Traffic {
                egress,
                host,
                up: AtomicU64::new(0),
                down: AtomicU64::new(0),
            }),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.traffic.down.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.traffic.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a tunnel copies at a time, each way (large enough that a relay on
/// loopback is not held back by system calls).
const BUFFER: usize = 256 * 1024;

/// Carries bytes both ways between a worker's client and an allowed
/// upstream until both sides close; `early` holds client bytes already read
/// (sent along with the request that opened the tunnel). When the client
/// speaks first and its first bytes are a TLS ClientHello, it must name
/// `host` (or no name at all): another name closes the tunnel and is a
/// denial. When the upstream speaks first it is no TLS server, and there is
/// nothing to check.
pub async fn splice(
    egress: &Egress,
    protocol: Protocol,
    mut client: TcpStream,
    early: Vec<u8>,
    mut upstream: Counted<TcpStream>,
    host: &Host,
    port: u16,
) {
    let mut first = early;
    let client_first = if first.is_empty() {
        let mut chunk = vec![0u8; 4096];
        tokio::select! {
            n = client.read(&mut chunk) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => { first.extend_from_slice(&chunk[..n]); true }
            },
            ready = upstream.inner.readable() => {
                if ready.is_err() {
                    return;
                }
                false
            }
        }
    } else {
        true
    };
    if client_first {
        let refusal = match read_hello(&mut client, &mut first).await {
            Ok(Hello::Name(sni)) if Host::parse(&sni).as_ref() != Ok(host) => Some(format!(
                "the TLS server name {:?} is not {host}, the host this tunnel was allowed for",
                sni.escape_debug().to_string()
            )),
            Ok(Hello::Malformed) => Some(format!("a malformed TLS ClientHello in a tunnel to {host}")),
            Ok(_) => None,
            Err(_) => return,
        };
        if let Some(message) = refusal {
            egress.refuse(protocol, &host.to_string(), port, "sni-mismatch", message);
            return;
        }
        if upstream.write_all(&first).await.is_err() {
            return;
        }
    }
    let traffic = upstream.traffic.clone();
    let (client, upstream) = (&client, &upstream.inner);
    // Both ways at once, each ending with a half-close of the other side.
    let _ = tokio::join!(
        relay(client, upstream, &traffic.up),
        relay(upstream, client, &traffic.down),
    );
}

/// Moves bytes from `from` to `to` until `from` ends, through a pipe with
/// splice(2): the kernel moves them, the daemon never copies them. Counts
/// them in `counter`, then half-closes `to`.
async fn relay(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    use nix::fcntl::{fcntl, splice as splice2, FcntlArg, OFlag, SpliceFFlags};
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe moves more per call; the default (64 KiB) still works.
    let _ = fcntl(
        &pipe_w,
        FcntlArg::F_SETPIPE_SZ(i32::try_from(BUFFER).unwrap_or(1 << 16)),
    );
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let would_block = |e: nix::errno::Errno| io::Error::from(e);
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(tokio::io::Interest::READABLE, || {
                splice2(from, None, &pipe_w, None, BUFFER, flags).map_err(would_block)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                .map_err(io::Error::from);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(tokio::io::Interest::WRITABLE, || {
                splice2(&pipe_r, None, to, None, left, flags).map_err(would_block)
            }) {
                Ok(m) => {
                    left -= m;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads until `buf` (the client's first bytes) holds a whole first TLS
/// record, or shows it is not TLS, or the client closed.
async fn read_hello<C: AsyncRead + Unpin>(client: &mut C, buf: &mut Vec<u8>) -> io::Result<Hello> {
    let mut chunk = [0u8; 4096];
    loop {
        match server_name(buf) {
            Hello::Incomplete if buf.len() < MAX_HELLO => {}
            Hello::Incomplete => return Ok(Hello::Malformed),
            other => return Ok(other),
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Hello::NotTls);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
