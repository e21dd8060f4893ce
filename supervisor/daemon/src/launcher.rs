//! Asking the launch server (`warden-launch`) for a worker.
//!
//! Owns: the connection to the server (wardend starts a server of its own
//! unless `launch_socket` names one systemd runs, and starts or reaches it
//! again when it has gone), the descriptors of each launch (the worker's
//! stdio, the spec in, the report and the status out), reading the
//! launcher's typed report, and the worker's init as the daemon holds it
//! ([`Process`]: a pidfd and the status pipe, for the server, not the
//! daemon, is its parent). The daemon never forks to do sandbox setup
//! itself (a fork of a multithreaded process may only make
//! async-signal-safe calls); everything privileged happens in the server's
//! child, which is single-threaded.
//!
//! Must never: put the spec in argv or the environment; report success
//! before the launcher said what it enforced; leave a worker's descriptor
//! with the server.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    connect, recvmsg, sendmsg, setsockopt, socket, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use warden_policy::{Enforced, LaunchReply, LaunchReport, LaunchRequest, LaunchSpec, ListenerKind};

use crate::cgroups::WorkerCgroup;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Cannot start the launch server {path}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot reach the launch server at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The launch server did not answer")]
    Server(#[source] std::io::Error),
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
    /// A primed init was offered a spec it was not built for.
    #[error("The primed init was built for another sandbox")]
    Mismatch,
    #[error("The launcher handed over {got} descriptors, expected {expected}")]
    Descriptors { got: usize, expected: usize },
}

impl LaunchError {
    fn setup(stage: String, errno: i32, message: String) -> Self {
        LaunchError::Setup {
            stage,
            errno,
            errno_name: format!("{:?}", Errno::from_raw(errno)),
            message,
        }
    }
}

/// One of a worker's standard streams.
#[derive(Debug)]
pub enum Io {
    /// /dev/null.
    Null,
    /// A pipe whose other end the caller gets in [`Launched`].
    Pipe,
    /// The caller's own (tests).
    Inherit,
    /// This descriptor (a pty, say).
    Fd(OwnedFd),
}

/// A worker whose sandbox is in place and whose command was exec'd.
#[derive(Debug)]
pub struct Launched {
    /// The worker's init; its exit status is the worker's.
    pub process: Process,
    /// The ends of the [`Io::Pipe`] streams.
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    pub enforced: Enforced,
    /// The read end of the worker's denial pipe: its init answers the
    /// denied system calls and reports them here (see [`crate::denials`]).
    pub denials: Option<OwnedFd>,
    /// The worker's mount namespace: held until its end is reported, so
    /// that tearing it down (every mount of the sandbox; the kernel waits
    /// for an RCU grace period) is not on the way of that report.
    pub mount_ns: Option<OwnedFd>,
    /// The listening sockets on the worker's loopback, for the proxy and
    /// the API gateway (see [`crate::net`]).
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
}

/// A worker's init that waits for its spec, in its cgroup and its new
/// namespaces; nothing of a worker runs in it yet.
#[derive(Debug)]
pub struct Pending {
    pub process: Process,
    /// Our ends of the worker's stdin, stdout and stderr pipes.
    stdio: [Option<File>; 3],
    spec: File,
    report: OwnedFd,
}

impl Pending {
    /// Hands the init `spec` and waits until the worker's sandbox is built
    /// and its command exec'd, or setup failed (blocking).
    pub fn run(self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let Pending {
            process,
            stdio,
            spec: mut w,
            report,
        } = self;
        // Both frames at once: the init reads the command as soon as its
        // sandbox is built.
        let mut frames = warden_policy::frame(&spec.sandbox_json());
        frames.extend(warden_policy::frame(&spec.command().to_json()));
        let wrote = w.write_all(&frames);
        drop(w);
        finish(process, stdio, report, wrote, spec)
    }

