//! The Anthropic API gateway of a Claude Code worker, on its own listener
//! in the worker's network namespace (127.0.0.1:4180 inside, the worker's
//! `ANTHROPIC_BASE_URL`).
//!
//! Owns: checking the worker's placeholder credential; the paths and
//! models a worker may use; the user's budgets; swapping the placeholder
//! for the user's real credential (which never leaves the daemon) and
//! forwarding over verified TLS to the upstream; streaming the answer back
//! as it arrives while reading its `usage`; and the `api_usage`,
//! `budget_exhausted` and (for refusals) `network_denial` events.
//!
//! Must never: send the real credential anywhere but the upstream, let a
//! response carry it back, forward a request it did not check, or buffer a
//! whole streamed answer; nor pass on what it cannot read (a body in a
//! content encoding: what it checks, meters and scrubs it reads in plain,
//! so it asks the upstream for `identity` and refuses anything else); nor
//! let a worker's hang-up take a request's cost out of the meter.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warden_policy::config::{Budget, Config, GatewayConfig};

use super::api_request::Head;
use crate::claude::prepare::{Credential, GatewaySetup};
use crate::events::{clip, millis, EventKind, Events, NetProtocol};
use crate::limits::Bucket;
use crate::usage::{Ledger, Tokens, Totals};

type Body = BoxBody<Bytes, hyper::Error>;

/// The client every gateway forwards with: system roots plus the
/// configured CA, the admin's `hosts` table in front of DNS, a pool of
/// kept-alive connections.
#[derive(Clone)]
pub struct Upstream {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector<HostsResolver>>, Full<Bytes>>,
    /// Certificate authorities trusted (0: every HTTPS upstream fails,
    /// with an error that says why).
    roots: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("Cannot read the gateway's extra CA file {path}")]
    ExtraCa {
        path: std::path::PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("The gateway's TLS settings are not supported")]
    Tls,
}

impl Upstream {
    pub fn new(config: &GatewayConfig, hosts: HashMap<String, IpAddr>) -> Result<Upstream, UpstreamError> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &config.extra_ca {
            let certs =
                rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|source| UpstreamError::ExtraCa {
                    path: path.clone(),
                    source,
                })?;
            for cert in certs {
                let cert = cert.map_err(|source| UpstreamError::ExtraCa {
                    path: path.clone(),
                    source,
                })?;
                let _ = roots.add(cert);
            }
        }
        let trusted = roots.len();
        if trusted == 0 {
            // A host without ca-certificates can still run every other
            // worker; HTTPS upstreams fail closed, saying why.
            tracing::warn!("{NO_ROOTS}");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|_| UpstreamError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new_with_resolver(HostsResolver(Arc::new(hosts)));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(15)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Upstream { client, roots: trusted })
    }
}

/// Why every HTTPS upstream fails on a host without trusted roots.
const NO_ROOTS: &str = "the API gateway trusts no certificate authority (no system roots: install \
                        ca-certificates, or set gateway.extra_ca): HTTPS upstreams will be refused";

/// Name resolution for the upstream: the admin's `hosts` table, then DNS.
#[derive(Debug, Clone)]
pub struct HostsResolver(Arc<HashMap<String, IpAddr>>);

impl tower::Service<Name> for HostsResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let hosts = self.0.clone();
        Box::pin(async move {
            let n = name.as_str().trim_end_matches('.').to_ascii_lowercase();
            if let Some(ip) = hosts.get(&n) {
                return Ok(vec![SocketAddr::new(*ip, 0)].into_iter());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((n.as_str(), 0)).await?.collect();
            Ok(addrs.into_iter())
        })
    }
}

/// The API a worker may call, and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
    /// Claude Code's connectivity check (`HEAD /api/hello`): answered here.
    Hello,
}

impl Endpoint {
    fn of(method: &Method, path: &str) -> Option<Endpoint> {
        match (method, path) {
            (&Method::POST, "/v1/messages") => Some(Endpoint::Messages),
            (&Method::POST, "/v1/messages/count_tokens") => Some(Endpoint::CountTokens),
            (&Method::HEAD | &Method::GET, "/api/hello") => Some(Endpoint::Hello),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Hello => "hello",
        }
    }
}

/// One worker's gateway.
pub struct Gateway {
    pub worker: String,
    pub user: String,
    pub profile: String,
    setup: GatewaySetup,
    upstream: Upstream,
    ledger: Arc<Ledger>,
    budget: Budget,
    count_cache_reads: bool,
    max_request_bytes: usize,
    events: Arc<Events>,
    denials: super::Denials,
    totals: Mutex<Totals>,
    slots: Arc<Semaphore>,
    /// Bytes of request bodies the worker's connections may have the
    /// gateway hold at once (see [`BODY_POOL`]).
    bodies: Arc<Semaphore>,
    body_wait: Duration,
    /// The worker's `api_usage` events (limited; requests are all counted).
    reported: Mutex<Bucket>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("worker", &self.worker)
            .field("setup", &self.setup)
            .finish_non_exhaustive()
    }
}

/// The headers a worker's request never carries upstream: credentials of
/// its own, hop-by-hop headers, and what the gateway sets itself.
const DROPPED: &[&str] = &[
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "proxy-connection",
    // The answer comes as the gateway asks (`identity`: it reads it).
    "accept-encoding",
];

/// The codings `headers` say their body is in beyond HTTP's own framing
/// (any content coding but `identity`, any transfer coding but `chunked`),
/// if any: such a body is not plain once hyper has taken the chunking off.
fn encoded(headers: &HeaderMap) -> Option<String> {
    let coding = [header::CONTENT_ENCODING, header::TRANSFER_ENCODING]
        .iter()
        .flat_map(|name| headers.get_all(name))
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .to_ascii_lowercase()
                .split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| !matches!(c.as_str(), "" | "identity" | "chunked"))
        .collect::<Vec<_>>();
    (!coding.is_empty()).then(|| coding.join(", "))
}

/// Bytes of request bodies one worker may have the gateway hold at once
/// (at least one body of `max_request_bytes`): each of its connections
/// could otherwise hold that much. A request waits for room, at most
/// [`BODY_WAIT`].
const BODY_POOL: usize = 64 << 20;
const BODY_WAIT: Duration = Duration::from_secs(30);

