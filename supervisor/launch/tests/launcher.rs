//! The real warden-launch binary, driven through the daemon's launcher
//! client: exit statuses, signal forwarding, reaping, the wall-clock
//! timeout, and typed setup failures that leave the worker unrun.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{chown, symlink};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use warden_daemon::launcher::{launch, LaunchError};
use warden_daemon::privileged;
use warden_policy::seccomp::Arch;
use warden_policy::{LaunchSpec, ProfileSet, SpawnRequest};

const UID: u32 = 220_001;
const LAUNCHER: &str = env!("CARGO_BIN_EXE_warden-launch");

struct Dirs {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    workspace: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let workspace = tmp.path().join("ws");
    for d in [&home, &workspace] {
        std::fs::create_dir(d).unwrap();
        chown(d, Some(UID), Some(UID)).unwrap();
    }
    Dirs {
        _tmp: tmp,
        home,
        workspace,
    }
}

fn spec(d: &Dirs, argv: &[&str]) -> LaunchSpec {
    let set = ProfileSet::embedded().unwrap();
    let req = SpawnRequest {
        worker_id: "lt".into(),
        user: "launchtest".into(),
        uid: UID,
        gid: UID,
        project: "p".into(),
        argv: argv.iter().map(|s| (*s).to_string()).collect(),
        env: BTreeMap::new(),
        home_dir: d.home.clone(),
        workspace_dir: d.workspace.clone(),
        cgroup_procs: vec![],
        protected: vec![],
        extra_binds: vec![],
    };
    warden_policy::compile(set.get("claude-code").unwrap(), &req, Arch::host().unwrap()).unwrap()
}

fn run(spec: &LaunchSpec) -> (i32, String) {
    let mut l = launch(
        Path::new(LAUNCHER),
        spec,
        Stdio::null(),
        Stdio::piped(),
        Stdio::inherit(),
    )
    .unwrap();
    let mut out = String::new();
    l.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = l.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    (status.code().unwrap_or_else(|| 128 + status.signal().unwrap()), out)
}

fn setup_error(spec: &LaunchSpec) -> (String, String, String) {
    match launch(
        Path::new(LAUNCHER),
        spec,
        Stdio::null(),
        Stdio::null(),
        Stdio::inherit(),
    ) {
        Err(LaunchError::Setup {
            stage,
            errno_name,
            message,
            ..
        }) => (stage, errno_name, message),
        Err(e) => panic!("expected a setup error, got {e}"),
        Ok(_) => panic!("expected a setup error, the worker started"),
    }
}

fn root() -> bool {
    privileged("creates namespaces and drops to a worker uid")
}

#[test]
fn the_workers_exit_status_is_passed_through() {
    if !root() {
        return;
    }
    let d = dirs();
    assert_eq!(run(&spec(&d, &["/bin/sh", "-c", "exit 7"])).0, 7);
    assert_eq!(run(&spec(&d, &["/bin/sh", "-c", "echo hi"])), (0, "hi\n".into()));
    // Killed by a signal: 128 + signal, as a shell reports it.
    assert_eq!(run(&spec(&d, &["/bin/sh", "-c", "kill -KILL $$"])).0, 128 + 9);
}

#[test]
fn sigterm_to_the_launcher_reaches_the_worker() {
    if !root() {
        return;
    }
    let d = dirs();
    let s = spec(
        &d,
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ],
    );
    let mut l = launch(Path::new(LAUNCHER), &s, Stdio::null(), Stdio::piped(), Stdio::inherit()).unwrap();
    let mut lines = BufReader::new(l.child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(l.child.id()).expect("a pid fits pid_t")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(l.child.wait().unwrap().code(), Some(42));
}

#[test]
fn orphans_are_reaped_by_the_init() {
    if !root() {
        return;
    }
    let d = dirs();
    // Orphaned grandchildren exit and become zombies unless PID 1 reaps them.
    let script = "for i in 1 2 3; do (sleep 0.1 &) ; done; sleep 0.6; \
                  grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l; cat /proc/1/comm";
    let (code, out) = run(&spec(&d, &["/bin/sh", "-c", script]));
    assert_eq!(code, 0);
    assert_eq!(out, "0\nwarden-launch\n");
}

