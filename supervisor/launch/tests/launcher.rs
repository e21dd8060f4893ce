//! The real warden-launch binary, driven through the daemon's launcher
//! client: exit statuses, signal forwarding, reaping, the wall-clock
//! timeout, and typed setup failures that leave the worker unrun.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{chown, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warden_daemon::launcher::{Io, LaunchError, Launcher};
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

fn launcher() -> Launcher {
    Launcher::new(Path::new(LAUNCHER), None)
}

fn run(spec: &LaunchSpec) -> (i32, String) {
    let mut l = launcher().launch(spec, None, Io::Null, Io::Pipe, Io::Inherit).unwrap();
    let mut out = String::new();
    l.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = l.process.wait();
    use std::os::unix::process::ExitStatusExt;
    (status.code().unwrap_or_else(|| 128 + status.signal().unwrap()), out)
}

fn setup_error(spec: &LaunchSpec) -> (String, String, String) {
    match launcher().launch(spec, None, Io::Null, Io::Null, Io::Inherit) {
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
    let mut l = launcher().launch(&s, None, Io::Null, Io::Pipe, Io::Inherit).unwrap();
    let mut lines = BufReader::new(l.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    l.process.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(l.process.wait().code(), Some(42));
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

/// A launch server of our own on a socket pair, spoken to by hand.
struct RawServer {
    sock: std::os::fd::OwnedFd,
    child: std::process::Child,
}

fn raw_server() -> RawServer {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let child = std::process::Command::new(LAUNCHER)
        .args(["--serve-fd", &theirs.as_raw_fd().to_string()])
        .spawn()
        .unwrap();
    RawServer { sock: ours, child }
}

impl RawServer {
    /// Sends `data` with `fds`; the answer and the descriptors that came with it.
    fn ask(&self, data: &[u8], fds: &[std::os::fd::RawFd]) -> (String, usize) {
        use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
        use std::os::fd::AsRawFd;
        let iov = [std::io::IoSlice::new(data)];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut got = 0;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    nix::unistd::close(fd).unwrap();
                    got += 1;
                }
            }
        }
        let n = msg.bytes;
        (String::from_utf8_lossy(&buf[..n]).into_owned(), got)
    }
}

#[test]
fn a_garbage_spec_is_a_typed_spec_failure() {
    if !root() {
        return;
    }
    use nix::fcntl::OFlag;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    // Not a frame (its first four bytes, as a length, are far past the
    // largest frame); a frame of what is not JSON.
    let mut framed = (9u32).to_le_bytes().to_vec();
    framed.extend_from_slice(b"{not json");
    for garbage in [b"{not json".to_vec(), framed] {
        let server = raw_server();
        let null = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let (spec_r, spec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let fds = [
            null.as_raw_fd(),
            null.as_raw_fd(),
            null.as_raw_fd(),
            report_w.as_raw_fd(),
            status_w.as_raw_fd(),
            spec_r.as_raw_fd(),
        ];
        let (reply, pidfds) = server.ask(br#"{"cgroups":0,"into_cgroup":false}"#, &fds);
        assert!(reply.contains(r#""kind":"started""#), "{reply}");
        assert_eq!(pidfds, 1, "the init's pidfd comes with the answer");
        drop((spec_r, report_w, status_w));
        std::fs::File::from(spec_w).write_all(&garbage).unwrap();
        let mut report = String::new();
        std::fs::File::from(report_r).read_to_string(&mut report).unwrap();
        assert!(
            report.contains(r#""kind":"failed","stage":"spec","errno":22"#),
            "{report}"
        );
        // No status: the worker never ran.
        let mut status = Vec::new();
        std::fs::File::from(status_r).read_to_end(&mut status).unwrap();
        assert!(status.is_empty(), "{status:?}");
    }
}

#[test]
fn the_launch_server_refuses_bad_requests_and_goes_on() {
    if !root() {
        return;
    }
    let mut server = raw_server();
    // Not a request; a request with too few descriptors.
    let (reply, _) = server.ask(b"{not json", &[]);
    assert!(
        reply.contains(r#""kind":"failed","stage":"spec","errno":22"#),
        "{reply}"
    );
    assert!(reply.contains("Cannot parse the launch request"), "{reply}");
    let (reply, _) = server.ask(br#"{"cgroups":0,"into_cgroup":false}"#, &[0, 1]);
    assert!(reply.contains("carried 2 descriptors, expected 6"), "{reply}");
    // It still serves: a real launch through the daemon's client works
    // (another server, the same binary).
    let d = dirs();
    assert_eq!(run(&spec(&d, &["/bin/sh", "-c", "exit 3"])).0, 3);
    // It ends when its only client goes away.
    drop(server.sock);
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn a_listening_launch_server_serves_only_root() {
    if !root() {
        return;
    }
    // As systemd starts it: the listening socket on fd 3, LISTEN_PID its own
    // (bash: dash takes no descriptor above 9 in a redirection).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("launch.sock");
    let listener = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    use std::os::fd::AsRawFd;
    nix::sys::socket::bind(listener.as_raw_fd(), &nix::sys::socket::UnixAddr::new(&path).unwrap()).unwrap();
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=1 exec {LAUNCHER} --serve 3<&{}",
        listener.as_raw_fd()
    );
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Killed(
        std::process::Command::new("/bin/bash")
            .args(["-c", &script])
            .spawn()
            .unwrap(),
    );
    drop(listener);
    // Another uid connects and asks: the server hangs up without an answer.
    let ask = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
         try:\n    s.connect({:?}); s.send(b'{{\"cgroups\":0,\"into_cgroup\":false}}'); answer = s.recv(4096)\n\
         except ConnectionError:\n    answer = b''\n\
         print('hung up' if answer == b'' else answer)\n",
        path.display().to_string()
    );
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &ask,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hung up", "{out:?}");
    // Root is served.
    let l = Launcher::new(Path::new(LAUNCHER), Some(&path));
    let d = dirs();
    let mut w = l
        .launch(
            &spec(&d, &["/bin/sh", "-c", "exit 5"]),
            None,
            Io::Null,
            Io::Null,
            Io::Inherit,
        )
        .unwrap();
    assert_eq!(w.process.wait().code(), Some(5));
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
    let mut l = Launcher::new(&wrapper, None)
        .launch(&s, None, Io::Null, Io::Pipe, Io::Inherit)
        .unwrap();
    let mut out = String::new();
    l.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(l.process.wait().success(), "{out}");
    assert_eq!(out, "0022\n644\n/home/launchtest\n");
}
