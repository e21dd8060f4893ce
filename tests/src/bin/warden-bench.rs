//! warden-bench: measures what the sandbox costs and prints a table.
//!
//! - spawn: wall time from asking for a worker to its exit, for `/bin/true`
//!   in the claude-code sandbox (cgroup, namespaces, new root, landlock,
//!   seccomp, exec, reap, cgroup removal), against a plain fork+exec;
//! - syscalls: nanoseconds per system call inside the sandbox (through the
//!   seccomp filter) against the same binary on the host;
//! - network: a 100 MB download through wardend's proxy (absolute-form HTTP
//!   and a CONNECT tunnel) against the same download on the host, and the
//!   time to the first byte of a small answer, with and without the proxy;
//! - gateway: a streamed Messages answer through the API gateway against
//!   the same answer straight from the (fake) API: time to its first event
//!   (the API sends the rest 20 ms later, so a gateway that buffered would
//!   show it) and to its end; and requests per second on loopback.
//!
//! - events: audit events per second the daemon writes (durably) and
//!   publishes, with its group commit (one writer thread, one fdatasync per
//!   batch) against one fdatasync per event under a lock (the daemon before
//!   #13), with 64 publishers waiting for the disk and with one that does
//!   not wait;
//! - list under load: latency of another user's `List` (p50, p99) while 64
//!   clients spawn and wait for short workers and a worker floods its
//!   output, against the same `List` on the idle daemon.
//!
//! - spawn through the daemon: `wardenctl spawn -w -- /bin/true` and the
//!   same over gRPC (Spawn, then Wait) against bubblewrap's
//!   `bwrap --ro-bind / / --dev /dev --proc /proc --unshare-all /bin/true`
//!   in pairs, one right after the other; where the time goes, stage by
//!   stage, from the worker_started events; and spawn-to-exit cycles per
//!   second at concurrency 16 with their p50 and p99.
//!
//! - an agent's work: `make -j2` of a C project of 50 files, `git status`
//!   in a repository of 5,000 files and python3 start-ups with imports,
//!   in a claude-code worker and on the host as the same uid; and Claude
//!   Code's start-up to its `system/init` message, through wardend and
//!   bare (fake Messages API);
//! - idle workers: what wardend holds (RSS, descriptors, threads) for each
//!   of 500 sleeping workers.
//!
//! Everything runs in one process, one after the other (about 6 minutes;
//! `warden-bench spawn`, `syscalls`, `work` and `idle` run those rows alone).
//!
//! Run as root: `cargo build --release --workspace --bins && target/release/warden-bench`

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use axum::routing::get;
use warden_tests::daemon::Daemon;
use warden_tests::servers::Served;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `name=value` pairs of a warden-attack result, in order.
fn parse(result: &str) -> Vec<(String, f64)> {
    result
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN)))
        .collect()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("warden-bench: must run as root");
        std::process::exit(77);
    }
    match std::env::args().nth(1).as_deref() {
        Some("spawn") => {
            print_spawn_rows(&spawn_rows());
            return;
        }
        Some("work") => {
            print_work_rows(&real_work_rows());
            print_claude_row(claude_start_row());
            return;
        }
        Some("idle") => {
            print_idle_row(idle_worker_cost(IDLE_WORKERS));
            return;
        }
        Some("syscalls") => {
            // Before anything of warden's turns audit on.
            let audit = audit_rows("2000000");
            let host = warden_tests::Host::new(&[]);
            let bin = host.install_attack("bench", "demo");
            print_syscall_rows(&syscall_rows(&host, &bin, "2000000"));
            print_audit_rows(audit);
            return;
        }
        _ => {}
    }
    let runs = 20;
    let n = "2000000";
    // Before anything of warden's turns audit on.
    let audit = audit_rows(n);
    let host = warden_tests::Host::new(&[]);
    let bin = host.install_attack("bench", "demo");
    host.run("bench", "demo", "claude-code", &["/bin/true"]); // warm caches

    let spawn = |profile: &str| -> Vec<Duration> {
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let out = host.run("bench", "demo", profile, &["/bin/true"]);
                assert_eq!(out.code, 0);
                t.elapsed()
            })
            .collect()
    };
    let sandboxed = spawn("claude-code");
    let offline = spawn("offline");
    let plain: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::process::Command::new("/bin/true").status().expect("/bin/true");
            t.elapsed()
        })
        .collect();

    let syscalls = syscall_rows(&host, &bin, n);

    let through_daemon = spawn_rows();
    let idle = idle_worker_cost(IDLE_WORKERS);
    let work = real_work_rows();
    let claude = claude_start_row();
    let net = network();
    let gw = gateway();
    let ev = events();
    let list = list_under_load();

    println!("warden-bench ({runs} runs, medians; {n} calls per syscall figure)");
    println!("{:<58} {:>12} {:>12}", "", "sandboxed", "host");
    println!(
        "{:<58} {:>9.2} ms {:>9.2} ms",
        "spawn to exit of /bin/true (claude-code: netns + proxy listeners)",
        median(sandboxed).as_secs_f64() * 1e3,
        median(plain.clone()).as_secs_f64() * 1e3
    );
    println!(
        "{:<58} {:>9.2} ms {:>9.2} ms",
        "spawn to exit of /bin/true (offline: netns, no listeners)",
        median(offline).as_secs_f64() * 1e3,
        median(plain.clone()).as_secs_f64() * 1e3
    );
    print_syscall_rows(&syscalls);
    print_audit_rows(audit);
    for (what, proxied, direct, unit) in net {
        println!("{what:<58} {proxied:>9.2} {unit} {direct:>9.2} {unit}");
    }
    print_spawn_rows(&through_daemon);
    print_idle_row(idle);
    print_work_rows(&work);
    print_claude_row(claude);
    println!("{:<58} {:>12} {:>12}", "", "gateway", "direct");
    for (what, through, direct, unit) in gw {
        println!("{what:<58} {through:>9.2} {unit} {direct:>9.2} {unit}");
    }
    println!("{:<58} {:>12} {:>12}", "", "group commit", "per event");
    for (what, group, per_event, unit) in ev {
        println!("{what:<58} {group:>9.0} {unit} {per_event:>9.0} {unit}");
    }
    println!("{:<58} {:>12} {:>12}", "", "under load", "idle");
    for (what, loaded, idle, unit) in list {
        if idle.is_nan() {
            println!("{what:<58} {loaded:>9.2} {unit}");
        } else {
            println!("{what:<58} {loaded:>9.2} {unit} {idle:>9.2} {unit}");
        }
    }
}

