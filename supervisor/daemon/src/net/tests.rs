//! The proxy's parsers and decisions against raw clients: the real
//! HTTP/SOCKS servers of [`super::serve`] on loopback listeners of the test
//! process, a fake resolver, and the events they publish.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warden_policy::config::Config;
use warden_policy::{ListenerKind, NetRule, NetworkMode, NetworkPolicy};

use super::resolve::{Lookup, Resolver};
use super::{serve, Egress};
use crate::events::{Event, EventKind, Events, Settings};

struct Proxy {
    http: SocketAddr,
    socks: SocketAddr,
    egress: Arc<Egress>,
    events: Arc<Events>,
    _dir: tempfile::TempDir,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// An upstream on loopback that answers every connection with `greeting`
/// and then echoes what it reads.
async fn upstream(greeting: &'static [u8]) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// The head of the HTTP request on `s`, to its blank line (and whatever
/// came with it); None if the client went away first.
pub(super) async fn request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// An HTTP upstream on loopback that answers each request with the request
/// head it received.
async fn http_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Some(head) = request_head(&mut s).await else { return };
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len());
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.write_all(&head).await;
            });
        }
    });
    port
}

/// Lookups of `slow.test` under way, and the most at once.
static SLOW_NOW: AtomicUsize = AtomicUsize::new(0);
static SLOW_MOST: AtomicUsize = AtomicUsize::new(0);

