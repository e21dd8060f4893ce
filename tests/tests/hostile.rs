//! The daemon under hostile load: caps that hold under concurrency, rate
//! limits, a worker flooding its output or forging permission requests,
//! floods that try to push others' events out of the audit log, and
//! clients that never read. Each needs root (a real wardend and workers).

use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use warden_proto::v1 as pb;
use warden_proto::v1::workers_client::WorkersClient;
use warden_tests::claude::stand_in_claude;
use warden_tests::daemon::{channel, rate, rate_limits, value, Daemon};
use warden_tests::privileged;

fn root() -> bool {
    privileged("runs wardend and its workers")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spawn_request(user: &str, command: &[&str]) -> pb::SpawnRequest {
    pb::SpawnRequest {
        user: user.into(),
        command: command.iter().map(|s| (*s).to_string()).collect(),
        ..Default::default()
    }
}

/// `n` spawns at once (each on its own connection); their results in order.
async fn spawn_at_once(d: &Daemon, reqs: Vec<pb::SpawnRequest>) -> Vec<Result<pb::Worker, tonic::Status>> {
    let mut clients = Vec::new();
    for _ in 0..reqs.len() {
        clients.push(WorkersClient::new(channel(d.socket()).await));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(reqs.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(reqs)
        .map(|(mut c, r)| {
            let b = barrier.clone();
            tokio::spawn(async move {
                b.wait().await;
                c.spawn(r).await.map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[test]
fn concurrent_spawns_never_pass_a_cap() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[("max_workers_per_user", value(8)), ("max_workers", value(12))]);
    let rt = runtime();
    // 40 spawns of one user at once: exactly its cap get through.
    let results = rt.block_on(spawn_at_once(
        &d,
        (0..40).map(|_| spawn_request("alice", &["sleep", "60"])).collect(),
    ));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 8, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), tonic::Code::ResourceExhausted, "{r:?}");
        assert!(r.message().contains("Too many workers for user alice"), "{r:?}");
    }
    // 40 spawns of 40 users at once: exactly the rest of the global cap.
    let results = rt.block_on(spawn_at_once(
        &d,
        (0..40)
            .map(|i| spawn_request(&format!("u{i}"), &["sleep", "60"]))
            .collect(),
    ));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 4, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), tonic::Code::ResourceExhausted, "{r:?}");
        assert!(r.message().starts_with("Too many workers: 12 running"), "{r:?}");
    }
    let listed = d.ctl(&["ps", "--output", "json"]);
    let running = String::from_utf8_lossy(&listed.stdout).matches("\"running\"").count();
    assert_eq!(running, 12, "{}", String::from_utf8_lossy(&listed.stdout));
}

#[test]
fn spawns_past_the_rate_are_refused_and_reported() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[(
        "rate_limits",
        rate_limits(&[
            ("spawns_per_user", rate(5, "1/min")),
            ("spawns_per_caller", rate(8, "1/min")),
        ]),
    )]);
    let spawn = |user: &str| d.ctl(&["spawn", "--user", user, "--", "true"]);
    for _ in 0..5 {
        assert!(spawn("alice").status.success());
    }
    let refused = spawn("alice");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("ResourceExhausted")
            && err.contains("Too many spawns by user alice (rate_limits.spawns_per_user); try again in"),
        "{err}"
    );
    for _ in 0..3 {
        assert!(!spawn("alice").status.success());
    }
    // Another user is not held back by alice's rate, up to the caller's.
    for _ in 0..3 {
        assert!(spawn("bob").status.success());
    }
    let err = String::from_utf8_lossy(&spawn("bob").stderr).into_owned();
    assert!(
        err.contains("Too many spawns by uid 0 (rate_limits.spawns_per_caller)"),
        "{err}"
    );
    // Hitting a limit is an event, once per limit and key per 10 s.
    let limited = d.events(&["--kind", "rate_limited"]);
    let of = |limit: &str| limited.iter().filter(|e| e["limit"] == limit).count();
    assert_eq!(of("spawns_per_user"), 1, "{limited:?}");
    assert_eq!(of("spawns_per_caller"), 1, "{limited:?}");
    let user_event = limited.iter().find(|e| e["limit"] == "spawns_per_user").unwrap();
    assert_eq!(
        (user_event["user"].as_str(), user_event["suppressed"].as_u64()),
        (Some("alice"), Some(1))
    );
}

