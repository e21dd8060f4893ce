//! wardend: the warden daemon.
//!
//! Start-up, in order: configuration and profiles are parsed and validated
//! (a bad one exits 64 with file:line:column), the state dir, users and
//! cgroups are opened, leftovers of a previous run are cleaned up and
//! reported as lost, the socket is bound (or taken from systemd), then the
//! gRPC server runs until SIGTERM/SIGINT. SIGHUP reloads the profiles.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use warden_daemon::api::events::EventsApi;
use warden_daemon::api::profiles::ProfilesApi;
use warden_daemon::api::usage::UsageApi;
use warden_daemon::api::workers::WorkersApi;
use warden_daemon::cgroups::Cgroups;
use warden_daemon::events::{EventKind, Events, ExitReason, Settings};
use warden_daemon::launcher::Launcher;
use warden_daemon::net::gateway::Upstream;
use warden_daemon::profiles::Profiles;
use warden_daemon::users::Users;
use warden_daemon::workers::Supervisor;
use warden_policy::config::Config;
use warden_proto::v1::events_server::EventsServer;
use warden_proto::v1::profiles_server::ProfilesServer;
use warden_proto::v1::usage_server::UsageServer;
use warden_proto::v1::workers_server::WorkersServer;

/// Exit status for a bad configuration or profile (EX_USAGE... sysexits' EX_DATAERR is 65;
/// DESIGN.md and systemd's RestartPreventExitStatus use 64).
const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "wardend",
    version,
    about = "The warden daemon: runs sandboxed AI coding agents for many users"
)]
struct Args {
    /// Configuration file; the embedded default is used when the default path is absent.
    #[arg(long, default_value = "/etc/warden/wardend.toml")]
    config: PathBuf,
    /// Listen on this Unix socket instead of the configured one.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Use this state directory instead of the configured one.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Read site profiles from this directory instead of the configured one.
    #[arg(long)]
    profiles_dir: Option<PathBuf>,
    /// Ask the launch server listening here (systemd's warden-launch.socket)
    /// instead of starting one.
    #[arg(long)]
    launch_socket: Option<PathBuf>,
    /// Validate the configuration and profiles, then exit.
    #[arg(long)]
    check: bool,
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd (JOURNAL_STREAM set) log structured fields to journald.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry().with(filter).with(journald).init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn launcher_path(configured: &Path) -> PathBuf {
    if configured.components().count() > 1 {
        return configured.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(configured)))
        .unwrap_or_else(|| configured.to_path_buf())
}

fn bind(path: &Path, group: &str) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("Cannot create {}", parent.display()))?;
    }
    // A stale socket of a previous run: only remove a socket, never a file.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("Cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).with_context(|| format!("Cannot bind {}", path.display()))?;
    let gid = warden_daemon::auth::gid_of(group);
    if gid.is_none() {
        tracing::warn!(group, "socket group does not exist; the socket is root-only");
    }
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), gid)
        .with_context(|| format!("Cannot chown {}", path.display()))?;
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(if gid.is_some() { 0o660 } else { 0o600 }),
    )
    .with_context(|| format!("Cannot chmod {}", path.display()))?;
    Ok(listener)
}

