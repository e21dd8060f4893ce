//! The SOCKS5 proxy a `proxy` worker's ALL_PROXY points at (`socks5h`:
//! names are resolved here, not in the worker). CONNECT only, no
//! authentication; every destination is decided by [`Egress::open`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{tunnel, Egress, Failure, Protocol};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_V6: u8 = 4;

/// SOCKS5 replies (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    /// "connection not allowed by ruleset": every refusal of the policy.
    NotAllowed = 2,
    HostUnreachable = 4,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// How long a client may take to greet and ask.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection of a worker's SOCKS5 listener.
pub async fn serve(egress: Arc<Egress>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(_slot) = egress.slot(Protocol::Socks) else {
        let _ = reply(&mut stream, Reply::GeneralFailure).await;
        return;
    };
    let asked = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream)).await;
    let (host, port) = match asked {
        Ok(Ok(Ok(dest))) => dest,
        Ok(Ok(Err(r))) => {
            let _ = reply(&mut stream, r).await;
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    };
    let upstream = match egress.open(Protocol::Socks, &host, port).await {
        Ok(u) => u,
        Err(Failure::Denied(_)) => {
            let _ = reply(&mut stream, Reply::NotAllowed).await;
            return;
        }
        Err(Failure::Unreachable(_)) => {
            let _ = reply(&mut stream, Reply::HostUnreachable).await;
            return;
        }
    };
    if reply(&mut stream, Reply::Succeeded).await.is_err() {
        return;
    }
    let host = upstream.host.clone();
    tunnel::splice(
        &egress,
        Protocol::Socks,
        stream,
        Vec::new(),
        upstream.stream,
        &host,
        port,
    )
    .await;
}

/// The greeting and the request: the destination, or the reply that
/// refuses it. A name is returned as sent, for the one canonicaliser.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<Result<(String, u16), Reply>> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(std::io::Error::other("not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        s.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(std::io::Error::other("no acceptable method"));
    }
    s.write_all(&[VERSION, NO_AUTH]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(std::io::Error::other("not SOCKS5"));
    }
    let host = match req[3] {
        ATYP_V4 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        ATYP_V6 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            format!("[{}]", std::net::Ipv6Addr::from(a))
        }
        ATYP_NAME => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            s.read_exact(&mut name).await?;
            // Not UTF-8 is not a host: the canonicaliser refuses it by its
            // replacement character.
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return Ok(Err(Reply::AddressTypeNotSupported)),
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != CMD_CONNECT {
        return Ok(Err(Reply::CommandNotSupported));
    }
    Ok(Ok((host, u16::from_be_bytes(port))))
}

async fn reply(s: &mut TcpStream, r: Reply) -> std::io::Result<()> {
    // The bound address is not told: 0.0.0.0:0.
    s.write_all(&[VERSION, r as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0]).await
}