async fn proxy(allow: &[String], deny: &[&str], max_connections: usize) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let (events, _) = Events::open(Settings::at(&dir.path().join("audit.jsonl"))).unwrap();
    let mut config = Config::embedded();
    config.max_connections_per_worker = u32::try_from(max_connections).unwrap();
    let events = Arc::new(events);
    let lookup: Lookup = Arc::new(|name: String| {
        Box::pin(async move {
            if name == "slow.test" {
                let now = SLOW_NOW.fetch_add(1, Ordering::SeqCst) + 1;
                SLOW_MOST.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                SLOW_NOW.fetch_sub(1, Ordering::SeqCst);
            }
            match name.as_str() {
                "rebind.test" => Ok(vec![IpAddr::from([127, 0, 0, 1])]),
                "metadata.test" => Ok(vec![IpAddr::from([169, 254, 169, 254])]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    });
    let hosts = HashMap::from([
        ("up.test".to_string(), IpAddr::from([127, 0, 0, 1])),
        ("other.test".to_string(), IpAddr::from([127, 0, 0, 1])),
        ("zero.test".to_string(), IpAddr::from([0, 0, 0, 0])),
    ]);
    let policy = NetworkPolicy {
        mode: NetworkMode::Proxy,
        allow: allow.iter().map(|r| NetRule::try_from(r.clone()).unwrap()).collect(),
        deny: deny
            .iter()
            .map(|r| NetRule::try_from((*r).to_string()).unwrap())
            .collect(),
        tcp_connect: BTreeSet::from([443]),
        tcp_bind: BTreeSet::new(),
        udp: false,
    };
    let egress = Arc::new(Egress::new(
        "w1",
        "alice",
        "test-profile",
        policy,
        Arc::new(Resolver::with_lookup(hosts, lookup)),
        events.clone(),
        &config,
    ));
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socks = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (http_addr, socks_addr) = (http.local_addr().unwrap(), socks.local_addr().unwrap());
    let tasks = serve(
        "w1",
        Some(&egress),
        None,
        vec![
            (ListenerKind::HttpProxy, http.into()),
            (ListenerKind::Socks, socks.into()),
        ],
    );
    Proxy {
        http: http_addr,
        socks: socks_addr,
        egress,
        events,
        _dir: dir,
        _tasks: tasks,
    }
}

/// Sends `request` to the HTTP proxy and returns what it answers first
/// (the head, and whatever body came with it).
async fn ask(p: &Proxy, request: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the proxy answers")
        .unwrap_or(0);
    (s, String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn denials(p: &Proxy) -> Vec<Event> {
    let mut out = Vec::new();
    p.events.flush();
    p.events.replay(1, |e| {
        if matches!(e.kind, EventKind::NetworkDenial { .. }) {
            out.push(e);
        }
        true
    });
    out
}

fn reason_of(e: &Event) -> &str {
    match &e.kind {
        EventKind::NetworkDenial { reason, .. } => reason,
        _ => "",
    }
}

#[tokio::test]
async fn connect_and_absolute_form_reach_allowed_hosts_and_are_counted() {
    let port = upstream(b"hello from upstream\n").await;
    let p = proxy(&[format!("up.test:{port}")], &[], 64).await;
    let (mut s, head) = ask(
        &p,
        format!("CONNECT up.test:{port} HTTP/1.1\r\nHost: up.test\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"hello from upstream\n");
    s.write_all(b"ping").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"ping");
    drop(s);

    // Absolute-form: the request goes out in origin form, with a Host
    // header naming the checked host (not what the client claimed), and no
    // proxy credentials.
    let web = http_upstream().await;
    let p2 = proxy(&[format!("up.test:{web}")], &[], 64).await;
    let (_s, answer) = ask(
        &p2,
        format!("GET http://up.test:{web}/path?q=1 HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: x\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let sent = answer.split_once("\r\n\r\n").map_or("", |x| x.1).to_ascii_lowercase();
    assert!(sent.starts_with("get /path?q=1 http/1.1\r\n"), "{sent}");
    assert!(sent.contains(&format!("host: up.test:{web}\r\n")), "{sent}");
    assert!(
        !sent.contains("evil.example") && !sent.contains("proxy-authorization"),
        "{sent}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The closed tunnel is counted: one connection, its bytes both ways.
    let usage = p.egress.usage();
    assert_eq!(usage.connections, 1, "{usage:?}");
    let up = &usage.hosts["up.test"];
    assert_eq!((up.bytes_up, up.bytes_down), (4, 24), "{up:?}");
}

#[tokio::test]
async fn malformed_and_forbidden_hosts_get_their_refusal_and_the_proxy_keeps_serving() {
    let port = upstream(b"ok\n").await;
    let p = proxy(
        &[format!("up.test:{port}"), "*.test".into(), "rebind.test".into()],
        &["blocked.test"],
        64,
    )
    .await;
    let forbidden = |head: &str, code: &str| {
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        assert!(head.contains(&format!("x-warden-denied: {code}")), "{head}");
    };
    // Hosts with NUL, CR/LF, non-ASCII or '%' never reach the policy: the
    // request line is malformed (400). (SOCKS5, which carries names as
    // bytes, meets the canonicaliser instead: see its test.)
    for raw in [
        &b"CONNECT evil\0.test:443 HTTP/1.1\r\n\r\n"[..],
        b"CONNECT evil.test\r\n.up.test:443 HTTP/1.1\r\n\r\n",
        "CONNECT b\u{fc}cher.test:443 HTTP/1.1\r\n\r\n".as_bytes(),
        b"CONNECT evil%2etest:443 HTTP/1.1\r\n\r\n",
        "GET http://b\u{fc}cher.test/ HTTP/1.1\r\n\r\n".as_bytes(),
    ] {
        let (_s, head) = ask(&p, raw).await;
        assert!(
            head.starts_with("HTTP/1.1 400"),
            "{:?}: {head}",
            String::from_utf8_lossy(raw)
        );
    }
    // Addresses nobody listed, and names that lead to them.
    for (target, code) in [
        ("127.0.0.1:22", "not-allowed"),
        ("[::1]:443", "not-allowed"),
        ("169.254.169.254:80", "not-allowed"),
        ("10.0.0.1:443", "not-allowed"),
        ("zero.test:443", "internal-address"),
        ("rebind.test:443", "internal-address"),
        ("evil.example:443", "not-allowed"),
        ("blocked.test:443", "deny-list"),
        (&format!("other.test:{port}"), "port"),
    ] {
        let (_s, head) = ask(&p, format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await;
        forbidden(&head, code);
    }
    let (_s, head) = ask(&p, b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n").await;
    forbidden(&head, "not-allowed");
    assert!(
        head.ends_with("warden: evil.example is not on the allowlist of profile test-profile\n"),
        "{head}"
    );
    // A request line of 1 MB.
    let mut huge = b"GET http://up.test/".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let mut s = TcpStream::connect(p.http).await.unwrap();
    let _ = s.write_all(&huge).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // Still serving.
    let (_s, head) = ask(&p, format!("CONNECT up.test:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Every refusal of the policy is an event with its reason.
    let reasons: Vec<String> = denials(&p).iter().map(|e| reason_of(e).to_string()).collect();
    for code in ["not-allowed", "internal-address", "deny-list", "port"] {
        assert!(reasons.iter().any(|r| r == code), "{code} in {reasons:?}");
    }
}

#[tokio::test]
async fn a_tls_server_name_that_is_not_the_tunnels_host_closes_it() {
    let port = upstream(b"").await;
    let p = proxy(&[format!("up.test:{port}")], &[], 64).await;
    let (mut s, head) = ask(&p, format!("CONNECT up.test:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&super::sni::tests::client_hello(Some("evil.example")))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the tunnel is closed, nothing echoed");
    let d = denials(&p);
    let e = d
        .iter()
        .find(|e| reason_of(e) == "sni-mismatch")
        .expect("an sni-mismatch event");
    assert!(serde_json::to_string(e).unwrap().contains("evil.example"), "{e:?}");
    // The same name as the tunnel's passes.
    let (mut s, _) = ask(&p, format!("CONNECT up.test:{port} HTTP/1.1\r\n\r\n").as_bytes()).await;
    let hello = super::sni::tests::client_hello(Some("up.test"));
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello, "carried to the upstream and echoed");
}

#[tokio::test]
async fn socks5_decides_by_the_same_policy() {
    let port = upstream(b"socks ok\n").await;
    let p = proxy(&[format!("up.test:{port}")], &[], 64).await;
    let socks = |name: &[u8], port: u16| {
        let mut req = vec![5, 1, 0, 5, 1, 0, 3, u8::try_from(name.len()).unwrap()];
        req.extend_from_slice(name);
        req.extend_from_slice(&port.to_be_bytes());
        req
    };
    let exchange = |req: Vec<u8>| async move {
        let mut s = TcpStream::connect(p.socks).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut reply = [0u8; 12];
        s.read_exact(&mut reply[..2]).await.unwrap();
        s.read_exact(&mut reply[2..12]).await.unwrap();
        (s, reply)
    };
    let (mut s, reply) = exchange(socks(b"up.test", port)).await;
    assert_eq!((reply[2], reply[3]), (5, 0), "method, then success");
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"socks ok\n");
    for name in [
        &b"evil.example"[..],
        b"evil\0.test",
        b"evil\r\n.test",
        b"evil%2etest",
        "b\u{fc}cher.test".as_bytes(),
        b"127.0.0.1",
    ] {
        let (_s, reply) = exchange(socks(name, 443)).await;
        assert_eq!(
            reply[3],
            2,
            "{:?}: connection not allowed by ruleset",
            String::from_utf8_lossy(name)
        );
    }
    let reasons: Vec<String> = denials(&p).iter().map(|e| reason_of(e).to_string()).collect();
    assert_eq!(reasons.iter().filter(|r| *r == "bad-host").count(), 4, "{reasons:?}");
    // An address of the IPv4 type, not listed.
    let mut req = vec![5, 1, 0, 5, 1, 0, 1, 169, 254, 169, 254];
    req.extend_from_slice(&80u16.to_be_bytes());
    let (_s, reply) = exchange(req).await;
    assert_eq!(reply[3], 2);
}

#[tokio::test]
async fn a_thousand_connections_get_the_workers_share_and_a_clear_refusal() {
    let p = proxy(&["up.test:1".into()], &[], 16).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        let mut s = TcpStream::connect(p.http).await.unwrap();
        // A connection within the share waits for a request; one beyond it
        // is answered at once.
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let head = String::from_utf8_lossy(&buf[..n]);
                assert!(
                    head.starts_with("HTTP/1.1 503") && head.contains("x-warden-denied: too-many-connections"),
                    "{head}"
                );
                refused += 1;
            }
            _ => held.push(s),
        }
    }
    assert_eq!(held.len(), 16);
    assert_eq!(refused, 984);
    // The refusals are events, rate-limited, each counted.
    let d = denials(&p);
    let reported = d.len() as u64;
    let suppressed: u64 = d
        .iter()
        .map(|e| match &e.kind {
            EventKind::NetworkDenial { suppressed, .. } => *suppressed,
            _ => 0,
        })
        .sum();
    assert!(reported <= 60, "rate-limited: {reported} events");
    assert_eq!(p.egress.usage().denials, 984);
    assert!(reported + suppressed <= 984);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_s, head) = ask(&p, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403"), "serving again: {head}");
}

#[tokio::test]
async fn a_worker_has_at_most_four_name_lookups_under_way() {
    let p = proxy(&["slow.test".into()], &[], 64).await;
    let addr = p.http;
    let asks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"CONNECT slow.test:443 HTTP/1.1\r\nhost: slow.test:443\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
        })
        .collect();
    for a in asks {
        let head = a.await.unwrap();
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    }
    assert_eq!(SLOW_MOST.load(Ordering::SeqCst), 4);
}
