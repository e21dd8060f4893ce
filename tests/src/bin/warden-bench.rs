//! warden-bench: measures what the sandbox costs and prints a table.
//!
//! - spawn: wall time from asking for a worker to its exit, for `/bin/true`
//!   in the claude-code sandbox (cgroup, namespaces, new root, landlock,
//!   seccomp, exec, reap, cgroup removal), against a plain fork+exec;
//! - syscalls: nanoseconds per system call inside the sandbox (through the
//!   seccomp filter) against the same binary on the host;
//! - network: a 100 MB download through wardend's proxy (absolute-form HTTP
//!   and a CONNECT tunnel) against the same download on the host, and the
//!   time to the first byte of a small answer, with and without the proxy.
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

fn parse(result: &str) -> (f64, f64) {
    let mut it = result
        .split_whitespace()
        .map(|kv| kv.split_once('=').map_or(0.0, |(_, v)| v.parse().unwrap_or(0.0)));
    (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("warden-bench: must run as root");
        std::process::exit(77);
    }
    let runs = 20;
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

    let n = "2000000";
    let inside = host.run("bench", "demo", "claude-code", &[&bin, "bench_syscalls", n]);
    let (in_early, in_late) = parse(inside.result());
    let outside = std::process::Command::new(warden_tests::bin_dir().join("warden-attack"))
        .args(["bench_syscalls", n])
        .output()
        .expect("warden-attack on the host");
    let out_text = String::from_utf8_lossy(&outside.stdout);
    let (out_early, out_late) = parse(out_text.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or(""));

    let net = network();

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
    println!(
        "{:<58} {:>9.1} ns {:>9.1} ns",
        "getppid (early in the seccomp list)", in_early, out_early
    );
    println!(
        "{:<58} {:>9.1} ns {:>9.1} ns",
        "getrandom (late in the seccomp list)", in_late, out_late
    );
    for (what, proxied, direct, unit) in net {
        println!("{what:<58} {proxied:>9.2} {unit} {direct:>9.2} {unit}");
    }
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
