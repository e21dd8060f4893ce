//! Events end to end: what the daemon publishes, the audit log behind it,
//! and Watch's replay-then-live hand-over, against a real wardend.

use std::time::{Duration, Instant};

use serde_json::Value;
use warden_tests::daemon::{value, Daemon};
use warden_tests::*;

fn root() -> bool {
    privileged("runs wardend with real sandboxes and cgroups")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// Polls `wardenctl events` until `pred` holds (events arrive asynchronously).
fn events_until(d: &Daemon, args: &[&str], what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = d.events(args);
        if pred(&ev) {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            kinds(&ev)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TIGHT: &str = "extends = \"base\"\n[limits]\nmemory = \"64M\"\nmemory_swap = \"64M\"\npids = 32\n";

#[test]
fn a_workers_life_is_in_the_events_and_the_audit_log() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    let ev = events_until(&d, &[], "worker_exited", |e| kinds(e).contains(&"worker_exited"));
    assert_eq!(kinds(&ev)[0], "daemon_started");
    let started = ev.iter().find(|e| e["kind"] == "worker_started").unwrap();
    assert_eq!(started["user"], "alice");
    assert_eq!(started["profile"], "base");
    assert_eq!(started["no_new_privs"], true);
    assert!(started["landlock_abi"].as_u64().unwrap() >= 6);
    assert_eq!(started["policy_digest"].as_str().unwrap().len(), 64);
    let exited = ev.iter().find(|e| e["kind"] == "worker_exited").unwrap();
    assert_eq!(
        (exited["code"].as_i64(), exited["reason"].as_str()),
        (Some(4), Some("exited"))
    );
    assert_eq!(exited["worker"], started["worker"]);
    // Sequence numbers are dense and the audit log holds exactly what Watch replays.
    let s = seqs(&ev);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "{s:?}");
    assert_eq!(d.audit_events(), ev);
    // A failed spawn is an event with its stage.
    d.ctl(&["spawn", "--user", "alice", "--", "/no/such/program"]);
    let ev = events_until(&d, &["--kind", "spawn_failed"], "spawn_failed", |e| !e.is_empty());
    assert_eq!(
        (ev[0]["stage"].as_str(), ev[0]["errno"].as_i64()),
        (Some("exec"), Some(2))
    );
}

#[test]
fn oom_and_fork_bomb_produce_limit_events() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    std::fs::write(d.dir.path().join("profiles/tight.toml"), TIGHT).unwrap();
    assert!(d.ctl(&["profile", "reload"]).status.success());
    let hog = d.ctl(&[
        "spawn",
        "--user",
        "alice",
        "--profile",
        "tight",
        "-w",
        "--",
        "python3",
        "-c",
        "b = bytearray(512 << 20)",
    ]);
    assert_eq!(hog.status.code(), Some(137), "{}", text(&hog.stderr));
    let ev = events_until(
        &d,
        &["--kind", "limit_reached", "--kind", "worker_exited"],
        "oom",
        |e| e.iter().any(|e| e["kind"] == "worker_exited"),
    );
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "limit_reached" && e["limit"] == "oom_kill"),
        "{ev:#?}"
    );
    let exited = ev.iter().find(|e| e["kind"] == "worker_exited").unwrap();
    assert_eq!(exited["reason"], "oom");

    let bomb = "i=0; while [ $i -lt 200 ]; do sleep 2 & i=$((i+1)); done 2>/dev/null; wait";
    d.ctl(&[
        "spawn",
        "--user",
        "alice",
        "--profile",
        "tight",
        "-w",
        "--",
        "sh",
        "-c",
        bomb,
    ]);
    let ev = events_until(&d, &["--kind", "limit_reached"], "pids_max", |e| {
        e.iter().any(|e| e["limit"] == "pids_max")
    });
    assert!(ev.iter().any(|e| e["limit"] == "pids_max"));
}

