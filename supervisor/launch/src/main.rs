//! warden-launch: the launch server. It builds each worker's sandbox and
//! runs the worker in it.
//!
//! It is small, synchronous and single-threaded on purpose: no async
//! runtime, no logging framework, nothing between the privileged setup and
//! the reader. wardend starts it (`--serve-fd N`: a connected socket; the
//! server ends when wardend closes it), or systemd does (`--serve`: socket
//! activation of `warden-launch.socket`, so that workers do not inherit
//! wardend.service's own seccomp filters). For each request (a
//! [`warden_policy::LaunchRequest`] with the worker's descriptors) the
//! server creates the worker's init with one `clone3` in new mount, PID,
//! IPC, UTS and network namespaces (on cgroup v2 straight into the
//! worker's cgroup), answers with the init's pid and pidfd, and waits for
//! the next request; it reaps its children and keeps nothing else. A fork
//! of this small process costs a fraction of a fork and exec of a new
//! launcher by the daemon ([`server`]).
//!
//! Two processes per worker:
//! - the init (PID 1 of the new PID namespace, in the worker's cgroup, as
//!   the worker's uid, under its landlock rules): joins the cgroup (v1) and
//!   a cgroup namespace of its own, builds what every sandbox has
//!   ([`sandbox::prepare_root`]), waits for its spec (a warm init, made
//!   ahead of its spawn, waits there), builds the rest in
//!   [`sandbox::setup`] from the spec's first frame, the sandbox, up to
//!   landlock, then waits for the second, the command (a primed init waits
//!   there, as the worker's uid), forks the worker, answers the worker's denied
//!   system calls ([`denials`]), reaps zombies, forwards signals and exits
//!   with the worker's status (128+signal when it was killed), which it
//!   first writes on the status pipe: wardend is not its parent;
//! - the worker, the init's child: installs the seccomp filter on itself,
//!   hands its listener to the init, and execs.
//!
//! Any setup failure is written to the report socket as a typed record
//! (stage, errno, message) and the worker never runs. EOF on the socket
//! without a failure record means the worker was exec'd.

#![deny(unsafe_code)]

mod denials;
mod sandbox;
mod server;
#[allow(unsafe_code)]
mod sys;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::AsFd;
use std::time::Instant;
use warden_policy::{LaunchCommand, LaunchReport, LaunchSpec, Mark, MAX_FRAME, SPEC_VERSION};

use sandbox::{SetupError, Stage};

/// Exit status when the sandbox could not be built (the worker never ran).
pub const EXIT_SETUP_FAILED: i32 = 125;

/// The init's descriptors, as the server places them (0, 1 and 2 are the
/// worker's stdio): the report socket, the status pipe, the spec pipe.
pub const REPORT_FD: RawFd = 3;
pub const STATUS_FD: RawFd = 4;
pub const SPEC_FD: RawFd = 5;

/// Signals the init passes on to the worker.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn usage() -> ! {
    eprintln!(
        "usage: warden-launch --serve-fd N | --serve\n\
         (the launch server: started by wardend, or by systemd's warden-launch.socket; not meant to be run by hand)"
    );
    std::process::exit(64);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--serve-fd", n] => match n.parse::<RawFd>() {
            Ok(fd) if fd > 2 => server::Source::Connected(sys::adopt_fd(fd)),
            _ => usage(),
        },
        ["--serve"] => match sys::activated_socket() {
            Some(fd) => server::Source::Listening(fd),
            None => {
                eprintln!("warden-launch: --serve expects the listening socket from systemd (LISTEN_FDS)");
                std::process::exit(64);
            }
        },
        _ => usage(),
    };
    // wardend runs with UMask=0077 (its own files are private): under it the
    // mountpoints made here (/workspace, /home) would be 0700 root and the
    // worker could not reach its own directories. A worker starts with the
    // umask of a login, 022.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    server::serve(source)
}

