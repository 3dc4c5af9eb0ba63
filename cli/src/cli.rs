//! The command line: every verb, flag and its help, parsed with clap.
//!
//! `--server`, `--token` and `-o` are global (before or after the verb).
//! `--timeout` (the RPC deadline) is accepted before the verb and on every
//! leaf verb; a backend's own upstream timeout is `--upstream-timeout`; see
//! [`parse`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use claw_proto::v1::ModelMapping;

use crate::client::Token;
use crate::output::Format;

const ROOT_EXAMPLES: &str = "\
Examples:
  export CLAW_SERVER=http://127.0.0.1:50051 CLAW_ADMIN_TOKEN=...
  clawctl backend add openai-1 --url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY \\
      --rpm 600 --model gpt-4o=gpt-4o-2024-08-06,in=0.0000025,out=0.00001
  clawctl backend list -o json
  clawctl key add app --models gpt-4o --rpm 120
  clawctl agent add a1 --model gpt-4o --interval 30m --active-hours 09:00-18:00 --tz Asia/Shanghai
  clawctl export -f claw.yaml && clawctl apply -f claw.yaml --dry-run";

/// Operate a Claw Gateway: backends, pools, client keys, agents and the
/// cluster, through the control plane's gRPC API.
#[derive(Debug, Parser)]
#[command(name = "clawctl", version, after_help = ROOT_EXAMPLES)]
pub struct Cli {
    /// Control plane gRPC URL (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "CLAW_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub server: String,

    /// Admin token, sent as `authorization: Bearer TOKEN` on every call.
    #[arg(
        long,
        global = true,
        env = "CLAW_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<Token>,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// PEM CA certificate to trust for an https:// control plane.
    #[arg(long, global = true, env = "CLAW_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,

    /// Deadline of the connection and of each call, e.g. 10s.
    #[arg(
        long = "timeout",
        id = RPC_TIMEOUT,
        value_name = "DURATION",
        default_value = "30s",
        value_parser = crate::duration::parse
    )]
    pub rpc_timeout: Duration,

    /// The verb to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Clap id of the RPC deadline flag (spelled `--timeout`).
const RPC_TIMEOUT: &str = "rpc_timeout";

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage provider backends (OpenAI or Anthropic Messages endpoints, `--api`).
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show or change the settings of the primary and fallback pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Manage client keys (the secret is printed once, at creation).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Manage agents and their heartbeat schedules.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Run heartbeats now, read their logs, edit checklists.
    #[command(subcommand)]
    Heartbeat(HeartbeatCmd),
    /// Usage totals, hourly and daily usage, and the cooldown history.
    #[command(subcommand)]
    Stats(crate::stats::StatsCmd),
    /// Manage named admin tokens with roles (the secret is printed once).
    #[command(subcommand)]
    Token(crate::token::TokenCmd),
    /// Show the name and role of the token in use.
    Whoami,
    /// Rotate the master key that encrypts stored provider keys.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCmd),
    /// Download a consistent backup of the whole store.
    #[command(subcommand)]
    Backup(crate::backup::BackupCmd),
    /// Show the configuration version, master key id and resource counts.
    Snapshot,
    /// List data-plane proxies and the configuration version each applied.
    Proxies,
    /// Who changed what: the audit log, newest first.
    #[command(after_help = "\
Examples:
  clawctl audit --since 24h
  clawctl audit --resource backend/openai-1 --token bootstrap -o json

After the verb, --token NAME filters by token name; give the admin token to
connect with before the verb (clawctl --token T audit ...) or in CLAW_ADMIN_TOKEN.")]
    Audit(crate::audit::AuditArgs),
    /// Write the whole configuration as YAML (secrets only by reference).
    Export(ExportArgs),
    /// Make the configuration match a YAML document written by `export`.
    Apply(ApplyArgs),
    /// Print a shell completion script (needs no server).
    #[command(after_help = "\
Examples:
  source <(clawctl completion bash)
  clawctl completion zsh > \"${fpath[1]}/_clawctl\"
  clawctl completion fish > ~/.config/fish/completions/clawctl.fish")]
    Completion {
        /// The shell to complete for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print clawctl's version and the control plane's (the client's even
    /// when the server cannot be reached).
    Version,
}

/// A backend, client key or agent named by its name or id.
#[derive(Debug, Args)]
pub struct Target {
    /// Name or id.
    #[arg(value_name = "NAME|ID")]
    pub name: String,
}