#[test]
fn resource_samples_arrive_at_the_interval_with_plausible_values() {
    if !root() {
        return;
    }
    let d = Daemon::start(); // sample_interval_seconds = 1 in the test config
    let script = "import time\nb = bytearray(100 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(3.5)\n";
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "python3", "-c", script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ev = d.events(&["--kind", "resource_sample"]);
    assert!(ev.len() >= 2, "at least two samples in ~3.5 s at 1 s: {}", ev.len());
    let times: Vec<u64> = ev.iter().map(|e| e["time_ms"].as_u64().unwrap()).collect();
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!((500..=2500).contains(&gap), "samples {gap} ms apart");
    }
    let max_mem = ev.iter().map(|e| e["memory_current"].as_u64().unwrap()).max().unwrap();
    assert!((100 << 20..400 << 20).contains(&max_mem), "memory_current {max_mem}");
    assert!(ev.iter().all(|e| e["pids"].as_u64().unwrap() >= 1));
}

#[test]
fn auth_denials_are_events() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let out = d.ctl_as_nobody(&["spawn", "--user", "alice", "--", "true"]);
    assert!(text(&out.stderr).contains("PermissionDenied"));
    // In the audit log before the refusal was answered.
    let on_disk = d
        .audit_events()
        .into_iter()
        .filter(|e| e["kind"] == "auth_denied")
        .count();
    assert_eq!(on_disk, 1, "{:?}", d.audit_events());
    let ev = events_until(&d, &["--kind", "auth_denied"], "auth_denied", |e| !e.is_empty());
    assert_eq!(ev[0]["peer_uid"], 65534);
    assert_eq!(ev[0]["method"], "Workers.Spawn");
    assert_eq!(ev[0]["target_user"], "alice");
    // nobody sees its own events only: not the daemon's, not alice's.
    let out = d.ctl_as_nobody(&["events", "--output", "json"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).trim().is_empty(), "{}", text(&out.stdout));
}

#[test]
fn a_client_that_resumes_from_its_last_seq_gets_every_event_exactly_once() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    for i in 0..5 {
        d.ctl(&["spawn", "--user", "alice", "-w", "--", "sh", "-c", &format!("exit {i}")]);
    }
    let first = d.events(&[]);
    // The client "dies" after the first half and resumes from its last seq.
    let half = first.len() / 2;
    let last = first[half - 1]["seq"].as_u64().unwrap();
    for i in 0..3 {
        d.ctl(&["spawn", "--user", "alice", "-w", "--", "sh", "-c", &format!("exit {i}")]);
    }
    let resumed = d.events(&["--since", &(last + 1).to_string()]);
    let mut all: Vec<u64> = seqs(&first[..half]);
    all.extend(seqs(&resumed));
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expected, "no gap, no duplicate");
    assert_eq!(all.len(), d.audit_events().len());
}

#[test]
fn live_watch_continues_the_replay_without_gap_or_duplicate() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    d.ctl(&["spawn", "--user", "alice", "-w", "--", "true"]);
    let mut watcher = d
        .ctl_command(&["events", "-f", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..4 {
        d.ctl(&["spawn", "--user", "alice", "-w", "--", "true"]);
    }
    let total = d.audit_events().len();
    // Read what the watcher prints until it has printed as many events as
    // the log holds (however long a loaded machine takes), then a moment
    // more for any duplicate.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let seq = serde_json::from_str::<Value>(&line).unwrap()["seq"].as_u64().unwrap();
            if tx.send(seq).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < total {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(seq) => got.push(seq),
            Err(_) => break,
        }
    }
    got.extend(rx.recv_timeout(Duration::from_millis(300)));
    watcher.kill().unwrap();
    let _ = watcher.wait();
    assert_eq!(got, (1..=total as u64).collect::<Vec<_>>());
}

