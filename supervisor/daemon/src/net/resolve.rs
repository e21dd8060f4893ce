//! Turning an allowed host name into the addresses the proxy may dial.
//!
//! Owns: the admin's static `hosts` table (trusted as mapped), name
//! resolution in the daemon (never in the worker), and the refusal of
//! internal addresses: loopback, link-local, private, shared, multicast,
//! unspecified and reserved ranges, and the host's own addresses, unless
//! the profile lists the address or a range holding it.
//!
//! Must never: let a worker choose the address (the proxy dials exactly the
//! address checked here: no second lookup, so DNS rebinding gains nothing).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warden_policy::network::{canonical_ip, internal_address};
use warden_policy::{Host, NetworkPolicy};

/// A name lookup: the system resolver in the daemon, a fake in tests.
pub type Lookup =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> + Send + Sync>;

/// Why no address of a host may be dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{host} resolves to {addr} ({class}), which profile {profile} does not list")]
    Internal {
        host: String,
        addr: IpAddr,
        class: &'static str,
        profile: String,
    },
    #[error("{host} is {addr} ({class}), which is never a destination")]
    Never {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
    #[error("cannot resolve {host}: {why}")]
    Failed { host: String, why: String },
}

/// The resolver the proxy of every worker uses.
pub struct Resolver {
    hosts: HashMap<String, IpAddr>,
    lookup: Lookup,
    own: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// System lookups (getaddrinfo, each on a thread of the blocking pool) at
/// once, for all workers; a lookup's thread holds its place until
/// getaddrinfo returns, even after the proxy gave up on it, so that slow
/// names cannot fill the pool the daemon's own blocking work needs.
const MAX_LOOKUPS: usize = 32;
/// How long the proxy waits for one.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `resolve` on the blocking pool once one of `limit`'s places is
/// free, waiting at most `wait` for its answer (the place is held until
/// `resolve` returns).
pub async fn blocking_lookup(
    limit: Arc<tokio::sync::Semaphore>,
    wait: Duration,
    resolve: impl FnOnce() -> std::io::Result<Vec<IpAddr>> + Send + 'static,
) -> std::io::Result<Vec<IpAddr>> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the name lookup timed out");
    let work = async move {
        let place = limit
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("the resolver is closed"))?;
        tokio::task::spawn_blocking(move || {
            let _place = place;
            resolve()
        })
        .await
        .map_err(std::io::Error::other)?
    };
    tokio::time::timeout(wait, work).await.map_err(|_| timed_out())?
}

/// How long the host's own addresses are trusted before they are read again.
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

impl Resolver {
    /// The system resolver, with the admin's `hosts` table in front of it.
    pub fn system(hosts: HashMap<String, IpAddr>) -> Self {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS));
        let lookup: Lookup = Arc::new(move |name: String| {
            Box::pin(blocking_lookup(limit.clone(), LOOKUP_TIMEOUT, move || {
                use std::net::ToSocketAddrs;
                Ok((name.as_str(), 0).to_socket_addrs()?.map(|a| a.ip()).collect())
            }))
        });
        Self::with_lookup(hosts, lookup)
    }

    pub fn with_lookup(hosts: HashMap<String, IpAddr>, lookup: Lookup) -> Self {
        Resolver {
            hosts,
            lookup,
            own: Mutex::new(None),
        }
    }

    /// The addresses of `host`:`port` the proxy may dial for a worker with
    /// `policy`, in the order to try them.
    pub async fn resolve(
        &self,
        profile: &str,
        policy: &NetworkPolicy,
        host: &Host,
        port: u16,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        let never = |ip: IpAddr| {
            never_dialled(ip).map(|class| ResolveError::Never {
                host: host.to_string(),
                addr: ip,
                class,
            })
        };
        let (name, candidates) = match host {
            // The policy admitted the address itself: it is listed.
            Host::Ip(ip) => return never(*ip).map_or(Ok(vec![SocketAddr::new(*ip, port)]), Err),
            Host::Name(n) => match self.hosts.get(n) {
                // The admin's table is trusted as mapped (but for addresses
                // that mean "this host" or no host at all).
                Some(ip) => return never(*ip).map_or(Ok(vec![SocketAddr::new(*ip, port)]), Err),
                None => (n, (self.lookup)(n.clone()).await),
            },
        };
        let candidates = candidates.map_err(|e| ResolveError::Failed {
            host: name.clone(),
            why: e.to_string(),
        })?;
        if candidates.is_empty() {
            return Err(ResolveError::Failed {
                host: name.clone(),
                why: "no address".into(),
            });
        }
        let own = self.own_addresses();
        let mut allowed = Vec::new();
        let mut refused = None;
        for ip in candidates.into_iter().map(canonical_ip) {
            let class = internal_address(ip).or_else(|| own.contains(&ip).then_some("this host's"));
            let listed = policy.lists_address(ip) && never_dialled(ip).is_none();
            match class {
                Some(class) if !listed => {
                    refused.get_or_insert((ip, class));
                }
                _ => allowed.push(SocketAddr::new(ip, port)),
            }
        }
        match (allowed.is_empty(), refused) {
            (true, Some((addr, class))) => Err(ResolveError::Internal {
                host: name.clone(),
                addr,
                class,
                profile: profile.to_string(),
            }),
            _ => Ok(allowed),
        }
    }
}

