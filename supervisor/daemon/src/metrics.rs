//! Metrics: what wardend has done and what it holds, in Prometheus's text
//! exposition format (0.0.4), on the listeners an admin enables
//! (`metrics_listen` in wardend.toml; none by default; TCP on loopback
//! only).
//!
//! Owns: the counters fed by every event as it is written (spawns,
//! failures by stage, spawn latency, exits by reason, denials by layer,
//! network denials, budget exhaustions, events and audit bytes), the API
//! gateway's tokens by user and model, the API's stream gauges, and the
//! rendering of a scrape (with gauges read from the registry then).
//!
//! Must never: label a series with a worker id (one per spawn: no bound),
//! hold more than [`MAX_SERIES`] label sets in a family (the rest add up
//! under `other`), or take a lock a spawn waits on for longer than a
//! counter's update.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use crate::events::bus::Observer;
use crate::events::{Event, EventKind};
use crate::usage::Tokens;

/// Label sets one family holds at most; past it, new ones count under
/// `other` (a tenant's names cannot grow the daemon or a scrape).
pub const MAX_SERIES: usize = 1000;
const OTHER: &str = "other";

/// Spawn-to-exec latency buckets, in seconds.
const SPAWN_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The daemon's metrics: one per process.
pub fn global() -> &'static Arc<Metrics> {
    static METRICS: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::default()));
    &METRICS
}

/// Clients' streams, as the API's handlers count them.
#[derive(Debug, Default)]
pub struct Streams {
    /// Events.Watch streams open now.
    pub watchers: AtomicI64,
    /// Streams (Watch, Attach, Logs) cut off for reading nothing.
    pub cut_off: AtomicU64,
}

/// A family of counters by label values.
#[derive(Debug, Default)]
struct Family(BTreeMap<Vec<String>, u64>);

impl Family {
    fn add(&mut self, labels: &[&str], n: u64) {
        let mut key: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        if !self.0.contains_key(&key) && self.0.len() >= MAX_SERIES {
            key = vec![OTHER.to_string(); labels.len()];
        }
        *self.0.entry(key).or_default() += n;
    }
}

#[derive(Debug)]
struct Histogram {
    counts: [u64; SPAWN_BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Counts {
    spawns: Family,
    spawn_failures: Family,
    spawn_seconds: Histogram,
    exits: Family,
    denials: Family,
    network_denials: Family,
    budget_exhaustions: Family,
    rate_limited: Family,
    auth_denials: u64,
    events: Family,
    audit_bytes: u64,
    api_requests: Family,
    api_tokens: Family,
    api_server_tools: Family,
}

/// Everything counted since the daemon started.
#[derive(Debug)]
pub struct Metrics {
    counts: Mutex<Counts>,
    pub streams: Streams,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            counts: Mutex::new(Counts {
                spawns: Family::default(),
                spawn_failures: Family::default(),
                spawn_seconds: Histogram {
                    counts: [0; SPAWN_BUCKETS.len()],
                    sum: 0.0,
                    count: 0,
                },
                exits: Family::default(),
                denials: Family::default(),
                network_denials: Family::default(),
                budget_exhaustions: Family::default(),
                rate_limited: Family::default(),
                auth_denials: 0,
                events: Family::default(),
                audit_bytes: 0,
                api_requests: Family::default(),
                api_tokens: Family::default(),
                api_server_tools: Family::default(),
            }),
            streams: Streams::default(),
        }
    }
}

impl Observer for Metrics {
    fn written(&self, e: &Event, bytes: usize) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.events.add(&[e.kind.name()], 1);
        c.audit_bytes += bytes as u64;
        match &e.kind {
            EventKind::WorkerStarted { profile, stages, .. } => {
                c.spawns.add(&[profile], 1);
                if let Some(exec) = stages.iter().find(|s| s.stage == "exec") {
                    #[allow(clippy::cast_precision_loss)] // µs far below 2^52.
                    let secs = exec.us as f64 / 1e6;
                    let h = &mut c.spawn_seconds;
                    for (i, le) in SPAWN_BUCKETS.iter().enumerate() {
                        if secs <= *le {
                            h.counts[i] += 1;
                        }
                    }
                    h.sum += secs;
                    h.count += 1;
                }
            }
            EventKind::SpawnFailed { stage, .. } => c.spawn_failures.add(&[stage], 1),
            EventKind::WorkerExited { reason, .. } => c.exits.add(&[reason.name()], 1),
            EventKind::SandboxDenial { layer, suppressed, .. } => c.denials.add(&[layer], 1 + suppressed),
            EventKind::NetworkDenial {
                reason,
                protocol,
                suppressed,
                ..
            } => c.network_denials.add(&[protocol.name(), reason], 1 + suppressed),
            EventKind::BudgetExhausted { budget, .. } => {
                let user = e.user.as_deref().unwrap_or("");
                c.budget_exhaustions.add(&[user, budget], 1);
            }
            EventKind::RateLimited { limit, suppressed, .. } => c.rate_limited.add(&[limit], 1 + suppressed),
            EventKind::AuthDenied { suppressed, .. } => c.auth_denials += 1 + suppressed,
            _ => {}
        }
    }
}

