//! The launch server's loop: takes launch requests, creates each worker's
//! init in its new namespaces, answers with its pid and pidfd, and reaps
//! the inits that end.
//!
//! Why a server: a worker's init made by cloning this small
//! single-threaded process costs one fork; starting a launcher for each
//! worker cost wardend a fork and exec, and the new process's loading,
//! linking and start-up (about a millisecond here: README "What the
//! sandbox costs"). And under systemd the server runs in a unit of its
//! own (`warden-launch.service`), so that workers do not inherit the
//! seccomp filters systemd installs on wardend.service (every one of a
//! worker's system calls would run through them: SECURITY.md says what
//! confines a worker instead).
//!
//! Must never: block on one client (a reply that does not fit is a
//! dropped connection), take a request from anyone but root, or keep a
//! worker's descriptor past the reply.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    accept4, getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use warden_policy::{LaunchReply, LaunchRequest};

use crate::sandbox::{SetupError, Stage};
use crate::sys::{self, Cloned};

/// Where requests come from.
pub enum Source {
    /// One connected socket (wardend started this server): the server
    /// ends when it closes.
    Connected(OwnedFd),
    /// A listening socket (systemd's warden-launch.socket): connections
    /// come and go; the server runs until it is stopped.
    Listening(OwnedFd),
}

/// Namespaces the server's clone creates. The cgroup namespace is not
/// among them: the init creates it once it is in its cgroup.
const NAMESPACES: u64 =
    (libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET) as u64;

/// A request is small JSON; more is refused.
const MAX_REQUEST: usize = 4096;

/// Connections the server keeps at once (wardend needs one or a few).
const MAX_CONNECTIONS: usize = 64;

/// A request's cgroup directories at most (v1 has a handful of
/// controllers); with the six others they fit the 16 descriptors a request
/// is read with.
const MAX_CGROUP_DIRS: usize = 8;

pub fn serve(source: Source) -> ! {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let signals = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&chld), None)
        .and_then(|()| SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK));
    let signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warden-launch: Cannot wait for children on a signalfd: {e}");
            std::process::exit(71);
        }
    };
    let (listener, mut conns, embedded) = match source {
        Source::Connected(c) => (None, vec![c], true),
        Source::Listening(l) => (Some(l), Vec::new(), false),
    };
    loop {
        let (reaped, accepted, ready) = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if let Some(l) = &listener {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            let first_conn = fds.len();
            fds.extend(conns.iter().map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("warden-launch: poll failed: {e}");
                    std::process::exit(71);
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (
                ready(&fds[0]),
                listener.is_some() && ready(&fds[1]),
                fds[first_conn..].iter().map(ready).collect::<Vec<_>>(),
            )
        };
        if reaped {
            while let Ok(Some(_)) = signals.read_signal() {}
            reap();
        }
        // Connections that ended or misbehaved go; the others stay.
        let mut i = 0;
        conns.retain(|c| {
            let keep = !ready[i] || handle(c.as_fd());
            i += 1;
            keep
        });
        if accepted {
            if let Some(c) = listener.as_ref().and_then(|l| accept_root(l.as_fd())) {
                if conns.len() < MAX_CONNECTIONS {
                    conns.push(c);
                }
            }
        }
        if embedded && conns.is_empty() {
            // wardend is gone. Running workers go on; the next wardend
            // cleans them up with their cgroups.
            std::process::exit(0);
        }
    }
}

/// Reaps every child that has ended. Their status is the daemon's
/// business: each init writes it on its status pipe.
fn reap() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// A new connection, if its peer is root (the socket is root's alone too).
fn accept_root(listener: BorrowedFd<'_>) -> Option<OwnedFd> {
    let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).ok()?;
    let fd = sys::adopt_fd(fd);
    let peer = getsockopt(&fd, sockopt::PeerCredentials).ok()?;
    (peer.uid() == 0).then_some(fd)
}