// ---------------------------------------------------------------- backend

/// `clawctl backend ...`
#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Create a backend.
    #[command(after_help = "\
Examples:
  clawctl backend add openai-1 --url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY \\
      --rpm 600 --tpm 100000 --upstream-timeout 2m --model gpt-4o=gpt-4o-2024-08-06,in=0.0000025,out=0.00001
  clawctl backend add local --url http://10.0.0.5:8000/v1 --api-key-file /etc/claw/local.key \\
      --pool fallback --model llama3 --model gpt-4o-mini=llama3,context=8192
  clawctl backend add openrouter --url https://openrouter.ai/api/v1 --api-key-env OPENROUTER_API_KEY \\
      --model claude-sonnet=anthropic/claude-sonnet-4.5,in_per_mtok=3,out_per_mtok=15,cache_read_per_mtok=0.3
  clawctl backend add anthropic-1 --api anthropic --url https://api.anthropic.com/v1 --api-key-env ANTHROPIC_API_KEY \\
      --model claude-sonnet=claude-sonnet-4-5,in_per_mtok=3,out_per_mtok=15,cache_read_per_mtok=0.3,cache_write_per_mtok=3.75,cache_write_1h_per_mtok=6
  printf %s \"$KEY\" | clawctl backend add b2 --url https://x.example/v1 --api-key-stdin")]
    Add(BackendAddArgs),
    /// List backends.
    #[command(visible_alias = "ls")]
    List,
    /// Show one backend, with its model mappings.
    Get(Target),
    /// Change a backend; only the given flags change.
    #[command(after_help = "\
Examples:
  clawctl backend update openai-1 --rpm 900 --tpm 0 --upstream-timeout 5m
  clawctl backend update openai-1 --api-key-env OPENAI_API_KEY_NEW
  clawctl backend update compat-1 --api anthropic --url https://compat.example/anthropic/v1
  clawctl backend update openai-1 --model gpt-4o --model gpt-4o-mini   # replaces all mappings")]
    Update(BackendUpdateArgs),
    /// Delete a backend.
    #[command(visible_alias = "delete")]
    Rm(Target),
    /// Let a backend receive traffic again.
    Enable(Target),
    /// Stop sending traffic to a backend (its configuration is kept).
    Disable(Target),
}

/// Where the API key of a new backend comes from (exactly one).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ApiKeyArgs {
    /// Read the API key from this environment variable (recorded as
    /// `env:VAR` so `export` can name it).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Read the API key from this file (recorded as `file:<absolute path>`).
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// Read the API key from standard input.
    #[arg(long)]
    pub api_key_stdin: bool,
}

/// A new API key for an existing backend (at most one source).
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct NewApiKeyArgs {
    /// Read the new API key from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Read the new API key from this file.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// Read the new API key from standard input.
    #[arg(long)]
    pub api_key_stdin: bool,
}

