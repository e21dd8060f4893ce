//! A worker's way out: wardend's proxy on listeners that live in the
//! worker's own network namespace.
//!
//! Owns: for each `proxy` worker, the listeners `warden-launch` made on the
//! worker's loopback and handed over (accepted here, in the host's
//! namespace, so every connection belongs to that worker by the listener
//! it arrived on); the one decision for every destination ([`Egress::open`]:
//! canonical name, the profile's allow/deny lists, resolution in the
//! daemon, internal addresses refused, then a dial of exactly the checked
//! address); in-band refusals and `network_denial` events (rate-limited
//! per worker, with suppressed counts); and the worker's traffic counters.
//!
//! Must never: dial an address it did not check, let a connection of one
//! worker count as another's, or let one worker hold more than its share
//! of connections.

pub mod api_request;
pub mod gateway;
pub mod proxy;
pub mod resolve;
pub mod sni;
pub mod socks;
#[cfg(test)]
mod tests;
pub mod tunnel;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warden_policy::config::Config;
use warden_policy::{Host, ListenerKind, NetworkPolicy};

pub use crate::events::NetProtocol as Protocol;
use crate::events::{EventKind, Events, NetUsage};
use crate::limits::Bucket;
use resolve::{ResolveError, Resolver};

/// A refused destination: what the worker is told, and the event's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Short and stable: `not-allowed`, `deny-list`, `port`, `bad-host`,
    /// `internal-address`, `sni-mismatch`, `too-many-connections`, `offline`.
    pub code: &'static str,
    pub message: String,
}

/// Why a destination could not be reached.
#[derive(Debug)]
pub enum Failure {
    /// The policy refuses it (403, SOCKS "not allowed by ruleset").
    Denied(Denial),
    /// It is allowed but did not answer (502, SOCKS "host unreachable").
    Unreachable(String),
}

/// A worker's `network_denial` events: rate-limited (a burst, then a
/// refill), each report counting those suppressed since the last; logged
/// as often as reported, so a flood costs no more log lines.
#[derive(Debug)]
pub struct Denials {
    worker: String,
    user: String,
    events: Arc<Events>,
    limit: Mutex<Bucket>,
}

impl Denials {
    pub fn new(worker: &str, user: &str, events: Arc<Events>, rate: warden_policy::Rate) -> Self {
        Denials {
            worker: worker.to_string(),
            user: user.to_string(),
            events,
            limit: Mutex::new(Bucket::new(rate)),
        }
    }

    pub fn report(&self, protocol: Protocol, host: &str, port: u16, code: &'static str, message: &str) {
        let admitted = self
            .limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            tracing::info!(worker = %self.worker, ?protocol, host, port, reason = code, suppressed, "network denial");
            self.events.publish(
                Some(&self.worker),
                Some(&self.user),
                EventKind::NetworkDenial {
                    host: host.to_string(),
                    port,
                    protocol,
                    reason: code.to_string(),
                    message: message.to_string(),
                    suppressed,
                },
            );
        }
    }
}

/// One worker's egress: its policy, the resolver, its counters, its share
/// of connections and its denial reports.
#[derive(Debug)]
pub struct Egress {
    pub worker: String,
    pub user: String,
    pub profile: String,
    pub policy: NetworkPolicy,
    resolver: Arc<Resolver>,
    denials: Denials,
    usage: Mutex<NetUsage>,
    slots: Arc<Semaphore>,
    /// Name lookups of this worker at once.
    lookups: Semaphore,
}

/// Name lookups one worker may have under way at once; its further
/// connections wait for one (all workers share the resolver's own bound).
const LOOKUPS_PER_WORKER: usize = 4;

