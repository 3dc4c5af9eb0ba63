//! What a heartbeat reply means: "all is well" (suppressed, nobody is told)
//! or an alert (delivered to the agent's webhook), and a bounded excerpt of
//! it for the run log.
//!
//! The model signals "nothing to report" with the token [`OK_TOKEN`] at the
//! start or the end of its reply. Models like to decorate, so before looking
//! we trim whitespace and the Markdown wrappers they add around a bare token
//! (`**HEARTBEAT_OK**`, `` `HEARTBEAT_OK` ``, `_…_`, `~~…~~`, quotes, a
//! closing `.` or `!`). A short remark next to the token (at most
//! [`MAX_OK_EXTRA_CHARS`] characters) is still an OK; a token buried in the
//! middle of a longer text, or next to a long text, is an alert, because the
//! text may be the model reporting something after all. The token is
//! case-sensitive and must stand alone as a word (`HEARTBEAT_OKAY` is not it).
//!
//! An empty (or whitespace-only) reply is an alert: heartbeats must never be
//! silent, and a model that answers nothing is something an operator needs
//! to see.

use std::fmt;

/// The token a model replies with when there is nothing to report.
pub const OK_TOKEN: &str = "HEARTBEAT_OK";

/// How many characters besides the token (after trimming wrappers) an OK
/// reply may contain.
pub const MAX_OK_EXTRA_CHARS: usize = 300;

/// How a heartbeat reply is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// Nothing to report: record the run as `suppressed`, deliver nothing.
    Suppressed,
    /// Deliver the reply to the agent's webhook.
    Alert(AlertReason),
}

/// Why a reply is an alert, for the run log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertReason {
    /// The reply was empty or only whitespace.
    EmptyReply,
    /// The reply neither starts nor ends with the token.
    NoOkToken,
    /// The reply has the token but too much other text around it.
    TooMuchText {
        /// Characters besides the token and surrounding whitespace.
        extra_chars: usize,
    },
    /// A wake-mode runtime reported `"status": "alert"` itself.
    RuntimeReported,
}

impl fmt::Display for AlertReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlertReason::EmptyReply => f.write_str("empty reply"),
            AlertReason::RuntimeReported => f.write_str("the agent's runtime reported an alert"),
            AlertReason::NoOkToken => write!(f, "reply does not start or end with {OK_TOKEN}"),
            AlertReason::TooMuchText { extra_chars } => write!(
                f,
                "{OK_TOKEN} with {extra_chars} other characters (more than {MAX_OK_EXTRA_CHARS})"
            ),
        }
    }
}

