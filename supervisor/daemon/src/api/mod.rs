//! The gRPC surface: thin handlers that validate, authorize, call into the
//! domain and map the error. Errors become `tonic::Status` here and only
//! here; internal detail (paths, errno text) reaches admins only.

pub mod profiles;
pub mod workers;

use tonic::{Code, Request, Status};

use crate::auth::{identify, Caller};
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

/// Refuses (and logs) a caller who may not act for `user`.
pub fn authorize(caller: &Caller, user: &str, method: &str) -> Result<(), Status> {
    if caller.may_act_for(user) {
        Ok(())
    } else {
        tracing::warn!(uid = caller.uid, pid = ?caller.pid, method, user, "permission denied");
        Err(Status::permission_denied(format!(
            "uid {} may not act for warden user {user:?}",
            caller.uid
        )))
    }
}

/// The one mapping of domain errors to gRPC status codes.
pub fn status(e: &WorkerError, caller: &Caller) -> Status {
    use WorkerError as E;
    let code = match e {
        E::NotFound(_) => Code::NotFound,
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