/// A system call's ns: in a worker, on the host, on the host under a
/// one-instruction allow-all seccomp filter (the floor of any filter), and
/// under that filter and a landlock ruleset that grants /dev (the floor
/// of landlock's path checks) or the opened files themselves (landlock's
/// least cost: its check walks no parent).
struct SyscallRow {
    call: String,
    sandboxed: f64,
    host: f64,
    allow_all: f64,
    landlock: f64,
    landlock_file: f64,
}

fn syscall_rows(host: &warden_tests::Host, bin: &str, n: &str) -> Vec<SyscallRow> {
    let inside = host.run("bench", "demo", "claude-code", &[bin, "bench_syscalls", n]);
    let inside = parse(inside.result());
    let [outside, allow_all, landlock, landlock_file] = [
        "bench_syscalls",
        "bench_syscalls_allow_all",
        "bench_syscalls_landlock",
        "bench_syscalls_landlock_file",
    ]
    .map(|mode| attack_on_host(mode, n));
    let on_host =
        |rows: &[(String, f64)], call: &str| rows.iter().find(|(c, _)| c == call).map_or(f64::NAN, |(_, ns)| *ns);
    inside
        .into_iter()
        .map(|(call, sandboxed)| SyscallRow {
            host: on_host(&outside, &call),
            allow_all: on_host(&allow_all, &call),
            landlock: on_host(&landlock, &call),
            landlock_file: on_host(&landlock_file, &call),
            call,
            sandboxed,
        })
        .collect()
}

/// Nanoseconds per call of `warden-attack <mode> <n>` on the host, by call.
fn attack_on_host(mode: &str, n: &str) -> Vec<(String, f64)> {
    let out = std::process::Command::new(warden_tests::bin_dir().join("warden-attack"))
        .args([mode, n])
        .output()
        .expect("warden-attack on the host");
    let text = String::from_utf8_lossy(&out.stdout);
    parse(text.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or(""))
}

/// The host's system calls with kernel audit on, without and with the
/// task rule `never` that wardend adds when it turns audit on (medians of
/// 5 runs each, interleaved), by call. Only where audit is off and no such
/// rule exists (no auditd to disturb); leaves audit off, without the rule.
fn audit_rows(n: &str) -> Option<Vec<(String, f64, f64)>> {
    use warden_daemon::landlock_audit::{is_enabled, never_task_rules, set_enabled, Exemption};
    if is_enabled().ok()? || never_task_rules().ok()? > 0 {
        return None;
    }
    set_enabled(true).ok()?;
    let (mut plain, mut never) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        plain.push(attack_on_host("bench_syscalls", n));
        let Ok(rule) = Exemption::add_now() else { break };
        never.push(attack_on_host("bench_syscalls", n));
        rule.remove();
    }
    let _ = set_enabled(false);
    let calls: Vec<String> = plain.first()?.iter().map(|(c, _)| c.clone()).collect();
    let med = |runs: &[Vec<(String, f64)>], i: usize| {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).map(|(_, x)| *x)).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Some(
        calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, med(&plain, i), med(&never, i)))
            .collect(),
    )
}

fn print_audit_rows(rows: Option<Vec<(String, f64, f64)>>) {
    let Some(rows) = rows else {
        println!("host system calls under audit: not measured (audit is on, or a task rule `never` exists)");
        return;
    };
    println!(
        "{:<58} {:>12} {:>12}",
        "ns per system call on the host, audit on", "no rule", "task never"
    );
    for (call, plain, never) in rows {
        println!("{call:<58} {plain:>9.1} ns {never:>9.1} ns");
    }
}

fn print_syscall_rows(rows: &[SyscallRow]) {
    println!(
        "{:<58} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "ns per system call", "sandboxed", "host", "allow-all", "+landlock", "+ll at file"
    );
    for r in rows {
        let what = match r.call.as_str() {
            "ioctl" => "ioctl FIONREAD (its request is checked by the filter)",
            "openat_close" => "openat + close of /dev/null",
            "read" => "read of 1 byte from /dev/zero",
            other => other,
        };
        println!(
            "{what:<58} {:>9.1} ns {:>9.1} ns {:>9.1} ns {:>9.1} ns {:>9.1} ns",
            r.sandboxed, r.host, r.allow_all, r.landlock, r.landlock_file
        );
    }
}

/// Makes the agent workload's fixtures (as the worker, so they are the
/// user's): a C project of 50 files with a Makefile, a Git repository of
/// 5,000 files.
const WORK_SETUP: &str = r#"set -e
mkdir -p c && cd c
i=1; while [ $i -le 50 ]; do
  printf 'int f%d(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * %d; return s; }\n' $i $i > f$i.c
  i=$((i + 1))
done
printf 'int main(void) { return 0; }\n' > main.c
printf 'SRC := $(wildcard *.c)\nprog: $(SRC:.c=.o)\n\tcc -o $@ $^\nclean:\n\trm -f *.o prog\n' > Makefile
cd .. && mkdir -p repo/src && cd repo
i=1; while [ $i -le 5000 ]; do echo $i > src/f$i; i=$((i + 1)); done
git init -q && git add -A && git -c user.name=b -c user.email=b@example.invalid commit -qm init
"#;

/// The workload, timed from inside: `make -j2` of the C project, `git
/// status` ten times, `python3 -c 'import json, ssl, sqlite3'` 100 times.
/// Prints `make=<µs> git=<µs per status> python=<µs per run>`. (`cd -P`:
/// on the host the directories above the workspace are root's alone.)
const WORK: &str = r#"set -e
t() { date +%s%N; }
cd -P c; make -s clean >/dev/null
a=$(t); make -s -j2 >/dev/null; b=$(t); cd -P ..
cd -P repo; c=$(t); for i in 1 2 3 4 5 6 7 8 9 10; do git status --porcelain >/dev/null; done; d=$(t); cd -P ..
e=$(t); i=0; while [ $i -lt 100 ]; do python3 -c 'import json, ssl, sqlite3'; i=$((i + 1)); done; f=$(t)
echo "RESULT make=$(( (b - a) / 1000 )) git=$(( (d - c) / 10000 )) python=$(( (f - e) / 100000 ))"
"#;

