//! A running Claude Code session, driven by the daemon: the initial prompt,
//! the `can_use_tool` permission requests in the worker's stream-json
//! output (answered by profile rule, by a client through
//! `Workers.Approve`, or by the timeout), and the end of a one-shot run.
//!
//! Anything in the worker can write to the claude process's stdout, so
//! this reads hostile input: lines are split in linear time and at most
//! [`MAX_LINE`] long (a longer one is only skipped), messages are read
//! into small typed envelopes (never a whole JSON tree), and permission
//! requests are limited in rate, in number waiting and in bytes held.
//!
//! Must never: let a tool call run without a decision when the mode asks,
//! take an answer for one worker's request from another worker's, or hold
//! more memory for a worker than its limits allow.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use warden_policy::{ClaudePolicy, Rate};

use crate::events::{clip, logged_input, EventKind, Events};
use crate::io::Stdin;
use crate::limits::{Bucket, Reporter};

/// The longest stream-json line read as a message; longer ones still reach
/// the log and clients, but are not parsed (a permission request that long
/// is denied, when its id can be read from its start).
pub const MAX_LINE: usize = 8 << 20;
/// The bytes of tool-call input one worker's waiting requests may hold.
const MAX_PENDING_BYTES: usize = 8 << 20;
/// Longer request ids are not answered as permission requests.
const MAX_REQUEST_ID: usize = 256;
/// The start of an over-long line kept to find its request id.
const HEAD: usize = 4096;

/// How the session is driven once the worker runs (see [`drive`]).
#[derive(Debug)]
pub struct Start {
    pub policy: ClaudePolicy,
    /// Sent as the first stream-json user message.
    pub prompt: Option<String>,
}

/// A decision on one permission request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allow: bool,
    /// Who decided: `uid N`, `rule R`, `timeout` or `limit`.
    pub by: String,
    /// Told to Claude with a deny.
    pub message: String,
}

#[derive(Debug, Default)]
struct Waiting {
    senders: HashMap<String, (oneshot::Sender<Decision>, usize)>,
    bytes: usize,
}

/// The permission requests of one worker that wait for a client's answer.
#[derive(Debug, Default)]
pub struct Approvals(Mutex<Waiting>);

impl Approvals {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `decision` to the session waiting on `request_id`; false when
    /// no such request waits (decided, timed out, or never asked).
    pub fn decide(&self, request_id: &str, decision: Decision) -> bool {
        self.forget(request_id).is_some_and(|tx| tx.send(decision).is_ok())
    }

    /// Registers a request holding `bytes` of input, unless `max` requests
    /// already wait or the bytes would pass [`MAX_PENDING_BYTES`].
    fn register(&self, request_id: &str, bytes: usize, max: usize) -> Option<oneshot::Receiver<Decision>> {
        let mut w = self.waiting();
        if w.senders.len() >= max || w.bytes + bytes > MAX_PENDING_BYTES || w.senders.contains_key(request_id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        w.bytes += bytes;
        w.senders.insert(request_id.to_string(), (tx, bytes));
        Some(rx)
    }

    fn forget(&self, request_id: &str) -> Option<oneshot::Sender<Decision>> {
        let mut w = self.waiting();
        let (tx, bytes) = w.senders.remove(request_id)?;
        w.bytes -= bytes;
        Some(tx)
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting().senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limits of one session's permission requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per worker (past it: denied).
    pub rate: Rate,
    /// Requests waiting for a client at once.
    pub pending: u32,
}

/// What a session needs of its worker.
#[derive(Debug, Clone)]
pub struct Session {
    pub worker: String,
    pub user: String,
    pub events: Arc<Events>,
    pub stdin: Arc<Stdin>,
    pub approvals: Arc<Approvals>,
    pub limits: Limits,
}

/// Whether a line a client writes to a Claude Code session's stdin may
/// reach Claude: user messages and interrupts only. Permission answers come
/// from the daemon alone (a rule, `Workers.Approve`, the timeout), each
/// audited as what it was; a client's `control_response`, or a
/// `control_request` that would change the session (its permission mode,
/// say), never reaches Claude.
pub fn client_line(line: &[u8]) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow, rename = "type")]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        request: Option<Request<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Request<'a> {
        #[serde(borrow, default)]
        subtype: std::borrow::Cow<'a, str>,
    }
    let m: Message<'_> =
        serde_json::from_slice(line).map_err(|_| "a line that is not a stream-json message".to_string())?;
    match (m.kind.as_ref(), m.request) {
        ("user", _) => Ok(()),
        ("control_request", Some(r)) if r.subtype == "interrupt" => Ok(()),
        ("control_request", Some(r)) => Err(format!(
            "a control_request ({}); a client may only interrupt",
            clip(&r.subtype, 64)
        )),
        ("control_response", _) => {
            Err("a control_response; permission requests are answered with Workers.Approve".to_string())
        }
        (kind, _) => Err(format!("a {:?} message; a client sends user messages", clip(kind, 64))),
    }
}