    /// Hands the init the sandbox part of `spec` and waits until it has
    /// built it, up to the command (blocking): a primed init, which
    /// [`Primed::go`] gives its command.
    pub fn prime(self, spec: &LaunchSpec) -> Result<Primed, LaunchError> {
        let Pending {
            mut process,
            stdio,
            spec: mut w,
            report,
        } = self;
        let ended = |process: &mut Process, e: LaunchError| {
            let _ = process.kill(SERVER_TIMEOUT);
            e
        };
        let sandbox = spec.sandbox_json();
        if let Err(e) = w.write_all(&warden_policy::frame(&sandbox)) {
            return Err(ended(&mut process, LaunchError::Pipe(e)));
        }
        match read_line(&report, Instant::now() + SERVER_TIMEOUT) {
            Ok(Some(LaunchReport::Primed)) => Ok(Primed {
                process,
                stdio,
                spec: w,
                report,
                built: Box::new(spec.clone()),
            }),
            Ok(Some(LaunchReport::Failed { stage, errno, message })) => {
                Err(ended(&mut process, LaunchError::setup(stage, errno, message)))
            }
            Ok(Some(LaunchReport::Enforced(_))) | Ok(None) => {
                let status = process
                    .wait_until(Instant::now() + Duration::from_millis(100))
                    .map_or_else(|| "still running".into(), |s| s.to_string());
                Err(ended(&mut process, LaunchError::NoReport { status }))
            }
            Err(e) => Err(ended(&mut process, e)),
        }
    }
}

/// A worker's init whose sandbox is built up to the command, as the worker's
/// uid under its landlock rules: it waits for the command ([`Primed::go`])
/// or for its spec pipe to close.
#[derive(Debug)]
pub struct Primed {
    pub process: Process,
    stdio: [Option<File>; 3],
    spec: File,
    report: OwnedFd,
    /// The spec it was primed with (only its sandbox part went to the
    /// init).
    built: Box<LaunchSpec>,
}

impl Primed {
    /// The spec the init was primed with.
    pub fn built(&self) -> &LaunchSpec {
        &self.built
    }

    /// Gives the init the command of `spec` and waits until it is exec'd
    /// (blocking). Only where `spec` builds the sandbox the init was primed
    /// with ([`LaunchSpec::same_sandbox`]: what was written to it is then
    /// the sandbox part of `spec` byte for byte); otherwise the init is let
    /// go and this is [`LaunchError::Mismatch`].
    pub fn go(self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        if !spec.same_sandbox(&self.built) {
            self.discard();
            return Err(LaunchError::Mismatch);
        }
        let Primed {
            process,
            stdio,
            spec: mut w,
            report,
            ..
        } = self;
        let wrote = w.write_all(&warden_policy::frame(&spec.command().to_json()));
        drop(w);
        finish(process, stdio, report, wrote, spec)
    }

    /// Lets the init go without a worker: its spec pipe closes (it exits
    /// at once), and SIGKILL in case it was not waiting there. Blocking.
    pub fn discard(self) {
        let Primed { mut process, spec, .. } = self;
        drop(spec);
        let _ = process.kill(SERVER_TIMEOUT);
    }
}

/// Waits for the init's report once its command was written: the worker
/// exec'd, with what it enforces and its descriptors, or why not.
fn finish(
    process: Process,
    [stdin, stdout, stderr]: [Option<File>; 3],
    report: OwnedFd,
    wrote: std::io::Result<()>,
    spec: &LaunchSpec,
) -> Result<Launched, LaunchError> {
    let report = read_report(report);
    let fail = |mut process: Process, e: LaunchError| {
        // Its init ends by itself after a failure; wait for it so that
        // nothing of it is left when the caller cleans up.
        let _ = process.wait_until(Instant::now() + SERVER_TIMEOUT);
        Err(e)
    };
    match (report, wrote) {
        (Err(e), _) => fail(process, e),
        (Ok(_), Err(e)) => {
            let _ = process.signal(Signal::SIGKILL);
            fail(process, LaunchError::Pipe(e))
        }
        (Ok((Some(enforced), fds)), Ok(())) => {
            // The denial pipe, the mount namespace, the listeners.
            let expected = 2 + spec.listeners.len();
            if fds.len() != expected {
                let _ = process.signal(Signal::SIGKILL);
                return fail(
                    process,
                    LaunchError::Descriptors {
                        got: fds.len(),
                        expected,
                    },
                );
            }
            let mut fds = fds.into_iter();
            let denials = fds.next();
            let mount_ns = fds.next();
            let listeners = spec.listeners.iter().map(|l| l.kind).zip(fds).collect();
            Ok(Launched {
                process,
                stdin,
                stdout,
                stderr,
                enforced,
                denials,
                mount_ns,
                listeners,
            })
        }
        (Ok((None, _)), Ok(())) => {
            let mut process = process;
            let status = process
                .wait_until(Instant::now() + SERVER_TIMEOUT)
                .map_or_else(|| "still running".into(), |s| s.to_string());
            let _ = process.signal(Signal::SIGKILL);
            Err(LaunchError::NoReport { status })
        }
    }
}

