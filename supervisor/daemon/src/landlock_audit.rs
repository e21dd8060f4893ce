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

use crate::denials::{default_limit, RateLimit};
use crate::events::EventKind;
use crate::workers::Supervisor;

const AUDIT_SET: u16 = 1001;
const AUDIT_SYSCALL: u16 = 1300;
const AUDIT_EOE: u16 = 1320;
const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
const AUDIT_STATUS_ENABLED: u32 = 1;
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
    let mut status = [0u8; 44];
    status[0..4].copy_from_slice(&AUDIT_STATUS_ENABLED.to_ne_bytes());
    status[4..8].copy_from_slice(&1u32.to_ne_bytes());
    let mut msg = Vec::with_capacity(16 + status.len());
    msg.extend_from_slice(&(16 + status.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&AUDIT_SET.to_ne_bytes());
    msg.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&status);
    sendto(sock.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
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

/// The worker id of a host pid, from its cgroup path (the last component
/// of warden's per-worker cgroup).
fn worker_of(pid: &str, sup: &Supervisor) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|id| sup.get(id).is_ok())
        .map(str::to_string)
}

#[derive(Default)]
struct Pending {
    serial: String,
    access: Vec<(String, String)>, // (blockers, object)
    pid: Option<String>,
    domain: Option<String>,
}

/// Reads the audit stream forever (run it on its own thread).
pub fn serve(sock: OwnedFd, sup: Arc<Supervisor>) {
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Pending::default();
    let mut limits: HashMap<String, RateLimit> = HashMap::new();
    let mut domains: HashMap<String, String> = HashMap::new();
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOBUFS) => continue,
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
        if this_serial != pending.serial {
            flush(&mut pending, &sup, &mut limits, &domains);
            pending.serial = this_serial;
        }
        match kind {
            AUDIT_LANDLOCK_ACCESS => {
                let blockers = field(&text, "blockers").unwrap_or("").to_string();
                let object = field(&text, "path")
                    .map(str::to_string)
                    .or_else(|| field(&text, "dest").map(|p| format!("port {p}")))
                    .unwrap_or_default();
                pending.domain = field(&text, "domain").map(str::to_string);
                pending.access.push((blockers, object));
            }
            // The domain's creator is the worker's init, alive as long as
            // the worker: a reliable way to place short-lived processes.
            AUDIT_LANDLOCK_DOMAIN => {
                if let (Some(d), Some(pid)) = (field(&text, "domain"), field(&text, "pid")) {
                    if let Some(id) = worker_of(pid, &sup) {
                        domains.insert(d.to_string(), id);
                    }
                }
            }
            AUDIT_SYSCALL => pending.pid = field(&text, "pid").map(str::to_string),
            AUDIT_EOE => flush(&mut pending, &sup, &mut limits, &domains),
            _ => {}
        }
    }
}

fn flush(
    p: &mut Pending,
    sup: &Supervisor,
    limits: &mut HashMap<String, RateLimit>,
    domains: &HashMap<String, String>,
) {
    let done = std::mem::take(p);
    if done.access.is_empty() {
        return;
    }
    let pid = done.pid.unwrap_or_default();
    let by_pid = if pid.is_empty() { None } else { worker_of(&pid, sup) };
    let Some(id) = by_pid.or_else(|| done.domain.as_ref().and_then(|d| domains.get(d).cloned())) else {
        return;
    };
    let Ok(w) = sup.get(&id) else { return };
    let limit = limits.entry(id.clone()).or_insert_with(default_limit);
    for (blockers, object) in done.access {
        if let Some(suppressed) = limit.admit(std::time::Instant::now()) {
            sup.events.publish(
                Some(&id),
                Some(&w.user),
                EventKind::SandboxDenial {
                    layer: "landlock".into(),
                    syscall: None,
                    pid: pid.parse().ok(),
                    path: Some(object),
                    access: Some(blockers),
                    suppressed,
                },
            );
        }
    }
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
