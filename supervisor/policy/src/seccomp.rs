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

use seccompiler::{sock_filter, BpfProgram};
use serde::Deserialize;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    /// `AUDIT_ARCH_*`: what the kernel puts in `seccomp_data.arch`.
    fn audit(self) -> u32 {
        match self {
            Arch::X86_64 => 0xc000_003e,
            Arch::Aarch64 => 0xc000_00b7,
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

/// One condition on a call's argument: `(arg & mask) == value` (or `!=`),
/// over its low 32 bits (`wide`: all 64).
#[derive(Debug, Clone, Copy)]
struct ArgCond {
    arg: u8,
    wide: bool,
    mask: u64,
    value: u64,
    equal: bool,
}

/// An argument rule: all its conditions hold.
type ArgRule = Vec<ArgCond>;

fn eq(arg: u8, value: u64) -> ArgCond {
    ArgCond {
        arg,
        wide: false,
        mask: u64::MAX,
        value,
        equal: true,
    }
}

fn ne(arg: u8, value: u64) -> ArgCond {
    ArgCond {
        equal: false,
        ..eq(arg, value)
    }
}

fn masked_eq(arg: u8, wide: bool, mask: u64, value: u64) -> ArgCond {
    ArgCond {
        arg,
        wide,
        mask,
        value,
        equal: true,
    }
}

/// The argument checks for calls that are only safe with some arguments.
/// `None` means "no argument check: allow the call".
fn argument_rules(name: &str, udp: bool) -> Option<Vec<ArgRule>> {
    match name {
        // A worker must not create namespaces: user namespaces expose most of
        // the kernel's privileged code to it.
        "clone" => Some(vec![vec![masked_eq(0, true, CLONE_NAMESPACE_FLAGS, 0)]]),
        // TIOCSTI pushes keystrokes into the terminal's input queue, a classic
        // escape from a sandbox sharing a terminal; TIOCLINUX can do the same.
        // The owner of a file (a worker, in the host's user namespace) may
        // change its project id or clear a directory's inherit flag with
        // the SETFLAGS and FSSETXATTR requests, moving what it writes out of
        // its user's disk quota. The kernel reads the request as 32 bits,
        // so compare 32 bits.
        "ioctl" => Some(vec![vec![
            ne(1, TIOCSTI),
            ne(1, TIOCLINUX),
            ne(1, FS_IOC_SETFLAGS),
            ne(1, FS_IOC32_SETFLAGS),
            ne(1, FS_IOC_FSSETXATTR),
        ]]),
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
            let mut rules = vec![vec![eq(0, AF_UNIX)], vec![eq(0, AF_NETLINK), eq(2, NETLINK_ROUTE)]];
            for family in [AF_INET, AF_INET6] {
                for (kind, own) in &kinds {
                    for protocol in [0, *own] {
                        rules.push(vec![
                            eq(0, family),
                            masked_eq(1, false, SOCK_TYPE_MASK, *kind),
                            eq(2, protocol),
                        ]);
                    }
                }
            }
            Some(rules)
        }
        // TCP Fast Open sends data with the SYN without a connect() call
        // (MSG_FASTOPEN), or lets connect() defer to the first send
        // (TCP_FASTOPEN_CONNECT): both slip past landlock's connect check.
        "sendto" => Some(vec![vec![masked_eq(3, false, MSG_FASTOPEN, 0)]]),
        "sendmsg" => Some(vec![vec![masked_eq(2, false, MSG_FASTOPEN, 0)]]),
        "sendmmsg" => Some(vec![vec![masked_eq(3, false, MSG_FASTOPEN, 0)]]),
        "setsockopt" => Some(vec![vec![ne(1, IPPROTO_TCP)], vec![ne(2, TCP_FASTOPEN_CONNECT)]]),
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

/// [`compile`], once per allowlist: a profile's filter is compiled for its
/// first worker and reused for the next ones (the spawn path asks for it
/// every time). Holds the filters of at most 64 allowlists (profile
/// reloads make new ones; past that, it starts over).
pub fn compiled(allowed: &[String], udp: bool, arch: Arch) -> BpfProgram {
    type Key = (Vec<String>, bool, Arch);
    static PROGRAMS: OnceLock<std::sync::Mutex<std::collections::HashMap<Key, BpfProgram>>> = OnceLock::new();
    let programs = PROGRAMS.get_or_init(Default::default);
    let key = (allowed.to_vec(), udp, arch);
    if let Some(p) = programs.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return p.clone();
    }
    let program = compile(allowed, udp, arch);
    let mut all = programs.lock().unwrap_or_else(|p| p.into_inner());
    if all.len() >= 64 {
        all.clear();
    }
    all.insert(key, program.clone());
    program
}

/// Compiles an allowlist into a BPF program for `arch`: a balanced binary
/// search on the call number over the ranges of calls with one verdict
/// (allowed; refused; allowed with argument checks), so that a call the
/// kernel's action cache cannot skip (argument checks, refusals) costs a
/// dozen comparisons, not a walk down a list of hundreds, and so does the
/// kernel's own pass over every call number when the filter is installed.
/// Calls that do not exist on `arch` are skipped (e.g. `open` on aarch64).
/// Every refusal returns `SECCOMP_RET_USER_NOTIF`: the filter must be
/// installed with a listener, whose owner answers each denied call with
/// EPERM. The tests check it gives the verdict of seccompiler's linear
/// list (`compile_linear` there) for every call number and the arguments
/// the checks look at.
pub fn compile(allowed: &[String], udp: bool, arch: Arch) -> BpfProgram {
    let last = arch.last();
    // The verdict of each call number, then the ranges of equal verdicts.
    let mut verdict: BTreeMap<u32, Verdict> = BTreeMap::new();
    for name in allowed {
        if name == "clone3" {
            continue; // answered with ENOSYS by the prologue below
        }
        let Some(nr) = arch.number(name).and_then(|n| u32::try_from(n).ok()) else {
            continue;
        };
        verdict.insert(
            nr,
            match argument_rules(name, udp) {
                Some(rules) => Verdict::Check(rules),
                None => Verdict::Allow,
            },
        );
    }
    let mut ranges: Vec<(u32, Verdict)> = Vec::new();
    for nr in 0..=last {
        let v = verdict.remove(&nr).unwrap_or(Verdict::Refuse);
        let merge = matches!(
            (ranges.last(), &v),
            (Some((_, Verdict::Allow)), Verdict::Allow) | (Some((_, Verdict::Refuse)), Verdict::Refuse)
        );
        if !merge {
            ranges.push((nr, v));
        }
    }

    let mut program = vec![
        stmt(BPF_LD_W_ABS, 4), // seccomp_data.arch
        jump(BPF_JEQ_K, arch.audit(), 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ];
    program.extend(enosys_prologue(allowed, arch));
    program.extend(search(&ranges));
    program
}

/// Call numbers above the known table (new calls, and x32 calls on x86_64,
/// whose numbers have bit 30 set), and clone3 (its flags are in memory the
/// filter cannot read): ENOSYS, so that libc falls back. Leaves the call
/// number in the accumulator.
fn enosys_prologue(allowed: &[String], arch: Arch) -> Vec<sock_filter> {
    let mut out = vec![
        stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
        jump(BPF_JGT_K, arch.last(), 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS),
    ];
    if let Some(nr) = arch.number("clone3").and_then(|n| u32::try_from(n).ok()) {
        if allowed.iter().any(|c| c == "clone3") {
            out.push(jump(BPF_JEQ_K, nr, 0, 1));
            out.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS));
        }
    }
    out
}

/// What the filter does with one call number.
#[derive(Debug)]
enum Verdict {
    Allow,
    Refuse,
    /// Allowed when one of the rules holds (each: all its conditions).
    Check(Vec<ArgRule>),
}

/// A binary search over `ranges` (each from its number up to the next's),
/// with the call number in the accumulator; each leaf returns its verdict.
fn search(ranges: &[(u32, Verdict)]) -> Vec<sock_filter> {
    if let [(_, v)] = ranges {
        return match v {
            Verdict::Allow => vec![stmt(BPF_RET_K, SECCOMP_RET_ALLOW)],
            Verdict::Refuse => vec![stmt(BPF_RET_K, SECCOMP_RET_USER_NOTIF)],
            Verdict::Check(rules) => checks(rules),
        };
    }
    let mid = ranges.len() / 2;
    let (below, above) = (search(&ranges[..mid]), search(&ranges[mid..]));
    let mut out = Vec::with_capacity(below.len() + above.len() + 2);
    match u8::try_from(below.len()) {
        // nr >= the first number of the upper half: skip the lower one.
        Ok(skip) => out.push(jump(BPF_JGE_K, ranges[mid].0, skip, 0)),
        // Too far for a conditional jump (8 bits): through a JA (32 bits).
        Err(_) => {
            out.push(jump(BPF_JGE_K, ranges[mid].0, 0, 1));
            out.push(stmt(BPF_JA, u32::try_from(below.len()).unwrap_or(u32::MAX)));
        }
    }
    out.extend(below);
    out.extend(above);
    out
}

/// The argument checks of one call: each rule in turn, allowed as soon as
/// one holds (all its conditions), refused when none does. The accumulator
/// (the call number) is overwritten: this is a leaf.
fn checks(rules: &[ArgRule]) -> Vec<sock_filter> {
    let mut out = Vec::new();
    for rule in rules {
        // A failed condition jumps to the next rule, just past this one's
        // block: (instruction, whether it fails on a match), patched below.
        let mut fails = Vec::new();
        for c in rule {
            let offset = 16 + 8 * u32::from(c.arg);
            let mut words = vec![(offset, c.mask, c.value)];
            // Little-endian: the low word; a wide condition also the high one.
            if c.wide {
                words.push((offset + 4, c.mask >> 32, c.value >> 32));
            }
            for (off, mask, value) in words {
                let (mask, value) = (low(mask), low(value & mask));
                out.push(stmt(BPF_LD_W_ABS, off));
                if mask != u32::MAX {
                    out.push(stmt(BPF_ALU_AND_K, mask));
                }
                fails.push((out.len(), !c.equal));
                out.push(jump(BPF_JEQ_K, value, 0, 0));
            }
        }
        out.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
        let end = out.len();
        for (i, on_match) in fails {
            let skip = u8::try_from(end - i - 1).expect("a rule is shorter than 256 instructions");
            if on_match {
                out[i].jt = skip;
            } else {
                out[i].jf = skip;
            }
        }
    }
    out.push(stmt(BPF_RET_K, SECCOMP_RET_USER_NOTIF));
    out
}

fn low(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX)
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_JA: u16 = 0x05;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGT_K: u16 = 0x25;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
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

    const EPERM: u32 = 1;

    use seccompiler::{
        SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// The same condition for seccompiler (the linear reference).
    fn linear_cond(c: ArgCond) -> Cond {
        let len = if c.wide { Len::Qword } else { Len::Dword };
        let op = match (c.equal, c.mask) {
            (true, u64::MAX) => Op::Eq,
            (false, u64::MAX) => Op::Ne,
            (true, m) => Op::MaskedEq(m),
            (false, _) => unreachable!("no rule negates a masked comparison"),
        };
        // Only fails for arg > 5, which these constant rules never name.
        Cond::new(c.arg, len, op, c.value).expect("argument index is below 6")
    }

    /// An allowlist compiled the way warden did before the search tree: a
    /// list seccompiler lays out, one call after the other, behind the same
    /// ENOSYS prologue. The reference the tree's verdicts are checked against.
    fn compile_linear(allowed: &[String], udp: bool, arch: Arch) -> BpfProgram {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for name in allowed {
            if name == "clone3" {
                continue; // answered with ENOSYS by the prologue
            }
            if let Some(nr) = arch.number(name) {
                let linear = argument_rules(name, udp)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| SeccompRule::new(r.into_iter().map(linear_cond).collect()).expect("a rule has conditions"))
                    .collect();
                rules.insert(nr, linear);
            }
        }
        let target = match arch {
            Arch::X86_64 => TargetArch::x86_64,
            Arch::Aarch64 => TargetArch::aarch64,
        };
        let filter = SeccompFilter::new(rules, SeccompAction::Errno(EPERM), SeccompAction::Allow, target).unwrap();
        let mut program: BpfProgram = filter.try_into().unwrap();
        // seccompiler's program starts with a 3-instruction architecture
        // check (load arch, jump if equal, kill); the prologue goes after it.
        assert_eq!(program[2].code, BPF_RET_K);
        program.splice(3..3, enosys_prologue(allowed, arch));
        // seccompiler has no user-notification action: its EPERM returns
        // become notifications, as in warden's own filter.
        for insn in &mut program {
            if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_ERRNO | EPERM {
                insn.k = SECCOMP_RET_USER_NOTIF;
            }
        }
        program
    }

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

    /// Runs a seccomp BPF program on one `seccomp_data` (the subset of
    /// classic BPF the two compilers emit) and returns its verdict.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            let k = i.k as usize;
            let branch = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                BPF_LD_W_ABS => acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap()),
                BPF_ALU_AND_K => acc &= i.k,
                BPF_JA => pc += k,
                BPF_JEQ_K => pc += branch(acc == i.k),
                BPF_JGT_K => pc += branch(acc > i.k),
                BPF_JGE_K => pc += branch(acc >= i.k),
                0x45 => pc += branch(acc & i.k != 0), // JSET
                BPF_RET_K => return i.k,
                code => panic!("instruction {code:#x} at {} is not interpreted", pc - 1),
            }
        }
    }

    /// Argument values the checks look at, and their neighbours.
    fn probes() -> Vec<u64> {
        let mut v = vec![
            0,
            1,
            0x11, // SIGCHLD, clone's usual flags
            AF_INET,
            AF_INET6,
            AF_NETLINK,
            SOCK_STREAM | 0x8_0000, // SOCK_CLOEXEC
            SOCK_DGRAM,
            IPPROTO_TCP,
            IPPROTO_UDP,
            TIOCSTI,
            FS_IOC_FSSETXATTR,
            MSG_FASTOPEN | 0x40,
            TCP_FASTOPEN_CONNECT,
            0x1000_0011, // CLONE_NEWUSER | SIGCHLD
            (1 << 32) | TIOCSTI,
            u64::MAX,
        ];
        v.extend([AF_UNIX, TIOCLINUX, FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, 0x80, 0x5413]);
        v
    }

    #[test]
    fn the_search_tree_gives_the_linear_filters_verdict_for_every_call_and_argument() {
        let everything: Vec<String> = groups().flat_map(|g| g.calls.keys().cloned()).collect();
        let set = crate::ProfileSet::embedded().unwrap();
        let mut allowlists: Vec<Vec<String>> = set.iter().map(|p| allowed_calls(&p.seccomp)).collect();
        allowlists.push(everything);
        allowlists.push(vec!["read".into(), "ioctl".into()]);
        let probes = probes();
        let checked: Vec<&str> = [
            "clone",
            "ioctl",
            "socket",
            "sendto",
            "sendmsg",
            "sendmmsg",
            "setsockopt",
        ]
        .into();
        let mut compared = 0u64;
        for arch in Arch::ALL {
            for allowed in &allowlists {
                for udp in [false, true] {
                    let tree = compile(allowed, udp, arch);
                    let linear = compile_linear(allowed, udp, arch);
                    assert!(tree.len() < linear.len(), "{} < {}", tree.len(), linear.len());
                    let same = |nr: u32, args: [u64; 6]| {
                        let (t, l) = (run(&tree, arch.audit(), nr, args), run(&linear, arch.audit(), nr, args));
                        assert_eq!(
                            t,
                            l,
                            "{}: call {nr} ({:?}), args {args:x?}",
                            arch.name(),
                            arch.name_of(nr.into())
                        );
                    };
                    for nr in (0..=arch.last() + 3).chain([0x4000_0000, u32::MAX]) {
                        let name = arch.name_of(nr.into()).unwrap_or("");
                        if checked.contains(&name) {
                            for &a in &probes {
                                for &b in &probes {
                                    for &c in &probes {
                                        for d in [0, MSG_FASTOPEN] {
                                            same(nr, [a, b, c, d, 0, 0]);
                                            compared += 1;
                                        }
                                    }
                                }
                            }
                        } else {
                            same(nr, [0; 6]);
                            same(nr, [u64::MAX; 6]);
                            compared += 2;
                        }
                    }
                    // Another architecture's calls are killed by both.
                    let other = if arch == Arch::X86_64 {
                        Arch::Aarch64
                    } else {
                        Arch::X86_64
                    };
                    assert_eq!(run(&tree, other.audit(), 0, [0; 6]), SECCOMP_RET_KILL_PROCESS);
                }
            }
        }
        assert!(compared > 1_000_000, "{compared}");
    }

    #[test]
    fn compiles_for_both_architectures_with_the_enosys_prologue() {
        let all: Vec<String> = groups().flat_map(|g| g.calls.keys().cloned()).collect();
        for arch in Arch::ALL {
            let prog = compile(&all, true, arch);
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
