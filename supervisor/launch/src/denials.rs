//! The worker's denied system calls, answered by its init.
//!
//! The seccomp filter sends every call it denies to a user-notification
//! listener; the worker's process that installed the filter handed that
//! listener to the init. The init answers each with EPERM (so the worker
//! sees what a plain filter would give it) and reports it on a pipe to the
//! daemon, rate-limited. The init lives in the worker's cgroup: a worker
//! looping on denied calls spends its own CPU quota on them, not the
//! daemon's.
//!
//! Must never: let a denied call through (the only answer sent is an
//! error), block on the daemon (the pipe is non-blocking; what does not
//! fit is counted as suppressed), or report faster than the spec's rate.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use warden_policy::seccomp::Arch;
use warden_policy::{Bucket, DenialReport};

use crate::sys::{notif_fail, notif_recv};

/// The init's side of the worker's denials.
#[derive(Debug)]
pub struct Denials {
    listener: OwnedFd,
    reports: File,
    limit: Bucket,
    /// Denials not reported yet (rate-limited, or the pipe was full).
    pending: u64,
    last_pid: u32,
}

impl Denials {
    /// `reports` must be non-blocking.
    pub fn new(listener: OwnedFd, reports: File, limit: Bucket) -> Self {
        Denials {
            listener,
            reports,
            limit,
            pending: 0,
            last_pid: 0,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Answers the pending notification with EPERM and reports it if the
    /// rate allows. False when the listener is gone (every process of the
    /// worker has exited).
    pub fn answer(&mut self) -> bool {
        let n = match notif_recv(&self.listener) {
            Ok(n) => n,
            // The caller died before we read it, or a signal: go on.
            Err(Errno::ENOENT | Errno::EINTR) => return true,
            Err(_) => return false,
        };
        // Answer first: the worker waits until we do.
        let _ = notif_fail(&self.listener, n.id, libc::EPERM);
        self.last_pid = n.pid;
        self.pending += 1;
        if self.limit.take(1.0, Instant::now()) {
            let syscall = arch_of(n.arch)
                .and_then(|a| a.name_of(i64::from(n.nr)))
                .map_or_else(|| format!("syscall_{}", n.nr), str::to_string);
            self.report(syscall, n.pid, self.pending - 1);
        }
        true
    }

    /// Writes one report (with `suppressed` before it); a full pipe keeps
    /// them all pending.
    fn report(&mut self, syscall: String, pid: u32, suppressed: u64) {
        let line = DenialReport {
            syscall,
            pid,
            suppressed,
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        // One short write on a pipe is atomic: all of it or nothing.
        if self.reports.write(&bytes).is_ok_and(|n| n == bytes.len()) {
            self.pending = 0;
        }
    }

    /// Reports what is still pending (the worker is done).
    pub fn finish(mut self) {
        if self.pending > 0 {
            let (pid, pending) = (self.last_pid, self.pending);
            self.report("(suppressed)".into(), pid, pending);
        }
    }
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
