//! wardenctl: talk to wardend over its Unix socket.
//!
//! Every command prints one clear line and exits non-zero on error. Listings
//! take `--output json` (one JSON document, or JSON lines for streams).

#![forbid(unsafe_code)]

mod text;
mod top;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Uri};
use warden_proto::v1 as pb;

use text::{json_safe, plain, Neutralizer};
use warden_proto::v1::events_client::EventsClient;
use warden_proto::v1::profiles_client::ProfilesClient;
use warden_proto::v1::usage_client::UsageClient;
use warden_proto::v1::workers_client::WorkersClient;

#[derive(Debug, Parser)]
#[command(
    name = "wardenctl",
    version,
    about = "Control wardend: run sandboxed AI coding agents and commands"
)]
struct Cli {
    /// wardend's socket.
    #[arg(
        long,
        global = true,
        env = "WARDEN_SOCKET",
        default_value = "/run/warden/warden.sock"
    )]
    socket: PathBuf,
    /// Output format of listings and results.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a worker: wardenctl spawn --user U [-w] -- CMD ARGS...
    Spawn {
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value = "default")]
        project: String,
        #[arg(long)]
        profile: Option<String>,
        /// Environment variable KEY=VALUE (only those the profile passes).
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Stream the worker's output and exit with its exit code (started
        /// and attached to in one call).
        #[arg(short, long)]
        wait: bool,
        /// Claude Code profiles: keep the session open for more messages
        /// (with -w, your stdin is forwarded as stream-json lines).
        #[arg(short, long)]
        interactive: bool,
        /// Claude Code profiles: a model the profile allows.
        #[arg(long)]
        model: Option<String>,
        /// Claude Code profiles: at most the profile's max turns.
        #[arg(long)]
        max_turns: Option<u32>,
        /// Claude Code profiles: a mode that asks at least as much as the profile's.
        #[arg(long)]
        permission_mode: Option<String>,
        /// Claude Code profiles: a tool to disallow (repeatable).
        #[arg(long = "disallow-tool", value_name = "TOOL")]
        disallow_tools: Vec<String>,
        /// Claude Code profiles: appended to the system prompt.
        #[arg(long)]
        append_system_prompt: Option<String>,
        /// With -w: pass the worker's output to the terminal as it is,
        /// escape sequences included.
        #[arg(long)]
        raw: bool,
        /// The command; for a Claude Code profile, the initial prompt.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List workers.
    Ps {
        /// Include exited workers.
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        user: Option<String>,
    },
    /// Running workers and what each uses (CPU, memory, processes,
    /// traffic, age), refreshed in place; plain tables when piped.
    Top {
        #[arg(long)]
        user: Option<String>,
        /// Seconds between refreshes.
        #[arg(short = 'd', long = "delay", default_value_t = 1.0)]
        interval: f64,
        /// Refreshes before exiting (default: until interrupted).
        #[arg(short = 'n', long)]
        iterations: Option<u32>,
    },
    /// Show one worker.
    Inspect { id: String },
    /// Attach to a worker: your stdin to its stdin, its output to yours.
    Attach {
        id: String,
        /// Claude Code sessions: send each line you type as a user message
        /// (instead of raw stream-json).
        #[arg(short, long)]
        text: bool,
        /// Pass the worker's output to the terminal as it is, escape
        /// sequences included (piped output always is).
        #[arg(long)]
        raw: bool,
    },
    /// Print a worker's output.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        /// Start at this byte offset of stdout (and of stderr).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Pass the worker's output to the terminal as it is, escape
        /// sequences included (piped output always is).
        #[arg(long)]
        raw: bool,
    },
    /// SIGTERM, the grace period, then SIGKILL.
    Stop {
        id: String,
        #[arg(long)]
        grace: Option<u32>,
    },
    /// Send a signal (default TERM).
    Kill {
        id: String,
        #[arg(short, long, default_value = "TERM")]
        signal: String,
    },
    /// Wait for a worker and exit with its exit code.
    Wait { id: String },
    /// Allow a Claude Code worker's pending tool call (see `events --kind approval_requested`).
    Approve { id: String, request_id: String },
    /// Deny a Claude Code worker's pending tool call.
    Deny {
        id: String,
        request_id: String,
        /// Why, told to Claude.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    /// Events from the audit log, and live with -f.
    Events {
        /// Keep following live events.
        #[arg(short, long)]
        follow: bool,
        /// Start at this sequence number (default: everything the log holds).
        #[arg(long, default_value_t = 1)]
        since: u64,
        #[arg(long)]
        worker: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Only events of this kind (repeatable).
        #[arg(long = "kind")]
        kinds: Vec<String>,
    },
    /// API use through wardend's gateway: per user (today, this month, all
    /// time, and the budget) and per worker.
    Usage {
        /// Only this warden user.
        #[arg(long)]
        user: Option<String>,
    },
    /// Sandbox profiles.
    Profile {
        #[command(subcommand)]
        command: ProfileCmd,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Subcommand)]