impl Metrics {
    /// One request through a worker's API gateway that the upstream
    /// answered: its tokens by user and model, and the API's own tools it
    /// ran by user and kind (the upstream's `server_tool_use` counts).
    /// (Only answered requests count, so that a worker's made-up model
    /// names make no series.)
    pub fn api_request(&self, user: &str, model: &str, tokens: Tokens, server_tools: &BTreeMap<String, u64>) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.api_requests.add(&[user, model], 1);
        for (kind, n) in server_tools {
            c.api_server_tools.add(&[user, kind], *n);
        }
        for (kind, n) in [
            ("input", tokens.input),
            ("output", tokens.output),
            ("cache_creation", tokens.cache_creation),
            ("cache_read", tokens.cache_read),
        ] {
            c.api_tokens.add(&[user, model, kind], n);
        }
    }

    /// The text a scrape gets; `gauges` are the registry's now.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(16 << 10);
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut family = |name: &str, kind: &str, help: &str, labels: &[&str], f: &Family| {
            header(&mut out, name, kind, help);
            for (values, n) in &f.0 {
                let _ = writeln!(out, "{name}{} {n}", label_set(labels, values));
            }
        };
        family(
            "warden_spawns_total",
            "counter",
            "Workers started, by profile.",
            &["profile"],
            &c.spawns,
        );
        family(
            "warden_spawn_failures_total",
            "counter",
            "Spawns that failed, by the setup stage that failed.",
            &["stage"],
            &c.spawn_failures,
        );
        family(
            "warden_worker_exits_total",
            "counter",
            "Workers that ended, by reason (exited, killed, stopped, timed_out, oom, lost).",
            &["reason"],
            &c.exits,
        );
        family(
            "warden_denials_total",
            "counter",
            "Calls the sandbox refused, by layer (seccomp, landlock); suppressed reports included.",
            &["layer"],
            &c.denials,
        );
        family(
            "warden_network_denials_total",
            "counter",
            "Destinations the proxy or the API gateway refused, by protocol and reason.",
            &["protocol", "reason"],
            &c.network_denials,
        );
        family(
            "warden_budget_exhaustions_total",
            "counter",
            "Windows in which a user's API budget ran out, by user and budget.",
            &["user", "budget"],
            &c.budget_exhaustions,
        );
        family(
            "warden_rate_limited_total",
            "counter",
            "Calls and reports past a rate limit, by limit.",
            &["limit"],
            &c.rate_limited,
        );
        family(
            "warden_events_total",
            "counter",
            "Events written to the audit log and published, by kind.",
            &["kind"],
            &c.events,
        );
        family(
            "warden_api_requests_total",
            "counter",
            "Requests through workers' API gateways that the upstream answered, by user and model.",
            &["user", "model"],
            &c.api_requests,
        );
        family(
            "warden_api_tokens_total",
            "counter",
            "Tokens of those requests, by user, model and type (input, output, cache_creation, cache_read).",
            &["user", "model", "type"],
            &c.api_tokens,
        );
        family(
            "warden_api_server_tool_requests_total",
            "counter",
            "The API's own tools those requests ran (web searches, fetches, ...), billed apart from tokens, by user and kind (the API's usage names: web_search_requests, ...).",
            &["user", "kind"],
            &c.api_server_tools,
        );
        let h = &c.spawn_seconds;
        header(
            &mut out,
            "warden_spawn_seconds",
            "histogram",
            "From a spawn request to its worker's exec.",
        );
        for (i, le) in SPAWN_BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "warden_spawn_seconds_bucket{{le=\"{le}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(out, "warden_spawn_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "warden_spawn_seconds_sum {}", h.sum);
        let _ = writeln!(out, "warden_spawn_seconds_count {}", h.count);
        let scalars = [
            (
                "warden_auth_denials_total",
                "counter",
                "API calls refused for their caller.",
                c.auth_denials,
            ),
            (
                "warden_audit_bytes_written_total",
                "counter",
                "Bytes written to the audit log.",
                c.audit_bytes,
            ),
            (
                "warden_stream_cutoffs_total",
                "counter",
                "Client streams (Watch, Attach, Logs) cut off for reading nothing.",
                self.streams.cut_off.load(Ordering::Relaxed),
            ),
        ];
        drop(c);
        for (name, kind, help, v) in scalars {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        header(
            &mut out,
            "warden_event_subscribers",
            "gauge",
            "Events.Watch streams open.",
        );
        let _ = writeln!(
            out,
            "warden_event_subscribers {}",
            self.streams.watchers.load(Ordering::Relaxed).max(0)
        );
        header(
            &mut out,
            "warden_workers",
            "gauge",
            "Workers the daemon knows, by state (running, exited) and profile.",
        );
        for ((state, profile), n) in &gauges.workers {
            let _ = writeln!(
                out,
                "warden_workers{} {n}",
                label_set(&["state", "profile"], &[state.clone(), profile.clone()])
            );
        }
        header(
            &mut out,
            "warden_warm_inits",
            "gauge",
            "Workers' inits made ahead of their spawns, ready.",
        );
        let _ = writeln!(out, "warden_warm_inits {}", gauges.warm);
        header(
            &mut out,
            "warden_primed_inits",
            "gauge",
            "Workers' inits built up to the command for a spawn like a recent one, ready.",
        );
        let _ = writeln!(out, "warden_primed_inits {}", gauges.primed);
        out
    }
}