fn main() {
    let args = Args::parse();
    init_logging();
    let default_path = args.config == Path::new("/etc/warden/wardend.toml");
    let mut config = match Config::load(&args.config, default_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wardend: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(s) = args.state_dir {
        config.state_dir = s;
    }
    if let Some(p) = args.profiles_dir {
        config.profiles_dir = p;
    }
    if let Some(p) = args.launch_socket {
        config.launch_socket = Some(p);
    }
    let profiles = match Profiles::load(&config.profiles_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wardend: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if args.check {
        println!(
            "wardend: {} and profiles {} are valid",
            config.origin,
            profiles.current().names().collect::<Vec<_>>().join(", ")
        );
        return;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wardend: Cannot start the async runtime: {e}");
            std::process::exit(71);
        }
    };
    if let Err(e) = runtime.block_on(run(config, profiles)) {
        tracing::error!("{e:#}");
        eprintln!("wardend: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: Config, profiles: Profiles) -> anyhow::Result<()> {
    // The daemon's directories: nobody else may write them, and only the
    // admin group may read the audit log.
    let admin_gid = warden_daemon::auth::gid_of(&config.admin_group);
    {
        use warden_daemon::paths::{secure_dir, Existing};
        secure_dir(&config.state_dir, 0o700, None, Existing::Own)?;
        for sub in ["logs", "workers"] {
            secure_dir(&config.state_dir.join(sub), 0o700, None, Existing::Own)?;
        }
        if let Some(dir) = config.audit_log.parent() {
            secure_dir(dir, 0o750, admin_gid, Existing::Check)?;
        }
    }
    let users = Users::open(&config.state_dir, config.uid_min..=config.uid_max)
        .with_context(|| format!("Cannot open the state directory {}", config.state_dir.display()))?;
    let cgroups = Cgroups::detect(&config.cgroup_name).context("Cannot set up cgroups")?;
    let launcher = launcher_path(&config.launcher);
    if config.launch_socket.is_none() {
        anyhow::ensure!(launcher.exists(), "The launcher {} does not exist", launcher.display());
    }
    let launcher = Arc::new(Launcher::new(&launcher, config.launch_socket.as_deref()));
    launcher.connect().context("Cannot start or reach the launch server")?;
    let (events, recovery) = Events::open(Settings::from_config(&config)).context("Cannot open the audit log")?;
    log_retention(&config, events.capacity());
    if recovery.torn_bytes > 0 {
        tracing::warn!(
            bytes = recovery.torn_bytes,
            "cut a torn last line off the audit log (a crash mid-write)"
        );
    }
    let events = Arc::new(events);
    // Every event written is counted for the metrics.
    events.observe(warden_daemon::metrics::global().clone());
    let upstream = Upstream::new(&config.gateway, config.hosts.clone().into_iter().collect())
        .context("Cannot set up the API gateway's upstream client")?;
    let sup = Arc::new(Supervisor::new(
        config.clone(),
        users,
        cgroups,
        profiles,
        events.clone(),
        launcher,
        upstream,
    ));
    tracing::info!(
        state_dir = %config.state_dir.display(),
        "disk limits: {} on the state directory's file system",
        sup.disk.support()
    );
    // The usage ledger is written at most a second after it changes, and at
    // the end.
    let ledger = sup.ledger.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let l = ledger.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || l.flush()).await {
                tracing::error!(error = %e, "cannot write the usage ledger");
            }
        }
    });
    // Freed memory goes back to the kernel every 10 s (a few ms of work),
    // from a thread of its own.
    std::thread::Builder::new()
        .name("release-memory".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            warden_daemon::sys::release_free_memory();
        })
        .context("Cannot start a thread")?;
    let lost = sup.recover();
    for w in &lost {
        events.publish(
            Some(&w.id),
            Some(&w.user),
            EventKind::WorkerExited {
                code: -1,
                signal: 0,
                reason: ExitReason::Lost,
                duration_ms: 0,
                cpu_time_us: 0,
                peak_memory: 0,
                network: None,
                api: None,
                stages: Vec::new(),
            },
        );
    }
    events
        .submit(
            None,
            None,
            EventKind::DaemonStarted {
                version: env!("CARGO_PKG_VERSION").to_string(),
                cgroup_v2: sup.cgroups.is_v2(),
                lost: lost.iter().map(|w| w.id.clone()).collect(),
                audit_torn_bytes: recovery.torn_bytes,
            },
        )
        .written()
        .await;
    // Workers' inits made ahead of their spawns, from now on.
    sup.keep_warm();
    sup.keep_primed();
    // Metrics, where the admin asked for them.
    let metrics = warden_daemon::api::metrics::bind(&config.metrics_listen, admin_gid)?;
    for l in &config.metrics_listen {
        tracing::info!(listen = ?l, "metrics served at /metrics");
    }
    warden_daemon::api::metrics::serve(metrics, sup.clone());

    // Task rules wardend added to the kernel's audit, deleted at its end.
    let mut exemption = None;
    if config.landlock_audit {
        match warden_daemon::landlock_audit::open(true) {
            Ok((sock, exempted)) => {
                let alone = exempted.is_some();
                exemption = exempted;
                sup.landlock_audit.store(true, std::sync::atomic::Ordering::SeqCst);
                let (events, workers, rate) = (events.clone(), sup.clone(), config.rate_limits.worker_denials);
                std::thread::Builder::new()
                    .name("landlock-audit".into())
                    .spawn(move || warden_daemon::landlock_audit::serve(sock, alone, events, workers, rate))
                    .context("Cannot start the audit reader")?;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kernel audit stream; landlock denials are not reported")
            }
        }
    }

    // A socket systemd passed us belongs to wardend.socket: it stays when we
    // stop (so the next connection starts us again); one we bound is ours.
    let activated = warden_daemon::sys::activated_socket();
    let owns_socket = activated.is_none();
    let std_listener = match activated {
        Some(l) => l,
        None => bind(&config.socket, &config.socket_group)?,
    };
    std_listener
        .set_nonblocking(true)
        .context("Cannot make the socket non-blocking")?;
    let listener = UnixListener::from_std(std_listener).context("Cannot use the socket")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkersServer<WorkersApi>>().await;
    health.set_serving::<ProfilesServer<ProfilesApi>>().await;
    health.set_serving::<EventsServer<EventsApi>>().await;
    health.set_serving::<UsageServer<UsageApi>>().await;
    // Reflection in both versions clients ask for: v1 (grpcurl), and
    // v1alpha (grpcio's reflection client, older grpcurl, Postman).
    let reflection_of = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(warden_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_of()
        .build_v1()
        .context("Cannot build the reflection service")?;
    let reflection_v1alpha = reflection_of()
        .build_v1alpha()
        .context("Cannot build the reflection service")?;
    let max = config.max_message_bytes;
    let workers = WorkersServer::new(WorkersApi { sup: sup.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let profiles = ProfilesServer::new(ProfilesApi { sup: sup.clone() }).max_decoding_message_size(max);
    let events_api = EventsServer::new(EventsApi::new(sup.clone())).max_decoding_message_size(max);
    let usage_api = UsageServer::new(UsageApi { sup: sup.clone() }).max_decoding_message_size(max);

    let mut term = signal(SignalKind::terminate()).context("Cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("Cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("Cannot handle SIGHUP")?;
    let reload_sup = sup.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match reload_sup.profiles.reload() {
                Ok(loaded) => {
                    tracing::info!(?loaded, "profiles reloaded (SIGHUP)");
                    reload_sup
                        .events
                        .publish(None, None, EventKind::ProfilesReloaded { loaded });
                }
                Err(e) => {
                    tracing::error!(error = %e, "profile reload failed; keeping the old set");
                    reload_sup
                        .events
                        .publish(None, None, EventKind::ProfileReloadFailed { error: e.to_string() });
                }
            }
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_sup = sup.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: no new workers, stopping the running ones");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        shutdown_sup.events.publish(None, None, EventKind::DaemonStopping);
        shutdown_sup.shutdown().await;
        let _ = stop_tx.send(());
    });

    tracing::info!(socket = %config.socket.display(), cgroup_v2 = sup.cgroups.is_v2(), "wardend ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(workers)
        .add_service(profiles)
        .add_service(events_api)
        .add_service(usage_api);
    warden_daemon::api::serve::serve(
        listener,
        routes.routes(),
        warden_daemon::api::serve::Limits {
            connections_per_uid: config.max_connections_per_caller as usize,
            max_message: config.max_message_bytes,
            client_timeout: std::time::Duration::from_secs(config.client_timeout_seconds),
        },
        async {
            let _ = stop_rx.await;
        },
    )
    .await;
    if let Err(e) = sup.ledger.flush() {
        tracing::error!(error = %e, "cannot write the usage ledger");
    }
    let bus = events.clone();
    let _ = tokio::task::spawn_blocking(move || bus.flush()).await;
    if owns_socket && config.socket.exists() {
        let _ = std::fs::remove_file(&config.socket);
    }
    if let Some(e) = exemption {
        e.remove();
    }
    tracing::info!("wardend stopped");
    Ok(())
}

/// Says at start how long the audit log keeps others' events against a
/// flood: its capacity over what one identity may add per day.
fn log_retention(config: &Config, capacity: u64) {
    let budget = config.audit_budget;
    #[allow(clippy::cast_precision_loss)] // Byte counts far below 2^52.
    let seconds = capacity.saturating_sub(budget.burst) as f64 / budget.per_second;
    tracing::info!(
        capacity_bytes = capacity,
        burst_bytes = budget.burst,
        bytes_per_day = budget.per_second * 86400.0,
        "audit log: a flood by one user or caller pushes nobody else's events out in no less than {}",
        span(seconds)
    );
    if let Some(age) = config.audit_max_age {
        #[allow(clippy::cast_precision_loss)]
        let wanted = age as f64;
        if seconds < wanted {
            tracing::warn!(
                "audit_max_age is {}, but one identity at its audit_budget fills the log in {}: raise \
                 audit_max_bytes or audit_keep, or lower audit_budget",
                span(wanted),
                span(seconds)
            );
        }
    }
}

/// A span of time for people: seconds, hours or days.
fn span(seconds: f64) -> String {
    if seconds < 3600.0 {
        format!("{seconds:.0} s")
    } else if seconds < 86400.0 {
        format!("{:.1} hours", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86400.0)
    }
}
