//! `clawctl heartbeat run|logs|checklist get|set|redeliver` and `clawctl agent next`.

use std::io::Read as _;

use anyhow::{Context as _, anyhow};
use claw_proto::serde_fmt::short_name;
use claw_proto::v1::{
    GetChecklistRequest, HeartbeatRun, ListHeartbeatRunsRequest, ListNextSlotsRequest,
    RedeliverRunsRequest, RunHeartbeatRequest, RunStatus, SetChecklistRequest,
};

use crate::cli::{ChecklistCmd, HeartbeatCmd};
use crate::output::{self, Table};
use crate::session::Session;

/// Most dead letters the control plane requeues per call.
const REDELIVER_BATCH: usize = 10_000;

/// Runs a `heartbeat` verb.
pub(crate) async fn run(session: &Session, cmd: HeartbeatCmd) -> anyhow::Result<()> {
    match cmd {
        HeartbeatCmd::Run { target, wait } => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.heartbeats().run_heartbeat(RunHeartbeatRequest {
                    agent: target.id,
                    wait,
                }))
                .await?;
            let run = resp.run.unwrap_or_default();
            session.emit(&run, |out| {
                if resp.merged {
                    writeln!(out, "merged with the run already in flight")?;
                }
                table(std::slice::from_ref(&run)).write(out)
            })
        }
        HeartbeatCmd::Logs { agent, limit } => {
            let conn = session.connect().await?;
            let resp = conn
                .call(
                    conn.heartbeats()
                        .list_heartbeat_runs(ListHeartbeatRunsRequest {
                            agent: agent.unwrap_or_default(),
                            limit,
                        }),
                )
                .await?;
            session.emit(&resp.runs, |out| table(&resp.runs).write(out))
        }
        HeartbeatCmd::Redeliver {
            run_id,
            dead_letters,
            agent,
        } => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.heartbeats().redeliver_runs(RedeliverRunsRequest {
                    run_id: run_id.unwrap_or_default(),
                    dead_letters,
                    agent: agent.unwrap_or_default(),
                }))
                .await?;
            session.emit(&resp.run_ids, |out| {
                for id in &resp.run_ids {
                    writeln!(out, "run/{id} requeued")?;
                }
                match resp.run_ids.len() {
                    0 => writeln!(out, "no dead letters to redeliver"),
                    n if n >= REDELIVER_BATCH => writeln!(
                        out,
                        "{n} requeued (at most {REDELIVER_BATCH} per call: run it again for the rest)"
                    ),
                    n => writeln!(out, "{n} requeued"),
                }
            })
        }
        HeartbeatCmd::Checklist(ChecklistCmd::Get(target)) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(
                    conn.heartbeats()
                        .get_checklist(GetChecklistRequest { agent: target.id }),
                )
                .await?;
            session.emit(&resp, |out| {
                out.write_all(resp.checklist.as_bytes())?;
                if !resp.checklist.is_empty() && !resp.checklist.ends_with('\n') {
                    writeln!(out)?;
                }
                Ok(())
            })
        }
        HeartbeatCmd::Checklist(ChecklistCmd::Set { target, file }) => {
            let checklist = match file {
                Some(p) if p.as_os_str() != "-" => std::fs::read_to_string(&p)
                    .map_err(|e| anyhow!("--file: cannot read {}: {e}", p.display()))?,
                _ => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("cannot read the checklist from standard input")?;
                    text
                }
            };
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.heartbeats().set_checklist(SetChecklistRequest {
                    agent: target.id.clone(),
                    checklist,
                }))
                .await?;
            session.emit(&resp, |out| {
                writeln!(out, "agent/{} checklist set", target.id)?;
                if resp.effectively_empty {
                    writeln!(
                        out,
                        "note: the checklist is effectively empty; heartbeats will be skipped (empty_checklist)"
                    )?;
                }
                Ok(())
            })
        }
    }
}

/// `clawctl agent next AGENT -n N`.
pub(crate) async fn next(session: &Session, agent: String, count: u32) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(
            conn.heartbeats()
                .list_next_slots(ListNextSlotsRequest { agent, count }),
        )
        .await?;
    session.emit(&resp, |out| {
        let mut t = Table::new(&["TIME (UTC)", "LOCAL TIME", "REASON"]);
        for s in &resp.slots {
            t.row(vec![
                output::timestamp(&s.time),
                s.local_time.clone(),
                s.reason.clone(),
            ]);
        }
        t.write(out)?;
        if !resp.note.is_empty() {
            writeln!(out, "note: {}", resp.note)?;
        }
        Ok(())
    })
}

fn status(r: &HeartbeatRun) -> String {
    let s = RunStatus::try_from(r.status)
        .map(|s| short_name(s.as_str_name(), "RUN_STATUS_"))
        .unwrap_or_default();
    if r.skip_reason.is_empty() {
        s
    } else {
        format!("{s}({})", r.skip_reason)
    }
}

/// One row per run.
pub(crate) fn table(runs: &[HeartbeatRun]) -> Table {
    let mut t = Table::new(&[
        "NOMINAL TIME",
        "AGENT",
        "TRIGGER",
        "STATUS",
        "DURATION",
        "TOKENS",
        "RUN ID",
        "DETAIL",
    ]);
    for r in runs {
        let trigger = claw_proto::v1::RunTrigger::try_from(r.trigger)
            .map(|t| short_name(t.as_str_name(), "RUN_TRIGGER_"))
            .unwrap_or_default();
        let detail = if r.error.is_empty() {
            r.reply_excerpt
                .replace('\n', " ")
                .chars()
                .take(60)
                .collect()
        } else {
            r.error.clone()
        };
        t.row(vec![
            output::timestamp(&r.nominal_time),
            r.agent_id.clone(),
            trigger,
            status(r),
            format!("{}ms", r.duration_ms),
            r.tokens.to_string(),
            r.run_id.clone(),
            detail,
        ]);
    }
    t
}