/// The registry's gauges at a scrape.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Workers by (state, profile).
    pub workers: BTreeMap<(String, String), u64>,
    pub warm: usize,
    pub primed: usize,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `{a="x",b="y"}`, the values escaped as the format asks.
fn label_set(names: &[&str], values: &[String]) -> String {
    let mut s = String::from("{");
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(s, "{n}=\"{v}\"");
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: Option<&str>, kind: EventKind) -> Event {
        Event {
            seq: 1,
            time_ms: 0,
            worker: Some("w1".into()),
            user: user.map(str::to_string),
            kind,
        }
    }

    #[test]
    fn events_become_series_without_worker_ids() {
        let m = Metrics::default();
        m.written(
            &event(
                Some("alice"),
                EventKind::SpawnFailed {
                    profile: "base".into(),
                    stage: "landlock".into(),
                    errno: 95,
                    message: "no".into(),
                },
            ),
            100,
        );
        m.written(
            &event(
                Some("alice"),
                EventKind::SandboxDenial {
                    layer: "seccomp".into(),
                    syscall: Some("ptrace".into()),
                    pid: Some(2),
                    path: None,
                    access: None,
                    suppressed: 4,
                },
            ),
            50,
        );
        m.api_request(
            "alice",
            "claude-x\"y",
            Tokens {
                input: 10,
                output: 5,
                cache_creation: 0,
                cache_read: 1,
            },
            &BTreeMap::from([("web_search_requests".to_string(), 2)]),
        );
        let text = m.render(&Gauges::default());
        assert!(
            text.contains("warden_spawn_failures_total{stage=\"landlock\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("warden_denials_total{layer=\"seccomp\"} 5\n"), "{text}");
        assert!(
            text.contains("warden_events_total{kind=\"sandbox_denial\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("warden_audit_bytes_written_total 150\n"), "{text}");
        assert!(
            text.contains("warden_api_tokens_total{user=\"alice\",model=\"claude-x\\\"y\",type=\"input\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains("warden_api_server_tool_requests_total{user=\"alice\",kind=\"web_search_requests\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("w1"), "a worker id in a series: {text}");
    }

    #[test]
    fn a_family_holds_at_most_max_series_label_sets() {
        let m = Metrics::default();
        for i in 0..MAX_SERIES + 50 {
            m.api_request(&format!("user{i}"), "m", Tokens::default(), &BTreeMap::new());
        }
        let text = m.render(&Gauges::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("warden_api_requests_total{"))
            .count();
        assert_eq!(series, MAX_SERIES + 1, "MAX_SERIES and one `other`");
        assert!(text.contains("warden_api_requests_total{user=\"other\",model=\"other\"} 50\n"));
    }
}
