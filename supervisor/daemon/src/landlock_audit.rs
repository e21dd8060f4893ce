//! Landlock denials from the kernel audit stream.
//!
//! Landlock (ABI 7) records every denial of a domain created with
//! `LOG_NEW_EXEC_ON` (warden-launch sets it) as an `AUDIT_LANDLOCK_ACCESS`
//! record, followed by the `SYSCALL` record of the process that was denied.
//! When its config says so, wardend turns kernel audit on and reads the
//! read-only multicast group of the audit netlink socket (so several
//! daemons, and auditd, can read at once), maps each denied pid to its
//! worker through `/proc/<pid>/cgroup`, and reports path and access.
//!
//! Must never: report a denial for a process it cannot place in one of its
//! own workers.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use crate::events::{EventKind, Events};
use crate::limits::Keyed;

/// Which of the daemon's workers a denial belongs to.
pub trait Placement {
    /// The worker whose init has host pid `pid`, as (id, user).
    fn by_init(&self, pid: u32) -> Option<(String, String)>;
    /// The user of worker `id`, if it is one of the daemon's.
    fn user_of(&self, id: &str) -> Option<String>;
}

const AUDIT_SET: u16 = 1001;
const AUDIT_SYSCALL: u16 = 1300;
const AUDIT_EOE: u16 = 1320;
const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
const AUDIT_STATUS_ENABLED: u32 = 1;
const AUDIT_STATUS_BACKLOG_LIMIT: u32 = 0x10;
const AUDIT_BACKLOG: u32 = 8192;
/// The read-only log multicast group (AUDIT_NLGRP_READLOG).
const AUDIT_NLGRP_READLOG: u32 = 1;

/// Turns kernel audit on and subscribes to its read-only log group.
pub fn open() -> nix::Result<OwnedFd> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkAudit,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 1 << (AUDIT_NLGRP_READLOG - 1)))?;
    // struct audit_status { mask, enabled, failure, pid, rate_limit, backlog_limit, lost, backlog, ... }
    const STATUS_LEN: u32 = 44;
    const HEADER_LEN: u32 = 16;
    let mut status = [0u8; STATUS_LEN as usize];
    status[0..4].copy_from_slice(&(AUDIT_STATUS_ENABLED | AUDIT_STATUS_BACKLOG_LIMIT).to_ne_bytes());
    status[4..8].copy_from_slice(&1u32.to_ne_bytes());
    // The default backlog of 64 records drops denials of busy workers.
    status[20..24].copy_from_slice(&AUDIT_BACKLOG.to_ne_bytes());
    let mut msg = Vec::with_capacity((HEADER_LEN + STATUS_LEN) as usize);
    msg.extend_from_slice(&(HEADER_LEN + STATUS_LEN).to_ne_bytes());
    msg.extend_from_slice(&AUDIT_SET.to_ne_bytes());
    msg.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&status);
    sendto(sock.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    // Wake up regularly even when nothing arrives, to flush events whose
    // end-of-event record never comes.
    let timeout = nix::sys::time::TimeVal::new(0, 250_000);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    Ok(sock)
}

/// `key=value` of an audit record (values may be quoted).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = text.find(&pat)? + pat.len();
    let rest = &text[start..];
    if let Some(q) = rest.strip_prefix('"') {
        q.split('"').next()
    } else {
        rest.split_whitespace().next()
    }
}

/// The serial number of `audit(TIME:SERIAL): ...`.
fn serial(text: &str) -> Option<&str> {
    text.split(':').nth(1)?.split(')').next()
}

#[derive(Default)]
struct Pending {
    since: Option<std::time::Instant>,
    access: Vec<(String, String)>, // (blockers, object)
    pid: Option<String>,
    domain: Option<String>,
}

/// One landlock denial from the audit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockDenial {
    /// Host pid of the denied process (from the SYSCALL record).
    pub pid: Option<String>,
    pub domain: Option<String>,
    /// Landlock's "blockers", e.g. `fs.read_dir`, `net.connect_tcp`.
    pub access: String,
    /// The path, or "port N".
    pub object: String,
}

