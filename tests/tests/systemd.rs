//! The shipped systemd units: `systemd-analyze verify` accepts them, the
//! daemon's offline security exposure stays at or below 3.0 and the launch
//! server's at or below 6.5 (it may carry no seccomp filter of systemd's,
//! which every worker would inherit; the README quotes both scores).

use std::path::Path;
use std::process::Command;

use warden_tests::bin_dir;

const UNITS: [&str; 4] = [
    "wardend.socket",
    "wardend.service",
    "warden-launch.socket",
    "warden-launch.service",
];

/// The units with ExecStart pointing at this build's binaries, in a tempdir.
fn units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in UNITS {
        let mut text = std::fs::read_to_string(root.join(unit)).unwrap();
        for bin in ["wardend", "warden-launch"] {
            text = text.replace(
                &format!("/usr/bin/{bin} "),
                &format!("{} ", bin_dir().join(bin).display()),
            );
        }
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    dir
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.map(|u| dir.path().join(u)))
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warden"), "warnings about our units: {err}");
}

/// The overall exposure `systemd-analyze security --offline` gives `unit`.
fn exposure(unit: &str) -> (f64, String) {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(dir.path().join(unit))
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{text}"));
    let score: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    eprintln!("{line}");
    (score, line.to_string())
}

#[test]
fn the_daemons_exposure_is_at_most_3_0() {
    let (score, line) = exposure("wardend.service");
    assert!(score <= 3.0, "{line}");
}

#[test]
fn the_launch_servers_exposure_is_at_most_6_5() {
    let (score, line) = exposure("warden-launch.service");
    assert!(score <= 6.5, "{line}");
}

#[test]
fn the_launch_server_sets_no_seccomp_filter_its_workers_would_inherit() {
    // Each of these is implemented by systemd as a seccomp filter on the
    // unit's processes, which every worker would inherit.
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/warden-launch.service"))
        .unwrap();
    for option in [
        "SystemCallFilter",
        "SystemCallArchitectures",
        "SystemCallLog",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "MemoryDenyWriteExecute",
        "PrivateDevices",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectKernelTunables",
        "ProtectClock",
        "ProtectHostname",
    ] {
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with(&format!("{option}="))),
            "warden-launch.service sets {option}="
        );
    }
}

#[test]
fn the_sysusers_and_tmpfiles_snippets_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let out = Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(root.join("warden.sysusers.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(root.join("warden.tmpfiles.conf")).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "{line}");
        assert!(
            fields[1].starts_with('/') && u32::from_str_radix(fields[2], 8).is_ok(),
            "{line}"
        );
    }
}
