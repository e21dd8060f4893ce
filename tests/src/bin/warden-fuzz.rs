//! warden-fuzz: a mutation fuzzer for every parser that reads outside
//! input, on the stable toolchain (cargo-fuzz needs nightly).
//!
//! Targets: `profile` (a site profile, merged with the shipped ones and
//! compiled), `config` (wardend.toml), `grpc` (request messages decoded as
//! the server decodes them, then checked and resolved as the handlers
//! do), `stream-json` (a Claude Code worker's output, split into lines and
//! read as the session driver reads it), `proxy` (HTTP proxy requests
//! through hyper and the proxy's destination and policy decision, SOCKS5
//! handshakes, TLS ClientHellos for the SNI check), `http2` (a client's
//! bytes on the API socket, through the layer that rewrites `:authority`:
//! whatever it passes on must decode).
//!
//! Each target starts from seeds (the shipped files, recorded messages)
//! and mutates them: bit flips, interesting bytes, insertions, deletions,
//! repeats, splices and dictionary tokens. An input whose outcome (its
//! error, or the kind of result) is new joins the corpus. A panic is a
//! failure: the input is saved under the crash directory and the run
//! exits 1. Inputs that take over a second are reported.
//!
//! Usage: warden-fuzz [--seconds N] [--target NAME]... [--seed N]
//!                    [--crashes DIR]
//! The test command runs every target for a few seconds; README "Fuzzing"
//! says how to run longer.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use warden_daemon::auth::{Caller, Role};
use warden_daemon::claude::session::{read_message, Lines, Message};
use warden_policy::config::Config;
use warden_policy::{ProfileSet, Source};

/// A small, fast PRNG (xorshift64*): reproducible runs from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::try_from(self.next() % (n as u64)).unwrap_or(0)
        }
    }
}

/// One execution of a target on an input: a summary of its outcome.
type Run = Box<dyn Fn(&[u8]) -> u64>;

/// A target: seeds, tokens worth inserting, and the run itself, which
/// returns a summary of the outcome (new summaries grow the corpus).
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    tokens: Vec<&'static [u8]>,
    run: Run,
}

fn summary(s: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The first words of an error: what kind of refusal it was, without the
/// input it quotes.
fn kind_of(e: &str) -> String {
    e.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], tokens: &[&[u8]]) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\"\\'\n\r\t =[]{},.:/-0123456789";
    let mut v = input.to_vec();
    for _ in 0..=rng.below(8) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| u8::try_from(rng.next() & 0xff).unwrap_or(0)).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a piece (long lines, deep nesting, many keys).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let piece = v[i..i + n].to_vec();
                for _ in 0..1 + rng.below(64) {
                    v.splice(i..i, piece.iter().copied());
                }
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let to = from + rng.below(other.len() - from + 1);
                let at = rng.below(len + 1);
                v.splice(at..at, other[from..to].iter().copied());
            }
            6 if !tokens.is_empty() => {
                let t = tokens[rng.below(tokens.len())];
                let at = rng.below(len + 1);
                v.splice(at..at, t.iter().copied());
            }
            7 if len > 1 => {
                let cut = rng.below(len);
                v.truncate(cut.max(1));
            }
            _ => {}
        }
    }
    // Inputs stay small enough to run thousands a second.
    v.truncate(1 << 20);
    v
}

/// A target's run: inputs tried, the corpus it grew, inputs that took
/// over a second.
struct Ran {
    runs: usize,
    corpus: usize,
    slow: usize,
}

/// What runs now, and since when.
type Running = std::sync::Arc<std::sync::Mutex<Option<(Instant, std::sync::Arc<Vec<u8>>)>>>;

/// A hang is a finding too: an input that runs for more than `HANG` is
/// saved and the fuzzer exits 1 (the run cannot be interrupted).
fn watchdog(name: &'static str, crashes: &std::path::Path) -> Running {
    const HANG: Duration = Duration::from_secs(10);
    let running: Running = Default::default();
    let watched = running.clone();
    let crashes = crashes.to_path_buf();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let hung = match &*watched.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((since, input)) if since.elapsed() > HANG => Some(input.clone()),
            _ => None,
        };
        if let Some(input) = hung {
            let path = crashes.join(format!("{name}-hang-{:016x}", summary(&*input)));
            let _ = std::fs::write(&path, &*input);
            eprintln!(
                "warden-fuzz: {name}: an input ran for over {HANG:?} (saved as {})",
                path.display()
            );
            std::process::exit(1);
        }
    });
    running
}