/// Addresses no listing makes dialable: the unspecified address (a connect
/// to it reaches this host), multicast, broadcast and reserved ranges.
fn never_dialled(ip: IpAddr) -> Option<&'static str> {
    internal_address(ip).filter(|c| matches!(*c, "unspecified" | "multicast" | "reserved"))
}

impl Resolver {
    /// The addresses of this host's interfaces (re-read every few seconds:
    /// they change with DHCP and VPNs).
    fn own_addresses(&self) -> Vec<IpAddr> {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, addrs)) = own.as_ref() {
            if at.elapsed() < OWN_ADDRESSES_TTL {
                return addrs.clone();
            }
        }
        let addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map(|ifs| {
                ifs.filter_map(|i| {
                    let a = i.address?;
                    a.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                })
                .map(canonical_ip)
                .collect()
            })
            .unwrap_or_default();
        *own = Some((Instant::now(), addrs.clone()));
        addrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use warden_policy::{NetRule, NetworkMode};

    fn fake(table: &'static [(&'static str, &'static str)]) -> Lookup {
        Arc::new(move |name: String| {
            Box::pin(async move {
                let found: Vec<IpAddr> = table
                    .iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, a)| a.parse().unwrap())
                    .collect();
                if found.is_empty() {
                    Err(std::io::Error::other("no such host"))
                } else {
                    Ok(found)
                }
            })
        })
    }

    fn policy(allow: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            mode: NetworkMode::Proxy,
            allow: allow
                .iter()
                .map(|r| NetRule::try_from((*r).to_string()).unwrap())
                .collect(),
            deny: vec![],
            tcp_connect: BTreeSet::from([443]),
            tcp_bind: BTreeSet::new(),
            udp: false,
        }
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_listed_and_the_hosts_table_is_trusted() {
        let r = Resolver::with_lookup(
            HashMap::from([
                ("git.test".to_string(), "127.0.0.1".parse().unwrap()),
                ("zero.test".to_string(), "0.0.0.0".parse().unwrap()),
            ]),
            fake(&[
                ("rebind.example", "169.254.169.254"),
                ("mixed.example", "10.0.0.1"),
                ("mixed.example", "93.184.216.34"),
                ("lan.example", "192.168.1.10"),
            ]),
        );
        let p = policy(&["*.example", "git.test", "zero.test", "0.0.0.0"]);
        let name = |n: &str| Host::Name(n.into());
        let e = r.resolve("t", &p, &name("rebind.example"), 443).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "rebind.example resolves to 169.254.169.254 (link-local), which profile t does not list"
        );
        // Only the public address of a mixed answer is dialled.
        let ok = r.resolve("t", &p, &name("mixed.example"), 443).await.unwrap();
        assert_eq!(ok, vec!["93.184.216.34:443".parse().unwrap()]);
        assert_eq!(
            r.resolve("t", &p, &name("git.test"), 8443).await.unwrap(),
            vec!["127.0.0.1:8443".parse().unwrap()]
        );
        assert!(matches!(
            r.resolve("t", &p, &name("nowhere.example"), 443).await,
            Err(ResolveError::Failed { .. })
        ));
        // "This host" is never a destination, not through the table, not listed.
        for h in [name("zero.test"), Host::Ip("0.0.0.0".parse().unwrap())] {
            let e = r.resolve("t", &p, &h, 443).await.unwrap_err();
            assert!(
                e.to_string()
                    .ends_with("is 0.0.0.0 (unspecified), which is never a destination"),
                "{e}"
            );
        }
        // A profile that lists the range reaches it.
        let lan = policy(&["*.example", "192.168.1.0/24"]);
        assert_eq!(
            r.resolve("t", &lan, &name("lan.example"), 443).await.unwrap(),
            vec!["192.168.1.10:443".parse().unwrap()]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_are_bounded_and_a_slow_one_keeps_its_place_until_it_returns() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let limit = Arc::new(tokio::sync::Semaphore::new(4));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let lookups = (0..40).map(|_| {
            let (limit, now, most) = (limit.clone(), now.clone(), most.clone());
            tokio::spawn(blocking_lookup(limit, Duration::from_secs(10), move || {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(vec![IpAddr::from([192, 0, 2, 1])])
            }))
        });
        for l in lookups.collect::<Vec<_>>() {
            assert!(l.await.unwrap().is_ok());
        }
        assert_eq!(most.load(Ordering::SeqCst), 4);
        // A lookup that outlasts its wait answers "timed out" at once, and
        // its place stays taken until getaddrinfo would have returned.
        let e = blocking_lookup(limit.clone(), Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
            Ok(vec![])
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(limit.available_permits(), 3);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(limit.available_permits(), 4);
    }
}
