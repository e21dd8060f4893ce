//! Helpers for the tests that run the real `claude` binary in workers of a
//! test daemon, against the scripted fake Messages API.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::daemon::Daemon;
use crate::fake_anthropic::{FakeAnthropic, Turn};
use crate::{claude_binary, privileged};

/// Whether the test can run (root, and the pinned claude installed).
pub fn root() -> bool {
    if !privileged("runs wardend and the real claude binary as a worker uid") {
        return false;
    }
    assert!(
        claude_binary().exists(),
        "{} is missing: tests/run-all installs the pinned @anthropic-ai/claude-code there",
        claude_binary().display()
    );
    true
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn tool(name: &str, input: Value) -> Turn {
    Turn::ToolUse {
        name: name.into(),
        input,
    }
}

pub fn bash(command: &str) -> Turn {
    tool("Bash", json!({"command": command, "description": "warden test"}))
}

/// A daemon with a `cc-test` profile: the shipped claude-code profile
/// pointed at `api`, with `extra` appended to its `[claude]` section.
pub fn daemon_for(api: &FakeAnthropic, mode: &str, extra: &str) -> Daemon {
    let d = Daemon::start();
    add_test_profile(&d, "cc-test", api, mode, extra);
    d
}

/// Adds profile `name`: claude-code pointed at `api`, in permission `mode`,
/// with `extra` after its `[claude]` section (more `[claude]` keys, or
/// other sections).
pub fn add_test_profile(d: &Daemon, name: &str, api: &FakeAnthropic, mode: &str, extra: &str) {
    d.add_profile(
        name,
        &format!(
            "extends = \"claude-code\"\n[claude]\npermission_mode = {mode:?}\nbase_url = {:?}\n{extra}\n",
            api.base_url()
        ),
    );
}

/// `user`'s workspace `project` under `profile` (made if missing: the
/// daemon gives it to the user when a worker of that profile starts).
pub fn workspace(d: &Daemon, user: &str, profile: &str, project: &str) -> PathBuf {
    let ws = d.tree(user, profile).join("workspace").join(project);
    std::fs::create_dir_all(&ws).unwrap();
    ws
}

/// Runs a one-shot session for `user` under `cc-test`; returns wardenctl's
/// output (the stream-json transcript on stdout).
pub fn run(d: &Daemon, user: &str, prompt: &str) -> std::process::Output {
    d.ctl(&["spawn", "--user", user, "--profile", "cc-test", "-w", "--", prompt])
}

/// The stream-json lines of a transcript.
pub fn transcript(stdout: &[u8]) -> Vec<Value> {
    text(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The tool results the fake API received, in order, as (content, is_error).
pub fn results(api: &FakeAnthropic) -> Vec<(String, bool)> {
    api.tool_results().into_iter().map(|(_, c, e)| (c, e)).collect()
}

/// Runs one-shot sessions side by side, each `(user, profile, prompt)`;
/// returns their outputs in the same order once all ended, after checking
/// each succeeded.
pub fn run_side_by_side(d: &Daemon, sessions: &[(&str, &str, &str)]) -> Vec<std::process::Output> {
    let running: Vec<_> = sessions
        .iter()
        .map(|(user, profile, prompt)| {
            d.ctl_command(&["spawn", "--user", user, "--profile", profile, "-w", "--", prompt])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("wardenctl")
        })
        .collect();
    running
        .into_iter()
        .map(|s| {
            let out = s.wait_with_output().expect("wardenctl");
            assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
            out
        })
        .collect()
}

/// A stand-in for the `claude` binary: `script` (with its `#!` line) as an
/// executable named `name` in a directory of its own that workers can
/// reach; it lasts as long as the returned directory.
pub fn stand_in_claude(name: &str, script: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.path().join(name);
    std::fs::write(&path, script).expect("the stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, path)
}
