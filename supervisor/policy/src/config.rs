//! wardend's configuration: `/etc/warden/wardend.toml`, or the embedded
//! default when that file is absent. Parsed with unknown keys rejected and
//! validated before the daemon starts anything; an error names
//! file:line:column.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Location, PolicyError};
use crate::{ByteSize, HttpUrl, Rate, Seconds};

/// The configuration wardend uses when /etc/warden/wardend.toml is absent.
pub const DEFAULT_CONFIG: &str = include_str!("../../../systemd/wardend.toml");

/// A listener for Prometheus scrapes: TCP on a loopback address, or a
/// Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl MetricsListen {
    /// `127.0.0.1:9187`, `[::1]:9187` or `unix:/run/warden/metrics.sock`.
    /// Other addresses are refused: the metrics name users, and a scraper
    /// elsewhere goes through a proxy of the admin's that authenticates it.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(format!("expected unix: and an absolute path without '..', got {s:?}"));
            }
            return Ok(MetricsListen::Unix(PathBuf::from(path)));
        }
        match s.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Ok(MetricsListen::Tcp(a)),
            Ok(_) => Err(format!(
                "expected a loopback address for metrics (127.0.0.1:PORT, [::1]:PORT) or unix:PATH, got {s:?}: \
                 the metrics name users; serve them elsewhere through a proxy that authenticates the scraper"
            )),
            Err(_) => Err(format!(
                "expected an address like \"127.0.0.1:9187\" or \"unix:/run/warden/metrics.sock\", got {s:?}"
            )),
        }
    }
}

/// Warm inits when wardend.toml says nothing, and the most it may ask for.
const WARM_INITS: usize = 2;
const MAX_WARM_INITS: usize = 64;
/// Primed inits when wardend.toml says nothing, and the most it may ask for.
const PRIMED_INITS: usize = 4;
const MAX_PRIMED_INITS: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Spanned<String>,
    socket_group: String,
    admin_group: String,
    state_dir: Spanned<String>,
    profiles_dir: Spanned<String>,
    launcher: Spanned<String>,
    #[serde(default)]
    launch_socket: Option<Spanned<String>>,
    default_profile: String,
    uid_min: Spanned<u32>,
    uid_max: u32,
    cgroup_name: Spanned<String>,
    #[serde(default)]
    service_uids: Vec<u32>,
    max_workers: Spanned<u32>,
    max_workers_per_user: Spanned<u32>,
    stop_grace_seconds: u32,
    max_message_bytes: Spanned<usize>,
    log_max_bytes: u64,
    exited_history: usize,
    #[serde(default)]
    warm_inits: Option<Spanned<usize>>,
    #[serde(default)]
    primed_inits: Option<Spanned<usize>>,
    #[serde(default)]
    metrics_listen: Vec<Spanned<String>>,
    audit_log: Spanned<String>,
    audit_max_bytes: u64,
    audit_keep: usize,
    sample_interval_seconds: Spanned<u64>,
    events_buffer: usize,
    landlock_audit: bool,
    #[serde(default)]
    claude_binary: String,
    #[serde(default = "default_claude_install_dir")]
    claude_install_dir: String,
    #[serde(default = "default_credentials_dir")]
    credentials_dir: String,
    #[serde(default = "default_max_connections")]
    max_connections_per_worker: Spanned<u32>,
    #[serde(default)]
    hosts: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    audit_max_age: Option<Seconds>,
    #[serde(default = "default_audit_budget")]
    audit_budget: Rate,
    #[serde(default = "default_rate_limits")]
    rate_limits: Spanned<RateLimits>,
    #[serde(default = "default_client_timeout")]
    client_timeout_seconds: Spanned<u64>,
    #[serde(default = "default_connections_per_caller")]
    max_connections_per_caller: Spanned<u32>,
    #[serde(default)]
    disk_limits: BTreeMap<Spanned<String>, ByteSize>,
}

fn default_connections_per_caller() -> Spanned<u32> {
    Spanned::new(0..0, 64)
}

fn default_client_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

fn default_rate_limits() -> Spanned<RateLimits> {
    Spanned::new(0..0, RateLimits::default())
}

fn default_audit_budget() -> Rate {
    Rate::new(16 << 20, f64::from(128u32 << 20) / 86400.0)
}