fn run_target(t: &Target, seconds: u64, rng: &mut Rng, crashes: &std::path::Path) -> Result<Ran, String> {
    let mut corpus: Vec<Vec<u8>> = t.seeds.clone();
    let mut seen: HashSet<u64> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0usize;
    let mut slow = 0usize;
    let mut i = 0usize;
    let running = watchdog(t.name, crashes);
    while Instant::now() < deadline {
        // The seeds as they are first, then mutations of the corpus.
        let input = if i < t.seeds.len() {
            t.seeds[i].clone()
        } else {
            let base = corpus[rng.below(corpus.len())].clone();
            mutate(rng, &base, &corpus, &t.tokens)
        };
        i += 1;
        let input = std::sync::Arc::new(input);
        let started = Instant::now();
        *running.lock().unwrap_or_else(|p| p.into_inner()) = Some((started, input.clone()));
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&input)));
        *running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let input = std::sync::Arc::unwrap_or_clone(input);
        runs += 1;
        let took = started.elapsed();
        if took > Duration::from_secs(1) {
            slow += 1;
            let path = crashes.join(format!("{}-slow-{:016x}", t.name, summary(&input)));
            let _ = std::fs::write(&path, &input);
            eprintln!(
                "warden-fuzz: {}: an input took {took:?} (saved as {})",
                t.name,
                path.display()
            );
        }
        match outcome {
            Ok(s) => {
                if seen.insert(s) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(_) => {
                let path = crashes.join(format!("{}-crash-{:016x}", t.name, summary(&input)));
                let _ = std::fs::write(&path, &input);
                return Err(format!("{}: a panic (input saved as {})", t.name, path.display()));
            }
        }
    }
    Ok(Ran {
        runs,
        corpus: corpus.len(),
        slow,
    })
}

/// A site profile, merged with the shipped ones, every profile compiled.
fn profile_target() -> Target {
    let seeds = warden_policy::EMBEDDED_PROFILES
        .iter()
        .map(|(_, text)| text.as_bytes().to_vec())
        .chain([b"extends = \"base\"\n[network]\nallow = [\"example.com:443\"]\n".to_vec()])
        .collect();
    let arch = warden_policy::seccomp::Arch::host().expect("a supported architecture");
    Target {
        name: "profile",
        seeds,
        tokens: vec![
            b"extends = \"base\"\n",
            b"[limits]\n",
            b"memory = \"1G\"\n",
            b"[network]\nmode = \"proxy\"\n",
            b"allow = [\"*.example.com:443\"]\n",
            b"[claude]\n",
            b"[[filesystem]]\npath = \"/usr\"\naccess = \"rx\"\n",
            b"\"${HOME}/..\"",
            b"[seccomp]\nallow = [\"ptrace\"]\n",
        ],
        run: Box::new(move |input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return 0;
            };
            let mut sources = Source::embedded();
            sources.push(Source {
                name: "fuzz".into(),
                origin: "fuzz".into(),
                text: text.into(),
            });
            match ProfileSet::from_sources(sources) {
                Err(e) => summary(kind_of(&e.to_string())),
                Ok(set) => {
                    let Ok(p) = set.get("fuzz") else { return 1 };
                    let req = spawn_request();
                    match warden_policy::compile(p, &req, arch) {
                        Ok(spec) => summary(("ok", spec.binds.len(), spec.landlock.rules.len())),
                        Err(e) => summary(kind_of(&e.to_string())),
                    }
                }
            }
        }),
    }
}

fn spawn_request() -> warden_policy::SpawnRequest {
    warden_policy::SpawnRequest {
        worker_id: "wfuzz".into(),
        user: "alice".into(),
        uid: 200_000,
        gid: 200_000,
        project: "default".into(),
        argv: vec!["true".into()],
        env: Default::default(),
        home_dir: "/var/lib/warden/users/alice/profiles/base/home".into(),
        workspace_dir: "/var/lib/warden/users/alice/profiles/base/workspace/default".into(),
        cgroup_procs: vec![],
        protected: vec!["/var/lib/warden".into(), "/run/warden".into()],
        extra_binds: vec![],
    }
}