/// A stand-in for `claude`: reads the initial prompt, then floods its
/// stdout as the prompt says (`lines`, `one-line`, `approvals`).
const FLOODING_CLAUDE: &str = r#"#!/usr/bin/python3
import json, sys, threading
mode = json.loads(sys.stdin.readline())["message"]["content"]
out = sys.stdout.buffer
if mode == "lines":
    block = (b"x" * 1000 + b"\n") * 64
    while True:
        out.write(block)
elif mode == "one-line":
    block = b"y" * 65536
    while True:
        out.write(block)
elif mode == "approvals":
    # Read the daemon's answers, so that nothing blocks but the daemon.
    threading.Thread(target=lambda: [None for _ in sys.stdin], daemon=True).start()
    content = "z" * 100000
    i = 0
    while True:
        i += 1
        msg = {"type": "control_request", "request_id": "forged-%d" % i,
               "request": {"subtype": "can_use_tool", "tool_name": "Write",
                           "input": {"file_path": "/workspace/x", "content": content}}}
        out.write((json.dumps(msg) + "\n").encode())
"#;

#[test]
fn a_flooding_claude_worker_cannot_grow_the_daemon() {
    if !root() {
        return;
    }
    let (_stand_in, claude) = stand_in_claude("flooding-claude", FLOODING_CLAUDE);
    let d = Daemon::start_with(&[("claude_binary", value(claude.display().to_string()))]);
    d.set_credentials("mallory", "sk-test");
    // The daemon, warmed up: a worker of another user has run.
    runs_a_worker(&d);
    let before = d.rss();
    let mut ids = Vec::new();
    for mode in ["lines", "one-line", "approvals"] {
        let out = d.ctl(&["spawn", "--user", "mallory", "--profile", "claude-code", "--", mode]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let started = Instant::now();
    let mut peak = before;
    let mut lists = 0;
    while started.elapsed() < Duration::from_secs(30) {
        peak = peak.max(d.rss());
        // Another user's List is answered throughout. (How fast is the
        // benchmark's business: warden-bench's `List p99` row.)
        let asked = Instant::now();
        let out = d.ctl(&["ps", "--user", "bob", "--output", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "a List took {:?}",
            asked.elapsed()
        );
        lists += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let grown = peak.saturating_sub(before);
    eprintln!(
        "wardend RSS {} MiB before, peak {} MiB; {lists} Lists answered",
        before >> 20,
        peak >> 20
    );
    assert!(grown < 64 << 20, "wardend grew by {} MiB", grown >> 20);
    // The three ran all along (their floods were slowed, not fatal).
    for id in &ids {
        let out = d.ctl(&["inspect", "--output", "json", id]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"running\""), "{id}");
    }
    // The forged permission requests: a few asked, the rest denied and
    // counted, in bounded events.
    let events = d.events(&["--worker", &ids[2]]);
    let asked = events.iter().filter(|e| e["kind"] == "approval_requested").count();
    assert!((1..=16).contains(&asked), "{asked} requests wait (16 at most)");
    let request = events.iter().find(|e| e["kind"] == "approval_requested").unwrap();
    assert!(request["truncated"]["bytes"].as_u64().unwrap() > 100_000, "{request}");
    assert!(request["input"].as_str().unwrap().len() <= 16 << 10);
    let suppressed: u64 = events
        .iter()
        .filter(|e| e["kind"] == "rate_limited" && e["limit"] == "worker_approvals")
        .map(|e| e["suppressed"].as_u64().unwrap())
        .sum();
    assert!(
        suppressed > 100,
        "forged requests past the rate are counted: {suppressed}"
    );
    for id in &ids {
        assert!(d.ctl(&["stop", id]).status.success());
    }
}

#[test]
fn floods_do_not_push_another_users_events_out_of_the_log() {
    if !root() {
        return;
    }
    let (_stand_in, claude) = stand_in_claude("flooding-claude", FLOODING_CLAUDE);
    // A small log (3 × 128 KiB) and a budget of 32 KiB then 2 KiB/s per
    // user and per calling uid.
    let d = Daemon::start_with(&[
        ("claude_binary", value(claude.display().to_string())),
        ("audit_max_bytes", value(128 << 10)),
        ("audit_keep", value(2)),
        ("audit_budget", rate(32 << 10, "2K/s")),
    ]);
    d.set_credentials("mallory", "sk-test");
    // wardend says what that guarantees: (384 KiB - 32 KiB) / 2 KiB/s.
    assert!(
        d.log()
            .contains("pushes nobody else's events out in no less than 176 s"),
        "{}",
        d.log()
    );
    for i in 0..3 {
        let out = d.ctl(&["spawn", "--user", "bob", "-w", "--", "echo", &format!("bob {i}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let bobs = |events: &[serde_json::Value]| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["user"] == "bob")
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    let before = bobs(&d.audit_events());
    assert!(before.len() >= 6, "{before:?}");
    let flood_started = Instant::now();
    // 1. Spawns with a 100 KiB command line, as fast as they are taken.
    let huge = "A".repeat(100 << 10);
    let mut refused = String::new();
    for _ in 0..60 {
        let out = d.ctl(&["spawn", "--user", "mallory", "--", "echo", &huge]);
        if !out.status.success() {
            refused = String::from_utf8_lossy(&out.stderr).into_owned();
        }
    }
    assert!(
        refused.contains("Too many spawns by user mallory") || refused.contains("audit_budget"),
        "{refused}"
    );
    // 2. Refused calls by a local account in group warden.
    for _ in 0..200 {
        let out = d.ctl_as_nobody(&["spawn", "--user", "bob", "--", "true"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    }
    // 3. A worker forging permission requests (once mallory's spawns are
    // let through again).
    let retry_until = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = d.ctl(&[
            "spawn",
            "--user",
            "mallory",
            "--profile",
            "claude-code",
            "--",
            "approvals",
        ]);
        if out.status.success() || Instant::now() > retry_until {
            break out;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ResourceExhausted"), "{err}");
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(10));
    let forger = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(d.ctl(&["stop", &forger]).status.success());
    // One more refusal, once a report is due again: it carries the count
    // of those before it that were left out.
    assert!(!d
        .ctl_as_nobody(&["spawn", "--user", "bob", "--", "true"])
        .status
        .success());
    let flood = flood_started.elapsed();
    let after = d.audit_events();
    // Every one of bob's events is still there.
    let kept = bobs(&after);
    assert!(
        before.iter().all(|s| kept.contains(s)),
        "bob's events {before:?}, kept {kept:?}"
    );
    // The log never rotated away its first file's events.
    assert_eq!(after[0]["seq"], 1, "the oldest event is still the first");
    // The flood shows as counted, suppressed events.
    let limited: Vec<_> = after.iter().filter(|e| e["kind"] == "rate_limited").collect();
    let suppressed = |limit: &str| -> u64 {
        limited
            .iter()
            .filter(|e| e["limit"] == limit)
            .map(|e| e["suppressed"].as_u64().unwrap())
            .sum()
    };
    let denied: Vec<_> = after.iter().filter(|e| e["kind"] == "auth_denied").collect();
    // Each report counts the refusals left out before it; the audit
    // budget of uid 65534 counts what it kept out itself.
    let reported: u64 = denied.len() as u64
        + denied.iter().map(|e| e["suppressed"].as_u64().unwrap()).sum::<u64>()
        + limited
            .iter()
            .filter(|e| e["limit"] == "audit_budget" && e["peer_uid"] == 65534)
            .map(|e| e["suppressed"].as_u64().unwrap())
            .sum::<u64>();
    assert!(
        denied.len() < 60,
        "{} auth_denied events for 200 refusals",
        denied.len()
    );
    assert!(reported >= 100, "refusals reported and counted: {reported} of 201");
    assert!(
        suppressed("worker_approvals") + suppressed("audit_budget") > 0,
        "{limited:?}"
    );
    // What mallory (and nobody's uid) could have left out, it did, past
    // the budget (burst + rate × time); what must be written (starts,
    // exits, decisions) was, and held mallory's spawns back meanwhile.
    let bytes_of = |pred: &dyn Fn(&serde_json::Value) -> bool| -> usize {
        after.iter().filter(|e| pred(e)).map(|e| e.to_string().len() + 1).sum()
    };
    let budget = (32 << 10) + 2048 * (usize::try_from(flood.as_secs()).unwrap() + 1);
    let must = [
        "worker_started",
        "worker_exited",
        "spawn_failed",
        "approval_decided",
        "rate_limited",
    ];
    let optional = bytes_of(&|e| e["user"] == "mallory" && !must.contains(&e["kind"].as_str().unwrap_or("")));
    let written = bytes_of(&|e| e["user"] == "mallory");
    eprintln!("mallory wrote {written} bytes ({optional} of reports) in {flood:?}; budget {budget}");
    assert!(optional <= budget, "{optional} > {budget}");
    let started = after
        .iter()
        .filter(|e| e["user"] == "mallory" && e["kind"] == "worker_started")
        .count();
    assert!(started < 60, "{started} of 60 large spawns ran");
    let nobody = bytes_of(&|e| e["kind"] == "auth_denied" && e["peer_uid"] == 65534);
    assert!(nobody <= budget, "{nobody}");
}

#[test]
fn idle_watchers_and_stalled_attach_clients_leave_the_daemon_responsive() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[
        ("max_workers_per_user", value(8)),
        ("client_timeout_seconds", value(5)),
        ("max_connections_per_caller", value(128)),
    ]);
    let rt = runtime();
    // A worker with endless output that 100 attached clients never read.
    let out = d.ctl(&["spawn", "--user", "alice", "--", "sh", "-c", "yes output-line"]);
    let loud = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let before = d.rss();
    let sock = d.socket();
    let held = rt.block_on(async {
        let mut held = Vec::new();
        // 600 Watch streams on 10 connections, live from now.
        for _ in 0..10 {
            let ch = channel(sock.clone()).await;
            for _ in 0..60 {
                let mut c = pb::events_client::EventsClient::new(ch.clone());
                let s = c
                    .watch(pb::WatchRequest {
                        from_seq: 0,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                held.push(Box::new(s) as Box<dyn std::any::Any + Send>);
            }
        }
        for _ in 0..100 {
            // Each stalls the daemon's sender after 64 KiB, not after
            // hyper's default 2 MiB window (200 MB in all to fill).
            let mut c = WorkersClient::new(warden_tests::daemon::small_window_channel(sock.clone()).await);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Start(pb::AttachStart {
                    id: loud.clone(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let s = c
                .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            held.push(Box::new((s, tx, c)) as Box<dyn std::any::Any + Send>);
        }
        held
    });
    std::thread::sleep(Duration::from_secs(2));
    // Another user's spawn, stop and List still work promptly (a deadline
    // that only a stalled daemon misses; the latency is the benchmark's).
    let t = Instant::now();
    let out = d.ctl(&["spawn", "--user", "bob", "--", "sleep", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(d.ctl(&["ps", "--user", "bob"]).status.success());
    assert!(d.ctl(&["stop", &id]).status.success());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The stalled clients are cut off, and the daemon holds little for them.
    std::thread::sleep(Duration::from_secs(7));
    let during = d.rss();
    eprintln!(
        "wardend RSS {} MiB before, {} MiB with 600 watchers and 100 stalled attach clients",
        before >> 20,
        during >> 20
    );
    assert!(
        during.saturating_sub(before) < 64 << 20,
        "{} MiB",
        (during - before) >> 20
    );
    rt.block_on(async move {
        let mut cut = 0;
        for h in held {
            if let Ok(mut a) = h.downcast::<(
                tonic::Streaming<pb::AttachResponse>,
                tokio::sync::mpsc::Sender<pb::AttachRequest>,
                WorkersClient<tonic::transport::Channel>,
            )>() {
                // Read what was queued; the end is the cut-off status. A
                // stream that goes on past what the daemon may queue for it
                // (4 messages, the send buffer, the client's 64 KiB
                // window: under a dozen of 16 KiB) was never cut off: the
                // worker's output is endless, so it would go on forever.
                let mut read = 0;
                let end = loop {
                    match tokio::time::timeout(Duration::from_secs(10), a.0.next()).await {
                        Ok(Some(Ok(_))) if read < 256 => read += 1,
                        Ok(Some(Ok(_))) => panic!("an Attach stream stalled for 7 s was never cut off"),
                        Ok(Some(Err(e))) => break Some(e),
                        _ => break None,
                    }
                };
                if let Some(e) = end {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    assert!(e.message().contains("read nothing for 5 s"), "{e:?}");
                    cut += 1;
                }
            }
        }
        assert_eq!(cut, 100, "every stalled Attach client was cut off");
    });
    assert!(d.ctl(&["stop", &loud]).status.success());
}

#[test]
fn denied_calls_cost_the_worker_not_the_daemon() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    // Warm: the daemon has served a worker.
    assert!(d
        .ctl(&["spawn", "--user", "alice", "-w", "--", "true"])
        .status
        .success());
    let before = d.cpu_time();
    // chroot is denied by every profile: each call waits for its answer.
    let script = "import os, time\nn = 0\nend = time.time() + 10\nwhile time.time() < end:\n    try:\n        os.chroot('/tmp')\n    except PermissionError:\n        n += 1\nprint(n)\n";
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "python3", "-c", script]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let denied: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let daemon = d.cpu_time().saturating_sub(before);
    let exited = d.events(&["--kind", "worker_exited", "--user", "alice"]).pop().unwrap();
    let worker = Duration::from_micros(exited["cpu_time_us"].as_u64().unwrap());
    eprintln!("{denied} denied calls; the worker's cgroup used {worker:?} of CPU, the daemon {daemon:?}");
    assert!(denied > 10_000, "every call was answered EPERM: {denied}");
    // Answering them (in the worker's init) is the worker's CPU, not ours.
    assert!(daemon < Duration::from_millis(1500), "the daemon used {daemon:?}");
    assert!(daemon * 5 < worker, "daemon {daemon:?}, worker {worker:?}");
    // And they are reported, rate-limited, with the rest counted.
    let reports = d.events(&["--kind", "sandbox_denial", "--user", "alice"]);
    let counted: u64 = reports
        .iter()
        .map(|e| 1 + e["suppressed"].as_u64().unwrap())
        .sum::<u64>()
        - u64::from(reports.last().is_some_and(|e| e["syscall"] == "(suppressed)"));
    assert!(reports.len() < 200, "{} reports", reports.len());
    assert_eq!(counted, denied, "every denial is reported or counted");
}

/// Opens `streams` Spawn requests on a raw HTTP/2 connection to `sock`,
/// each declaring a message of `len` bytes and sending all of it but the
/// last byte; returns what keeps them open.
async fn half_sent_messages(sock: &std::path::Path, streams: usize, len: u32) -> Vec<Box<dyn std::any::Any + Send>> {
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(sock).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..streams {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = hyper::Request::post("http://wardend/warden.v1.Workers/Spawn")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        sender.ready().await.unwrap();
        let answer = tokio::spawn(sender.send_request(req));
        let feed = tokio::spawn(async move {
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&len.to_be_bytes());
            if tx.send(Ok(hyper::body::Frame::data(prefix.into()))).await.is_err() {
                return;
            }
            let chunk = bytes::Bytes::from(vec![b'a'; 64 << 10]);
            let mut left = len as usize - 1;
            while left > 0 {
                let n = left.min(chunk.len());
                if tx.send(Ok(hyper::body::Frame::data(chunk.slice(..n)))).await.is_err() {
                    return;
                }
                left -= n;
            }
            // Never the last byte.
            std::future::pending::<()>().await;
        });
        held.push(Box::new((answer, feed)));
    }
    held.push(Box::new(sender));
    held
}

#[test]
fn half_sent_requests_cannot_grow_the_daemon() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[("max_connections_per_caller", value(64))]);
    let rt = runtime();
    runs_a_worker(&d);
    let before = d.rss();
    // One uid (root, this test) opens 16 connections with 20 requests each,
    // every one a Spawn of 4 MiB (the largest message) short of its last
    // byte: 1.3 GB if the daemon took all of it.
    let sock = d.socket();
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..16 {
            held.extend(half_sent_messages(&sock, 20, (4 << 20) - 64).await);
        }
        held
    });
    std::thread::sleep(Duration::from_secs(5));
    let during = d.rss();
    eprintln!(
        "wardend RSS {} MiB before, {} MiB with 320 half-sent 4 MiB requests",
        before >> 20,
        during >> 20
    );

    // Its pool (64 MiB) and the connections' receive windows (1 MiB each).
    assert!(
        during.saturating_sub(before) < 112 << 20,
        "wardend grew by {} MiB",
        (during - before) >> 20
    );
    // Another uid is served as ever: a plain member of the socket group
    // lists and runs its own workers.
    let t = Instant::now();
    let out = d.ctl_as_nobody(&["spawn", "--user", "nobody", "-w", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.ctl_as_nobody(&["ps"]).status.success());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Once they go, the uid's pool is whole again.
    drop(rt);
    drop(held);
    runs_a_worker(&d);
}

/// HPACK bombs: a header block of 64 KB that adds one table entry of
/// 4,000 bytes and then names it 60,000 times (240 MB of fields), and one
/// of 64 KB of Huffman code, on 8 connections at once. Each connection is
/// ended when its block's fields pass twice the largest block; wardend's
/// memory never holds the fields, and it serves on.
#[test]
fn hpack_bombs_end_their_connection_and_cost_the_daemon_little() {
    if !root() {
        return;
    }
    use std::io::{Read, Write};
    let d = Daemon::start();
    runs_a_worker(&d);
    let before = d.peak_rss();
    let frames = |block: &[u8]| {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
        let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
        for (i, c) in chunks.iter().enumerate() {
            let kind = if i == 0 { 1 } else { 9 }; // HEADERS, CONTINUATION
            let flags = if i + 1 == chunks.len() { 4 } else { 0 }; // END_HEADERS
            let len = u32::try_from(c.len()).unwrap().to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, flags, 0, 0, 0, 1]);
            out.extend_from_slice(c);
        }
        out
    };
    // A literal with indexing: name "n", value of 4,000 bytes (127 + 3873).
    let mut named = vec![0x40, 1, b'n', 0x7f, 0xa1, 0x1e];
    named.extend_from_slice(&[b'v'; 4000]);
    named.extend(std::iter::repeat_n(0x80 | 62, 60_000));
    // A literal without indexing whose value is 64,000 bytes of Huffman
    // code ('0' is five zero bits): 102,400 bytes decoded.
    let mut huffman = vec![0x00, 1, b'h', 0xff];
    let mut rest = 64_000 - 127;
    while rest >= 128 {
        huffman.push(u8::try_from(rest % 128).unwrap() | 0x80);
        rest /= 128;
    }
    huffman.push(u8::try_from(rest).unwrap());
    huffman.extend(std::iter::repeat_n(0u8, 64_000));
    let socket = d.socket();
    let attacks: Vec<_> = (0..8)
        .map(|i| {
            let bytes = frames(if i % 2 == 0 { &named } else { &huffman });
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = s.write_all(&bytes);
                // The daemon ends the connection (after its own SETTINGS
                // and, maybe, a GOAWAY): read to the end.
                let mut sink = Vec::new();
                match s.read_to_end(&mut sink) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    for a in attacks {
        assert_eq!(a.join().unwrap(), Ok(()), "a bomb's connection was not ended");
    }
    grew_less_than(&d, before, 32 << 20, "8 HPACK bombs");
}

/// wardend runs a worker (of bob's, `true`) to its end: it serves.
fn runs_a_worker(d: &Daemon) {
    let out = d.ctl(&["spawn", "--user", "bob", "-w", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// wardend's peak memory grew by less than `most` bytes since `before`
/// (what `what` did), and it serves on.
fn grew_less_than(d: &Daemon, before: u64, most: u64, what: &str) {
    let peak = d.peak_rss();
    eprintln!(
        "wardend peak RSS {} MiB before, {} MiB after {what}",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak.saturating_sub(before) < most,
        "wardend's peak grew by {} MiB",
        (peak - before) >> 20
    );
    runs_a_worker(d);
}

/// Requests that decode to far more than their bytes: a SpawnRequest of
/// 3.8 MB holds 1.9 million empty arguments (2 bytes each on the wire, 24
/// in memory: 45 MB decoded). Eight at once are refused on the wire, before
/// prost decodes them, and wardend's peak memory holds no more than their
/// bytes (it grew by 116 MiB when they were decoded).
#[test]
fn requests_that_decode_to_far_more_than_their_bytes_are_refused_undecoded() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runs_a_worker(&d);
    let before = d.peak_rss();
    let rt = runtime();
    let socket = d.socket();
    let answers = rt.block_on(async move {
        let mut calls = Vec::new();
        for _ in 0..8 {
            let socket = socket.clone();
            calls.push(tokio::spawn(async move {
                let mut c = WorkersClient::new(channel(socket).await);
                let mut command = vec![String::new(); 1_900_000];
                command[0] = "true".into();
                c.spawn(pb::SpawnRequest {
                    user: "bob".into(),
                    command,
                    ..Default::default()
                })
                .await
                .map(|_| ())
            }));
        }
        let mut answers = Vec::new();
        for c in calls {
            answers.push(c.await.unwrap());
        }
        answers
    });
    for a in answers {
        let e = a.expect_err("refused");
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "command: at most 65536 entries")
        );
    }
    grew_less_than(&d, before, 48 << 20, "8 requests of 1.9 million arguments");
}

#[test]
fn connections_past_the_per_uid_cap_are_refused() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[("max_connections_per_caller", value(4))]);
    let rt = runtime();
    let list = |c: tonic::transport::Channel| async move {
        WorkersClient::new(c)
            .list(pb::ListWorkersRequest::default())
            .await
            .map(|_| ())
    };
    let mut open = rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..4 {
            let c = channel(d.socket()).await;
            list(c.clone()).await.expect("within the cap");
            open.push(c);
        }
        open
    });
    let fifth = rt.block_on(async { list(channel(d.socket()).await).await });
    let e = fifth.expect_err("a fifth connection of the same uid");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("uid 0 has 4 connections"), "{e:?}");
    // The cap is per uid: another uid is served.
    assert!(d.ctl_as_nobody(&["ps"]).status.success());
    // The open ones still work, and a closed one makes room.
    rt.block_on(async {
        list(open[0].clone()).await.expect("an open connection");
        drop(open.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        list(channel(d.socket()).await).await.expect("room again");
    });
}

/// The daemon's child processes (launchers), zombies included.
fn children_of(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("ps")
        .args(["-o", "pid=,stat=,comm=", "--ppid", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The workers' inits: the children of the daemon's launch server (its
/// one child).
fn inits_of(daemon: u32) -> Vec<String> {
    let server = children_of(daemon);
    assert_eq!(
        server.len(),
        1,
        "the daemon's one child is its launch server: {server:?}"
    );
    let pid = server[0]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    children_of(pid)
}

#[test]
fn clients_that_vanish_mid_spawn_or_mid_stop_leave_nothing_half_done() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[("max_workers_per_user", value(32))]);
    let rt = runtime();
    let ids = rt.block_on(async {
        let mut c = WorkersClient::new(channel(d.socket()).await);
        // Spawns whose clients give up after a few milliseconds, in the
        // middle of the spawn's phases.
        let mut gave_up = 0;
        for i in 0..20u64 {
            let r = tokio::time::timeout(
                Duration::from_millis(1 + i % 7),
                c.spawn(spawn_request("alice", &["sh", "-c", "trap '' TERM; sleep 30"])),
            )
            .await;
            if r.is_err() {
                gave_up += 1;
            }
        }
        // The same for spawns that come in an Attach (`wardenctl spawn -w`).
        for i in 0..10u64 {
            let start = pb::AttachStart {
                spawn: Some(spawn_request("alice", &["sh", "-c", "trap '' TERM; sleep 30"])),
                ..Default::default()
            };
            let requests = tokio_stream::iter([pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Start(start)),
            }]);
            let r = tokio::time::timeout(Duration::from_millis(1 + i % 7), c.attach(requests)).await;
            if r.is_err() {
                gave_up += 1;
            }
        }
        assert!(gave_up > 0, "no client gave up mid-spawn");
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Every spawn that started finished: each worker is registered.
        let listed = c
            .list(pb::ListWorkersRequest {
                user: "alice".into(),
                include_exited: true,
                usage: false,
            })
            .await
            .unwrap()
            .into_inner()
            .workers;
        listed.into_iter().map(|w| w.id).collect::<Vec<_>>()
    });
    let started = d
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "worker_started")
        .count();
    assert_eq!(ids.len(), started, "a started worker is missing from the registry");
    assert_eq!(
        inits_of(d.pid()).len(),
        started,
        "an init without a worker: {:?}",
        inits_of(d.pid())
    );
    // Stops whose clients give up during the grace period: the workers
    // ignore SIGTERM, and are still killed when the grace runs out.
    rt.block_on(async {
        let mut c = WorkersClient::new(channel(d.socket()).await);
        for id in &ids {
            let _ = tokio::time::timeout(
                Duration::from_millis(50),
                c.stop(pb::StopRequest {
                    id: id.clone(),
                    grace_seconds: 1,
                }),
            )
            .await;
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let events = d.audit_events();
    let killed = events
        .iter()
        .filter(|e| e["kind"] == "worker_exited" && e["signal"] == 9)
        .count();
    assert_eq!(killed, started, "every stop escalated to SIGKILL");
    assert!(inits_of(d.pid()).is_empty(), "{:?}", inits_of(d.pid()));
    assert!(d.cgroup_children().is_empty(), "{:?}", d.cgroup_children());
}

/// Threads of process `pid`.
fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

#[test]
fn running_workers_hold_no_daemon_thread() {
    if !root() {
        return;
    }
    let d = Daemon::start_with(&[("max_workers_per_user", value(8))]);
    runs_a_worker(&d);
    std::thread::sleep(Duration::from_secs(1));
    let before = threads_of(d.pid());
    let mut ids = Vec::new();
    for i in 0..24 {
        let user = format!("idle{}", i % 3);
        let out = d.ctl(&["spawn", "--user", &user, "--", "sleep", "60"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = threads_of(d.pid());
    eprintln!("wardend threads: {before} before, {during} with 24 running workers");
    // A worker's exit is awaited on its pidfd: the blocking pool keeps only
    // the few threads the spawns themselves used.
    assert!(during <= before + 4, "{before} -> {during} threads");
    for id in &ids {
        assert!(d.ctl(&["stop", "--grace", "1", id]).status.success());
    }
    // And exits are still seen: each stopped worker has its exit event.
    let exited = d
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "worker_exited" && ids.iter().any(|id| e["worker"] == id.as_str()))
        .count();
    assert_eq!(exited, ids.len());
}
