//! A running Claude Code session, driven by the daemon: the initial prompt,
//! the `can_use_tool` permission requests in the worker's stream-json
//! output (answered by profile rule, by a client through
//! `Workers.Approve`, or by the timeout), and the end of a one-shot run.
//!
//! Must never: let a tool call run without a decision when the mode asks,
//! or take an answer for one worker's request from another worker's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use warden_policy::ClaudePolicy;

use crate::events::{EventKind, Events};
use crate::io::Stdin;

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
    /// Who decided: `uid N`, `rule R` or `timeout`.
    pub by: String,
    /// Told to Claude with a deny.
    pub message: String,
}

/// The permission requests of one worker that wait for a client's answer.
#[derive(Debug, Default)]
pub struct Approvals(Mutex<HashMap<String, oneshot::Sender<Decision>>>);

impl Approvals {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Decision>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `decision` to the session waiting on `request_id`; false when
    /// no such request waits (decided, timed out, or never asked).
    pub fn decide(&self, request_id: &str, decision: Decision) -> bool {
        self.pending()
            .remove(request_id)
            .is_some_and(|tx| tx.send(decision).is_ok())
    }
}

/// What a session needs of its worker.
#[derive(Debug, Clone)]
pub struct Session {
    pub worker: String,
    pub user: String,
    pub events: Arc<Events>,
    pub stdin: Arc<Stdin>,
    pub approvals: Arc<Approvals>,
}

/// Drives one Claude Code session: sends the initial prompt, reads the
/// worker's stream-json output (`output` carries its raw stdout) to answer
/// `can_use_tool` permission requests, and ends a one-shot session (closes
/// stdin) when Claude reports its result.
pub async fn drive(
    session: Session,
    start: Start,
    interactive: bool,
    mut output: mpsc::UnboundedReceiver<Arc<Vec<u8>>>,
) {
    /// A line longer than this is no control message: skip it.
    const MAX_LINE: usize = 64 << 20;
    let Start { policy, prompt } = start;
    match prompt {
        Some(p) => {
            let _ = session.stdin.write(&user_message(&p)).await;
        }
        // Nothing to do and nobody to talk to.
        None if !interactive => session.stdin.close().await,
        None => {}
    }
    let policy = Arc::new(policy);
    let mut buf: Vec<u8> = Vec::new();
    let mut skipping = false;
    while let Some(chunk) = output.recv().await {
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if std::mem::take(&mut skipping) {
                continue;
            }
            let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            match msg["type"].as_str() {
                Some("control_request") => {
                    tokio::spawn(answer(session.clone(), policy.clone(), msg));
                }
                Some("result") if !interactive => session.stdin.close().await,
                _ => {}
            }
        }
        if buf.len() > MAX_LINE {
            buf.clear();
            skipping = true;
        }
    }
}

/// Answers one control request of the worker.
async fn answer(s: Session, policy: Arc<ClaudePolicy>, msg: Value) {
    let Some(request_id) = msg["request_id"].as_str().map(str::to_string) else {
        return;
    };
    let request = &msg["request"];
    if request["subtype"] != "can_use_tool" {
        let reply = json!({"type": "control_response", "response": {
            "subtype": "error", "request_id": request_id,
            "error": format!("warden does not support {} requests", request["subtype"]),
        }});
        let _ = s.stdin.write(&line_of(&reply)).await;
        return;
    }
    let tool = request["tool_name"].as_str().unwrap_or("").to_string();
    let input = request["input"].clone();
    let decision = match policy.rule_for(&tool, &input) {
        Some((allow, rule)) => Decision {
            allow,
            message: if allow {
                String::new()
            } else {
                format!("Denied by warden: the profile's rule {rule}")
            },
            by: format!("rule {rule}"),
        },
        None => ask(&s, &request_id, &tool, &input, policy.approval_timeout_secs).await,
    };
    s.events.publish(
        Some(&s.worker),
        Some(&s.user),
        EventKind::ApprovalDecided {
            request_id: request_id.clone(),
            tool,
            allow: decision.allow,
            by: decision.by.clone(),
            message: decision.message.clone(),
        },
    );
    let behavior = if decision.allow {
        json!({"behavior": "allow", "updatedInput": input})
    } else {
        let message = if decision.message.is_empty() {
            "Denied by warden".to_string()
        } else {
            decision.message
        };
        json!({"behavior": "deny", "message": message})
    };
    let reply = json!({"type": "control_response", "response": {
        "subtype": "success", "request_id": request_id, "response": behavior,
    }});
    let _ = s.stdin.write(&line_of(&reply)).await;
}

/// Publishes an approval request and waits for a client's decision, or
/// denies when nobody answers within `timeout_secs`.
async fn ask(s: &Session, request_id: &str, tool: &str, input: &Value, timeout_secs: u64) -> Decision {
    let (tx, rx) = oneshot::channel();
    s.approvals.pending().insert(request_id.to_string(), tx);
    s.events.publish(
        Some(&s.worker),
        Some(&s.user),
        EventKind::ApprovalRequested {
            request_id: request_id.to_string(),
            tool: tool.to_string(),
            input: input.clone(),
            timeout_seconds: timeout_secs,
        },
    );
    match tokio::time::timeout(Duration::from_secs(timeout_secs), rx).await {
        Ok(Ok(d)) => d,
        _ => {
            s.approvals.pending().remove(request_id);
            Decision {
                allow: false,
                by: "timeout".into(),
                message: format!("Denied by warden: nobody approved this within {timeout_secs} s"),
            }
        }
    }
}

/// One stream-json user message line, as Claude Code reads them on stdin.
pub fn user_message(text: &str) -> Vec<u8> {
    line_of(&json!({
        "type": "user",
        "message": {"role": "user", "content": text},
    }))
}

/// `v` as one JSON line.
fn line_of(v: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}
