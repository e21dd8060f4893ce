//! Sandbox denials: seccomp user notifications answered with EPERM and
//! reported, rate-limited per worker.
//!
//! Owns: the loop that reads a worker's seccomp listener, answers every
//! denied call with EPERM (so the worker sees exactly what a plain filter
//! would give it) and reports the call's name and pid.
//!
//! Must never: let a denied call through (the only answer sent is an error),
//! or let a worker looping on a denied call flood the audit log (after a
//! burst, denials are counted and reported as `suppressed`).

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::time::Instant;

use warden_policy::seccomp::Arch;

use crate::limits::Bucket;
use crate::sys::{notif_fail, notif_recv};

/// One reported denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub syscall: String,
    pub pid: u32,
    /// Denials of this worker not reported since the previous report.
    pub suppressed: u64,
}

fn arch_of(audit_arch: u32) -> Option<Arch> {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;
    match audit_arch {
        AUDIT_ARCH_X86_64 => Some(Arch::X86_64),
        AUDIT_ARCH_AARCH64 => Some(Arch::Aarch64),
        _ => None,
    }
}

/// Serves one worker's listener until the worker is gone (blocking: run it
/// on its own thread). `report` gets each admitted denial; a final call with
/// `syscall` "(suppressed)" flushes a pending count.
pub fn serve(listener: OwnedFd, mut limit: Bucket, mut report: impl FnMut(Denial)) {
    let mut last_pid = 0;
    loop {
        // POLLHUP: the filter has no task left (the worker is gone).
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::POLLHUP);
        if !revents.contains(PollFlags::POLLIN) {
            break;
        }
        let n = match notif_recv(&listener) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            // ENOENT: the notifying process died before we read it; others may follow.
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(_) => break, // the filter is gone: every process of the worker exited
        };
        // Answer first: the worker is blocked until we do.
        let _ = notif_fail(&listener, n.id, libc::EPERM);
        last_pid = n.pid;
        if let Some(suppressed) = limit.admit(Instant::now()) {
            let syscall = arch_of(n.arch)
                .and_then(|a| a.name_of(i64::from(n.nr)))
                .map_or_else(|| format!("syscall_{}", n.nr), str::to_string);
            report(Denial {
                syscall,
                pid: n.pid,
                suppressed,
            });
        }
    }
    if limit.pending() > 0 {
        report(Denial {
            syscall: "(suppressed)".into(),
            pid: last_pid,
            suppressed: limit.pending(),
        });
    }
}
