//! The run kind of a request (`x-claw-run-kind`): a heartbeat run the
//! control plane sent, or interactive traffic. It travels on the typed
//! request ([`crate::target::Routed`]) into its outcome, so usage is summed
//! per kind (`report::batch`) and a heartbeat run is never reported as the
//! agent's activity (`retry`). A leaf: it depends on nothing but
//! `metrics`.

/// What a request is part of, from `x-claw-run-kind`: a heartbeat run the
/// control plane sent, or anything else (an agent's conversation, a
/// client's call). Usage is accounted per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RunKind {
    /// No header, `interactive`, or a value the proxy does not know.
    #[default]
    Interactive,
    /// `x-claw-run-kind: heartbeat`.
    Heartbeat,
}

impl RunKind {
    /// The request header naming the run kind.
    pub(crate) const HEADER: &'static str = "x-claw-run-kind";

    /// The kind `headers` name. A value other than `heartbeat` or
    /// `interactive` is not an error: it counts as interactive (and in
    /// `claw_dp_run_kind_unrecognized_total`), so a client that sends its
    /// own labels is never refused.
    pub(crate) fn of(headers: &http::HeaderMap) -> RunKind {
        let Some(v) = headers.get(Self::HEADER) else {
            return RunKind::Interactive;
        };
        let v = v.as_bytes().trim_ascii();
        if v.eq_ignore_ascii_case(b"heartbeat") {
            RunKind::Heartbeat
        } else {
            if !v.eq_ignore_ascii_case(b"interactive") {
                crate::metrics::run_kind_unrecognized();
            }
            RunKind::Interactive
        }
    }

    /// The kind as reported (`UsageAggregate.run_kind`): `heartbeat`, or
    /// empty for interactive traffic.
    pub(crate) fn wire(self) -> &'static str {
        match self {
            RunKind::Interactive => "",
            RunKind::Heartbeat => "heartbeat",
        }
    }

    /// The kind as a metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RunKind::Interactive => "interactive",
            RunKind::Heartbeat => "heartbeat",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_kinds_are_read_from_the_header_and_unknown_ones_are_interactive() {
        let kind = |v: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = v {
                h.insert(RunKind::HEADER, http::HeaderValue::from_str(v).unwrap());
            }
            RunKind::of(&h)
        };
        assert_eq!(kind(None), RunKind::Interactive);
        assert_eq!(kind(Some("heartbeat")), RunKind::Heartbeat);
        assert_eq!(kind(Some(" HeartBeat ")), RunKind::Heartbeat);
        assert_eq!(kind(Some("interactive")), RunKind::Interactive);
        assert_eq!(kind(Some("cron")), RunKind::Interactive);
        assert_eq!(RunKind::Heartbeat.wire(), "heartbeat");
        assert_eq!(RunKind::Interactive.wire(), "");
    }
}
