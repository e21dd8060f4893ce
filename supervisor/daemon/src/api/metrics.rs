//! The metrics listeners: `GET /metrics` in Prometheus's text format, on
//! the loopback addresses and Unix sockets `metrics_listen` names.
//!
//! Must never: listen beyond loopback (the config refuses it), serve
//! anything but the metrics, or let scrapers hold more than a few
//! connections and requests of bounded size.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use warden_policy::config::MetricsListen;

use crate::workers::Supervisor;

/// Scrape connections open at once, over all listeners.
const MAX_CONNECTIONS: usize = 16;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

#[derive(Debug, thiserror::Error)]
#[error("Cannot listen for metrics on {what}")]
pub struct BindError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// Binds every listener of `listen` (a Unix socket: mode 0660, owned by
/// root and group `group` when it exists).
pub fn bind(listen: &[MetricsListen], group: Option<nix::unistd::Gid>) -> Result<Vec<Listener>, BindError> {
    listen
        .iter()
        .map(|l| match l {
            MetricsListen::Tcp(addr) => {
                let err = |source| BindError {
                    what: addr.to_string(),
                    source,
                };
                let std = std::net::TcpListener::bind(addr).map_err(err)?;
                std.set_nonblocking(true).map_err(err)?;
                TcpListener::from_std(std).map(Listener::Tcp).map_err(err)
            }
            MetricsListen::Unix(path) => {
                let err = |source| BindError {
                    what: format!("unix:{}", path.display()),
                    source,
                };
                // A stale socket of a previous run; never another file.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !m.file_type().is_socket() {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "it exists and is not a socket",
                        )));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                let std = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
                nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), group).map_err(|e| err(e.into()))?;
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660)).map_err(err)?;
                std.set_nonblocking(true).map_err(err)?;
                UnixListener::from_std(std).map(Listener::Unix).map_err(err)
            }
        })
        .collect()
}

/// Serves scrapes on `listeners` until the daemon ends.
pub fn serve(listeners: Vec<Listener>, sup: Arc<Supervisor>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    for listener in listeners {
        let (sup, slots) = (sup.clone(), slots.clone());
        tokio::spawn(async move {
            loop {
                let accepted = match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
                    Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
                };
                let conn = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept a metrics connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Past the limit, a new connection is closed at once.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let sup = sup.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let sup = sup.clone();
                        async move { Ok::<_, Infallible>(answer(&req, &sup)) }
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .max_buf_size(16 << 10);
                    let served = match conn {
                        Conn::Tcp(s) => http.serve_connection(TokioIo::new(s), service).await,
                        Conn::Unix(s) => http.serve_connection(TokioIo::new(s), service).await,
                    };
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "a metrics connection ended with an error");
                    }
                });
            }
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn answer(req: &Request<hyper::body::Incoming>, sup: &Supervisor) -> Response<Full<Bytes>> {
    let mut r = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let text = crate::metrics::global().render(&sup.gauges());
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"wardend serves GET /metrics here\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}