#[test]
fn the_wall_clock_timeout_terminates_the_worker() {
    if !root() {
        return;
    }
    let d = dirs();
    let mut s = spec(&d, &["/bin/sleep", "60"]);
    s.timeout_secs = Some(1);
    let started = Instant::now();
    let (code, _) = run(&s);
    assert_eq!(code, 128 + 15, "SIGTERM at the deadline");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_missing_command_is_a_typed_exec_failure() {
    if !root() {
        return;
    }
    let d = dirs();
    let (stage, errno, message) = setup_error(&spec(&d, &["no-such-command"]));
    assert_eq!((stage.as_str(), errno.as_str()), ("exec", "ENOENT"));
    assert!(message.contains("no-such-command"), "{message}");
}

#[test]
fn below_the_profiles_landlock_abi_the_worker_never_runs() {
    if !root() {
        return;
    }
    let d = dirs();
    let mut s = spec(&d, &["/bin/sh", "-c", "touch ran"]);
    s.landlock.min_abi = 99;
    let (stage, errno, message) = setup_error(&s);
    assert_eq!((stage.as_str(), errno.as_str()), ("landlock", "EOPNOTSUPP"));
    assert!(message.contains("requires at least 99"), "{message}");
    assert!(!d.workspace.join("ran").exists());
}

#[test]
fn a_symlinked_user_directory_is_refused() {
    if !root() {
        return;
    }
    let d = dirs();
    let link = d.workspace.parent().unwrap().join("link");
    symlink("/etc", &link).unwrap();
    let mut s = spec(&d, &["/bin/true"]);
    s.binds
        .iter_mut()
        .find(|b| b.target.starts_with("/workspace"))
        .unwrap()
        .source = link;
    let (stage, errno, _) = setup_error(&s);
    assert_eq!((stage.as_str(), errno.as_str()), ("mounts", "ELOOP"));
}

#[test]
fn a_root_worker_is_refused() {
    if !root() {
        return;
    }
    let d = dirs();
    let mut s = spec(&d, &["/bin/true"]);
    s.uid = 0;
    let (stage, errno, _) = setup_error(&s);
    assert_eq!((stage.as_str(), errno.as_str()), ("identity", "EPERM"));
}

#[test]
fn a_garbage_spec_is_a_typed_spec_failure() {
    if !root() {
        return;
    }
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (spec_r, spec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    // Only the launcher's ends are inherited.
    fcntl(&spec_r, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    fcntl(&report_w, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let mut child = std::process::Command::new(LAUNCHER)
        .args([
            "--spec-fd",
            &spec_r.as_raw_fd().to_string(),
            "--report-fd",
            &report_w.as_raw_fd().to_string(),
        ])
        .spawn()
        .unwrap();
    drop(spec_r);
    drop(report_w);
    std::fs::File::from(spec_w).write_all(b"{not json").unwrap();
    let mut report = String::new();
    std::fs::File::from(report_r).read_to_string(&mut report).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(125));
    assert!(
        report.contains(r#""kind":"failed","stage":"spec","errno":22"#),
        "{report}"
    );
}

#[test]
fn without_arguments_it_explains_itself() {
    let out = std::process::Command::new(LAUNCHER).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: warden-launch"));
}

#[test]
fn under_the_daemons_private_umask_the_worker_reaches_its_directories() {
    // wardend runs with UMask=0077 (systemd); the launcher's mountpoints
    // must still let the worker reach /workspace and /home, and the worker
    // starts with a login's umask.
    if !root() {
        return;
    }
    let d = dirs();
    let wrapper = d._tmp.path().join("launch-0077");
    std::fs::write(&wrapper, format!("#!/bin/sh\numask 0077\nexec {LAUNCHER} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = spec(
        &d,
        &[
            "/bin/sh",
            "-c",
            "umask; cd /workspace/p && touch made && stat -c %a made && ls -d $HOME",
        ],
    );
    let mut l = launch(&wrapper, &s, Stdio::null(), Stdio::piped(), Stdio::inherit()).unwrap();
    let mut out = String::new();
    l.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(l.child.wait().unwrap().success(), "{out}");
    assert_eq!(out, "0022\n644\n/home/launchtest\n");
}
