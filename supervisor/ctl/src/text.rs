//! What wardenctl prints to a person's terminal.
//!
//! Owns: keeping a worker's bytes (or any text a tenant chose: a command
//! line, a profile's description, an error quoting a request) from driving
//! the operator's terminal. A terminal acts on control characters: escape
//! sequences can set the clipboard (OSC 52), retitle the window, rewrite
//! what is on screen, or hide text; bidirectional overrides reorder it.
//!
//! Must never: print a control character (C0 but newline and tab, DEL,
//! C1) or a bidirectional override into a table, `inspect`, `events` or an
//! error line; or pass one to a terminal from `logs` and `attach` unless
//! asked with `--raw`. Piped output stays byte for byte.

/// Whether `c` would act on a terminal instead of being shown.
fn acts(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// `s` with each character that acts (per `acts`) written by `escape`
/// instead.
fn escaped(s: &str, acts: impl Fn(char) -> bool, escape: impl Fn(char, &mut String)) -> String {
    if !s.chars().any(&acts) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if acts(c) {
            escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of a table or a message: every control character, newlines
/// and tabs included, shown escaped (`\u{1b}`).
pub fn plain(s: &str) -> String {
    escaped(s, acts, |c, out| out.extend(c.escape_unicode()))
}

/// A JSON text with the characters JSON leaves raw that would act on a
/// terminal (DEL, C1, bidirectional overrides; JSON already escapes C0)
/// escaped as `\uXXXX`: still the same JSON. A raw newline in a JSON text
/// is only ever a pretty-printer's line break (JSON escapes C0 in strings),
/// so it stays.
pub fn json_safe(s: &str) -> String {
    // Only characters of the Basic Multilingual Plane act: one \uXXXX each.
    escaped(
        s,
        |c| acts(c) && c != '\n',
        |c, out| out.push_str(&format!("\\u{:04x}", u32::from(c))),
    )
}

/// A stream of a worker's output on its way to a terminal: text, newlines,
/// tabs and carriage returns pass; every other control character, and any
/// byte that is not UTF-8, is shown escaped (`^[`, `\x9b`). UTF-8 split
/// across chunks is put back together.
#[derive(Debug, Default)]
pub struct Neutralizer {
    /// The start of a UTF-8 sequence the last chunk ended in.
    carry: Vec<u8>,
}

impl Neutralizer {
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(data);
        let mut out = Vec::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    push_text(&mut out, s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    push_text(&mut out, std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // Cut short by the chunk's end: wait for the rest.
                        None => {
                            self.carry = bad.to_vec();
                            break;
                        }
                        Some(n) => {
                            for b in &bad[..n] {
                                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                            }
                            rest = &bad[n..];
                        }
                    }
                }
            }
        }
        out
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        carry.iter().flat_map(|b| format!("\\x{b:02x}").into_bytes()).collect()
    }
}

fn push_text(out: &mut Vec<u8>, s: &str) {
    for c in s.chars() {
        match c {
            '\n' | '\t' | '\r' => out.push(u8::try_from(c).unwrap_or(b'?')),
            c if c.is_ascii_control() => {
                // Caret notation: ESC is ^[, DEL is ^?.
                out.push(b'^');
                out.push(u8::try_from(c).unwrap_or(0) ^ 0x40);
            }
            c if acts(c) => out.extend_from_slice(c.escape_unicode().to_string().as_bytes()),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_messages_show_control_characters_escaped() {
        assert_eq!(plain("ls -l"), "ls -l");
        assert_eq!(plain("a\x1b]52;c;aGk=\x07b"), "a\\u{1b}]52;c;aGk=\\u{7}b");
        assert_eq!(plain("x\ny\tz\u{9b}2J"), "x\\u{a}y\\u{9}z\\u{9b}2J");
        assert_eq!(plain("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(plain("naïve 日本"), "naïve 日本");
    }

    #[test]
    fn json_stays_json_without_raw_c1_or_overrides() {
        let v = serde_json::json!({"command": ["echo", "\u{1b}[2J\u{9b}31m\u{7f}\u{202e}"]});
        let text = json_safe(&v.to_string());
        assert!(!text.chars().any(acts), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        // Pretty-printed (inspect, stop): one line per field, as printed.
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let text = json_safe(&pretty);
        assert_eq!(text.lines().count(), pretty.lines().count(), "{text}");
        assert!(!text.contains("\\u000a"), "{text}");
        assert!(!text.chars().any(|c| acts(c) && c != '\n'), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
    }

    #[test]
    fn a_stream_to_a_terminal_loses_its_escape_sequences_not_its_text() {
        let mut n = Neutralizer::default();
        let out = n.feed(b"ok\n\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\tdone\x7f\n");
        assert_eq!(out, b"ok\n^[]52;c;ZXZpbA==^G^[[2J\r\tdone^?\n".to_vec());
        // UTF-8 split across chunks comes out whole; a C1 CSI and a byte
        // that is not UTF-8 come out escaped.
        let snow = "☃".as_bytes();
        let mut out = n.feed(&snow[..1]);
        out.extend(n.feed(&snow[1..]));
        out.extend(n.feed(b"\xc2\x9b31m \x9b"));
        out.extend(n.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "☃\\u{9b}31m \\x9b");
        let mut cut = Neutralizer::default();
        assert!(cut.feed(&snow[..2]).is_empty());
        assert_eq!(cut.finish(), b"\\xe2\\x98".to_vec());
    }
}