/// Flags of `backend add`.
#[derive(Debug, Args)]
pub struct BackendAddArgs {
    /// Unique name: letters, digits, '.', '_' and '-'.
    pub name: String,
    /// Base URL of the API, e.g. https://api.openai.com/v1 or (with
    /// `--api anthropic`) https://api.anthropic.com/v1.
    #[arg(long, value_name = "URL")]
    pub url: String,
    #[command(flatten)]
    pub key: ApiKeyArgs,
    /// Protocol the backend speaks: openai (Chat Completions, Responses, ...;
    /// key sent as `Authorization: Bearer`) or anthropic (Messages; key sent
    /// as `x-api-key`).
    #[arg(long, value_enum, default_value_t = ApiArg::Openai)]
    pub api: ApiArg,
    /// Pool: primary backends are tried before fallback ones.
    #[arg(long, value_enum, default_value_t = PoolArg::Primary)]
    pub pool: PoolArg,
    /// Requests per minute for the whole fleet.
    #[arg(long, default_value_t = 60, value_name = "N")]
    pub rpm: u32,
    /// Tokens per minute for the whole fleet (default: unlimited).
    #[arg(long, value_name = "N")]
    pub tpm: Option<u32>,
    /// How long the backend may take to answer (default 120s); not the
    /// RPC deadline, which is `--timeout`.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub upstream_timeout: Option<Duration>,
    /// Relative weight within the pool, 1-1000 (default 1).
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
    /// Free-form label for humans.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// A model the backend serves; repeat for several. Format:
    /// CANONICAL[=NATIVE][,in=USD_PER_TOKEN,out=USD_PER_TOKEN,cache_read=..,cache_write=..,cache_write_1h=..,context=N,max_tokens=N];
    /// cache_write prices 5-minute cache writes, cache_write_1h 1-hour ones
    /// (default: cache_write); each price may be given per million tokens
    /// instead: in_per_mtok=USD, out_per_mtok=.., cache_read_per_mtok=..,
    /// cache_write_per_mtok=.., cache_write_1h_per_mtok=..
    #[arg(long = "model", value_name = "SPEC", value_parser = crate::model_spec::parse_model_spec)]
    pub models: Vec<ModelMapping>,
    /// Create the backend disabled.
    #[arg(long)]
    pub disabled: bool,
    /// Serve only requests in the backend's own protocol: no Chat
    /// Completions ↔ Messages translation onto it.
    #[arg(long)]
    pub native_only: bool,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Health probe flags of `backend add` and `backend update`. Unset values
/// use the control plane's defaults (its `--probe-interval`,
/// `--probe-timeout`, `--probe-failures`: 60s / 10s / 3 unless changed).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Time between health probes, 1s-24h (default: the control plane's
    /// --probe-interval, 60s).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub probe_interval: Option<Duration>,
    /// How long a probe may take, 100ms-300s and shorter than the interval
    /// (default: the control plane's --probe-timeout, 10s).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub probe_timeout: Option<Duration>,
    /// Failed probes in a row that make the backend unhealthy, 1-100
    /// (default: the control plane's --probe-failures, 3).
    #[arg(long, value_name = "N")]
    pub probe_failures: Option<u32>,
    /// Never probe this backend (passive health from the proxies still
    /// applies).
    #[arg(long)]
    pub no_probe: bool,
}

/// Flags of `backend update`.
#[derive(Debug, Args)]
pub struct BackendUpdateArgs {
    /// Name or id of the backend.
    #[arg(value_name = "NAME|ID")]
    pub backend: String,
    /// Rename the backend.
    #[arg(long, value_name = "NEW")]
    pub name: Option<String>,
    /// New base URL.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    #[command(flatten)]
    pub key: NewApiKeyArgs,
    /// Change the protocol the backend speaks: openai or anthropic.
    #[arg(long, value_enum)]
    pub api: Option<ApiArg>,
    /// Move to another pool.
    #[arg(long, value_enum)]
    pub pool: Option<PoolArg>,
    /// Requests per minute for the whole fleet.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u32>,
    /// Tokens per minute for the whole fleet; 0 removes the limit.
    #[arg(long, value_name = "N")]
    pub tpm: Option<u32>,
    /// How long the backend may take to answer; not the RPC deadline,
    /// which is `--timeout`.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub upstream_timeout: Option<Duration>,
    /// Relative weight within the pool, 1-1000.
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
    /// Free-form label for humans.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Replace the whole model list (repeat for several); same format as for
    /// `backend add`.
    #[arg(long = "model", value_name = "SPEC", value_parser = crate::model_spec::parse_model_spec)]
    pub models: Vec<ModelMapping>,
    /// Remove every model mapping.
    #[arg(long, conflicts_with = "models")]
    pub clear_models: bool,
    /// Enable or disable the backend.
    #[arg(long, value_name = "true|false", action = ArgAction::Set)]
    pub enabled: Option<bool>,
    /// Serve only requests in the backend's own protocol (no translation);
    /// `--native-only=false` allows translation again.
    #[arg(
        long,
        value_name = "true|false",
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub native_only: Option<bool>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Probe the backend again after `--no-probe` (keeping its other
    /// probe settings).
    #[arg(long = "probe", conflicts_with = "no_probe")]
    pub probe_again: bool,
}

/// The pool names operators type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolArg {
    /// Tried first.
    Primary,
    /// Tried when no primary backend can take the request.
    Fallback,
}

impl From<PoolArg> for claw_proto::Pool {
    fn from(p: PoolArg) -> claw_proto::Pool {
        match p {
            PoolArg::Primary => claw_proto::Pool::Primary,
            PoolArg::Fallback => claw_proto::Pool::Fallback,
        }
    }
}

/// The protocols a backend can speak, as operators type them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiArg {
    /// OpenAI: Chat Completions, Completions, Embeddings, Responses.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

impl From<ApiArg> for claw_proto::v1::Api {
    fn from(a: ApiArg) -> claw_proto::v1::Api {
        match a {
            ApiArg::Openai => claw_proto::v1::Api::Openai,
            ApiArg::Anthropic => claw_proto::v1::Api::Anthropic,
        }
    }
}