#[test]
fn kill_9_during_a_burst_loses_nothing_published_and_seq_continues() {
    if !root() {
        return;
    }
    let mut d = Daemon::start();
    let mut watcher = d
        .ctl_command(&["events", "-f", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A burst: spawns in the background while the daemon is killed.
    let sock = d.socket();
    let burst = std::thread::spawn(move || {
        for _ in 0..30 {
            let _ = std::process::Command::new(bin_dir().join("wardenctl"))
                .arg("--socket")
                .arg(&sock)
                .args(["spawn", "--user", "alice", "--", "true"])
                .output();
        }
    });
    // What the watcher prints, as it prints it: the crash comes once it has
    // printed something (however long a loaded machine takes to start it),
    // in the middle of the burst.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(seq) = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v["seq"].as_u64())
            {
                let _ = tx.send(seq);
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the watcher prints events");
    std::thread::sleep(Duration::from_millis(400));
    d.crash();
    burst.join().unwrap();
    let _ = watcher.kill();
    let _ = watcher.wait();
    reader.join().unwrap();
    let published: Vec<u64> = std::iter::once(first).chain(rx.try_iter()).collect();
    // Every line on disk parses (audit_events panics otherwise), and every
    // event a client saw is on disk.
    let on_disk = seqs(&d.audit_events());
    for s in &published {
        assert!(on_disk.contains(s), "published seq {s} is not in the audit log");
    }
    d.spawn_daemon();
    let after = d.audit_events();
    let s = seqs(&after);
    assert!(
        s.windows(2).all(|w| w[1] == w[0] + 1),
        "seq continues across the crash: {s:?}"
    );
    let restart = after.iter().rev().find(|e| e["kind"] == "daemon_started").unwrap();
    assert!(restart["seq"].as_u64().unwrap() > *on_disk.last().unwrap());
}

#[test]
fn a_torn_audit_line_is_cut_and_reported_at_start() {
    if !root() {
        return;
    }
    let mut d = Daemon::start();
    d.ctl(&["spawn", "--user", "alice", "-w", "--", "true"]);
    d.crash();
    let before = d.audit_events();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(d.audit_log()).unwrap();
    let torn = br#"{"seq":999,"time_ms":1,"kind":"work"#;
    f.write_all(torn).unwrap();
    drop(f);
    d.spawn_daemon();
    let after = d.audit_events();
    let started = after.last().unwrap();
    assert_eq!(started["kind"], "daemon_started");
    assert_eq!(started["audit_torn_bytes"].as_u64(), Some(torn.len() as u64));
    assert_eq!(
        started["seq"].as_u64().unwrap(),
        before.last().unwrap()["seq"].as_u64().unwrap() + 1
    );
}

#[test]
fn rotation_keeps_seq_continuity() {
    if !root() {
        return;
    }
    let mut d = Daemon::start_with(&[("audit_max_bytes", value(2048)), ("audit_keep", value(3))]);
    for _ in 0..6 {
        d.ctl(&["spawn", "--user", "alice", "-w", "--", "true"]);
    }
    assert!(
        std::path::Path::new(&format!("{}.1", d.audit_log().display())).exists(),
        "rotated"
    );
    assert!(
        !std::path::Path::new(&format!("{}.4", d.audit_log().display())).exists(),
        "keeps 3"
    );
    let kept = d.audit_events();
    let s = seqs(&kept);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "{s:?}");
    // Watch replays across the rotated files in order.
    let first = s[0].to_string();
    assert_eq!(seqs(&d.events(&["--since", &first])), s);
    // And a restart continues after the newest.
    d.crash();
    d.spawn_daemon();
    let after = seqs(&d.audit_events());
    assert_eq!(*after.last().unwrap(), s.last().unwrap() + 1);
}

#[test]
fn a_subscriber_that_stops_reading_is_cut_off_while_a_fast_one_keeps_up() {
    if !root() {
        return;
    }
    // A 16-event live buffer: the fast one falls behind the live stream
    // too (events are written in batches) and is served from the log.
    let d = Daemon::start_with(&[("events_buffer", value(16)), ("client_timeout_seconds", value(2))]);
    let watch = |stdout| {
        d.ctl_command(&["events", "-f", "--output", "json", "--kind", "profiles_reloaded"])
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The slow one's stdout is a pipe nobody reads: it stops reading its stream.
    let mut slow = watch(std::process::Stdio::piped());
    let mut fast = watch(std::process::Stdio::piped());
    // The fast one's lines as they come; it says when it has all of them.
    let n = 8000;
    let (all_in, has_all) = std::sync::mpsc::channel();
    let fast_reader = {
        let out = fast.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut count = 0;
            for _ in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                count += 1;
                if count == n {
                    let _ = all_in.send(());
                }
            }
            count
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Enough to overflow the pipe, both HTTP/2 windows, the per-subscriber
    // queue and the 16-event live buffer: n.
    let sock = d.socket();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let channel = warden_tests::daemon::channel(sock).await;
        let mut profiles = warden_proto::v1::profiles_client::ProfilesClient::new(channel);
        for _ in 0..n {
            profiles
                .reload(warden_proto::v1::ReloadProfilesRequest {})
                .await
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    // The slow subscriber's stream ended, after what was queued for it,
    // with a status naming where to resume.
    let mut slow_out = slow.stdout.take().unwrap();
    let mut drained = String::new();
    let _ = std::io::Read::read_to_string(&mut slow_out, &mut drained);
    let status = slow.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut slow.stderr.take().unwrap(), &mut err);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("ResourceExhausted") && err.contains("read nothing for 2 s and was cut off"),
        "{err}"
    );
    let got = drained.lines().count();
    assert!(got < n, "the slow one got {got} of {n}");
    let last: u64 = serde_json::from_str::<serde_json::Value>(drained.lines().last().unwrap()).unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert!(err.contains(&format!("resume with from_seq {}", last + 1)), "{err}");
    // The fast one saw all of them (however long a loaded machine takes
    // to print them), and no more.
    let _ = has_all.recv_timeout(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(fast.id()).expect("a pid fits pid_t")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .ok();
    let _ = fast.wait();
    assert_eq!(fast_reader.join().unwrap(), n, "the fast subscriber kept up");
}

#[test]
fn seccomp_denials_are_events_and_a_storm_is_rate_limited() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let script = "import os\nn = 0\nfor i in range(2000):\n    try:\n        os.chroot('/tmp')\n    except PermissionError:\n        n += 1\nprint(n)\n";
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "python3", "-c", script]);
    assert_eq!(
        text(&out.stdout),
        "2000\n",
        "every call failed with EPERM: {}",
        text(&out.stderr)
    );
    let started = d.events(&["--kind", "worker_started"]);
    assert_eq!(started[0]["seccomp_denials_observable"], true);
    let ev = events_until(&d, &["--kind", "sandbox_denial"], "denials", |e| {
        e.iter().map(|e| 1 + e["suppressed"].as_u64().unwrap()).sum::<u64>() >= 2000
    });
    assert!(ev.iter().all(|e| e["layer"] == "seccomp" && e["user"] == "alice"));
    assert!(ev.iter().filter(|e| e["syscall"] == "chroot").count() >= 1);
    assert!(ev.iter().all(|e| e["pid"].as_i64().unwrap() > 0));
    let reports = ev.len() as u64;
    let suppressed: u64 = ev.iter().map(|e| e["suppressed"].as_u64().unwrap()).sum();
    assert!(reports < 200, "rate-limited: {reports} reports");
    // The final "(suppressed)" flush carries the rest without being a denial itself.
    let flushes = ev.iter().filter(|e| e["syscall"] == "(suppressed)").count() as u64;
    assert_eq!(
        reports - flushes + suppressed,
        2000,
        "every denial counted exactly once"
    );
}

