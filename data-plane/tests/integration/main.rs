//! The data plane's integration tests, one binary (`cargo test -p
//! claw-data-plane --test integration`): each module is one former test
//! file, and they share `support`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod affinity;
mod binary;
mod discovery;
mod perf;
mod protocols;
mod proxy;
mod report;
mod support;
mod timeouts;
mod translate;
mod translate_e2e;
mod usage;