// ---------------------------------------------------------------- pool

/// `clawctl pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Show the settings of one pool, or of both.
    Show {
        /// The pool; both when omitted.
        #[arg(value_enum)]
        pool: Option<PoolArg>,
    },
    /// List the settings of both pools (`pool show` without a pool).
    List,
    /// Show the settings of one pool (`pool show POOL`).
    Get {
        /// The pool.
        #[arg(value_enum)]
        pool: PoolArg,
    },
    /// Change pool settings; only the given flags change.
    #[command(after_help = "\
Examples:
  clawctl pool set primary --cooldown-base 5s --cooldown-max 5m --max-retries 3
  clawctl pool set fallback --queue-depth 512 --queue-timeout 1m --exponential false")]
    Set(PoolSetArgs),
}

/// Flags of `pool set`.
#[derive(Debug, Args)]
pub struct PoolSetArgs {
    /// The pool to change.
    #[arg(value_enum)]
    pub pool: PoolArg,
    /// First cooldown after a 429.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub cooldown_base: Option<Duration>,
    /// Longest cooldown.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub cooldown_max: Option<Duration>,
    /// Double the cooldown on each consecutive 429.
    #[arg(long, value_name = "true|false", action = ArgAction::Set)]
    pub exponential: Option<bool>,
    /// Fraction of the normal rate admitted while every backend cools (0-1).
    #[arg(long, value_name = "FRACTION")]
    pub emergency_fraction: Option<f64>,
    /// Retries on other backends after the first attempt.
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Requests that may wait for capacity.
    #[arg(long, value_name = "N")]
    pub queue_depth: Option<u32>,
    /// How long a request may wait in the queue.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub queue_timeout: Option<Duration>,
    /// Deadline of a whole request, retries included.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub request_timeout: Option<Duration>,
}

// ---------------------------------------------------------------- key

/// `clawctl key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create a client key and print its secret (shown only once).
    #[command(after_help = "\
Examples:
  clawctl key add app --models gpt-4o,gpt-4o-mini --rpm 120
  SECRET=$(clawctl key add ci -o json | jq -r .secret)")]
    Add(KeyAddArgs),
    /// List client keys.
    #[command(visible_alias = "ls")]
    List,
    /// Show one client key.
    Get(Target),
    /// Change a client key's models, rpm, max-parallel or agents; only the given flags change and
    /// the secret stays the same.
    #[command(after_help = "\
Examples:
  clawctl key update app --rpm 600
  clawctl key update app --models gpt-4o,gpt-4o-mini
  clawctl key update app --models ''      # every model
  clawctl key update app --max-parallel 4 # per proxy
  clawctl key update app --agents a1,a2   # x-claw-agent-id honoured for these
  clawctl key update app --agents ''      # for none")]
    Update(KeyUpdateArgs),
    /// Revoke a client key.
    #[command(visible_alias = "delete")]
    Rm(Target),
}

/// Flags of `key add`.
#[derive(Debug, Args)]
pub struct KeyAddArgs {
    /// Unique name of the key.
    pub name: String,
    /// Canonical models the key may use, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub models: Vec<String>,
    /// Requests per minute for this key across the fleet (default: unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rpm: u32,
    /// Most requests of this key in flight at once on each proxy (streams
    /// count until they end); beyond it 429 (default: unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_parallel: u32,
    /// Agent ids this key speaks for, comma-separated: its
    /// `x-claw-agent-id` is honoured only for these (default: none, the
    /// header is ignored).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub agents: Vec<String>,
}

/// Flags of `key update`.
#[derive(Debug, Args)]
pub struct KeyUpdateArgs {
    /// Name or id of the key.
    #[arg(value_name = "NAME|ID")]
    pub name: String,
    /// Canonical models the key may use, comma-separated; '' allows all.
    #[arg(long, value_delimiter = ',', value_name = "A,B", num_args = 0..=1)]
    pub models: Option<Vec<String>>,
    /// Requests per minute for this key across the fleet; 0 is unlimited.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u32>,
    /// Most requests in flight at once on each proxy; 0 is unlimited.
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<u32>,
    /// Agent ids this key speaks for, comma-separated (replaces the list);
    /// '' clears it.
    #[arg(long, value_delimiter = ',', value_name = "A,B", num_args = 0..=1)]
    pub agents: Option<Vec<String>>,
}