/// How fast tenants may make the daemon work: each a burst, then a steady
/// rate. Past a limit, a spawn is refused (`RESOURCE_EXHAUSTED`), an
/// approval request denied, and a report (a denial, a refused call) not
/// written but counted in the next one that is.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Spawns of one warden user.
    pub spawns_per_user: Rate,
    /// Spawns asked for by one calling uid (for whichever users).
    pub spawns_per_caller: Rate,
    /// `auth_denied` events of one calling uid.
    pub auth_denied_per_peer: Rate,
    /// Per worker: reports of denied system calls and file accesses.
    pub worker_denials: Rate,
    /// Per worker: reports of refused destinations.
    pub worker_network_denials: Rate,
    /// Per worker: Claude Code permission requests (past it, denied).
    pub worker_approvals: Rate,
    /// Per worker: `api_usage` events (the requests still count in the
    /// ledger and the worker's totals).
    pub worker_api_events: Rate,
    /// Per worker: permission requests waiting for a client at once.
    pub pending_approvals: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            spawns_per_user: Rate::new(30, 1.0),
            spawns_per_caller: Rate::new(120, 10.0),
            auth_denied_per_peer: Rate::new(20, 1.0),
            worker_denials: Rate::new(50, 10.0),
            worker_network_denials: Rate::new(50, 10.0),
            worker_approvals: Rate::new(64, 4.0),
            worker_api_events: Rate::new(100, 10.0),
            pending_approvals: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default = "default_upstream")]
    upstream: HttpUrl,
    #[serde(default = "no_extra_ca")]
    extra_ca: Spanned<String>,
    #[serde(default)]
    count_cache_reads: bool,
    #[serde(default = "default_max_request")]
    max_request_bytes: ByteSize,
    #[serde(default)]
    budget: Budget,
    #[serde(default)]
    users: BTreeMap<Spanned<String>, Budget>,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            upstream: default_upstream(),
            extra_ca: no_extra_ca(),
            count_cache_reads: false,
            max_request_bytes: default_max_request(),
            budget: Budget::default(),
            users: BTreeMap::new(),
        }
    }
}

fn no_extra_ca() -> Spanned<String> {
    Spanned::new(0..0, String::new())
}

fn default_upstream() -> HttpUrl {
    HttpUrl::try_from("https://api.anthropic.com".to_string()).expect("a valid URL")
}

fn default_max_request() -> ByteSize {
    ByteSize(32 << 20)
}

/// Limits on one warden user's API use through the gateway. Unset: no
/// limit. Tokens are input, output and cache-creation tokens, plus cache
/// reads where `count_cache_reads` says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    pub requests_per_minute: Option<u32>,
    pub concurrent_requests: Option<u32>,
}

impl Budget {
    /// This budget with each limit `over` sets taking its place.
    pub fn overridden_by(self, over: &Budget) -> Budget {
        Budget {
            tokens_per_day: over.tokens_per_day.or(self.tokens_per_day),
            tokens_per_month: over.tokens_per_month.or(self.tokens_per_month),
            requests_per_minute: over.requests_per_minute.or(self.requests_per_minute),
            concurrent_requests: over.concurrent_requests.or(self.concurrent_requests),
        }
    }
}

/// The Anthropic API gateway: where it forwards, what it trusts, and the
/// budgets it holds users to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// For profiles whose `[claude]` names no `base_url`.
    pub upstream: HttpUrl,
    /// A PEM file of further CAs trusted for upstream TLS (besides the
    /// system's roots): a corporate gateway's, or a test CA.
    pub extra_ca: Option<PathBuf>,
    /// Whether cache reads count toward token budgets.
    pub count_cache_reads: bool,
    /// The largest request body forwarded.
    pub max_request_bytes: u64,
    /// Every user's budget, unless `users` says otherwise.
    pub budget: Budget,
    pub users: BTreeMap<String, Budget>,
}

impl GatewayConfig {
    /// The budget `user` is held to.
    pub fn budget_for(&self, user: &str) -> Budget {
        self.users
            .get(user)
            .map_or(self.budget, |b| self.budget.overridden_by(b))
    }
}

fn default_max_connections() -> Spanned<u32> {
    Spanned::new(0..0, 256)
}

fn default_claude_install_dir() -> String {
    "/opt/warden/claude-code".into()
}

