//! `claw-proto`: the `claw.v1` API shared by every Claw component.
//!
//! - [`v1`]: code generated from `proto/claw/v1/*.proto` (messages, tonic
//!   clients and servers).
//! - [`validate`]: field validation of backends, pools, client keys and agents.
//!   The control plane enforces it; `clawctl apply --dry-run` runs the same code.
//! - [`backup`]: the backup file format (magic, framed entries, checksummed
//!   trailer): the writer and the verifying reader.
//! - [`active_hours`]: the `HH:MM-HH:MM` active window of an agent.
//! - [`cooldown`]: the one cooldown backoff formula both planes apply.
//! - [`probe_settings`]: a backend's health probe settings: defaults, bounds.
//! - [`redact`]: masking of provider keys and the hand-written `Debug` of every
//!   message that carries a secret.
//! - [`serde_fmt`]: how enums and timestamps look in `-o json|yaml`.
//!
//! This crate does no I/O of its own ([`backup`] works on the caller's
//! `Read`/`Write`).

pub mod active_hours;
pub mod backup;
pub mod cooldown;
pub mod probe_settings;
pub mod redact;
pub mod serde_fmt;
pub mod validate;

/// Generated `claw.v1` messages and services.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("claw.v1");

    /// Encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("claw_descriptor");
}

pub use v1::Pool;

/// Sums usage: how a proxy sums its requests per bucket and the control
/// plane its stored buckets, so both count the same way. Saturating.
impl std::ops::AddAssign<&v1::UsageTotals> for v1::UsageTotals {
    fn add_assign(&mut self, b: &v1::UsageTotals) {
        self.requests = self.requests.saturating_add(b.requests);
        self.errors = self.errors.saturating_add(b.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(b.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(b.completion_tokens);
        self.cache_read_tokens = self.cache_read_tokens.saturating_add(b.cache_read_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(b.cache_write_tokens);
        self.translated = self.translated.saturating_add(b.translated);
        self.total_tokens = self.total_tokens.saturating_add(b.total_tokens);
        self.cost += b.cost;
        self.streamed = self.streamed.saturating_add(b.streamed);
        self.latency_ms_sum = self.latency_ms_sum.saturating_add(b.latency_ms_sum);
    }
}

impl v1::Api {
    /// The name operators type and read: `openai` (also for unspecified)
    /// or `anthropic`.
    pub fn name(self) -> &'static str {
        match self {
            v1::Api::Openai | v1::Api::Unspecified => "openai",
            v1::Api::Anthropic => "anthropic",
        }
    }

    /// Parses `openai` / `anthropic` (case-insensitive).
    pub fn parse(s: &str) -> Option<v1::Api> {
        match s.to_ascii_lowercase().as_str() {
            "openai" => Some(v1::Api::Openai),
            "anthropic" => Some(v1::Api::Anthropic),
            _ => None,
        }
    }
}

impl Pool {
    /// The name operators type and read: `primary` or `fallback`.
    pub fn name(self) -> &'static str {
        match self {
            Pool::Primary | Pool::Unspecified => "primary",
            Pool::Fallback => "fallback",
        }
    }

    /// Parses `primary` / `fallback` (case-insensitive).
    pub fn parse(s: &str) -> Option<Pool> {
        match s.to_ascii_lowercase().as_str() {
            "primary" => Some(Pool::Primary),
            "fallback" => Some(Pool::Fallback),
            _ => None,
        }
    }
}

impl v1::ChangeAction {
    /// Lowercase name: `create`, `update`, `delete`, `unchanged`.
    pub fn name(self) -> &'static str {
        match self {
            v1::ChangeAction::Unspecified => "unspecified",
            v1::ChangeAction::Create => "create",
            v1::ChangeAction::Update => "update",
            v1::ChangeAction::Delete => "delete",
            v1::ChangeAction::Unchanged => "unchanged",
        }
    }
}
