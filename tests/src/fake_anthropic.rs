//! A scripted fake of the Anthropic Messages API on loopback, for driving
//! the real `claude` binary without a network: `ANTHROPIC_BASE_URL` points
//! here.
//!
//! Each test gives it a script of assistant turns (tool calls with exact
//! inputs, then text). Every `POST /v1/messages` answers with the next turn
//! as an SSE stream (message_start, content_block_start/delta/stop,
//! message_delta, message_stop), or as one JSON message when the request
//! does not ask to stream. The `tool_result` blocks the client sends back
//! are recorded, so a test can assert what happened inside the sandbox,
//! and so is the credential each request came with (what wardend's gateway
//! put there). Served plain or over TLS with a test CA.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// One assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    /// A tool call: tool name and its exact input.
    ToolUse { name: String, input: Value },
    /// A final text answer (ends the conversation).
    Text(String),
}

/// The usage every answer reports: input, output, cache creation, cache
/// read tokens.
pub const USAGE: (u64, u64, u64, u64) = (10, 5, 2, 3);

/// What one request came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub model: String,
    pub stream: bool,
    pub x_api_key: Option<String>,
    pub authorization: Option<String>,
    pub anthropic_beta: Option<String>,
    /// The `type` of each tool the request listed (`""` for none).
    pub tool_types: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    script: Vec<Turn>,
    next: usize,
    /// (tool_use_id, content as text, is_error) of every tool_result received.
    results: Vec<(String, String, bool)>,
    requests: usize,
    seen: Vec<Seen>,
}

/// A running fake API; stops when dropped.
#[derive(Debug)]
pub struct FakeAnthropic {
    pub addr: SocketAddr,
    tls: bool,
    inner: Arc<Mutex<Inner>>,
    _served: crate::servers::Served,
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The answer to one request, as (content blocks, stop_reason).
fn answer(inner: &mut Inner, body: &Value) -> (Vec<Value>, &'static str) {
    inner.requests += 1;
    for msg in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        for block in msg.get("content").and_then(Value::as_array).into_iter().flatten() {
            if block.get("type").and_then(Value::as_str) == Some("tool_result") {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if !inner.results.iter().any(|(seen, _, _)| *seen == id) {
                    let content = text_of(block.get("content").unwrap_or(&Value::Null));
                    let is_error = block.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                    inner.results.push((id, content, is_error));
                }
            }
        }
    }
    let turn = inner
        .script
        .get(inner.next)
        .cloned()
        .unwrap_or(Turn::Text("(the script is over)".into()));
    inner.next += 1;
    match turn {
        Turn::ToolUse { name, input } => {
            let id = format!("toolu_{:04}", inner.next);
            (
                vec![json!({"type": "tool_use", "id": id, "name": name, "input": input})],
                "tool_use",
            )
        }
        Turn::Text(t) => (vec![json!({"type": "text", "text": t})], "end_turn"),
    }
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The SSE stream for one assistant message.
fn stream_of(model: &str, blocks: &[Value], stop: &str, final_usage: &Value) -> String {
    let mut out = sse(
        "message_start",
        &json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": USAGE.0, "output_tokens": 1,
                "cache_creation_input_tokens": USAGE.2, "cache_read_input_tokens": USAGE.3}}}),
    );
    for (i, b) in blocks.iter().enumerate() {
        let (start, delta) = if b["type"] == "tool_use" {
            (
                json!({"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}),
                json!({"type": "input_json_delta", "partial_json": b["input"].to_string()}),
            )
        } else {
            (
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": b["text"]}),
            )
        };
        out += &sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": i, "content_block": start}),
        );
        out += &sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": i, "delta": delta}),
        );
        out += &sse("content_block_stop", &json!({"type": "content_block_stop", "index": i}));
    }
    out += &sse(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": final_usage}),
    );
    out += &sse("message_stop", &json!({"type": "message_stop"}));
    out
}

fn seen(path: &str, headers: &HeaderMap, body: &Value) -> Seen {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    Seen {
        path: path.into(),
        model: body.get("model").and_then(Value::as_str).unwrap_or("").into(),
        stream: body.get("stream").and_then(Value::as_bool) == Some(true),
        x_api_key: h("x-api-key"),
        authorization: h("authorization"),
        anthropic_beta: h("anthropic-beta"),
        tool_types: body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["type"].as_str().unwrap_or("").to_string())
            .collect(),
    }
}