/// The beta flag the API wants with an OAuth token.
const OAUTH_BETA: &str = "oauth-2025-04-20";

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        worker: &str,
        user: &str,
        profile: &str,
        setup: GatewaySetup,
        upstream: Upstream,
        ledger: Arc<Ledger>,
        events: Arc<Events>,
        config: &Config,
    ) -> Self {
        let limits = &config.rate_limits;
        let max_connections = config.max_connections_per_worker as usize;
        let config = &config.gateway;
        Gateway {
            worker: worker.to_string(),
            user: user.to_string(),
            profile: profile.to_string(),
            setup,
            upstream,
            ledger,
            budget: config.budget_for(user),
            count_cache_reads: config.count_cache_reads,
            max_request_bytes: usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX),
            denials: super::Denials::new(worker, user, events.clone(), limits.worker_network_denials),
            reported: Mutex::new(Bucket::new(limits.worker_api_events)),
            events,
            totals: Mutex::default(),
            slots: Arc::new(Semaphore::new(max_connections)),
            bodies: Arc::new(Semaphore::new(
                BODY_POOL
                    .max(usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX))
                    .min(Semaphore::MAX_PERMITS),
            )),
            body_wait: BODY_WAIT,
        }
    }

    /// A smaller pool of request bytes and a shorter wait (for tests).
    #[cfg(test)]
    fn with_body_pool(mut self, bytes: usize, wait: Duration) -> Self {
        self.bodies = Arc::new(Semaphore::new(bytes));
        self.body_wait = wait;
        self
    }

    /// The worker's requests and tokens so far.
    pub fn totals(&self) -> Totals {
        *self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one connection of the worker's gateway listener.
    pub async fn serve(self: Arc<Self>, stream: TcpStream) {
        // A streamed event goes out as it comes, not after a delayed ACK.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.refuse(
                "-",
                "too-many-connections",
                "the worker has too many open connections to its gateway",
            );
            return;
        };
        // Shared with the connection's exchanges, which may outlive it.
        let slot = Arc::new(slot);
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (this, slot) = (this.clone(), slot.clone());
            async move { Ok::<_, Infallible>(this.handle(req, slot).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(super::proxy::MAX_HEAD)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>, slot: Arc<OwnedSemaphorePermit>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Some(endpoint) = Endpoint::of(req.method(), &path) else {
            let what = format!("{} {path}", req.method());
            self.refuse(&what, "path", &format!("{what} is not an API the gateway serves"));
            return error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!("warden: {what} is not an API this gateway serves (only POST /v1/messages and /v1/messages/count_tokens)"),
            );
        };
        if !self.authorized(req.headers()) {
            self.refuse(&path, "placeholder", "a request without this worker's credential");
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "warden: this gateway takes only the credential warden gave this worker",
            );
        }
        if endpoint == Endpoint::Hello {
            return Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
        }
        // Its model and budget are read from the body: in plain only.
        if let Some(coding) = encoded(req.headers()) {
            self.refuse(&path, "encoding", &format!("a request body in coding {coding}"));
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                &format!("warden: the gateway reads request bodies as they are; send this one without a content or transfer coding (not {coding})"),
            );
        }
        let (parts, body) = req.into_parts();
        // Held until the answer's head is back (the body has gone upstream).
        let (body, held) = match self.read_body(body).await {
            Ok(b) => b,
            Err(refused) => return refused,
        };
        let head: Head<'_> = match serde_json::from_slice(&body) {
            Ok(head) => head,
            Err(e) => {
                self.refuse(&path, "body", &format!("a request body the gateway cannot read: {e}"));
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("warden: the gateway reads what a request asks of the API (its model, tools, sources) from its JSON body and cannot read this one: {e}"),
                );
            }
        };
        let model = head.model.as_deref().unwrap_or("").to_string();
        let streamed = head.stream == Some(true);
        if let Some(models) = &self.setup.models {
            if !models.contains(&model) {
                self.refuse(
                    &path,
                    "model",
                    &format!("model {model:?} is not allowed by profile {}", self.profile),
                );
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!(
                        "warden: model {model:?} is not allowed by profile {} (allowed: {})",
                        self.profile,
                        models.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
        // Counting tokens, too: the API may have to fetch an image or list
        // an MCP server's tools to count them.
        if let Some(why) = head.outside_the_sandbox(&self.setup.server_tools, &self.profile) {
            self.refuse(&path, "server-tool", &why);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("warden: {why}"),
            );
        }
        let ticket = match self
            .ledger
            .admit(&self.user, &self.budget, self.count_cache_reads, SystemTime::now())
        {
            Ok(t) => t,
            Err(exhausted) => {
                self.refuse(&path, "budget", &exhausted.to_string());
                if exhausted.first {
                    self.events.publish(
                        Some(&self.worker),
                        Some(&self.user),
                        EventKind::BudgetExhausted {
                            budget: exhausted.budget.to_string(),
                            limit: exhausted.limit,
                            used: exhausted.used,
                            resets_at_ms: millis(exhausted.resets_at),
                        },
                    );
                }
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    &exhausted.to_string(),
                );
                let wait = exhausted
                    .resets_at
                    .duration_since(SystemTime::now())
                    .map_or(1, |d| d.as_secs().max(1));
                if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return r;
            }
        };
        let started = Instant::now();
        let upstream_req = match self.upstream_request(&parts, body) {
            Some(r) => r,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "warden: a request the gateway cannot forward",
                )
            }
        };
        let meter = Meter {
            gateway: self.clone(),
            endpoint,
            model,
            streamed,
            started,
            status: 0,
            usage: UsageReader::default(),
            _ticket: Some(ticket),
        };
        // The exchange is a task of its own: if the worker hangs up, it
        // still learns what the request cost (see [`Gateway::exchange`]).
        let (answer, head) = tokio::sync::oneshot::channel();
        let exchange = self.clone().exchange(upstream_req, meter, answer, held, slot);
        tokio::spawn(exchange);
        head.await.unwrap_or_else(|_| {
            error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "warden: the gateway lost this request's answer",
            )
        })
    }

    /// Sends one request upstream and its answer to `answer`, metered.
    /// `held` (the request body's bytes in the worker's pool) is let go
    /// once the answer's head is back; the connection's `_slot` is kept
    /// until the exchange ends (an orphaned exchange counts as a connection).
    ///
    /// A worker that hangs up does not take the cost of its request out of
    /// the meter: the exchange goes on reading until the upstream has said
    /// what the input cost (a stream's `message_start`, a whole answer's
    /// usage), at most [`ORPHAN_READ`], then lets the upstream go (which
    /// stops a stream's generation); a stream cut before its final usage
    /// has its output estimated from what it generated.
    async fn exchange(
        self: Arc<Self>,
        req: Request<Full<Bytes>>,
        mut meter: Meter,
        mut answer: tokio::sync::oneshot::Sender<Response<Body>>,
        held: Option<OwnedSemaphorePermit>,
        _slot: Arc<OwnedSemaphorePermit>,
    ) {
        let give_up = tokio::time::Instant::now() + ORPHAN_READ;
        let sent = tokio::select! {
            sent = self.upstream.client.request(req) => Some(sent),
            // Gone before the answer's head: wait for it, at most so long.
            () = async { answer.closed().await; tokio::time::sleep_until(give_up).await } => None,
        };
        drop(held);
        let resp = match sent {
            Some(Ok(resp)) => resp,
            Some(Err(e)) => {
                // Recorded with status 0: the request counts, nothing was used.
                drop(meter);
                tracing::warn!(worker = %self.worker, error = %e, "the API upstream failed");
                let message = if self.upstream.roots == 0 && self.setup.upstream.https {
                    format!("warden: {NO_ROOTS}")
                } else {
                    format!("warden: the API upstream {} did not answer", self.setup.upstream.text)
                };
                let _ = answer.send(error(StatusCode::BAD_GATEWAY, "api_error", &message));
                return;
            }
            None => return,
        };
        meter.status = resp.status().as_u16();
        let (head, relay) = self.respond(resp, meter).await;
        let gone = answer.send(head).is_err();
        if let Some((upstream, meter, to_worker)) = relay {
            relay_answer(upstream, meter, to_worker, gone, give_up).await;
        }
    }

    /// Reads a request body, taking its bytes from the worker's pool as
    /// they come; refuses one over `max_request_bytes` (413) or one that
    /// waited too long for room (503).
    async fn read_body(&self, mut body: Incoming) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Response<Body>> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!(
                    "warden: requests through this gateway are at most {} bytes",
                    self.max_request_bytes
                ),
            )
        };
        let deadline = tokio::time::Instant::now() + self.body_wait;
        let mut bytes = BytesMut::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "warden: the request body was cut short",
                ));
            };
            let Ok(data) = frame.into_data() else { continue };
            if bytes.len() + data.len() > self.max_request_bytes {
                return Err(too_large());
            }
            let n = u32::try_from(data.len()).map_err(|_| too_large())?;
            let more = tokio::time::timeout_at(deadline, self.bodies.clone().acquire_many_owned(n)).await;
            let Ok(Ok(more)) = more else {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded_error",
                    &format!(
                        "warden: this worker's requests hold {} bytes in the gateway, the most they may; try again",
                        self.bodies.available_permits() + bytes.len()
                    ),
                ));
            };
            match held.as_mut() {
                Some(h) => h.merge(more),
                None => held = Some(more),
            }
            bytes.extend_from_slice(&data);
        }
        Ok((bytes.freeze(), held))
    }

    /// Whether `headers` carry this worker's placeholder (and nothing else
    /// as a credential).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let want = self.setup.placeholder.as_bytes();
        let presented = headers.get("x-api-key").map(HeaderValue::as_bytes).or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        });
        presented.is_some_and(|p| constant_time_eq(p, want))
    }

    /// The request as it goes upstream: the worker's headers without any
    /// credential or hop-by-hop header, the user's real credential added.
    fn upstream_request(&self, parts: &http::request::Parts, body: Bytes) -> Option<Request<Full<Bytes>>> {
        let base = self.setup.upstream.text.trim_end_matches('/');
        let path = parts.uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(format!("{base}{path}"))
            .body(Full::new(body))
            .ok()?;
        let headers = req.headers_mut();
        for (name, value) in &parts.headers {
            if !DROPPED.contains(&name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let secret = |prefix: &str| HeaderValue::from_str(&format!("{prefix}{}", self.setup.credential.secret())).ok();
        match &self.setup.credential {
            Credential::ApiKey(_) => {
                let mut v = secret("")?;
                v.set_sensitive(true);
                headers.insert(HeaderName::from_static("x-api-key"), v);
            }
            Credential::AuthToken(_) | Credential::OAuthToken(_) => {
                let mut v = secret("Bearer ")?;
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
        }
        if let Credential::OAuthToken(_) = &self.setup.credential {
            let betas = headers
                .get("anthropic-beta")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if !betas.split(',').any(|b| b.trim() == OAUTH_BETA) {
                let all = if betas.is_empty() {
                    OAUTH_BETA.to_string()
                } else {
                    format!("{betas},{OAUTH_BETA}")
                };
                headers.insert("anthropic-beta", HeaderValue::from_str(&all).ok()?);
            }
        }
        Some(req)
    }

    /// The upstream's answer for the worker: a success streams through the
    /// meter as it arrives; an error is read whole (it is small) and any
    /// trace of the credential taken out.
    async fn respond(self: &Arc<Self>, resp: Response<Incoming>, meter: Meter) -> (Response<Body>, Option<Relay>) {
        let (mut parts, body) = resp.into_parts();
        // Asked for `identity`; an answer in another encoding could be
        // neither metered nor scrubbed, so none of it passes (the request
        // counts, with no tokens read).
        if let Some(coding) = encoded(&parts.headers) {
            drop(meter);
            self.refuse(
                "answer",
                "encoding",
                &format!("an answer of the API in coding {coding}"),
            );
            let refused = error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("warden: the API answered in coding {coding}, which the gateway does not pass on (it asks for none)"),
            );
            return (refused, None);
        }
        let secret = self.setup.credential.secret().to_string();
        let mut kept = HeaderMap::new();
        for (name, value) in &parts.headers {
            let hop = matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding" | "set-cookie"
            );
            if !hop && !String::from_utf8_lossy(value.as_bytes()).contains(&secret) {
                kept.append(name.clone(), value.clone());
            }
        }
        parts.headers = kept;
        if parts.status.is_success() {
            let (to_worker, from_upstream) = tokio::sync::mpsc::channel(RELAY_FRAMES);
            let relayed = Relayed(from_upstream);
            return (
                Response::from_parts(parts, relayed.boxed()),
                Some((body, meter, to_worker)),
            );
        }
        const MAX_ERROR: usize = 1 << 20;
        let bytes = Limited::new(body, MAX_ERROR)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        drop(meter);
        let text = String::from_utf8_lossy(&bytes).replace(&secret, "[credential removed by warden]");
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed();
        (Response::from_parts(parts, body), None)
    }

    /// Reports a refused request (rate-limited, like every denial).
    fn refuse(&self, what: &str, code: &'static str, message: &str) {
        self.denials.report(
            NetProtocol::Gateway,
            "api gateway",
            warden_policy::network::GATEWAY_PORT,
            code,
            &format!("{what}: {message}"),
        );
    }

    fn record(&self, m: &Meter) {
        let tokens = m.usage.tokens;
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).add(tokens);
        self.ledger.record(&self.user, &self.worker, tokens, SystemTime::now());
        if (200..300).contains(&m.status) {
            crate::metrics::global().api_request(&self.user, &m.model, tokens, &m.usage.server_tool_use);
        }
        // Every request counts above; its event is limited per worker.
        let admitted = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        let Some(suppressed) = admitted else { return };
        self.events.publish(
            Some(&self.worker),
            Some(&self.user),
            EventKind::ApiUsage {
                endpoint: m.endpoint.name().into(),
                model: clip(&m.model, 256),
                status: m.status,
                streamed: m.streamed,
                input_tokens: tokens.input,
                output_tokens: tokens.output,
                cache_creation_input_tokens: tokens.cache_creation,
                cache_read_input_tokens: tokens.cache_read,
                output_estimated: m.usage.estimated,
                server_tool_use: m.usage.server_tool_use.clone(),
                duration_ms: u64::try_from(m.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                suppressed,
            },
        );
    }
}

