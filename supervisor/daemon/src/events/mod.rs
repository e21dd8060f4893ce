//! Events: everything that happens to workers and to the daemon, numbered,
//! written to the audit log, then published to subscribers.
//!
//! Owns: the event model (this file), and the bus ([`bus`]): sequence
//! assignment, the one writer that makes events durable in batches, the
//! audit budget per user, the live broadcast and chunked replay for
//! `Events.Watch`.
//!
//! Must never: publish before the audit log has the event on disk, let a
//! slow subscriber slow the daemon, or carry a field of unbounded size (a
//! tenant's strings are clipped with [`clip`], large inputs summarised
//! with [`Truncated`]).

pub mod bus;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use bus::{Events, Settings, Written};

/// Milliseconds since the Unix epoch: how every time in an event, a worker
/// record and the API is given.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Exited,
    Killed,
    Stopped,
    TimedOut,
    Oom,
    /// Its daemon died while it ran; the next one cleaned it up.
    Lost,
}

impl ExitReason {
    /// Its name, as in the log (`timed_out`).
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Exited => "exited",
            ExitReason::Killed => "killed",
            ExitReason::Stopped => "stopped",
            ExitReason::TimedOut => "timed_out",
            ExitReason::Oom => "oom",
            ExitReason::Lost => "lost",
        }
    }
}

/// How a destination was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetProtocol {
    /// HTTP CONNECT (a tunnel, usually TLS).
    Connect,
    /// An absolute-form plain HTTP request.
    Http,
    /// A SOCKS5 CONNECT.
    Socks,
    /// A request to the worker's Anthropic API gateway.
    Gateway,
}

impl NetProtocol {
    /// Its name, as in the log.
    pub fn name(self) -> &'static str {
        match self {
            NetProtocol::Connect => "connect",
            NetProtocol::Http => "http",
            NetProtocol::Socks => "socks",
            NetProtocol::Gateway => "gateway",
        }
    }
}

/// Traffic to one destination host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTraffic {
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A worker's allowed traffic, per destination host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetUsage {
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Destinations refused (reported or suppressed).
    pub denials: u64,
    /// Per destination host; past [`MAX_HOSTS`] hosts, the rest add up
    /// under `(other)`.
    pub hosts: BTreeMap<String, HostTraffic>,
}

/// Hosts counted one by one per worker (the map a worker can grow).
pub const MAX_HOSTS: usize = 256;

impl NetUsage {
    /// Adds one closed connection to `host`.
    pub fn add(&mut self, host: &str, up: u64, down: u64) {
        self.connections += 1;
        self.bytes_up += up;
        self.bytes_down += down;
        let key = if self.hosts.len() < MAX_HOSTS || self.hosts.contains_key(host) {
            host
        } else {
            "(other)"
        };
        let t = self.hosts.entry(key.to_string()).or_default();
        t.connections += 1;
        t.bytes_up += up;
        t.bytes_down += down;
    }

    /// The totals without the per-host detail (for resource samples).
    pub fn totals(&self) -> NetUsage {
        NetUsage {
            hosts: BTreeMap::new(),
            ..self.clone()
        }
    }
}

/// One event. `worker` and `user` are set where they apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The end of a stage of a spawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    /// Microseconds since the spawn request arrived.
    pub us: u64,
}

/// A user's tree on disk: its use and its project's limits (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    pub bytes: u64,
    pub files: u64,
    pub limit_bytes: u64,
    pub limit_files: u64,
}

impl From<crate::sys::ProjectQuota> for DiskUse {
    fn from(q: crate::sys::ProjectQuota) -> Self {
        DiskUse {
            bytes: q.bytes,
            files: q.files,
            limit_bytes: q.bytes_limit,
            limit_files: q.files_limit,
        }
    }
}

