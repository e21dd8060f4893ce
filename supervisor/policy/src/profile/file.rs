//! A profile file exactly as written, with every value typed as it is read:
//! a bad value fails deserialization at its own place in the file
//! (file:line:column), and nothing after this parses a string again.
//! Spans are kept where a later cross-field check must point somewhere.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::claude::{HttpUrl, PermissionMode, ToolRule};
use crate::seccomp;
use crate::units::{deserialize_via, ByteSize, CpuQuota, Seconds};

/// Variables a profile path or environment value may use; they are resolved
/// per worker to paths inside its sandbox.
pub const VARIABLES: &[&str] = &["HOME", "WORKSPACE", "TMP", "USER"];

/// The highest landlock ABI this build knows how to enforce (the launcher
/// uses a newer kernel at this ABI).
pub const MAX_LANDLOCK_ABI: u32 = 7;

/// The rlimits a profile may set, as `warden-launch` names them.
pub const RLIMITS: &[&str] = &[
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub description: Option<String>,
    pub extends: Option<Spanned<ProfileName>>,
    /// Warden users that may use the profile (with `groups`: by default,
    /// everyone).
    pub users: Option<Vec<WardenUser>>,
    /// Unix groups whose members (by login name, the warden user's) may.
    pub groups: Option<Vec<UnixGroup>>,
    #[serde(default)]
    pub landlock: RawLandlock,
    #[serde(default)]
    pub filesystem: RawFs,
    #[serde(default)]
    pub network: RawNet,
    #[serde(default)]
    pub seccomp: RawSeccomp,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub environment: RawEnv,
    pub claude: Option<RawClaude>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLandlock {
    pub min_abi: Option<LandlockAbi>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFs {
    #[serde(default)]
    pub read_only: Vec<ProfilePath>,
    #[serde(default)]
    pub read_write: Vec<ProfilePath>,
    #[serde(default)]
    pub exec: Vec<ProfilePath>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNet {
    pub mode: Option<Spanned<crate::NetworkMode>>,
    #[serde(default)]
    pub allow: Vec<crate::NetRule>,
    #[serde(default)]
    pub deny: Vec<crate::NetRule>,
    #[serde(default)]
    pub tcp_connect: Vec<Port>,
    #[serde(default)]
    pub tcp_bind: Vec<BindPort>,
    pub udp: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSeccomp {
    #[serde(default)]
    pub groups: Vec<GroupName>,
    #[serde(default)]
    pub allow: Vec<AllowedCall>,
    #[serde(default)]
    pub deny: Vec<SyscallName>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Option<ByteSize>,
    pub memory_swap: Option<Spanned<ByteSize>>,
    pub pids: Option<Pids>,
    pub cpu_quota: Option<CpuQuota>,
    pub cpu_weight: Option<CpuWeight>,
    pub tmpfs_size: Option<ByteSize>,
    pub disk: Option<ByteSize>,
    pub timeout: Option<Seconds>,
    #[serde(default)]
    pub rlimits: BTreeMap<RlimitName, RlimitValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnv {
    #[serde(default)]
    pub pass: Vec<EnvName>,
    #[serde(default)]
    pub set: BTreeMap<EnvName, EnvValue>,
}

/// `[claude]`: the profile runs the Claude Code CLI headless.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClaude {
    pub permission_mode: Option<PermissionMode>,
    pub model: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    pub max_turns: Option<u32>,
    pub append_system_prompt: Option<String>,
    pub base_url: Option<HttpUrl>,
    pub claude_md: Option<String>,
    pub managed_settings: Option<toml::Table>,
    pub approval_timeout: Option<Seconds>,
    #[serde(default)]
    pub auto_allow: Vec<ToolRule>,
    #[serde(default)]
    pub auto_deny: Vec<ToolRule>,
    #[serde(default)]
    pub server_tools: Vec<crate::claude::ServerTool>,
}

// ---------------------------------------------------------------------------
// The typed values. Each checks itself when it is read.

deserialize_via!(String: WardenUser, UnixGroup, ProfileName, ProfilePath, GroupName, SyscallName, AllowedCall, RlimitName, EnvName, EnvValue);
deserialize_via!(u64: LandlockAbi, Port, BindPort, Pids, CpuWeight);

/// A warden user name, as requests name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WardenUser(pub String);

impl TryFrom<String> for WardenUser {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::names::check_user(&s).map_err(|e| e.to_string())?;
        Ok(WardenUser(s))
    }
}

/// A Unix group name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnixGroup(pub String);

impl TryFrom<String> for UnixGroup {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(UnixGroup(s))
        } else {
            Err(format!("invalid group name {s:?}"))
        }
    }
}

/// A profile name (file stem): lowercase letters, digits, '-' and '_'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProfileName(pub String);

impl TryFrom<String> for ProfileName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if valid_profile_name(&s) {
            Ok(ProfileName(s))
        } else {
            Err(format!("invalid profile name {s:?}"))
        }
    }
}

/// Checks a name used for profiles (file stems).
pub(crate) fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !name.starts_with('-')
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct LandlockAbi(pub u32);

impl TryFrom<u64> for LandlockAbi {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        match u32::try_from(v) {
            Ok(abi @ 1..=MAX_LANDLOCK_ABI) => Ok(LandlockAbi(abi)),
            _ => Err(format!("expected a landlock ABI from 1 to {MAX_LANDLOCK_ABI}, got {v}")),
        }
    }
}

/// An absolute, normalized path, possibly starting with or containing
/// `${VAR}`s.
#[derive(Debug, Clone)]
pub(crate) struct ProfilePath(pub String);

