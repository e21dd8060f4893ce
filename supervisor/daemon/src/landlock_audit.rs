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
//! Audit, once on (even once turned off again), gives every process the
//! kernel creates a syscall audit context: each of its system calls takes
//! the audit path, on the whole host (about 10 ns more a call here, and
//! some 50 ns more for an open). When wardend is the one turning audit on
//! (no auditd runs), it adds the task rule `never`, as distributions'
//! audit rules do, so that no process gets one, and deletes it when it
//! stops ([`Exemption`]): landlock's records then come alone (no SYSCALL
//! record names the denied pid; the denial is placed by its domain's
//! creator) and are reported at once. Where audit was already on, its
//! rules are the admin's, and wardend leaves them alone.
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

const AUDIT_GET: u16 = 1000;
const AUDIT_SET: u16 = 1001;
const AUDIT_ADD_RULE: u16 = 1011;
const AUDIT_DEL_RULE: u16 = 1012;
const AUDIT_LIST_RULES: u16 = 1013;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// struct audit_rule_data: the task filter, the `never` action, the
/// number of fields (and bitmask words) it has room for.
const AUDIT_FILTER_TASK: u32 = 0x01;
const AUDIT_NEVER: u32 = 0;
const AUDIT_FIELDS: usize = 64;
const AUDIT_SYSCALL: u16 = 1300;
const AUDIT_EOE: u16 = 1320;
const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
const AUDIT_STATUS_ENABLED: u32 = 1;
const AUDIT_STATUS_BACKLOG_LIMIT: u32 = 0x10;
const AUDIT_BACKLOG: u32 = 8192;
/// The read-only log multicast group (AUDIT_NLGRP_READLOG).
const AUDIT_NLGRP_READLOG: u32 = 1;

/// A netlink message to the kernel's audit: header, then `payload`.
fn audit_message(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + payload.len()).unwrap_or(u32::MAX);
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(payload);
    msg
}

/// A socket for requests to the kernel's audit (not subscribed to its log).
fn control() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkAudit,
    )
}

/// Sends `kind` with `payload` on `sock` and returns the first reply.
fn ask(sock: &OwnedFd, kind: u16, flags: u16, payload: &[u8]) -> nix::Result<(u16, Vec<u8>)> {
    sendto(
        sock.as_raw_fd(),
        &audit_message(kind, flags, payload),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 8192];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    if n < 16 {
        return Err(nix::errno::Errno::EPROTO);
    }
    buf.truncate(n);
    Ok((u16::from_ne_bytes([buf[4], buf[5]]), buf.split_off(16)))
}

/// Whether kernel audit is on now.
pub fn is_enabled() -> nix::Result<bool> {
    enabled(&control()?)
}

/// Whether kernel audit is on.
fn enabled(sock: &OwnedFd) -> nix::Result<bool> {
    match ask(sock, AUDIT_GET, NLM_F_REQUEST, &[])? {
        // struct audit_status: mask, then enabled.
        (AUDIT_GET, status) if status.len() >= 8 => Ok(status[4..8] != [0; 4]),
        (NLMSG_ERROR, e) => Err(acknowledged(&e).err().unwrap_or(nix::errno::Errno::EPROTO)),
        _ => Err(nix::errno::Errno::EPROTO),
    }
}

