//! The mock upstream: the one fake allowed in our tests, standing in for LLM
//! providers. One mock is one provider account: its prompt cache and its
//! stored responses are its own.
//!
//! It answers, like the real providers (shapes checked against the official
//! SDKs' types):
//! - OpenAI: `POST /v1/chat/completions`, `POST /v1/completions` (both also
//!   as SSE streams), `POST /v1/embeddings`, `POST /v1/responses` (JSON and
//!   SSE), `GET`/`DELETE /v1/responses/{id}`, with `Authorization: Bearer`;
//! - Anthropic: `POST /v1/messages` (JSON and SSE, the real event sequence),
//!   `POST /v1/messages/count_tokens`, with `x-api-key` and
//!   `anthropic-version`, errors (scripted ones too) in Anthropic's shape;
//! - `GET /v1/models` and `GET /v1/models/{id}` (Anthropic's shape when the
//!   request carries `anthropic-version`).
//!
//! It follows a script of failures and replies, simulates a per-account
//! prompt cache (`cache`), and keeps a record of what it received (exact
//! body bytes and headers) and reported, which tests compare the gateway's
//! own accounting against.
//!
//! - [`config`]: [`MockConfig`], shared with the binary's flags.
//! - [`action`]: [`Action`] and [`Rule`], the scripted behaviours.
//! - `script`: the FIFO / rules / always-action store consulted per request.
//! - [`record`]: [`RecordedRequest`], [`Outcome`], [`Totals`].
//! - `openai`: request parsing, token counting, bodies and SSE chunks.
//! - `anthropic`: the Messages format: blocks, bodies, SSE events, errors.
//! - `responses`: the Responses format and the per-mock response store.
//! - `tools`: tool calls (both protocols) for requests that offer tools.
//! - `cache`: the simulated prompt cache.
//! - `body`: response bodies (whole, streamed, cut short).
//! - `server`: accept loop, connections and `/v1` handlers.
//! - `control`: the `/_mock/…` control API (routes listed there).
//! - [`RawUpstream`]: a raw-TCP upstream answering a fixed status line that
//!   no HTTP library would send (`600`, `99`), for the proxy's hygiene tests.
//!
//! Token accounting: prompt tokens are the whitespace-separated words of all
//! message contents (or of `prompt` / `input`; for Messages also `system`
//! and tool names and descriptions; for Responses `instructions`, the input
//! items and a continued conversation), at least 1, cache reads and writes
//! included in the record whatever the protocol reports; a completion has
//! [`MockConfig::completion_tokens`] tokens `tok0 tok1 …` (or the words of a
//! scripted reply), capped by the request's `max_tokens`.
//!
//! ```no_run
//! # async fn demo() {
//! use claw_tests::mock::{Action, MockConfig, MockUpstream};
//! let mock = MockUpstream::start(MockConfig::default().name("up-1")).await;
//! mock.push(Action::rate_limited(Some(2)));
//! // point the gateway at mock.url() ...
//! assert_eq!(mock.totals().requests, 0);
//! # }
//! ```

pub mod action;
mod anthropic;
mod body;
mod cache;
pub mod config;
mod control;
mod openai;
mod raw;
pub mod record;
mod responses;
mod script;
mod server;
mod tools;

pub use action::{Action, ModelsFault, ResetPoint, Rule};
pub use body::{MockBody, ScriptedAbort};
pub use config::MockConfig;
pub use raw::RawUpstream;
pub use record::{Outcome, RecordedRequest, Totals};
pub use server::{ACCOUNT_HEADERS, Stop};

use server::Shared;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A running mock upstream, serving on its own runtime and thread so that a
/// test may block its own thread (waiting on a child process, say) without
/// starving the mock. Dropping it closes the port and every connection.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .field("name", &self.shared.config.name)
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Binds `config.addr` and starts serving.
    ///
    /// # Panics
    /// When the address cannot be bound (a test setup failure).
    pub async fn start(config: MockConfig) -> Self {
        Self::start_blocking(config)
    }

    /// [`MockUpstream::start`] for code outside an async context.
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub fn start_blocking(config: MockConfig) -> Self {
        let addr = config.addr;
        Self::try_start(config)
            .unwrap_or_else(|e| panic!("mock upstream: cannot listen on {addr}: {e}"))
    }

    /// Like [`MockUpstream::start_blocking`], returning bind errors.
    pub fn try_start(config: MockConfig) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(config.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads.max(1))
            .thread_name("claw-mock")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::new(config));
        let (stop, stop_rx) = watch::channel(Stop::Running);
        let serve_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("claw-mock-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => server::serve(listener, serve_shared, stop_rx).await,
                        Err(error) => {
                            tracing::error!(%error, "mock upstream: cannot register listener")
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://ip:port/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://ip:port`, for the `/_mock/…` routes.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// Queues a one-shot action for the next matching request.
    pub fn push(&self, action: Action) {
        self.shared.script.push([action]);
    }

    /// Queues several one-shot actions, in order.
    pub fn push_all(&self, actions: impl IntoIterator<Item = Action>) {
        self.shared.script.push(actions);
    }

    /// Sets (or with `None` clears) the action applied to every request that
    /// no queued action or rule claims.
    pub fn set_always(&self, action: Option<Action>) {
        self.shared.script.set_always(action);
    }

    /// Makes `GET /v1/models` fail (or, with `None`, answer normally again).
    pub fn set_models_fault(&self, fault: Option<ModelsFault>) {
        *self.shared.models_fault.lock() = fault;
    }

    /// Adds a persistent header rule.
    pub fn add_rule(&self, rule: Rule) {
        self.shared.script.add_rule(rule);
    }

    /// Replaces every header rule.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        self.shared.script.set_rules(rules);
    }

    /// One-shot actions not consumed yet.
    pub fn pending(&self) -> usize {
        self.shared.script.pending()
    }

    /// The finished requests, in arrival order (empty with `record: false`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorder.requests()
    }

    /// Counters over all requests.
    pub fn totals(&self) -> Totals {
        let mut totals = self.shared.recorder.totals();
        totals.script_pending = self.shared.script.pending() as u64;
        totals
    }

    /// Clears the script, the rules, the record, the totals, the simulated
    /// prompt cache and the stored responses.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Waits until at least `n` requests have finished and none is in
    /// flight, then returns the record.
    ///
    /// # Panics
    /// After `timeout`, with the totals seen.
    pub async fn wait_for_requests(&self, n: u64, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.totals();
            if t.requests >= n && t.in_flight == 0 {
                return self.requests();
            }
            assert!(
                Instant::now() < deadline,
                "mock upstream {}: waited {timeout:?} for {n} finished requests, totals: {t:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.stop.send(Stop::Now);
        if let Some(thread) = self.thread.take() {
            // Joining makes "the upstream is gone" true when drop returns:
            // the port is closed and every connection dropped.
            let _ = thread.join();
        }
    }
}

/// Serves a mock on an already-bound listener until `shutdown` resolves, then
/// drains open connections for at most `drain`. This is what the
/// `claw-mock-upstream` binary runs.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let shared = Arc::new(Shared::new(config));
    let (stop, stop_rx) = watch::channel(Stop::Running);
    let server = tokio::spawn(server::serve(listener, shared, stop_rx));
    shutdown.await;
    let _ = stop.send(Stop::Graceful);
    let abort = server.abort_handle();
    if tokio::time::timeout(drain, server).await.is_err() {
        let _ = stop.send(Stop::Now);
        abort.abort();
    }
}
