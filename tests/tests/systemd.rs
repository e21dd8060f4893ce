//! The shipped systemd units: `systemd-analyze verify` accepts them and the
//! service's offline security exposure stays at or below 4.5 (the README
//! quotes the score).

use std::path::Path;
use std::process::Command;

use warden_tests::bin_dir;

/// The units with ExecStart pointing at this build's wardend, in a tempdir.
fn units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let service = std::fs::read_to_string(root.join("wardend.service")).unwrap().replace(
        "/usr/local/bin/wardend",
        &bin_dir().join("wardend").display().to_string(),
    );
    std::fs::write(dir.path().join("wardend.service"), service).unwrap();
    std::fs::copy(root.join("wardend.socket"), dir.path().join("wardend.socket")).unwrap();
    dir
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("wardend.socket"))
        .arg(dir.path().join("wardend.service"))
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("wardend"), "warnings about our units: {err}");
}

#[test]
fn the_service_exposure_is_at_most_4_5() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(dir.path().join("wardend.service"))
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
    assert!(score <= 4.5, "{line}");
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