/// What an NLMSG_ERROR payload says: an acknowledgement, or an errno.
fn acknowledged(payload: &[u8]) -> nix::Result<()> {
    let code = payload
        .get(0..4)
        .map_or(-libc::EPROTO, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match code {
        0 => Ok(()),
        c => Err(nix::errno::Errno::from_raw(-c)),
    }
}

/// struct audit_rule_data of the task rule `never` (no field: every
/// process).
fn never_rule() -> Vec<u8> {
    let mut r = Vec::with_capacity(4 * (4 + 4 * AUDIT_FIELDS));
    let mut put = |v: u32| r.extend_from_slice(&v.to_ne_bytes());
    put(AUDIT_FILTER_TASK);
    put(AUDIT_NEVER);
    put(0); // field_count
    (0..AUDIT_FIELDS).for_each(|_| put(u32::MAX)); // mask: every call
    (0..3 * AUDIT_FIELDS).for_each(|_| put(0)); // fields, values, fieldflags
    put(0); // buflen
    r
}

/// The task rule `never` wardend added when it turned audit on: no process
/// the kernel creates gets a syscall audit context. Deleted by
/// [`Exemption::remove`].
#[derive(Debug)]
pub struct Exemption(());

impl Exemption {
    /// Adds the rule now (what [`open`] does when it turns audit on; for
    /// the bench, which measures the host with and without it).
    pub fn add_now() -> nix::Result<Exemption> {
        Self::add(&control()?)
    }

    /// Adds the rule.
    fn add(sock: &OwnedFd) -> nix::Result<Exemption> {
        match ask(sock, AUDIT_ADD_RULE, NLM_F_REQUEST | NLM_F_ACK, &never_rule())? {
            (NLMSG_ERROR, e) => acknowledged(&e).map(|()| Exemption(())),
            _ => Err(nix::errno::Errno::EPROTO),
        }
    }

    /// Deletes the rule (the kernel's default returns: every new process
    /// gets a syscall audit context while audit is on).
    pub fn remove(self) {
        if let Err(e) = delete_never_rule() {
            tracing::warn!(error = %e, "cannot delete wardend's audit task rule");
        }
    }
}

/// Deletes a task rule `never` ([`Exemption::remove`]; for tests, the one
/// a wardend killed with SIGKILL left).
pub fn delete_never_rule() -> nix::Result<()> {
    match ask(&control()?, AUDIT_DEL_RULE, NLM_F_REQUEST | NLM_F_ACK, &never_rule())? {
        (NLMSG_ERROR, e) => acknowledged(&e),
        _ => Err(nix::errno::Errno::EPROTO),
    }
}

/// How many task rules `never` the kernel's audit has (to check on
/// [`Exemption`]).
pub fn never_task_rules() -> nix::Result<usize> {
    let sock = control()?;
    let dump = NLM_F_REQUEST | 0x300; // NLM_F_ROOT | NLM_F_MATCH
    sendto(
        sock.as_raw_fd(),
        &audit_message(AUDIT_LIST_RULES, dump, &[]),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let never = never_rule();
    let mut found = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            match u16::from_ne_bytes([buf[at + 4], buf[at + 5]]) {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return acknowledged(&buf[at + 16..n]).map(|()| found),
                _ if buf.get(at + 16..at + 28) == never.get(0..12) => found += 1,
                _ => {}
            }
            at += (len.max(16) + 3) & !3;
        }
    }
}

/// struct audit_status { mask, enabled, failure, pid, rate_limit,
/// backlog_limit, lost, backlog, ... } setting `enabled` and, if given,
/// `backlog_limit`.
fn audit_status(on: bool, backlog_limit: Option<u32>) -> [u8; 44] {
    let mut status = [0u8; 44];
    let mask = AUDIT_STATUS_ENABLED | backlog_limit.map_or(0, |_| AUDIT_STATUS_BACKLOG_LIMIT);
    status[0..4].copy_from_slice(&mask.to_ne_bytes());
    status[4..8].copy_from_slice(&u32::from(on).to_ne_bytes());
    status[20..24].copy_from_slice(&backlog_limit.unwrap_or(0).to_ne_bytes());
    status
}

/// Turns kernel audit on or off (what an admin's `auditctl -e` does; for
/// tests that need a host without auditd).
pub fn set_enabled(on: bool) -> nix::Result<()> {
    match ask(
        &control()?,
        AUDIT_SET,
        NLM_F_REQUEST | NLM_F_ACK,
        &audit_status(on, None),
    )? {
        (NLMSG_ERROR, e) => acknowledged(&e),
        _ => Err(nix::errno::Errno::EPROTO),
    }
}