// ---------------------------------------------------------------- agent

/// `clawctl agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Create an agent with a heartbeat schedule.
    #[command(after_help = "\
Examples:
  clawctl agent add a1 --model gpt-4o --interval 30m --active-hours 09:00-18:00 \\
      --tz Asia/Shanghai --checklist-file HEARTBEAT.md --webhook https://hooks.example/a1
  clawctl agent add nightly --model gpt-4o-mini --interval 1h30m --active-hours 22:00-06:00")]
    Add(AgentAddArgs),
    /// List agents.
    #[command(visible_alias = "ls")]
    List,
    /// Show one agent, with its checklist.
    Get(AgentTarget),
    /// Change an agent; only the given flags change.
    #[command(after_help = "\
Examples:
  clawctl agent update a1 --interval 1h --active-hours ''     # always active
  clawctl agent update a1 --checklist-file HEARTBEAT.md --enabled true")]
    Update(AgentUpdateArgs),
    /// Delete an agent.
    #[command(visible_alias = "delete")]
    Rm(AgentTarget),
    /// Resume an agent's heartbeat.
    Enable(AgentTarget),
    /// Pause an agent's heartbeat.
    Disable {
        #[command(flatten)]
        target: AgentTarget,
        /// Why it is paused, for other operators.
        #[arg(long, value_name = "TEXT", default_value = "")]
        note: String,
    },
    /// Show the agent's next heartbeat times and why each was chosen.
    Next {
        #[command(flatten)]
        target: AgentTarget,
        /// How many slots (at most 100).
        #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 5)]
        count: u32,
    },
}

// ---------------------------------------------------------------- heartbeat

