//! The normal work of a coding agent succeeds inside the `claude-code`
//! sandbox: git, a C compiler, python3, files that belong to the user, and a
//! workspace shared by the user's workers but not with other users.

use warden_tests::*;

const PROFILE: &str = "claude-code";

fn host() -> Option<Host> {
    host_with(&[])
}

fn host_with(profiles: &[(&str, &str)]) -> Option<Host> {
    privileged("runs real sandboxed workers").then(|| Host::new(profiles))
}

fn sh(host: &Host, user: &str, script: &str) -> Outcome {
    let out = host.run(user, "demo", PROFILE, &["/bin/sh", "-c", script]);
    eprintln!(
        "--- {user}: {script}\nexit {}\nstdout:\n{}\nstderr:\n{}",
        out.code, out.stdout, out.stderr
    );
    out
}

#[test]
fn git_init_and_commit_in_the_workspace() {
    let Some(h) = host() else { return };
    let out = sh(
        &h,
        "alice",
        "git init -q && echo hello > README && git add README && \
         git -c user.name=Alice -c user.email=alice@example.invalid commit -qm first && git log --format=%s",
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.trim(), "first");
    let ws = h.prepare("alice", PROFILE, "demo").workspace;
    assert!(ws.join(".git/HEAD").exists());
}

#[test]
fn compile_and_run_c() {
    let Some(h) = host() else { return };
    let out = sh(
        &h,
        "alice",
        "printf '#include <stdio.h>\\nint main(void){puts(\"built inside\");return 0;}\\n' > hello.c && cc -o hello hello.c && ./hello",
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.trim(), "built inside");
}

#[test]
fn run_a_python3_script() {
    let Some(h) = host() else { return };
    let out = sh(
        &h,
        "alice",
        "printf 'import json, os\\nprint(json.dumps({\"cwd\": os.getcwd(), \"sum\": sum(range(10))}))\\n' > s.py && python3 s.py",
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.trim(), r#"{"cwd": "/workspace/demo", "sum": 45}"#);
}

#[test]
fn files_belong_to_the_user_and_are_shared_by_its_workers_only() {
    let Some(h) = host() else { return };
    let uid = h.users.identity("alice").unwrap().uid;
    let out = sh(
        &h,
        "alice",
        "echo data > made-inside && mkdir -p sub && echo x > sub/y && id -u && whoami",
    );
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, format!("{uid}\nalice\n"));
    let ws = h.prepare("alice", PROFILE, "demo").workspace;
    assert_eq!(owner(&ws.join("made-inside")), uid);
    assert_eq!(owner(&ws.join("sub/y")), uid);

    // A second worker of the same user sees the files.
    let again = sh(&h, "alice", "cat made-inside sub/y");
    assert_eq!(again.stdout, "data\nx\n");

    // A worker of another user does not: its /workspace/demo is its own,
    // and alice's directory on the host does not exist inside.
    let bob = sh(&h, "bob", &format!("cat made-inside; ls {}", ws.display()));
    assert_ne!(bob.code, 0);
    assert!(bob.stdout.is_empty());
    assert!(bob.stderr.contains("No such file or directory"), "{}", bob.stderr);
}

#[test]
fn home_is_writable_and_persists_across_workers() {
    let Some(h) = host() else { return };
    let out = sh(
        &h,
        "alice",
        "mkdir -p ~/.claude && echo '{}' > ~/.claude/settings.json && echo $HOME",
    );
    assert_eq!(out.stdout.trim(), "/home/alice");
    let again = sh(&h, "alice", "cat ~/.claude/settings.json");
    assert_eq!(again.stdout.trim(), "{}");
}

#[test]
fn the_environment_is_the_profiles_not_the_hosts() {
    let Some(h) = host() else { return };
    let out = sh(&h, "alice", "env | sort");
    let names: Vec<&str> = out.stdout.lines().filter_map(|l| l.split('=').next()).collect();
    // The test process has CARGO_*, RUST_BACKTRACE, PATH...; none leaks in
    // except what the profile sets and what warden guarantees.
    assert_eq!(
        names,
        [
            "ALL_PROXY",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
            "DISABLE_AUTOUPDATER",
            "HOME",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "LANG",
            "LOGNAME",
            "NODE_USE_ENV_PROXY",
            "NO_PROXY",
            "PATH",
            "PWD",
            "TMPDIR",
            "USER",
            "all_proxy",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "npm_config_https_proxy",
            "npm_config_proxy"
        ],
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("PATH=/usr/local/bin:/usr/bin:/bin\n"));
}

#[test]
fn node_and_python_size_themselves_from_the_workers_own_limits() {
    // Runtimes read the worker's cgroup through /sys/fs/cgroup (its own
    // only) and /proc/self/cgroup: node's heap sizing and Python's
    // libraries see the profile's memory limit, not the host's RAM.
    let Some(h) = host_with(&[(
        "sized",
        "extends = \"claude-code\"\n[limits]\nmemory = \"300M\"\nmemory_swap = \"300M\"\n",
    )]) else {
        return;
    };
    let node = h.run(
        "alice",
        "demo",
        "sized",
        &["node", "-e", "console.log(process.constrainedMemory())"],
    );
    assert_eq!((node.code, node.stdout.trim()), (0, "314572800"), "{}", node.stderr);
    let python = h.run(
        "alice",
        "demo",
        "sized",
        &[
            "python3",
            "-c",
            "import glob; print(*[open(p).read().strip() for p in sorted(glob.glob('/sys/fs/cgroup/**/memory.max', recursive=True) + glob.glob('/sys/fs/cgroup/**/memory.limit_in_bytes', recursive=True))])",
        ],
    );
    assert_eq!(
        (python.code, python.stdout.trim()),
        (0, "314572800"),
        "{}",
        python.stderr
    );
}
