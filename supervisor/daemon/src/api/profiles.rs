//! `warden.v1.Profiles`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use warden_policy::{policy_digest, PolicyError, Profile, Source};
use warden_proto::v1 as pb;

use super::{caller, policy_status};
use crate::events::EventKind;
use crate::workers::Supervisor;

#[derive(Debug)]
pub struct ProfilesApi {
    pub sup: Arc<Supervisor>,
}

fn to_pb(p: &Profile) -> pb::Profile {
    pb::Profile {
        name: p.name.clone(),
        origin: p.origin.clone(),
        description: p.description.clone(),
        extends: p.extends.clone(),
        digest: policy_digest(p),
        resolved_json: serde_json::to_string_pretty(p).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::profiles_server::Profiles for ProfilesApi {
    async fn list(&self, req: Request<pb::ListProfilesRequest>) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let c = caller(&req, &self.sup).await?;
        let set = self.sup.profiles.current();
        // A caller acting for one warden user sees the profiles it may use.
        let groups = match c.default_user() {
            Some(user) if set.iter().any(|p| p.access.needs_groups(user)) => self.sup.accounts.group_names(user).await,
            _ => Default::default(),
        };
        let usable = |p: &&warden_policy::Profile| match c.default_user() {
            _ if c.may_act_for_everyone() => true,
            Some(user) => p.access.allows(user, &groups),
            None => p.access.is_everyone(),
        };
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: set.iter().filter(usable).map(to_pb).collect(),
        }))
    }

    async fn get(&self, req: Request<pb::GetProfileRequest>) -> Result<Response<pb::Profile>, Status> {
        let c = caller(&req, &self.sup).await?;
        let set = self.sup.profiles.current();
        let p = set.get(&req.get_ref().name).map_err(|e| match e {
            // The one call where the profile is the thing looked up.
            PolicyError::UnknownProfile(_) => Status::not_found(e.to_string()),
            other => policy_status(&other, &c),
        })?;
        Ok(Response::new(to_pb(p)))
    }

    async fn validate(&self, req: Request<pb::ValidateProfileRequest>) -> Result<Response<pb::Profile>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let name = if r.name.is_empty() {
            "unnamed".to_string()
        } else {
            r.name
        };
        let source = Source {
            origin: format!("{name}.toml"),
            name,
            text: r.toml,
        };
        let set = self.sup.profiles.current();
        let p = set.check(source).map_err(|e| policy_status(&e, &c))?;
        Ok(Response::new(to_pb(&p)))
    }

    async fn reload(
        &self,
        req: Request<pb::ReloadProfilesRequest>,
    ) -> Result<Response<pb::ReloadProfilesResponse>, Status> {
        let c = caller(&req, &self.sup).await?;
        if !c.is_admin() {
            return Err(super::denied(
                &self.sup,
                &c,
                "Profiles.Reload",
                None,
                "Only admins may reload profiles".into(),
            )
            .await);
        }
        match self.sup.profiles.reload() {
            Ok(loaded) => {
                tracing::info!(?loaded, "profiles reloaded");
                self.sup
                    .events
                    .submit(None, None, EventKind::ProfilesReloaded { loaded: loaded.clone() })
                    .written()
                    .await;
                Ok(Response::new(pb::ReloadProfilesResponse { loaded }))
            }
            Err(e) => {
                tracing::error!(error = %e, "profile reload failed; keeping the old set");
                self.sup
                    .events
                    .submit(None, None, EventKind::ProfileReloadFailed { error: e.to_string() })
                    .written()
                    .await;
                Err(policy_status(&e, &c))
            }
        }
    }
}