enum ProfileCmd {
    List,
    /// Validate a profile file against the daemon's loaded set.
    Check {
        file: PathBuf,
    },
    /// Print the fully resolved policy of a profile.
    Explain {
        name: String,
    },
    /// Reload the profiles from disk (admins).
    Reload,
}

/// `println!` that hands back the error instead of panicking: a reader
/// that went away (`wardenctl ps | head`) ends wardenctl quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
    }};
}

async fn connect(socket: &std::path::Path) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://wardend.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("Cannot connect to wardend at {}", socket.display()))
}

fn signal_number(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => bail!("Unknown signal {s}"),
    })
}

fn state_name(w: &pb::Worker) -> &'static str {
    match pb::WorkerState::try_from(w.state).unwrap_or(pb::WorkerState::Unspecified) {
        pb::WorkerState::Running => "running",
        pb::WorkerState::Exited => "exited",
        pb::WorkerState::Lost => "lost",
        pb::WorkerState::Unspecified => "unknown",
    }
}

fn reason_name(w: &pb::Worker) -> &'static str {
    match pb::ExitReason::try_from(w.reason).unwrap_or(pb::ExitReason::Unspecified) {
        pb::ExitReason::Exited => "exited",
        pb::ExitReason::Stopped => "stopped",
        pb::ExitReason::TimedOut => "timed_out",
        pb::ExitReason::Oom => "oom",
        pb::ExitReason::Lost => "lost",
        pb::ExitReason::Killed => "killed",
        pb::ExitReason::Unspecified => "",
    }
}

fn worker_json(w: &pb::Worker) -> serde_json::Value {
    serde_json::json!({
        "id": w.id, "user": w.user, "project": w.project, "profile": w.profile,
        "policy_digest": w.policy_digest, "command": w.command, "state": state_name(w),
        "uid": w.uid, "pid": w.pid, "started_at_ms": w.started_at_ms, "exited_at_ms": w.exited_at_ms,
        "exit_code": w.exit_code, "signal": w.signal, "reason": reason_name(w),
        "peak_memory_bytes": w.peak_memory_bytes, "cpu_time_us": w.cpu_time_us,
        "network": w.network.as_ref().map(|n| serde_json::json!({
            "mode": n.mode, "allow": n.allow, "deny": n.deny, "ports": n.ports,
            "connections": n.connections, "bytes_up": n.bytes_up, "bytes_down": n.bytes_down,
            "denials": n.denials,
            "hosts": n.hosts.iter().map(|h| (h.host.clone(), serde_json::json!({
                "connections": h.connections, "bytes_up": h.bytes_up, "bytes_down": h.bytes_down,
            }))).collect::<serde_json::Map<String, serde_json::Value>>(),
        })),
        "api": w.api.as_ref().map(api_json),
        "enforcement": w.enforcement.as_ref().map(|e| serde_json::json!({
            "landlock_abi": e.landlock_abi, "landlock_tcp": e.landlock_tcp, "landlock_scoped": e.landlock_scoped,
            "seccomp_filter_len": e.seccomp_filter_len, "namespaces": e.namespaces,
            "no_new_privs": e.no_new_privs, "capabilities_empty": e.capabilities_empty,
        })),
    })
}

fn api_json(t: &pb::ApiTotals) -> serde_json::Value {
    serde_json::json!({
        "requests": t.requests, "input_tokens": t.input_tokens, "output_tokens": t.output_tokens,
        "cache_creation_input_tokens": t.cache_creation_input_tokens,
        "cache_read_input_tokens": t.cache_read_input_tokens,
    })
}