fn config_target() -> Target {
    Target {
        name: "config",
        seeds: vec![warden_policy::config::DEFAULT_CONFIG.as_bytes().to_vec()],
        tokens: vec![
            b"[hosts]\n\"x.test\" = \"10.0.0.1\"\n",
            b"[gateway.users.bob]\ntokens_per_day = 5\n",
            b"rate = \"1/s\"",
            b"burst = \"16M\"",
            b"\"../\"",
            b"= 0\n",
            b"= -1\n",
            b"= 18446744073709551616\n",
        ],
        run: Box::new(|input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return 0;
            };
            match Config::parse("fuzz", text) {
                Ok(c) => summary(("ok", c.max_workers, c.hosts.len())),
                Err(e) => summary(kind_of(&e.to_string())),
            }
        }),
    }
}

/// Request messages as the server decodes them (protobuf), then the
/// handlers' own checks: a spawn is validated, resolved against the
/// shipped profiles and compiled; a watch's filter is checked.
fn grpc_target() -> Target {
    use prost::Message as _;
    use warden_proto::v1 as pb;
    let spawn = pb::SpawnRequest {
        user: "alice".into(),
        project: "p1".into(),
        profile: "claude-code".into(),
        command: vec!["echo".into(), "hi".into()],
        env: [("TERM".to_string(), "xterm".to_string())].into(),
        limits: Some(pb::Limits {
            memory_bytes: 1 << 30,
            pids: 10,
            ..Default::default()
        }),
        interactive: true,
        claude: Some(pb::ClaudeOptions {
            model: "claude-sonnet-4-5".into(),
            max_turns: 3,
            disallowed_tools: vec!["WebFetch".into()],
            append_system_prompt: "be brief".into(),
            permission_mode: "plan".into(),
        }),
    };
    let watch = pb::WatchRequest {
        from_seq: 5,
        worker: "w1".into(),
        user: "alice".into(),
        kinds: vec!["worker_exited".into()],
        replay_only: true,
    };
    let approve = pb::ApproveRequest {
        id: "w1".into(),
        request_id: "r1".into(),
        allow: true,
        message: "ok".into(),
    };
    let mut seeds = Vec::new();
    for (tag, bytes) in [
        (0u8, spawn.encode_to_vec()),
        (1, watch.encode_to_vec()),
        (2, approve.encode_to_vec()),
        (3, pb::AttachRequest::default().encode_to_vec()),
    ] {
        let mut v = vec![tag];
        v.extend(bytes);
        seeds.push(v);
    }
    let profiles = ProfileSet::embedded().expect("the shipped profiles");
    let arch = warden_policy::seccomp::Arch::host().expect("a supported architecture");
    let admin = Caller {
        uid: 0,
        pid: None,
        role: Role::Admin,
    };
    Target {
        name: "grpc",
        seeds,
        tokens: vec![b"\x0a\x05alice", b"\x22\x02..", b"\x12\x03../", b"\x1a\x04base"],
        run: Box::new(move |input| {
            let Some((tag, body)) = input.split_first() else {
                return 0;
            };
            match tag % 4 {
                0 => {
                    let Ok(r) = pb::SpawnRequest::decode(body) else {
                        return 1;
                    };
                    let params = match warden_daemon::api::workers::spawn_params(&admin, "base", r) {
                        Ok(p) => p,
                        Err(s) => return summary(kind_of(s.message())),
                    };
                    let profile = match warden_daemon::workers::spawn::resolve(&profiles, &params) {
                        Ok(p) => p,
                        Err(e) => return summary(kind_of(&e.to_string())),
                    };
                    let mut req = spawn_request();
                    req.argv = params.command;
                    req.env = params.env.into_iter().collect();
                    match warden_policy::compile(&profile, &req, arch) {
                        Ok(_) => 2,
                        Err(e) => summary(kind_of(&e.to_string())),
                    }
                }
                1 => match pb::WatchRequest::decode(body) {
                    Ok(r) => match warden_daemon::api::events::watch_filter(&r) {
                        Ok(f) => summary(("watch", f.kinds.len())),
                        Err(s) => summary(kind_of(s.message())),
                    },
                    Err(_) => 3,
                },
                2 => pb::ApproveRequest::decode(body).map_or(4, |r| summary(r.request_id.len().min(300))),
                _ => pb::AttachRequest::decode(body).map_or(5, |r| summary(format!("{:?}", r.msg.map(|_| ())))),
            }
        }),
    }
}