fn default_credentials_dir() -> String {
    "/etc/warden/credentials".into()
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub origin: String,
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660); its members may use the API.
    pub socket_group: String,
    /// Members of this group may act for every user.
    pub admin_group: String,
    pub state_dir: PathBuf,
    pub profiles_dir: PathBuf,
    /// The warden-launch binary (a relative name is looked up next to wardend).
    pub launcher: PathBuf,
    /// The launch server systemd runs (`warden-launch.socket`); None:
    /// wardend starts one of its own from `launcher`.
    pub launch_socket: Option<PathBuf>,
    pub default_profile: String,
    pub uid_min: u32,
    pub uid_max: u32,
    /// v1: warden's directory in each controller's hierarchy.
    pub cgroup_name: String,
    /// Uids (a web front end) that may act for any warden user.
    pub service_uids: Vec<u32>,
    pub max_workers: u32,
    pub max_workers_per_user: u32,
    pub stop_grace_seconds: u32,
    pub max_message_bytes: usize,
    /// Per stream and worker; output beyond it is streamed live but not kept.
    pub log_max_bytes: u64,
    /// How many exited workers `List` and `Get` remember.
    pub exited_history: usize,
    /// Workers' inits the daemon keeps made ahead of their spawns (each in
    /// its cgroup and new namespaces, waiting for a spec); 0: none.
    pub warm_inits: usize,
    /// Workers' inits the daemon keeps built up to the command for the
    /// next spawn like a recent one (one per user, project, profile and
    /// limits); 0: none.
    pub primed_inits: usize,
    /// Where Prometheus metrics are served (none by default).
    pub metrics_listen: Vec<MetricsListen>,
    /// The audit log (JSON lines), rotated at `audit_max_bytes`, keeping
    /// `audit_keep` rotated files.
    pub audit_log: PathBuf,
    pub audit_max_bytes: u64,
    pub audit_keep: usize,
    /// Seconds between resource samples of each worker.
    pub sample_interval_seconds: u64,
    /// Events a live subscriber may fall behind before it is told it lagged.
    pub events_buffer: usize,
    /// Turn kernel audit on and report landlock denials from it.
    pub landlock_audit: bool,
    /// The `claude` binary for `[claude]` profiles; empty: `claude` on the
    /// daemon's PATH, else `node_modules/.bin/claude` under
    /// `claude_install_dir`.
    pub claude_binary: Option<PathBuf>,
    pub claude_install_dir: PathBuf,
    /// Root-only API keys: `<user>` or `default`, mode 0600, owned by root.
    pub credentials_dir: PathBuf,
    /// Connections a worker may have open through the proxy at once.
    pub max_connections_per_worker: u32,
    /// Names the proxy (and the gateway, for its upstream) maps to an
    /// address without asking DNS, trusted as mapped (internal addresses
    /// included), like Docker's `--add-host`.
    pub hosts: BTreeMap<String, IpAddr>,
    pub gateway: GatewayConfig,
    /// Rotated audit files last written longer ago than this are deleted.
    pub audit_max_age: Option<u64>,
    /// What one user (or, for refused calls, one calling uid) may add to
    /// the audit log, in bytes.
    pub audit_budget: Rate,
    pub rate_limits: RateLimits,
    /// A streaming client (Watch, Attach, Logs) that reads nothing for
    /// this long while messages wait for it is cut off.
    pub client_timeout_seconds: u64,
    /// API connections one uid may have open at once.
    pub max_connections_per_caller: u32,
    /// Per-user disk limits, in place of the profiles' `limits.disk`.
    pub disk_limits: BTreeMap<String, u64>,
}

impl Config {
    /// Host paths no profile may expose to a worker: warden's state
    /// directory and its socket's directory.
    pub fn protected_paths(&self) -> Vec<PathBuf> {
        let dir_of = |s: &PathBuf| s.parent().map_or_else(|| s.clone(), Path::to_path_buf);
        let mut paths = vec![self.state_dir.clone(), dir_of(&self.socket)];
        paths.extend(self.launch_socket.as_ref().map(dir_of));
        paths.dedup();
        paths
    }

    /// The embedded default configuration.
    pub fn embedded() -> Config {
        // `the_embedded_default_is_valid` proves this parses.
        Self::parse("embedded:wardend.toml", DEFAULT_CONFIG).expect("the embedded wardend.toml is valid")
    }