/// Reads the audit stream until `stop` says so (checked between records and
/// on receive timeouts). `on_domain(domain, creator_pid)` sees each landlock
/// domain's creation; `on_denial` each denial.
pub fn read(
    sock: &OwnedFd,
    stop: impl Fn() -> bool,
    mut on_domain: impl FnMut(&str, &str),
    mut on_denial: impl FnMut(LandlockDenial),
) {
    let mut buf = vec![0u8; 1 << 16];
    // Records of concurrent events interleave: collect them per serial
    // number until the event's EOE record.
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let flush = |p: &mut Pending, on_denial: &mut dyn FnMut(LandlockDenial)| {
        let done = std::mem::take(p);
        for (access, object) in done.access {
            on_denial(LandlockDenial {
                pid: done.pid.clone(),
                domain: done.domain.clone(),
                access,
                object,
            });
        }
    };
    while !stop() {
        // A record outside a syscall's audit context has no EOE record:
        // flush what has waited long enough.
        let stale: Vec<String> = pending
            .iter()
            .filter(|(_, p)| {
                p.since
                    .is_some_and(|t| t.elapsed() > std::time::Duration::from_millis(500))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(mut p) = pending.remove(&k) {
                flush(&mut p, &mut on_denial);
            }
        }
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOBUFS | nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                tracing::error!(error = %e, "the audit stream failed; landlock denials are no longer reported");
                return;
            }
        };
        // One record per datagram. The kernel's audit records put the
        // payload length (not the whole message's) in nlmsg_len, so the
        // datagram size is what counts.
        if n < 16 {
            continue;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let text = String::from_utf8_lossy(&buf[16..n]).trim_end_matches('\0').to_string();
        let this_serial = serial(&text).unwrap_or_default().to_string();
        if pending.len() > 1024 {
            // EOE records were lost: flush what is there rather than grow.
            for (_, mut p) in pending.drain() {
                flush(&mut p, &mut on_denial);
            }
        }
        let current = pending.entry(this_serial.clone()).or_default();
        current.since.get_or_insert_with(std::time::Instant::now);
        match kind {
            AUDIT_LANDLOCK_ACCESS => {
                let blockers = field(&text, "blockers").unwrap_or("").to_string();
                let object = field(&text, "path")
                    .map(str::to_string)
                    .or_else(|| field(&text, "dest").map(|p| format!("port {p}")))
                    .unwrap_or_default();
                current.domain = field(&text, "domain").map(str::to_string);
                current.access.push((blockers, object));
            }
            AUDIT_LANDLOCK_DOMAIN => {
                if let (Some(d), Some(pid)) = (field(&text, "domain"), field(&text, "pid")) {
                    on_domain(d, pid);
                }
            }
            AUDIT_SYSCALL => current.pid = field(&text, "pid").map(str::to_string),
            AUDIT_EOE => {
                if let Some(mut p) = pending.remove(&this_serial) {
                    flush(&mut p, &mut on_denial);
                }
            }
            _ => {}
        }
    }
}

/// The worker id of a host pid: the component of its cgroup path that
/// `known` accepts.
pub fn worker_of_pid(pid: &str, known: impl Fn(&str) -> bool) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|id| known(id))
        .map(str::to_string)
}

/// Domains remembered (by their creator) at most.
const MAX_DOMAINS: usize = 4096;
/// Denials waiting for their worker to be registered, at most.
const MAX_DEFERRED: usize = 1024;

/// Reports the daemon's workers' landlock denials forever (own thread).
/// A denial is placed by its domain's creator, the worker's init (known
/// from the spawn, so it works after the worker is gone), or else by the
/// denied process's cgroup. A record read before the spawn registered its
/// worker is retried for a few seconds.
pub fn serve(sock: OwnedFd, events: Arc<Events>, workers: Arc<dyn Placement + Send + Sync>, rate: warden_policy::Rate) {
    let limits = Keyed::<String>::new(rate);
    let domains = std::cell::RefCell::new(HashMap::<String, String>::new());
    let deferred = std::cell::RefCell::new(Vec::<(std::time::Instant, LandlockDenial)>::new());
    let place = |d: &LandlockDenial| -> Option<(String, String)> {
        let creator = d.domain.as_ref().and_then(|x| domains.borrow().get(x).cloned());
        let by_init = creator.and_then(|pid| workers.by_init(pid.parse().ok()?));
        by_init.or_else(|| {
            let id = worker_of_pid(d.pid.as_deref()?, |id| workers.user_of(id).is_some())?;
            let user = workers.user_of(&id)?;
            Some((id, user))
        })
    };
    let publish = |(id, user): (String, String), d: LandlockDenial| {
        if let Some(suppressed) = limits.admit(&id) {
            events.publish(
                Some(&id),
                Some(&user),
                EventKind::SandboxDenial {
                    layer: "landlock".into(),
                    syscall: None,
                    pid: d.pid.as_deref().and_then(|p| p.parse().ok()),
                    path: Some(d.object),
                    access: Some(d.access),
                    suppressed,
                },
            );
        }
    };
    let retry = || {
        let pending = std::mem::take(&mut *deferred.borrow_mut());
        for (at, d) in pending {
            match place(&d) {
                Some(w) => publish(w, d),
                None if at.elapsed() < std::time::Duration::from_secs(5) => deferred.borrow_mut().push((at, d)),
                None => {}
            }
        }
    };
    read(
        &sock,
        || {
            retry();
            false
        },
        |domain, pid| {
            let mut domains = domains.borrow_mut();
            // Domains of long-gone workers: placement falls back to the
            // denied process's cgroup.
            if domains.len() >= MAX_DOMAINS {
                domains.clear();
            }
            domains.insert(domain.to_string(), pid.to_string());
        },
        |d| match place(&d) {
            Some(w) => publish(w, d),
            None => {
                let mut deferred = deferred.borrow_mut();
                if deferred.len() < MAX_DEFERRED {
                    deferred.push((std::time::Instant::now(), d));
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_parsed() {
        let access = r#"audit(1795472990.340:5): domain=1f5ca17eb blockers=fs.read_dir path="/" dev="vda" ino=2"#;
        assert_eq!(serial(access), Some("5"));
        assert_eq!(field(access, "blockers"), Some("fs.read_dir"));
        assert_eq!(field(access, "path"), Some("/"));
        let sc = "audit(1795472990.340:5): arch=c000003e syscall=257 success=no exit=-13 ppid=8501 pid=8505 auid=1";
        assert_eq!(field(sc, "pid"), Some("8505"));
        assert_eq!(field(sc, "ppid"), Some("8501"));
    }
}
