//! Sandbox profiles: the TOML files admins edit (`/etc/warden/profiles/*.toml`,
//! shipped in `sandbox-profiles/` and embedded in the binary).
//!
//! A profile is parsed with unknown keys rejected, validated field by field
//! with the file:line:column of every mistake, then resolved through its
//! `extends` chain into a [`Profile`]: the fully merged policy that
//! [`crate::compile`] turns into a launch spec. Merging is additive: a child's
//! lists extend its parent's and its scalars override them, so a profile can
//! only be made narrower by not extending a wider one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Location, PolicyError};
use crate::seccomp;
use crate::units::{parse_cpu_quota, parse_duration, parse_size};

/// The shipped profiles, embedded so that wardend works with no files in /etc.
pub const EMBEDDED_PROFILES: &[(&str, &str)] = &[
    ("base", include_str!("../../../sandbox-profiles/base.toml")),
    (
        "claude-code",
        include_str!("../../../sandbox-profiles/claude-code.toml"),
    ),
    ("offline", include_str!("../../../sandbox-profiles/offline.toml")),
    ("strict", include_str!("../../../sandbox-profiles/strict.toml")),
];

/// Variables a profile path or environment value may use; they are resolved
/// per worker to paths inside its sandbox.
pub const VARIABLES: &[&str] = &["HOME", "WORKSPACE", "TMP", "USER"];

/// The highest landlock ABI this build knows how to enforce.
pub const MAX_LANDLOCK_ABI: u32 = 7;

const RLIMITS: &[&str] = &[
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

/// One profile file's text and where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    /// A file path, or `embedded:NAME` for the built-in copy.
    pub origin: String,
    pub text: String,
}

// ---------------------------------------------------------------------------
// The file format, exactly as written (with spans for error messages).

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    description: Option<String>,
    extends: Option<Spanned<String>>,
    #[serde(default)]
    landlock: RawLandlock,
    #[serde(default)]
    filesystem: RawFs,
    #[serde(default)]
    network: RawNet,
    #[serde(default)]
    seccomp: RawSeccomp,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    environment: RawEnv,
    claude: Option<RawClaude>,
}

