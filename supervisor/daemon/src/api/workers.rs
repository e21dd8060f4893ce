//! `warden.v1.Workers`.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use warden_proto::v1 as pb;

use super::outbox::{outbox, Gone, Out, Outbox};
use super::{authorize, caller, denied, status, to_completion};
use crate::auth::Caller;
use crate::claude::session::{client_line, Line, Lines, MAX_LINE};
use crate::events::{millis, ExitReason, NetUsage};
use crate::io::OutputLog;
use crate::usage::Totals;
use crate::workers::{RequestedLimits, SpawnParams, Supervisor, Worker};
use warden_policy::{NetworkMode, NetworkPolicy};

#[derive(Debug)]
pub struct WorkersApi {
    pub sup: Arc<Supervisor>,
}

/// The most output one message carries.
const CHUNK: usize = 16 << 10;

pub fn to_pb(w: &Worker) -> pb::Worker {
    let exit = w.exit_info();
    let reason = match exit.as_ref().map(|e| e.reason) {
        None => pb::ExitReason::Unspecified,
        Some(ExitReason::Exited) => pb::ExitReason::Exited,
        Some(ExitReason::Killed) => pb::ExitReason::Killed,
        Some(ExitReason::Stopped) => pb::ExitReason::Stopped,
        Some(ExitReason::TimedOut) => pb::ExitReason::TimedOut,
        Some(ExitReason::Oom) => pb::ExitReason::Oom,
        Some(ExitReason::Lost) => pb::ExitReason::Lost,
    };
    let state = match &exit {
        None => pb::WorkerState::Running,
        Some(e) if e.reason == ExitReason::Lost => pb::WorkerState::Lost,
        Some(_) => pb::WorkerState::Exited,
    };
    pb::Worker {
        id: w.id.clone(),
        user: w.user.clone(),
        project: w.project.clone(),
        profile: w.profile.clone(),
        policy_digest: w.policy_digest.clone(),
        command: w.command.clone(),
        state: state as i32,
        uid: w.uid,
        pid: if exit.is_some() { 0 } else { w.pid },
        started_at_ms: i64::try_from(millis(w.started)).unwrap_or(0),
        exited_at_ms: exit.as_ref().map_or(0, |e| i64::try_from(millis(e.at)).unwrap_or(0)),
        exit_code: exit.as_ref().map_or(0, |e| e.code),
        signal: exit.as_ref().map_or(0, |e| e.signal),
        reason: reason as i32,
        peak_memory_bytes: exit.as_ref().map_or(0, |e| e.peak_memory),
        cpu_time_us: exit.as_ref().map_or(0, |e| e.cpu_time_us),
        network: w
            .network
            .as_ref()
            .map(|n| network_pb(n, &w.net_usage().unwrap_or_default())),
        api: w.api_usage().map(|t| api_pb(&t)),
        // Asked for in a List only (with_usage): cgroup files to read.
        memory_bytes: 0,
        pids: 0,
        enforcement: w.enforced.as_ref().map(|e| pb::Enforcement {
            landlock_abi: e.landlock_abi,
            landlock_tcp: e.landlock_tcp,
            landlock_scoped: e.landlock_scoped,
            seccomp_filter_len: u32::try_from(e.seccomp_filter_len).unwrap_or(u32::MAX),
            namespaces: e.namespaces.clone(),
            no_new_privs: e.no_new_privs,
            capabilities_empty: e.capabilities_empty,
        }),
    }
}

/// [`to_pb`], with a running worker's use of its cgroup now.
fn with_usage(w: &Worker) -> pb::Worker {
    let mut p = to_pb(w);
    if w.exit_info().is_none() {
        if let Some(u) = w.usage() {
            p.memory_bytes = u.memory_current;
            p.pids = u.pids_current;
            p.peak_memory_bytes = u.memory_peak;
            p.cpu_time_us = u.cpu_usage_ns / 1000;
        }
    }
    p
}

pub fn api_pb(t: &Totals) -> pb::ApiTotals {
    pb::ApiTotals {
        requests: t.requests,
        input_tokens: t.tokens.input,
        output_tokens: t.tokens.output,
        cache_creation_input_tokens: t.tokens.cache_creation,
        cache_read_input_tokens: t.tokens.cache_read,
    }
}