/// Writes a failure record (best effort: a vanished daemon cannot be told)
/// and exits with `code`. The one place a setup failure is reported, by
/// the init and the worker's failed exec alike.
pub fn fail(report: &mut File, e: &SetupError, code: i32) -> ! {
    let rec = LaunchReport::Failed {
        stage: e.stage.name().to_string(),
        errno: e.errno as i32,
        message: e.message.clone(),
    };
    let _ = report.write_all(&rec.to_line());
    std::process::exit(code);
}

/// Ends the init with `code`, written on the status pipe first: the
/// daemon learns the worker's status there, as it is not the init's parent.
/// (An init killed by a signal writes nothing: the daemon reads that as
/// SIGKILL, the only signal that ends it.)
pub fn exit_with_status(code: i32) -> ! {
    // SAFETY: STATUS_FD is the status pipe the server placed there, owned by
    // this process alone; the File closes it as the process ends anyway.
    #[allow(unsafe_code)]
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let _ = status.write_all(&[u8::try_from(code & 0xff).unwrap_or(u8::MAX)]);
    std::process::exit(code);
}

/// The end of a setup stage, now (the daemon reads it on the same clock).
pub fn mark(stage: Stage) -> Mark {
    let ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
    });
    Mark {
        stage: stage.name().to_string(),
        at_ns: ns,
    }
}

/// The worker's init, in the server's child: PID 1 of the worker's new
/// namespaces, in the worker's cgroup, with its descriptors in place (0-2
/// stdio, [`REPORT_FD`], [`STATUS_FD`], [`SPEC_FD`]) and nothing else open.
/// It builds what every sandbox has, then waits for its spec (a warm init
/// waits there until a spawn takes it) and builds the rest. Never returns.
pub fn init(mut marks: Vec<Mark>) -> ! {
    // SAFETY: the server placed the report socket on REPORT_FD for this
    // process alone.
    #[allow(unsafe_code)]
    let mut report = unsafe { File::from_raw_fd(REPORT_FD) };
    let root = match enter(&mut marks).and_then(|()| sandbox::prepare_root(&mut marks)) {
        Ok(root) => root,
        Err(e) => fail(&mut report, &e, EXIT_SETUP_FAILED),
    };
    // SAFETY: the server placed the spec pipe on SPEC_FD for this process
    // alone; closed when the File drops.
    #[allow(unsafe_code)]
    let mut spec_file = unsafe { File::from_raw_fd(SPEC_FD) };
    let bytes = match read_frame(&mut spec_file) {
        Ok(Some(bytes)) => bytes,
        // The daemon let this warm init go without a spawn.
        Ok(None) => std::process::exit(EXIT_SETUP_FAILED),
        Err(e) => fail(
            &mut report,
            &SetupError::io(Stage::Spec, &e, "Cannot read the launch spec"),
            EXIT_SETUP_FAILED,
        ),
    };
    let spec = match LaunchSpec::from_json(&bytes) {
        Ok(s) if s.version == SPEC_VERSION => s,
        Ok(s) => fail(
            &mut report,
            &SetupError::new(
                Stage::Spec,
                Errno::EINVAL,
                format!("Launch spec version {} is not {SPEC_VERSION}", s.version),
            ),
            EXIT_SETUP_FAILED,
        ),
        Err(e) => fail(
            &mut report,
            &SetupError::new(Stage::Spec, Errno::EINVAL, format!("Cannot parse the launch spec: {e}")),
            EXIT_SETUP_FAILED,
        ),
    };
    marks.push(mark(Stage::Spec));
    sandbox::init(spec, report, marks, root, spec_file)
}

/// Reads one frame of the spec pipe ([`warden_policy::frame`]); `None` at
/// its end before the frame.
fn read_frame(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match file.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
    if n > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes, more than {MAX_FRAME}"),
        ));
    }
    let mut bytes = vec![0; n];
    file.read_exact(&mut bytes)?;
    Ok(Some(bytes))
}

