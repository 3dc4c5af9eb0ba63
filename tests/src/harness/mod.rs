//! The cross-process harness: starts our real binaries as child processes on
//! ephemeral loopback ports with temp dirs, and tears them down on drop.
//!
//! - [`binary`]: finding `claw-control-plane`, `claw-data-plane`, `clawctl`
//!   and `claw-mock-upstream` in the cargo target dir.
//! - `child`: one child process: own process group, stderr to a log file,
//!   the `listening …` line read with a timeout, a watchdog so nothing
//!   outlives the test process, killed on drop.
//! - [`ControlPlane`] (`control_plane`): temp data dir, random master key
//!   and tokens; stop, `kill9`, restart on the same ports; runs `clawctl`;
//!   [`offline_check`] runs `claw-control-plane check` on a data dir.
//! - [`Proxy`] (`proxy`): a data plane attached to a control plane;
//!   `wait_ready` polls `/readyz`.
//! - [`CtlCommand`] / [`CtlOutput`] (`ctl`): running the real `clawctl`.
//! - [`MockUpstreamProcess`] (`mock_process`): the mock upstream binary,
//!   scripted over its control API.
//! - [`Forwarder`] (`forward`): a TCP port known before its target exists
//!   (the control plane's heartbeat proxy address, set once the proxy runs).
//! - [`http`]: a tiny blocking HTTP client for probes.
//! - [`LogDir`] (`logs`): log dirs, kept when a test fails.
//! - [`SmallFs`] (`smallfs`): a small tmpfs of its own (needs root), for
//!   tests that fill the disk.
//! - [`heartbeat`]: the heartbeat tests' fixtures — a control plane whose
//!   heartbeats go through a [`Forwarder`]
//!   ([`ControlPlaneBuilder::heartbeats_through`], fast webhook retries),
//!   [`heartbeat::heartbeat_fleet`], backends keyed from the environment,
//!   agents, the run log, manual runs, chats as an agent, signatures.
//! - `wait`, `secrets`: [`wait_until`], [`random_hex`], [`grep_dir`].
//!
//! Process management is synchronous: starting a binary blocks until it
//! prints its `listening` line (read on a thread, with a timeout). That is
//! safe in `#[tokio::test]`s because the in-process
//! [`MockUpstream`](crate::mock::MockUpstream) runs on its own runtime; for
//! anything else the test itself serves while a child calls it, use a
//! multi-thread runtime or [`CtlCommand::run_async`].
//!
//! Set `CLAW_TEST_KEEP_LOGS=1` to keep every log dir; those of failing tests
//! are always kept and their tails printed.

pub mod binary;
mod child;
mod control_plane;
mod ctl;
mod forward;
pub mod heartbeat;
pub mod http;
mod logs;
mod mock_process;
mod proxy;
mod secrets;
mod smallfs;
mod wait;

pub use binary::binary_path;
pub use child::{DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, Listening, StartError};
pub use control_plane::{ControlPlane, ControlPlaneBuilder, TlsFiles, offline_check};
pub use ctl::{CTL_TIMEOUT, CtlCommand, CtlOutput};
pub use forward::Forwarder;
pub use logs::{KEEP_LOGS_ENV, LogDir};
pub use mock_process::MockUpstreamProcess;
pub use proxy::{Proxy, ProxyBuilder, READY_TIMEOUT};
pub use secrets::{grep_dir, random_hex};
pub use smallfs::SmallFs;
pub use wait::{POLL_INTERVAL, wait_until, wait_until_async};
