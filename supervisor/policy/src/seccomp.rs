//! The seccomp part of a policy: named groups of system calls (in the spirit
//! of systemd's `@system-service`), the calls warden never allows, and the
//! compilation of a profile's allowlist into a BPF program for one
//! architecture.
//!
//! The groups are data: `sandbox-profiles/seccomp.toml` gives every allowed
//! call its reason, and is embedded here.
//!
//! The filter is an allowlist. A call that is not allowed goes to the
//! supervisor through seccomp user notification, which answers it with
//! EPERM and reports it; a call newer than this build's syscall table fails
//! with ENOSYS, so that libc falls back to an older call instead of treating
//! EPERM as fatal. A few calls are allowed only with safe arguments (see
//! [`compile`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde::Deserialize;

use crate::error::PolicyError;

/// A named group: what it is for, and each of its calls with the reason a
/// worker may make it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    #[serde(skip)]
    pub name: String,
    pub about: String,
    /// Call name to why it is allowed.
    pub calls: BTreeMap<String, String>,
}

/// The data file: the groups and the calls warden never allows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    group: BTreeMap<String, Group>,
    /// Call name to why no profile may allow it.
    never: BTreeMap<String, String>,
}

/// `sandbox-profiles/seccomp.toml`, where an admin reads what each group
/// allows and why.
pub const GROUPS_TOML: &str = include_str!("../../../sandbox-profiles/seccomp.toml");

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The file is part of this build; `every_group_member_exists_somewhere`
        // checks that it parses and names only real calls.
        let mut t: Table = toml::from_str(GROUPS_TOML).expect("the embedded seccomp.toml parses");
        for (name, g) in &mut t.group {
            g.name.clone_from(name);
        }
        t
    })
}

/// The groups a profile can name in `[seccomp] groups`.
pub fn groups() -> impl Iterator<Item = &'static Group> {
    table().group.values()
}

// Argument values used by the argument checks.
const CLONE_NAMESPACE_FLAGS: u64 = 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0002_0000 // CLONE_NEWNS
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000 // CLONE_NEWNET
    | 0x0000_0080; // CLONE_NEWTIME
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;
/// `_IOW('f', 2, long)` and its 32-bit twin `_IOW('f', 2, int)`.
const FS_IOC_SETFLAGS: u64 = 0x4008_6602;
const FS_IOC32_SETFLAGS: u64 = 0x4004_6602;
/// `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSSETXATTR: u64 = 0x401c_5820;
const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_NETLINK: u64 = 16;
const SOCK_STREAM: u64 = 1;
const SOCK_DGRAM: u64 = 2;
const SOCK_TYPE_MASK: u64 = 0xf;
const NETLINK_ROUTE: u64 = 0;
const IPPROTO_TCP: u64 = 6;
const IPPROTO_UDP: u64 = 17;
const MSG_FASTOPEN: u64 = 0x2000_0000;
const TCP_FASTOPEN_CONNECT: u64 = 30;
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;

pub fn group(name: &str) -> Option<&'static Group> {
    table().group.get(name)
}

pub fn group_names() -> Vec<&'static str> {
    table().group.keys().map(String::as_str).collect()
}

/// Why no profile may allow `name`, if it is on warden's never-allowed list.
pub fn never_allowed(name: &str) -> Option<&'static str> {
    table().never.get(name).map(String::as_str)
}

/// The architectures warden compiles filters for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    fn target(self) -> TargetArch {
        match self {
            Arch::X86_64 => TargetArch::x86_64,
            Arch::Aarch64 => TargetArch::aarch64,
        }
    }

    /// The number of a call on this architecture, if it exists there.
    pub fn number(self, name: &str) -> Option<i64> {
        match self {
            Arch::X86_64 => name.parse::<syscalls::x86_64::Sysno>().ok().map(|s| i64::from(s.id())),
            Arch::Aarch64 => name.parse::<syscalls::aarch64::Sysno>().ok().map(|s| i64::from(s.id())),
        }
    }

    /// The name of call `nr` on this architecture (for denial reports).
    pub fn name_of(self, nr: i64) -> Option<&'static str> {
        let nr = i32::try_from(nr).ok()?;
        match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::new(usize::try_from(nr).ok()?).map(|s| s.name()),
            Arch::Aarch64 => syscalls::aarch64::Sysno::new(usize::try_from(nr).ok()?).map(|s| s.name()),
        }
    }

    /// The highest call number this build knows; anything above is ENOSYS.
    fn last(self) -> u32 {
        let id = match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::last().id(),
            Arch::Aarch64 => syscalls::aarch64::Sysno::last().id(),
        };
        u32::try_from(id).unwrap_or(u32::MAX)
    }
}