/// Reads one report record by `deadline` (`None`: EOF first). Only for the
/// record before the command ([`LaunchReport::Primed`] or a failure):
/// nothing follows it on the socket until the init has its command, so
/// nothing of the next records is read here.
fn read_line(fd: &OwnedFd, deadline: Instant) -> Result<Option<LaunchReport>, LaunchError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    const MAX_LINE: usize = 64 << 10;
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return Err(LaunchError::Server(Errno::ETIMEDOUT.into())),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(LaunchError::Server(e.into())),
        }
        let mut buf = [0u8; 1024];
        let n = match nix::unistd::read(fd, &mut buf) {
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Err(LaunchError::Server(e.into())),
        };
        if n == 0 {
            return Ok(None);
        }
        line.extend_from_slice(&buf[..n]);
        if line.last() == Some(&b'\n') {
            return serde_json::from_slice(&line).map(Some).map_err(|_| {
                LaunchError::setup(
                    "report".into(),
                    libc::EPROTO,
                    format!("Unreadable launcher report line {:?}", String::from_utf8_lossy(&line)),
                )
            });
        }
        if line.len() > MAX_LINE {
            return Err(LaunchError::setup(
                "report".into(),
                libc::EPROTO,
                "A launcher report line too long".into(),
            ));
        }
    }
}

/// The launch server, as this process reaches it.
#[derive(Debug)]
pub struct Launcher {
    /// The warden-launch binary, for a server of our own.
    binary: PathBuf,
    /// A server systemd runs (warden-launch.socket) instead.
    socket: Option<PathBuf>,
    conn: Mutex<Option<Connection>>,
}

#[derive(Debug)]
struct Connection {
    sock: OwnedFd,
    /// Our own server, when we started it.
    server: Option<Child>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Our server ends when its socket closes; reap it then.
        if let Some(mut s) = self.server.take() {
            let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            let _ = s.wait();
        }
    }
}

/// How long a launch waits for the server's answer (it answers once the
/// init is created, in well under a millisecond).
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

impl Launcher {
    /// A server of our own, started from `binary` at first use, or the one
    /// listening at `socket`.
    pub fn new(binary: &Path, socket: Option<&Path>) -> Launcher {
        Launcher {
            binary: binary.to_path_buf(),
            socket: socket.map(Path::to_path_buf),
            conn: Mutex::new(None),
        }
    }

