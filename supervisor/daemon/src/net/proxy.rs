//! The HTTP proxy a `proxy` worker's HTTP_PROXY and HTTPS_PROXY point at:
//! `CONNECT host:port` tunnels and absolute-form plain HTTP requests, each
//! decided by [`Egress::open`]. Refusals answer in-band: 403 with
//! `X-Warden-Denied: <reason>` and a one-line body the model can read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{tunnel, Egress, Failure, Protocol};

type Body = BoxBody<Bytes, hyper::Error>;

/// The largest request head the proxy reads (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection of a worker's HTTP proxy listener.
pub async fn serve(egress: Arc<Egress>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(_slot) = egress.slot(Protocol::Http) else {
        let _ = refuse_raw(
            stream,
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-connections",
            "warden: too many open connections for this worker",
        )
        .await;
        return;
    };
    let svc = hyper::service::service_fn(move |req| handle(egress.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let _ = conn.await;
}

async fn handle(egress: Arc<Egress>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(connect(egress, req).await);
    }
    Ok(forward(egress, req).await)
}

/// Where a request asks to go: `CONNECT host:port`, or an absolute-form
/// `http://` request (port 80 unless given). The host is as sent; the
/// error is the 400 answer's text.
pub fn destination(method: &Method, uri: &Uri) -> Result<(Protocol, String, u16), &'static str> {
    if method == Method::CONNECT {
        return uri
            .authority()
            .and_then(|a| Some((Protocol::Connect, a.host().to_string(), a.port_u16()?)))
            .ok_or("warden: CONNECT needs host:port\n");
    }
    let Some(authority) = uri.authority() else {
        return Err("warden: this is a proxy: send absolute-form (http://host/path) or CONNECT requests\n");
    };
    if uri.scheme_str() != Some("http") {
        return Err("warden: only http:// is forwarded as a request; use CONNECT for https\n");
    }
    Ok((
        Protocol::Http,
        authority.host().to_string(),
        authority.port_u16().unwrap_or(80),
    ))
}

/// `CONNECT host:port`: dial, answer 200, then carry the tunnel.
async fn connect(egress: Arc<Egress>, req: Request<Incoming>) -> Response<Body> {
    let (host, port) = match destination(req.method(), req.uri()) {
        Ok((_, host, port)) => (host, port),
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let upstream = match egress.open(Protocol::Connect, &host, port).await {
        Ok(u) => u,
        Err(f) => return failure(f),
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "a CONNECT client went away before its tunnel");
                return;
            }
        };
        // The tunnel runs on the client's own socket again (so the kernel
        // can move its bytes), after what hyper had already read of it.
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::error!("a CONNECT tunnel is not on a TCP socket");
            return;
        };
        let host = upstream.host.clone();
        let early = parts.read_buf.to_vec();
        tunnel::splice(
            &egress,
            Protocol::Connect,
            parts.io.into_inner(),
            early,
            upstream.stream,
            &host,
            port,
        )
        .await;
    });
    Response::new(empty())
}

/// An absolute-form plain HTTP request: dial, send it in origin form with a
/// Host header naming the checked host, stream the answer back.
async fn forward(egress: Arc<Egress>, mut req: Request<Incoming>) -> Response<Body> {
    let uri = req.uri().clone();
    let (host, port) = match destination(req.method(), &uri) {
        Ok((_, host, port)) => (host, port),
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let upstream = match egress.open(Protocol::Http, &host, port).await {
        Ok(u) => u,
        Err(f) => return failure(f),
    };
    let origin: Uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *req.uri_mut() = origin;
    let headers = req.headers_mut();
    for h in [
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(h);
    }
    // The request goes to the host that was checked, and says so.
    match HeaderValue::from_str(&upstream.host.to_string()) {
        Ok(v) if port == 80 => headers.insert(header::HOST, v),
        _ => match HeaderValue::from_str(&format!("{}:{port}", upstream.host)) {
            Ok(v) => headers.insert(header::HOST, v),
            Err(_) => return text(StatusCode::BAD_REQUEST, "warden: bad host\n"),
        },
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream.stream)).await {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("warden: {e}\n")),
    };
    tokio::spawn(conn);
    match sender.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => text(StatusCode::BAD_GATEWAY, &format!("warden: the upstream failed: {e}\n")),
    }
}

/// The answer to a destination that could not be reached.
fn failure(f: Failure) -> Response<Body> {
    match f {
        Failure::Denied(d) => {
            let mut r = text(StatusCode::FORBIDDEN, &format!("warden: {}\n", d.message));
            r.headers_mut()
                .insert("x-warden-denied", HeaderValue::from_static(d.code));
            r
        }
        Failure::Unreachable(why) => text(StatusCode::BAD_GATEWAY, &format!("warden: {why}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// Answers a connection the proxy will not serve, without reading it.
async fn refuse_raw(mut stream: TcpStream, status: StatusCode, code: &str, body: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let reply = format!(
        "HTTP/1.1 {} {}\r\nx-warden-denied: {code}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len() + 1
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// A listener of a worker that has no service behind it (a gateway for a
/// worker that runs no Claude Code): every request is told so, in the
/// shape of an Anthropic API error.
pub async fn unavailable(stream: TcpStream) {
    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
        let body = r#"{"type":"error","error":{"type":"api_error","message":"warden: no API gateway is enabled for this worker (its profile runs no Claude Code)"}}"#;
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, Infallible>(r)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}