/// Reads `out` until a line holds `needle` (false at its end), then keeps
/// reading it to its end on a thread of its own, so that the writer is
/// never blocked or cut off.
fn read_until(out: impl std::io::Read + Send + 'static, needle: &str) -> bool {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(out).lines();
    let found = lines.by_ref().map_while(Result::ok).any(|l| l.contains(needle));
    std::thread::spawn(move || lines.for_each(drop));
    found
}

/// Waits for `child` for up to 30 s, then kills it.
fn reap(mut child: std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Claude Code's start-up, to its `system/init` message (fake Messages
/// API): through wardend in a claude-code worker, against the same binary
/// and arguments on the host as the same uid. (warden, bare) medians, ms;
/// None when the pinned claude is not installed (tests/run-all does it).
fn claude_start_row() -> Option<(f64, f64)> {
    use warden_tests::fake_anthropic::{FakeAnthropic, Turn};
    let claude = warden_tests::claude_binary();
    if !claude.exists() {
        eprintln!("warden-bench: {} is missing; run tests/run-all once", claude.display());
        return None;
    }
    let runs = 5;
    let api = FakeAnthropic::start(vec![Turn::Text("done".into()); 4 * runs + 8]);
    let d = warden_tests::claude::daemon_for(&api, "default", "");
    d.set_credentials("default", "sk-bench\n");
    let init = "\"subtype\":\"init\"";
    let under_warden = || {
        let t = Instant::now();
        let mut child = d
            .ctl_command(&["spawn", "--user", "bench", "--profile", "cc-test", "-w", "--", "hi"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("wardenctl");
        assert!(read_until(child.stdout.take().expect("stdout"), init), "no system/init");
        let took = t.elapsed();
        reap(child);
        took
    };
    under_warden(); // the user's directories, the page cache
    let warden: Vec<Duration> = (0..runs).map(|_| under_warden()).collect();
    // The same argv, as the worker's uid, with a home of its own.
    let started = d
        .audit_events()
        .into_iter()
        .find(|e| e["kind"] == "worker_started")
        .expect("a worker_started event");
    let uid = started["uid"].as_u64().expect("uid").to_string();
    let args: Vec<String> = started["command"]
        .as_array()
        .expect("command")
        .iter()
        .skip(1)
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect();
    let home = tempfile::tempdir().expect("a home");
    let id = uid.parse::<u32>().expect("a uid");
    std::os::unix::fs::chown(home.path(), Some(id), Some(id)).expect("chown");
    let bare = || {
        use std::io::Write;
        let t = Instant::now();
        let mut child = std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(&claude)
            .args(&args)
            .current_dir(home.path())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home.path())
            .env("ANTHROPIC_BASE_URL", api.base_url())
            .env("ANTHROPIC_API_KEY", "sk-bench")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("claude on the host");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"{\"type\":\"user\",\"message\":{\"role\":\"user\",\"content\":\"hi\"}}\n");
        assert!(
            read_until(child.stdout.take().expect("stdout"), init),
            "no system/init on the host"
        );
        let took = t.elapsed();
        drop(stdin);
        reap(child);
        took
    };
    bare();
    let host: Vec<Duration> = (0..runs).map(|_| bare()).collect();
    Some((ms(median(warden)), ms(median(host))))
}

fn print_claude_row(row: Option<(f64, f64)>) {
    if let Some((warden, bare)) = row {
        println!(
            "{:<58} {warden:>9.1} ms {bare:>9.1} ms {:>8.3}",
            "Claude Code: start to its system/init message",
            warden / bare
        );
    }
}

/// Runs of the agent workload, each in a worker and on the host.
const WORK_RUNS: usize = 5;

/// An agent's work in a claude-code worker against the same work on the
/// host, as the same uid in the same directory: (what, sandboxed, host), ms.
fn real_work_rows() -> Vec<(&'static str, f64, f64)> {
    let host = warden_tests::Host::new(&[]);
    let ws = host.prepare("bench", "claude-code", "work").workspace;
    let setup = host.run("bench", "work", "claude-code", &["/bin/sh", "-c", WORK_SETUP]);
    assert_eq!(setup.code, 0, "{}", setup.stderr);
    let id = host.users.identity("bench").expect("the bench user");
    let on_host = || {
        // The user may pass through the state directory's root-owned
        // levels for this run (git stats its work tree by full path);
        // the next spawn closes them again.
        let state = host.state.path();
        for dir in [state.to_path_buf(), state.join("users")] {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).expect("chmod");
        }
        let out = std::process::Command::new("setpriv")
            .args([
                format!("--reuid={}", id.uid),
                format!("--regid={}", id.gid),
                "--clear-groups".into(),
                "--".into(),
                "/bin/sh".into(),
                "-c".into(),
                WORK.into(),
            ])
            .current_dir(&ws)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &ws)
            .output()
            .expect("the workload on the host");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the workload on the host: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse(text.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or(""))
    };
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..WORK_RUNS {
        let out = host.run("bench", "work", "claude-code", &["/bin/sh", "-c", WORK]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        inside.push(parse(out.result()));
        outside.push(on_host());
    }
    let median_of = |runs: &[Vec<(String, f64)>], i: usize| {
        median_f(
            runs.iter()
                .map(|r| r.get(i).map_or(f64::NAN, |(_, v)| *v) / 1e3)
                .collect(),
        )
    };
    [
        "make -j2 of a C project of 50 files",
        "git status in a repository of 5,000 files",
        "python3 -c 'import json, ssl, sqlite3'",
    ]
    .into_iter()
    .enumerate()
    .map(|(i, what)| (what, median_of(&inside, i), median_of(&outside, i)))
    .collect()
}

