//! The usage of a non-streaming answer too large to keep whole.
//!
//! Answers up to [`super::MAX_USAGE_BODY`] are collected and read by
//! [`crate::usage::Usage::from_answer`]. Past that the body is not kept:
//! [`TopLevelScan`] follows the JSON byte by byte (strings skipped with
//! `memchr`, which is where a huge answer's bytes are) and keeps only the
//! values of the top-level members it needs — `usage`, and `id` for a
//! stored response — wherever they are: OpenAI chat puts `usage` after the
//! choices, Anthropic Messages after the content, Responses after the
//! output, and a provider may put it first. Memory stays bounded by
//! [`MAX_MEMBER`] per kept value, whatever the answer's size.

/// Largest top-level member value kept (a `usage` object is a few hundred
/// bytes; anything larger is not a usage block).
const MAX_MEMBER: usize = 64 * 1024;

/// Where the scan is in the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the opening `{`.
    Start,
    /// Inside the top-level object, expecting a key (or `}`).
    Key,
    /// Inside a top-level key string.
    InKey,
    /// After a key, before its `:`.
    Colon,
    /// Inside a member's value (at any depth).
    Value,
    /// After the closing `}` (or the body is not a JSON object).
    Done,
}

/// Follows a JSON object's top level across chunks, keeping the raw values
/// of the `usage` and `id` members.
pub(super) struct TopLevelScan {
    at: At,
    /// Nesting depth inside a member value (0: the value is a scalar or
    /// has not opened yet).
    depth: u32,
    in_string: bool,
    escaped: bool,
    key: Vec<u8>,
    /// The member whose value is being kept, if any.
    keeping: Option<Which>,
    value: Vec<u8>,
    usage: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
    /// A kept value grew past [`MAX_MEMBER`].
    overflow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Usage,
    Id,
}

impl TopLevelScan {
    pub(super) fn new() -> Self {
        TopLevelScan {
            at: At::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            key: Vec::new(),
            keeping: None,
            value: Vec::new(),
            usage: None,
            id: None,
            overflow: false,
        }
    }

    /// Follows the next bytes of the body.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.at != At::Done {
            let used = match self.at {
                At::Value => self.value_bytes(bytes),
                At::InKey => self.key_bytes(bytes),
                _ => {
                    self.structural(bytes[0]);
                    1
                }
            };
            bytes = &bytes[used..];
        }
    }

    /// The raw `usage` value and `id` value, once the object closed.
    pub(super) fn finish(self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        if self.at != At::Done {
            return (None, None);
        }
        (self.usage, self.id)
    }

    fn structural(&mut self, b: u8) {
        if b.is_ascii_whitespace() {
            return;
        }
        self.at = match (self.at, b) {
            (At::Start, b'{') => At::Key,
            (At::Key, b'"') => {
                self.key.clear();
                At::InKey
            }
            (At::Key, b',') => At::Key,
            (At::Key, b'}') => At::Done,
            (At::Colon, b':') => {
                self.keeping = match self.key.as_slice() {
                    b"usage" => Some(Which::Usage),
                    b"id" => Some(Which::Id),
                    _ => None,
                };
                self.value.clear();
                self.depth = 0;
                At::Value
            }
            // Anything else: not an object this scan understands.
            _ => {
                self.usage = None;
                At::Done
            }
        };
    }

    /// Key bytes up to the closing quote; an escaped key is never one we
    /// keep, so escapes only have to be skipped.
    fn key_bytes(&mut self, bytes: &[u8]) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            let mut b = b;
            if self.escaped {
                self.escaped = false;
                b = 0xff;
            } else if b == b'\\' {
                self.escaped = true;
                continue;
            } else if b == b'"' {
                self.at = At::Colon;
                return i + 1;
            }
            // A key longer than 16 bytes is none we keep.
            if self.key.len() <= 16 {
                self.key.push(b);
            }
        }
        bytes.len()
    }

    /// Value bytes until the member ends (a `,` or `}` at the top level).
    fn value_bytes(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                // The bulk of a large answer: skip to the next quote or
                // backslash.
                match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                    Some(j) => {
                        i += j;
                        if bytes[i] == b'\\' {
                            self.escaped = true;
                        } else {
                            self.in_string = false;
                        }
                        i += 1;
                    }
                    None => i = bytes.len(),
                }
                continue;
            }
            let b = bytes[i];
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth > 0 => self.depth -= 1,
                b',' | b'}' if self.depth == 0 => {
                    self.keep(&bytes[..i]);
                    self.end_member();
                    self.at = if b == b'}' { At::Done } else { At::Key };
                    return i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        self.keep(bytes);
        bytes.len()
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.keeping.is_none() {
            return;
        }
        if self.value.len() + bytes.len() > MAX_MEMBER {
            self.overflow = true;
            self.keeping = None;
            self.value.clear();
            return;
        }
        self.value.extend_from_slice(bytes);
    }

    fn end_member(&mut self) {
        let value = std::mem::take(&mut self.value);
        match self.keeping.take() {
            Some(Which::Usage) => self.usage = Some(value),
            Some(Which::Id) => self.id = Some(value),
            None => {}
        }
    }
}

/// `{"usage":VALUE}` (or `{"id":VALUE}`): the member alone, for the
/// readers of whole answers.
pub(super) fn alone(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + key.len() + 5);
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(value);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(body: &[u8], chunk: usize) -> (Option<String>, Option<String>) {
        let mut s = TopLevelScan::new();
        for c in body.chunks(chunk.max(1)) {
            s.feed(c);
        }
        let (u, id) = s.finish();
        let text = |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).trim().to_string());
        (text(u), text(id))
    }

    #[test]
    fn finds_usage_after_a_huge_content_in_any_chunking() {
        let content = "x\\\"usage\\\": {} ".repeat(10_000);
        let body = format!(
            r#"{{"id":"chatcmpl-1","choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"prompt_tokens":3,"completion_tokens":4}} , "system_fingerprint":null}}"#
        );
        for chunk in [1, 7, 4096, body.len()] {
            let (u, id) = scan(body.as_bytes(), chunk);
            assert_eq!(
                u.as_deref(),
                Some(r#"{"prompt_tokens":3,"completion_tokens":4}"#),
                "chunk {chunk}"
            );
            assert_eq!(id.as_deref(), Some(r#""chatcmpl-1""#));
        }
    }

    #[test]
    fn finds_usage_before_the_content_and_ignores_nested_usage() {
        let body = r#"{"usage":{"input_tokens":5},"content":[{"usage":{"input_tokens":99}}],"type":"message"}"#;
        assert_eq!(
            scan(body.as_bytes(), 3).0.as_deref(),
            Some(r#"{"input_tokens":5}"#)
        );
    }

    #[test]
    fn a_truncated_or_non_object_body_has_no_usage() {
        assert_eq!(scan(br#"{"usage":{"a":1},"x":"#, 5).0, None);
        assert_eq!(scan(br#"[{"usage":{"a":1}}]"#, 5).0, None);
    }
}