/// `clawctl heartbeat ...`
#[derive(Debug, Subcommand)]
pub enum HeartbeatCmd {
    /// Fire an agent's heartbeat now (bypasses active hours; merges with a run in flight).
    Run {
        #[command(flatten)]
        target: AgentTarget,
        /// Wait for the run to finish and show its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Show heartbeat run logs, newest first.
    #[command(after_help = "\
Examples:
  clawctl heartbeat logs a1 --limit 20
  clawctl heartbeat logs -o json | jq '.[] | select(.status == \"failed\")'")]
    Logs {
        /// Agent id or name (default: every agent).
        #[arg(value_name = "ID")]
        agent: Option<String>,
        /// At most this many runs.
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: u32,
    },
    /// Show or replace an agent's checklist (its HEARTBEAT.md).
    #[command(subcommand)]
    Checklist(ChecklistCmd),
    /// Put dead-lettered webhook deliveries back in the outbox (same body
    /// and Idempotency-Key, fresh attempts).
    #[command(after_help = "\
Examples:
  clawctl heartbeat redeliver hbr_0123456789abcdef
  clawctl heartbeat redeliver --dead-letters --agent a1
  clawctl heartbeat redeliver --dead-letters      # every dead letter, at most 10000 per call")]
    #[command(group(clap::ArgGroup::new("which").required(true).args(["run_id", "dead_letters"])))]
    Redeliver {
        /// The dead-lettered run.
        #[arg(value_name = "RUN_ID", conflicts_with = "dead_letters")]
        run_id: Option<String>,
        /// Every dead letter (of --agent).
        #[arg(long)]
        dead_letters: bool,
        /// Only this agent's dead letters (id or name).
        #[arg(long, value_name = "ID", conflicts_with = "run_id")]
        agent: Option<String>,
    },
}

/// `clawctl heartbeat checklist ...`
#[derive(Debug, Subcommand)]
pub enum ChecklistCmd {
    /// Print the checklist.
    Get(AgentTarget),
    /// Replace the checklist from a file or standard input.
    #[command(after_help = "\
Examples:
  clawctl heartbeat checklist set a1 -f HEARTBEAT.md
  printf '- [ ] check the inbox\\n' | clawctl heartbeat checklist set a1")]
    Set {
        #[command(flatten)]
        target: AgentTarget,
        /// File to read ('-' or absent: standard input).
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        file: Option<PathBuf>,
    },
}

/// An agent named by id or name.
#[derive(Debug, Args)]
pub struct AgentTarget {
    /// Agent id or name.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Settings shared by `agent add` and `agent update`.
#[derive(Debug, Args)]
pub struct AgentSettings {
    /// Heartbeat interval, e.g. 30m or 1h30m (default 30m).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub interval: Option<Duration>,
    /// Local active window HH:MM-HH:MM (overnight wraps; '' = always).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub active_hours: Option<String>,
    /// IANA time zone of the active window (default UTC).
    #[arg(long = "tz", visible_alias = "timezone", value_name = "ZONE")]
    pub timezone: Option<String>,
    /// File with the heartbeat checklist (HEARTBEAT.md); '-' reads stdin.
    #[arg(long, value_name = "PATH")]
    pub checklist_file: Option<PathBuf>,
    /// Where non-OK heartbeat replies are delivered ('' = nowhere).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// File with a prompt replacing the built-in heartbeat prompt.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Per-run timeout (default min(interval, 10m)).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub run_timeout: Option<Duration>,
    /// How late a missed run may still fire after downtime (default one interval).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub catch_up: Option<Duration>,
    /// Put slots on round multiples of the interval instead of a per-agent phase.
    #[arg(long, conflicts_with = "stagger")]
    pub no_stagger: bool,
    /// Spread slots by a stable per-agent phase (the default).
    #[arg(long)]
    pub stagger: bool,
    /// Give each run its own session (agent:ID:heartbeat:UNIX_MS); 'false' to share one.
    #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub isolated_session: Option<bool>,
    /// Interactive traffic within this window defers the heartbeat (default 2m).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub busy_window: Option<Duration>,
    /// Longest deferral while busy or without capacity, then skipped (default 10m).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub busy_defer_max: Option<Duration>,
    /// Environment variable holding the webhook HMAC secret ('' value clears it).
    #[arg(long, value_name = "VAR")]
    pub webhook_secret_env: Option<String>,
    /// What a slot does: 'llm' (default) calls the model through a proxy; 'wake'
    /// POSTs a signed wake request to --wake-url so the agent's own runtime runs
    /// the checklist with its tools and reports back on a per-run callback URL.
    #[arg(long, value_name = "llm|wake", value_parser = ["llm", "wake"])]
    pub target: Option<String>,
    /// The agent runtime's endpoint for wake requests (http or https; required
    /// with --target wake), e.g. an OpenClaw gateway's hooks URL.
    #[arg(long, value_name = "URL")]
    pub wake_url: Option<String>,
    /// Canonical model a run uses when the primary model has no capacity (every
    /// backend cooling) instead of deferring; '' clears it.
    #[arg(long, value_name = "MODEL")]
    pub fallback_model: Option<String>,
}

/// Flags of `agent add`.
#[derive(Debug, Args)]
pub struct AgentAddArgs {
    /// Agent id: lowercase letters, digits, '.', '_' and '-'.
    pub id: String,
    /// Canonical model the heartbeat runs on.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Display name (default: the id).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub settings: AgentSettings,
    /// Create the agent paused.
    #[arg(long)]
    pub disabled: bool,
}

/// Flags of `agent update`.
#[derive(Debug, Args)]
pub struct AgentUpdateArgs {
    /// Agent id or name.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Canonical model the heartbeat runs on.
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Display name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub settings: AgentSettings,
    /// Resume (true) or pause (false) the heartbeat.
    #[arg(long, value_name = "true|false", action = ArgAction::Set)]
    pub enabled: Option<bool>,
    /// Note explaining why the agent is paused.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
}

// ---------------------------------------------------------------- cluster

/// `clawctl master-key ...`
#[derive(Debug, Subcommand)]
pub enum MasterKeyCmd {
    /// Re-encrypt every stored secret under a new master key.
    #[command(after_help = "\
Example:
  openssl rand -hex 32 > new.key && clawctl master-key rotate --new-key-file new.key
Then restart the control plane with CLAW_MASTER_KEY_FILE=new.key (or CLAW_MASTER_KEY).")]
    Rotate {
        /// File holding the new key: 64 hex characters.
        #[arg(long, value_name = "PATH")]
        new_key_file: PathBuf,
    },
}

/// Flags of `export`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  clawctl export > claw.yaml
  clawctl export -f claw.yaml")]
pub struct ExportArgs {
    /// Write to this file instead of standard output.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// Flags of `apply`.
#[derive(Debug, Args)]
#[command(after_help = "\
Provider keys are read by clawctl from the variables and files the document
names (api_key_env / api_key_file) and sent once; relative key file paths are
relative to the document's directory.

Examples:
  clawctl apply -f claw.yaml --dry-run
  clawctl apply -f claw.yaml --prune
  clawctl export | clawctl --server http://other:50051 apply -f -")]
pub struct ApplyArgs {
    /// The YAML document; '-' reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: String,
    /// Validate and show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete backends, client keys and agents that are not in the document.
    #[arg(long)]
    pub prune: bool,
}

// ---------------------------------------------------------------- parsing

/// The command definition, with the RPC `--timeout` added to every leaf verb.
pub(crate) fn command() -> clap::Command {
    with_rpc_timeout(Cli::command(), true)
}

fn with_rpc_timeout(mut cmd: clap::Command, root: bool) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    if names.is_empty() && !root {
        return cmd.arg(
            clap::Arg::new(RPC_TIMEOUT)
                .long("timeout")
                .value_name("DURATION")
                .value_parser(crate::duration::parse)
                .help("Deadline of the connection and of each call (default 30s)"),
        );
    }
    for name in names {
        cmd = cmd.mut_subcommand(name, |c| with_rpc_timeout(c, false));
    }
    cmd
}

/// Parses the process arguments; on a usage error clap prints it and exits
/// with status 2 (0 for `--help`/`--version`).
pub fn parse() -> Cli {
    match try_parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    }
}

/// Parses arguments (the first is the program name).
pub(crate) fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(audit_token_filter(args))?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    if let Some(t) = leaf_rpc_timeout(&matches) {
        cli.rpc_timeout = t;
    }
    Ok(cli)
}