/// Equality that takes as long whatever the bytes are.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error of the gateway's own, in the shape the Anthropic API gives
/// them. None is worth retrying at once (a budget, a refusal, an upstream
/// the gateway could not reach), and Claude Code's client retries unless
/// told so: it is told.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-should-retry", HeaderValue::from_static("false"));
    r
}

/// One request's accounting, recorded when its answer ends (or is dropped).
struct Meter {
    gateway: Arc<Gateway>,
    endpoint: Endpoint,
    model: String,
    streamed: bool,
    started: Instant,
    status: u16,
    usage: UsageReader,
    _ticket: Option<crate::usage::Ticket>,
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.usage.finish();
        self.gateway.record(self);
    }
}

/// How long an exchange whose worker hung up goes on reading the answer
/// for its cost (a non-streamed answer can take minutes; a stream's
/// `message_start` comes in seconds).
const ORPHAN_READ: Duration = Duration::from_secs(600);

/// Frames of an answer on their way to the worker at once: the exchange
/// reads the upstream no faster than the worker reads it.
const RELAY_FRAMES: usize = 4;

type Frames = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>;

/// A successful answer's body, its meter, and the way to the worker.
type Relay = (Incoming, Meter, Frames);

/// An answer's body as the worker reads it: the frames its exchange
/// passes on.
struct Relayed(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>);

