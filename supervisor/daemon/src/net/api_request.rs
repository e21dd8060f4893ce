//! What the API gateway reads of a Messages request before it goes
//! upstream: its model, whether it streams, and what it would have the API
//! do outside the sandbox (run one of its own tools, fetch a URL). Read
//! with borrowed, typed serde structures that skip everything else: no tree
//! of the body is built, whatever its size.
//!
//! A body that does not read into these (not a JSON object, one of the
//! fields read given twice, nesting past serde_json's limit) is refused by
//! the gateway: the API might read it otherwise than the gateway did.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use warden_policy::{RunsOn, ServerTool};

/// The parts of a request the gateway decides on. Lists are read element
/// by element into what matters of them, never collected: a body of a
/// million empty tools or messages holds no more than one.
#[derive(Debug, Deserialize)]
pub(super) struct Head<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    tools: Option<Tools>,
    /// The MCP connector's servers, which the API itself connects to
    /// (elements of no size: nothing of them is held).
    #[serde(default)]
    mcp_servers: Option<Vec<IgnoredAny>>,
    /// A message reads as a block whose `content` holds blocks.
    #[serde(default)]
    messages: Option<Blocks>,
    #[serde(default)]
    system: Option<Blocks>,
}

/// The tools a request lists, by who runs them: the API's own (each with
/// the first type that asked for it), and the first type warden does not
/// know.
#[derive(Debug, Default)]
struct Tools {
    api: BTreeMap<ServerTool, String>,
    unknown: Option<String>,
}

/// A tool a request lists: who runs it depends on its type.
#[derive(Debug, Deserialize)]
struct ToolHead<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for Tools {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(ToolsVisitor)
    }
}

struct ToolsVisitor;

impl<'de> Visitor<'de> for ToolsVisitor {
    type Value = Tools;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of tools")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tools, A::Error> {
        let mut tools = Tools::default();
        while let Some(tool) = seq.next_element::<ToolHead<'de>>()? {
            let kind = tool.kind.as_deref();
            match ServerTool::of_type(kind) {
                RunsOn::Client => {}
                RunsOn::Api(t) => {
                    tools.api.entry(t).or_insert_with(|| kind.unwrap_or("").to_string());
                }
                RunsOn::Unknown => {
                    if tools.unknown.is_none() {
                        tools.unknown = Some(crate::events::clip(kind.unwrap_or(""), 256));
                    }
                }
            }
        }
        Ok(tools)
    }
}

/// A `content` (or `system`) value: text, one block or a list of blocks,
/// read for the first source that is a URL (which the API would fetch),
/// however deep (a tool result's content, a document's content source).
#[derive(Debug, Default)]
struct Blocks {
    url: Option<String>,
}

/// A content block: only its `source` and nested `content` matter,
/// whatever its type (an image, a document, one of a tool result's).
#[derive(Debug, Deserialize)]
struct Block {
    #[serde(default)]
    source: Option<Source>,
    #[serde(default)]
    content: Option<Blocks>,
}

/// A block's `source`: an object (`base64`, `text`, `file`, `content`, or
/// `url`, which the API fetches), or a plain string (a search result's,
/// which it does not).
#[derive(Debug, Default)]
struct Source {
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SourceObject<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Option<Blocks>,
}

impl<'de> Deserialize<'de> for Blocks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BlocksVisitor)
    }
}

struct BlocksVisitor;

impl<'de> Visitor<'de> for BlocksVisitor {
    type Value = Blocks;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text, a content block or a list of them")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Blocks, E> {
        Ok(Blocks::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blocks, A::Error> {
        let mut found = Blocks::default();
        while let Some(block) = seq.next_element::<Block>()? {
            if found.url.is_none() {
                found.url = block.url();
            }
        }
        Ok(found)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Blocks, A::Error> {
        let block = Block::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Blocks { url: block.url() })
    }
}

impl Block {
    fn url(self) -> Option<String> {
        self.source.and_then(|s| s.url).or(self.content.and_then(|c| c.url))
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SourceVisitor)
    }
}