fn budget_json(b: Option<&pb::Budget>) -> serde_json::Value {
    let b = b.copied().unwrap_or_default();
    let limit = |v: u64| (v > 0).then_some(v);
    serde_json::json!({
        "tokens_per_day": limit(b.tokens_per_day), "tokens_per_month": limit(b.tokens_per_month),
        "requests_per_minute": limit(u64::from(b.requests_per_minute)),
        "concurrent_requests": limit(u64::from(b.concurrent_requests)),
        "count_cache_reads": b.count_cache_reads,
    })
}

fn print_usage(r: &pb::UsageResponse, output: Output) -> std::io::Result<()> {
    let totals = |t: &Option<pb::ApiTotals>| api_json(&t.unwrap_or_default());
    if output == Output::Json {
        let users: Vec<_> = r
            .users
            .iter()
            .map(|u| {
                serde_json::json!({
                    "user": u.user, "day": u.day, "today": totals(&u.today), "month": u.month,
                    "this_month": totals(&u.this_month), "all_time": totals(&u.all_time),
                    "budget": budget_json(u.budget.as_ref()),
                    "disk": u.disk.map(|d| serde_json::json!({
                        "bytes": d.bytes, "files": d.files,
                        "limit_bytes": (d.limit_bytes > 0).then_some(d.limit_bytes),
                        "limit_files": (d.limit_files > 0).then_some(d.limit_files),
                    })),
                })
            })
            .collect();
        let workers: Vec<_> = r
            .workers
            .iter()
            .map(|w| serde_json::json!({"worker": w.worker, "user": w.user, "totals": totals(&w.totals)}))
            .collect();
        outln!(
            "{}",
            json_safe(&serde_json::json!({"users": users, "workers": workers}).to_string())
        )?;
        return Ok(());
    }
    // Tokens as a budget counts them: input, output and cache creation.
    let tokens = |t: &Option<pb::ApiTotals>| {
        let t = t.unwrap_or_default();
        format!(
            "{} req {} tok",
            t.requests,
            t.input_tokens + t.output_tokens + t.cache_creation_input_tokens
        )
    };
    let limit = |v: u64| if v == 0 { "-".to_string() } else { v.to_string() };
    // The user's tree on disk, in MiB, against its limit.
    let disk = |d: &Option<pb::DiskUsage>| match d {
        None => "-".to_string(),
        Some(d) if d.limit_bytes == 0 => format!("{} MiB", d.bytes >> 20),
        Some(d) => format!("{}/{} MiB", d.bytes >> 20, d.limit_bytes >> 20),
    };
    outln!(
        "{:<14} {:<24} {:<24} {:<24} {:>12} {:>12} {:>16}",
        "USER",
        "TODAY",
        "THIS MONTH",
        "ALL TIME",
        "PER DAY",
        "PER MONTH",
        "DISK"
    )?;
    for u in &r.users {
        let b = u.budget.unwrap_or_default();
        outln!(
            "{:<14} {:<24} {:<24} {:<24} {:>12} {:>12} {:>16}",
            plain(&u.user),
            tokens(&u.today),
            tokens(&u.this_month),
            tokens(&u.all_time),
            limit(b.tokens_per_day),
            limit(b.tokens_per_month),
            disk(&u.disk)
        )?;
    }
    Ok(())
}

fn print_workers(ws: &[pb::Worker], output: Output) -> std::io::Result<()> {
    if output == Output::Json {
        outln!(
            "{}",
            json_safe(&serde_json::Value::Array(ws.iter().map(worker_json).collect()).to_string())
        )?;
        return Ok(());
    }
    outln!(
        "{:<16} {:<12} {:<12} {:<12} {:<8} {:>6} COMMAND",
        "ID",
        "USER",
        "PROJECT",
        "PROFILE",
        "STATE",
        "EXIT"
    )?;
    for w in ws {
        let exit = if state_name(w) == "running" {
            String::new()
        } else {
            w.exit_code.to_string()
        };
        outln!(
            "{:<16} {:<12} {:<12} {:<12} {:<8} {:>6} {}",
            plain(&w.id),
            plain(&w.user),
            plain(&w.project),
            plain(&w.profile),
            state_name(w),
            exit,
            plain(&w.command.join(" "))
        )?;
    }
    Ok(())
}

