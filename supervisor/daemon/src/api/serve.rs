//! The API socket's serving loop: HTTP/2 connections from local clients,
//! each request tagged with its peer's credentials (SO_PEERCRED) for
//! `caller`, served by the gRPC routes.
//!
//! Owns: what one client can make the daemon hold for its connections:
//! connections per calling uid, streams per connection, and bytes
//! buffered per stream in either direction (HTTP/2 flow control does the
//! rest: a client that does not read stops the daemon writing).
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

/// Bytes queued to send on one stream that the socket has not taken
/// (hyper's default is 400 KiB).
const MAX_SEND_BUFFER: usize = 16 << 10;
/// A client may have this much in flight to the daemon, per stream and in
/// all on a connection, before it must wait for the daemon to read.
const STREAM_WINDOW: u32 = 256 << 10;
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Streams open at once on one connection.
const MAX_STREAMS: u32 = 100;
/// How long connections get to finish at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// Open connections per uid.
#[derive(Debug, Default)]
struct Connections(Mutex<HashMap<u32, usize>>);

/// A connection counted against its uid until it is dropped.
struct Counted {
    uid: u32,
    all: Arc<Connections>,
}

impl Connections {
    fn open(self: &Arc<Self>, uid: u32, max: usize) -> Option<Counted> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Counted { uid, all: self.clone() })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut m = self.all.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Serves `routes` on `listener` until `shutdown`, then lets open
/// connections finish for a grace period. At most `per_uid` connections
/// of one uid are served at once; past it, every request on a further
/// connection is answered RESOURCE_EXHAUSTED.
pub async fn serve(listener: UnixListener, routes: Routes, per_uid: usize, shutdown: impl Future<Output = ()>) {
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
        let counted = connections.open(uid, per_uid);
        if counted.is_none() {
            tracing::warn!(uid, per_uid, "too many connections from one uid; refusing its requests");
        }
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(info.clone());
            let routes = routes.clone();
            let refused = counted.is_none();
            async move {
                if refused {
                    let status = tonic::Status::resource_exhausted(format!(
                        "uid {uid} has {per_uid} connections to wardend open, the most it may"
                    ));
                    return Ok(status.into_http::<tonic::body::Body>());
                }
                routes.oneshot(req).await
            }
        });
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new())
            .max_send_buf_size(MAX_SEND_BUFFER)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_STREAMS);
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