impl DiskUse {
    /// Within 1 MiB of the byte limit (the kernel refuses the write that
    /// would pass it, so the use stops short of it) or at the file limit.
    pub fn full(&self) -> bool {
        (self.limit_bytes > 0 && self.bytes.saturating_add(1 << 20) >= self.limit_bytes)
            || (self.limit_files > 0 && self.files >= self.limit_files)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    DaemonStarted {
        version: String,
        cgroup_v2: bool,
        /// Workers of a previous daemon found running and cleaned up.
        lost: Vec<String>,
        /// Bytes of a torn audit line cut off at start (a crash mid-write).
        audit_torn_bytes: u64,
    },
    DaemonStopping,
    WorkerStarted {
        profile: String,
        policy_digest: String,
        uid: u32,
        cgroup: Vec<String>,
        command: Vec<String>,
        /// Set when `command` was cut to [`MAX_COMMAND`] bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        command_truncated: Option<Truncated>,
        landlock_abi: u32,
        landlock_tcp: bool,
        landlock_scoped: bool,
        seccomp_filter_len: usize,
        namespaces: Vec<String>,
        no_new_privs: bool,
        capabilities_empty: bool,
        /// Whether landlock denials of this worker can be reported.
        landlock_denials_observable: bool,
        /// Whether seccomp denials of this worker are reported.
        seccomp_denials_observable: bool,
        /// Bytes its user's tree may hold (the kernel's project quota).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_limit: Option<u64>,
        /// Where the time to start it went: the end of each stage, in
        /// microseconds since the request arrived, in order.
        #[serde(default)]
        stages: Vec<StageTime>,
    },
    SpawnFailed {
        profile: String,
        stage: String,
        errno: i32,
        message: String,
    },
    WorkerExited {
        code: i32,
        signal: i32,
        reason: ExitReason,
        duration_ms: u64,
        cpu_time_us: u64,
        peak_memory: u64,
        /// Traffic through the proxy, per destination host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<NetUsage>,
        /// Requests and tokens through the API gateway.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api: Option<crate::usage::Totals>,
        /// Where the time to end it went: `exited` (its init's exit seen
        /// on the pidfd), `output` (its stdout and stderr closed), each in
        /// microseconds since its spawn request arrived, like
        /// `worker_started`'s. (Its cgroup is removed while this event is
        /// written.)
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stages: Vec<StageTime>,
    },
    ResourceSample {
        memory_current: u64,
        memory_peak: u64,
        cpu_usage_us: u64,
        pids: u64,
        /// Traffic through the proxy so far (totals).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<NetUsage>,
        /// What its user's tree holds on disk (where the file system
        /// counts project quotas).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<DiskUse>,
    },
    LimitReached {
        /// "oom_kill", "pids_max", "cpu_throttled" or "disk" (its user's
        /// tree is within 1 MiB of its disk limit, or at its file count).
        limit: String,
        count: u64,
    },
    SandboxDenial {
        /// "seccomp" or "landlock".
        layer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        syscall: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<String>,
        /// Denials of this worker not reported since the last report (rate limit).
        #[serde(default)]
        suppressed: u64,
    },
    /// The proxy refused a destination of a worker (rate-limited per
    /// worker; `suppressed` counts those not reported since the last one).
    NetworkDenial {
        host: String,
        port: u16,
        protocol: NetProtocol,
        /// `not-allowed`, `deny-list`, `port`, `bad-host`,
        /// `internal-address`, `sni-mismatch`, `too-many-connections`,
        /// `offline`.
        reason: String,
        /// What the worker was told.
        message: String,
        #[serde(default)]
        suppressed: u64,
    },
    /// One request of a worker through its API gateway, and what it cost.
    ApiUsage {
        /// `messages` or `count_tokens`.
        endpoint: String,
        model: String,
        /// The upstream's HTTP status (0: no answer).
        status: u16,
        streamed: bool,
        input_tokens: u64,
        output_tokens: u64,
        cache_creation_input_tokens: u64,
        cache_read_input_tokens: u64,
        /// `output_tokens` is the gateway's estimate: the stream ended
        /// before the upstream's final count (the worker hung up, or the
        /// upstream broke off), so it was counted from what was generated.
        #[serde(default)]
        output_estimated: bool,
        /// The API's own tools the request ran, as its usage counts them
        /// (`web_search_requests`, ...: billed apart from tokens; at most 8
        /// kinds).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        server_tool_use: std::collections::BTreeMap<String, u64>,
        duration_ms: u64,
        /// Requests of this worker without an event since the last one
        /// (the `worker_api_events` limit); they still count in the usage
        /// ledger and the worker's totals.
        #[serde(default)]
        suppressed: u64,
    },
    /// A user's budget refused a request; once per budget and window.
    BudgetExhausted {
        /// `tokens_per_day`, `tokens_per_month`, `requests_per_minute` or
        /// `concurrent_requests`.
        budget: String,
        limit: u64,
        used: u64,
        resets_at_ms: u64,
    },
    AuthDenied {
        peer_uid: u32,
        peer_pid: Option<i32>,
        method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_user: Option<String>,
        /// Refusals of this uid not reported since the last report (the
        /// `auth_denied_per_peer` limit).
        #[serde(default)]
        suppressed: u64,
    },
    ProfilesReloaded {
        loaded: Vec<String>,
    },
    ProfileReloadFailed {
        error: String,
    },
    /// A rate limit was hit. `limit` names it as the config does
    /// (`spawns_per_user`, `spawns_per_caller`, `auth_denied_per_peer`,
    /// `worker_approvals`, `pending_approvals`, `worker_api_events`,
    /// `audit_budget`, or `audit_queue` when the disk fell behind);
    /// `suppressed` counts what it refused or left unwritten since the last
    /// such event for the same limit and key. At most one per limit and
    /// key every 10 s.
    RateLimited {
        limit: String,
        suppressed: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_uid: Option<u32>,
    },
    /// A Claude Code worker asks whether it may run a tool call; answer with
    /// `Workers.Approve` before `timeout_seconds` or it is denied.
    ApprovalRequested {
        request_id: String,
        tool: String,
        /// The tool call's input, as JSON; when it is larger than
        /// [`MAX_INPUT`], its first bytes as a string, and `truncated`
        /// says how long it was and its digest.
        input: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncated: Option<Truncated>,
        timeout_seconds: u64,
    },
    /// How an approval request was decided: `by` is `uid N` (a client),
    /// `rule R` (the profile's auto_allow/auto_deny) or `timeout`.
    ApprovalDecided {
        request_id: String,
        tool: String,
        allow: bool,
        by: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
}

/// The longest a tenant-controlled string gets in an event (an error
/// message, a host name as sent, a tool name); longer ones are cut.
pub const MAX_FIELD: usize = 1024;

/// `s`, cut to at most `max` bytes at a character boundary, with how much
/// was cut said at the end.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &s[..end], s.len())
}

/// What was left out of an event field too large to log whole: its full
/// length and a digest of it (so the whole can be matched later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncated {
    pub bytes: u64,
    pub sha256: String,
}