/// A worker's stdout, in pieces of any size, read as the session driver
/// reads it (with a small maximum line, so that over-long lines happen).
fn stream_json_target() -> Target {
    let seeds = vec![
        br#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"ls -l","description":"x"}}}
{"type":"result","subtype":"success"}
"#
        .to_vec(),
        br#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"}]}}
{"type":"control_request","request_id":"r2","request":{"subtype":"interrupt"}}
"#
        .to_vec(),
    ];
    let policy = ProfileSet::embedded()
        .expect("the shipped profiles")
        .get("claude-code")
        .expect("claude-code")
        .claude
        .clone()
        .expect("a [claude] section");
    Target {
        name: "stream-json",
        seeds,
        tokens: vec![
            b"\n",
            b"{\"type\":\"control_request\",",
            b"\"request_id\":\"",
            b"\"input\":",
            b"[[[[[[[[[[",
            b"\\u0000",
            b"\"file_path\":\"/etc/passwd\"",
        ],
        run: Box::new(move |input| {
            let mut lines = Lines::new(512);
            let mut h = 0u64;
            let mut rest = input;
            let mut step = 1usize;
            while !rest.is_empty() {
                // Pieces of changing sizes, as reads of a pipe come.
                let n = step.min(rest.len());
                let (piece, tail) = rest.split_at(n);
                rest = tail;
                step = step * 3 % 97 + 1;
                for line in lines.push(piece) {
                    h ^= match read_message(&line) {
                        Message::Control {
                            subtype, tool, input, ..
                        } => {
                            let raw = input.map_or("{}", |r| r.get());
                            let decided = policy.rule_for(tool.as_deref().unwrap_or(""), raw);
                            let (logged, cut) = warden_daemon::events::logged_input(raw);
                            summary((
                                subtype.as_deref() == Some("can_use_tool"),
                                decided.is_some(),
                                logged.is_string(),
                                cut.is_some(),
                            ))
                        }
                        Message::Result => 1,
                        Message::TooLong { id, .. } => summary(("too long", id.len())),
                        Message::Other => 2,
                    };
                }
            }
            h
        }),
    }
}

/// What reaches the proxy: HTTP requests (parsed by hyper as the proxy
/// parses them, then its destination and the policy's decision), SOCKS5
/// handshakes, and TLS ClientHellos for the SNI check.
fn proxy_target() -> Target {
    let seeds = vec![
        b"HCONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(),
        b"HGET http://registry.npmjs.org/left-pad HTTP/1.1\r\nHost: registry.npmjs.org\r\n\r\n".to_vec(),
        b"S\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbb".to_vec(),
        b"S\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50".to_vec(),
        [b"T".to_vec(), client_hello("example.com")].concat(),
    ];
    let policy = ProfileSet::embedded()
        .expect("the shipped profiles")
        .get("claude-code")
        .expect("claude-code")
        .network
        .clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    Target {
        name: "proxy",
        seeds,
        tokens: vec![
            b"CONNECT ",
            b" HTTP/1.1\r\n",
            b"\r\n\r\n",
            b"[::1]",
            b"0x7f.1",
            b"%2e",
            b"Transfer-Encoding: chunked\r\n",
            b"\x03\xff",
        ],
        run: Box::new(move |input| {
            let Some((kind, body)) = input.split_first() else {
                return 0;
            };
            match kind {
                b'H' => rt.block_on(http_request(body, &policy)),
                b'S' => rt.block_on(async {
                    let (mut client, mut server) = tokio::io::duplex(4096);
                    // The client writes while the server reads: a pipe
                    // holds less than an input can be.
                    let write = async move {
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut client, body).await;
                    };
                    // The server end goes when the handshake ends, which
                    // ends a write it stopped reading.
                    let read = async move {
                        let outcome = tokio::time::timeout(
                            Duration::from_secs(1),
                            warden_daemon::net::socks::handshake(&mut server),
                        )
                        .await;
                        drop(server);
                        outcome
                    };
                    let ((), outcome) = tokio::join!(write, read);
                    match outcome {
                        Ok(Ok(Ok((host, port)))) => decide(&policy, &host, port),
                        Ok(Ok(Err(reply))) => summary(format!("{reply:?}")),
                        Ok(Err(_)) => 3,
                        Err(_) => 4,
                    }
                }),
                _ => summary(format!("{:?}", warden_daemon::net::sni::server_name(body))),
            }
        }),
    }
}

/// A real TLS ClientHello (rustls's) naming `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("a server name");
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).expect("a client");
    let mut hello = Vec::new();
    let _ = conn.write_tls(&mut hello);
    hello
}