/// One line of the worker's output.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Whole(Vec<u8>),
    /// Longer than the maximum: its first bytes and its length.
    TooLong {
        head: Vec<u8>,
        len: u64,
    },
}

/// Splits a byte stream into lines in linear time, holding at most
/// `max` bytes (plus one read) of an unfinished line.
#[derive(Debug)]
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    /// Inside an over-long line: its head and length so far.
    overlong: Option<(Vec<u8>, u64)>,
    /// Bytes looked at so far (each once: the split is linear).
    scanned: u64,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Lines {
            buf: Vec::new(),
            max,
            overlong: None,
            scanned: 0,
        }
    }

    /// The lines `chunk` completes.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        if let Some((head, len)) = &mut self.overlong {
            let newline = chunk.iter().position(|b| *b == b'\n');
            self.scanned += newline.map_or(chunk.len(), |i| i + 1) as u64;
            match newline {
                None => {
                    *len += chunk.len() as u64;
                    return out;
                }
                Some(i) => {
                    *len += i as u64;
                    let (head, len) = (std::mem::take(head), *len);
                    out.push(Line::TooLong { head, len });
                    self.overlong = None;
                    chunk = &chunk[i + 1..];
                }
            }
        }
        // The kept part has no newline: only the new bytes need scanning.
        let mut scan = self.buf.len();
        self.buf.extend_from_slice(chunk);
        let mut begin = 0;
        self.scanned += (self.buf.len() - scan) as u64;
        while let Some(i) = self.buf[scan..].iter().position(|b| *b == b'\n') {
            let end = scan + i;
            out.push(Line::Whole(self.buf[begin..end].to_vec()));
            begin = end + 1;
            scan = begin;
        }
        if begin > 0 {
            self.buf.drain(..begin);
        }
        if self.buf.len() > self.max {
            let head = self.buf[..HEAD.min(self.buf.len())].to_vec();
            self.overlong = Some((head, self.buf.len() as u64));
            self.buf = Vec::new();
        }
        out
    }
}

/// The parts of a stream-json message the driver reads.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    request: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ControlRequest<'a> {
    #[serde(borrow)]
    subtype: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

/// Drives one Claude Code session: sends the initial prompt, reads the
/// worker's stream-json output (`output` carries its raw stdout) to answer
/// `can_use_tool` permission requests, and ends a one-shot session (closes
/// stdin) when Claude reports its result.
pub async fn drive(session: Session, start: Start, interactive: bool, mut output: mpsc::Receiver<Arc<Vec<u8>>>) {
    let Start { policy, prompt } = start;
    match prompt {
        Some(p) => {
            let _ = session.stdin.write(&user_message(&p)).await;
        }
        // Nothing to do and nobody to talk to.
        None if !interactive => session.stdin.close().await,
        None => {}
    }
    let mut driver = Driver {
        rate: Bucket::new(session.limits.rate),
        s: session,
        policy: Arc::new(policy),
        interactive,
        rate_reports: Reporter::new(Duration::from_secs(10)),
        pending_reports: Reporter::new(Duration::from_secs(10)),
    };
    let mut lines = Lines::new(MAX_LINE);
    while let Some(chunk) = output.recv().await {
        for line in lines.push(&chunk) {
            driver.line(line).await;
        }
    }
    driver.finish();
}

/// A session's state while it reads the worker's output.
struct Driver {
    s: Session,
    policy: Arc<ClaudePolicy>,
    interactive: bool,
    rate: Bucket,
    rate_reports: Reporter,
    pending_reports: Reporter,
}