impl Truncated {
    pub fn of(data: &[u8]) -> Truncated {
        Truncated {
            bytes: data.len() as u64,
            sha256: format!("{:x}", sha2::Sha256::digest(data)),
        }
    }
}

/// The longest command line an event carries whole (its arguments,
/// joined); a longer one keeps its first arguments up to this, clipped.
pub const MAX_COMMAND: usize = 4096;

/// A command line as events carry it: whole, or cut to [`MAX_COMMAND`]
/// bytes with the original's length and digest.
pub fn logged_command(argv: &[String]) -> (Vec<String>, Option<Truncated>) {
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if total <= MAX_COMMAND && argv.len() <= 256 {
        return (argv.to_vec(), None);
    }
    let mut kept = Vec::new();
    let mut room = MAX_COMMAND;
    for a in argv.iter().take(256) {
        if room == 0 {
            break;
        }
        let c = clip(a, room);
        room = room.saturating_sub(c.len() + 1);
        kept.push(c);
    }
    (kept, Some(Truncated::of(argv.join("\0").as_bytes())))
}

/// The largest tool-call input an `approval_requested` event carries
/// whole (as JSON); a larger one is carried as a string of its first bytes.
pub const MAX_INPUT: usize = 16 << 10;

/// A tool call's input (JSON text, as the worker sent it) as events carry
/// it: parsed when it is at most [`MAX_INPUT`] bytes (its tree is then
/// small), else the first bytes as a string with the length and digest.
pub fn logged_input(raw: &str) -> (serde_json::Value, Option<Truncated>) {
    if raw.len() <= MAX_INPUT {
        if let Ok(v) = serde_json::from_str(raw) {
            return (v, None);
        }
    }
    let mut end = raw.len().min(MAX_INPUT);
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    (
        serde_json::Value::String(raw[..end].to_string()),
        Some(Truncated::of(raw.as_bytes())),
    )
}

