//! warden-launch: applies one worker's sandbox and runs it.
//!
//! wardend starts this binary with a cleared environment, the worker's stdio
//! on fds 0/1/2, the LaunchSpec (JSON) on `--spec-fd` and a close-on-exec
//! report pipe on `--report-fd`. It is small, synchronous and single-threaded
//! on purpose: no async runtime, no logging framework, nothing between the
//! privileged setup and the reader.
//!
//! Three processes:
//! - the outer launcher (this process, in the host PID namespace): joins the
//!   worker's cgroup, creates the namespaces, forks the init and then only
//!   forwards signals to it and exits with its status;
//! - the init (PID 1 of the new PID namespace, in the worker's cgroup, as
//!   the worker's uid, under its landlock rules): builds the sandbox in
//!   [`sandbox::setup`], forks the worker, answers the worker's denied
//!   system calls ([`denials`]), reaps zombies, forwards signals and exits
//!   with the worker's status (128+signal when it was killed);
//! - the worker, the init's child: installs the seccomp filter on itself,
//!   hands its listener to the init, and execs.
//!
//! Any setup failure is written to the report pipe as a typed record (stage,
//! errno, message) and the worker never runs. EOF on the pipe without a
//! failure record means the worker was exec'd.

#![deny(unsafe_code)]

mod denials;
mod sandbox;
#[allow(unsafe_code)]
mod sys;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};
use warden_policy::{LaunchReport, LaunchSpec, SPEC_VERSION};

use sandbox::{SetupError, Stage};

/// Exit status when the sandbox could not be built (the worker never ran).
pub const EXIT_SETUP_FAILED: i32 = 125;

/// Signals the launcher and the init pass on to the worker.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn usage() -> ! {
    eprintln!("usage: warden-launch --spec-fd N --report-fd N\n(started by wardend; not meant to be run by hand)");
    std::process::exit(64);
}

fn parse_fd(v: Option<String>) -> RawFd {
    match v.and_then(|s| s.parse::<RawFd>().ok()) {
        Some(fd) if fd > 2 => fd,
        _ => usage(),
    }
}

/// Writes a failure record (best effort: a vanished daemon cannot be told)
/// and exits with `code`. The one place a setup failure is reported, by
/// the outer launcher, the init and the worker's failed exec alike.
pub fn fail(report: &mut File, e: &SetupError, code: i32) -> ! {
    let rec = LaunchReport::Failed {
        stage: e.stage.name().to_string(),
        errno: e.errno as i32,
        message: e.message.clone(),
    };
    let _ = report.write_all(&rec.to_line());
    std::process::exit(code);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut spec_fd, mut report_fd) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--spec-fd" => spec_fd = Some(parse_fd(args.next())),
            "--report-fd" => report_fd = Some(parse_fd(args.next())),
            _ => usage(),
        }
    }
    let (Some(spec_fd), Some(report_fd)) = (spec_fd, report_fd) else {
        usage()
    };
    if spec_fd == report_fd {
        usage();
    }
    // wardend runs with UMask=0077 (its own files are private): under it the
    // mountpoints made here (/workspace, /home) would be 0700 root and the
    // worker could not reach its own directories. A worker starts with the
    // umask of a login, 022.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // SAFETY: wardend passes this descriptor to us and nothing else in this
    // process uses it; it is closed when the File drops.
    #[allow(unsafe_code)]
    let mut spec_file = unsafe { File::from_raw_fd(spec_fd) };
    let mut bytes = Vec::new();
    let read = spec_file.read_to_end(&mut bytes);
    drop(spec_file);

    // The report pipe lives on fd 3 from here on, close-on-exec, so that one
    // close_range() call can drop everything else we inherited.
    let mut report = match sys::adopt_fd_as(report_fd, 3) {
        Ok(f) => f,
        Err(_) => std::process::exit(EXIT_SETUP_FAILED),
    };
    if let Err(e) = read {
        fail(
            &mut report,
            &SetupError::io(Stage::Spec, &e, "Cannot read the launch spec"),
            EXIT_SETUP_FAILED,
        );
    }
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

    match outer(&spec) {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(&mut report, &e, EXIT_SETUP_FAILED),
    }
}

/// The end of a setup stage, now (the daemon reads it on the same clock).
pub fn mark(stage: Stage) -> warden_policy::Mark {
    let ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
    });
    warden_policy::Mark {
        stage: stage.name().to_string(),
        at_ns: ns,
    }
}

/// The outer launcher: everything before the PID namespace exists, then a
/// signal-forwarding wait for the init.
fn outer(spec: &LaunchSpec) -> Result<i32, SetupError> {
    let mut marks = vec![mark(Stage::Spec)];
    // Nothing the daemon (or whoever started us) had open may reach the
    // worker: keep 0, 1, 2 and the report pipe on 3.
    sys::close_from(4).map_err(|e| SetupError::new(Stage::Fds, e, "Cannot close inherited file descriptors"))?;

    // Join the worker's cgroups before anything else is forked, so that every
    // process of the worker is accounted and limited from its first instruction.
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, getpid().to_string())
            .map_err(|e| SetupError::io(Stage::Cgroup, &e, format!("Cannot join cgroup {}", procs.display())))?;
    }
    marks.push(mark(Stage::Cgroup));

    // Every worker gets its own network namespace: no worker ever shares
    // the host's.
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWNET;
    unshare(flags).map_err(|e| SetupError::new(Stage::Namespaces, e, format!("Cannot create namespaces {flags:?}")))?;
    marks.push(mark(Stage::Namespaces));

    // Signals are handled synchronously: block them before the fork so that
    // none is lost between fork and the wait loop (the init inherits the mask).
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervised_signals()), None)
        .map_err(|e| SetupError::new(Stage::Namespaces, e, "Cannot block signals"))?;

    // SAFETY: this process is single-threaded, so the child may do anything.
    #[allow(unsafe_code)]
    let fork_result = unsafe { fork() };
    match fork_result.map_err(|e| SetupError::new(Stage::Namespaces, e, "Cannot fork the worker's init"))? {
        ForkResult::Child => {
            // SAFETY: fd 3 is the report pipe, owned by this process alone now.
            #[allow(unsafe_code)]
            let report = unsafe { File::from_raw_fd(3) };
            sandbox::init(spec, report, marks)
        }
        ForkResult::Parent { child } => {
            // Only the init and the worker write reports from here on.
            let _ = nix::unistd::close(3);
            Ok(supervise(child, None, None))
        }
    }
}

/// The signals the launcher and the init wait for: those they forward, and
/// SIGCHLD. Blocked, and taken synchronously with sigtimedwait.
fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The wait loop of the outer launcher and of the init alike: forwards
/// signals to `child`, reaps every zombie, answers the worker's denied
/// calls (the init), and, with a `timeout`, sends SIGTERM when it passes
/// and SIGKILL to everything the caller may signal (the init: its whole
/// PID namespace) ten seconds later. Returns the child's status as an exit
/// code (128+signal when it was killed).
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