/// What the driver makes of one line of the worker's output.
#[derive(Debug)]
pub enum Message<'a> {
    /// A control request: a permission request when `subtype` is
    /// `can_use_tool`.
    Control {
        id: Cow<'a, str>,
        subtype: Option<Cow<'a, str>>,
        tool: Option<Cow<'a, str>>,
        input: Option<&'a RawValue>,
    },
    /// Claude's result: a one-shot session ends.
    Result,
    /// A control request too long to read, by the id at its start.
    TooLong { id: String, len: u64 },
    /// Anything else (assistant turns, tool results, noise).
    Other,
}

/// Reads one line the way the driver does: a small typed envelope, never
/// a whole JSON tree.
pub fn read_message(line: &Line) -> Message<'_> {
    match line {
        Line::Whole(bytes) => {
            let Ok(msg) = serde_json::from_slice::<Envelope<'_>>(bytes) else {
                return Message::Other;
            };
            match msg.kind.as_deref() {
                Some("control_request") => {
                    let (Some(id), Some(request)) = (msg.request_id, msg.request) else {
                        return Message::Other;
                    };
                    let Ok(r) = serde_json::from_str::<ControlRequest<'_>>(request.get()) else {
                        return Message::Other;
                    };
                    Message::Control {
                        id,
                        subtype: r.subtype,
                        tool: r.tool_name,
                        input: r.input,
                    }
                }
                Some("result") => Message::Result,
                _ => Message::Other,
            }
        }
        Line::TooLong { head, len } => match request_id_in(head) {
            Some(id) => Message::TooLong { id, len: *len },
            None => Message::Other,
        },
    }
}

impl Driver {
    async fn line(&mut self, line: Line) {
        match read_message(&line) {
            Message::Control {
                id,
                subtype,
                tool,
                input,
            } => self.control(&id, subtype.as_deref(), tool.as_deref(), input).await,
            Message::Result if !self.interactive => self.s.stdin.close().await,
            Message::TooLong { id, len } => {
                let message = format!(
                    "Denied by warden: this request is too large to review ({len} bytes; the limit is {MAX_LINE})"
                );
                if self.admit() {
                    self.decided(&id, "(unknown)", false, "limit", &message);
                }
                self.reply(&deny(&id, &message)).await;
            }
            Message::Result | Message::Other => {}
        }
    }

    /// Answers one control request of the worker.
    async fn control(&mut self, request_id: &str, subtype: Option<&str>, tool: Option<&str>, raw: Option<&RawValue>) {
        if subtype != Some("can_use_tool") || request_id.len() > MAX_REQUEST_ID {
            let reply = serde_json::json!({"type": "control_response", "response": {
                "subtype": "error", "request_id": clip(request_id, MAX_REQUEST_ID),
                "error": format!("warden does not support {} requests", clip(subtype.unwrap_or("these"), 64)),
            }});
            self.reply(&line_of(&reply)).await;
            return;
        }
        let tool = clip(tool.unwrap_or(""), 256);
        let input = raw.map_or("{}", RawValue::get);
        if !self.admit() {
            let message = "Denied by warden: too many permission requests (the worker_approvals rate limit)";
            self.reply(&deny(request_id, message)).await;
            return;
        }
        if let Some((allow, rule)) = self.policy.rule_for(&tool, input) {
            let by = format!("rule {rule}");
            let message = if allow {
                String::new()
            } else {
                format!("Denied by warden: the profile's rule {rule}")
            };
            self.decided(request_id, &tool, allow, &by, &message);
            let reply = if allow {
                allow_reply(request_id, input)
            } else {
                deny(request_id, &message)
            };
            self.reply(&reply).await;
            return;
        }
        let pending = self.s.limits.pending as usize;
        let Some(rx) = self.s.approvals.register(request_id, input.len(), pending) else {
            if let Some(n) = self.pending_reports.refused(Instant::now()) {
                self.rate_limited("pending_approvals", n);
            }
            let message = "Denied by warden: too many permission requests are waiting for an answer";
            self.decided(request_id, &tool, false, "limit", message);
            self.reply(&deny(request_id, message)).await;
            return;
        };
        // The raw input is echoed back on allow; it is held (and counted in
        // the worker's waiting bytes) until then.
        let input: Box<RawValue> = match raw {
            Some(i) => i.to_owned(),
            None => RawValue::from_string("{}".into()).expect("valid JSON"),
        };
        let s = self.s.clone();
        let timeout = self.policy.approval_timeout_secs;
        let id = request_id.to_string();
        tokio::spawn(async move { ask(s, id, tool, input, timeout, rx).await });
    }