/// `[claude]`: the profile runs the Claude Code CLI headless.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaude {
    permission_mode: Option<Spanned<String>>,
    model: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    allowed_tools: Vec<String>,
    #[serde(default)]
    disallowed_tools: Vec<String>,
    max_turns: Option<u32>,
    append_system_prompt: Option<String>,
    base_url: Option<Spanned<String>>,
    claude_md: Option<String>,
    managed_settings: Option<toml::Table>,
    approval_timeout: Option<Spanned<String>>,
    #[serde(default)]
    auto_allow: Vec<Spanned<String>>,
    #[serde(default)]
    auto_deny: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLandlock {
    min_abi: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFs {
    #[serde(default)]
    read_only: Vec<Spanned<String>>,
    #[serde(default)]
    read_write: Vec<Spanned<String>>,
    #[serde(default)]
    exec: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    mode: Option<Spanned<String>>,
    #[serde(default)]
    tcp_connect: Vec<Spanned<u16>>,
    #[serde(default)]
    tcp_bind: Vec<Spanned<u16>>,
    udp: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeccomp {
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Spanned<String>>,
    memory_swap: Option<Spanned<String>>,
    pids: Option<Spanned<u64>>,
    cpu_quota: Option<Spanned<String>>,
    cpu_weight: Option<Spanned<u64>>,
    tmpfs_size: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    rlimits: BTreeMap<Spanned<String>, Spanned<RawRlimit>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawRlimit {
    Value(u64),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    #[serde(default)]
    pass: Vec<Spanned<String>>,
    #[serde(default)]
    set: BTreeMap<Spanned<String>, Spanned<String>>,
}

// ---------------------------------------------------------------------------
// The resolved model.

/// What a worker may do to a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Access {
    pub fn union(self, o: Access) -> Access {
        Access {
            read: self.read || o.read,
            write: self.write || o.write,
            exec: self.exec || o.exec,
        }
    }
}

/// A path (possibly with `${VAR}`s) and what the worker may do beneath it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRule {
    pub path: String,
    pub access: Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A fresh network namespace with only a loopback interface.
    None,
    /// The host's network, with TCP limited by landlock to the listed ports.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    pub tcp_connect: BTreeSet<u16>,
    pub tcp_bind: BTreeSet<u16>,
    /// UDP sockets (DNS). Landlock cannot restrict UDP by port, so this is
    /// all or nothing, enforced by seccomp on `socket(2)`.
    pub udp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPolicy {
    pub groups: BTreeSet<String>,
    pub allow: BTreeSet<String>,
    pub deny: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory: Option<u64>,
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    /// Microseconds of CPU per 100 ms period.
    pub cpu_quota_us: Option<u64>,
    /// 1..=10000, cgroup v2 semantics (v1 shares are derived from it).
    pub cpu_weight: Option<u64>,
    pub tmpfs_size: u64,
    pub timeout_secs: Option<u64>,
    /// rlimit name to value; `None` means unlimited.
    pub rlimits: BTreeMap<String, Option<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPolicy {
    /// Variables a spawn request may set.
    pub pass: BTreeSet<String>,
    /// Fixed values (may use `${VAR}`s).
    pub set: BTreeMap<String, String>,
}

/// Claude Code's permission modes, as its `--permission-mode` takes them.
/// Ordered from the mode that asks most to the one that asks least.
pub const PERMISSION_MODES: &[&str] = &["plan", "default", "acceptEdits", "bypassPermissions"];

/// How a `[claude]` profile runs the Claude Code CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaudePolicy {
    pub permission_mode: String,
    pub model: Option<String>,
    /// Further models a spawn request may choose.
    pub models: Vec<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub max_turns: Option<u32>,
    pub append_system_prompt: Option<String>,
    /// `ANTHROPIC_BASE_URL`; its port is added to the TCP connect ports.
    pub base_url: Option<String>,
    /// Placed as CLAUDE.md in a workspace that has none.
    pub claude_md: Option<String>,
    /// Claude Code's managed settings (JSON), mounted read-only at
    /// `/etc/claude-code/managed-settings.json`.
    pub managed_settings: Option<String>,
    /// An approval nobody answers within this is a deny.
    pub approval_timeout_secs: u64,
    /// Tool calls decided without asking: `Tool` or `Tool(glob)`, the glob
    /// (`*` only) matched against the call's command or file path. Deny
    /// rules win.
    pub auto_allow: Vec<String>,
    pub auto_deny: Vec<String>,
}

impl ClaudePolicy {
    /// The CLI arguments this policy stands for (after the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        a.push(self.permission_mode.clone());
        if let Some(m) = &self.model {
            a.extend(["--model".into(), m.clone()]);
        }
        if let Some(n) = self.max_turns {
            a.extend(["--max-turns".into(), n.to_string()]);
        }
        if !self.allowed_tools.is_empty() {
            a.push("--allowedTools".into());
            a.extend(self.allowed_tools.iter().cloned());
        }
        if !self.disallowed_tools.is_empty() {
            a.push("--disallowedTools".into());
            a.extend(self.disallowed_tools.iter().cloned());
        }
        if let Some(p) = &self.append_system_prompt {
            a.extend(["--append-system-prompt".into(), p.clone()]);
        }
        if self.asks() {
            // Permission prompts arrive on stdout as control requests, which
            // wardend answers (see `Workers.Approve`).
            a.extend(["--permission-prompt-tool".into(), "stdio".into()]);
        }
        a
    }

    /// Tool calls need approval (any mode but bypassPermissions).
    pub fn asks(&self) -> bool {
        self.permission_mode != "bypassPermissions"
    }
}

/// What a spawn request asks of a `[claude]` profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaudeRequest {
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub disallowed_tools: Vec<String>,
    pub append_system_prompt: Option<String>,
    pub permission_mode: Option<String>,
}

impl ClaudePolicy {
    /// This policy narrowed by a request; an option that would widen it is
    /// an error naming the option.
    pub fn narrowed(&self, r: &ClaudeRequest) -> Result<ClaudePolicy, String> {
        let mut p = self.clone();
        if let Some(m) = &r.model {
            if p.model.as_ref() != Some(m) && !p.models.contains(m) {
                return Err(format!("model {m:?} is not one the profile allows"));
            }
            p.model = Some(m.clone());
        }
        if let Some(n) = r.max_turns {
            if p.max_turns.is_some_and(|max| n > max) {
                return Err(format!(
                    "max_turns {n} exceeds the profile's {}",
                    p.max_turns.unwrap_or(0)
                ));
            }
            p.max_turns = Some(n);
        }
        for t in &r.disallowed_tools {
            if t.is_empty() || t.starts_with('-') {
                return Err(format!("invalid tool name {t:?}"));
            }
            p.disallowed_tools.push(t.clone());
        }
        if let Some(extra) = &r.append_system_prompt {
            p.append_system_prompt = Some(match &p.append_system_prompt {
                Some(base) => format!("{base}\n\n{extra}"),
                None => extra.clone(),
            });
        }
        if let Some(m) = &r.permission_mode {
            let rank = |m: &str| PERMISSION_MODES.iter().position(|x| *x == m);
            let (Some(asked), Some(own)) = (rank(m), rank(&p.permission_mode)) else {
                return Err(format!("unknown permission mode {m:?}"));
            };
            // PERMISSION_MODES is ordered from most to least asking.
            if asked > own {
                return Err(format!(
                    "permission mode {m:?} asks less than the profile's {:?}",
                    p.permission_mode
                ));
            }
            p.permission_mode = m.clone();
        }
        Ok(p)
    }