/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Egress {
    pub fn new(
        worker: &str,
        user: &str,
        profile: &str,
        policy: NetworkPolicy,
        resolver: Arc<Resolver>,
        events: Arc<Events>,
        config: &Config,
    ) -> Self {
        Egress {
            worker: worker.to_string(),
            user: user.to_string(),
            profile: profile.to_string(),
            policy,
            resolver,
            denials: Denials::new(worker, user, events, config.rate_limits.worker_network_denials),
            usage: Mutex::default(),
            slots: Arc::new(Semaphore::new(config.max_connections_per_worker as usize)),
            lookups: Semaphore::new(LOOKUPS_PER_WORKER),
        }
    }

    /// A connection slot of this worker, or a refusal when it already holds
    /// as many connections as it may.
    pub fn slot(&self, protocol: Protocol) -> Result<OwnedSemaphorePermit, Denial> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            self.refuse(
                protocol,
                "-",
                0,
                "too-many-connections",
                format!("worker {} has too many open connections", self.worker),
            )
        })
    }

    /// Decides `raw_host`:`port` and dials it: the one path every protocol
    /// takes out of the worker.
    pub async fn open(self: &Arc<Self>, protocol: Protocol, raw_host: &str, port: u16) -> Result<Upstream, Failure> {
        let host = Host::parse(raw_host).map_err(|why| {
            let r = warden_policy::network::Refusal::BadHost {
                host: format!("{raw_host:?}"),
                why,
            };
            Failure::Denied(self.refuse(
                protocol,
                &raw_host.escape_debug().to_string(),
                port,
                r.code(),
                r.to_string(),
            ))
        })?;
        self.policy
            .check(&self.profile, &host, port)
            .map_err(|r| Failure::Denied(self.refuse(protocol, &host.to_string(), port, r.code(), r.to_string())))?;
        let lookup = self.lookups.acquire().await;
        let resolved = self.resolver.resolve(&self.profile, &self.policy, &host, port).await;
        drop(lookup);
        let addrs = resolved.map_err(|e| match e {
            ResolveError::Internal { .. } | ResolveError::Never { .. } => {
                Failure::Denied(self.refuse(protocol, &host.to_string(), port, "internal-address", e.to_string()))
            }
            ResolveError::Failed { .. } => Failure::Unreachable(e.to_string()),
        })?;
        let mut last = format!("cannot connect to {host}:{port}");
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Upstream {
                        stream: tunnel::Counted::new(stream, self.clone(), host.to_string()),
                        host,
                        addr,
                    });
                }
                Ok(Err(e)) => last = format!("cannot connect to {host}:{port} ({addr}): {e}"),
                Err(_) => last = format!("cannot connect to {host}:{port} ({addr}): timed out"),
            }
        }
        Err(Failure::Unreachable(last))
    }

    /// Counts and reports a refused destination; returns the refusal to
    /// tell the worker.
    pub fn refuse(&self, protocol: Protocol, host: &str, port: u16, code: &'static str, message: String) -> Denial {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).denials += 1;
        self.denials.report(protocol, host, port, code, &message);
        Denial { code, message }
    }

    /// The worker's traffic so far.
    pub fn usage(&self) -> NetUsage {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, host: &str, up: u64, down: u64) {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).add(host, up, down);
    }
}

/// An allowed, connected destination.
#[derive(Debug)]
pub struct Upstream {
    pub stream: tunnel::Counted<TcpStream>,
    pub host: Host,
    pub addr: SocketAddr,
}

/// Serves a worker's listeners until the returned tasks are aborted (when
/// the worker ends): the proxy's with `egress`, the API gateway's with
/// `gateway` (a worker without one is told so).
pub fn serve(
    worker: &str,
    egress: Option<&Arc<Egress>>,
    gateway: Option<&Arc<gateway::Gateway>>,
    listeners: Vec<(ListenerKind, OwnedFd)>,
) -> Vec<tokio::task::JoinHandle<()>> {
    listeners
        .into_iter()
        .filter_map(|(kind, fd)| {
            let std_listener = std::net::TcpListener::from(fd);
            let listener = std_listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(std_listener));
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(worker, ?kind, error = %e, "cannot serve a worker listener");
                    return None;
                }
            };
            let (egress, gateway) = (egress.cloned(), gateway.cloned());
            Some(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let (egress, gateway) = (egress.clone(), gateway.clone());
                    tokio::spawn(async move {
                        match (kind, egress, gateway) {
                            (ListenerKind::HttpProxy, Some(e), _) => proxy::serve(e, stream).await,
                            (ListenerKind::Socks, Some(e), _) => socks::serve(e, stream).await,
                            (ListenerKind::Gateway, _, Some(g)) => g.serve(stream).await,
                            _ => proxy::unavailable(stream).await,
                        }
                    });
                }
            }))
        })
        .collect()
}

/// Bytes moved over one upstream connection, added to the worker's
/// counters when the connection closes.
#[derive(Debug)]
pub struct Traffic {
    egress: Arc<Egress>,
    host: String,
    up: AtomicU64,
    down: AtomicU64,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.egress.record(
            &self.host,
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        );
    }
}