    /// Starts or reaches the server now (at the daemon's start, so that a
    /// missing one is said at once).
    pub fn connect(&self) -> Result<(), LaunchError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            *conn = Some(self.open()?);
        }
        Ok(())
    }

    fn open(&self) -> Result<Connection, LaunchError> {
        match &self.socket {
            Some(path) => {
                let err = |e: Errno| LaunchError::Connect {
                    path: path.display().to_string(),
                    source: e.into(),
                };
                let sock =
                    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
                connect(sock.as_raw_fd(), &UnixAddr::new(path).map_err(err)?).map_err(err)?;
                timeouts(&sock).map_err(err)?;
                Ok(Connection { sock, server: None })
            }
            None => self.start_server(),
        }
    }

    /// Starts a server of our own, on a socket pair.
    fn start_server(&self) -> Result<Connection, LaunchError> {
        let err = |source: std::io::Error| LaunchError::Spawn {
            path: self.binary.display().to_string(),
            source,
        };
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| err(e.into()))?;
        timeouts(&ours).map_err(|e| err(e.into()))?;
        let server = {
            let _guard = SPAWN.lock().unwrap_or_else(|p| p.into_inner());
            inheritable(&theirs).map_err(err)?;
            let spawned = Command::new(&self.binary)
                .arg("--serve-fd")
                .arg(theirs.as_raw_fd().to_string())
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn();
            // Our copy of its end closes here, inside the lock.
            drop(theirs);
            spawned.map_err(err)?
        };
        Ok(Connection {
            sock: ours,
            server: Some(server),
        })
    }

    /// Asks the server for a worker running `spec` with the given stdio, in
    /// `cgroup`, and waits until its sandbox is built and its command
    /// exec'd, or setup failed (blocking): [`Launcher::start`], then
    /// [`Pending::run`].
    pub fn launch(
        &self,
        spec: &LaunchSpec,
        cgroup: Option<&WorkerCgroup>,
        stdin: Io,
        stdout: Io,
        stderr: Io,
    ) -> Result<Launched, LaunchError> {
        self.start(cgroup, stdin, stdout, stderr)?.run(spec)
    }

    /// Has the server create a worker's init with the given stdio, on
    /// cgroup v2 in `cgroup` (elsewhere it joins the cgroup its spec names
    /// before anything of the worker runs). The init waits for its spec.
    /// Blocking.
    pub fn start(
        &self,
        cgroup: Option<&WorkerCgroup>,
        stdin: Io,
        stdout: Io,
        stderr: Io,
    ) -> Result<Pending, LaunchError> {
        let (stdin_ours, stdin_theirs) = stream(stdin, 0).map_err(LaunchError::Pipe)?;
        let (stdout_ours, stdout_theirs) = stream(stdout, 1).map_err(LaunchError::Pipe)?;
        let (stderr_ours, stderr_theirs) = stream(stderr, 2).map_err(LaunchError::Pipe)?;
        let (spec_r, spec_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| LaunchError::Pipe(e.into()))?;
        // A socket, not a pipe: the launcher passes descriptors on it.
        let (report_r, report_w) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| LaunchError::Pipe(e.into()))?;
        let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| LaunchError::Pipe(e.into()))?;
        let cgroup_dirs = cgroup
            .map(WorkerCgroup::paths)
            .unwrap_or_default()
            .iter()
            .map(|d| open(d, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()))
            .collect::<Result<Vec<OwnedFd>, _>>()
            .map_err(|e| LaunchError::Pipe(e.into()))?;
        let request = LaunchRequest {
            cgroups: cgroup_dirs.len(),
            into_cgroup: cgroup.is_some_and(|c| c.v2_dir().is_some()),
        };
        let mut fds: Vec<RawFd> = [
            &stdin_theirs,
            &stdout_theirs,
            &stderr_theirs,
            &report_w,
            &status_w,
            &spec_r,
        ]
        .iter()
        .map(|f| f.as_raw_fd())
        .collect();
        fds.extend(cgroup_dirs.iter().map(AsRawFd::as_raw_fd));
        let (pid, pidfd) = self.request(&request, &fds)?;
        // The init holds its ends now; ours close, so that EOF means its.
        drop((
            stdin_theirs,
            stdout_theirs,
            stderr_theirs,
            report_w,
            status_w,
            spec_r,
            cgroup_dirs,
        ));
        let process = Process {
            pid,
            pidfd,
            status: File::from(status_r),
            exited: None,
        };
        Ok(Pending {
            process,
            stdio: [stdin_ours, stdout_ours, stderr_ours],
            spec: File::from(spec_w),
            report: report_r,
        })
    }

    /// One request and its answer; a server that has gone is started or
    /// reached again, once.
    fn request(&self, request: &LaunchRequest, fds: &[RawFd]) -> Result<(u32, OwnedFd), LaunchError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut retried = false;
        loop {
            if conn.is_none() {
                *conn = Some(self.open()?);
            }
            let sock = conn
                .as_ref()
                .map(|c| c.sock.as_fd())
                .ok_or(LaunchError::Server(Errno::ENOTCONN.into()))?;
            match exchange(sock, request, fds) {
                Ok((LaunchReply::Started { pid }, Some(pidfd))) => return Ok((pid, pidfd)),
                Ok((LaunchReply::Started { .. }, None)) => {
                    return Err(LaunchError::Descriptors { got: 0, expected: 1 })
                }
                Ok((LaunchReply::Failed { stage, errno, message }, _)) => {
                    return Err(LaunchError::setup(stage, errno, message))
                }
                Err(e) if !retried && gone(&e) => {
                    tracing::warn!(error = %e, "the launch server has gone; starting or reaching it again");
                    *conn = None;
                    retried = true;
                }
                Err(e) => {
                    *conn = None;
                    return Err(LaunchError::Server(e.into()));
                }
            }
        }
    }
}

/// Serializes the window in which a child's descriptors are inheritable,
/// so that two concurrent starts never leak each other's.
static SPAWN: Mutex<()> = Mutex::new(());

fn inheritable(fd: &OwnedFd) -> std::io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// A server that hangs must not hang the daemon's launches forever.
fn timeouts(sock: &OwnedFd) -> nix::Result<()> {
    let t = nix::sys::time::TimeVal::new(SERVER_TIMEOUT.as_secs().try_into().unwrap_or(30), 0);
    setsockopt(sock, sockopt::ReceiveTimeout, &t)?;
    setsockopt(sock, sockopt::SendTimeout, &t)
}