/// Turns kernel audit on and subscribes to its read-only log group. If
/// audit was off and `exempt` says so, no process gets a syscall audit
/// context from now on (see [`Exemption`]).
pub fn open(exempt: bool) -> nix::Result<(OwnedFd, Option<Exemption>)> {
    let ctl = control()?;
    let was_on = enabled(&ctl)?;
    let sock = control()?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 1 << (AUDIT_NLGRP_READLOG - 1)))?;
    // The default backlog of 64 records drops denials of busy workers.
    sendto(
        sock.as_raw_fd(),
        &audit_message(AUDIT_SET, NLM_F_REQUEST, &audit_status(true, Some(AUDIT_BACKLOG))),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    // Wake up regularly even when nothing arrives, to flush events whose
    // end-of-event record never comes.
    let timeout = nix::sys::time::TimeVal::new(0, 250_000);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    let exemption = match (exempt, was_on) {
        (true, false) => match Exemption::add(&ctl) {
            Ok(e) => Some(e),
            // Someone's rule `never` is there already: not ours to delete.
            Err(nix::errno::Errno::EEXIST) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot add the audit task rule `never`; every new process on the host takes the audit path while audit is on");
                None
            }
        },
        _ => None,
    };
    Ok((sock, exemption))
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
/// domain's creation; `on_denial` each denial: at its event's end, or at
/// once when records come `alone` (no process has a syscall audit context:
/// [`Exemption`]).
pub fn read(
    sock: &OwnedFd,
    alone: bool,
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
                if alone {
                    if let Some(mut p) = pending.remove(&this_serial) {
                        flush(&mut p, &mut on_denial);
                    }
                }
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
pub fn serve(
    sock: OwnedFd,
    alone: bool,
    events: Arc<Events>,
    workers: Arc<dyn Placement + Send + Sync>,
    rate: warden_policy::Rate,
) {
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
        alone,
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

    #[test]
    fn the_never_rule_is_a_task_rule_with_no_field() {
        let r = never_rule();
        let word = |i: usize| u32::from_ne_bytes([r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]]);
        // flags, action, field_count, mask[64], fields[64], values[64],
        // fieldflags[64], buflen.
        assert_eq!(r.len(), 4 * (3 + 4 * AUDIT_FIELDS + 1));
        assert_eq!((word(0), word(1), word(2)), (AUDIT_FILTER_TASK, AUDIT_NEVER, 0));
        assert!((3..3 + AUDIT_FIELDS).all(|i| word(i) == u32::MAX));
        assert!((3 + AUDIT_FIELDS..r.len() / 4).all(|i| word(i) == 0));
    }

    #[test]
    fn turning_audit_on_adds_the_never_task_rule_and_its_end_deletes_it() {
        if !crate::privileged("changes the kernel's audit status and rules") {
            return;
        }
        // A host without auditd: audit off (whether or not it was ever on).
        set_enabled(false).unwrap();
        let before = never_task_rules().unwrap();
        if before > 0 {
            // Someone's rule is there (auditd's, or a daemon that died
            // before deleting its own): it stays, and is not wardend's.
            let (_sock, exemption) = open(true).unwrap();
            assert!(exemption.is_none());
            assert_eq!(never_task_rules().unwrap(), before);
            return;
        }
        let (_sock, exemption) = open(true).unwrap();
        let exemption = exemption.expect("audit was off: wardend turned it on and added the rule");
        assert!(enabled(&control().unwrap()).unwrap());
        assert_eq!(never_task_rules().unwrap(), before + 1, "the kernel took the rule");
        // Audit on already (auditd, or another daemon): its rules are left alone.
        let (_sock2, again) = open(true).unwrap();
        assert!(again.is_none());
        assert_eq!(never_task_rules().unwrap(), before + 1);
        // A reader that asks for none adds none.
        set_enabled(false).unwrap();
        let (_sock3, none) = open(false).unwrap();
        assert!(none.is_none());
        assert_eq!(never_task_rules().unwrap(), before + 1);
        exemption.remove();
        assert_eq!(never_task_rules().unwrap(), before, "the rule is gone at the end");
    }
}
