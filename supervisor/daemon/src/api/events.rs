//! `warden.v1.Events`.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use warden_proto::v1 as pb;

use super::caller;
use crate::auth::Caller;
use crate::events::{Event, Filter, KINDS};
use crate::workers::Supervisor;

#[derive(Debug)]
pub struct EventsApi {
    pub sup: Arc<Supervisor>,
}

fn visible(c: &Caller, e: &Event) -> bool {
    match &e.user {
        Some(u) => c.may_act_for(u),
        None => c.is_admin(),
    }
}

fn to_pb(e: &Event) -> pb::WatchResponse {
    pb::WatchResponse {
        msg: Some(pb::watch_response::Msg::Event(pb::Event {
            seq: e.seq,
            time_ms: i64::try_from(e.time_ms).unwrap_or(i64::MAX),
            worker: e.worker.clone().unwrap_or_default(),
            user: e.user.clone().unwrap_or_default(),
            kind: e.kind.name().to_string(),
            json: serde_json::to_string(e).unwrap_or_default(),
        })),
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::events_server::Events for EventsApi {
    type WatchStream = Out;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Out>, Status> {
        let c = caller(&req, &self.sup.config)?;
        let r = req.into_inner();
        for k in &r.kinds {
            if !KINDS.contains(&k.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "kinds: unknown kind {k:?}; expected one of {}",
                    KINDS.join(", ")
                )));
            }
        }
        if !r.user.is_empty() && !c.may_act_for(&r.user) {
            return Err(super::denied(
                &self.sup.events,
                &c,
                "Events.Watch",
                Some(&r.user),
                format!("uid {} may not watch warden user {:?}", c.uid, r.user),
            ));
        }
        let filter = Filter {
            worker: (!r.worker.is_empty()).then(|| r.worker.clone()),
            user: (!r.user.is_empty()).then(|| r.user.clone()),
            kinds: r.kinds.clone(),
        };
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before replaying, so nothing published meanwhile is missed;
        // duplicates are dropped by sequence number.
        let mut live = self.sup.events.subscribe();
        let events = self.sup.events.clone();
        let from = if r.from_seq == 0 {
            events.last_seq() + 1
        } else {
            r.from_seq
        };
        let replay_only = r.replay_only;
        tokio::spawn(async move {
            let (rtx, mut rrx) = mpsc::channel::<Event>(256);
            let replay_events = events.clone();
            let replayer = tokio::task::spawn_blocking(move || {
                replay_events.replay(from, |e| rtx.blocking_send(e).is_ok());
            });
            let mut last = from.saturating_sub(1);
            while let Some(e) = rrx.recv().await {
                last = e.seq;
                if filter.matches(&e) && visible(&c, &e) && tx.send(Ok(to_pb(&e))).await.is_err() {
                    return;
                }
            }
            let _ = replayer.await;
            if replay_only {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.seq <= last => {}
                    Ok(e) => {
                        last = e.seq;
                        if filter.matches(&e) && visible(&c, &e) && tx.send(Ok(to_pb(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let lagged = pb::WatchResponse {
                            msg: Some(pb::watch_response::Msg::Lagged(pb::Lagged { last_seq: last })),
                        };
                        let _ = tx.send(Ok(lagged)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::events::EventKind;

    #[test]
    fn subscribers_see_their_users_events_and_admins_the_daemons() {
        let event = |user: Option<&str>| Event {
            seq: 1,
            time_ms: 0,
            worker: None,
            user: user.map(str::to_string),
            kind: EventKind::DaemonStopping,
        };
        let alice = Caller {
            uid: 1000,
            pid: None,
            role: Role::User("alice".into()),
        };
        let admin = Caller {
            role: Role::Admin,
            ..alice.clone()
        };
        assert!(visible(&alice, &event(Some("alice"))));
        assert!(!visible(&alice, &event(Some("bob"))));
        assert!(!visible(&alice, &event(None)), "daemon-wide events are for admins");
        assert!(visible(&admin, &event(None)));
    }
}
