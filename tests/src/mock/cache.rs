//! The simulated prompt cache of one mock, i.e. of one provider account.
//!
//! Invariant: a prefix is a cache read only if this same mock saw it before;
//! it never depends on another mock or on time. That is what makes "cache
//! reads follow the backend" observable: a session spread over accounts pays
//! writes (Anthropic) or gets no reads (OpenAI) on every account it touches.
//!
//! A prefix is identified by a chained FNV-1a hash over its blocks' canonical
//! JSON (`cache_control` removed, so moving a breakpoint does not change what
//! is cached), with each block's token count kept beside it.
//!
//! - Anthropic (explicit): the prefix up to a `cache_control` breakpoint is
//!   cacheable. The longest prefix seen before (looked for at every block
//!   boundary up to 20 blocks before a breakpoint, as the real API does) is
//!   read; the rest up to the last breakpoint is written, each segment with the ttl of the
//!   breakpoint that closes it (`5m` default, `1h`).
//! - OpenAI (automatic): the prompt minus its last message is cacheable when
//!   it has at least [`MockConfig::cache_min_tokens`](super::MockConfig)
//!   tokens; seen before → `cached_tokens`, no write accounting.

use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashSet;

/// How many blocks before a breakpoint a cache hit is looked for.
const LOOKBACK: usize = 20;

/// One unit of a prompt: a tool, a system block, a message content block.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    /// Hash of the block's canonical JSON.
    pub(crate) hash: u64,
    pub(crate) tokens: u64,
    /// `Some(true)` for a `ttl: "1h"` breakpoint, `Some(false)` for a 5-minute one.
    pub(crate) breakpoint: Option<bool>,
}

impl Block {
    /// A block from its JSON; `cache_control` marks a breakpoint and is left
    /// out of the hash.
    pub(crate) fn from_json(v: &Value, tokens: u64) -> Self {
        let breakpoint = v
            .get("cache_control")
            .map(|cc| cc.get("ttl").and_then(Value::as_str) == Some("1h"));
        let hash = match v {
            Value::Object(map) if map.contains_key("cache_control") => {
                let mut map = map.clone();
                map.remove("cache_control");
                fnv(Value::Object(map).to_string().as_bytes())
            }
            other => fnv(other.to_string().as_bytes()),
        };
        Self {
            hash,
            tokens,
            breakpoint,
        }
    }
}

/// Cache accounting of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheUse {
    pub(crate) read: u64,
    pub(crate) write_5m: u64,
    pub(crate) write_1h: u64,
}

impl CacheUse {
    pub(crate) fn write(&self) -> u64 {
        self.write_5m + self.write_1h
    }
}

/// The prefixes one mock has seen.
#[derive(Debug, Default)]
pub(crate) struct PromptCache {
    seen: Mutex<HashSet<u64>>,
}

/// FNV-1a, 64 bits.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    chain(0xcbf2_9ce4_8422_2325, bytes)
}

