//! warden-bench: measures what the sandbox costs and prints a table.
//!
//! - spawn: wall time from asking for a worker to its exit, for `/bin/true`
//!   in the claude-code sandbox (cgroup, namespaces, new root, landlock,
//!   seccomp, exec, reap, cgroup removal), against a plain fork+exec;
//! - syscalls: nanoseconds per system call inside the sandbox (through the
//!   seccomp filter) against the same binary on the host.
//!
//! Run as root: `cargo build --release --workspace --bins && target/release/warden-bench`

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

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

    let sandboxed: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let out = host.run("bench", "demo", "claude-code", &["/bin/true"]);
            assert_eq!(out.code, 0);
            t.elapsed()
        })
        .collect();
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

    println!("warden-bench ({runs} runs, medians; {n} calls per syscall figure)");
    println!("{:<44} {:>12} {:>12}", "", "sandboxed", "host");
    println!(
        "{:<44} {:>9.2} ms {:>9.2} ms",
        "spawn to exit of /bin/true (claude-code)",
        median(sandboxed).as_secs_f64() * 1e3,
        median(plain).as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>9.1} ns {:>9.1} ns",
        "getppid (early in the seccomp list)", in_early, out_early
    );
    println!(
        "{:<44} {:>9.1} ns {:>9.1} ns",
        "getrandom (late in the seccomp list)", in_late, out_late
    );
}