async fn messages(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_string();
    let request = seen("/v1/messages", &headers, &body);
    // A request that lists the API's web search is answered as if it ran
    // one search.
    let searched = request.tool_types.iter().any(|t| t.starts_with("web_search_"));
    let (blocks, stop) = {
        let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.seen.push(request);
        answer(&mut inner, &body)
    };
    let searches = json!({"web_search_requests": 1});
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut last = json!({"output_tokens": USAGE.1});
        if searched {
            last["server_tool_use"] = searches;
        }
        (
            [(header::CONTENT_TYPE, "text/event-stream")],
            stream_of(&model, &blocks, stop, &last),
        )
            .into_response()
    } else {
        let mut usage = json!({"input_tokens": USAGE.0, "output_tokens": USAGE.1,
            "cache_creation_input_tokens": USAGE.2, "cache_read_input_tokens": USAGE.3});
        if searched {
            usage["server_tool_use"] = searches;
        }
        Json(
            json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop, "stop_sequence": null, "usage": usage}),
        )
        .into_response()
    }
}

async fn count_tokens(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> impl IntoResponse {
    inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .seen
        .push(seen("/v1/messages/count_tokens", &headers, &body));
    let chars = body.to_string().len();
    (StatusCode::OK, Json(json!({"input_tokens": chars / 4 + 1})))
}

impl FakeAnthropic {
    /// Starts serving `script` on 127.0.0.1 (a free port), plain HTTP.
    pub fn start(script: Vec<Turn>) -> FakeAnthropic {
        Self::serve(script, None)
    }

    /// Starts serving `script` over TLS, with a certificate for
    /// `anthropic.test` signed by `ca`.
    pub fn start_tls(script: Vec<Turn>, ca: &crate::servers::TestCa) -> FakeAnthropic {
        Self::serve(script, Some(ca.server_config(&["anthropic.test"])))
    }

    fn serve(script: Vec<Turn>, tls: Option<Arc<rustls::ServerConfig>>) -> FakeAnthropic {
        let inner = Arc::new(Mutex::new(Inner {
            script,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .with_state(inner.clone());
        let is_tls = tls.is_some();
        let served = crate::servers::Served::start(app, tls);
        FakeAnthropic {
            addr: served.addr,
            tls: is_tls,
            inner,
            _served: served,
        }
    }

    /// Its URL by the name test daemons map to loopback in their `hosts`
    /// table ([`crate::daemon::TEST_HOSTS`]): what a profile's `base_url`
    /// names for wardend's gateway to forward to.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://anthropic.test:{}", self.addr.port())
    }

    /// What every request came with, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).seen.clone()
    }

    /// The tool results received so far: (tool_use_id, content, is_error).
    pub fn tool_results(&self) -> Vec<(String, String, bool)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).results.clone()
    }

    pub fn requests(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn post(addr: SocketAddr, path: &str, body: &Value) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn scripted_turns_stream_as_sse_and_tool_results_are_recorded() {
        let api = FakeAnthropic::start(vec![
            Turn::ToolUse {
                name: "Bash".into(),
                input: json!({"command": "id"}),
            },
            Turn::Text("done".into()),
        ]);
        let first = post(
            api.addr,
            "/v1/messages",
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert!(first.contains("text/event-stream"), "{first}");
        for ev in [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ] {
            assert!(first.contains(&format!("event: {ev}\n")), "{ev}: {first}");
        }
        assert!(
            first.contains(r#""name":"Bash""#) && first.contains(r#"\"command\":\"id\""#),
            "{first}"
        );
        assert!(first.contains(r#""stop_reason":"tool_use""#));

        let second = post(
            api.addr,
            "/v1/messages",
            &json!({"model": "m", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0001", "name": "Bash", "input": {"command": "id"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0001", "content": [{"type": "text", "text": "uid=1"}]}]}
            ]}),
        );
        assert!(
            second.contains(r#""text":"done""#) && second.contains(r#""stop_reason":"end_turn""#),
            "{second}"
        );
        assert_eq!(
            api.tool_results(),
            vec![("toolu_0001".to_string(), "uid=1".to_string(), false)]
        );
        assert_eq!(api.requests(), 2);

        let tokens = post(api.addr, "/v1/messages/count_tokens", &json!({"messages": []}));
        assert!(tokens.contains("input_tokens"), "{tokens}");
    }
}
