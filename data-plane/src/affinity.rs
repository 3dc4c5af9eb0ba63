//! Session affinity: the key that keeps a conversation on one backend,
//! whichever proxy serves it, so the provider's prompt cache (kept per
//! account) stays warm.
//!
//! The key is the first found of: `x-claw-session-key`,
//! `x-claude-code-session-id`, `x-session-id`, the body's
//! `prompt_cache_key` (OpenAI) or `metadata.user_id` (Anthropic), the agent
//! id (`x-claw-agent-id`). An OpenClaw-style session key
//! `agent:{id}:{session}` (what the heartbeat sends) counts as its agent's:
//! an agent's sessions share its system prompt and tools, the cacheable
//! prefix, so a heartbeat lands where the agent's own traffic does and keeps
//! that cache warm. It is hashed once here; [`crate::select`] ranks
//! the candidates by weighted rendezvous hashing of that hash with each
//! backend's id, so every proxy holding the same snapshot ranks them alike.

use http::HeaderMap;
use serde_json::{Map, Value};

/// The session headers, in the order they are looked for.
pub(crate) const SESSION_HEADERS: [&str; 3] = [
    "x-claw-session-key",
    "x-claude-code-session-id",
    "x-session-id",
];

/// Where a request's affinity key came from (the metrics' `source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// One of [`SESSION_HEADERS`].
    Header,
    /// The body's `prompt_cache_key`.
    PromptCacheKey,
    /// The body's `metadata.user_id`.
    UserId,
    /// `x-claw-agent-id`.
    Agent,
}

impl Source {
    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::PromptCacheKey => "prompt_cache_key",
            Source::UserId => "user_id",
            Source::Agent => "agent",
        }
    }
}

/// A request's affinity: the hash of its key and where the key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Affinity {
    /// 64-bit hash of the key (stable across processes and versions).
    pub hash: u64,
    /// Where it came from.
    pub source: Source,
}

/// What of the body matters for affinity and stored responses, read by the
/// body scan ([`crate::route::body`]) or from a parsed body
/// ([`BodyHints::from_map`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BodyHints {
    /// `prompt_cache_key` (a string).
    pub prompt_cache_key: Option<String>,
    /// `metadata.user_id` (a string).
    pub user_id: Option<String>,
    /// `previous_response_id` (a string): the stored response this one continues.
    pub previous_response_id: Option<String>,
}

impl BodyHints {
    /// The hints of a parsed body.
    pub(crate) fn from_map(body: &Map<String, Value>) -> BodyHints {
        let string = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        BodyHints {
            prompt_cache_key: string(body.get("prompt_cache_key")),
            user_id: string(body.get("metadata").and_then(|m| m.get("user_id"))),
            previous_response_id: string(body.get("previous_response_id")),
        }
    }
}

/// The affinity of a request, if it has a key.
pub(crate) fn key(
    headers: &HeaderMap,
    hints: &BodyHints,
    agent_id: Option<&str>,
) -> Option<Affinity> {
    let header = SESSION_HEADERS.iter().find_map(|h| {
        let v = headers.get(*h)?.as_bytes();
        (!v.is_empty()).then_some(v)
    });
    let (hash, source) = if let Some(v) = header {
        match agent_of_session(v) {
            Some(agent) => (agent_hash(agent), Source::Agent),
            None => (hash64(v), Source::Header),
        }
    } else if let Some(k) = hints.prompt_cache_key.as_deref().filter(|k| !k.is_empty()) {
        (hash64(k.as_bytes()), Source::PromptCacheKey)
    } else if let Some(u) = hints.user_id.as_deref().filter(|u| !u.is_empty()) {
        (hash64(u.as_bytes()), Source::UserId)
    } else {
        (
            agent_hash(agent_id.filter(|a| !a.is_empty())?.as_bytes()),
            Source::Agent,
        )
    };
    Some(Affinity { hash, source })
}

/// The agent id of an OpenClaw-style session key `agent:{id}:{session}`.
fn agent_of_session(key: &[u8]) -> Option<&[u8]> {
    let rest = key.strip_prefix(b"agent:")?;
    let end = rest.iter().position(|b| *b == b':')?;
    (end > 0).then(|| &rest[..end])
}

/// The hash of an agent's affinity, whether it came from `x-claw-agent-id`
/// or a session key naming the agent.
fn agent_hash(agent: &[u8]) -> u64 {
    let mut k = Vec::with_capacity(agent.len() + 6);
    k.extend_from_slice(b"agent:");
    k.extend_from_slice(agent);
    hash64(&k)
}

/// FNV-1a, then a 64-bit finaliser (splitmix64): stable everywhere, unlike
/// std's `DefaultHasher`, whose algorithm may change between Rust releases
/// (proxies of two builds must still agree).
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// splitmix64's finaliser: spreads every input bit over the output.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_key_is_the_first_found() {
        let mut h = HeaderMap::new();
        let mut hints = BodyHints {
            prompt_cache_key: Some("pck".into()),
            user_id: Some("u".into()),
            previous_response_id: None,
        };
        let k = key(&h, &hints, Some("agent")).expect("key");
        assert_eq!((k.source, k.hash), (Source::PromptCacheKey, hash64(b"pck")));
        h.insert("x-session-id", HeaderValue::from_static("s1"));
        let k = key(&h, &hints, Some("agent")).expect("key");
        assert_eq!((k.source, k.hash), (Source::Header, hash64(b"s1")));
        h.insert("x-claw-session-key", HeaderValue::from_static("s0"));
        assert_eq!(key(&h, &hints, None).expect("key").hash, hash64(b"s0"));
        let h = HeaderMap::new();
        hints.prompt_cache_key = None;
        assert_eq!(key(&h, &hints, None).expect("key").source, Source::UserId);
        hints.user_id = None;
        assert_eq!(
            key(&h, &hints, Some("a")).expect("key").source,
            Source::Agent
        );
        assert_eq!(key(&h, &hints, None), None);
        // A heartbeat's session key lands where its agent's traffic does.
        let mut hb = HeaderMap::new();
        hb.insert(
            "x-claw-session-key",
            HeaderValue::from_static("agent:a:heartbeat"),
        );
        assert_eq!(key(&hb, &hints, None), key(&h, &hints, Some("a")));
        hb.insert("x-claw-session-key", HeaderValue::from_static("agent::x"));
        assert_eq!(key(&hb, &hints, None).expect("key").source, Source::Header);
    }

    #[test]
    fn hints_from_a_parsed_body() {
        let v = serde_json::json!({"model":"m","prompt_cache_key":"k","metadata":{"user_id":"u"},"previous_response_id":"resp_1"});
        let Value::Object(m) = v else { unreachable!() };
        let h = BodyHints::from_map(&m);
        assert_eq!(h.prompt_cache_key.as_deref(), Some("k"));
        assert_eq!(h.user_id.as_deref(), Some("u"));
        assert_eq!(h.previous_response_id.as_deref(), Some("resp_1"));
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: proxies of different builds must rank backends alike.
        assert_eq!(hash64(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_ne!(hash64(b"a"), hash64(b"b"));
    }
}