    /// Reads `path`, or the embedded default when `path` does not exist and
    /// `allow_default` is set.
    pub fn load(path: &Path, allow_default: bool) -> Result<Config, PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&path.display().to_string(), &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && allow_default => Ok(Self::embedded()),
            Err(source) => Err(PolicyError::ReadConfig {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(origin: &str, text: &str) -> Result<Config, PolicyError> {
        let at = |offset: usize| Location::from_offset(origin, text, offset);
        let raw: RawConfig = toml::from_str(text).map_err(|e| PolicyError::Invalid {
            at: at(e.span().map_or(0, |s| s.start)),
            message: e.message().trim().to_string(),
        })?;
        let invalid = |span: std::ops::Range<usize>, m: String| PolicyError::Invalid {
            at: at(span.start),
            message: m,
        };
        if *raw.sample_interval_seconds.get_ref() == 0 {
            return Err(invalid(
                raw.sample_interval_seconds.span(),
                "expected sample_interval_seconds of at least 1".into(),
            ));
        }
        for p in [&raw.socket, &raw.state_dir, &raw.profiles_dir, &raw.audit_log]
            .into_iter()
            .chain(raw.launch_socket.as_ref())
        {
            if !p.get_ref().starts_with('/') || p.get_ref().split('/').any(|c| c == "..") {
                return Err(invalid(
                    p.span(),
                    format!("expected an absolute path without '..', got {:?}", p.get_ref()),
                ));
            }
        }
        let metrics_listen = raw
            .metrics_listen
            .iter()
            .map(|l| MetricsListen::parse(l.get_ref()).map_err(|e| invalid(l.span(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(w) = raw.warm_inits.as_ref().filter(|w| *w.get_ref() > MAX_WARM_INITS) {
            return Err(invalid(
                w.span(),
                format!("expected warm_inits of at most {MAX_WARM_INITS}"),
            ));
        }
        if let Some(w) = raw.primed_inits.as_ref().filter(|w| *w.get_ref() > MAX_PRIMED_INITS) {
            return Err(invalid(
                w.span(),
                format!("expected primed_inits of at most {MAX_PRIMED_INITS}"),
            ));
        }
        if raw.launcher.get_ref().is_empty() {
            return Err(invalid(raw.launcher.span(), "expected the warden-launch path".into()));
        }
        if *raw.uid_min.get_ref() < 1000 || *raw.uid_min.get_ref() > raw.uid_max {
            return Err(invalid(
                raw.uid_min.span(),
                "expected 1000 <= uid_min <= uid_max (worker uids are never system accounts)".into(),
            ));
        }
        let name = raw.cgroup_name.get_ref();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid(
                raw.cgroup_name.span(),
                format!("expected a plain directory name, got {name:?}"),
            ));
        }
        for (v, what) in [
            (&raw.max_workers, "max_workers"),
            (&raw.max_workers_per_user, "max_workers_per_user"),
        ] {
            if *v.get_ref() == 0 {
                return Err(invalid(v.span(), format!("expected {what} of at least 1")));
            }
        }
        if *raw.max_connections_per_worker.get_ref() == 0 {
            return Err(invalid(
                raw.max_connections_per_worker.span(),
                "expected max_connections_per_worker of at least 1".into(),
            ));
        }
        let mut hosts = BTreeMap::new();
        for (name, addr) in &raw.hosts {
            let host = crate::Host::parse(name);
            let Ok(crate::Host::Name(canonical)) = host else {
                return Err(invalid(
                    addr.span(),
                    format!("hosts: {name:?} is not a canonical host name"),
                ));
            };
            let ip: IpAddr = addr.get_ref().parse().map_err(|_| {
                invalid(
                    addr.span(),
                    format!("hosts: expected an IP address for {name}, got {:?}", addr.get_ref()),
                )
            })?;
            hosts.insert(canonical, crate::network::canonical_ip(ip));
        }
        for name in raw.gateway.users.keys() {
            crate::names::check_user(name.get_ref())
                .map_err(|e| invalid(name.span(), format!("gateway.users: {e}")))?;
        }
        for name in raw.disk_limits.keys() {
            crate::names::check_user(name.get_ref()).map_err(|e| invalid(name.span(), format!("disk_limits: {e}")))?;
        }
        let extra_ca = raw.gateway.extra_ca.get_ref();
        if !extra_ca.is_empty() && !extra_ca.starts_with('/') {
            return Err(invalid(
                raw.gateway.extra_ca.span(),
                format!("gateway.extra_ca: expected an absolute path, got {extra_ca:?}"),
            ));
        }
        if *raw.max_message_bytes.get_ref() < 1024 {
            return Err(invalid(
                raw.max_message_bytes.span(),
                "expected max_message_bytes of at least 1024".into(),
            ));
        }
        if *raw.max_connections_per_caller.get_ref() == 0 {
            return Err(invalid(
                raw.max_connections_per_caller.span(),
                "expected max_connections_per_caller of at least 1".into(),
            ));
        }
        if *raw.client_timeout_seconds.get_ref() == 0 {
            return Err(invalid(
                raw.client_timeout_seconds.span(),
                "expected client_timeout_seconds of at least 1".into(),
            ));
        }
        if raw.rate_limits.get_ref().pending_approvals == 0 {
            return Err(invalid(
                raw.rate_limits.span(),
                "rate_limits.pending_approvals: expected at least 1 (a worker could never ask)".into(),
            ));
        }
        Ok(Config {
            origin: origin.to_string(),
            socket: PathBuf::from(raw.socket.into_inner()),
            socket_group: raw.socket_group,
            admin_group: raw.admin_group,
            state_dir: PathBuf::from(raw.state_dir.into_inner()),
            profiles_dir: PathBuf::from(raw.profiles_dir.into_inner()),
            launcher: PathBuf::from(raw.launcher.into_inner()),
            launch_socket: raw.launch_socket.map(|s| PathBuf::from(s.into_inner())),
            default_profile: raw.default_profile,
            uid_min: raw.uid_min.into_inner(),
            uid_max: raw.uid_max,
            cgroup_name: raw.cgroup_name.into_inner(),
            service_uids: raw.service_uids,
            max_workers: raw.max_workers.into_inner(),
            max_workers_per_user: raw.max_workers_per_user.into_inner(),
            stop_grace_seconds: raw.stop_grace_seconds,
            max_message_bytes: raw.max_message_bytes.into_inner(),
            log_max_bytes: raw.log_max_bytes,
            exited_history: raw.exited_history,
            warm_inits: raw.warm_inits.map_or(WARM_INITS, Spanned::into_inner),
            primed_inits: raw.primed_inits.map_or(PRIMED_INITS, Spanned::into_inner),
            metrics_listen,
            audit_log: PathBuf::from(raw.audit_log.into_inner()),
            audit_max_bytes: raw.audit_max_bytes,
            audit_keep: raw.audit_keep,
            sample_interval_seconds: raw.sample_interval_seconds.into_inner(),
            events_buffer: raw.events_buffer,
            landlock_audit: raw.landlock_audit,
            claude_binary: (!raw.claude_binary.is_empty()).then(|| PathBuf::from(&raw.claude_binary)),
            claude_install_dir: PathBuf::from(raw.claude_install_dir),
            credentials_dir: PathBuf::from(raw.credentials_dir),
            max_connections_per_worker: raw.max_connections_per_worker.into_inner(),
            hosts,
            gateway: GatewayConfig {
                upstream: raw.gateway.upstream,
                extra_ca: (!extra_ca.is_empty()).then(|| PathBuf::from(extra_ca)),
                count_cache_reads: raw.gateway.count_cache_reads,
                max_request_bytes: raw.gateway.max_request_bytes.0,
                budget: raw.gateway.budget,
                users: raw
                    .gateway
                    .users
                    .into_iter()
                    .map(|(u, b)| (u.into_inner(), b))
                    .collect(),
            },
            audit_max_age: raw.audit_max_age.map(u64::from),
            audit_budget: raw.audit_budget,
            rate_limits: raw.rate_limits.into_inner(),
            client_timeout_seconds: raw.client_timeout_seconds.into_inner(),
            max_connections_per_caller: raw.max_connections_per_caller.into_inner(),
            disk_limits: raw
                .disk_limits
                .into_iter()
                .map(|(u, b)| (u.into_inner(), b.0))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let c = Config::parse("embedded:wardend.toml", DEFAULT_CONFIG).unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/warden/warden.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/warden"));
        assert!(c.uid_min >= 1000);
        // The written-out limits are the ones a config without them gets.
        assert_eq!(c.rate_limits, RateLimits::default());
        assert_eq!(c.audit_budget, default_audit_budget());
        assert_eq!(c.audit_max_age, None);
    }

    #[test]
    fn rate_limits_are_checked_where_they_are_written() {
        let bad = DEFAULT_CONFIG.replace("rate = \"60/min\"", "rate = \"60 per minute\"");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("expected a rate like"), "{e}");
        let bad = DEFAULT_CONFIG.replace("pending_approvals = 16", "pending_approvals = 0");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("pending_approvals: expected at least 1"), "{e}");
        let aged = DEFAULT_CONFIG.replace("# audit_max_age = \"90d\"", "audit_max_age = \"90d\"");
        assert_eq!(Config::parse("w.toml", &aged).unwrap().audit_max_age, Some(90 * 86400));
    }

    #[test]
    fn errors_name_the_place() {
        let bad = DEFAULT_CONFIG.replace("max_workers = ", "max_workerz = ");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("w.toml:") && e.contains("unknown field `max_workerz`"),
            "{e}"
        );
        let bad = DEFAULT_CONFIG.replace("uid_min = 2100000000", "uid_min = 0");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("uid_min"), "{e}");
        let bad = DEFAULT_CONFIG.replace("state_dir = \"/var/lib/warden\"", "state_dir = \"var/lib\"");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("expected an absolute path"), "{e}");
        let host = |line: &str| DEFAULT_CONFIG.replace("[hosts]\n", &format!("[hosts]\n{line}\n"));
        let bad = host("\"git.test\" = \"not-an-ip\"");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("hosts: expected an IP address for git.test"), "{e}");
        let ok = host("\"Git.Test.\" = \"127.0.0.1\"");
        let c = Config::parse("w.toml", &ok).unwrap();
        assert_eq!(c.hosts["git.test"], IpAddr::from([127, 0, 0, 1]));
        let bad = format!("{DEFAULT_CONFIG}[gateway.users.\"../x\"]\ntokens_per_day = 1\n");
        let e = Config::parse("w.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("gateway.users: user name"), "{e}");
    }

    #[test]
    fn budgets_are_the_default_with_a_users_overrides() {
        let text = DEFAULT_CONFIG.replace(
            "[gateway.budget]\n",
            "[gateway.budget]\ntokens_per_day = 1000\nrequests_per_minute = 60\n",
        ) + "[gateway.users.alice]\ntokens_per_day = 50\nconcurrent_requests = 2\n";
        let c = Config::parse("w.toml", &text).unwrap();
        assert_eq!(c.gateway.upstream.text, "https://api.anthropic.com");
        let alice = c.gateway.budget_for("alice");
        assert_eq!(
            (
                alice.tokens_per_day,
                alice.requests_per_minute,
                alice.concurrent_requests
            ),
            (Some(50), Some(60), Some(2))
        );
        assert_eq!(c.gateway.budget_for("bob").tokens_per_day, Some(1000));
    }

    #[test]
    fn metrics_listen_on_loopback_or_a_unix_socket_only() {
        let with = |v: &str| DEFAULT_CONFIG.replace("metrics_listen = []", &format!("metrics_listen = {v}"));
        assert!(Config::embedded().metrics_listen.is_empty());
        let c = Config::parse(
            "w.toml",
            &with(r#"["127.0.0.1:9187", "[::1]:9187", "unix:/run/warden/m.sock"]"#),
        )
        .unwrap();
        assert_eq!(
            c.metrics_listen,
            [
                MetricsListen::Tcp("127.0.0.1:9187".parse().unwrap()),
                MetricsListen::Tcp("[::1]:9187".parse().unwrap()),
                MetricsListen::Unix(PathBuf::from("/run/warden/m.sock")),
            ]
        );
        for (bad, says) in [
            (r#"["0.0.0.0:9187"]"#, "expected a loopback address"),
            (r#"["10.0.0.1:9187"]"#, "expected a loopback address"),
            (r#"["localhost"]"#, "expected an address like"),
            (r#"["unix:run/m.sock"]"#, "absolute path"),
        ] {
            let e = Config::parse("w.toml", &with(bad)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("w.toml:"), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_limits_name_users_and_sizes() {
        let with = |entry: &str| DEFAULT_CONFIG.replace("[disk_limits]\n", &format!("[disk_limits]\n{entry}\n"));
        assert!(Config::embedded().disk_limits.is_empty());
        let c = Config::parse("w.toml", &with("alice = \"20G\"")).unwrap();
        assert_eq!(c.disk_limits.get("alice"), Some(&(20 << 30)));
        let e = Config::parse("w.toml", &with("\"../x\" = \"1G\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk_limits: user name"), "{e}");
        assert!(Config::parse("w.toml", &with("alice = \"lots\"")).is_err());
    }
}
