//! The gRPC surface: thin handlers that validate, authorize, call into the
//! domain and map the error. Errors become `tonic::Status` here and only
//! here; internal detail (paths, errno text) reaches admins only.

pub mod authority;
pub mod events;
pub mod hpack;
pub mod metered;
pub mod metrics;
pub mod outbox;
pub mod profiles;
pub mod serve;
pub mod usage;
pub mod workers;

use tonic::{Code, Request, Status};

use crate::auth::Caller;
use crate::events::{clip, EventKind};
use crate::workers::{Supervisor, WorkerError};
use warden_policy::PolicyError;

/// Runs `work` to its end even if the client goes away meanwhile (a
/// handler's future is dropped when its client resets the stream). For
/// work that must not stop halfway: a spawn that has a process and a
/// cgroup but no registration, a stop that has sent SIGTERM but would
/// never escalate.
pub async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work).await.map_err(|e| {
        tracing::error!(error = %e, "a request's work failed");
        Status::internal("wardend failed to carry out the request (see its log)")
    })
}

/// The authenticated caller of a request (from SO_PEERCRED), its role
/// from the account database (asked off the async threads, see
/// [`crate::auth::Accounts`]).
pub fn caller<T>(
    req: &Request<T>,
    sup: &Supervisor,
) -> impl std::future::Future<Output = Result<Caller, Status>> + Send + 'static {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| Status::unauthenticated("Peer credentials are unavailable"));
    let accounts = sup.accounts.clone();
    async move {
        let cred = cred?;
        Ok(accounts.caller(cred.uid(), cred.pid()).await)
    }
}

/// Refuses a caller who may not act for `user`, and audits the refusal.
pub async fn authorize(sup: &Supervisor, caller: &Caller, user: &str, method: &str) -> Result<(), Status> {
    if caller.may_act_for(user) {
        Ok(())
    } else {
        let message = format!("uid {} may not act for warden user {:?}", caller.uid, clip(user, 256));
        Err(denied(sup, caller, method, Some(user), message).await)
    }
}

/// Logs and audits a refused call (at most as often as the calling uid's
/// `auth_denied_per_peer` limit allows; each report counts those left out
/// since the last); returns the PERMISSION_DENIED status once the report
/// is on disk, so that no refusal is answered before it is in the audit
/// log (each costs the writer a sync, bounded by the same limit).
pub async fn denied(sup: &Supervisor, caller: &Caller, method: &str, user: Option<&str>, message: String) -> Status {
    if let Some(suppressed) = sup.limiters.auth_denied_per_peer.admit(&caller.uid) {
        tracing::warn!(uid = caller.uid, pid = ?caller.pid, method, user, suppressed, "permission denied");
        sup.events
            .submit(
                None,
                None,
                EventKind::AuthDenied {
                    peer_uid: caller.uid,
                    peer_pid: caller.pid,
                    method: method.to_string(),
                    target_user: user.map(|u| clip(u, 256)),
                    suppressed,
                },
            )
            .written()
            .await;
    }
    Status::permission_denied(message)
}