/// Waits for the worker's command, the second frame of the spec pipe;
/// `None` when the daemon closed the pipe instead (it let a primed init
/// go).
pub fn read_command(file: &mut File) -> Result<Option<LaunchCommand>, SetupError> {
    let bytes = match read_frame(file) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(SetupError::io(Stage::Command, &e, "Cannot read the command")),
    };
    LaunchCommand::from_json(&bytes)
        .map(Some)
        .map_err(|e| SetupError::new(Stage::Command, Errno::EINVAL, format!("Cannot parse the command: {e}")))
}

/// The init's first steps, in its cgroup: a cgroup namespace rooted there,
/// and signals blocked for its wait loop.
fn enter(marks: &mut Vec<Mark>) -> Result<(), SetupError> {
    // The cgroup namespace is made here, not by the server's clone: its
    // root is the cgroup its creator is in, and that must be the worker's.
    unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| SetupError::new(Stage::Namespaces, e, "Cannot create the cgroup namespace"))?;
    // Signals are handled synchronously: blocked before the worker is
    // forked, so that none is lost between fork and the wait loop.
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervised_signals()), None)
        .map_err(|e| SetupError::new(Stage::Namespaces, e, "Cannot block signals"))?;
    marks.push(mark(Stage::Namespaces));
    Ok(())
}

/// The signals the init waits for: those it forwards, and SIGCHLD.
/// Blocked, and taken synchronously from a signalfd.
fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The init's wait loop: forwards signals to `child`, reaps every zombie,
/// answers the worker's denied calls, and, with a `timeout`, sends SIGTERM
/// when it passes and SIGKILL to its whole PID namespace ten seconds
/// later. Returns the child's status as an exit code (128+signal when it
/// was killed).
pub fn supervise(child: Pid, timeout: Option<Duration>, mut denials: Option<denials::Denials>) -> i32 {
    let set = supervised_signals();
    let Ok(signals) = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) else {
        // Without a signalfd nothing can be waited for: end the worker.
        let _ = kill(child, Signal::SIGKILL);
        return EXIT_SETUP_FAILED;
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut killing_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = killing_at.or(deadline).map(|t| t.saturating_duration_since(now));
        let poll_timeout = wake.map_or(PollTimeout::NONE, |w| {
            PollTimeout::try_from(w.as_millis().min(60_000)).unwrap_or(PollTimeout::MAX)
        });
        let (signalled, denied, gone) = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if let Some(d) = &denials {
                fds.push(PollFd::new(d.fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, poll_timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            let ready = |i: usize, f: PollFlags| fds.get(i).and_then(PollFd::revents).is_some_and(|r| r.intersects(f));
            (
                ready(0, PollFlags::POLLIN),
                ready(1, PollFlags::POLLIN),
                ready(1, PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL),
            )
        };
        if denied && denials.as_mut().is_some_and(|d| !d.answer()) || gone {
            // Every process under the filter has exited.
            if let Some(d) = denials.take() {
                d.finish();
            }
        }
        if signalled {
            while let Ok(Some(info)) = signals.read_signal() {
                let sig = i32::try_from(info.ssi_signo).unwrap_or(0);
                if sig == libc::SIGCHLD {
                    if let Some(code) = reap(child) {
                        if let Some(d) = denials.take() {
                            d.finish();
                        }
                        return code;
                    }
                } else if let Ok(s) = Signal::try_from(sig) {
                    let _ = kill(child, s);
                }
            }
        }
        let now = Instant::now();
        if killing_at.is_some_and(|k| now >= k) {
            // Grace is over: kill everything in the namespace but us.
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            killing_at = None;
        } else if deadline.is_some_and(|d| now >= d) && killing_at.is_none() {
            let _ = kill(child, Signal::SIGTERM);
            killing_at = Some(now + Duration::from_secs(10));
        }
    }
}

/// Reaps every exited child; returns the exit code if `main` was among them.
fn reap(main: Pid) -> Option<i32> {
    let mut result = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => result = Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => result = Some(128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return result,
            Ok(_) => {}
        }
    }
}