/// Characters trimmed from both ends of a reply, and from the remark next to
/// the token, before looking for the token: whitespace and Markdown/quote
/// decoration, plus closing punctuation.
fn is_wrapper(c: char) -> bool {
    c.is_whitespace() || matches!(c, '*' | '_' | '`' | '~' | '"' | '\'' | '.' | '!')
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Classifies a heartbeat reply; see the module doc for the rules.
pub fn classify(reply: &str) -> ReplyKind {
    let text = reply.trim_matches(is_wrapper);
    if text.is_empty() {
        return if reply.trim().is_empty() {
            ReplyKind::Alert(AlertReason::EmptyReply)
        } else {
            ReplyKind::Alert(AlertReason::NoOkToken)
        };
    }
    let rest = if let Some(after) = text.strip_prefix(OK_TOKEN)
        && !after.starts_with(is_word_char)
    {
        after
    } else if let Some(before) = text.strip_suffix(OK_TOKEN)
        && !before.ends_with(is_word_char)
    {
        before
    } else {
        return ReplyKind::Alert(AlertReason::NoOkToken);
    };
    let extra_chars = rest.trim_matches(is_wrapper).chars().count();
    if extra_chars <= MAX_OK_EXTRA_CHARS {
        ReplyKind::Suppressed
    } else {
        ReplyKind::Alert(AlertReason::TooMuchText { extra_chars })
    }
}

/// The first characters of `reply`, at most `max_chars` of them including a
/// trailing `…` when it was cut; cut on a `char` boundary, never inside a
/// UTF-8 sequence.
pub fn excerpt(reply: &str, max_chars: usize) -> String {
    if max_chars == 0 {
        return String::new();
    }
    match reply.char_indices().nth(max_chars) {
        // Fewer than max_chars + 1 chars: fits as is.
        None => reply.to_string(),
        Some(_) => {
            let cut = reply
                .char_indices()
                .nth(max_chars - 1)
                .map_or(reply.len(), |(i, _)| i);
            let mut out = String::with_capacity(cut + '…'.len_utf8());
            out.push_str(&reply[..cut]);
            out.push('…');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suppressed(s: &str) -> bool {
        classify(s) == ReplyKind::Suppressed
    }

    #[test]
    fn bare_and_decorated_tokens_are_suppressed() {
        for reply in [
            "HEARTBEAT_OK",
            "  HEARTBEAT_OK\n",
            "**HEARTBEAT_OK**",
            "`HEARTBEAT_OK`",
            "```\nHEARTBEAT_OK\n```",
            "_HEARTBEAT_OK_",
            "\"HEARTBEAT_OK\"",
            "HEARTBEAT_OK.",
        ] {
            assert!(suppressed(reply), "{reply:?}");
        }
    }

    #[test]
    fn a_short_remark_next_to_the_token_is_suppressed() {
        assert!(suppressed("HEARTBEAT_OK — inbox empty, calendar clear."));
        assert!(suppressed("All quiet. HEARTBEAT_OK"));
        assert!(suppressed("Nothing new today.\n\n**HEARTBEAT_OK**"));
    }

    #[test]
    fn the_remark_limit_is_300_characters() {
        let at_limit = format!("HEARTBEAT_OK {}", "é".repeat(300));
        assert!(suppressed(&at_limit));
        let over = format!("HEARTBEAT_OK {}", "é".repeat(301));
        assert_eq!(
            classify(&over),
            ReplyKind::Alert(AlertReason::TooMuchText { extra_chars: 301 })
        );
        let over_before = format!("{} HEARTBEAT_OK", "x".repeat(301));
        assert!(!suppressed(&over_before));
    }

    #[test]
    fn a_token_in_the_middle_is_an_alert() {
        assert_eq!(
            classify("Disk is 95% full. HEARTBEAT_OK otherwise, but check it."),
            ReplyKind::Alert(AlertReason::NoOkToken)
        );
    }

    #[test]
    fn lookalike_tokens_are_alerts() {
        assert!(!suppressed("HEARTBEAT_OKAY"));
        assert!(!suppressed("heartbeat_ok"));
        assert!(!suppressed("NOT_HEARTBEAT_OK"));
        assert!(!suppressed("The server is down"));
    }

    #[test]
    fn an_empty_reply_is_an_alert() {
        assert_eq!(classify(""), ReplyKind::Alert(AlertReason::EmptyReply));
        assert_eq!(classify(" \n\t"), ReplyKind::Alert(AlertReason::EmptyReply));
        assert_eq!(classify("**"), ReplyKind::Alert(AlertReason::NoOkToken));
        assert_eq!(AlertReason::EmptyReply.to_string(), "empty reply");
    }

    #[test]
    fn excerpt_cuts_on_char_boundaries_with_an_ellipsis() {
        assert_eq!(excerpt("short", 10), "short");
        assert_eq!(excerpt("exactly10!", 10), "exactly10!");
        assert_eq!(excerpt("abcdefghijk", 5), "abcd…");
        assert_eq!(excerpt("ééééé", 3), "éé…");
        assert_eq!(excerpt("🦀🦀🦀", 2), "🦀…");
        assert_eq!(excerpt("abc", 1), "…");
        assert_eq!(excerpt("abc", 0), "");
        assert_eq!(excerpt("", 0), "");
        for n in 1..12 {
            assert!(excerpt("añb🦀c→d", n).chars().count() <= n);
        }
    }
}
