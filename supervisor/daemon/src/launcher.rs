//! Starting `warden-launch` for one worker.
//!
//! Owns: the two pipes (spec in, report out), the spawn itself with a cleared
//! environment, and reading the launcher's typed report. The daemon never
//! forks to do sandbox setup itself (a fork of a multithreaded process may
//! only make async-signal-safe calls); everything privileged happens in the
//! launcher, which is single-threaded.
//!
//! Must never: put the spec in argv or the environment; report success
//! before the launcher said what it enforced.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::unistd::pipe2;
use warden_policy::{Enforced, LaunchReport, LaunchSpec, ListenerKind};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Cannot start {path}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot pass the launch spec to the launcher")]
    Pipe(#[source] std::io::Error),
    /// The sandbox could not be built; the worker never ran.
    #[error("Sandbox setup failed at {stage} ({errno_name}): {message}")]
    Setup {
        stage: String,
        errno: i32,
        errno_name: String,
        message: String,
    },
    #[error("The launcher ended without a report (status {status})")]
    NoReport { status: String },
    #[error("The launcher handed over {got} descriptors, expected {expected}")]
    Descriptors { got: usize, expected: usize },
}

/// A worker whose sandbox is in place and whose command was exec'd.
#[derive(Debug)]
pub struct Launched {
    /// The outer launcher process; its exit status is the worker's.
    pub child: Child,
    pub enforced: Enforced,
    /// The read end of the worker's denial pipe: its init answers the
    /// denied system calls and reports them here (see [`crate::denials`]).
    pub denials: Option<OwnedFd>,
    /// The listening sockets on the worker's loopback, for the proxy and
    /// the API gateway (see [`crate::net`]).
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
}

/// Serializes the window in which the child's pipe ends are inheritable, so
/// that two concurrent spawns never leak each other's pipes.
static SPAWN: Mutex<()> = Mutex::new(());

fn inheritable(fd: &OwnedFd) -> std::io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// Starts `launcher` for `spec` with the given stdio and waits until the
/// sandbox is built and the worker exec'd (or setup failed).
pub fn launch(
    launcher: &Path,
    spec: &LaunchSpec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Launched, LaunchError> {
    let (spec_r, spec_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| LaunchError::Pipe(e.into()))?;
    // A socket, not a pipe: the launcher passes descriptors on it.
    let (report_r, report_w) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| LaunchError::Pipe(e.into()))?;
    let mut child = {
        let _guard = SPAWN.lock().unwrap_or_else(|p| p.into_inner());
        inheritable(&spec_r).map_err(LaunchError::Pipe)?;
        inheritable(&report_w).map_err(LaunchError::Pipe)?;
        let spawned = Command::new(launcher)
            .arg("--spec-fd")
            .arg(spec_r.as_raw_fd().to_string())
            .arg("--report-fd")
            .arg(report_w.as_raw_fd().to_string())
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn();
        // Our copies of the child's ends close here, inside the lock.
        drop(spec_r);
        drop(report_w);
        spawned.map_err(|source| LaunchError::Spawn {
            path: launcher.display().to_string(),
            source,
        })?
    };

    let mut w = File::from(spec_w);
    let wrote = w.write_all(&spec.to_json());
    drop(w);
    if let Err(e) = wrote {
        // The launcher died before reading; its report says why, if anything.
        if let Err(report) = read_report(report_r) {
            let _ = child.wait();
            return Err(report);
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(LaunchError::Pipe(e));
    }
    match read_report(report_r) {
        Ok((Some(enforced), fds)) => {
            let expected = 1 + spec.listeners.len();
            if fds.len() != expected {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::Descriptors {
                    got: fds.len(),
                    expected,
                });
            }
            let mut fds = fds.into_iter();
            let denials = fds.next();
            let listeners = spec.listeners.iter().map(|l| l.kind).zip(fds).collect();
            Ok(Launched {
                child,
                enforced,
                denials,
                listeners,
            })
        }
        Ok((None, _)) => {
            let status = child.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
            Err(LaunchError::NoReport { status })
        }
        Err(e) => {
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Reads report records until EOF, with the fds passed alongside (the
/// denial pipe, then the network listeners). A failure record wins
/// over an earlier "enforced" record (exec can fail after the sandbox is
/// built).
fn read_report(fd: OwnedFd) -> Result<(Option<Enforced>, Vec<OwnedFd>), LaunchError> {
    let mut bytes = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        };
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(received) = c {
                fds.extend(received.into_iter().map(crate::sys::adopt_received_fd));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let mut enforced = None;
    for line in String::from_utf8_lossy(&bytes).lines() {
        match serde_json::from_str::<LaunchReport>(line) {
            Ok(LaunchReport::Enforced(e)) => enforced = Some(e),
            Ok(LaunchReport::Failed { stage, errno, message }) => {
                return Err(LaunchError::Setup {
                    stage,
                    errno,
                    errno_name: format!("{:?}", nix::errno::Errno::from_raw(errno)),
                    message,
                })
            }
            Err(_) => {
                return Err(LaunchError::Setup {
                    stage: "report".into(),
                    errno: libc::EPROTO,
                    errno_name: "EPROTO".into(),
                    message: format!("Unreadable launcher report line {line:?}"),
                })
            }
        }
    }
    Ok((enforced, fds))
}