/// Global flags that take a value (so the verb is not mistaken for one).
const GLOBAL_VALUE_FLAGS: [&str; 6] = [
    "--server",
    "--token",
    "-o",
    "--output",
    "--ca-cert",
    "--timeout",
];

/// `clawctl audit --token NAME` filters by token name: after the `audit`
/// verb, `--token` is spelled as the filter's `--token-name` (the global
/// admin `--token` is still accepted before the verb).
fn audit_token_filter<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut out: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut i = 1;
    while i < out.len() {
        let arg = out[i].to_string_lossy().into_owned();
        if GLOBAL_VALUE_FLAGS.contains(&arg.as_str()) {
            i += 2;
        } else if arg.starts_with('-') {
            i += 1;
        } else {
            if arg == "audit" {
                for a in &mut out[i + 1..] {
                    let s = a.to_string_lossy().into_owned();
                    if s == "--token" {
                        *a = "--token-name".into();
                    } else if let Some(v) = s.strip_prefix("--token=") {
                        *a = format!("--token-name={v}").into();
                    }
                }
            }
            break;
        }
    }
    out
}

/// The `--timeout` given after the verb, if any.
fn leaf_rpc_timeout(matches: &ArgMatches) -> Option<Duration> {
    let mut current = matches.subcommand()?.1;
    while let Some((_, sub)) = current.subcommand() {
        current = sub;
    }
    current
        .try_get_one::<Duration>(RPC_TIMEOUT)
        .ok()
        .flatten()
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        try_parse_from(std::iter::once("clawctl").chain(args.iter().copied()))
    }

    #[test]
    fn audit_token_after_the_verb_is_the_filter() {
        let cli = parse(&[
            "--token",
            "admin-secret",
            "audit",
            "--token",
            "ops",
            "--since",
            "24h",
        ])
        .expect("valid");
        assert!(
            cli.token.is_some(),
            "the admin token before the verb is kept"
        );
        let Command::Audit(a) = cli.command else {
            panic!("audit verb");
        };
        assert_eq!(a.token_name.as_deref(), Some("ops"));
        let cli = parse(&["audit", "--token=ops"]).expect("valid");
        assert!(cli.token.is_none());
        let Command::Audit(a) = cli.command else {
            panic!("audit verb");
        };
        assert_eq!(a.token_name.as_deref(), Some("ops"));
    }

    #[test]
    fn definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn global_flags_work_before_and_after_the_verb() {
        let before =
            parse(&["-o", "json", "--server", "http://x:1", "backend", "list"]).expect("valid");
        let after =
            parse(&["backend", "list", "-o", "json", "--server", "http://x:1"]).expect("valid");
        for cli in [before, after] {
            assert_eq!(cli.output, Format::Json);
            assert_eq!(cli.server, "http://x:1");
        }
    }

    #[test]
    fn timeout_is_the_rpc_deadline_on_every_verb() {
        let cli = parse(&["--timeout", "5s", "backend", "list"]).expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(5));
        let cli = parse(&["backend", "list", "--timeout", "7s"]).expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(7));
        let cli = parse(&["snapshot", "--timeout", "2s"]).expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(2));
        let cli = parse(&[
            "--timeout",
            "9s",
            "backend",
            "add",
            "b1",
            "--url",
            "http://u",
            "--api-key-env",
            "K",
            "--upstream-timeout",
            "2m",
        ])
        .expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(9));
        match cli.command {
            Command::Backend(BackendCmd::Add(a)) => {
                assert_eq!(a.upstream_timeout, Some(Duration::from_secs(120)));
                assert_eq!(a.rpm, 60);
                assert_eq!(a.key.api_key_env.as_deref(), Some("K"));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn native_only_is_a_flag_on_add_and_set_or_cleared_on_update() {
        let add = |extra: &[&str]| {
            let mut args = vec![
                "backend",
                "add",
                "b1",
                "--url",
                "http://u",
                "--api-key-env",
                "K",
            ];
            args.extend_from_slice(extra);
            match parse(&args).expect("valid").command {
                Command::Backend(BackendCmd::Add(a)) => a.native_only,
                other => panic!("parsed as {other:?}"),
            }
        };
        assert!(!add(&[]));
        assert!(add(&["--native-only"]));
        let update = |extra: &[&str]| {
            let mut args = vec!["backend", "update", "b1"];
            args.extend_from_slice(extra);
            match parse(&args).expect("valid").command {
                Command::Backend(BackendCmd::Update(a)) => a.native_only,
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(update(&[]), None, "unset = unchanged");
        assert_eq!(update(&["--native-only"]), Some(true));
        assert_eq!(update(&["--native-only=true"]), Some(true));
        assert_eq!(update(&["--native-only=false"]), Some(false));
        // `--native-only false` would be ambiguous with a positional; the
        // value must be attached.
        assert!(parse(&["backend", "update", "b1", "--native-only=maybe"]).is_err());
    }

    #[test]
    fn timeout_after_backend_add_and_update_is_the_rpc_deadline() {
        let cli = parse(&[
            "backend",
            "add",
            "b1",
            "--url",
            "http://u",
            "--api-key-env",
            "K",
            "--timeout",
            "3s",
        ])
        .expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(3));
        match cli.command {
            Command::Backend(BackendCmd::Add(a)) => assert_eq!(a.upstream_timeout, None),
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&[
            "backend",
            "update",
            "b1",
            "--timeout",
            "4s",
            "--upstream-timeout",
            "1m",
        ])
        .expect("valid");
        assert_eq!(cli.rpc_timeout, Duration::from_secs(4));
        match cli.command {
            Command::Backend(BackendCmd::Update(a)) => {
                assert_eq!(a.upstream_timeout, Some(Duration::from_secs(60)));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn backend_add_needs_exactly_one_key_source() {
        assert!(parse(&["backend", "add", "b", "--url", "http://u"]).is_err());
        assert!(
            parse(&[
                "backend",
                "add",
                "b",
                "--url",
                "http://u",
                "--api-key-env",
                "A",
                "--api-key-stdin"
            ])
            .is_err()
        );
    }

    #[test]
    fn backend_api_defaults_to_openai_on_add_and_to_unchanged_on_update() {
        let add = |extra: &[&str]| {
            let mut args = vec![
                "backend",
                "add",
                "b",
                "--url",
                "http://u",
                "--api-key-env",
                "A",
            ];
            args.extend_from_slice(extra);
            match parse(&args).expect("valid").command {
                Command::Backend(BackendCmd::Add(a)) => a.api,
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(add(&[]), ApiArg::Openai);
        assert_eq!(add(&["--api", "anthropic"]), ApiArg::Anthropic);
        assert!(
            parse(&[
                "backend",
                "add",
                "b",
                "--url",
                "u",
                "--api-key-env",
                "A",
                "--api",
                "x"
            ])
            .is_err()
        );
        let update = |extra: &[&str]| {
            let mut args = vec!["backend", "update", "b"];
            args.extend_from_slice(extra);
            match parse(&args).expect("valid").command {
                Command::Backend(BackendCmd::Update(a)) => a.api,
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(update(&[]), None);
        assert_eq!(update(&["--api", "openai"]), Some(ApiArg::Openai));
    }

    #[test]
    fn token_is_not_shown_in_help() {
        let help = command().render_long_help().to_string();
        assert!(help.contains("[env: CLAW_ADMIN_TOKEN]"), "{help}");
    }
}
