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

use crate::sys::{notif_fail, notif_recv};

/// One reported denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub syscall: String,
    pub pid: u32,
    /// Denials of this worker not reported since the previous report.
    pub suppressed: u64,
}

/// Per-worker token bucket: `burst` reports, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(burst: u32, per_second: u32) -> Self {
        RateLimit {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether to report now; when it says yes, returns how many were
    /// suppressed since the last report.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    pub fn pending(&self) -> u64 {
        self.suppressed
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

/// Serves one worker's listener until the worker is gone (blocking: run it
/// on its own thread). `report` gets each admitted denial; a final call with
/// `syscall` "(suppressed)" flushes a pending count.
pub fn serve(listener: OwnedFd, mut limit: RateLimit, mut report: impl FnMut(Denial)) {
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

/// Default limits: a burst of 50 reports, then 10 a second.
pub fn default_limit() -> RateLimit {
    RateLimit::new(50, 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_storm_is_cut_to_the_burst_then_the_refill_and_counted() {
        let mut l = RateLimit::new(3, 10);
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..6).map(|_| l.admit(t0)).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None, None]);
        // 100 ms later one token is back, and it reports the 3 suppressed.
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), Some(3));
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), None);
        assert_eq!(l.pending(), 1);
    }
}
