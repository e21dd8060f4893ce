//! `warden.v1.Events`.
//!
//! A Watch replays from the audit log in bounded chunks (a few at a time
//! daemon-wide, each a short blocking read), then follows the live
//! broadcast; when it falls behind that, it goes back to the log. Per
//! subscriber the daemon holds a cursor, a broadcast receiver and a short
//! queue, whatever the subscriber does.

use std::sync::Arc;

use tokio::sync::{broadcast, Semaphore};
use tonic::{Request, Response, Status};
use warden_proto::v1 as pb;

use super::caller;
use super::outbox::{outbox, Gone, Out, Outbox};
use crate::audit::Cursor;
use crate::auth::Caller;
use crate::events::{Event, Events, Filter, KINDS};
use crate::workers::Supervisor;

/// Chunks of the log read at once, daemon-wide (each holds a blocking
/// thread for one bounded read).
const REPLAY_READERS: usize = 4;
/// Events queued per subscriber.
const QUEUE: usize = 16;

#[derive(Debug)]
pub struct EventsApi {
    pub sup: Arc<Supervisor>,
    replays: Arc<Semaphore>,
    turns: Turns,
}

impl EventsApi {
    pub fn new(sup: Arc<Supervisor>) -> Self {
        EventsApi {
            sup,
            replays: Arc::new(Semaphore::new(REPLAY_READERS)),
            turns: Turns::default(),
        }
    }
}

/// One reader of the log at a time per calling uid: the daemon-wide
/// readers then take their turns uid by uid (the semaphores are fair), so
/// a uid replaying on thousands of streams gets no more of them than
/// another replaying on one.
#[derive(Debug, Default)]
struct Turns(std::sync::Mutex<std::collections::HashMap<u32, Arc<Semaphore>>>);

impl Turns {
    fn of(&self, uid: u32) -> Arc<Semaphore> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Uids with no stream left go.
        m.retain(|_, s| Arc::strong_count(s) > 1);
        m.entry(uid).or_insert_with(|| Arc::new(Semaphore::new(1))).clone()
    }
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

/// A Watch stream open, counted for the metrics while it lives.
struct Watching;

impl Watching {
    fn new() -> Self {
        crate::metrics::global()
            .streams
            .watchers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Watching
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        crate::metrics::global()
            .streams
            .watchers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One subscriber's stream.
struct Subscriber {
    events: Arc<Events>,
    replays: Arc<Semaphore>,
    /// This caller's uid's turn at the readers.
    turn: Arc<Semaphore>,
    caller: Caller,
    filter: Filter,
    out: Outbox<pb::WatchResponse>,
    /// Where replays read the log from.
    cursor: Cursor,
    /// The last sequence number looked at (sent or filtered out).
    last: u64,
}

impl Subscriber {
    /// Replays, then follows; back to the log whenever it falls behind.
    async fn run(mut self, replay_only: bool) {
        let _counted = Watching::new();
        let end = loop {
            // Subscribe before reading the log, so nothing published
            // meanwhile is missed; duplicates are dropped by sequence.
            let mut live = self.events.subscribe();
            if let Err(g) = self.replay().await {
                break g;
            }
            if replay_only {
                return;
            }
            match self.follow(&mut live).await {
                Ok(()) => {}
                Err(g) => break g,
            }
        };
        if end == Gone::Slow {
            let status = self.out.too_slow(&format!("resume with from_seq {}", self.last + 1));
            self.out.end_with(status);
        }
    }

    /// Sends what the log has after `last`, a chunk at a time.
    async fn replay(&mut self) -> Result<(), Gone> {
        // From where the last replay stopped; what was seen live since is
        // skipped by sequence.
        let mut cursor = self.cursor.clone();
        cursor.next_seq = cursor.next_seq.max(self.last + 1);
        loop {
            let Ok(turn) = self.turn.clone().acquire_owned().await else {
                return Err(Gone::Left);
            };
            let Ok(reader) = self.replays.clone().acquire_owned().await else {
                return Err(Gone::Left);
            };
            let permit = (turn, reader);
            let events = self.events.clone();
            let read = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let (chunk, at_end) = events.read_chunk(&mut cursor);
                (chunk, at_end, cursor)
            })
            .await;
            let Ok((chunk, at_end, next)) = read else {
                return Err(Gone::Left);
            };
            cursor = next;
            self.cursor = cursor.clone();
            for e in &chunk {
                self.offer(e).await?;
            }
            if at_end {
                return Ok(());
            }
        }
    }