/// Each kind's name, as `kind` in the log and in `Events.Watch` filters:
/// written once here, for `name()` and `KINDS` alike.
macro_rules! kind_names {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        impl EventKind {
            pub fn name(&self) -> &'static str {
                match self {
                    $(EventKind::$variant { .. } => $name,)+
                }
            }
        }

        /// Every kind's name.
        pub const KINDS: &[&str] = &[$($name),+];
    };
}

kind_names! {
    DaemonStarted => "daemon_started",
    DaemonStopping => "daemon_stopping",
    WorkerStarted => "worker_started",
    SpawnFailed => "spawn_failed",
    WorkerExited => "worker_exited",
    ResourceSample => "resource_sample",
    LimitReached => "limit_reached",
    SandboxDenial => "sandbox_denial",
    NetworkDenial => "network_denial",
    ApiUsage => "api_usage",
    BudgetExhausted => "budget_exhausted",
    AuthDenied => "auth_denied",
    ProfilesReloaded => "profiles_reloaded",
    ProfileReloadFailed => "profile_reload_failed",
    ApprovalRequested => "approval_requested",
    ApprovalDecided => "approval_decided",
    RateLimited => "rate_limited",
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub worker: Option<String>,
    pub user: Option<String>,
    pub kinds: Vec<String>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.worker.as_ref().is_none_or(|w| e.worker.as_ref() == Some(w))
            && self.user.as_ref().is_none_or(|u| e.user.as_ref() == Some(u))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == e.kind.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_logs() {
        for r in [
            ExitReason::Exited,
            ExitReason::Killed,
            ExitReason::Stopped,
            ExitReason::TimedOut,
            ExitReason::Oom,
            ExitReason::Lost,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        for p in [
            NetProtocol::Connect,
            NetProtocol::Http,
            NetProtocol::Socks,
            NetProtocol::Gateway,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    #[test]
    fn every_kind_is_named_as_serde_names_it() {
        let e = EventKind::WorkerExited {
            code: 0,
            signal: 0,
            reason: ExitReason::TimedOut,
            duration_ms: 0,
            cpu_time_us: 0,
            peak_memory: 0,
            network: None,
            api: None,
            stages: Vec::new(),
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], e.name());
        assert_eq!(json["reason"], "timed_out");
        assert!(KINDS.contains(&e.name()));
        assert_eq!(KINDS.len(), 17);
    }

    #[test]
    fn tenant_strings_are_bounded() {
        assert_eq!(clip("short", 10), "short");
        let c = clip(&"é".repeat(100), 11);
        assert!(c.starts_with("ééééé…"), "{c}");
        assert!(c.ends_with("[200 bytes]"), "{c}");
        let (argv, t) = logged_command(&["echo".into(), "x".repeat(100_000)]);
        assert_eq!(argv[0], "echo");
        assert!(argv.iter().map(String::len).sum::<usize>() <= MAX_COMMAND + 64);
        let t = t.unwrap();
        assert_eq!(t.bytes, 100_005);
        assert_eq!(t.sha256.len(), 64);
        let (argv, t) = logged_command(&vec!["a".to_string(); 10_000]);
        assert_eq!((argv.len(), t.is_some()), (256, true));
        assert_eq!(logged_command(&["true".into()]), (vec!["true".to_string()], None));
        let (v, t) = logged_input(r#"{"command":"ls"}"#);
        assert_eq!((v["command"].as_str(), t), (Some("ls"), None));
        let big = format!(r#"{{"content":"{}"}}"#, "x".repeat(100_000));
        let (v, t) = logged_input(&big);
        assert_eq!(v.as_str().unwrap().len(), MAX_INPUT);
        assert_eq!(t.unwrap().bytes, big.len() as u64);
    }

    #[test]
    fn filters() {
        let e = Event {
            seq: 1,
            time_ms: 0,
            worker: Some("w1".into()),
            user: Some("alice".into()),
            kind: EventKind::DaemonStopping,
        };
        assert!(Filter::default().matches(&e));
        assert!(Filter {
            user: Some("alice".into()),
            ..Default::default()
        }
        .matches(&e));
        assert!(!Filter {
            user: Some("bob".into()),
            ..Default::default()
        }
        .matches(&e));
        assert!(Filter {
            kinds: vec!["daemon_stopping".into()],
            ..Default::default()
        }
        .matches(&e));
        assert!(!Filter {
            kinds: vec!["worker_started".into()],
            ..Default::default()
        }
        .matches(&e));
    }
}