/// Errors that mean the server is not there any more.
fn gone(e: &Errno) -> bool {
    matches!(
        e,
        Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::ECONNREFUSED | Errno::ENOENT
    )
}

/// Sends one request with `fds` and reads the answer.
fn exchange(
    sock: BorrowedFd<'_>,
    request: &LaunchRequest,
    fds: &[RawFd],
) -> Result<(LaunchReply, Option<OwnedFd>), Errno> {
    let bytes = request.to_bytes();
    let iov = [std::io::IoSlice::new(&bytes)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = loop {
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut pidfd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                let fd = crate::sys::adopt_received_fd(fd);
                pidfd.get_or_insert(fd);
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        // EOF: the server ended.
        return Err(Errno::ECONNRESET);
    }
    let reply = serde_json::from_slice::<LaunchReply>(&buf[..n]).map_err(|_| Errno::EPROTO)?;
    Ok((reply, pidfd))
}

/// Our end (for a pipe) and the worker's end of its stream `fd` (0, 1, 2).
fn stream(io: Io, fd: RawFd) -> std::io::Result<(Option<File>, OwnedFd)> {
    let out = fd != 0;
    Ok(match io {
        Io::Null => {
            let flags = if out { OFlag::O_WRONLY } else { OFlag::O_RDONLY };
            (None, open("/dev/null", flags | OFlag::O_CLOEXEC, Mode::empty())?)
        }
        Io::Inherit => {
            let own = match fd {
                0 => std::io::stdin().as_fd().try_clone_to_owned()?,
                1 => std::io::stdout().as_fd().try_clone_to_owned()?,
                _ => std::io::stderr().as_fd().try_clone_to_owned()?,
            };
            (None, own)
        }
        Io::Fd(fd) => (None, fd),
        Io::Pipe => {
            let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
            if out {
                (Some(File::from(r)), w)
            } else {
                (Some(File::from(w)), r)
            }
        }
    })
}

/// Reads report records until EOF, with the fds passed alongside (the
/// denial pipe, the mount namespace, then the network listeners). A failure record wins
/// over an earlier "enforced" record (exec can fail after the sandbox is
/// built).
fn read_report(fd: OwnedFd) -> Result<(Option<Enforced>, Vec<OwnedFd>), LaunchError> {
    let mut bytes = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
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
            Ok(LaunchReport::Primed) => {}
            Ok(LaunchReport::Failed { stage, errno, message }) => {
                return Err(LaunchError::setup(stage, errno, message))
            }
            Err(_) => {
                return Err(LaunchError::setup(
                    "report".into(),
                    libc::EPROTO,
                    format!("Unreadable launcher report line {line:?}"),
                ))
            }
        }
    }
    Ok((enforced, fds))
}

/// A worker's init as the daemon holds it: its pidfd (which becomes
/// readable when it ends, and signals it without a pid that could have
/// been reused) and its status pipe, where it writes its exit code before
/// it ends.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    pidfd: OwnedFd,
    status: File,
    exited: Option<ExitStatus>,
}

impl Process {
    /// Its pid as the host sees it.
    pub fn id(&self) -> u32 {
        self.pid
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sends `sig` to the init (it forwards the usual ones to the worker).
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        crate::sys::pidfd_send_signal(self.pidfd.as_fd(), sig)
    }

    /// Sends it SIGKILL and waits up to `timeout` for it to end.
    pub fn kill(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = self.signal(Signal::SIGKILL);
        self.wait_until(Instant::now() + timeout)
    }

    /// Its status, if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.wait_until(Instant::now())
    }

    /// Waits until it ends or `deadline` passes (None: still running).
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            if self.exited.is_some() {
                return self.exited;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(n) if n > 0 => return Some(self.ended()),
                Ok(_) if left.is_zero() => return None,
                _ => {}
            }
        }
    }

    /// Waits until it ends.
    pub fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(s) = self.wait_until(Instant::now() + Duration::from_secs(3600)) {
                return s;
            }
        }
    }

    /// Its status once it has ended: the code it wrote, or, if it wrote
    /// none, SIGKILL (nothing else can end it without its writing one).
    pub fn ended(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let mut byte = [0u8; 1];
        // Every writer is gone once it has ended (the init is the last
        // process of its PID namespace): this read does not block.
        let status = match self.status.read(&mut byte) {
            Ok(1) => ExitStatus::from_raw(i32::from(byte[0]) << 8),
            _ => ExitStatus::from_raw(libc::SIGKILL),
        };
        self.exited = Some(status);
        status
    }
}