impl hyper::body::Body for Relayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// Passes an answer to the worker frame by frame while its usage is read
/// (`gone`: the worker hung up before its head). Once the worker has gone,
/// reads on only until the usage has said what the input cost, at most
/// until `give_up`; then lets the upstream go (a stream stops generating).
async fn relay_answer(
    mut upstream: Incoming,
    mut meter: Meter,
    to_worker: Frames,
    mut gone: bool,
    give_up: tokio::time::Instant,
) {
    loop {
        if gone && meter.usage.settled() {
            break;
        }
        let frame = if gone {
            match tokio::time::timeout_at(give_up, upstream.frame()).await {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                frame = upstream.frame() => frame,
                () = to_worker.closed() => {
                    gone = true;
                    continue;
                }
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                if !gone {
                    let _ = to_worker.send(Err(e)).await;
                }
                break;
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    meter.usage.feed(data);
                }
                if !gone && to_worker.send(Ok(frame)).await.is_err() {
                    gone = true;
                }
            }
        }
    }
    // The meter records as it goes (an estimate for a stream cut short).
    drop(meter);
}

/// Reads `usage` from an answer as it passes: SSE (`message_start`'s
/// message usage, then `message_delta`'s cumulative usage) or one JSON
/// message. Lines and JSON bodies past a bound are not parsed.
#[derive(Debug, Default)]
struct UsageReader {
    line: Vec<u8>,
    overlong: bool,
    whole: Vec<u8>,
    /// A JSON answer past [`MAX_USAGE_LINE`]: its usage cannot be read.
    whole_overflow: bool,
    sse: bool,
    tokens: Tokens,
    /// `message_start` seen: the input's counts are known.
    started: bool,
    /// The final usage seen (`message_delta`, or the JSON answer's).
    ended: bool,
    /// `content_block_delta` events seen, and the bytes of what they
    /// generated (text, thinking, tool input).
    deltas: u64,
    generated: u64,
    /// The output count is the gateway's estimate (a stream that ended
    /// before its final usage).
    estimated: bool,
    /// The API's own tools the request ran, as its usage counts them
    /// (`server_tool_use`: `web_search_requests`, ...): billed apart from
    /// tokens.
    server_tool_use: BTreeMap<String, u64>,
}

/// The kinds of `server_tool_use` counts an event carries at most.
const MAX_SERVER_TOOL_COUNTS: usize = 8;

/// Bytes of generated content per output token, for a stream cut before
/// its final usage: Claude's tokenizers average about 3.5 characters a
/// token in English and fewer in code, so 3 errs toward counting more.
const BYTES_PER_TOKEN: u64 = 3;

/// The longest SSE line (and the largest JSON answer) read for usage.
const MAX_USAGE_LINE: usize = 4 << 20;

