//! Clients in other languages, with their default options, against a real
//! wardend: Python (grpcio, gRPC C-core) and Node (@grpc/grpc-js), each
//! through health, reflection, Spawn, Attach with stdin, Wait, Events.Watch
//! with replay and a Claude Code approval round trip; raw HTTP/2 requests
//! with every `:authority` clients send over a Unix socket; and the example
//! front end in `examples/frontend`. `tests/run-all` installs the pinned
//! client libraries under the cargo target directory (`clients/`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use warden_tests::claude::*;
use warden_tests::daemon::Daemon;
use warden_tests::fake_anthropic::{FakeAnthropic, Turn};
use warden_tests::*;

/// `clients/` next to this build's binaries: `python/` (a venv) and
/// `node/node_modules`.
fn clients() -> PathBuf {
    let mut dir = bin_dir();
    dir.pop();
    let dir = dir.join("clients");
    assert!(
        dir.join("python/bin/python").exists() && dir.join("node/node_modules/@grpc/grpc-js").exists(),
        "{} is missing the client libraries: tests/run-all installs them",
        dir.display()
    );
    dir
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The JSON lines a client printed, by step.
fn steps(out: &std::process::Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "the client failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

/// A daemon with profile `name` running Claude Code that asks before each
/// tool call, against `api`; `user` has a credential.
fn daemon_asking(api: &FakeAnthropic, name: &str, user: &str) -> Daemon {
    let d = Daemon::start();
    add_test_profile(&d, name, api, "default", "approval_timeout = \"60s\"");
    d.set_credentials(user, "sk-client-test\n");
    d
}

/// A session that asks to run one command, then ends.
fn asking_api(marker: &str) -> FakeAnthropic {
    FakeAnthropic::start(vec![
        bash(&format!("touch /workspace/default/{marker} && echo made-{marker}")),
        Turn::Text("done".into()),
    ])
}

/// What every client must have seen; `client` is its name in the commands
/// it sent.
fn check_steps(s: &[Value], client: &str) {
    assert_eq!(step(s, "health")["status"], "SERVING");
    let services = step(s, "reflection")["services"].as_array().unwrap().clone();
    for svc in [
        "warden.v1.Workers",
        "warden.v1.Events",
        "warden.v1.Profiles",
        "warden.v1.Usage",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == svc), "{svc} not in {services:?}");
    }
    assert_eq!(step(s, "spawn")["state"], "WORKER_STATE_RUNNING");
    let attach = step(s, "attach");
    assert_eq!(attach["stdout"], format!("got:hello from {client}\n"));
    assert_eq!(attach["stderr"], "oops\n");
    assert_eq!(attach["exit_code"], 3);
    assert_eq!(step(s, "wait")["exit_code"], 3);
    assert_eq!(step(s, "wait")["reason"], "EXIT_REASON_EXITED");
    let kinds = step(s, "watch")["kinds"].as_array().unwrap().clone();
    assert_eq!(kinds.first(), Some(&Value::from("worker_started")), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&Value::from("worker_exited")), "{kinds:?}");
    let one = step(s, "spawn_attach");
    assert_eq!(
        (&one["first"], &one["stdout"], &one["exit_code"]),
        (&Value::from("started"), &Value::from("one call\n"), &Value::from(4)),
        "{one}"
    );
    let approval = step(s, "approval");
    assert_eq!(approval["tool"], "Bash");
    assert!(
        approval["command"]
            .as_str()
            .unwrap()
            .contains(&format!("made-{client}")),
        "{approval}"
    );
    assert_eq!(approval["exit_code"], 0);
    assert!(approval["requests"].as_u64().unwrap() >= 2, "{approval}");
}

#[test]
fn python_grpcio_with_its_defaults_does_everything() {
    if !root() {
        return;
    }
    let clients = clients();
    let api = asking_api("python");
    let d = daemon_asking(&api, "cc-ask", "alice");
    // Stubs from the daemon's own protos, with grpcio-tools' protoc.
    let stubs = tempfile::tempdir().unwrap();
    let python = clients.join("python/bin/python");
    let protos: Vec<PathBuf> = ["workers", "events", "usage", "profiles"]
        .iter()
        .map(|p| repo().join(format!("proto/warden/v1/{p}.proto")))
        .collect();
    let made = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo().join("proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .args(&protos)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let out = Command::new(&python)
        .arg(repo().join("tests/clients/python/check.py"))
        .arg(d.socket())
        .arg(stubs.path())
        .args(["alice", "cc-ask"])
        .output()
        .unwrap();
    check_steps(&steps(&out), "python");
    let r = results(&api);
    assert!(r[0].0.contains("made-python") && !r[0].1, "{r:?}");
}

#[test]
fn node_grpc_js_with_its_defaults_does_everything() {
    if !root() {
        return;
    }
    let clients = clients();
    let api = asking_api("node");
    let d = daemon_asking(&api, "cc-ask", "bob");
    let out = Command::new("node")
        .arg(repo().join("tests/clients/node/check.js"))
        .arg(d.socket())
        .arg(repo().join("proto"))
        .args(["bob", "cc-ask"])
        .env("NODE_PATH", clients.join("node/node_modules"))
        .output()
        .unwrap();
    check_steps(&steps(&out), "node");
    let r = results(&api);
    assert!(r[0].0.contains("made-node") && !r[0].1, "{r:?}");
}

#[test]
fn every_authority_a_client_sends_on_the_socket_is_served() {
    if !root() {
        return;
    }
    let clients = clients();
    let d = Daemon::start();
    let out = Command::new(clients.join("python/bin/python"))
        .arg(repo().join("tests/clients/python/authorities.py"))
        .arg(d.socket())
        .output()
        .unwrap();
    let answers = steps(&out);
    let forms: Vec<&str> = answers.iter().map(|a| a["client"].as_str().unwrap()).collect();
    assert_eq!(forms.len(), 6, "{forms:?}");
    for a in &answers {
        for r in a["answers"].as_array().unwrap() {
            assert_eq!(
                (r["status"].as_str(), r["grpc_status"].as_str()),
                (Some("200"), Some("0")),
                "{a}"
            );
        }
    }
}

#[test]
fn the_example_front_end_runs_a_session_and_answers_its_approvals() {
    if !root() {
        return;
    }
    let clients = clients();
    let api = asking_api("frontend");
    let d = daemon_asking(&api, "cc-ask", "carol");
    let out = Command::new("node")
        .arg(repo().join("examples/frontend/frontend.js"))
        .arg("--socket")
        .arg(d.socket())
        .args([
            "--user",
            "carol",
            "--profile",
            "cc-ask",
            "--answer",
            "allow",
            "make",
            "a",
            "file",
        ])
        .env("NODE_PATH", clients.join("node/node_modules"))
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
    for line in [
        "for carol (profile cc-ask)",
        "claude wants Bash",
        "permission request ",
        "  allowed",
        "made-frontend",
        "result: done",
        "usage of carol: 2 requests",
    ] {
        assert!(shown.contains(line), "{line:?} not in:\n{shown}");
    }
    assert!(workspace(&d, "carol", "cc-ask", "default").join("frontend").exists());
}