struct SourceVisitor;

impl<'de> Visitor<'de> for SourceVisitor {
    type Value = Source;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content block's source")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Source, E> {
        Ok(Source::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Source, A::Error> {
        let s = SourceObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let url = if s.kind.as_deref() == Some("url") {
            // The address itself is the worker's text: at most 256 bytes of
            // it go into the refusal.
            Some(crate::events::clip(s.url.as_deref().unwrap_or(""), 256))
        } else {
            s.content.and_then(|c| c.url)
        };
        Ok(Source { url })
    }
}

/// What the gateway decides of a request body by what it asks of the API
/// outside the sandbox: `Err` for a body it cannot read (the reason),
/// `Ok(Some(why))` for one it refuses, `Ok(None)` for one it forwards
/// (as far as this goes: models and budgets are decided apart).
pub fn verdict(body: &[u8], allowed: &BTreeSet<ServerTool>, profile: &str) -> Result<Option<String>, String> {
    let head: Head<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(head.outside_the_sandbox(allowed, profile))
}

impl Head<'_> {
    /// Why the request may not go upstream because of what it would have
    /// the API do outside the sandbox, if it may not: run a server tool
    /// `allowed` does not name, run a tool of a type warden does not know,
    /// or fetch a block's URL source (allowed with `web_fetch`).
    pub fn outside_the_sandbox(&self, allowed: &BTreeSet<ServerTool>, profile: &str) -> Option<String> {
        let tools = self.tools.as_ref();
        if let Some(kind) = tools.and_then(|t| t.unknown.as_ref()) {
            return Some(format!(
                "the request lists a tool of type {kind:?}, which warden does not know: the API may run it \
                 itself, outside the sandbox, so it is not forwarded"
            ));
        }
        let mut asked: Vec<(ServerTool, String)> = tools
            .map(|t| t.api.iter().map(|(t, kind)| (*t, kind.clone())).collect())
            .unwrap_or_default();
        if self.mcp_servers.as_ref().is_some_and(|m| !m.is_empty()) {
            asked.push((ServerTool::Mcp, "mcp_servers".into()));
        }
        if let Some(url) = [&self.messages, &self.system]
            .into_iter()
            .flatten()
            .find_map(|c| c.url.as_ref())
        {
            asked.push((ServerTool::WebFetch, format!("a block whose source is the URL {url:?}")));
        }
        let (tool, what) = asked.into_iter().find(|(t, _)| !allowed.contains(t))?;
        let names: Vec<&str> = allowed.iter().map(|t| t.as_str()).collect();
        Some(format!(
            "the request asks the API to run its own tool {tool} ({what}) outside the sandbox, which profile \
             {profile} does not allow (its [claude] server_tools: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting what each thread holds and the most
    /// it held: a test reads its own thread's figures, whatever the tests
    /// beside it allocate.
    struct Counting;

    thread_local! {
        static HELD: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    // A test allocator: GlobalAlloc is an unsafe trait.
    #[allow(unsafe_code)]
    // SAFETY: every call is passed on to the system allocator unchanged;
    // the counts are thread-local cells that allocate nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let held = HELD.with(|h| {
                h.set(h.get() + layout.size());
                h.get()
            });
            PEAK.with(|p| p.set(p.get().max(held)));
            // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            HELD.with(|h| h.set(h.get().saturating_sub(layout.size())));
            // SAFETY: ptr came from System.alloc with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// The most this thread held above what it held when `f` began.
    fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = HELD.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, PEAK.with(Cell::get) - base)
    }

