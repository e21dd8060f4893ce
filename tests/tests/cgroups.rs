//! The real cgroup path on this host (v1/hybrid here, v2 where the host has
//! it): limits written from the profile, usage read back, everything killed
//! and the cgroup removed when the worker ends.

use std::time::Duration;

use warden_tests::*;

const TIGHT: &str = r#"
extends = "claude-code"
[limits]
memory = "96M"
memory_swap = "96M"
pids = 40
cpu_quota = "50%"
cpu_weight = 200
"#;

fn host() -> Option<Host> {
    privileged("creates real cgroups").then(|| Host::new(&[("tight", TIGHT)]))
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn the_workers_cgroup_carries_the_profiles_limits_and_holds_all_its_processes() {
    let Some(h) = host() else { return };
    let w = h
        .spawn("alice", "demo", "tight", &["/bin/sh", "-c", "sleep 1 & sleep 1 & wait"])
        .unwrap();
    let paths = w.cgroup.paths();
    // The init, the shell and both sleeps, once the shell forked them.
    let mut pids = w.cgroup.pids();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pids.len() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        pids = w.cgroup.pids();
    }
    if h.cgroups.is_v2() {
        let d = &paths[0];
        assert_eq!(read(&d.join("memory.max")), (96u64 << 20).to_string());
        assert_eq!(read(&d.join("pids.max")), "40");
        assert_eq!(read(&d.join("cpu.max")), "50000 100000");
        assert_eq!(read(&d.join("memory.oom.group")), "1");
    } else {
        let find = |c: &str| {
            paths
                .iter()
                .find(|p| p.starts_with(format!("/sys/fs/cgroup/{c}/")))
                .unwrap()
                .clone()
        };
        assert_eq!(
            read(&find("memory").join("memory.limit_in_bytes")),
            (96u64 << 20).to_string()
        );
        assert_eq!(read(&find("pids").join("pids.max")), "40");
        assert_eq!(read(&find("cpu").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&find("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&find("cpu").join("cpu.shares")), "2048");
    }
    assert_eq!(
        pids.len(),
        4,
        "all of the worker's processes are in its cgroup: {pids:?}"
    );
    let out = w.wait(Duration::from_secs(30));
    assert_eq!(out.code, 0);
    assert!(
        out.usage.memory_peak > 0 && out.usage.cpu_usage_ns > 0,
        "{:?}",
        out.usage
    );
    for p in paths {
        assert!(!p.exists(), "{} removed", p.display());
    }
}

#[test]
fn nothing_of_a_worker_survives_it() {
    let Some(h) = host() else { return };
    // A daemonized grandchild tries to outlive the worker; its unusual
    // argument makes it findable on the host.
    let marker = format!("300.{}", std::process::id());
    let script = format!("setsid sleep {marker} </dev/null >/dev/null 2>&1 & sleep 1; exit 0");
    let w = h
        .spawn("alice", "demo", "claude-code", &["/bin/sh", "-c", &script])
        .unwrap();
    let paths = w.cgroup.paths();
    let find = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &format!("sleep {marker}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mut seen = false;
    for _ in 0..50 {
        if !find().is_empty() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(seen, "the survivor attempt started");
    let out = w.wait(Duration::from_secs(30));
    assert_eq!(out.code, 0);
    assert_eq!(find(), "", "no survivor");
    assert!(paths.iter().all(|p| !p.exists()));
}