/// The one mapping of domain errors to gRPC status codes: every variant
/// is listed, so a new error must be placed here to compile.
pub fn status(e: &WorkerError, caller: &Caller) -> Status {
    use crate::claude::ClaudeError as Claude;
    use crate::launcher::LaunchError as Launch;
    use crate::users::UserError as User;
    use WorkerError as E;
    let code = match e {
        E::NotFound(_) | E::NoApproval(_) => Code::NotFound,
        E::LoosenedLimit { .. } => Code::InvalidArgument,
        E::Admission(_) => Code::ResourceExhausted,
        E::Exited(_) => Code::FailedPrecondition,
        E::ShuttingDown => Code::Unavailable,
        E::Policy(p) => policy_code(p),
        E::User(u) => match u {
            User::Name(_) => Code::InvalidArgument,
            User::Exhausted { .. } => Code::ResourceExhausted,
            // The user's own directories are not what warden made them.
            User::NotADirectory { .. } | User::Collision { .. } => Code::FailedPrecondition,
            User::BadRange { .. }
            | User::Read { .. }
            | User::Corrupt { .. }
            | User::Save { .. }
            | User::Dir { .. }
            | User::UnsafeStateDir { .. }
            | User::SubordinateOverlap { .. }
            | User::Project { .. } => Code::Internal,
        },
        E::Disk(d) => match d {
            // The admin asked for a limit this host cannot enforce.
            crate::disk::DiskError::Unenforceable { .. } => Code::FailedPrecondition,
            crate::disk::DiskError::SetLimit { .. } => Code::Internal,
        },
        E::Claude(c) => match c {
            Claude::Request(_) => Code::InvalidArgument,
            Claude::Binary(_) | Claude::Credentials { .. } | Claude::NoCredential { .. } => Code::FailedPrecondition,
            Claude::Io { .. } => Code::Internal,
        },
        E::Launch(l) => match l {
            // The sandbox could not be built for this request (a missing
            // command, a profile the kernel cannot enforce).
            Launch::Setup { .. } => Code::FailedPrecondition,
            // The launch server is not there (being restarted by systemd).
            Launch::Connect { .. } | Launch::Server(_) => Code::Unavailable,
            // (A mismatch is handled inside the spawn, never answered.)
            Launch::Spawn { .. }
            | Launch::Pipe(_)
            | Launch::NoReport { .. }
            | Launch::Descriptors { .. }
            | Launch::Mismatch => Code::Internal,
        },
        E::Cgroup(_) | E::Record(_) | E::Logs { .. } | E::Arch | E::Signal { .. } | E::Task(_) => Code::Internal,
    };
    respond(code, e, caller)
}

/// The status of a profile error (`Profiles` calls, unknown profiles).
pub fn policy_status(e: &PolicyError, caller: &Caller) -> Status {
    respond(policy_code(e), e, caller)
}

fn policy_code(e: &PolicyError) -> Code {
    match e {
        PolicyError::UnknownProfile(_) | PolicyError::Request(_) | PolicyError::Invalid { .. } => Code::InvalidArgument,
        PolicyError::Read { .. } | PolicyError::ReadConfig { .. } | PolicyError::ReadDir { .. } => Code::Internal,
    }
}

/// A status with `e`'s message, except that internal failures (paths,
/// errno text) reach admins only; others are pointed at the daemon's log.
fn respond(code: Code, e: &dyn std::fmt::Display, caller: &Caller) -> Status {
    if code == Code::Internal {
        tracing::error!(error = %e, "internal error");
        if !caller.is_admin() {
            return Status::new(code, "Internal error; the daemon's log has the details");
        }
    }
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn caller(role: Role) -> Caller {
        Caller {
            uid: 1000,
            pid: None,
            role,
        }
    }

    #[test]
    fn errors_map_to_codes_and_internal_detail_reaches_admins_only() {
        let user = caller(Role::User("alice".into()));
        let admin = caller(Role::Admin);
        let cases: Vec<(WorkerError, Code)> = vec![
            (WorkerError::NotFound("w1".into()), Code::NotFound),
            (
                WorkerError::Policy(PolicyError::UnknownProfile("x".into())),
                Code::InvalidArgument,
            ),
            (
                WorkerError::Admission(crate::workers::admission::AdmissionError::TooMany { running: 1, limit: 1 }),
                Code::ResourceExhausted,
            ),
            (
                WorkerError::Launch(crate::launcher::LaunchError::Setup {
                    stage: "exec".into(),
                    errno: 2,
                    errno_name: "ENOENT".into(),
                    message: "Cannot execute x".into(),
                }),
                Code::FailedPrecondition,
            ),
            (
                WorkerError::Claude(crate::claude::ClaudeError::Request("model".into())),
                Code::InvalidArgument,
            ),
            (WorkerError::ShuttingDown, Code::Unavailable),
        ];
        for (e, code) in cases {
            let s = status(&e, &user);
            assert_eq!(s.code(), code, "{e}");
            assert_eq!(s.message(), e.to_string());
        }
        let internal = WorkerError::Logs {
            path: "/var/lib/warden/logs".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let s = status(&internal, &user);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/var/lib/warden"), "{}", s.message());
        assert!(status(&internal, &admin).message().contains("/var/lib/warden/logs"));
    }
}