impl UsageReader {
    fn feed(&mut self, data: &[u8]) {
        if !self.sse && self.whole.is_empty() && data.starts_with(b"event:") {
            self.sse = true;
        }
        if !self.sse {
            if self.whole.len() + data.len() <= MAX_USAGE_LINE {
                self.whole.extend_from_slice(data);
            } else {
                self.whole_overflow = true;
            }
            // An SSE stream may start with a data line or a comment.
            if self.whole.starts_with(b"data:") || self.whole.starts_with(b":") {
                self.sse = true;
                let whole = std::mem::take(&mut self.whole);
                self.feed(&whole);
            }
            return;
        }
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            if self.overlong {
                self.overlong = !chunk.ends_with(b"\n");
                continue;
            }
            self.line.extend_from_slice(chunk);
            if self.line.len() > MAX_USAGE_LINE {
                self.line.clear();
                self.overlong = !chunk.ends_with(b"\n");
                continue;
            }
            if chunk.ends_with(b"\n") {
                let line = std::mem::take(&mut self.line);
                if let Some(json) = line.strip_prefix(b"data:") {
                    if let Ok(v) = serde_json::from_slice::<Value>(json.trim_ascii()) {
                        match v["type"].as_str() {
                            Some("message_start") => {
                                self.take(&v["message"]["usage"]);
                                self.started = true;
                            }
                            Some("message_delta") => {
                                self.take(&v["usage"]);
                                self.ended = true;
                            }
                            Some("content_block_delta") => {
                                self.deltas += 1;
                                let delta = &v["delta"];
                                for key in ["text", "thinking", "partial_json"] {
                                    let n = delta[key].as_str().map_or(0, str::len);
                                    self.generated += n as u64;
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    /// At the end of an answer: a non-streamed one's `usage`; for a stream
    /// cut before its final usage (the worker went, the upstream broke
    /// off), an estimate of its output from what it generated, at least
    /// one token a delta and never less than the upstream said so far.
    fn finish(&mut self) {
        if !self.sse && !self.whole.is_empty() && !self.ended {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.whole) {
                self.take(&v["usage"]);
                self.ended = true;
            }
        }
        if self.sse && self.started && !self.ended && !self.estimated {
            let estimate = self.deltas.max(self.generated.div_ceil(BYTES_PER_TOKEN));
            self.tokens.output = self.tokens.output.max(estimate);
            self.estimated = true;
        }
    }

    /// Whether the upstream has said what the input cost (a stream's
    /// `message_start`, or a whole answer's usage), or never will (a JSON
    /// answer too large to read): past that, an answer nobody reads is
    /// not worth reading further.
    fn settled(&self) -> bool {
        self.ended || (self.sse && self.started) || self.whole_overflow
    }

    /// Takes the counts a usage object has (later ones are cumulative).
    fn take(&mut self, u: &Value) {
        let set = |key: &str, slot: &mut u64| {
            if let Some(n) = u[key].as_u64() {
                *slot = n;
            }
        };
        set("input_tokens", &mut self.tokens.input);
        set("output_tokens", &mut self.tokens.output);
        set("cache_creation_input_tokens", &mut self.tokens.cache_creation);
        set("cache_read_input_tokens", &mut self.tokens.cache_read);
        for (kind, n) in u["server_tool_use"].as_object().into_iter().flatten() {
            let Some(n) = n.as_u64() else { continue };
            let kind = clip(kind, 64);
            if self.server_tool_use.len() < MAX_SERVER_TOOL_COUNTS || self.server_tool_use.contains_key(&kind) {
                self.server_tool_use.insert(kind, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_sse_across_chunks_and_from_json() {
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":7}}}\n\n\
                   event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42,\"server_tool_use\":{\"web_search_requests\":2}}}\n\n";
        let mut r = UsageReader::default();
        for piece in sse.as_bytes().chunks(7) {
            r.feed(piece);
        }
        r.finish();
        assert_eq!(
            r.tokens,
            Tokens {
                input: 10,
                output: 42,
                cache_creation: 3,
                cache_read: 7
            }
        );
        let mut j = UsageReader::default();
        j.feed(br#"{"type":"message","usage":{"input_tokens":5,"#);
        j.feed(br#""output_tokens":6,"server_tool_use":{"web_fetch_requests":1,"web_search_requests":"x"}}}"#);
        j.finish();
        assert_eq!((j.tokens.input, j.tokens.output), (5, 6));
        assert!(!j.estimated && !r.estimated);
        // The API's own tools the request ran, billed apart from tokens.
        assert_eq!(
            r.server_tool_use,
            BTreeMap::from([("web_search_requests".to_string(), 2)])
        );
        assert_eq!(
            j.server_tool_use,
            BTreeMap::from([("web_fetch_requests".to_string(), 1)])
        );
        let mut many = UsageReader::default();
        let kinds: Vec<String> = (0..20).map(|i| format!("\"k{i:02}\":{i}")).collect();
        many.feed(
            format!(
                r#"{{"usage":{{"input_tokens":1,"server_tool_use":{{{}}}}}}}"#,
                kinds.join(",")
            )
            .as_bytes(),
        );
        many.finish();
        assert_eq!(many.server_tool_use.len(), MAX_SERVER_TOOL_COUNTS);
    }

    /// A stream cut before its final usage: its output is estimated from
    /// what it generated (text, thinking, tool input: 3 bytes a token, at
    /// least one a delta), never below what the upstream said so far; the
    /// input it said is kept.
    #[test]
    fn the_output_of_a_stream_cut_short_is_estimated_from_what_it_generated() {
        let start =
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n";
        let delta = |kind: &str, key: &str, text: &str| {
            format!(
                "data: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"{kind}\",\"{key}\":\"{text}\"}}}}\n\n"
            )
        };
        let mut r = UsageReader::default();
        r.feed(start.as_bytes());
        assert!(r.settled(), "the input is known at the start");
        r.feed(delta("text_delta", "text", &"a".repeat(30)).as_bytes());
        r.feed(delta("thinking_delta", "thinking", &"b".repeat(31)).as_bytes());
        r.feed(delta("input_json_delta", "partial_json", "{}").as_bytes());
        r.feed(delta("signature_delta", "signature", &"c".repeat(300)).as_bytes());
        r.finish();
        // 63 bytes: 21 tokens, more than the 4 deltas.
        assert_eq!((r.tokens.input, r.tokens.output, r.estimated), (10, 21, true));
        // Short deltas: one token each at least.
        let mut r = UsageReader::default();
        r.feed(start.as_bytes());
        (0..5).for_each(|_| r.feed(delta("text_delta", "text", "a").as_bytes()));
        r.finish();
        assert_eq!((r.tokens.output, r.estimated), (5, true));
        // Cut before its start: nothing is known, nothing estimated; a JSON
        // answer is settled only when whole.
        let mut r = UsageReader::default();
        r.feed(b"event: ping\n");
        assert!(!r.settled());
        r.finish();
        assert_eq!((r.tokens.output, r.estimated), (0, false));
        let mut j = UsageReader::default();
        j.feed(br#"{"type":"message","#);
        assert!(!j.settled());
        j.feed(br#""usage":{"input_tokens":5,"output_tokens":6}}"#);
        j.finish();
        assert!(j.settled() && !j.estimated);
    }

    #[test]
    fn only_the_claude_code_api_is_served() {
        assert_eq!(Endpoint::of(&Method::POST, "/v1/messages"), Some(Endpoint::Messages));
        assert_eq!(
            Endpoint::of(&Method::POST, "/v1/messages/count_tokens"),
            Some(Endpoint::CountTokens)
        );
        assert_eq!(Endpoint::of(&Method::HEAD, "/api/hello"), Some(Endpoint::Hello));
        for (m, p) in [
            (Method::GET, "/v1/models"),
            (Method::POST, "/v1/files"),
            (Method::GET, "/v1/messages"),
            (Method::POST, "/v1/messages/batches"),
            (Method::POST, "/api/oauth/token"),
        ] {
            assert_eq!(Endpoint::of(&m, p), None, "{m} {p}");
        }
        assert!(constant_time_eq(b"warden-1", b"warden-1"));
        assert!(!constant_time_eq(b"warden-1", b"warden-2"));
        assert!(!constant_time_eq(b"warden-1", b"warden-12"));
    }
}

#[cfg(test)]
mod upstream_tests {
    //! The gateway between a raw client and a loopback upstream that
    //! misbehaves: it echoes the credential it got in an error answer.
    use super::*;
    use std::collections::BTreeSet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warden_policy::ServerTool;

    /// An upstream that answers every request with a 400 whose body and
    /// headers repeat the request's credential.
    async fn echoing_upstream() -> u16 {
        let (port, _) = scripted_upstream(|head| {
            let key = head.lines().find_map(|l| l.strip_prefix("x-api-key: ")).unwrap_or("");
            let body = format!("{{\"type\":\"error\",\"error\":{{\"type\":\"invalid_request_error\",\"message\":\"bad key {key}\"}}}}");
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-echo: {key}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        })
        .await;
        port
    }

    /// An upstream on loopback that reads each request's head and hands
    /// it, with the connection, to `answer`.
    async fn upstream<F, A>(answer: F) -> u16
    where
        F: Fn(String, TcpStream) -> A + Send + Sync + 'static,
        A: Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    if let Some(head) = super::super::tests::request_head(&mut s).await {
                        answer(String::from_utf8_lossy(&head).to_string(), s).await;
                    }
                });
            }
        });
        port
    }

    /// An upstream that answers every request with `reply` of its head and
    /// keeps each head (lowercase).
    async fn scripted_upstream(
        reply: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> (u16, Arc<Mutex<Vec<String>>>) {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        let port = upstream(move |head, mut s| {
            let answer = reply(&head);
            kept.lock().unwrap().push(head.to_ascii_lowercase());
            async move {
                let _ = s.write_all(answer.as_bytes()).await;
            }
        })
        .await;
        (port, heads)
    }

    /// Worker w1's gateway (user alice, an API key) in front of the
    /// upstream on `port`, as `adjust` leaves it, served on loopback.
    async fn serve_gateway(
        port: u16,
        config: &Config,
        dir: &std::path::Path,
        adjust: impl FnOnce(Gateway) -> Gateway,
    ) -> (Arc<Gateway>, SocketAddr) {
        let (events, _) = Events::open(crate::events::Settings::at(&dir.join("audit.jsonl"))).unwrap();
        let setup = GatewaySetup {
            credential: Credential::ApiKey("sk-real-secret".into()),
            placeholder: "warden-test".into(),
            upstream: warden_policy::HttpUrl::try_from(format!("http://127.0.0.1:{port}")).unwrap(),
            models: None,
            server_tools: BTreeSet::new(),
        };
        let gateway = Arc::new(adjust(Gateway::new(
            "w1",
            "alice",
            "p",
            setup,
            Upstream::new(&config.gateway, HashMap::new()).unwrap(),
            Arc::new(Ledger::open(&dir.join("usage.json"))),
            Arc::new(events),
            config,
        )));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let served = gateway.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(served.clone().serve(s));
            }
        });
        (gateway, addr)
    }

    /// A request of the worker's: `extra` headers (each ending in CRLF)
    /// and `body`.
    fn post(extra: &str, body: &str) -> String {
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: warden-test\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// The gateway's answer to one request of `extra` headers and a small
    /// body.
    async fn ask(addr: SocketAddr, extra: &str) -> String {
        send(addr, &post(extra, r#"{"model":"m","max_tokens":1,"messages":[]}"#)).await
    }

    /// The gateway's whole answer to `request`, sent as it is.
    async fn send(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// What `pick` takes of each event in the log so far.
    fn events_of<T>(g: &Gateway, mut pick: impl FnMut(&EventKind) -> Option<T>) -> Vec<T> {
        g.events.flush();
        let mut found = Vec::new();
        g.events.replay(1, |e| {
            found.extend(pick(&e.kind));
            true
        });
        found
    }

    /// The `network_denial` events of reason `reason` in the log so far.
    fn denials(g: &Gateway, reason: &str) -> Vec<String> {
        events_of(g, |kind| match kind {
            EventKind::NetworkDenial { reason: r, message, .. } if r == reason => Some(message.clone()),
            _ => None,
        })
    }

    /// What a paced upstream did: the parts it wrote, and whether its
    /// client (the gateway) let it go before the last.
    #[derive(Debug, Default)]
    struct Paced {
        written: usize,
        let_go: bool,
    }

    /// An upstream that answers every request with `parts`, each after its
    /// pause, and notices when the gateway hangs up on it.
    async fn paced_upstream(parts: Vec<(u64, String)>) -> (u16, Arc<Mutex<Paced>>) {
        let seen = Arc::new(Mutex::new(Paced::default()));
        let (kept, parts) = (seen.clone(), Arc::new(parts));
        let port = upstream(move |_, mut s| {
            let (kept, parts) = (kept.clone(), parts.clone());
            async move {
                for (pause, part) in parts.iter() {
                    // The pause is also a look for the gateway's hang-up.
                    let mut b = [0u8; 1024];
                    let heard = tokio::time::timeout(Duration::from_millis(*pause), s.read(&mut b)).await;
                    if matches!(heard, Ok(Ok(0) | Err(_))) || s.write_all(part.as_bytes()).await.is_err() {
                        kept.lock().unwrap().let_go = true;
                        return;
                    }
                    kept.lock().unwrap().written += 1;
                }
            }
        })
        .await;
        (port, seen)
    }

    /// Waits until `done` (looked at every 10 ms, at most 5 s), or fails
    /// saying `what` did not happen.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let wait = async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("{what}"));
    }

    /// What the paced upstream did, once it has noticed the gateway let it
    /// go or has written all its `parts`.
    async fn let_go(upstream: &Mutex<Paced>, parts: usize) -> Paced {
        until("the upstream ended", || {
            let p = upstream.lock().unwrap();
            p.let_go || p.written == parts
        })
        .await;
        std::mem::take(&mut *upstream.lock().unwrap())
    }

    /// The `api_usage` events so far: (input, output, whether estimated).
    fn usage_events(g: &Gateway) -> Vec<(u64, u64, bool)> {
        events_of(g, |kind| match kind {
            EventKind::ApiUsage {
                input_tokens,
                output_tokens,
                output_estimated,
                ..
            } => Some((*input_tokens, *output_tokens, *output_estimated)),
            _ => None,
        })
    }

    /// The gateway's totals once it has recorded `n` requests.
    async fn recorded(g: &Gateway, n: u64) -> Totals {
        until("the request was recorded", || g.totals().requests >= n).await;
        g.totals()
    }

    /// A worker that hangs up does not take its request's cost out of the
    /// meter (and so out of its user's budget): before the answer's head,
    /// the gateway reads on until the upstream says what the input cost,
    /// then lets the upstream go; in the middle of a stream, it lets the
    /// upstream go at once (generation stops) and counts the output from
    /// what was generated; a non-streamed answer is read to its usage.
    #[tokio::test]
    async fn a_worker_that_hangs_up_still_pays_for_its_request() {
        let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
        let start = chunk("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9000,\"output_tokens\":1}}}\n\n");
        // 30 bytes of text each.
        let delta = chunk("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"012345678901234567890123456789\"}}\n\n");
        let mut stream = vec![(0, sse_head.to_string()), (0, start.clone())];
        stream.extend((0..200).map(|_| (20, delta.clone())));
        let config = warden_policy::config::Config::embedded();

        // Mid-stream: the worker reads the start and some text, then goes.
        let (port, upstream) = paced_upstream(stream.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let request = post("", r#"{"model":"m","max_tokens":9000,"stream":true,"messages":[]}"#);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while got.windows(11).filter(|w| w == b"text_delta\"").count() < 5 {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "the answer ended early");
            got.extend_from_slice(&b[..n]);
        }
        drop(s);
        let read = got.windows(11).filter(|w| w == b"text_delta\"").count() as u64;
        let totals = recorded(&gateway, 1).await;
        assert_eq!(totals.tokens.input, 9000);
        // At least the deltas the worker read (30 bytes, 10 tokens each),
        // and far from the 200 never generated.
        let out = totals.tokens.output;
        assert!(
            out >= 10 * read && out < 1000,
            "estimated output {out} after {read} deltas read"
        );
        assert_eq!(usage_events(&gateway), [(9000, out, true)]);
        let paced = let_go(&upstream, stream.len()).await;
        assert!(
            paced.let_go && paced.written < 100,
            "the upstream was let go: {paced:?}"
        );

        // Before the head: the worker sends and goes at once; the gateway
        // reads to the stream's start and lets it go there.
        let mut late = stream.clone();
        late[0].0 = 300;
        let (port, upstream) = paced_upstream(late).await;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        let totals = recorded(&gateway, 1).await;
        assert_eq!(totals.tokens.input, 9000);
        let events = usage_events(&gateway);
        assert_eq!(events.len(), 1);
        assert!(events[0].1 <= 10 && events[0].2, "{events:?}");
        let paced = let_go(&upstream, stream.len()).await;
        assert!(paced.let_go && paced.written < 20, "the upstream was let go: {paced:?}");

        // Not streamed: the answer is read for its usage, exactly.
        let usage = r#"{"type":"message","usage":{"input_tokens":700,"output_tokens":80}}"#;
        let whole = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{usage}",
            usage.len()
        );
        let (port, _) = paced_upstream(vec![(300, whole)]).await;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let request = post("", r#"{"model":"m","max_tokens":9000,"messages":[]}"#);
        s.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        let totals = recorded(&gateway, 1).await;
        assert_eq!((totals.tokens.input, totals.tokens.output), (700, 80));
        assert_eq!(usage_events(&gateway), [(700, 80, false)]);
    }

    /// The API's own tools (a search, a fetch, an MCP server, code, another
    /// model) run outside the sandbox and its network rules: a request for
    /// an answer or a count that lists one its profile does not allow, a
    /// tool type warden does not know, or a block whose source is a URL
    /// (the API fetches it: `web_fetch`), never reaches the upstream (400,
    /// a `network_denial` `server-tool`); the client's own tools pass. A
    /// body the gateway cannot read as the API would (not a JSON object, a
    /// field twice) is refused (`body`) rather than guessed at.
    #[tokio::test]
    async fn the_apis_own_tools_run_only_where_the_profile_allows_them() {
        let ok =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        let (port, heads) = scripted_upstream(move |_| ok.to_string()).await;
        let config = Config::embedded();
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let body = |more: &str| format!(r#"{{"model":"m","max_tokens":1,"messages":[],{more}}}"#);

        // Claude Code's own tools, and the client tools Anthropic defines.
        let client = body(
            r#""tools":[{"name":"Bash","input_schema":{}},{"type":"custom","name":"x","input_schema":{}},{"type":"text_editor_20250728","name":"str_replace_based_edit_tool"},{"type":"memory_20250818","name":"memory"},{"type":"bash_20250124","name":"bash"}],"mcp_servers":[]"#,
        );
        let answer = send(addr, &post("", &client)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let server = [
            (
                r#""tools":[{"type":"web_search_20250305","name":"web_search","max_uses":8}]"#,
                "web_search",
            ),
            (
                r#""tools":[{"name":"Bash","input_schema":{}},{"type":"web_fetch_20250910","name":"web_fetch"}]"#,
                "web_fetch",
            ),
            (
                r#""tools":[{"type":"code_execution_20250825","name":"code_execution"}]"#,
                "code_execution",
            ),
            (
                r#""tools":[{"type":"tool_search_tool_regex_20251119","name":"tool_search_tool_regex"}]"#,
                "tool_search",
            ),
            (
                r#""tools":[{"type":"tool_search_tool_bm25","name":"tool_search_tool_bm25"}]"#,
                "tool_search",
            ),
            (r#""tools":[{"type":"advisor_20260301","name":"advisor"}]"#, "advisor"),
            (
                r#""mcp_servers":[{"type":"url","url":"https://exfil.example/","name":"x"}]"#,
                "mcp",
            ),
            (r#""tools":[{"type":"mcp_toolset","mcp_server_name":"x"}]"#, "mcp"),
            // Spelled with an escape, as the API reads it all the same.
            (
                r#""tools":[{"t\u0079pe":"web_search_20250305","name":"web_search"}]"#,
                "web_search",
            ),
        ];
        for (more, tool) in server {
            let answer = send(addr, &post("", &body(more))).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{more}: {answer}");
            assert!(
                answer.contains(&format!("its own tool {tool} ")) && answer.contains("server_tools: none"),
                "{more}: {answer}"
            );
        }
        let unknown = body(r#""tools":[{"type":"browser_20270101","name":"b"}]"#);
        let answer = send(addr, &post("", &unknown)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400")
                && answer.contains(r#"\"browser_20270101\", which warden does not know"#),
            "{answer}"
        );

        // Read as the API might read it otherwise: refused, not guessed at.
        let unreadable = [
            r#"{"model":"m","tools":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
            r#"{"model":"m","tools":[{"type":"custom","type":"web_search_20250305","name":"w"}]}"#,
            r#"{"model":"m","tools":{"type":"web_search_20250305"}}"#,
            r#"["model","m"]"#,
            "not json",
        ];
        for bad in unreadable {
            let answer = send(addr, &post("", bad)).await;
            assert!(
                answer.starts_with("HTTP/1.1 400") && answer.contains("cannot read this one"),
                "{bad}: {answer}"
            );
        }

        // A URL the API would fetch to read a block, for an answer or a count.
        let image = r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://exfil.example/?d=1"}}]}]}"#;
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let answer = send(addr, &post("", image).replacen("/v1/messages", path, 1)).await;
            assert!(
                answer.starts_with("HTTP/1.1 400")
                    && answer.contains("its own tool web_fetch (a block whose source is the URL"),
                "{path}: {answer}"
            );
        }
        let count = post("", &body(server[0].0)).replacen("/v1/messages", "/v1/messages/count_tokens", 1);
        let answer = send(addr, &count).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let count = post("", &client).replacen("/v1/messages", "/v1/messages/count_tokens", 1);
        let answer = send(addr, &count).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let went: Vec<String> = heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.lines().next().unwrap_or("").to_string())
            .collect();
        assert_eq!(
            went,
            ["post /v1/messages http/1.1", "post /v1/messages/count_tokens http/1.1"]
        );
        let refused = denials(&gateway, "server-tool");
        assert_eq!(refused.len(), server.len() + 4, "{refused:?}");
        assert!(refused[0].contains("web_search (web_search_20250305)"), "{refused:?}");
        assert!(refused[6].contains("mcp (mcp_servers)"), "{refused:?}");
        assert_eq!(denials(&gateway, "body").len(), unreadable.len());
        assert_eq!(gateway.totals().requests, 2);

        // A profile that allows web search forwards it, and nothing else.
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |mut g| {
            g.setup.server_tools = BTreeSet::from([ServerTool::WebSearch]);
            g
        })
        .await;
        let answer = send(addr, &post("", &body(server[0].0))).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let both = body(
            r#""tools":[{"type":"web_search_20250305","name":"web_search"},{"type":"web_fetch_20250910","name":"web_fetch"}]"#,
        );
        let answer = send(addr, &post("", &both)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400")
                && answer.contains("its own tool web_fetch ")
                && answer.contains("server_tools: web_search)"),
            "{answer}"
        );
        assert_eq!(heads.lock().unwrap().len(), 3);
        assert_eq!(denials(&gateway, "server-tool").len(), 1);
    }

    /// What the gateway checks, meters and scrubs it reads in plain: it
    /// asks the upstream for `identity` whatever the worker accepts,
    /// refuses a request body in a content encoding (415), and passes on
    /// nothing of an answer in one (502); each refusal a `network_denial`.
    #[tokio::test]
    async fn what_the_gateway_reads_it_reads_in_plain() {
        let usage = r#"{"type":"message","usage":{"input_tokens":5,"output_tokens":6}}"#;
        let reply = move |coding: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{coding}content-length: {}\r\nconnection: close\r\n\r\n{usage}",
                usage.len()
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let config = warden_policy::config::Config::embedded();
        let (port, heads) = scripted_upstream(move |_| reply("")).await;
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;

        // Claude Code's HTTP client accepts gzip and brotli: the upstream
        // is asked for neither, and the answer is metered.
        let answer = ask(addr, "accept-encoding: gzip, deflate, br\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let head = heads.lock().unwrap()[0].clone();
        assert!(head.contains("accept-encoding: identity\r\n"), "{head}");
        assert!(!head.contains("gzip") && !head.contains("br\r\n"), "{head}");
        until("the answer was metered", || gateway.totals().tokens.output == 6).await;
        assert_eq!(gateway.totals().tokens.input, 5);

        // A request body in gzip: refused before anything goes upstream.
        let answer = ask(addr, "content-encoding: gzip\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
        assert!(
            answer.contains("without a content or transfer coding (not gzip)"),
            "{answer}"
        );
        // And in gzip under the chunking, which hyper takes off and
        // leaves the gzip: refused the same way.
        let body = r#"{"model":"m","max_tokens":1,"messages":[]}"#;
        let answer = send(
            addr,
            &format!(
                "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: warden-test\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
        assert!(answer.contains("(not gzip)"), "{answer}");
        assert_eq!(heads.lock().unwrap().len(), 1, "the request went upstream");
        assert_eq!(
            denials(&gateway, "encoding"),
            [
                "/v1/messages: a request body in coding gzip",
                "/v1/messages: a request body in coding gzip"
            ]
        );

        // An upstream that answers in gzip all the same: none of it passes.
        let (port, _) = scripted_upstream(move |_| reply("content-encoding: gzip\r\n")).await;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let answer = ask(addr, "").await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(!answer.contains("input_tokens"), "{answer}");
        assert!(!answer.to_ascii_lowercase().contains("content-encoding"), "{answer}");
        assert_eq!(
            denials(&gateway, "encoding"),
            ["answer: an answer of the API in coding gzip"]
        );

        // Or in a transfer coding under the chunking.
        let chunked = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: br, chunked\r\nconnection: close\r\n\r\n{:x}\r\n{usage}\r\n0\r\n\r\n",
            usage.len()
        );
        let (port, _) = scripted_upstream(move |_| chunked.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let answer = ask(addr, "").await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(!answer.contains("input_tokens"), "{answer}");
        assert_eq!(
            denials(&gateway, "encoding"),
            ["answer: an answer of the API in coding br"]
        );
    }

    #[tokio::test]
    async fn an_upstream_error_never_carries_the_credential_back() {
        let port = echoing_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let config = warden_policy::config::Config::embedded();
        let (_, addr) = serve_gateway(port, &config, dir.path(), |g| g).await;
        let answer = ask(addr, "").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(!answer.contains("sk-real-secret"), "{answer}");
        assert!(answer.contains("bad key [credential removed by warden]"), "{answer}");
        assert!(!answer.to_ascii_lowercase().contains("x-echo"), "{answer}");
    }

    #[tokio::test]
    async fn request_bodies_held_at_once_are_bounded_per_worker() {
        let port = echoing_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = warden_policy::config::Config::embedded();
        config.gateway.max_request_bytes = 2 << 20;
        let (gateway, addr) = serve_gateway(port, &config, dir.path(), |g| {
            g.with_body_pool(3 << 20, Duration::from_millis(300))
        })
        .await;
        let head = |len: usize| {
            format!("POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: warden-test\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
        };
        let body = |len: usize| {
            let mut b = br#"{"model":"m","messages":[],"pad":""#.to_vec();
            b.resize(len - 2, b'x');
            b.extend_from_slice(b"\"}");
            b
        };
        // One request stalls with 1.5 MiB of its 2 MiB sent.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(head(2 << 20).as_bytes()).await.unwrap();
        stalled.write_all(&body(2 << 20)[..3 << 19]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(gateway.bodies.available_permits(), (3 << 20) - (3 << 19));
        // Another of 2 MiB does not fit beside it: 503 after the wait.
        let send = |len: usize| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head(len).as_bytes()).await.unwrap();
            let _ = s.write_all(&body(len)).await;
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer).await;
            answer
        };
        let answer = send(2 << 20).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("overloaded_error"), "{answer}");
        // A small one still fits.
        assert!(send(1000).await.starts_with("HTTP/1.1 400"));
        // Once the stalled one goes, the pool is whole again.
        drop(stalled);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(gateway.bodies.available_permits(), 3 << 20);
        assert!(send(2 << 20).await.starts_with("HTTP/1.1 400"));
    }
}