/// Continues an FNV-1a hash with more bytes.
pub(crate) fn chain(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn prefix_hashes(blocks: &[Block]) -> Vec<u64> {
    let mut h = 0x84222325_u64;
    blocks
        .iter()
        .map(|b| {
            h = chain(h, &b.hash.to_le_bytes());
            h
        })
        .collect()
}

impl PromptCache {
    /// Anthropic's explicit caching over `blocks` (tools, system, messages in
    /// that order). Records every breakpoint prefix as cached.
    pub(crate) fn anthropic(&self, blocks: &[Block], min_tokens: u64) -> CacheUse {
        let hashes = prefix_hashes(blocks);
        let mut cumulative = Vec::with_capacity(blocks.len());
        let mut sum = 0;
        for b in blocks {
            sum += b.tokens;
            cumulative.push(sum);
        }
        let breakpoints: Vec<usize> = blocks
            .iter()
            .enumerate()
            .filter(|(i, b)| b.breakpoint.is_some() && cumulative[*i] >= min_tokens)
            .map(|(i, _)| i)
            .collect();
        // As the real API: a hit is looked for at every block boundary up to
        // LOOKBACK blocks before a breakpoint (so a conversation whose
        // breakpoint moved to its new last message still reads the prefix
        // cached by the previous turn), the longest one winning.
        let mut seen = self.seen.lock();
        let hit = (0..blocks.len())
            .rev()
            .filter(|i| breakpoints.iter().any(|b| *b >= *i && *b - *i <= LOOKBACK))
            .find(|i| seen.contains(&hashes[*i]));
        let mut usage = CacheUse {
            read: hit.map_or(0, |i| cumulative[i]),
            ..CacheUse::default()
        };
        let mut covered = usage.read;
        for &i in breakpoints.iter().filter(|i| hit.is_none_or(|h| **i > h)) {
            let segment = cumulative[i] - covered;
            if blocks[i].breakpoint == Some(true) {
                usage.write_1h += segment;
            } else {
                usage.write_5m += segment;
            }
            covered = cumulative[i];
        }
        for &i in &breakpoints {
            seen.insert(hashes[i]);
        }
        usage
    }

    /// OpenAI's automatic caching: `prefix` is the prompt minus its last
    /// message. Returns the cached tokens and remembers the prefix.
    pub(crate) fn automatic(&self, prefix: &[Block], min_tokens: u64) -> u64 {
        let tokens: u64 = prefix.iter().map(|b| b.tokens).sum();
        if prefix.is_empty() || tokens < min_tokens.max(1) {
            return 0;
        }
        let Some(&hash) = prefix_hashes(prefix).last() else {
            return 0;
        };
        let mut seen = self.seen.lock();
        if seen.insert(hash) { 0 } else { tokens }
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        self.seen.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn block(text: &str, tokens: u64, cc: Option<&str>) -> Block {
        let mut v = json!({"type": "text", "text": text});
        if let Some(ttl) = cc {
            v["cache_control"] = if ttl.is_empty() {
                json!({"type": "ephemeral"})
            } else {
                json!({"type": "ephemeral", "ttl": ttl})
            };
        }
        Block::from_json(&v, tokens)
    }

    #[test]
    fn a_breakpoint_prefix_is_written_once_then_read() {
        let cache = PromptCache::default();
        let first = [block("sys", 10, Some("1h")), block("hi", 3, None)];
        assert_eq!(
            cache.anthropic(&first, 1),
            CacheUse {
                read: 0,
                write_5m: 0,
                write_1h: 10
            }
        );
        let second = [
            block("sys", 10, Some("1h")),
            block("hi", 3, None),
            block("more", 4, Some("")),
        ];
        assert_eq!(
            cache.anthropic(&second, 1),
            CacheUse {
                read: 10,
                write_5m: 7,
                write_1h: 0
            }
        );
        assert_eq!(cache.anthropic(&second, 1).read, 17);
        // The next turn moves its breakpoint to its new last block: the
        // previous turn's prefix is still found.
        let third = [
            block("sys", 10, Some("1h")),
            block("hi", 3, None),
            block("more", 4, None),
            block("next", 2, Some("")),
        ];
        assert_eq!(
            cache.anthropic(&third, 1),
            CacheUse {
                read: 17,
                write_5m: 2,
                write_1h: 0
            }
        );
        // Another mock (account) has seen nothing.
        assert_eq!(PromptCache::default().anthropic(&second, 1).read, 0);
    }

    #[test]
    fn automatic_prefixes_need_the_minimum_and_a_second_sighting() {
        let cache = PromptCache::default();
        let prefix = [block("a b c", 3, None)];
        assert_eq!(cache.automatic(&prefix, 4), 0);
        assert_eq!(cache.automatic(&prefix, 4), 0);
        assert_eq!(cache.automatic(&prefix, 2), 0);
        assert_eq!(cache.automatic(&prefix, 2), 3);
        assert_eq!(cache.automatic(&[], 0), 0);
    }
}