/// A name known on at least one supported architecture.
pub fn is_known_syscall(name: &str) -> bool {
    Arch::ALL.iter().any(|a| a.number(name).is_some())
}

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Cond {
    // Only fails for arg > 5, which these constant call sites never pass.
    Cond::new(arg, len, op, value).expect("argument index is below 6")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule with at least one condition")
}

/// The argument checks for calls that are only safe with some arguments.
/// `None` means "no argument check: allow the call".
fn argument_rules(name: &str, udp: bool) -> Option<Vec<SeccompRule>> {
    match name {
        // A worker must not create namespaces: user namespaces expose most of
        // the kernel's privileged code to it.
        "clone" => Some(vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )])]),
        // TIOCSTI pushes keystrokes into the terminal's input queue, a classic
        // escape from a sandbox sharing a terminal; TIOCLINUX can do the same.
        // The owner of a file (a worker, in the host's user namespace) may
        // change its project id or clear a directory's inherit flag with
        // the SETFLAGS and FSSETXATTR requests, moving what it writes out of
        // its user's disk quota. The kernel reads the request as 32 bits,
        // so compare 32 bits.
        "ioctl" => Some(vec![rule(vec![
            cond(1, Len::Dword, Op::Ne, TIOCSTI),
            cond(1, Len::Dword, Op::Ne, TIOCLINUX),
            cond(1, Len::Dword, Op::Ne, FS_IOC_SETFLAGS),
            cond(1, Len::Dword, Op::Ne, FS_IOC32_SETFLAGS),
            cond(1, Len::Dword, Op::Ne, FS_IOC_FSSETXATTR),
        ])]),
        // Unix sockets; TCP (and UDP where the profile allows it) with
        // protocol 0 or the family's own protocol only: MPTCP and SCTP
        // sockets fall outside landlock's TCP rules, and raw and ICMP
        // sockets have no business in a worker. Route netlink only:
        // getaddrinfo() asks it which address families are up.
        "socket" => {
            let mut kinds = vec![(SOCK_STREAM, IPPROTO_TCP)];
            if udp {
                kinds.push((SOCK_DGRAM, IPPROTO_UDP));
            }
            let mut rules = vec![
                rule(vec![cond(0, Len::Dword, Op::Eq, AF_UNIX)]),
                rule(vec![
                    cond(0, Len::Dword, Op::Eq, AF_NETLINK),
                    cond(2, Len::Dword, Op::Eq, NETLINK_ROUTE),
                ]),
            ];
            for family in [AF_INET, AF_INET6] {
                for (kind, own) in &kinds {
                    for protocol in [0, *own] {
                        rules.push(rule(vec![
                            cond(0, Len::Dword, Op::Eq, family),
                            cond(1, Len::Dword, Op::MaskedEq(SOCK_TYPE_MASK), *kind),
                            cond(2, Len::Dword, Op::Eq, protocol),
                        ]));
                    }
                }
            }
            Some(rules)
        }
        // TCP Fast Open sends data with the SYN without a connect() call
        // (MSG_FASTOPEN), or lets connect() defer to the first send
        // (TCP_FASTOPEN_CONNECT): both slip past landlock's connect check.
        "sendto" => Some(vec![rule(vec![cond(3, Len::Dword, Op::MaskedEq(MSG_FASTOPEN), 0)])]),
        "sendmsg" => Some(vec![rule(vec![cond(2, Len::Dword, Op::MaskedEq(MSG_FASTOPEN), 0)])]),
        "sendmmsg" => Some(vec![rule(vec![cond(3, Len::Dword, Op::MaskedEq(MSG_FASTOPEN), 0)])]),
        "setsockopt" => Some(vec![
            rule(vec![cond(1, Len::Dword, Op::Ne, IPPROTO_TCP)]),
            rule(vec![cond(2, Len::Dword, Op::Ne, TCP_FASTOPEN_CONNECT)]),
        ]),
        _ => None,
    }
}

