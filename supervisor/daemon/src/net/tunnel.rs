//! Tunnels: the bytes of an allowed connection, counted, with the TLS
//! server name checked against the host the tunnel was opened for.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// Carries bytes both ways between a worker's client and an allowed
/// upstream until both sides close. When the client's first bytes are a
/// TLS ClientHello, it must name `host` (or no name at all): another name
/// closes the tunnel and is a denial. The upstream's bytes flow meanwhile,
/// so protocols where the server speaks first are not held up.
pub async fn splice<C, U>(egress: &Egress, protocol: Protocol, client: C, upstream: U, host: &Host, port: u16)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let down = async {
        let _ = tokio::io::copy(&mut up_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    };
    let up = async {
        let mut first = Vec::new();
        let refusal = match read_hello(&mut client_r, &mut first).await {
            Ok(Hello::Name(sni)) if Host::parse(&sni).as_ref() != Ok(host) => Some(format!(
                "the TLS server name {:?} is not {host}, the host this tunnel was allowed for",
                sni.escape_debug().to_string()
            )),
            Ok(Hello::Malformed) => Some(format!("a malformed TLS ClientHello in a tunnel to {host}")),
            Ok(_) => None,
            Err(_) => return Ok(()),
        };
        if let Some(message) = refusal {
            egress.refuse(protocol, &host.to_string(), port, "sni-mismatch", message);
            return Err(());
        }
        if up_w.write_all(&first).await.is_ok() {
            let _ = tokio::io::copy(&mut client_r, &mut up_w).await;
        }
        let _ = up_w.shutdown().await;
        Ok(())
    };
    // A refused ClientHello ends both directions at once.
    tokio::pin!(up, down);
    let mut down_done = false;
    loop {
        tokio::select! {
            r = &mut up => {
                if r.is_ok() && !down_done {
                    (&mut down).await;
                }
                return;
            }
            () = &mut down, if !down_done => down_done = true,
        }
    }
}

/// Reads until `buf` holds a whole first TLS record, or shows it is not
/// TLS, or the client closed.
async fn read_hello<C: AsyncRead + Unpin>(client: &mut C, buf: &mut Vec<u8>) -> io::Result<Hello> {
    let mut chunk = [0u8; 4096];
    loop {
        match server_name(buf) {
            Hello::Incomplete if buf.is_empty() || buf.len() < MAX_HELLO => {}
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
