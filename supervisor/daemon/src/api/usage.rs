//! `warden.v1.Usage`.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};
use warden_proto::v1 as pb;

use super::{authorize, caller};
use crate::usage::Totals;
use crate::workers::Supervisor;

#[derive(Debug)]
pub struct UsageApi {
    pub sup: Arc<Supervisor>,
}

fn totals(t: &Totals) -> Option<pb::ApiTotals> {
    Some(super::workers::api_pb(t))
}

#[tonic::async_trait]
impl pb::usage_server::Usage for UsageApi {
    async fn get(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let c = caller(&req, &self.sup).await?;
        let asked = req.into_inner().user;
        let ledger = &self.sup.ledger;
        let users: Vec<String> = if asked.is_empty() {
            // Admins and services see everyone; a local user their own.
            match c.default_user() {
                _ if c.may_act_for_everyone() => {
                    let mut all: std::collections::BTreeSet<String> = ledger.users().into_iter().collect();
                    all.extend(self.sup.users.known());
                    all.into_iter().collect()
                }
                Some(own) => vec![own.to_string()],
                None => Vec::new(),
            }
        } else {
            warden_policy::names::check_user(&asked).map_err(|e| Status::invalid_argument(format!("user: {e}")))?;
            authorize(&self.sup, &c, &asked, "Usage.Get").await?;
            vec![asked]
        };
        let now = SystemTime::now();
        let gw = &self.sup.config.gateway;
        let users_pb = users
            .iter()
            .map(|u| {
                let usage = ledger.user(u, now);
                let b = gw.budget_for(u);
                pb::UserUsage {
                    user: u.clone(),
                    day: usage.day.clone(),
                    today: totals(&usage.today),
                    month: usage.month.clone(),
                    this_month: totals(&usage.this_month),
                    all_time: totals(&usage.all_time),
                    budget: Some(pb::Budget {
                        tokens_per_day: b.tokens_per_day.unwrap_or(0),
                        tokens_per_month: b.tokens_per_month.unwrap_or(0),
                        requests_per_minute: b.requests_per_minute.unwrap_or(0),
                        concurrent_requests: b.concurrent_requests.unwrap_or(0),
                        count_cache_reads: gw.count_cache_reads,
                    }),
                    disk: self
                        .sup
                        .users
                        .known_uid(u)
                        .and_then(|uid| self.sup.disk.usage(uid))
                        .map(|q| pb::DiskUsage {
                            bytes: q.bytes,
                            files: q.files,
                            limit_bytes: q.bytes_limit,
                            limit_files: q.files_limit,
                        }),
                }
            })
            .collect();
        let workers = ledger
            .workers()
            .into_iter()
            .filter(|w| users.contains(&w.user))
            .map(|w| pb::WorkerApiUsage {
                worker: w.worker,
                user: w.user,
                totals: totals(&w.totals),
            })
            .collect();
        Ok(Response::new(pb::UsageResponse {
            users: users_pb,
            workers,
        }))
    }
}