    /// The rule that decides a tool call without asking, if any:
    /// `(allow, rule)`.
    pub fn rule_for(&self, tool: &str, input: &serde_json::Value) -> Option<(bool, String)> {
        let subject = ["command", "file_path", "path", "url", "pattern"]
            .iter()
            .find_map(|k| input.get(*k).and_then(|v| v.as_str()))
            .map(str::to_string)
            .unwrap_or_else(|| input.to_string());
        let matches = |rule: &String| match parse_tool_rule(rule) {
            Ok((name, None)) => name == tool,
            Ok((name, Some(glob))) => name == tool && glob_match(glob, &subject),
            Err(_) => false,
        };
        if let Some(r) = self.auto_deny.iter().find(|r| matches(r)) {
            return Some((false, r.clone()));
        }
        self.auto_allow.iter().find(|r| matches(r)).map(|r| (true, r.clone()))
    }
}

/// `Tool` or `Tool(glob)`.
fn parse_tool_rule(rule: &str) -> Result<(&str, Option<&str>), String> {
    let (name, glob) = match rule.split_once('(') {
        Some((n, rest)) => match rest.strip_suffix(')') {
            Some(g) => (n, Some(g)),
            None => return Err(format!("{rule:?}: expected Tool or Tool(pattern)")),
        },
        None => (rule, None),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("{rule:?}: expected Tool or Tool(pattern)"));
    }
    Ok((name, glob))
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(glob: &str, text: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

/// The port of an `http://` or `https://` URL (explicit or the scheme's).
pub fn url_port(url: &str) -> Result<u16, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no host (or has credentials in it)"));
    }
    match authority.rsplit_once(':') {
        Some((_, port)) if !authority.ends_with(']') => port
            .parse()
            .map_err(|_| format!("{url:?} has an invalid port {port:?}")),
        _ => Ok(default),
    }
}

/// A profile with its `extends` chain merged and every field validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub origin: String,
    pub description: String,
    /// The profiles this one extends, nearest first.
    pub extends: Vec<String>,
    pub landlock_min_abi: u32,
    pub filesystem: Vec<FsRule>,
    pub network: NetworkPolicy,
    pub seccomp: SeccompPolicy,
    pub limits: Limits,
    pub environment: EnvPolicy,
    /// Set when the profile runs Claude Code.
    pub claude: Option<ClaudePolicy>,
}

// ---------------------------------------------------------------------------
// Parsing and per-file validation.

struct Parsed {
    source: Source,
    raw: RawProfile,
}

impl Parsed {
    fn at(&self, span: std::ops::Range<usize>) -> Location {
        Location::from_offset(&self.source.origin, &self.source.text, span.start)
    }

    fn invalid(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            at: self.at(span),
            message: message.into(),
        }
    }
}

fn parse(source: Source) -> Result<Parsed, PolicyError> {
    let raw: RawProfile = toml::from_str(&source.text).map_err(|e| PolicyError::Invalid {
        at: Location::from_offset(&source.origin, &source.text, e.span().map_or(0, |s| s.start)),
        message: e.message().trim().to_string(),
    })?;
    let parsed = Parsed { source, raw };
    validate_file(&parsed)?;
    Ok(parsed)
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

/// Checks `${VAR}` uses in a string; returns a message on error.
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

fn check_path(p: &str) -> Result<(), String> {
    check_vars(p)?;
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
    for comp in p.split('/').skip(1) {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(format!(
                "path {p:?} must be normalized (no empty, '.' or '..' components)"
            ));
        }
    }
    Ok(())
}

