//! warden-try: runs one command in a real warden sandbox, the same way the
//! test suite does, without a daemon: a throwaway state directory, the
//! user's uid from warden's test range, a cgroup with the profile's limits.
//! Until wardend exists (the "wardend and wardenctl" issue) this is how to
//! see the sandbox from the inside. Needs root.
//!
//! usage: warden-try [--user U] [--project P] [--profile NAME] -- CMD ARGS...

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut user, mut project, mut profile) = ("demo".to_string(), "default".to_string(), "claude-code".to_string());
    let mut cmd = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--user" => user = args.next().unwrap_or_default(),
            "--project" => project = args.next().unwrap_or_default(),
            "--profile" => profile = args.next().unwrap_or_default(),
            "--" => {
                cmd.extend(args.by_ref());
            }
            _ => {
                eprintln!("usage: warden-try [--user U] [--project P] [--profile NAME] -- CMD ARGS...");
                std::process::exit(64);
            }
        }
    }
    if cmd.is_empty() {
        eprintln!("usage: warden-try [--user U] [--project P] [--profile NAME] -- CMD ARGS...");
        std::process::exit(64);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("warden-try: must run as root (it builds namespaces, cgroups and drops to a worker uid)");
        std::process::exit(77);
    }
    let host = warden_tests::Host::new(&[]);
    if host.profiles.get(&profile).is_err() {
        eprintln!(
            "warden-try: unknown profile {profile:?}; known: {}",
            host.profiles.names().collect::<Vec<_>>().join(", ")
        );
        std::process::exit(64);
    }
    let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let w = match host.spawn(&user, &project, &profile, &argv) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("warden-try: {e}");
            std::process::exit(125);
        }
    };
    eprintln!("warden-try: enforced {:?}", w.launched.enforced);
    let out = w.wait(Duration::from_secs(3600));
    print!("{}", out.stdout);
    let _ = std::io::stdout().flush();
    eprint!("{}", out.stderr);
    eprintln!(
        "warden-try: exit {} (peak memory {} KiB, cpu {} ms)",
        out.code,
        out.usage.memory_peak / 1024,
        out.usage.cpu_usage_ns / 1_000_000
    );
    std::process::exit(out.code);
}
