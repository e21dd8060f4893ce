//! Events: everything that happens to workers and to the daemon, numbered,
//! written to the audit log, then published to subscribers.
//!
//! Owns: the event model, sequence assignment, the live broadcast and the
//! replay-then-live hand-over for `Events.Watch`.
//!
//! Must never: publish before the audit log has the event on disk, or let a
//! slow subscriber slow the daemon (the broadcast is bounded; a subscriber
//! that falls behind is told the last sequence it got and resumes from the
//! log).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::audit::{AuditError, AuditLog, Recovery};

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
    },
    ResourceSample {
        memory_current: u64,
        memory_peak: u64,
        cpu_usage_us: u64,
        pids: u64,
        /// Traffic through the proxy so far (totals).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<NetUsage>,
    },
    LimitReached {
        /// "oom_kill", "pids_max" or "cpu_throttled".
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
        duration_ms: u64,
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
    },
    ProfilesReloaded {
        loaded: Vec<String>,
    },
    ProfileReloadFailed {
        error: String,
    },
    /// A Claude Code worker asks whether it may run a tool call; answer with
    /// `Workers.Approve` before `timeout_seconds` or it is denied.
    ApprovalRequested {
        request_id: String,
        tool: String,
        /// The tool call's input, as JSON.
        input: serde_json::Value,
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
}

/// The log and the last sequence number written to it, changed together.
#[derive(Debug)]
struct Writer {
    log: AuditLog,
    last_seq: u64,
}

/// The bus: numbered, durable, then broadcast.
#[derive(Debug)]
pub struct Events {
    writer: Mutex<Writer>,
    live: broadcast::Sender<Arc<Event>>,
    path: PathBuf,
    keep: usize,
}

impl Events {
    pub fn open(path: &Path, max_bytes: u64, keep: usize, capacity: usize) -> Result<(Self, Recovery), AuditError> {
        let (log, recovery) = AuditLog::open(path, max_bytes, keep)?;
        let events = Events {
            writer: Mutex::new(Writer {
                log,
                last_seq: recovery.last_seq,
            }),
            live: broadcast::channel(capacity.max(16)).0,
            path: path.to_path_buf(),
            keep,
        };
        Ok((events, recovery))
    }

    /// Numbers, writes and publishes one event. If the audit log cannot be
    /// written the event is not published (and the failure is logged): a
    /// published event is always on disk.
    pub fn publish(&self, worker: Option<&str>, user: Option<&str>, kind: EventKind) -> Option<Arc<Event>> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let event = Event {
            seq: w.last_seq + 1,
            time_ms: millis(SystemTime::now()),
            worker: worker.map(str::to_string),
            user: user.map(str::to_string),
            kind,
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        if let Err(e) = w.log.append(&line) {
            tracing::error!(error = %e, kind = event.kind.name(), "cannot write the audit log; event dropped");
            return None;
        }
        w.last_seq = event.seq;
        let event = Arc::new(event);
        // Sent under the lock, so subscribers see sequence order.
        let _ = self.live.send(event.clone());
        Some(event)
    }

    pub fn last_seq(&self) -> u64 {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).last_seq
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Events with `seq >= from` from the log, oldest first, until `f` says stop.
    pub fn replay(&self, from: u64, mut f: impl FnMut(Event) -> bool) {
        AuditLog::replay(&self.path, self.keep, from, |_, line| {
            match serde_json::from_str::<Event>(line) {
                Ok(e) => f(e),
                Err(_) => true,
            }
        });
    }
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
    fn events_round_trip_through_the_log_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let (bus, _) = Events::open(&p, 1 << 20, 2, 64).unwrap();
        let mut rx = bus.subscribe();
        bus.publish(None, None, EventKind::DaemonStopping).unwrap();
        let e = bus
            .publish(
                Some("w1"),
                Some("alice"),
                EventKind::LimitReached {
                    limit: "pids_max".into(),
                    count: 3,
                },
            )
            .unwrap();
        assert_eq!(e.seq, 2);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        let mut got = Vec::new();
        bus.replay(2, |e| {
            got.push(e);
            true
        });
        assert_eq!(got, vec![(*e).clone()]);
        let line = std::fs::read_to_string(&p).unwrap();
        assert!(
            line.contains(r#""kind":"limit_reached","limit":"pids_max","count":3"#),
            "{line}"
        );
        drop(bus);
        let (bus, r) = Events::open(&p, 1 << 20, 2, 64).unwrap();
        assert_eq!(r.last_seq, 2);
        assert_eq!(bus.publish(None, None, EventKind::DaemonStopping).unwrap().seq, 3);
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
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], e.name());
        assert_eq!(json["reason"], "timed_out");
        assert!(KINDS.contains(&e.name()));
        assert_eq!(KINDS.len(), 16);
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