fn check_env_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn validate_file(p: &Parsed) -> Result<(), PolicyError> {
    let r = &p.raw;
    if let Some(e) = &r.extends {
        if !valid_profile_name(e.get_ref()) {
            return Err(p.invalid(e.span(), format!("invalid profile name {:?}", e.get_ref())));
        }
    }
    if let Some(abi) = &r.landlock.min_abi {
        let v = *abi.get_ref();
        if v == 0 || v > MAX_LANDLOCK_ABI {
            return Err(p.invalid(
                abi.span(),
                format!("expected a landlock ABI from 1 to {MAX_LANDLOCK_ABI}, got {v}"),
            ));
        }
    }
    for path in r
        .filesystem
        .read_only
        .iter()
        .chain(&r.filesystem.read_write)
        .chain(&r.filesystem.exec)
    {
        check_path(path.get_ref()).map_err(|m| p.invalid(path.span(), m))?;
    }
    if let Some(mode) = &r.network.mode {
        if !matches!(mode.get_ref().as_str(), "none" | "tcp") {
            return Err(p.invalid(
                mode.span(),
                format!("expected network mode \"none\" or \"tcp\", got {:?}", mode.get_ref()),
            ));
        }
    }
    for port in r.network.tcp_connect.iter().chain(&r.network.tcp_bind) {
        if *port.get_ref() == 0 {
            return Err(p.invalid(port.span(), "expected a TCP port from 1 to 65535, got 0"));
        }
    }
    for g in &r.seccomp.groups {
        if seccomp::group(g.get_ref()).is_none() {
            return Err(p.invalid(
                g.span(),
                format!(
                    "unknown seccomp group {:?}; expected one of {}",
                    g.get_ref(),
                    seccomp::group_names().join(", ")
                ),
            ));
        }
    }
    for s in r.seccomp.allow.iter().chain(&r.seccomp.deny) {
        if !seccomp::is_known_syscall(s.get_ref()) {
            return Err(p.invalid(
                s.span(),
                format!("unknown system call {:?} (on x86_64 and aarch64)", s.get_ref()),
            ));
        }
    }
    for s in &r.seccomp.allow {
        if let Some(why) = seccomp::never_allowed(s.get_ref()) {
            return Err(p.invalid(
                s.span(),
                format!("system call {:?} is never allowed by warden: {why}", s.get_ref()),
            ));
        }
    }
    let l = &r.limits;
    for s in [&l.memory, &l.memory_swap, &l.tmpfs_size].into_iter().flatten() {
        parse_size(s.get_ref()).map_err(|m| p.invalid(s.span(), m))?;
    }
    if let Some(q) = &l.cpu_quota {
        parse_cpu_quota(q.get_ref()).map_err(|m| p.invalid(q.span(), m))?;
    }
    if let Some(t) = &l.timeout {
        parse_duration(t.get_ref()).map_err(|m| p.invalid(t.span(), m))?;
    }
    if let Some(w) = &l.cpu_weight {
        if !(1..=10_000).contains(w.get_ref()) {
            return Err(p.invalid(w.span(), "expected a CPU weight from 1 to 10000"));
        }
    }
    if let Some(n) = &l.pids {
        if *n.get_ref() == 0 {
            return Err(p.invalid(n.span(), "expected a pids limit of at least 1"));
        }
    }
    for (name, value) in &l.rlimits {
        if !RLIMITS.contains(&name.get_ref().as_str()) {
            return Err(p.invalid(
                name.span(),
                format!(
                    "unknown rlimit {:?}; expected one of {}",
                    name.get_ref(),
                    RLIMITS.join(", ")
                ),
            ));
        }
        if let RawRlimit::Word(w) = value.get_ref() {
            if w != "unlimited" {
                return Err(p.invalid(value.span(), format!("expected a number or \"unlimited\", got {w:?}")));
            }
        }
    }
    if let Some(c) = &r.claude {
        if let Some(m) = &c.permission_mode {
            if !PERMISSION_MODES.contains(&m.get_ref().as_str()) {
                return Err(p.invalid(
                    m.span(),
                    format!(
                        "unknown permission mode {:?}; expected one of {}",
                        m.get_ref(),
                        PERMISSION_MODES.join(", ")
                    ),
                ));
            }
        }
        if let Some(u) = &c.base_url {
            url_port(u.get_ref()).map_err(|m| p.invalid(u.span(), m))?;
        }
        if let Some(t) = &c.approval_timeout {
            parse_duration(t.get_ref()).map_err(|m| p.invalid(t.span(), m.to_string()))?;
        }
        for r in c.auto_allow.iter().chain(&c.auto_deny) {
            parse_tool_rule(r.get_ref()).map_err(|m| p.invalid(r.span(), m))?;
        }
    }
    for n in &r.environment.pass {
        if !check_env_name(n.get_ref()) {
            return Err(p.invalid(n.span(), format!("invalid variable name {:?}", n.get_ref())));
        }
    }
    for (n, v) in &r.environment.set {
        if !check_env_name(n.get_ref()) {
            return Err(p.invalid(n.span(), format!("invalid variable name {:?}", n.get_ref())));
        }
        check_vars(v.get_ref()).map_err(|m| p.invalid(v.span(), m))?;
        if v.get_ref().contains('\0') {
            return Err(p.invalid(v.span(), "a value may not contain NUL"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Resolution.

fn empty_profile(name: &str, origin: &str) -> Profile {
    Profile {
        name: name.to_string(),
        origin: origin.to_string(),
        description: String::new(),
        extends: Vec::new(),
        landlock_min_abi: 1,
        filesystem: Vec::new(),
        network: NetworkPolicy {
            mode: NetworkMode::None,
            tcp_connect: BTreeSet::new(),
            tcp_bind: BTreeSet::new(),
            udp: false,
        },
        seccomp: SeccompPolicy {
            groups: BTreeSet::new(),
            allow: BTreeSet::new(),
            deny: BTreeSet::new(),
        },
        limits: Limits {
            memory: None,
            memory_swap: None,
            pids: None,
            cpu_quota_us: None,
            cpu_weight: None,
            tmpfs_size: 64 << 20,
            timeout_secs: None,
            rlimits: BTreeMap::new(),
        },
        environment: EnvPolicy {
            pass: BTreeSet::new(),
            set: BTreeMap::new(),
        },
        claude: None,
    }
}

/// Applies one file on top of the profile it extends. All values were
/// validated by [`validate_file`], so parsing them again cannot fail.
fn merge(base: &mut Profile, r: &RawProfile) {
    if let Some(d) = &r.description {
        base.description = d.clone();
    }
    if let Some(abi) = &r.landlock.min_abi {
        base.landlock_min_abi = *abi.get_ref();
    }
    let mut add = |paths: &[Spanned<String>], access: Access| {
        for p in paths {
            match base.filesystem.iter_mut().find(|r| r.path == *p.get_ref()) {
                Some(rule) => rule.access = rule.access.union(access),
                None => base.filesystem.push(FsRule {
                    path: p.get_ref().clone(),
                    access,
                }),
            }
        }
    };
    let ro = Access {
        read: true,
        ..Access::default()
    };
    add(&r.filesystem.read_only, ro);
    add(&r.filesystem.read_write, Access { write: true, ..ro });
    add(&r.filesystem.exec, Access { exec: true, ..ro });
    if let Some(m) = &r.network.mode {
        base.network.mode = if m.get_ref() == "none" {
            NetworkMode::None
        } else {
            NetworkMode::Tcp
        };
    }
    base.network
        .tcp_connect
        .extend(r.network.tcp_connect.iter().map(|p| *p.get_ref()));
    base.network
        .tcp_bind
        .extend(r.network.tcp_bind.iter().map(|p| *p.get_ref()));
    if let Some(u) = r.network.udp {
        base.network.udp = u;
    }
    base.seccomp
        .groups
        .extend(r.seccomp.groups.iter().map(|g| g.get_ref().clone()));
    base.seccomp
        .allow
        .extend(r.seccomp.allow.iter().map(|g| g.get_ref().clone()));
    base.seccomp
        .deny
        .extend(r.seccomp.deny.iter().map(|g| g.get_ref().clone()));
    let l = &r.limits;
    let size = |s: &Spanned<String>| parse_size(s.get_ref()).unwrap_or(0);
    if let Some(v) = &l.memory {
        base.limits.memory = Some(size(v));
    }
    if let Some(v) = &l.memory_swap {
        base.limits.memory_swap = Some(size(v));
    }
    if let Some(v) = &l.tmpfs_size {
        base.limits.tmpfs_size = size(v);
    }
    if let Some(v) = &l.pids {
        base.limits.pids = Some(*v.get_ref());
    }
    if let Some(v) = &l.cpu_quota {
        base.limits.cpu_quota_us = parse_cpu_quota(v.get_ref()).ok();
    }
    if let Some(v) = &l.cpu_weight {
        base.limits.cpu_weight = Some(*v.get_ref());
    }
    if let Some(v) = &l.timeout {
        base.limits.timeout_secs = parse_duration(v.get_ref()).ok();
    }
    for (n, v) in &l.rlimits {
        let value = match v.get_ref() {
            RawRlimit::Value(x) => Some(*x),
            RawRlimit::Word(_) => None,
        };
        base.limits.rlimits.insert(n.get_ref().clone(), value);
    }
    base.environment
        .pass
        .extend(r.environment.pass.iter().map(|n| n.get_ref().clone()));
    for (n, v) in &r.environment.set {
        base.environment.set.insert(n.get_ref().clone(), v.get_ref().clone());
    }
    if let Some(c) = &r.claude {
        let claude = base.claude.get_or_insert_with(|| ClaudePolicy {
            permission_mode: "bypassPermissions".into(),
            model: None,
            models: Vec::new(),
            allowed_tools: Vec::new(),
            disallowed_tools: Vec::new(),
            max_turns: None,
            append_system_prompt: None,
            base_url: None,
            claude_md: None,
            managed_settings: None,
            approval_timeout_secs: 55,
            auto_allow: Vec::new(),
            auto_deny: Vec::new(),
        });
        if let Some(t) = &c.approval_timeout {
            claude.approval_timeout_secs = parse_duration(t.get_ref()).unwrap_or(55);
        }
        claude
            .auto_allow
            .extend(c.auto_allow.iter().map(|r| r.get_ref().clone()));
        claude.auto_deny.extend(c.auto_deny.iter().map(|r| r.get_ref().clone()));
        if let Some(m) = &c.permission_mode {
            claude.permission_mode = m.get_ref().clone();
        }
        if c.model.is_some() {
            claude.model = c.model.clone();
        }
        claude.models.extend(c.models.iter().cloned());
        claude.allowed_tools.extend(c.allowed_tools.iter().cloned());
        claude.disallowed_tools.extend(c.disallowed_tools.iter().cloned());
        if c.max_turns.is_some() {
            claude.max_turns = c.max_turns;
        }
        if c.append_system_prompt.is_some() {
            claude.append_system_prompt = c.append_system_prompt.clone();
        }
        if let Some(u) = &c.base_url {
            claude.base_url = Some(u.get_ref().clone());
            if let Ok(port) = url_port(u.get_ref()) {
                base.network.tcp_connect.insert(port);
            }
        }
        if c.claude_md.is_some() {
            claude.claude_md = c.claude_md.clone();
        }
        if let Some(t) = &c.managed_settings {
            claude.managed_settings = serde_json::to_string_pretty(t).ok();
        }
    }
}

/// Checks the merged result: a profile that would give an unenforced or
/// useless sandbox is an error, never a silently weaker one.
fn validate_resolved(p: &Parsed, prof: &Profile) -> Result<(), PolicyError> {
    let whole = 0..0;
    if prof.seccomp.groups.is_empty() && prof.seccomp.allow.is_empty() {
        return Err(p.invalid(whole, "the seccomp allowlist is empty: list groups in [seccomp] groups"));
    }
    if !prof.filesystem.iter().any(|r| r.access.exec) {
        return Err(p.invalid(
            0..0,
            "no path is executable: a worker could not start; add [filesystem] exec paths",
        ));
    }
    if let (Some(m), Some(s)) = (prof.limits.memory, prof.limits.memory_swap) {
        if s < m {
            let span = p.raw.limits.memory_swap.as_ref().map_or(0..0, |s| s.span());
            return Err(p.invalid(span, "memory_swap (memory plus swap) must be at least memory"));
        }
    }
    if prof.network.mode == NetworkMode::Tcp && prof.landlock_min_abi < 4 {
        let span = p.raw.network.mode.as_ref().map_or(0..0, |s| s.span());
        return Err(p.invalid(
            span,
            "network mode \"tcp\" is enforced by landlock ABI 4 or later: set [landlock] min_abi = 4 or more",
        ));
    }
    Ok(())
}

/// All loaded profiles, resolved. Cheap to clone; swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Profile>,
}

impl ProfileSet {
    /// The profiles embedded in the binary.
    pub fn embedded() -> Result<Self, PolicyError> {
        Self::from_sources(embedded_sources())
    }

    /// The embedded profiles, overridden and extended by the `*.toml` files
    /// of `dir` (a file named like an embedded profile replaces it).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let mut sources: BTreeMap<String, Source> =
            embedded_sources().into_iter().map(|s| (s.name.clone(), s)).collect();
        let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| PolicyError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let source = read_source(&path)?;
            sources.insert(source.name.clone(), source);
        }
        Self::from_sources(sources.into_values().collect())
    }

    /// Parses, validates and resolves a set of sources. One bad source fails
    /// the whole set, so a reload never half-applies.
    pub fn from_sources(sources: Vec<Source>) -> Result<Self, PolicyError> {
        let mut parsed = BTreeMap::new();
        for s in sources {
            if !valid_profile_name(&s.name) {
                return Err(PolicyError::Invalid {
                    at: Location {
                        origin: s.origin.clone(),
                        line: 1,
                        column: 1,
                    },
                    message: format!(
                        "invalid profile name {:?}: use lowercase letters, digits, '-' and '_'",
                        s.name
                    ),
                });
            }
            let p = parse(s)?;
            parsed.insert(p.source.name.clone(), p);
        }
        let mut profiles = BTreeMap::new();
        for name in parsed.keys() {
            profiles.insert(name.clone(), resolve(name, &parsed, &BTreeMap::new())?);
        }
        Ok(ProfileSet { profiles })
    }

    /// Validates one file as it would resolve within this set, without
    /// changing the set (`wardenctl profile check FILE`).
    pub fn check(&self, source: Source) -> Result<Profile, PolicyError> {
        let name = source.name.clone();
        let mut parsed = BTreeMap::new();
        parsed.insert(name.clone(), parse(source)?);
        resolve(&name, &parsed, &self.profiles)
    }

    pub fn get(&self, name: &str) -> Result<&Profile, PolicyError> {
        self.profiles
            .get(name)
            .ok_or_else(|| PolicyError::UnknownProfile(name.to_string()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }
}

/// Reads one profile file; its name is the file stem.
pub fn read_source(path: &Path) -> Result<Source, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    Ok(Source {
        name,
        origin: path.display().to_string(),
        text,
    })
}

fn embedded_sources() -> Vec<Source> {
    EMBEDDED_PROFILES
        .iter()
        .map(|(name, text)| Source {
            name: (*name).to_string(),
            origin: format!("embedded:{name}.toml"),
            text: (*text).to_string(),
        })
        .collect()
}

/// Resolves `name` through its extends chain. Parents are looked up first
/// among `parsed`, then among already-resolved `known` profiles.
fn resolve(
    name: &str,
    parsed: &BTreeMap<String, Parsed>,
    known: &BTreeMap<String, Profile>,
) -> Result<Profile, PolicyError> {
    let leaf = &parsed[name];
    // Walk up the chain, collecting the files to apply (leaf last).
    let mut chain: Vec<&Parsed> = vec![leaf];
    let mut base: Option<Profile> = None;
    let mut current = leaf;
    while let Some(parent) = &current.raw.extends {
        let pname = parent.get_ref();
        if chain.iter().any(|p| &p.source.name == pname) {
            return Err(current.invalid(
                parent.span(),
                format!("profile {pname:?} extends itself through {name:?}"),
            ));
        }
        if let Some(p) = parsed.get(pname) {
            chain.push(p);
            current = p;
        } else if let Some(p) = known.get(pname) {
            base = Some(p.clone());
            break;
        } else {
            return Err(current.invalid(parent.span(), format!("profile extends unknown profile {pname:?}")));
        }
    }
    let mut prof = base.unwrap_or_else(|| empty_profile(name, &leaf.source.origin));
    let mut ancestors: Vec<String> = chain[1..].iter().map(|p| p.source.name.clone()).collect();
    if !prof.name.is_empty() && prof.name != name {
        ancestors.push(prof.name.clone());
        ancestors.extend(prof.extends.iter().cloned());
    }
    for p in chain.iter().rev() {
        merge(&mut prof, &p.raw);
    }
    prof.name = name.to_string();
    prof.origin = leaf.source.origin.clone();
    prof.extends = ancestors;
    validate_resolved(leaf, &prof)?;
    Ok(prof)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, text: &str) -> Source {
        Source {
            name: name.into(),
            origin: format!("{name}.toml"),
            text: text.into(),
        }
    }

    const MINIMAL: &str = r#"
[filesystem]
exec = ["/usr"]
[seccomp]
groups = ["default"]
"#;

    fn err_of(sources: Vec<Source>) -> String {
        ProfileSet::from_sources(sources).unwrap_err().to_string()
    }

    #[test]
    fn claude_section_resolves_rules_port_and_arguments() {
        let text = format!(
            "{MINIMAL}[landlock]\nmin_abi = 4\n[network]\nmode = \"tcp\"\ntcp_connect = [443]\n[claude]\npermission_mode = \"default\"\n\
             model = \"m1\"\nmodels = [\"m2\"]\nmax_turns = 20\nbase_url = \"http://127.0.0.1:8089/x\"\n\
             approval_timeout = \"30s\"\nauto_allow = [\"Read\", \"Bash(git status*)\"]\nauto_deny = [\"Bash(*rm -rf*)\"]\n"
        );
        let set = ProfileSet::from_sources(vec![src("c", &text)]).unwrap();
        let p = set.get("c").unwrap();
        assert_eq!(
            p.network.tcp_connect.iter().copied().collect::<Vec<_>>(),
            vec![443, 8089]
        );
        let c = p.claude.as_ref().unwrap();
        assert_eq!(c.approval_timeout_secs, 30);
        let args = c.args().join(" ");
        assert!(
            args.contains("--permission-mode default --model m1 --max-turns 20"),
            "{args}"
        );
        assert!(args.ends_with("--permission-prompt-tool stdio"), "{args}");
        let cmd = |c: &str| serde_json::json!({"command": c});
        assert_eq!(
            c.rule_for("Read", &serde_json::json!({"file_path": "/x"})),
            Some((true, "Read".into()))
        );
        assert_eq!(
            c.rule_for("Bash", &cmd("git status --short")),
            Some((true, "Bash(git status*)".into()))
        );
        assert_eq!(
            c.rule_for("Bash", &cmd("cd / && rm -rf x")),
            Some((false, "Bash(*rm -rf*)".into()))
        );
        assert_eq!(c.rule_for("Bash", &cmd("git push")), None);
        assert_eq!(c.rule_for("Write", &serde_json::json!({"file_path": "/x"})), None);

        // A request may narrow, never widen.
        let ok = c
            .narrowed(&ClaudeRequest {
                model: Some("m2".into()),
                max_turns: Some(5),
                permission_mode: Some("plan".into()),
                ..ClaudeRequest::default()
            })
            .unwrap();
        assert_eq!(
            (ok.model.as_deref(), ok.max_turns, ok.permission_mode.as_str()),
            (Some("m2"), Some(5), "plan")
        );
        for (r, want) in [
            (
                ClaudeRequest {
                    model: Some("m9".into()),
                    ..Default::default()
                },
                "model",
            ),
            (
                ClaudeRequest {
                    max_turns: Some(21),
                    ..Default::default()
                },
                "max_turns",
            ),
            (
                ClaudeRequest {
                    permission_mode: Some("bypassPermissions".into()),
                    ..Default::default()
                },
                "asks less",
            ),
        ] {
            let e = c.narrowed(&r).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn claude_section_errors_name_the_place() {
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\npermission_mode = \"yolo\"\n"),
        )]);
        assert!(e.starts_with("c.toml:7:19: unknown permission mode"), "{e}");
        let e = err_of(vec![src("c", &format!("{MINIMAL}[claude]\nbase_url = \"ftp://x\"\n"))]);
        assert!(e.contains("c.toml:7:") && e.contains("not an http"), "{e}");
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\nauto_allow = [\"Bash(x\"]\n"),
        )]);
        assert!(e.contains("expected Tool or Tool(pattern)"), "{e}");
        assert_eq!(url_port("https://api.example.com/v1"), Ok(443));
        assert_eq!(url_port("http://[::1]:9000"), Ok(9000));
        assert!(url_port("http://user@host:1").is_err());
    }

    #[test]
    fn unknown_key_is_rejected_with_line_and_column() {
        let e = err_of(vec![src("a", "[filesystem]\nread_only = []\nwritable = [\"/x\"]\n")]);
        assert!(e.starts_with("a.toml:3:1: unknown field `writable`"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn bad_types_and_values_point_at_the_value() {
        let e = err_of(vec![src("a", &format!("{MINIMAL}[limits]\nmemory = \"lots\"\n"))]);
        assert!(e.starts_with("a.toml:7:10: expected a size"), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\ntcp_connect = [70000]\n"))]);
        assert!(e.starts_with("a.toml:7:16:"), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\nmode = \"open\"\n"))]);
        assert!(e.contains("expected network mode \"none\" or \"tcp\""), "{e}");
    }

    #[test]
    fn paths_are_checked() {
        for (bad, msg) in [
            ("relative/x", "expected an absolute path"),
            ("/usr/../etc", "must be normalized"),
            ("/usr//lib", "must be normalized"),
            ("${NOPE}/x", "unknown variable ${NOPE}"),
            ("/", "whole host"),
        ] {
            let e = err_of(vec![src("a", &format!("[filesystem]\nread_only = [\"{bad}\"]\n"))]);
            assert!(e.starts_with("a.toml:2:14:"), "{bad}: {e}");
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn seccomp_names_are_checked_and_dangerous_calls_refused() {
        let e = err_of(vec![src("a", "[seccomp]\ngroups = [\"nope\"]\n")]);
        assert!(e.contains("unknown seccomp group \"nope\""), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\nallow = [\"frobnicate\"]\n")]);
        assert!(e.contains("unknown system call \"frobnicate\""), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\nallow = [\"ptrace\"]\n")]);
        assert!(e.contains("never allowed by warden"), "{e}");
    }

    #[test]
    fn empty_or_useless_profiles_are_errors() {
        let e = err_of(vec![src("a", "[filesystem]\nexec = [\"/usr\"]\n")]);
        assert!(e.contains("seccomp allowlist is empty"), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\ngroups = [\"default\"]\n")]);
        assert!(e.contains("no path is executable"), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\nmode = \"tcp\"\n"))]);
        assert!(e.contains("landlock ABI 4"), "{e}");
    }

    #[test]
    fn extends_merges_lists_and_overrides_scalars() {
        let set = ProfileSet::from_sources(vec![
            src("parent", &format!("{MINIMAL}[limits]\npids = 10\nmemory = \"1G\"\n")),
            src(
                "child",
                "extends = \"parent\"\n[filesystem]\nread_only = [\"/etc\"]\nexec = [\"/etc\"]\n[limits]\npids = 5\n",
            ),
        ])
        .unwrap();
        let c = set.get("child").unwrap();
        assert_eq!(c.extends, vec!["parent".to_string()]);
        assert_eq!(c.limits.pids, Some(5));
        assert_eq!(c.limits.memory, Some(1 << 30));
        assert_eq!(c.filesystem.len(), 2);
        let etc = c.filesystem.iter().find(|r| r.path == "/etc").unwrap();
        assert!(etc.access.read && etc.access.exec && !etc.access.write);
    }

    #[test]
    fn extends_errors() {
        let e = err_of(vec![src("a", "extends = \"ghost\"\n")]);
        assert!(
            e.starts_with("a.toml:1:11: profile extends unknown profile \"ghost\""),
            "{e}"
        );
        let e = err_of(vec![src("a", "extends = \"b\"\n"), src("b", "extends = \"a\"\n")]);
        assert!(e.contains("extends itself"), "{e}");
    }

    #[test]
    fn check_resolves_against_the_loaded_set() {
        let set = ProfileSet::embedded().unwrap();
        let p = set
            .check(src("mine", "extends = \"claude-code\"\n[limits]\npids = 64\n"))
            .unwrap();
        assert_eq!(p.limits.pids, Some(64));
        assert!(p.extends.contains(&"claude-code".to_string()));
        assert!(p.extends.contains(&"base".to_string()));
        let e = set
            .check(src("mine", "extends = \"claude-code\"\nbogus = 1\n"))
            .unwrap_err();
        assert!(e.to_string().starts_with("mine.toml:2:1: unknown field `bogus`"), "{e}");
    }

    #[test]
    fn load_dir_overrides_embedded_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("strict.toml"),
            "extends = \"base\"\ndescription = \"site strict\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a profile").unwrap();
        let set = ProfileSet::load_dir(dir.path()).unwrap();
        assert_eq!(set.get("strict").unwrap().description, "site strict");
        assert!(set.get("claude-code").is_ok());
        std::fs::write(dir.path().join("bad.toml"), "[limits]\npids = \"many\"\n").unwrap();
        let e = ProfileSet::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.toml:2:8:"), "{e}");
    }
}