/// The policy's decision on a destination as sent.
fn decide(policy: &warden_policy::NetworkPolicy, raw: &str, port: u16) -> u64 {
    match warden_policy::Host::parse(raw) {
        Err(e) => summary(kind_of(&e.to_string())),
        Ok(host) => match policy.check("fuzz", &host, port) {
            Ok(()) => 5,
            Err(r) => summary(r.code()),
        },
    }
}

async fn http_request(bytes: &[u8], policy: &warden_policy::NetworkPolicy) -> u64 {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let policy = policy.clone();
    let outcome = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let seen = outcome.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let decided = match warden_daemon::net::proxy::destination(req.method(), req.uri()) {
            Ok((_, host, port)) => decide(&policy, &host, port),
            Err(why) => summary(why),
        };
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = decided;
        async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new())) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(warden_daemon::net::proxy::MAX_HEAD)
        .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
    let write = async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut client, bytes).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
    };
    let _ = tokio::join!(write, tokio::time::timeout(Duration::from_secs(1), conn));
    let decided = *outcome.lock().unwrap_or_else(|p| p.into_inner());
    decided
}

/// A frame as a client writes it.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn http2_target() -> Target {
    use warden_daemon::api::authority::{Rewriter, PREFACE};
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/warden.v1.Workers/Spawn"),
        (b":authority", b"run%2Fwarden%2Fwarden.sock"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ];
    let mut enc = loona_hpack::Encoder::new();
    let first = enc.encode(headers.iter().copied());
    let second = enc.encode(headers.iter().copied());
    let settings = h2_frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let mut plain = PREFACE.to_vec();
    plain.extend(&settings);
    plain.extend(h2_frame(0x1, 0x4, 1, &first));
    plain.extend(h2_frame(0x0, 0x1, 1, b"\0\0\0\0\0"));
    plain.extend(h2_frame(0x1, 0x5, 3, &second));
    // Padding and priority on the HEADERS, the block in two frames.
    let mut padded = vec![2u8, 0, 0, 0, 0, 16];
    padded.extend_from_slice(&first[..4]);
    padded.extend_from_slice(&[0, 0]);
    let mut split = PREFACE.to_vec();
    split.extend(h2_frame(0x1, 0x8 | 0x20, 5, &padded));
    split.extend(h2_frame(0x9, 0x4, 5, &first[4..]));
    // A Huffman-coded value ("000": three 5-bit codes and a bit of padding).
    let mut huffman_block = first.clone();
    huffman_block.extend_from_slice(&[0x00, 1, b'h', 0x82, 0x00, 0x01]);
    let mut huffman = PREFACE.to_vec();
    huffman.extend(h2_frame(0x1, 0x5, 1, &huffman_block));
    Target {
        name: "http2",
        seeds: vec![plain, split, huffman],
        tokens: vec![
            b"\x00\x00\x05\x01\x04\x00\x00\x00\x01",
            b"\x09",
            b"\x3f\xe1\x1f",
            b"\x40\x0a:authority",
            b"\x82\x86\x84",
        ],
        run: Box::new(|input| {
            let Some((step, input)) = input.split_first() else {
                return 0;
            };
            let mut r = Rewriter::new();
            let mut raw = bytes::BytesMut::new();
            let mut out = Vec::new();
            for piece in input.chunks(usize::from(*step % 32) + 1) {
                raw.extend_from_slice(piece);
                if let Err(e) = r.feed(&mut raw) {
                    return summary(("refused", kind_of(&e.to_string())));
                }
                out.extend_from_slice(&r.take());
            }
            // What it passed on: every header block decodes, with
            // `:authority` localhost, from a decoder of its own.
            let mut dec = loona_hpack::Decoder::new();
            let mut rest = out.get(PREFACE.len().min(out.len())..).unwrap_or_default();
            let (mut frames, mut block) = (0usize, Vec::new());
            while rest.len() >= 9 {
                let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                let Some(payload) = rest.get(9..9 + len) else { break };
                if rest[3] == 0x1 || rest[3] == 0x9 {
                    block.extend_from_slice(payload);
                    if rest[4] & 0x4 != 0 {
                        let fields = dec.decode(&block).expect("a header block it passed on decodes");
                        for (n, v) in fields {
                            assert!(n != b":authority" || v == b"localhost", "an authority passed on");
                        }
                        block.clear();
                    }
                }
                frames += 1;
                rest = &rest[9 + len..];
            }
            summary(("passed", frames.min(8)))
        }),
    }
}