/// The resolved allowlist of a policy: group members plus `allow`, minus
/// `deny`, minus everything warden never allows. Sorted, deduplicated.
pub fn allowed_calls(policy: &crate::SeccompPolicy) -> Vec<String> {
    let mut calls: std::collections::BTreeSet<String> = policy
        .groups
        .iter()
        .filter_map(|g| group(g))
        .flat_map(|g| g.calls.keys().cloned())
        .chain(policy.allow.iter().cloned())
        .collect();
    calls.retain(|c| !policy.deny.contains(c) && never_allowed(c).is_none());
    calls.into_iter().collect()
}

/// Compiles an allowlist into a BPF program for `arch`. Calls that do not
/// exist on `arch` are skipped (e.g. `open` on aarch64). Every refusal
/// returns `SECCOMP_RET_USER_NOTIF`: the filter must be installed with a
/// listener, whose owner answers each denied call with EPERM.
pub fn compile(allowed: &[String], udp: bool, arch: Arch) -> Result<BpfProgram, PolicyError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in allowed {
        if name == "clone3" {
            continue; // answered with ENOSYS by the prologue below
        }
        if let Some(nr) = arch.number(name) {
            rules.insert(nr, argument_rules(name, udp).unwrap_or_default());
        }
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Errno(EPERM), SeccompAction::Allow, arch.target()).map_err(
        |source| PolicyError::Seccomp {
            arch: arch.name(),
            source,
        },
    )?;
    let mut program: BpfProgram = filter.try_into().map_err(|source| PolicyError::Seccomp {
        arch: arch.name(),
        source,
    })?;

    // seccompiler's program starts with a 3-instruction architecture check
    // (load arch, jump if equal, kill). Right after it we answer ENOSYS for
    // call numbers above the known table (new calls, and x32 calls on x86_64,
    // whose numbers have bit 30 set) and for clone3.
    let mut prologue = vec![
        stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
        jump(BPF_JGT_K, arch.last(), 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS),
    ];
    if let Some(nr) = arch.number("clone3") {
        if allowed.iter().any(|c| c == "clone3") {
            prologue.push(jump(BPF_JEQ_K, u32::try_from(nr).unwrap_or(u32::MAX), 0, 1));
            prologue.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS));
        }
    }
    debug_assert_eq!(program[2].code, BPF_RET_K);
    program.splice(3..3, prologue);
    // seccompiler has no user-notification action: its EPERM returns become
    // notifications (the supervisor answers them with that same EPERM).
    for insn in &mut program {
        if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_ERRNO | EPERM {
            insn.k = SECCOMP_RET_USER_NOTIF;
        }
    }
    Ok(program)
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JGT_K: u16 = 0x25;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// The return value that hands a call to the filter's listener.
pub const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_member_exists_somewhere() {
        for g in groups() {
            assert!(!g.about.is_empty(), "group {} says what it is for", g.name);
            for (c, why) in &g.calls {
                assert!(is_known_syscall(c), "group {} names unknown call {c}", g.name);
                assert!(never_allowed(c).is_none(), "group {} allows forbidden {c}", g.name);
                assert!(why.len() > 4, "group {}: {c} says why it is allowed", g.name);
            }
        }
        for c in table().never.keys() {
            assert!(
                is_known_syscall(c) || *c == "open_tree_attr",
                "never-allowed list names unknown call {c}"
            );
        }
    }

    #[test]
    fn compiles_for_both_architectures_with_the_enosys_prologue() {
        let all: Vec<String> = groups().flat_map(|g| g.calls.keys().cloned()).collect();
        for arch in Arch::ALL {
            let prog = compile(&all, true, arch).unwrap();
            assert!(prog.len() > 200 && prog.len() < 4096, "{}: {}", arch.name(), prog.len());
            assert_eq!(prog[3].code, BPF_LD_W_ABS);
            assert_eq!(prog[4].k, arch.last());
            assert_eq!(prog[5].k, SECCOMP_RET_ERRNO | ENOSYS);
        }
        assert!(Arch::Aarch64.number("open").is_none());
        assert_eq!(Arch::X86_64.number("open"), Some(2));
        assert_eq!(Arch::X86_64.name_of(101), Some("ptrace"));
    }
}