fn network_pb(policy: &NetworkPolicy, usage: &NetUsage) -> pb::Network {
    let mode = match policy.mode {
        NetworkMode::None => "none",
        NetworkMode::Proxy => "proxy",
    };
    pb::Network {
        mode: mode.into(),
        allow: policy.allow.iter().map(ToString::to_string).collect(),
        deny: policy.deny.iter().map(ToString::to_string).collect(),
        ports: policy.tcp_connect.iter().map(|p| u32::from(*p)).collect(),
        connections: usage.connections,
        bytes_up: usage.bytes_up,
        bytes_down: usage.bytes_down,
        denials: usage.denials,
        hosts: usage
            .hosts
            .iter()
            .map(|(host, t)| pb::HostTraffic {
                host: host.clone(),
                connections: t.connections,
                bytes_up: t.bytes_up,
                bytes_down: t.bytes_down,
            })
            .collect(),
    }
}

impl WorkersApi {
    /// The worker `id`, if the caller may act for its user. An unauthorized
    /// caller learns nothing about whether it exists.
    async fn visible(&self, c: &Caller, id: &str, method: &str) -> Result<Arc<Worker>, Status> {
        let w = self.sup.get(id).map_err(|e| status(&e, c))?;
        authorize(&self.sup, c, &w.user, method)
            .await
            .map_err(|_| Status::not_found(format!("Unknown worker {id}")))?;
        Ok(w)
    }
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

fn signal_of(n: i32) -> Result<Signal, Status> {
    let s = Signal::try_from(n).map_err(|_| Status::invalid_argument(format!("signal: {n} is not a signal")))?;
    match s {
        Signal::SIGTERM
        | Signal::SIGINT
        | Signal::SIGHUP
        | Signal::SIGKILL
        | Signal::SIGQUIT
        | Signal::SIGUSR1
        | Signal::SIGUSR2
        | Signal::SIGSTOP
        | Signal::SIGCONT => Ok(s),
        _ => Err(Status::invalid_argument(format!(
            "signal: {s} may not be sent to workers"
        ))),
    }
}

/// Sends `log` from `from` (replayed from the kept log, then live if
/// `follow`) as output chunks until the stream ends or the client goes.
/// Sends one output stream from `from` to a client: what the log kept,
/// then (when following) live chunks until the stream ends. Ok when it
/// ended; otherwise the client is gone or too slow.
async fn send_output<M>(
    log: &OutputLog,
    stream: pb::Stream,
    mut from: u64,
    follow: bool,
    out: &Outbox<M>,
    wrap: fn(pb::OutputChunk) -> M,
) -> Result<(), Gone> {
    let mut live = log.subscribe();
    let mut done = log.watch_done();
    let send = |offset: u64, data: Vec<u8>| {
        wrap(pb::OutputChunk {
            stream: stream as i32,
            offset,
            data,
        })
    };
    loop {
        let kept = log.kept();
        while from < kept {
            let to = kept.min(from + CHUNK as u64);
            let Ok(data) = log.read_kept(from, to).await else {
                return Ok(());
            };
            out.send(send(from, data)).await?;
            from = to;
        }
        if !follow || (*done.borrow_and_update() && from >= log.produced()) {
            return Ok(());
        }
        // The next chunk, or the end of the stream (whichever comes first:
        // a chunk sent before the end is still in `live`).
        let next = tokio::select! {
            biased;
            r = live.recv() => r,
            r = done.changed() => match r {
                Ok(()) => continue,
                Err(_) => return Ok(()),
            },
        };
        match next {
            Ok(chunk) => {
                let end = chunk.offset + chunk.data.len() as u64;
                if end <= from {
                    continue;
                }
                let skip = usize::try_from(from.saturating_sub(chunk.offset)).unwrap_or(0);
                let mut start = chunk.offset.max(from);
                for piece in chunk.data[skip..].chunks(CHUNK) {
                    out.send(send(start, piece.to_vec())).await?;
                    start += piece.len() as u64;
                }
                from = end;
            }
            // Lagged: the loop replays what the log kept; output beyond the
            // log's cap that was missed is skipped.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                if from >= log.kept() {
                    from = from.max(log.produced());
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Messages queued per Attach or Logs client (of at most [`CHUNK`] bytes).
const QUEUE: usize = 4;

/// Ends `out` with the cut-off status when its client stopped reading.
fn end_slow<M>(out: Outbox<M>, result: Result<(), Gone>) {
    if result == Err(Gone::Slow) {
        let status = out.too_slow("resume from the offsets after the last chunks received");
        out.end_with(status);
    }
}

/// A spawn request, checked field by field, as the domain takes it (who
/// may act for the user is checked apart: it is audited).
pub fn spawn_params(c: &Caller, default_profile: &str, r: pb::SpawnRequest) -> Result<SpawnParams, Status> {
    let user = if r.user.is_empty() {
        c.default_user()
            .map(str::to_string)
            .ok_or_else(|| Status::invalid_argument("user: required"))?
    } else {
        r.user
    };
    warden_policy::names::check_user(&user).map_err(|e| Status::invalid_argument(format!("user: {e}")))?;
    let project = if r.project.is_empty() {
        "default".to_string()
    } else {
        r.project
    };
    warden_policy::names::check_project(&project).map_err(|e| Status::invalid_argument(format!("project: {e}")))?;
    if r.command.is_empty() || r.command[0].is_empty() {
        return Err(Status::invalid_argument("command: required"));
    }
    if r.command.iter().any(|a| a.contains('\0')) {
        return Err(Status::invalid_argument("command: an argument contains NUL"));
    }
    if r.env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(Status::invalid_argument(
            "env: a name is empty or holds '=' or NUL, or a value holds NUL",
        ));
    }
    let limits = r.limits.unwrap_or_default();
    let claude = r.claude.unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(SpawnParams {
        user,
        project,
        profile: if r.profile.is_empty() {
            default_profile.to_string()
        } else {
            r.profile
        },
        command: r.command,
        caller_uid: Some(c.uid),
        interactive: r.interactive,
        claude: warden_policy::ClaudeRequest {
            model: some(claude.model),
            max_turns: (claude.max_turns > 0).then_some(claude.max_turns),
            disallowed_tools: claude.disallowed_tools,
            append_system_prompt: some(claude.append_system_prompt),
            permission_mode: some(claude.permission_mode),
        },
        env: r.env.into_iter().collect(),
        limits: RequestedLimits {
            memory: nonzero(limits.memory_bytes),
            memory_swap: nonzero(limits.memory_swap_bytes),
            pids: nonzero(limits.pids),
            cpu_quota_us: nonzero(limits.cpu_quota_us),
            timeout_secs: nonzero(limits.timeout_seconds),
        },
    })
}

impl WorkersApi {
    /// A worker started for `c` as `r` asks (Spawn, and Attach with
    /// `spawn`): the caller may act for the user, the user may use the
    /// profile, and the spawn runs to its end even if the client goes.
    async fn spawned(&self, c: &Caller, r: pb::SpawnRequest) -> Result<Arc<Worker>, Status> {
        let params = spawn_params(c, &self.sup.config.default_profile, r)?;
        authorize(&self.sup, c, &params.user, "Workers.Spawn").await?;
        // Which warden users may use the profile (an unknown one is the
        // spawn's own error, later).
        if let Ok(p) = self.sup.profiles.current().get(&params.profile) {
            let groups = if p.access.needs_groups(&params.user) {
                self.sup.accounts.group_names(&params.user).await
            } else {
                Default::default()
            };
            if !p.access.allows(&params.user, &groups) {
                let message = format!(
                    "warden user {:?} may not use profile {:?} (see its users and groups)",
                    params.user, params.profile
                );
                return Err(denied(&self.sup, c, "Workers.Spawn", Some(&params.user), message).await);
            }
        }
        let sup = self.sup.clone();
        to_completion(async move { sup.spawn(params).await })
            .await?
            .map_err(|e| status(&e, c))
    }
}

#[tonic::async_trait]
impl pb::workers_server::Workers for WorkersApi {
    async fn spawn(&self, req: Request<pb::SpawnRequest>) -> Result<Response<pb::Worker>, Status> {
        let c = caller(&req, &self.sup).await?;
        let w = self.spawned(&c, req.into_inner()).await?;
        Ok(Response::new(to_pb(&w)))
    }

    async fn get(&self, req: Request<pb::GetWorkerRequest>) -> Result<Response<pb::Worker>, Status> {
        let c = caller(&req, &self.sup).await?;
        let w = self.visible(&c, &req.get_ref().id, "Workers.Get").await?;
        Ok(Response::new(to_pb(&w)))
    }

    async fn list(&self, req: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let listed: Vec<Arc<Worker>> = self
            .sup
            .list()
            .into_iter()
            .filter(|w| c.may_act_for(&w.user))
            .filter(|w| r.user.is_empty() || w.user == r.user)
            .filter(|w| r.include_exited || w.exit_info().is_none())
            .collect();
        let workers = if r.usage {
            // Each running worker's cgroup files, off the async threads.
            tokio::task::spawn_blocking(move || listed.iter().map(|w| with_usage(w)).collect())
                .await
                .map_err(|_| Status::internal("A listing task failed"))?
        } else {
            listed.iter().map(|w| to_pb(w)).collect()
        };
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn signal(&self, req: Request<pb::SignalRequest>) -> Result<Response<pb::Worker>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        self.visible(&c, &r.id, "Workers.Signal").await?;
        let w = self
            .sup
            .signal(&r.id, signal_of(r.signal)?)
            .map_err(|e| status(&e, &c))?;
        Ok(Response::new(to_pb(&w)))
    }

    async fn stop(&self, req: Request<pb::StopRequest>) -> Result<Response<pb::Worker>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let w = self.visible(&c, &r.id, "Workers.Stop").await?;
        let grace = (r.grace_seconds > 0).then(|| Duration::from_secs(u64::from(r.grace_seconds)));
        let sup = self.sup.clone();
        let id = r.id.clone();
        to_completion(async move { sup.stop(&id, grace).await })
            .await?
            .map_err(|e| status(&e, &c))?;
        Ok(Response::new(to_pb(&w)))
    }

    async fn approve(&self, req: Request<pb::ApproveRequest>) -> Result<Response<pb::ApproveResponse>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let w = self.visible(&c, &r.id, "Workers.Approve").await?;
        if r.request_id.is_empty() || r.request_id.len() > 256 || r.message.len() > 4096 {
            return Err(Status::invalid_argument(
                "request_id must be 1-256 bytes and message at most 4096",
            ));
        }
        let decision = crate::claude::Decision {
            allow: r.allow,
            by: format!("uid {}", c.uid),
            message: r.message,
        };
        w.approve(&r.request_id, decision).map_err(|e| status(&e, &c))?;
        Ok(Response::new(pb::ApproveResponse {}))
    }

    async fn wait(&self, req: Request<pb::WaitRequest>) -> Result<Response<pb::Worker>, Status> {
        let c = caller(&req, &self.sup).await?;
        let w = self.visible(&c, &req.get_ref().id, "Workers.Wait").await?;
        w.wait().await;
        Ok(Response::new(to_pb(&w)))
    }

    type AttachStream = Out<pb::AttachResponse>;

    async fn attach(&self, req: Request<Streaming<pb::AttachRequest>>) -> Result<Response<Self::AttachStream>, Status> {
        let c = caller(&req, &self.sup).await?;
        let mut input = req.into_inner();
        let mut start = match input.next().await {
            Some(Ok(pb::AttachRequest {
                msg: Some(pb::attach_request::Msg::Start(s)),
            })) => s,
            Some(Err(e)) => return Err(e),
            _ => return Err(Status::invalid_argument("the first Attach message must be `start`")),
        };
        // With `spawn`, the worker is started here and its output sent
        // from its first byte.
        let (w, started) = match start.spawn.take() {
            Some(r) => {
                if !start.id.is_empty() || start.stdout_offset != 0 || start.stderr_offset != 0 || start.live_only {
                    return Err(Status::invalid_argument(
                        "an AttachStart with `spawn` names no id, offsets or live_only: it attaches from the start",
                    ));
                }
                let w = self.spawned(&c, r).await?;
                let started = to_pb(&w);
                (w, Some(started))
            }
            None => (self.visible(&c, &start.id, "Workers.Attach").await?, None),
        };
        // stdin: the client's messages, until it closes stdin or goes away.
        // A Claude Code session takes whole lines, and only those a client
        // may send (user messages, interrupts); others are refused, audited.
        let stdin_worker = w.clone();
        let (sup, caller) = (self.sup.clone(), c.clone());
        tokio::spawn(async move {
            let mut lines = stdin_worker.session.then(|| Lines::new(MAX_LINE));
            while let Some(Ok(m)) = input.next().await {
                let data = match (m.msg, lines.as_mut()) {
                    (Some(pb::attach_request::Msg::Stdin(data)), None) => data,
                    (Some(pb::attach_request::Msg::Stdin(data)), Some(lines)) => {
                        let mut passed = Vec::new();
                        for line in lines.push(&data) {
                            let verdict = match &line {
                                Line::Whole(l) if l.trim_ascii().is_empty() => continue,
                                Line::Whole(l) => client_line(l).map(|()| l),
                                Line::TooLong { len, .. } => Err(format!("a line of {len} bytes")),
                            };
                            match verdict {
                                Ok(l) => {
                                    passed.extend_from_slice(l);
                                    passed.push(b'\n');
                                }
                                Err(why) => {
                                    tracing::warn!(worker = %stdin_worker.id, uid = caller.uid, "stdin of a Claude Code session: refused {why}");
                                    let _ = denied(
                                        &sup,
                                        &caller,
                                        "Workers.Attach",
                                        Some(&stdin_worker.user),
                                        format!("stdin of Claude Code session {}: refused {why}", stdin_worker.id),
                                    )
                                    .await;
                                }
                            }
                        }
                        passed
                    }
                    (Some(pb::attach_request::Msg::CloseStdin(true)), _) => {
                        // A one-shot Claude Code session keeps stdin until its
                        // result: the daemon answers permission requests there.
                        if !stdin_worker.one_shot_session {
                            stdin_worker.stdin.close().await;
                        }
                        break;
                    }
                    _ => continue,
                };
                if !data.is_empty() && stdin_worker.stdin.write(&data).await.is_err() {
                    break;
                }
            }
        });
        let (out, stream) = outbox(QUEUE, self.sup.client_timeout());
        tokio::spawn(async move {
            let (from_out, from_err) = if start.live_only {
                (w.stdout.produced(), w.stderr.produced())
            } else {
                (start.stdout_offset, start.stderr_offset)
            };
            let wrap = |c| pb::AttachResponse {
                msg: Some(pb::attach_response::Msg::Output(c)),
            };
            if let Some(started) = started {
                let told = out
                    .send(pb::AttachResponse {
                        msg: Some(pb::attach_response::Msg::Started(started)),
                    })
                    .await;
                if let Err(g) = told {
                    return end_slow(out, Err(g));
                }
            }
            // The first stream the client cannot take ends both.
            let result = match tokio::try_join!(
                send_output(&w.stdout, pb::Stream::Stdout, from_out, true, &out, wrap),
                send_output(&w.stderr, pb::Stream::Stderr, from_err, true, &out, wrap),
            ) {
                Ok(_) => {
                    w.wait().await;
                    out.send(pb::AttachResponse {
                        msg: Some(pb::attach_response::Msg::Exited(to_pb(&w))),
                    })
                    .await
                }
                Err(g) => Err(g),
            };
            end_slow(out, result);
        });
        Ok(Response::new(stream))
    }

    type LogsStream = Out<pb::OutputChunk>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let c = caller(&req, &self.sup).await?;
        let r = req.into_inner();
        let w = self.visible(&c, &r.id, "Workers.Logs").await?;
        let (out, stream) = outbox(QUEUE, self.sup.client_timeout());
        tokio::spawn(async move {
            let wrap = |c| c;
            let result = tokio::try_join!(
                send_output(&w.stdout, pb::Stream::Stdout, r.stdout_offset, r.follow, &out, wrap),
                send_output(&w.stderr, pb::Stream::Stderr, r.stderr_offset, r.follow, &out, wrap),
            )
            .map(|_| ());
            end_slow(out, result);
        });
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: a wait on a timer shows as elapsed time,
    /// a wake-up on the end of the stream does not.
    #[tokio::test(start_paused = true)]
    async fn a_follower_hears_the_end_of_output_at_once_not_on_a_timer() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(OutputLog::new(dir.path().join("w.stdout")));
        let (mut writer, reader) = tokio::io::duplex(1024);
        let pump = {
            let log = log.clone();
            tokio::spawn(async move { log.pump(reader, 1 << 20, None, None).await })
        };
        let (out, mut stream) = crate::api::outbox::outbox(16, Duration::from_secs(30));
        let follower = {
            let log = log.clone();
            tokio::spawn(async move { send_output(&log, pb::Stream::Stdout, 0, true, &out, |c| c).await })
        };
        writer.write_all(b"hello").await.unwrap();
        drop(writer);
        let start = tokio::time::Instant::now();
        assert!(follower.await.unwrap().is_ok());
        assert_eq!(start.elapsed(), Duration::ZERO, "the follower waited on a timer");
        pump.await.unwrap();
        let mut seen = Vec::new();
        while let Some(Ok(chunk)) = tokio_stream::StreamExt::next(&mut stream).await {
            seen.extend(chunk.data);
        }
        assert_eq!(seen, b"hello");
    }

    #[test]
    fn only_signals_that_stop_or_continue_a_worker_may_be_sent() {
        assert_eq!(signal_of(15).unwrap(), Signal::SIGTERM);
        assert_eq!(signal_of(9).unwrap(), Signal::SIGKILL);
        assert!(signal_of(0).unwrap_err().message().contains("not a signal"));
        assert!(signal_of(11).unwrap_err().message().contains("may not be sent"));
    }
}