/// Whether the API would fetch a URL somewhere in `v` (messages or a
/// system prompt), found by walking the whole tree: the oracle the
/// gateway's element-by-element reading is checked against.
fn fetches_a_url(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Array(items) => items.iter().any(fetches_a_url),
        serde_json::Value::Object(o) => {
            let source = o.get("source").and_then(serde_json::Value::as_object);
            source.is_some_and(|s| s.get("type") == Some(&serde_json::json!("url")))
                || source.and_then(|s| s.get("content")).is_some_and(fetches_a_url)
                || o.get("content").is_some_and(fetches_a_url)
        }
        _ => false,
    }
}

fn gateway_target() -> Target {
    let body = |more: &str| format!(r#"{{"model":"m","max_tokens":1,{more}}}"#).into_bytes();
    let seeds = vec![
        body(r#""messages":[{"role":"user","content":"hi"}],"tools":[{"name":"Bash","input_schema":{}}]"#),
        body(r#""messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]"#),
        body(r#""messages":[],"mcp_servers":[{"type":"url","url":"https://x/","name":"x"}]"#),
        body(
            r#""system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image","source":{"type":"url","url":"https://x/"}}]}]}]"#,
        ),
        body(
            r#""messages":[{"role":"user","content":[{"type":"document","source":{"type":"content","content":[{"type":"text","text":"x"}]}},{"type":"search_result","source":"https://x/","content":[]}]}]"#,
        ),
    ];
    Target {
        name: "gateway",
        seeds,
        tokens: vec![
            b"\"type\":\"url\"",
            b"\"source\":{",
            b"\"content\":[",
            b"\"tools\":[{\"type\":\"",
            b"_20250305\"",
            b"\"mcp_servers\":[{}]",
            b"\\u0074",
            b"[[[[[[[[",
        ],
        run: Box::new(|input| {
            let none = std::collections::BTreeSet::new();
            let verdict = warden_daemon::net::api_request::verdict(input, &none, "fuzz");
            // What it forwards asks the API for nothing outside the sandbox,
            // as a walk of the whole tree finds it.
            if let (Ok(None), Ok(tree)) = (&verdict, serde_json::from_slice::<serde_json::Value>(input)) {
                for tool in tree["tools"].as_array().into_iter().flatten() {
                    let kind = tool.get("type").and_then(serde_json::Value::as_str);
                    assert_eq!(
                        warden_policy::ServerTool::of_type(kind),
                        warden_policy::RunsOn::Client,
                        "a forwarded tool the client does not run: {kind:?}"
                    );
                }
                let servers = tree["mcp_servers"].as_array().map_or(0, Vec::len);
                assert_eq!(servers, 0, "forwarded MCP servers");
                assert!(
                    !fetches_a_url(&tree["messages"]) && !fetches_a_url(&tree["system"]),
                    "a forwarded URL source"
                );
            }
            match verdict {
                Ok(None) => summary("forwarded"),
                Ok(Some(why)) => summary(("refused", kind_of(&why))),
                Err(e) => summary(("unreadable", kind_of(&e))),
            }
        }),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = 10u64;
    let mut only: Vec<String> = Vec::new();
    let mut seed = 0x5EED_u64;
    let mut crashes = PathBuf::from("target/fuzz-crashes");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(seconds),
            "--target" => only.extend(args.next()),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            "--crashes" => crashes = args.next().map(PathBuf::from).unwrap_or(crashes),
            _ => {
                eprintln!(
                    "usage: warden-fuzz [--seconds N] [--target profile|config|grpc|stream-json|proxy|http2|gateway]... [--seed N] [--crashes DIR]"
                );
                std::process::exit(64);
            }
        }
    }
    std::fs::create_dir_all(&crashes).expect("the crash directory");
    // Panics are findings, reported by the loop: keep their noise short.
    std::panic::set_hook(Box::new(|info| eprintln!("warden-fuzz: panic: {info}")));
    let targets = [
        profile_target(),
        config_target(),
        grpc_target(),
        stream_json_target(),
        proxy_target(),
        http2_target(),
        gateway_target(),
    ];
    let mut rng = Rng(seed | 1);
    let mut failed = false;
    for t in targets
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t.name))
    {
        match run_target(t, seconds, &mut rng, &crashes) {
            Ok(Ran { runs, corpus, slow }) => println!(
                "warden-fuzz: {:<12} {runs:>8} inputs, corpus {corpus}, {slow} slow, 0 crashes",
                t.name
            ),
            Err(e) => {
                eprintln!("warden-fuzz: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