/// Serves one request on `conn`; false when the connection is over.
fn handle(conn: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; MAX_REQUEST];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let (n, truncated, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR | Errno::EAGAIN) => return true,
            Err(_) => return false,
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw.into_iter().map(sys::adopt_fd));
                }
            }
        }
        let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, truncated, fds)
    };
    if n == 0 && fds.is_empty() {
        return false;
    }
    let request = serde_json::from_slice::<LaunchRequest>(&buf[..n]);
    let reply = match request {
        _ if truncated => refused(Errno::EMSGSIZE, "The launch request was too long"),
        Err(e) => refused(Errno::EINVAL, &format!("Cannot parse the launch request: {e}")),
        Ok(r) if fds.len() != LaunchRequest::FDS.len() + r.cgroups || r.cgroups > MAX_CGROUP_DIRS => refused(
            Errno::EINVAL,
            &format!(
                "The launch request carried {} descriptors, expected {}",
                fds.len(),
                LaunchRequest::FDS.len() + r.cgroups
            ),
        ),
        Ok(r) => {
            let into = (r.into_cgroup && r.cgroups == 1).then(|| fds[LaunchRequest::FDS.len()].as_raw_fd());
            match sys::clone_init(NAMESPACES, into) {
                Ok(Cloned::Child { in_cgroup }) => child(fds, in_cgroup),
                Ok(Cloned::Parent { pid, pidfd }) => {
                    let reply = LaunchReply::Started {
                        pid: u32::try_from(pid).unwrap_or(0),
                    };
                    return send(conn, &reply, Some(pidfd.as_raw_fd()));
                }
                Err(e) => LaunchReply::Failed {
                    stage: "namespaces".into(),
                    errno: e as i32,
                    message: format!("Cannot create the worker's init in new namespaces: {}", e.desc()),
                },
            }
        }
    };
    // The worker's descriptors close here, whatever the answer.
    drop(fds);
    send(conn, &reply, None)
}

fn refused(errno: Errno, message: &str) -> LaunchReply {
    LaunchReply::Failed {
        stage: "spec".into(),
        errno: errno as i32,
        message: message.into(),
    }
}

/// Sends `reply` (with `pidfd`) without waiting; false if it cannot go.
fn send(conn: BorrowedFd<'_>, reply: &LaunchReply, pidfd: Option<RawFd>) -> bool {
    let bytes = reply.to_bytes();
    let iov = [std::io::IoSlice::new(&bytes)];
    let fds: Vec<RawFd> = pidfd.into_iter().collect();
    let cmsg: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .is_ok()
}

/// In the clone's child: moves itself into the worker's cgroup (unless it
/// was created there), then becomes the worker's init, with its
/// descriptors in place and nothing of the server's left open. Never
/// returns.
fn child(fds: Vec<OwnedFd>, in_cgroup: bool) -> ! {
    let mut fds = fds.into_iter();
    let raw: Vec<RawFd> = fds
        .by_ref()
        .take(LaunchRequest::FDS.len())
        .map(IntoRawFd::into_raw_fd)
        .collect();
    let cgroups: Vec<OwnedFd> = fds.collect();
    if !in_cgroup {
        if let Err(e) = join(&cgroups) {
            crate::fail(&mut sys::file_of(raw[3]), &e, crate::EXIT_SETUP_FAILED)
        }
    }
    drop(cgroups);
    let marks = vec![crate::mark(Stage::Cgroup)];
    // stdin, stdout and stderr stay open across the worker's exec; the
    // report, status and spec descriptors do not.
    let above = u32::try_from(crate::SPEC_FD + 1).unwrap_or(u32::MAX);
    if sys::place_fds(&raw, 3).is_err() || sys::close_from(above).is_err() {
        std::process::exit(crate::EXIT_SETUP_FAILED);
    }
    crate::init(marks)
}

/// Moves this process into each cgroup directory of `dirs`, before
/// anything of the worker runs: on cgroup v1 by writing "0" (the writer) to
/// `tasks`, the one move the kernel makes without waiting for an RCU grace
/// period (some 10 ms on an idle machine, with the cgroup lock held, so
/// that every other spawn's cgroup work waited too); this process has one
/// thread, so its thread is the whole of it. Elsewhere (cgroup v2 where the
/// clone could not create it in place) `cgroup.procs`.
fn join(dirs: &[OwnedFd]) -> Result<(), SetupError> {
    for dir in dirs {
        sys::join_cgroup(dir).map_err(|e| SetupError::new(Stage::Cgroup, e, "Cannot join the worker's cgroup"))?;
    }
    Ok(())
}