fn print_worker(w: &pb::Worker, output: Output) -> std::io::Result<()> {
    if output == Output::Json {
        outln!("{}", json_safe(&worker_json(w).to_string()))
    } else {
        outln!(
            "{}",
            json_safe(&serde_json::to_string_pretty(&worker_json(w)).unwrap_or_default())
        )
    }
}

fn print_event(e: &pb::Event, output: Output) -> std::io::Result<()> {
    if output == Output::Json {
        outln!("{}", json_safe(&e.json))?;
        return Ok(());
    }
    let mut details: serde_json::Value = serde_json::from_str(&e.json).unwrap_or_default();
    if let Some(obj) = details.as_object_mut() {
        for k in ["seq", "time_ms", "worker", "user", "kind"] {
            obj.remove(k);
        }
    }
    let secs = e.time_ms / 1000;
    let time = format!("{}.{:03}", secs, e.time_ms % 1000);
    outln!(
        "{:>6} {:<24} {:<22} {:<14} {:<10} {}",
        e.seq,
        time,
        plain(&e.kind),
        plain(&e.worker),
        plain(&e.user),
        plain(&details.to_string())
    )
}

/// Streams a worker's output to ours until it exits; returns its exit code.
/// Attaches to worker `id`; with `forward_stdin`, this process's stdin goes
/// to the worker, wrapped line by line as Claude Code user messages with
/// `as_messages`.
async fn attach(
    client: &mut WorkersClient<Channel>,
    start: pb::AttachStart,
    forward_stdin: bool,
    as_messages: bool,
    raw: bool,
) -> anyhow::Result<i32> {
    let mut sink = Sink::new(raw);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::AttachRequest {
        msg: Some(pb::attach_request::Msg::Start(start)),
    })
    .await?;
    if forward_stdin {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            let mut pending = Vec::new();
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx
                            .send(pb::AttachRequest {
                                msg: Some(pb::attach_request::Msg::CloseStdin(true)),
                            })
                            .await;
                        break;
                    }
                    Ok(n) => {
                        let data = if as_messages {
                            pending.extend_from_slice(&buf[..n]);
                            let mut out = Vec::new();
                            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> = pending.drain(..=i).collect();
                                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                                if !text.is_empty() {
                                    let m = serde_json::json!({"type": "user", "message": {"role": "user", "content": text}});
                                    out.extend_from_slice(m.to_string().as_bytes());
                                    out.push(b'\n');
                                }
                            }
                            out
                        } else {
                            buf[..n].to_vec()
                        };
                        let msg = pb::AttachRequest {
                            msg: Some(pb::attach_request::Msg::Stdin(data)),
                        };
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Keep the request stream open until the response ends.
            std::future::pending::<()>().await;
        });
    } else {
        tx.send(pb::AttachRequest {
            msg: Some(pb::attach_request::Msg::CloseStdin(true)),
        })
        .await?;
        tokio::spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
    }
    let mut stream = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(msg) = stream.next().await {
        match msg?.msg {
            Some(pb::attach_response::Msg::Output(c)) => sink.write(&c)?,
            Some(pb::attach_response::Msg::Exited(w)) => return Ok(w.exit_code),
            Some(pb::attach_response::Msg::Started(_)) | None => {}
        }
    }
    bail!("The daemon closed the stream before the worker exited")
}

/// Where a worker's output goes: our stdout and stderr, through a
/// [`Neutralizer`] each when it is a terminal (unless `--raw`).
struct Sink {
    out: Option<Neutralizer>,
    err: Option<Neutralizer>,
}

impl Sink {
    fn new(raw: bool) -> Self {
        let guard = |terminal: bool| (!raw && terminal).then(Neutralizer::default);
        Sink {
            out: guard(std::io::stdout().is_terminal()),
            err: guard(std::io::stderr().is_terminal()),
        }
    }