#[test]
fn landlock_denials_are_events_with_path_and_access() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "ls / >/dev/null 2>&1; python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))' 2>/dev/null; exit 0"
    );
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let started = d.events(&["--kind", "worker_started"]);
    assert_eq!(
        started[0]["landlock_denials_observable"], true,
        "ABI 7 and audit: {:?}",
        started[0]
    );
    let ev = events_until(&d, &["--kind", "sandbox_denial"], "landlock denials", |e| {
        e.iter().any(|e| e["access"] == "fs.read_dir") && e.iter().any(|e| e["access"] == "net.connect_tcp")
    });
    let ls = ev.iter().find(|e| e["access"] == "fs.read_dir").unwrap();
    assert_eq!(
        (ls["layer"].as_str(), ls["path"].as_str(), ls["user"].as_str()),
        (Some("landlock"), Some("/"), Some("alice"))
    );
    let tcp = ev.iter().find(|e| e["access"] == "net.connect_tcp").unwrap();
    assert_eq!(tcp["path"], format!("port {port}"));

    // A worker that is gone within a millisecond of its denial is still
    // placed: the launcher reports its init's host pid before the worker runs.
    let out = d.ctl(&["spawn", "--user", "bob", "-w", "--", "ls", "/"]);
    assert!(!out.status.success(), "ls / is denied");
    events_until(
        &d,
        &["--kind", "sandbox_denial", "--user", "bob"],
        "bob's landlock denial",
        |e| e.iter().any(|e| e["access"] == "fs.read_dir" && e["path"] == "/"),
    );
}