    /// Sends live events until the subscriber falls behind (Ok: back to
    /// the log) or the stream ends.
    async fn follow(&mut self, live: &mut broadcast::Receiver<Arc<Event>>) -> Result<(), Gone> {
        loop {
            match live.recv().await {
                Ok(e) => self.offer(&e).await?,
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => return Err(Gone::Left),
            }
        }
    }

    async fn offer(&mut self, e: &Event) -> Result<(), Gone> {
        if e.seq <= self.last {
            return Ok(());
        }
        if self.filter.matches(e) && visible(&self.caller, e) {
            self.out.send(to_pb(e)).await?;
        }
        self.last = e.seq;
        Ok(())
    }
}

/// What a Watch asks for, checked.
pub fn watch_filter(r: &pb::WatchRequest) -> Result<Filter, Status> {
    for k in &r.kinds {
        if !KINDS.contains(&k.as_str()) {
            return Err(Status::invalid_argument(format!(
                "kinds: unknown kind {:?}; expected one of {}",
                crate::events::clip(k, 64),
                KINDS.join(", ")
            )));
        }
    }
    Ok(Filter {
        worker: (!r.worker.is_empty()).then(|| r.worker.clone()),
        user: (!r.user.is_empty()).then(|| r.user.clone()),
        kinds: r.kinds.clone(),
    })
}

#[tonic::async_trait]
impl pb::events_server::Events for EventsApi {
    type WatchStream = Out<pb::WatchResponse>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let filter = watch_filter(&r)?;
        if !r.user.is_empty() && !c.may_act_for(&r.user) {
            return Err(super::denied(
                &self.sup,
                &c,
                "Events.Watch",
                Some(&r.user),
                format!("uid {} may not watch warden user {:?}", c.uid, r.user),
            )
            .await);
        }
        let events = self.sup.events.clone();
        // 0: only what comes next (from the end of the log as it is now).
        let cursor = if r.from_seq == 0 {
            events.end()
        } else {
            Cursor::new(r.from_seq)
        };
        let (out, stream) = outbox(QUEUE, self.sup.client_timeout());
        let subscriber = Subscriber {
            events,
            replays: self.replays.clone(),
            turn: self.turns.of(c.uid),
            caller: c,
            filter,
            out,
            last: cursor.next_seq.saturating_sub(1),
            cursor,
        };
        tokio::spawn(subscriber.run(r.replay_only));
        Ok(Response::new(stream))
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

#[cfg(test)]
mod turn_tests {
    use super::*;

    #[tokio::test]
    async fn a_uid_with_many_replays_takes_turns_with_a_uid_with_one() {
        let turns = Turns::default();
        let readers = Arc::new(Semaphore::new(1));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        // uid 1 replays on 50 streams, uid 2 on one, each wanting 3 reads.
        let mut tasks = Vec::new();
        for (uid, streams) in [(1u32, 50), (2, 1)] {
            for _ in 0..streams {
                let (turn, readers, order) = (turns.of(uid), readers.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..3 {
                        let _turn = turn.clone().acquire_owned().await.unwrap();
                        let _reader = readers.clone().acquire_owned().await.unwrap();
                        order.lock().unwrap().push(uid);
                        tokio::task::yield_now().await;
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let last_of_2 = order.iter().rposition(|u| *u == 2).unwrap();
        // uid 2's three reads are done within its first few turns, not
        // after uid 1's 150.
        assert!(last_of_2 < 10, "{order:?}");
        drop(order);
        assert!(turns.of(3).available_permits() == 1);
        assert_eq!(
            turns.0.lock().unwrap().len(),
            1,
            "uids with no stream left are forgotten"
        );
    }
}