    fn write(&mut self, c: &pb::OutputChunk) -> anyhow::Result<()> {
        fn put(w: &mut dyn Write, guard: Option<&mut Neutralizer>, data: &[u8]) -> std::io::Result<()> {
            match guard {
                Some(n) => w.write_all(&n.feed(data))?,
                None => w.write_all(data)?,
            }
            w.flush()
        }
        if c.stream == pb::Stream::Stderr as i32 {
            put(&mut std::io::stderr(), self.err.as_mut(), &c.data)?;
        } else {
            put(&mut std::io::stdout(), self.out.as_mut(), &c.data)?;
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(n) = self.out.as_mut() {
            let _ = std::io::stdout().write_all(&n.finish());
        }
        if let Some(n) = self.err.as_mut() {
            let _ = std::io::stderr().write_all(&n.finish());
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let output = cli.output;
    match cli.command {
        Cmd::Completions { shell } => {
            // Into memory first: clap_complete panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "wardenctl", &mut script);
            std::io::stdout().write_all(&script)?;
            return Ok(0);
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        _ => {}
    }
    let channel = connect(&cli.socket).await?;
    let mut workers = WorkersClient::new(channel.clone());
    let mut profiles = ProfilesClient::new(channel.clone());
    let mut events = EventsClient::new(channel.clone());
    let mut usage = UsageClient::new(channel);
    match cli.command {
        Cmd::Spawn {
            user,
            project,
            profile,
            env,
            wait,
            interactive,
            model,
            max_turns,
            permission_mode,
            disallow_tools,
            append_system_prompt,
            raw,
            command,
        } => {
            let mut vars = HashMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("-e {kv}: expected KEY=VALUE"))?;
                vars.insert(k.to_string(), v.to_string());
            }
            let request = pb::SpawnRequest {
                user: user.unwrap_or_default(),
                project,
                profile: profile.unwrap_or_default(),
                command,
                env: vars,
                limits: None,
                interactive,
                claude: Some(pb::ClaudeOptions {
                    model: model.unwrap_or_default(),
                    max_turns: max_turns.unwrap_or(0),
                    disallowed_tools: disallow_tools,
                    append_system_prompt: append_system_prompt.unwrap_or_default(),
                    permission_mode: permission_mode.unwrap_or_default(),
                }),
            };
            if wait {
                // Started and attached to in one call.
                let start = pb::AttachStart {
                    spawn: Some(request),
                    ..Default::default()
                };
                return attach(&mut workers, start, interactive, interactive, raw).await;
            }
            let w = workers.spawn(request).await?.into_inner();
            if output == Output::Json {
                outln!("{}", json_safe(&worker_json(&w).to_string()))?;
            } else {
                outln!("{}", plain(&w.id))?;
            }
        }
        Cmd::Ps { all, user } => {
            let r = workers
                .list(pb::ListWorkersRequest {
                    user: user.unwrap_or_default(),
                    include_exited: all,
                    usage: false,
                })
                .await?
                .into_inner();
            print_workers(&r.workers, output)?;
        }
        Cmd::Top {
            user,
            interval,
            iterations,
        } => {
            let opts = top::Options {
                interval: std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0)),
                iterations,
                user,
            };
            top::run(&mut workers, opts).await?;
        }
        Cmd::Inspect { id } => print_worker(&workers.get(pb::GetWorkerRequest { id }).await?.into_inner(), output)?,
        Cmd::Attach { id, text, raw } => {
            let start = pb::AttachStart {
                id,
                ..Default::default()
            };
            return attach(&mut workers, start, true, text, raw).await;
        }
        Cmd::Logs { id, follow, from, raw } => {
            let mut sink = Sink::new(raw);
            let mut s = workers
                .logs(pb::LogsRequest {
                    id,
                    follow,
                    stdout_offset: from,
                    stderr_offset: from,
                })
                .await?
                .into_inner();
            while let Some(c) = s.next().await {
                let c = c?;
                if output == Output::Json {
                    let stream = if c.stream == pb::Stream::Stderr as i32 {
                        "stderr"
                    } else {
                        "stdout"
                    };
                    outln!(
                        "{}",
                        json_safe(
                            &serde_json::json!({"stream": stream, "offset": c.offset, "data": String::from_utf8_lossy(&c.data)})
                                .to_string()
                        )
                    )?;
                } else {
                    sink.write(&c)?;
                }
            }
        }
        Cmd::Stop { id, grace } => {
            let w = workers
                .stop(pb::StopRequest {
                    id,
                    grace_seconds: grace.unwrap_or(0),
                })
                .await?
                .into_inner();
            print_worker(&w, output)?;
        }
        Cmd::Kill { id, signal } => {
            workers
                .signal(pb::SignalRequest {
                    id,
                    signal: signal_number(&signal)?,
                })
                .await?;
        }
        Cmd::Approve { id, request_id } => {
            workers
                .approve(pb::ApproveRequest {
                    id,
                    request_id,
                    allow: true,
                    message: String::new(),
                })
                .await?;
        }
        Cmd::Deny {
            id,
            request_id,
            message,
        } => {
            workers
                .approve(pb::ApproveRequest {
                    id,
                    request_id,
                    allow: false,
                    message,
                })
                .await?;
        }
        Cmd::Wait { id } => {
            let w = workers.wait(pb::WaitRequest { id }).await?.into_inner();
            if output == Output::Json {
                outln!("{}", json_safe(&worker_json(&w).to_string()))?;
            }
            return Ok(w.exit_code);
        }
        Cmd::Events {
            follow,
            since,
            worker,
            user,
            kinds,
        } => {
            let mut s = events
                .watch(pb::WatchRequest {
                    from_seq: since.max(1),
                    worker: worker.unwrap_or_default(),
                    user: user.unwrap_or_default(),
                    kinds,
                    replay_only: !follow,
                })
                .await?
                .into_inner();
            if output == Output::Table {
                outln!(
                    "{:>6} {:<24} {:<22} {:<14} {:<10} DETAILS",
                    "SEQ",
                    "TIME",
                    "KIND",
                    "WORKER",
                    "USER"
                )?;
            }
            while let Some(msg) = s.next().await {
                match msg?.msg {
                    Some(pb::watch_response::Msg::Event(e)) => print_event(&e, output)?,
                    Some(pb::watch_response::Msg::Lagged(l)) => {
                        bail!(
                            "Fell behind the live events after seq {}; resume with --since {}",
                            l.last_seq,
                            l.last_seq + 1
                        )
                    }
                    None => {}
                }
            }
        }
        Cmd::Usage { user } => {
            let r = usage
                .get(pb::UsageRequest {
                    user: user.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_usage(&r, output)?;
        }
        Cmd::Profile { command } => match command {
            ProfileCmd::List => {
                let r = profiles.list(pb::ListProfilesRequest {}).await?.into_inner();
                if output == Output::Json {
                    let v: Vec<_> = r
                        .profiles
                        .iter()
                        .map(|p| serde_json::json!({"name": p.name, "origin": p.origin, "description": p.description, "extends": p.extends, "digest": p.digest}))
                        .collect();
                    outln!("{}", json_safe(&serde_json::Value::Array(v).to_string()))?;
                } else {
                    outln!("{:<16} {:<32} DESCRIPTION", "NAME", "ORIGIN")?;
                    for p in r.profiles {
                        outln!(
                            "{:<16} {:<32} {}",
                            plain(&p.name),
                            plain(&p.origin),
                            plain(&p.description)
                        )?;
                    }
                }
            }
            ProfileCmd::Check { file } => {
                let toml = std::fs::read_to_string(&file).with_context(|| format!("Cannot read {}", file.display()))?;
                let name = file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("profile")
                    .to_string();
                let p = profiles
                    .validate(pb::ValidateProfileRequest { name, toml })
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!(
                            "{}",
                            s.message().replacen(
                                &format!("{}.toml", file.file_stem().and_then(|s| s.to_str()).unwrap_or("")),
                                &file.display().to_string(),
                                1
                            )
                        )
                    })?
                    .into_inner();
                outln!(
                    "{}: ok (digest {})",
                    plain(&file.display().to_string()),
                    plain(&p.digest)
                )?;
            }
            ProfileCmd::Explain { name } => {
                outln!(
                    "{}",
                    json_safe(
                        &profiles
                            .get(pb::GetProfileRequest { name })
                            .await?
                            .into_inner()
                            .resolved_json
                    )
                )?;
            }
            ProfileCmd::Reload => {
                let r = profiles.reload(pb::ReloadProfilesRequest {}).await?.into_inner();
                outln!("reloaded: {}", plain(&r.loaded.join(", ")))?;
            }
        },
        Cmd::Completions { .. } | Cmd::Man => {}
    }
    Ok(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        // Our reader went away (`wardenctl ps | head`): end quietly, with
        // the status of a process SIGPIPE ended, as coreutils do.
        Err(e)
            if e.chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::exit(128 + 13)
        }
        Err(e) => {
            let msg = match e.downcast_ref::<tonic::Status>() {
                Some(s) => format!("{:?}: {}", s.code(), s.message()),
                None => format!("{e:#}"),
            };
            eprintln!("wardenctl: {}", plain(&msg));
            std::process::exit(1);
        }
    }
}
