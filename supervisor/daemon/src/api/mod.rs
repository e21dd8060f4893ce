//! The gRPC surface: thin handlers that validate, authorize, call into the
//! domain and map the error. Errors become `tonic::Status` here and only
//! here; internal detail (paths, errno text) reaches admins only.

pub mod events;
pub mod profiles;
pub mod workers;

use tonic::{Code, Request, Status};

use crate::auth::{identify, Caller};
use crate::events::{EventKind, Events};
use crate::workers::WorkerError;
use warden_policy::config::Config;

/// The authenticated caller of a request (from SO_PEERCRED).
pub fn caller<T>(req: &Request<T>, config: &Config) -> Result<Caller, Status> {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| Status::unauthenticated("Peer credentials are unavailable"))?;
    Ok(identify(cred.uid(), cred.pid(), config))
}

/// Refuses a caller who may not act for `user`, and audits the refusal.
pub fn authorize(events: &Events, caller: &Caller, user: &str, method: &str) -> Result<(), Status> {
    if caller.may_act_for(user) {
        Ok(())
    } else {
        let message = format!("uid {} may not act for warden user {user:?}", caller.uid);
        Err(denied(events, caller, method, Some(user), message))
    }
}

/// Logs and audits a refused call; returns the PERMISSION_DENIED status.
pub fn denied(events: &Events, caller: &Caller, method: &str, user: Option<&str>, message: String) -> Status {
    tracing::warn!(uid = caller.uid, pid = ?caller.pid, method, user, "permission denied");
    events.publish(
        None,
        None,
        EventKind::AuthDenied {
            peer_uid: caller.uid,
            peer_pid: caller.pid,
            method: method.to_string(),
            target_user: user.map(str::to_string),
        },
    );
    Status::permission_denied(message)
}

/// The one mapping of domain errors to gRPC status codes.
pub fn status(e: &WorkerError, caller: &Caller) -> Status {
    use WorkerError as E;
    let code = match e {
        E::NotFound(_) | E::NoApproval(_) => Code::NotFound,
        E::Claude(crate::claude::ClaudeError::Binary(_) | crate::claude::ClaudeError::Credentials { .. }) => {
            Code::FailedPrecondition
        }
        E::User(crate::users::UserError::Name(_)) | E::Policy(warden_policy::PolicyError::Request(_)) => {
            Code::InvalidArgument
        }
        E::Policy(warden_policy::PolicyError::UnknownProfile(_)) => Code::InvalidArgument,
        E::LoosenedLimit { .. } => Code::InvalidArgument,
        E::TooMany { .. } | E::TooManyForUser { .. } => Code::ResourceExhausted,
        E::Launch(crate::launcher::LaunchError::Setup { .. }) => Code::FailedPrecondition,
        E::Exited(_) => Code::FailedPrecondition,
        E::ShuttingDown => Code::Unavailable,
        _ => Code::Internal,
    };
    let message = if code == Code::Internal && !caller.is_admin() {
        tracing::error!(error = %e, "internal error");
        "Internal error; the daemon's log has the details".to_string()
    } else {
        e.to_string()
    };
    Status::new(code, message)
}