fn print_work_rows(rows: &[(&'static str, f64, f64)]) {
    println!(
        "{:<58} {:>12} {:>12} {:>8}",
        format!("an agent's work ({WORK_RUNS} runs, medians)"),
        "sandboxed",
        "host",
        "ratio"
    );
    for (what, inside, outside) in rows {
        println!(
            "{what:<58} {inside:>9.2} ms {outside:>9.2} ms {:>8.3}",
            inside / outside
        );
    }
}

/// Idle workers for the per-worker cost of the daemon.
const IDLE_WORKERS: usize = 500;

fn print_idle_row((rss_kib, fds, threads, cpu): (f64, f64, f64, f64)) {
    println!(
        "{:<58} {rss_kib:>9.0} KiB {fds:>6.1} fds {threads:>5.2} threads",
        format!("wardend per idle worker ({IDLE_WORKERS} sleeping)")
    );
    println!(
        "{:<58} {cpu:>9.1} % of a core",
        format!("wardend's CPU with {IDLE_WORKERS} idle workers")
    );
}

/// What wardend holds per idle worker: (RSS KiB, descriptors, threads),
/// each the growth from an idle daemon to one with `n` workers sleeping
/// (base profile, after the allocator settled), divided by `n`; and the
/// CPU it then uses, in % of a core (resource samples every 5 s, the
/// default).
fn idle_worker_cost(n: usize) -> (f64, f64, f64, f64) {
    use warden_proto::v1 as pb;
    let d = load_daemon(
        i64::try_from(n).unwrap_or(i64::MAX) + 8,
        &[("sample_interval_seconds", warden_tests::daemon::value(5))],
    );
    let rt = runtime();
    let count = |what: &str| std::fs::read_dir(format!("/proc/{}/{what}", d.pid())).map_or(0, |r| r.count()) as f64;
    assert!(d
        .ctl(&["spawn", "--user", "idle0", "-w", "--", "true"])
        .status
        .success());
    std::thread::sleep(Duration::from_secs(12));
    let before = (d.rss() as f64 / 1024.0, count("fd"), count("task"));
    let ids = rt.block_on(async {
        let mut c = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
        let mut ids = Vec::new();
        for i in 0..n {
            let w = c
                .spawn(pb::SpawnRequest {
                    user: format!("idle{}", i / 60),
                    command: vec!["sleep".into(), "600".into()],
                    ..Default::default()
                })
                .await
                .expect("Spawn an idle worker")
                .into_inner();
            ids.push(w.id);
        }
        ids
    });
    // Idle blocking threads go after 10 s, freed memory goes back then too.
    std::thread::sleep(Duration::from_secs(12));
    let after = (d.rss() as f64 / 1024.0, count("fd"), count("task"));
    let cpu_before = d.cpu_time();
    std::thread::sleep(Duration::from_secs(10));
    let cpu = (d.cpu_time() - cpu_before).as_secs_f64() * 10.0;
    for id in &ids {
        let _ = d.ctl(&["kill", id]);
    }
    let per = |a: f64, b: f64| (a - b) / n as f64;
    (
        per(after.0, before.0),
        per(after.1, before.1),
        per(after.2, before.2),
        cpu,
    )
}

/// The spawn rows: what they measured, in the order printed.
struct SpawnRows {
    runs: usize,
    /// (what, warden, bwrap) medians, ms.
    pairs: Vec<(&'static str, f64, f64)>,
    /// The slowest of the pairs' warden runs, ms.
    max: Vec<(&'static str, f64)>,
    /// /bin/true on the host after the idle row's pause, median, ms: the
    /// machine's own cost of waking up (on a VM that pages out what sat
    /// unused, every binary is read again).
    host_idle: f64,
    /// Stage, median of its own time (since the stage before), ms.
    stages: Vec<(String, f64)>,
    /// Whether wardenctl built for musl is (else the table says how).
    musl_built: bool,
    /// Cycles a second at concurrency 16, and their p50 and p99, ms.
    throughput: (f64, f64, f64),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn bwrap_true() {
    let s = std::process::Command::new("bwrap")
        .args([
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--unshare-all",
            "/bin/true",
        ])
        .status()
        .expect("bwrap (apt-get install bubblewrap)");
    assert!(s.success(), "bwrap /bin/true: {s}");
}

/// Spawn to exit through a real wardend (base profile), against bubblewrap
/// in the same run: each warden run is paired with a bwrap run right after.
/// Spawns after an idle pause, for the idle row.
const IDLE_RUNS: usize = 7;

/// How a client starts a worker and waits for its end.
#[derive(Clone, Copy)]
enum Until {
    /// `Spawn`, then `Wait`: its exit.
    Wait,
    /// `Spawn`, then `Attach` with stdin closed: its output to the end,
    /// then its exit.
    Attach,
    /// One `Attach` whose start has `spawn`, stdin closed, as `wardenctl
    /// spawn -w` does.
    SpawnAttach,
}

/// `runs` pairs of a spawn-to-exit of /bin/true over gRPC (as `until`
/// says) and a bubblewrap run, each after `pause`. With `fresh`, each
/// spawn connects anew (inside the time), as a `wardenctl` does.
async fn rpc_pairs(
    c: &mut warden_proto::v1::workers_client::WorkersClient<tonic::transport::Channel>,
    runs: usize,
    pause: Duration,
    until: Until,
    fresh: Option<&std::path::Path>,
) -> (Vec<Duration>, Vec<Duration>) {
    use warden_proto::v1 as pb;
    let request = || pb::SpawnRequest {
        user: "bench".into(),
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    let (mut warden, mut bwrap) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        tokio::time::sleep(pause).await;
        let t = Instant::now();
        let mut own;
        let c = match fresh {
            Some(socket) => {
                own = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(socket.into()).await);
                &mut own
            }
            None => &mut *c,
        };
        let start = match until {
            Until::Wait => {
                let w = c.spawn(request()).await.expect("Spawn").into_inner();
                c.wait(pb::WaitRequest { id: w.id }).await.expect("Wait");
                None
            }
            Until::Attach => {
                let w = c.spawn(request()).await.expect("Spawn").into_inner();
                Some(pb::AttachStart {
                    id: w.id,
                    ..Default::default()
                })
            }
            Until::SpawnAttach => Some(pb::AttachStart {
                spawn: Some(request()),
                ..Default::default()
            }),
        };
        if let Some(start) = start {
            let requests = [
                pb::attach_request::Msg::Start(start),
                pb::attach_request::Msg::CloseStdin(true),
            ]
            .map(|m| pb::AttachRequest { msg: Some(m) });
            // The request stream stays open until the answer ends.
            let requests = tokio_stream::StreamExt::chain(tokio_stream::iter(requests), tokio_stream::pending());
            let mut out = c.attach(requests).await.expect("Attach").into_inner();
            while let Some(m) = tokio_stream::StreamExt::next(&mut out).await {
                if let Some(pb::attach_response::Msg::Exited(_)) = m.expect("Attach").msg {
                    break;
                }
            }
        }
        warden.push(t.elapsed());
        tokio::time::sleep(pause).await;
        bwrap.push(timed(bwrap_true));
    }
    (warden, bwrap)
}

fn spawn_rows() -> SpawnRows {
    use warden_proto::v1 as pb;
    let runs = 20;
    let d = load_daemon(256, &[]);
    let rt = runtime();
    let ctl = |user: &str| {
        let out = d.ctl(&["spawn", "--user", user, "-w", "--", "/bin/true"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    // Warm: the user's uid and directories, the page cache.
    for _ in 0..3 {
        ctl("bench");
        bwrap_true();
    }
    // `runs` pairs of `run` and a bubblewrap run right after it.
    let pairs = |run: &dyn Fn()| {
        let (mut w, mut b) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            w.push(timed(run));
            b.push(timed(bwrap_true));
        }
        (w, b)
    };
    let (w_ctl, b_ctl) = pairs(&|| ctl("bench"));
    // The same wardenctl built for musl (static: no glibc start-up, whose
    // cpuid probes are slow on a VM), when it is built (README "What the
    // sandbox costs" says how).
    let musl = musl_wardenctl().map(|binary| {
        let run = || {
            let out = std::process::Command::new(&binary)
                .arg("--socket")
                .arg(d.socket())
                .args(["spawn", "--user", "bench", "-w", "--", "/bin/true"])
                .output()
                .expect("wardenctl (musl)");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        };
        run();
        pairs(&run)
    });
    // Over gRPC, right after each other; then after the machine sat idle
    // (the other's pause, each of the pair): a spawn then finds its warm
    // init ready, against bubblewrap after the same pause.
    let ((w_rpc, b_rpc), (w_attach, b_attach), (w_one, b_one), (w_fresh, b_fresh), (w_idle, b_idle)) =
        rt.block_on(async {
            let mut c = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
            let busy = rpc_pairs(&mut c, runs, Duration::ZERO, Until::Wait, None).await;
            let attach = rpc_pairs(&mut c, runs, Duration::ZERO, Until::Attach, None).await;
            let one = rpc_pairs(&mut c, runs, Duration::ZERO, Until::SpawnAttach, None).await;
            let fresh = rpc_pairs(&mut c, runs, Duration::ZERO, Until::SpawnAttach, Some(&d.socket())).await;
            let idle = rpc_pairs(&mut c, IDLE_RUNS, Duration::from_millis(1500), Until::Wait, None).await;
            (busy, attach, one, fresh, idle)
        });
    let host_idle = (0..IDLE_RUNS)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(1500));
            timed(|| {
                let s = std::process::Command::new("/bin/true").status().expect("/bin/true");
                assert!(s.success());
            })
        })
        .collect();
    // Where the time went: each stage's own share, median over the runs.
    // The exit path's stages (worker_exited) continue on the same clock.
    // Each stage's own time and its end, by name (the order of stages
    // varies: a warm init's come before the request, at 0).
    let mut by_stage: std::collections::BTreeMap<String, (Vec<u64>, Vec<u64>)> = Default::default();
    let events = d.audit_events();
    let exited = |id: &serde_json::Value| {
        events
            .iter()
            .find(|x| x["kind"] == "worker_exited" && x["worker"] == *id)
            .map(|x| x["stages"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
    };
    for e in events.iter().filter(|e| e["kind"] == "worker_started") {
        let mut before = 0;
        let all = e["stages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .chain(exited(&e["worker"]));
        for s in all {
            let (name, us) = (s["stage"].as_str().unwrap_or("?"), s["us"].as_u64().unwrap_or(0));
            let entry = by_stage.entry(name.to_string()).or_default();
            entry.0.push(us.saturating_sub(before));
            entry.1.push(us);
            before = us;
        }
    }
    let mid = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let mut stages: Vec<(u64, String, f64)> = by_stage
        .into_iter()
        .map(|(name, (own, end))| (mid(end), name, mid(own) as f64 / 1e3))
        .collect();
    stages.sort_by_key(|(end, _, _)| *end);
    let stages = stages.into_iter().map(|(_, name, t)| (name, t)).collect();

    // Throughput: 16 clients, each spawning /bin/true and waiting for it.
    let cycles = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let for_ = Duration::from_secs(10);
    let began = Instant::now();
    rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..16 {
            let mut c = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
            let cycles = cycles.clone();
            clients.push(tokio::spawn(async move {
                while began.elapsed() < for_ {
                    let t = Instant::now();
                    let w = c
                        .spawn(pb::SpawnRequest {
                            user: format!("tp{}", i % 4),
                            command: vec!["/bin/true".into()],
                            ..Default::default()
                        })
                        .await
                        .expect("Spawn at concurrency 16")
                        .into_inner();
                    c.wait(pb::WaitRequest { id: w.id }).await.expect("Wait");
                    cycles.lock().expect("cycles").push(t.elapsed());
                }
            }));
        }
        for c in clients {
            c.await.expect("a client");
        }
    });
    let cycles = std::mem::take(&mut *cycles.lock().expect("cycles"));
    // The same with the audit log in memory (tmpfs: no disk sync), for
    // comparison only: what the log's durability costs a spawn (its start
    // and its exit are each fdatasync'ed before a client hears of them).
    let (w_mem, b_mem) = {
        let shm = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm");
        let log = shm.path().join("audit.jsonl").display().to_string();
        let d = load_daemon(256, &[("audit_log", warden_tests::daemon::value(log))]);
        rt.block_on(async {
            let mut c = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
            rpc_pairs(&mut c, 3, Duration::ZERO, Until::SpawnAttach, None).await; // warm
            rpc_pairs(&mut c, runs, Duration::ZERO, Until::SpawnAttach, None).await
        })
    };
    let rate = cycles.len() as f64 / began.elapsed().as_secs_f64();
    let max = |v: &[Duration]| ms(*v.iter().max().expect("runs"));
    let max = vec![("wardenctl", max(&w_ctl)), ("gRPC", max(&w_rpc))];
    let row = |what, (w, b): (Vec<Duration>, Vec<Duration>)| (what, ms(median(w)), ms(median(b)));
    let mut pairs = vec![row(
        "wardenctl spawn -w -- /bin/true (base, through wardend)",
        (w_ctl, b_ctl),
    )];
    let musl_built = musl.is_some();
    pairs.extend(musl.map(|m| row("  with wardenctl built for musl (static)", m)));
    pairs.extend([
        row("the same over gRPC (Spawn, then Wait)", (w_rpc, b_rpc)),
        row("the same over gRPC (Spawn, then Attach)", (w_attach, b_attach)),
        row("the same over gRPC (Attach with spawn, as wardenctl)", (w_one, b_one)),
        row(
            "  each on a new connection (wardenctl less its start)",
            (w_fresh, b_fresh),
        ),
        row(
            "  with the audit log on tmpfs (no disk sync; comparison)",
            (w_mem, b_mem),
        ),
        row("the same after 1.5 s idle (each of the pair)", (w_idle, b_idle)),
    ]);
    SpawnRows {
        runs,
        max,
        host_idle: ms(median(host_idle)),
        pairs,
        musl_built,
        stages,
        throughput: (rate, percentile(cycles.clone(), 500), percentile(cycles, 990)),
    }
}

/// `wardenctl` built for x86_64-unknown-linux-musl next to this build's
/// binaries, if it is.
fn musl_wardenctl() -> Option<std::path::PathBuf> {
    let dir = warden_tests::bin_dir();
    let binary = dir.parent()?.join("x86_64-unknown-linux-musl/release/wardenctl");
    binary.exists().then_some(binary)
}

fn print_spawn_rows(r: &SpawnRows) {
    println!(
        "{:<58} {:>12} {:>12} {:>8}",
        format!("spawn through wardend ({} pairs, medians)", r.runs),
        "warden",
        "bwrap",
        "x bwrap"
    );
    for (what, warden, bwrap) in &r.pairs {
        println!("{what:<58} {warden:>9.2} ms {bwrap:>9.2} ms {:>8.2}", warden / bwrap);
    }
    if !r.musl_built {
        println!("  (wardenctl built for musl: not built; see README \"What the sandbox costs\")");
    }
    println!(
        "{:<58} {:>9.2} ms",
        "  /bin/true on the host after the same pause", r.host_idle
    );
    for (what, max) in &r.max {
        println!("{:<58} {max:>9.2} ms", format!("  slowest run ({what})"));
    }
    println!("{:<58} {:>12}", "  where the time goes (each stage, median)", "");
    for (stage, t) in &r.stages {
        println!("{:<58} {t:>9.2} ms", format!("    {stage}"));
    }
    let (rate, p50, p99) = r.throughput;
    println!("{:<58} {rate:>9.0} /s", "spawn-to-exit cycles at concurrency 16");
    println!("{:<58} {p50:>9.2} ms {p99:>9.2} ms", "  their p50 and p99");
}

/// A typical small event.
fn bench_event() -> warden_daemon::events::EventKind {
    warden_daemon::events::EventKind::LimitReached {
        limit: "pids_max".into(),
        count: 1,
    }
}

/// The daemon before group commit: each event numbered, written and
/// fdatasync'ed under one lock, then broadcast.
struct PerEvent {
    log: std::sync::Mutex<(warden_daemon::audit::AuditLog, u64)>,
    live: tokio::sync::broadcast::Sender<std::sync::Arc<warden_daemon::events::Event>>,
}

impl PerEvent {
    fn publish(&self) {
        let mut guard = self.log.lock().expect("the log lock");
        let (log, seq) = &mut *guard;
        *seq += 1;
        let event = warden_daemon::events::Event {
            seq: *seq,
            time_ms: 0,
            worker: Some("w-bench".into()),
            user: Some("bench".into()),
            kind: bench_event(),
        };
        let line = serde_json::to_string(&event).expect("an event serializes");
        log.append(&[line]).expect("the audit log");
        let _ = self.live.send(std::sync::Arc::new(event));
    }
}

/// Events per second from `threads` threads calling `f` for `for_`.
fn per_second(threads: usize, for_: Duration, f: &(dyn Fn() + Sync)) -> f64 {
    let count = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while started.elapsed() < for_ {
                    f();
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    count.into_inner() as f64 / started.elapsed().as_secs_f64()
}

/// The audit writer's rows: (what, group commit, per event, unit). The
/// logs live on the disk that holds the cargo target directory.
fn events() -> Vec<(&'static str, f64, f64, &'static str)> {
    use warden_daemon::events::bus::{Events, Settings};
    let dir = tempfile::tempdir_in(warden_tests::bin_dir()).expect("a directory on disk");
    let for_ = Duration::from_secs(3);

    let (bus, _) = Events::open(Settings::at(&dir.path().join("group.log"))).expect("the bus");
    let _live = bus.subscribe();
    let group_waiting = per_second(64, for_, &|| {
        bus.submit(Some("w-bench"), Some("bench"), bench_event()).wait();
    });
    // Within the writer's queue, so that nothing is dropped.
    let n: u32 = 50_000;
    let before = bus.stats().written;
    let started = Instant::now();
    for _ in 0..n {
        bus.publish(Some("w-bench"), Some("bench"), bench_event());
    }
    bus.flush();
    let group_not_waiting = f64::from(n) / started.elapsed().as_secs_f64();
    assert_eq!(bus.stats().written - before, u64::from(n), "the bench dropped events");

    let (log, _) =
        warden_daemon::audit::AuditLog::open(&dir.path().join("per-event.log"), 1 << 30, 1).expect("the audit log");
    let per = PerEvent {
        log: std::sync::Mutex::new((log, 0)),
        live: tokio::sync::broadcast::channel(1 << 16).0,
    };
    let _live = per.live.subscribe();
    let per_waiting = per_second(64, for_, &|| per.publish());
    let per_not_waiting = per_second(1, for_, &|| per.publish());
    vec![
        (
            "audit events/s, 64 publishers each waiting for the disk",
            group_waiting,
            per_waiting,
            "/s",
        ),
        (
            "audit events/s, one publisher not waiting (then a flush)",
            group_not_waiting,
            per_not_waiting,
            "/s",
        ),
    ]
}

/// Latencies of another user's `List`, every 5 ms for `for_`.
async fn list_latencies(d: &Daemon, for_: Duration) -> Vec<Duration> {
    use warden_proto::v1 as pb;
    let mut client = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
    let started = Instant::now();
    let mut out = Vec::new();
    while started.elapsed() < for_ {
        let asked = Instant::now();
        client
            .list(pb::ListWorkersRequest {
                user: "bob".into(),
                include_exited: false,
                usage: false,
            })
            .await
            .expect("List");
        out.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// The `per_mille`th latency of `v`, in ms.
fn percentile(mut v: Vec<Duration>, per_mille: usize) -> f64 {
    v.sort();
    let i = (v.len() - 1) * per_mille / 1000;
    v[i].as_secs_f64() * 1e3
}

/// A daemon for load: caps high enough for the run, spawn rates off, and
/// `extra` settings.
fn load_daemon(max_workers: i64, extra: &[(&str, toml::Value)]) -> Daemon {
    use warden_tests::daemon::{rate, rate_limits, value};
    let mut settings = vec![
        ("max_workers", value(max_workers)),
        ("max_workers_per_user", value(64)),
        // wardend.toml's own defaults (the tests' daemons make none).
        ("warm_inits", value(2)),
        ("primed_inits", value(4)),
        // Many clients of one uid (root), and wardenctl.
        ("max_connections_per_caller", value(128)),
        (
            "rate_limits",
            rate_limits(&[
                ("spawns_per_user", rate(1_000_000, "100000/s")),
                ("spawns_per_caller", rate(1_000_000, "100000/s")),
            ]),
        ),
    ];
    settings.extend(extra.iter().cloned());
    Daemon::start_with(&settings)
}

/// The clients' runtime: two threads, as many as the machine's cores.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The `List` rows: (what, under load, idle, unit).
fn list_under_load() -> Vec<(&'static str, f64, f64, &'static str)> {
    use warden_proto::v1 as pb;
    let d = load_daemon(256, &[]);
    let rt = runtime();
    assert!(d.ctl(&["spawn", "--user", "bob", "-w", "--", "true"]).status.success());
    let for_ = Duration::from_secs(10);
    let idle = rt.block_on(list_latencies(&d, for_));

    let flood = d.ctl(&[
        "spawn",
        "--user",
        "flood",
        "--",
        "sh",
        "-c",
        "yes 0123456789abcdef0123456789abcdef",
    ]);
    assert!(flood.status.success(), "{}", String::from_utf8_lossy(&flood.stderr));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawned = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load_started = Instant::now();
    let loaded = rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..64 {
            let mut c = pb::workers_client::WorkersClient::new(warden_tests::daemon::channel(d.socket()).await);
            let (stop, spawned) = (stop.clone(), spawned.clone());
            clients.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let w = c
                        .spawn(pb::SpawnRequest {
                            user: format!("load{}", i % 8),
                            command: vec!["true".into()],
                            ..Default::default()
                        })
                        .await
                        .expect("Spawn under load")
                        .into_inner();
                    c.wait(pb::WaitRequest { id: w.id }).await.expect("Wait");
                    spawned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        // The load settles first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = list_latencies(&d, for_).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            c.await.expect("a spawning client");
        }
        loaded
    });
    let loaded_for = load_started.elapsed();
    let spawns = spawned.load(std::sync::atomic::Ordering::Relaxed) as f64 / loaded_for.as_secs_f64();
    let id = String::from_utf8_lossy(&flood.stdout).trim().to_string();
    let _ = d.ctl(&["stop", &id]);
    vec![
        (
            "List p50 (64 clients spawning, a worker flooding stdout)",
            percentile(loaded.clone(), 500),
            percentile(idle.clone(), 500),
            "ms",
        ),
        (
            "List p99 (64 clients spawning, a worker flooding stdout)",
            percentile(loaded, 990),
            percentile(idle, 990),
            "ms",
        ),
        ("spawns (each waited for) per second meanwhile", spawns, f64::NAN, "/s"),
    ]
}

/// A fake Messages API that streams one answer: its first event at once,
/// the rest 20 ms later; and answers plain requests at once.
fn streaming_api() -> Served {
    use axum::routing::post;
    let stream = || {
        let first = bytes::Bytes::from_static(
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
        );
        let rest = bytes::Bytes::from_static(
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let body = tokio_stream::StreamExt::chain(
            tokio_stream::once(Ok::<_, std::io::Error>(first)),
            tokio_stream::StreamExt::then(tokio_stream::once(rest), |r| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(r)
            }),
        );
        std::future::ready(
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(body))
                .unwrap_or_default(),
        )
    };
    let app = axum::Router::new().route("/v1/messages", post(stream)).route(
        "/plain/v1/messages",
        post(|| async { "{\"type\":\"message\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}" }),
    );
    Served::start(app, None)
}

/// Sends one request over a fresh connection to `addr`; returns the time
/// to the first byte of the first SSE event and to the end of the answer.
fn one_stream(addr: std::net::SocketAddr, key: &str) -> (Duration, Duration) {
    use std::io::{Read, Write};
    let body = r#"{"model":"m","stream":true,"max_tokens":5,"messages":[]}"#;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let t = Instant::now();
    write!(
        s,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut seen = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first.is_none() && seen.windows(13).any(|w| w == b"message_start") {
            first = Some(t.elapsed());
        }
    }
    (first.unwrap_or_default(), t.elapsed())
}

/// The gateway's rows: (what, through the gateway, straight to the API, unit).
fn gateway() -> Vec<(&'static str, f64, f64, &'static str)> {
    use std::sync::Arc;
    use warden_daemon::claude::prepare::{Credential, GatewaySetup};
    use warden_daemon::net::gateway::{Gateway, Upstream};
    let api = streaming_api();
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = warden_policy::config::Config::embedded();
    config.max_connections_per_worker = 1024;
    let (events, _) =
        warden_daemon::events::Events::open(warden_daemon::events::Settings::at(&dir.path().join("audit.jsonl")))
            .expect("events");
    let placeholder = "warden-bench".to_string();
    let setup = |path: &str| GatewaySetup {
        credential: Credential::ApiKey("sk-bench".into()),
        placeholder: placeholder.clone(),
        upstream: warden_policy::HttpUrl::try_from(format!("http://127.0.0.1:{}{path}", api.port())).expect("url"),
        models: None,
        server_tools: std::collections::BTreeSet::new(),
    };
    let listen = |gateway: Arc<Gateway>| {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(gateway.clone().serve(s));
            }
        });
        addr
    };
    let _guard = rt.enter();
    let upstream = Upstream::new(&config.gateway, Default::default()).expect("upstream client");
    let ledger = Arc::new(warden_daemon::usage::Ledger::open(&dir.path().join("usage.json")));
    let events = Arc::new(events);
    let make = |path: &str| {
        Arc::new(Gateway::new(
            "wbench",
            "bench",
            "bench",
            setup(path),
            upstream.clone(),
            ledger.clone(),
            events.clone(),
            &config,
        ))
    };
    let streamed = listen(make(""));
    let plain = listen(make("/plain"));
    let rounds = 50;
    let (mut g_first, mut g_total, mut d_first, mut d_total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (f, t) = one_stream(streamed, &placeholder);
        g_first.push(f);
        g_total.push(t);
        let (f, t) = one_stream(api.addr, "sk-bench");
        d_first.push(f);
        d_total.push(t);
    }
    let ms = |v: Vec<Duration>| median(v).as_secs_f64() * 1e3;
    // Requests per second: 8 clients on kept-alive connections.
    let rate = |base: String, key: &'static str| -> f64 {
        let n: u32 = 2000;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let t = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (client, base) = (client.clone(), base.clone());
                    tokio::spawn(async move {
                        for _ in 0..n / 8 {
                            let req = http::Request::post(format!("{base}/v1/messages"))
                                .header("x-api-key", key)
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    br#"{"model":"m","max_tokens":1,"messages":[]}"#,
                                )))
                                .expect("request");
                            let resp = client.request(req).await.expect("answer");
                            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("client task");
            }
        });
        f64::from(n) / t.elapsed().as_secs_f64()
    };
    let through = rate(format!("http://{plain}"), "warden-bench");
    let direct = rate(format!("http://127.0.0.1:{}/plain", api.port()), "sk-bench");
    vec![
        (
            "streamed answer: first event (API sends the rest 20 ms later)",
            ms(g_first),
            ms(d_first),
            "ms",
        ),
        ("streamed answer: to its end", ms(g_total), ms(d_total), "ms"),
        (
            "requests per second, 8 clients, kept-alive (loopback)",
            through,
            direct,
            "/s",
        ),
    ]
}