    /// Whether the worker's permission-request rate allows one more.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        match self.rate.admit(now) {
            Some(suppressed) => {
                if suppressed > 0 {
                    self.rate_limited("worker_approvals", suppressed);
                }
                true
            }
            None => {
                if let Some(n) = self.rate_reports.refused(now) {
                    self.rate_limited("worker_approvals", n);
                    // Reported here; not again when a token comes back.
                    self.rate.take_pending();
                }
                false
            }
        }
    }

    fn rate_limited(&self, limit: &str, suppressed: u64) {
        self.s.events.publish(
            Some(&self.s.worker),
            Some(&self.s.user),
            EventKind::RateLimited {
                limit: limit.into(),
                suppressed,
                peer_uid: None,
            },
        );
    }

    fn decided(&self, request_id: &str, tool: &str, allow: bool, by: &str, message: &str) {
        publish_decision(&self.s, request_id, tool, allow, by, message);
    }

    async fn reply(&self, line: &[u8]) {
        let _ = self.s.stdin.write(line).await;
    }

    /// Says what was refused and not yet reported when the output ends.
    fn finish(&mut self) {
        let rest = self.rate.take_pending() + self.rate_reports.take_pending();
        if rest > 0 {
            self.rate_limited("worker_approvals", rest);
        }
        let rest = self.pending_reports.take_pending();
        if rest > 0 {
            self.rate_limited("pending_approvals", rest);
        }
    }
}

fn publish_decision(s: &Session, request_id: &str, tool: &str, allow: bool, by: &str, message: &str) {
    s.events.publish(
        Some(&s.worker),
        Some(&s.user),
        EventKind::ApprovalDecided {
            request_id: request_id.to_string(),
            tool: tool.to_string(),
            allow,
            by: by.to_string(),
            message: clip(message, 1024),
        },
    );
}

/// Publishes an approval request and waits for a client's decision, or
/// denies when nobody answers within `timeout_secs`; then answers Claude.
async fn ask(
    s: Session,
    request_id: String,
    tool: String,
    input: Box<RawValue>,
    timeout_secs: u64,
    rx: oneshot::Receiver<Decision>,
) {
    let (logged, truncated) = logged_input(input.get());
    s.events.publish(
        Some(&s.worker),
        Some(&s.user),
        EventKind::ApprovalRequested {
            request_id: request_id.clone(),
            tool: tool.clone(),
            input: logged,
            truncated,
            timeout_seconds: timeout_secs,
        },
    );
    let decision = match tokio::time::timeout(Duration::from_secs(timeout_secs), rx).await {
        Ok(Ok(d)) => d,
        _ => {
            s.approvals.forget(&request_id);
            Decision {
                allow: false,
                by: "timeout".into(),
                message: format!("Denied by warden: nobody approved this within {timeout_secs} s"),
            }
        }
    };
    publish_decision(&s, &request_id, &tool, decision.allow, &decision.by, &decision.message);
    let reply = if decision.allow {
        allow_reply(&request_id, input.get())
    } else if decision.message.is_empty() {
        deny(&request_id, "Denied by warden")
    } else {
        deny(&request_id, &decision.message)
    };
    let _ = s.stdin.write(&reply).await;
}

/// The control response that allows a call, echoing its input verbatim.
fn allow_reply(request_id: &str, input: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Allow<'a> {
        behavior: &'static str,
        #[serde(rename = "updatedInput")]
        updated_input: &'a RawValue,
    }
    let Ok(input) = serde_json::from_str::<&RawValue>(input) else {
        return deny(request_id, "Denied by warden: the tool call's input is not JSON");
    };
    response(
        request_id,
        &Allow {
            behavior: "allow",
            updated_input: input,
        },
    )
}

fn deny(request_id: &str, message: &str) -> Vec<u8> {
    response(request_id, &serde_json::json!({"behavior": "deny", "message": message}))
}