    /// Reading a request holds nothing per element of its lists: 32 MB of
    /// empty tools, messages, blocks, or MCP servers is read holding less
    /// than 64 KiB beside the body.
    #[test]
    fn reading_a_request_holds_nothing_per_element() {
        // The count sees what is held: a MiB of it.
        let (held, peak) = peak_of(|| vec![1u8; 1 << 20]);
        assert!(peak >= held.len(), "{peak}");
        drop(held);
        let many = |item: &str| vec![item; (32 << 20) / (item.len() + 1)].join(",");
        for (what, body) in [
            (
                "tools",
                format!(
                    r#"{{"model":"m","tools":[{}]}}"#,
                    many(r#"{"type":"web_search_20250305"}"#)
                ),
            ),
            ("messages", format!(r#"{{"model":"m","messages":[{}]}}"#, many("{}"))),
            (
                "blocks",
                format!(
                    r#"{{"model":"m","messages":[{{"content":[{}]}}]}}"#,
                    many(r#"{"source":{}}"#)
                ),
            ),
            (
                "mcp_servers",
                format!(r#"{{"model":"m","mcp_servers":[{}]}}"#, many("{}")),
            ),
        ] {
            let (refused, peak) = peak_of(|| read(&body));
            assert!(refused.unwrap().is_some() || what != "tools", "{what}");
            assert!(peak < 64 << 10, "reading 32 MB of {what} held {peak} bytes");
        }
    }

    /// The verdict on `body` under a profile that allows no server tool.
    fn read(body: &str) -> Result<Option<String>, String> {
        verdict(body.as_bytes(), &BTreeSet::new(), "p")
    }

    /// A URL the API would fetch is found wherever a block may carry it:
    /// an image or document of a message, a tool result's content, a
    /// document whose source is content, the system prompt; a search
    /// result's plain source string and inline data are no fetch.
    #[test]
    fn url_sources_are_found_at_any_depth() {
        let msg = |content: &str| format!(r#"{{"model":"m","messages":[{{"role":"user","content":{content}}}]}}"#);
        let url = r#"{"type":"url","url":"https://exfil.example/?d=secret"}"#;
        let fetching = [
            msg(&format!(r#"[{{"type":"image","source":{url}}}]"#)),
            msg(&format!(
                r#"[{{"type":"text","text":"hi"}},{{"type":"document","source":{url}}}]"#
            )),
            msg(&format!(
                r#"[{{"type":"tool_result","tool_use_id":"t","content":[{{"type":"image","source":{url}}}]}}]"#
            )),
            msg(&format!(
                r#"[{{"type":"document","source":{{"type":"content","content":[{{"type":"image","source":{url}}}]}}}}]"#
            )),
            msg(&format!(r#"{{"type":"image","source":{url}}}"#)),
            format!(r#"{{"model":"m","system":[{{"type":"image","source":{url}}}],"messages":[]}}"#),
        ];
        for body in &fetching {
            let why = read(body)
                .unwrap()
                .unwrap_or_else(|| panic!("no fetch found in {body}"));
            assert!(
                why.contains(r#"web_fetch (a block whose source is the URL "https://exfil.example/?d=secret")"#),
                "{why}"
            );
        }
        let quiet = [
            msg(r#""plain text""#),
            msg(r#"[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]"#),
            msg(
                r#"[{"type":"search_result","source":"https://example.com/","title":"t","content":[{"type":"text","text":"x"}]}]"#,
            ),
            msg(r#"[{"type":"tool_use","id":"t","name":"Bash","input":{"source":{"type":"url","url":"https://x/"}}}]"#),
            msg(r#"[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"x"}}]"#),
            r#"{"model":"m","system":"be brief","messages":[]}"#.to_string(),
        ];
        for body in &quiet {
            assert_eq!(read(body), Ok(None), "{body}");
        }
        // Given twice, a source could be read otherwise upstream.
        let twice = msg(&format!(
            r#"[{{"type":"image","source":{{"type":"base64","data":"AAAA"}},"source":{url}}}]"#
        ));
        assert!(read(&twice).unwrap_err().contains("duplicate field `source`"));
        let deep = format!(
            r#"{{"model":"m","messages":[{{"content":{}1"#,
            r#"[{"content":"#.repeat(200)
        );
        assert!(read(&deep).is_err());
    }
}