/// Runs `script` in a worker of `d` (profile `bench-net`) and returns its
/// standard output.
fn in_worker(d: &Daemon, script: &str) -> String {
    let out = d.ctl(&[
        "spawn",
        "--user",
        "bench",
        "--profile",
        "bench-net",
        "-w",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn on_host(script: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh on the host");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn floats(text: &str) -> Vec<f64> {
    text.split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The proxy's rows: (what, through the proxy, on the host, unit).
fn network() -> Vec<(&'static str, f64, f64, &'static str)> {
    const BLOB: usize = 100 << 20;
    let blob = bytes::Bytes::from(vec![0u8; BLOB]);
    // The same 100 MB, paced at 1 Gbit/s: a fast link, not loopback, sets
    // the speed.
    let paced = || {
        let chunk = bytes::Bytes::from(vec![0u8; 1 << 20]);
        let per_chunk = Duration::from_secs_f64(f64::from(1u32 << 20) * 8.0 / 1e9);
        let stream = tokio_stream::StreamExt::throttle(
            tokio_stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone()))),
            per_chunk,
        );
        std::future::ready(axum::body::Body::from_stream(stream))
    };
    let app = axum::Router::new()
        .route("/blob", get(move || std::future::ready(blob.clone())))
        .route("/paced", get(paced))
        .route("/hello", get(|| async { "hello\n" }));
    let server = Served::start(app, None);
    let port = server.port();
    let d = Daemon::start();
    d.add_profile(
        "bench-net",
        &format!("extends = \"base\"\n[network]\nallow = [\"web.test:{port}\"]\n"),
    );
    let rounds = 5;
    let download = |proxy: &str, path: &str| {
        format!(
            "for i in $(seq {rounds}); do curl -s {proxy} -o /dev/null -w '%{{speed_download}}\\n' http://web.test:{port}/{path}; done"
        )
    };
    let on_host_dl = |path: &str| {
        format!(
            "for i in $(seq {rounds}); do curl -s -o /dev/null -w '%{{speed_download}}\\n' http://127.0.0.1:{port}/{path}; done"
        )
    };
    let mb = |bytes_per_s: Vec<f64>| median_f(bytes_per_s) / f64::from(1u32 << 20);
    let host_dl = mb(floats(&on_host(&on_host_dl("blob"))));
    let http_dl = mb(floats(&in_worker(&d, &download("", "blob"))));
    let tunnel_dl = mb(floats(&in_worker(&d, &download("-p", "blob"))));
    let host_paced = mb(floats(&on_host(&on_host_dl("paced"))));
    let tunnel_paced = mb(floats(&in_worker(&d, &download("-p", "paced"))));
    let first_byte =
        |url: &str| format!("for i in $(seq 50); do curl -s -o /dev/null -w '%{{time_starttransfer}}\\n' {url}; done");
    let ms = |s: Vec<f64>| median_f(s) * 1e3;
    let host_ttfb = ms(floats(&on_host(&first_byte(&format!("http://127.0.0.1:{port}/hello")))));
    let proxy_ttfb = ms(floats(&in_worker(
        &d,
        &first_byte(&format!("http://web.test:{port}/hello")),
    )));
    vec![
        (
            "100 MB over HTTP through the proxy (absolute-form)",
            http_dl,
            host_dl,
            "MB/s",
        ),
        (
            "100 MB through a CONNECT tunnel of the proxy",
            tunnel_dl,
            host_dl,
            "MB/s",
        ),
        (
            "100 MB at 1 Gbit/s through a CONNECT tunnel",
            tunnel_paced,
            host_paced,
            "MB/s",
        ),
        (
            "time to first byte of a small answer (connect included)",
            proxy_ttfb,
            host_ttfb,
            "ms",
        ),
    ]
}