fn response(request_id: &str, behavior: &impl Serialize) -> Vec<u8> {
    #[derive(Serialize)]
    struct Inner<'a, B> {
        subtype: &'static str,
        request_id: &'a str,
        response: &'a B,
    }
    #[derive(Serialize)]
    struct Outer<'a, B> {
        #[serde(rename = "type")]
        kind: &'static str,
        response: Inner<'a, B>,
    }
    let mut line = serde_json::to_vec(&Outer {
        kind: "control_response",
        response: Inner {
            subtype: "success",
            request_id,
            response: behavior,
        },
    })
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// The request id at the start of an over-long control request, if its
/// head says it is one (Claude Code writes `type` and `request_id` first).
fn request_id_in(head: &[u8]) -> Option<String> {
    let head = std::str::from_utf8(head.get(..head.len().min(HEAD))?)
        .or_else(|e| std::str::from_utf8(&head[..e.valid_up_to()]))
        .ok()?;
    let compact: String = head.chars().take(512).filter(|c| !c.is_whitespace()).collect();
    if !compact.contains("\"type\":\"control_request\"") {
        return None;
    }
    let rest = &compact[compact.find("\"request_id\":\"")? + "\"request_id\":\"".len()..];
    let id = &rest[..rest.find('"')?];
    (!id.contains('\\') && !id.is_empty() && id.len() <= MAX_REQUEST_ID).then(|| id.to_string())
}

/// One stream-json user message line, as Claude Code reads them on stdin.
pub fn user_message(text: &str) -> Vec<u8> {
    line_of(&serde_json::json!({
        "type": "user",
        "message": {"role": "user", "content": text},
    }))
}

/// `v` as one JSON line.
fn line_of(v: &serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &str) -> Line {
        Line::Whole(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_split_across_chunks_and_over_long_ones_are_skipped() {
        let mut l = Lines::new(16);
        assert_eq!(l.push(b"ab"), vec![]);
        assert_eq!(l.push(b"c\nde\nf"), vec![whole("abc"), whole("de")]);
        assert_eq!(l.push(b"\n"), vec![whole("f")]);
        // Past the maximum: only its head and length come out.
        assert_eq!(l.push(&[b'x'; 20]), vec![]);
        assert_eq!(l.push(&[b'x'; 100]), vec![]);
        let out = l.push(b"xx\nnext\n");
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], Line::TooLong { head, len: 122 } if head.len() == 20));
        assert_eq!(out[1], whole("next"));
    }

    #[test]
    fn splitting_looks_at_each_byte_once() {
        // 64 MiB arriving in 64 KiB reads without a newline, then one (a
        // rescan per read would look at 32 GiB), then many short lines.
        let mut l = Lines::new(usize::MAX);
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..1024 {
            assert!(l.push(&chunk).is_empty());
        }
        assert_eq!(l.push(b"\n").len(), 1);
        assert_eq!(l.scanned, (64 << 20) + 1);
        let short = b"ab\n".repeat(1000);
        assert_eq!(l.push(&short).len(), 1000);
        assert_eq!(l.scanned, (64 << 20) + 1 + 3000);
        let mut l = Lines::new(1024);
        for _ in 0..100 {
            l.push(&chunk);
        }
        assert_eq!(l.scanned, 100 * (64 << 10));
    }

    #[test]
    fn replies_echo_the_input_verbatim_and_escape_messages() {
        let line = allow_reply("r1", r#"{"command":"ls","n":[1,2]}"#);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["response"]["request_id"], "r1");
        assert_eq!(v["response"]["response"]["updatedInput"]["n"][1], 2);
        let line = deny("r2", "no \"way\"");
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["response"]["response"]["message"], "no \"way\"");
        assert_eq!(v["type"], "control_response");
    }

    #[test]
    fn the_id_of_an_over_long_request_is_read_from_its_head() {
        let head = br#"{"type":"control_request","request_id":"abc-1","request":{"subtype":"can_use_tool","input":{"content":"xxxx"#;
        assert_eq!(request_id_in(head).as_deref(), Some("abc-1"));
        assert_eq!(request_id_in(br#"{"type":"assistant","request_id":"x"}"#), None);
        assert_eq!(
            request_id_in(br#"{"type":"control_request","request_id":"a\"b"}"#),
            None
        );
    }

    #[test]
    fn waiting_requests_are_bounded_in_number_and_bytes() {
        let a = Approvals::default();
        assert!(a.register("1", 10, 2).is_some());
        assert!(a.register("1", 10, 2).is_none(), "an id waits once");
        assert!(a.register("2", 10, 2).is_some());
        assert!(a.register("3", 10, 2).is_none(), "two at most");
        assert!(a.forget("1").is_some());
        assert!(a.register("4", MAX_PENDING_BYTES, 2).is_none(), "bytes");
        assert!(a.register("4", 100, 2).is_some());
        assert_eq!(a.len(), 2);
    }
}
