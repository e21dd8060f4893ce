//! wardend's domain: the host-side pieces that surround every worker.
//! Modules depend downwards only, in this order (each may use those above
//! it):
//!
//! - [`audit`] and [`events`]: numbered events, durable before published;
//!   the time helpers.
//! - [`disk`]: per-user disk limits, as project quotas of the state
//!   directory's file system.
//! - [`users`]: warden user and project names, their dedicated uids and their
//!   per-user directories (each user's tree one project).
//! - [`cgroups`]: one cgroup per worker under warden's own subtree, with
//!   limits, usage and a kill that reaches every process.
//! - [`launcher`]: starts `warden-launch` with a compiled spec and reads its
//!   typed report.
//! - [`io`]: a worker's output logs and stdin.
//! - [`denials`] and [`landlock_audit`]: seccomp and landlock denials,
//!   answered and reported.
//! - [`usage`]: API usage over windows and the budgets it is held to.
//! - [`net`]: a worker's way out: the proxy on listeners in its own network
//!   namespace, the one policy decision per destination, its traffic.
//! - [`claude`]: what a Claude Code worker needs before it starts, and the
//!   session the daemon drives while it runs.
//! - [`profiles`]: the loaded profile set and its atomic reload.
//! - [`workers`]: the registry, spawn in phases, admission, exit, stop,
//!   recovery of a crashed daemon's workers.
//! - [`auth`]: callers from SO_PEERCRED and who may act for whom.
//! - [`api`]: the gRPC handlers, and the one mapping of errors to statuses.
//! - [`metrics`]: counters of what happened and gauges of what is held, in
//!   Prometheus's text format.
//!
//! Unsafe code lives in [`sys`] only (fds from SCM_RIGHTS and systemd, the
//! seccomp notification ioctls, the project-quota calls).

#![deny(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod cgroups;
pub mod claude;
pub mod denials;
pub mod disk;
pub mod events;
pub mod io;
pub mod landlock_audit;
pub mod launcher;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod paths;
pub mod profiles;
#[allow(unsafe_code)]
pub mod sys;
pub mod usage;
pub mod users;
pub mod workers;

/// For tests that need root, namespaces and cgroups: true when they can run.
/// Without privilege they skip with a message, unless
/// `WARDEN_REQUIRE_PRIVILEGED=1` (CI), where a skip would hide an untested
/// sandbox, so it panics instead.
pub fn privileged(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("WARDEN_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("WARDEN_REQUIRE_PRIVILEGED=1 but this test cannot run without root: {why}");
    }
    eprintln!("skipped (needs root: {why})");
    false
}