impl TryFrom<String> for ProfilePath {
    type Error = String;
    fn try_from(p: String) -> Result<Self, String> {
        check_vars(&p)?;
        if !(p.starts_with('/') || p.starts_with("${")) {
            return Err(format!(
                "expected an absolute path or one starting with a variable, got {p:?}"
            ));
        }
        if p.contains('\0') {
            return Err("a path may not contain NUL".into());
        }
        if p.len() > 1 && p.ends_with('/') {
            return Err(format!("path {p:?} must not end with '/'"));
        }
        if p == "/" {
            return Err("granting \"/\" would grant the whole host; list the directories instead".into());
        }
        if p.split('/')
            .skip(1)
            .any(|comp| comp.is_empty() || comp == "." || comp == "..")
        {
            return Err(format!(
                "path {p:?} must be normalized (no empty, '.' or '..' components)"
            ));
        }
        Ok(ProfilePath(p))
    }
}

/// Checks `${VAR}` uses in a string.
fn check_vars(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        let Some(body) = after.strip_prefix('{') else {
            return Err(format!(
                "a '$' must start a variable like ${{HOME}}; known variables: {}",
                VARIABLES.join(", ")
            ));
        };
        let Some(end) = body.find('}') else {
            return Err("unterminated variable: expected '}'".into());
        };
        let name = &body[..end];
        if !VARIABLES.contains(&name) {
            return Err(format!(
                "unknown variable ${{{name}}}; expected one of {}",
                VARIABLES.join(", ")
            ));
        }
        rest = &body[end + 1..];
    }
    Ok(())
}

/// A TCP port, 1 to 65535.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Port(pub u16);

impl TryFrom<u64> for Port {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        match u16::try_from(v) {
            Ok(port @ 1..) => Ok(Port(port)),
            _ => Err(format!("expected a TCP port from 1 to 65535, got {v}")),
        }
    }
}

/// A loopback port a worker may listen on: not one of those warden's own
/// listeners take in every worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BindPort(pub u16);

impl TryFrom<u64> for BindPort {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        let Port(port) = Port::try_from(v)?;
        if crate::network::RESERVED_PORTS.contains(&port) {
            return Err(format!(
                "port {port} is taken by warden's proxy or gateway inside every worker (reserved: {:?})",
                crate::network::RESERVED_PORTS
            ));
        }
        Ok(BindPort(port))
    }
}

/// A seccomp group of `sandbox-profiles/seccomp.toml`.
#[derive(Debug, Clone)]
pub(crate) struct GroupName(pub String);

impl TryFrom<String> for GroupName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if seccomp::group(&s).is_some() {
            Ok(GroupName(s))
        } else {
            Err(format!(
                "unknown seccomp group {s:?}; expected one of {}",
                seccomp::group_names().join(", ")
            ))
        }
    }
}

/// A system call known on x86_64 or aarch64.
#[derive(Debug, Clone)]
pub(crate) struct SyscallName(pub String);

impl TryFrom<String> for SyscallName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if seccomp::is_known_syscall(&s) {
            Ok(SyscallName(s))
        } else {
            Err(format!("unknown system call {s:?} (on x86_64 and aarch64)"))
        }
    }
}

/// A system call a profile may allow: known, and not on the never list.
#[derive(Debug, Clone)]
pub(crate) struct AllowedCall(pub String);

impl TryFrom<String> for AllowedCall {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let SyscallName(s) = SyscallName::try_from(s)?;
        match seccomp::never_allowed(&s) {
            Some(why) => Err(format!("system call {s:?} is never allowed by warden: {why}")),
            None => Ok(AllowedCall(s)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Pids(pub u64);

impl TryFrom<u64> for Pids {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        if v == 0 {
            Err("expected a pids limit of at least 1".into())
        } else {
            Ok(Pids(v))
        }
    }
}

/// cgroup v2 CPU weight, 1 to 10000.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuWeight(pub u64);

impl TryFrom<u64> for CpuWeight {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        if (1..=10_000).contains(&v) {
            Ok(CpuWeight(v))
        } else {
            Err("expected a CPU weight from 1 to 10000".into())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RlimitName(pub String);

impl TryFrom<String> for RlimitName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if RLIMITS.contains(&s.as_str()) {
            Ok(RlimitName(s))
        } else {
            Err(format!("unknown rlimit {s:?}; expected one of {}", RLIMITS.join(", ")))
        }
    }
}

/// A number, or "unlimited" (`None`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RlimitValue(pub Option<u64>);

impl<'de> Deserialize<'de> for RlimitValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RlimitValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or \"unlimited\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RlimitValue, E> {
                Ok(RlimitValue(Some(n)))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RlimitValue, E> {
                u64::try_from(n)
                    .map(|n| RlimitValue(Some(n)))
                    .map_err(|_| E::custom(format!("expected a number or \"unlimited\", got {n}")))
            }
            fn visit_str<E: serde::de::Error>(self, w: &str) -> Result<RlimitValue, E> {
                if w == "unlimited" {
                    Ok(RlimitValue(None))
                } else {
                    Err(E::custom(format!("expected a number or \"unlimited\", got {w:?}")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// An environment variable name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct EnvName(pub String);

impl TryFrom<String> for EnvName {
    type Error = String;
    fn try_from(n: String) -> Result<Self, String> {
        let ok = !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(EnvName(n))
        } else {
            Err(format!("invalid variable name {n:?}"))
        }
    }
}

/// An environment value: no NUL, `${VAR}`s known.
#[derive(Debug, Clone)]
pub(crate) struct EnvValue(pub String);

impl TryFrom<String> for EnvValue {
    type Error = String;
    fn try_from(v: String) -> Result<Self, String> {
        check_vars(&v)?;
        if v.contains('\0') {
            return Err("a value may not contain NUL".into());
        }
        Ok(EnvValue(v))
    }
}
