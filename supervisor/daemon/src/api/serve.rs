//! The API socket's serving loop: HTTP/2 connections from local clients,
//! each request tagged with its peer's credentials (SO_PEERCRED) for
//! `caller`, served by the gRPC routes.
//!
//! Owns: what one client can make the daemon hold for its connections:
//! connections per calling uid, streams per connection, bytes buffered
//! per stream in either direction (HTTP/2 flow control does the rest: a
//! client that does not read stops the daemon writing), and the bytes of
//! partial request messages per calling uid (`metered`).
//!
//! Must never: let one uid's connections or streams grow the daemon
//! without bound, or serve a request without its peer's credentials.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tower::ServiceExt;

use super::metered::{self, Metered};

/// Bytes queued to send on one stream that the socket has not taken
/// (hyper's default is 400 KiB).
const MAX_SEND_BUFFER: usize = 16 << 10;
/// A client may have this much in flight to the daemon, per stream and in
/// all on a connection, before it must wait for the daemon to read.
const STREAM_WINDOW: u32 = 256 << 10;
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Bytes of headers in one request.
const MAX_HEADERS: u32 = 16 << 10;
/// Streams open at once on one connection.
const MAX_STREAMS: u32 = 100;
/// How long connections get to finish at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// What one calling uid may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; past it, every request on a further
    /// connection is answered RESOURCE_EXHAUSTED.
    pub connections_per_uid: usize,
    /// The largest request message (`max_message_bytes`): partial
    /// messages draw on a pool of [`metered::POOL_BYTES`] per uid.
    pub max_message: usize,
    /// How long a request may wait for room in that pool.
    pub client_timeout: Duration,
}

/// Open connections per uid, and the pool their partial request messages
/// share.
#[derive(Debug, Default)]
struct Connections(Mutex<HashMap<u32, (usize, Arc<tokio::sync::Semaphore>)>>);

/// A connection counted against its uid until it is dropped.
struct Counted {
    uid: u32,
    pool: Arc<tokio::sync::Semaphore>,
    all: Arc<Connections>,
}

impl Connections {
    fn open(self: &Arc<Self>, uid: u32, limits: &Limits) -> Option<Counted> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (n, pool) = m.entry(uid).or_insert_with(|| (0, metered::pool(limits.max_message)));
        if *n >= limits.connections_per_uid {
            return None;
        }
        *n += 1;
        Some(Counted {
            uid,
            pool: pool.clone(),
            all: self.clone(),
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut m = self.all.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Serves `routes` on `listener` until `shutdown`, then lets open
/// connections finish for a grace period, within `limits` per calling uid.
pub async fn serve(listener: UnixListener, routes: Routes, limits: Limits, shutdown: impl Future<Output = ()>) {
    let routes = routes.prepare();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Connections::default());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let info = stream.connect_info();
        let uid = info.peer_cred.map_or(u32::MAX, |c| c.uid());
        let counted = connections.open(uid, &limits);
        let per_uid = limits.connections_per_uid;
        if counted.is_none() {
            tracing::warn!(uid, per_uid, "too many connections from one uid; refusing its requests");
        }
        let routes = routes.clone();
        // The service (and with it `counted`) lives as long as the connection.
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let routes = routes.clone();
            let pool = counted.as_ref().map(|c| c.pool.clone());
            let info = info.clone();
            async move {
                let Some(pool) = pool else {
                    let status = tonic::Status::resource_exhausted(format!(
                        "uid {uid} has {per_uid} connections to wardend open, the most it may"
                    ));
                    return Ok(status.into_http::<tonic::body::Body>());
                };
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(info);
                let body = Metered::new(body, pool, uid, limits.max_message, limits.client_timeout);
                routes.oneshot(hyper::Request::from_parts(parts, body)).await
            }
        });
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new())
            .max_send_buf_size(MAX_SEND_BUFFER)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADERS);
        // Whatever `:authority` the client sends (its socket path, say).
        let stream = super::authority::AnyAuthority::new(stream);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a client connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(GRACE) => tracing::warn!("connections still open at shutdown were cut"),
    }
}
