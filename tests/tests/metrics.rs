//! Metrics a real Prometheus scrapes: wardend with `metrics_listen` on a
//! loopback port, workers that start, fail and are denied things, and
//! Debian's `prometheus` (installed by tests/run-all) scraping it; the
//! series are asked for through Prometheus's HTTP API, and `promtool check
//! metrics` reads the exposition clean.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use warden_tests::daemon::{value, Daemon};
use warden_tests::*;

fn root() -> bool {
    privileged("runs wardend, which builds sandboxes and cgroups")
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path` on 127.0.0.1:`port` (HTTP/1.0, read to the end).
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// Kills the process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_the_daemons_metrics() {
    if !root() {
        return;
    }
    let port = free_port();
    let d = Daemon::start_with(&[
        ("metrics_listen", value(vec![value(format!("127.0.0.1:{port}"))])),
        // One primed init for alice's next spawn shows in its gauge.
        ("primed_inits", value(1)),
    ]);
    // Workers that run, fail to start, and are refused a system call.
    for _ in 0..3 {
        assert!(d
            .ctl(&["spawn", "--user", "alice", "-w", "--", "true"])
            .status
            .success());
    }
    assert!(!d
        .ctl(&["spawn", "--user", "alice", "-w", "--", "no-such-command"])
        .status
        .success());
    let _ = d.ctl(&["spawn", "--user", "bob", "-w", "--", "unshare", "-n", "true"]);

    // The exposition itself: what a scraper gets, and promtool's lint.
    let (head, body) = get(port, "/metrics");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("text/plain; version=0.0.4"),
        "{head}"
    );
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed");
    lint.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    for id in d.audit_events().iter().filter_map(|e| e["worker"].as_str()) {
        assert!(!body.contains(id), "worker id {id} is a label");
    }
    assert_eq!(get(port, "/other").0.split_whitespace().nth(1), Some("404"));

    // A real Prometheus scrapes it every second.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: warden\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's package) is installed"),
    );
    let query = |q: &str| -> Vec<Value> {
        let path = format!(
            "/api/v1/query?query={}",
            q.replace('{', "%7B").replace('}', "%7D").replace('"', "%22")
        );
        let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", web)) else {
            return Vec::new();
        };
        drop(s);
        let (_, body) = get(web, &path);
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    };
    let value_of = |r: &Value| r["value"][1].as_str().unwrap_or("0").parse::<f64>().unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        let up = query("up{job=\"warden\"}");
        if up.iter().any(|r| value_of(r) == 1.0) || Instant::now() > deadline {
            break up;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        up.iter().any(|r| value_of(r) == 1.0),
        "the target never came up: {up:?}"
    );
    // Each series Prometheus holds now, and the least it must say.
    for (series, least) in [
        ("warden_spawns_total{profile=\"base\"}", 4.0),
        ("warden_spawn_failures_total{stage=\"exec\"}", 1.0),
        ("warden_denials_total{layer=\"seccomp\"}", 1.0),
        ("warden_worker_exits_total{reason=\"exited\"}", 3.0),
        ("warden_spawn_seconds_count", 4.0),
        ("warden_workers{state=\"exited\",profile=\"base\"}", 4.0),
        ("warden_audit_bytes_written_total", 1.0),
        ("warden_primed_inits", 1.0),
    ] {
        let got = query(series);
        assert!(got.iter().any(|r| value_of(r) >= least), "{series}: {got:?}");
    }
}
