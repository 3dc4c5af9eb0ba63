//! `clawctl agent add|list|get|update|rm|enable|disable`: agents and their
//! heartbeat schedules. Durations are typed as `30m`/`1h30m` and sent as the
//! API's whole seconds.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use claw_proto::v1::{
    Agent, CreateAgentRequest, DeleteAgentRequest, GetAgentRequest, SetAgentEnabledRequest,
    UpdateAgentRequest,
};

use crate::cli::{AgentAddArgs, AgentCmd, AgentSettings, AgentUpdateArgs};
use crate::document::AgentDoc;
use crate::duration;
use crate::output::{self, Details, Table};
use crate::session::Session;

/// Runs an `agent` verb.
pub(crate) async fn run(session: &Session, cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Add(args) => {
            let agent = new_agent(args)?;
            let conn = session.connect().await?;
            let resp = conn
                .call(
                    conn.agents()
                        .create_agent(CreateAgentRequest { agent: Some(agent) }),
                )
                .await?;
            let agent = resp.agent.unwrap_or_default();
            warn_unserved(&conn, &agent).await;
            print_one(session, &agent)
        }
        AgentCmd::List => {
            let conn = session.connect().await?;
            let resp = conn.list_agents_all().await?;
            session.emit_resource(
                &resp.agents,
                || resp.agents.iter().map(AgentDoc::from).collect::<Vec<_>>(),
                |out| table(&resp.agents).write(out),
            )
        }
        AgentCmd::Get(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.agents().get_agent(GetAgentRequest { agent: t.id }))
                .await?;
            let agent = resp.agent.unwrap_or_default();
            session.emit_resource(
                &agent,
                || AgentDoc::from(&agent),
                |out| details(&agent).write(out),
            )
        }
        AgentCmd::Update(args) => {
            let req = update_request(args)?;
            let model_given = req.model.is_some() || req.fallback_model.is_some();
            let conn = session.connect().await?;
            let resp = conn.call(conn.agents().update_agent(req)).await?;
            let agent = resp.agent.unwrap_or_default();
            if model_given {
                warn_unserved(&conn, &agent).await;
            }
            print_one(session, &agent)
        }
        AgentCmd::Rm(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.agents().delete_agent(DeleteAgentRequest {
                    agent: t.id.clone(),
                }))
                .await?;
            session.emit(&resp, |out| writeln!(out, "agent/{} deleted", t.id))
        }
        AgentCmd::Enable(t) => set_enabled(session, t.id, true, String::new()).await,
        AgentCmd::Disable { target, note } => set_enabled(session, target.id, false, note).await,
        AgentCmd::Next { target, count } => crate::heartbeat::next(session, target.id, count).await,
    }
}

async fn warn_unserved(conn: &crate::client::Connection, agent: &Agent) {
    let what = format!("agent {:?}", agent.id);
    let mut models = vec![agent.model.clone()];
    if !agent.fallback_model.is_empty() {
        models.push(agent.fallback_model.clone());
    }
    crate::served::warn_unserved(conn, &what, &models).await;
}

async fn set_enabled(
    session: &Session,
    agent: String,
    enabled: bool,
    pause_note: String,
) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.agents().set_agent_enabled(SetAgentEnabledRequest {
            agent,
            enabled,
            pause_note,
        }))
        .await?;
    print_one(session, &resp.agent.unwrap_or_default())
}

fn print_one(session: &Session, a: &Agent) -> anyhow::Result<()> {
    session.emit_resource(
        a,
        || AgentDoc::from(a),
        |out| table(std::slice::from_ref(a)).write(out),
    )
}

/// The settings flags, converted and with files read.
struct Settings {
    interval_seconds: Option<u64>,
    active_hours: Option<String>,
    timezone: Option<String>,
    checklist: Option<String>,
    webhook_url: Option<String>,
    prompt: Option<String>,
    run_timeout_seconds: Option<u64>,
    catch_up_seconds: Option<u64>,
    stagger: Option<bool>,
    isolated_session: Option<bool>,
    busy_window_seconds: Option<u64>,
    busy_defer_max_seconds: Option<u64>,
    /// The secret read from `--webhook-secret-env` and that variable's ref.
    webhook_secret: Option<(String, String)>,
    /// `--target` as the API's enum (unspecified when not given).
    target: i32,
    wake_url: Option<String>,
    fallback_model: Option<String>,
}

fn settings(s: AgentSettings) -> anyhow::Result<Settings> {
    let secs = |flag: &str, d: Option<Duration>| -> anyhow::Result<Option<u64>> {
        d.map(|d| duration::to_secs(d).map_err(|e| anyhow!("--{flag}: {e}")))
            .transpose()
    };
    Ok(Settings {
        interval_seconds: secs("interval", s.interval)?,
        active_hours: s.active_hours,
        timezone: s.timezone,
        checklist: s
            .checklist_file
            .as_deref()
            .map(|p| read_text("--checklist-file", p))
            .transpose()?,
        webhook_url: s.webhook,
        prompt: s
            .prompt_file
            .as_deref()
            .map(|p| read_text("--prompt-file", p))
            .transpose()?,
        run_timeout_seconds: secs("run-timeout", s.run_timeout)?,
        catch_up_seconds: secs("catch-up", s.catch_up)?,
        stagger: match (s.stagger, s.no_stagger) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        isolated_session: s.isolated_session,
        busy_window_seconds: secs("busy-window", s.busy_window)?,
        busy_defer_max_seconds: secs("busy-defer-max", s.busy_defer_max)?,
        webhook_secret: s
            .webhook_secret_env
            .map(|var| -> anyhow::Result<(String, String)> {
                let value = std::env::var(&var).map_err(|_| {
                    anyhow!("--webhook-secret-env: environment variable {var} is not set")
                })?;
                let reference = if value.is_empty() {
                    String::new()
                } else {
                    format!("env:{var}")
                };
                Ok((value, reference))
            })
            .transpose()?,
        target: match s.target.as_deref() {
            Some("wake") => claw_proto::v1::HeartbeatTarget::Wake as i32,
            Some(_) => claw_proto::v1::HeartbeatTarget::Llm as i32,
            None => claw_proto::v1::HeartbeatTarget::Unspecified as i32,
        },
        wake_url: s.wake_url,
        fallback_model: s.fallback_model,
    })
}

/// Reads a text file, or standard input for `-`.
fn read_text(flag: &str, path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("{flag}: cannot read standard input"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{flag}: cannot read {}: {e}", path.display()))
}

fn new_agent(args: AgentAddArgs) -> anyhow::Result<Agent> {
    // Checked here too so the message comes before any connection attempt.
    claw_proto::validate::agent_id("id", &args.id)?;
    let s = settings(args.settings)?;
    Ok(Agent {
        id: args.id,
        name: args.name.unwrap_or_default(),
        model: args.model,
        interval_seconds: s.interval_seconds.unwrap_or(0),
        active_hours: s.active_hours.unwrap_or_default(),
        timezone: s.timezone.unwrap_or_default(),
        checklist: s.checklist.unwrap_or_default(),
        webhook_url: s.webhook_url.unwrap_or_default(),
        enabled: !args.disabled,
        prompt: s.prompt.unwrap_or_default(),
        run_timeout_seconds: s.run_timeout_seconds.unwrap_or(0),
        catch_up_seconds: s.catch_up_seconds.unwrap_or(0),
        stagger: s.stagger,
        isolated_session: s.isolated_session.unwrap_or(false),
        busy_window_seconds: s.busy_window_seconds.unwrap_or(0),
        busy_defer_max_seconds: s.busy_defer_max_seconds.unwrap_or(0),
        webhook_secret: s.webhook_secret.clone().map(|w| w.0).unwrap_or_default(),
        webhook_secret_ref: s.webhook_secret.map(|w| w.1).unwrap_or_default(),
        target: s.target,
        wake_url: s.wake_url.unwrap_or_default(),
        fallback_model: s.fallback_model.unwrap_or_default(),
        ..Default::default()
    })
}

fn update_request(args: AgentUpdateArgs) -> anyhow::Result<UpdateAgentRequest> {
    let s = settings(args.settings)?;
    Ok(UpdateAgentRequest {
        agent: args.id,
        name: args.name,
        model: args.model,
        interval_seconds: s.interval_seconds,
        active_hours: s.active_hours,
        timezone: s.timezone,
        checklist: s.checklist,
        webhook_url: s.webhook_url,
        enabled: args.enabled,
        pause_note: args.note,
        prompt: s.prompt,
        run_timeout_seconds: s.run_timeout_seconds,
        catch_up_seconds: s.catch_up_seconds,
        stagger: s.stagger,
        isolated_session: s.isolated_session,
        busy_window_seconds: s.busy_window_seconds,
        busy_defer_max_seconds: s.busy_defer_max_seconds,
        webhook_secret: s.webhook_secret.clone().map(|w| w.0),
        webhook_secret_ref: s.webhook_secret.map(|w| w.1),
        target: s.target,
        wake_url: s.wake_url,
        fallback_model: s.fallback_model,
    })
}

fn status(a: &Agent) -> &'static str {
    if a.enabled { "enabled" } else { "paused" }
}

/// The control plane's heartbeat status (`ok`, `failing`, `stale`,
/// `paused`, `outside_active_hours`, `never`); `-` from an older one.
fn heartbeat_status(a: &Agent) -> &str {
    if a.heartbeat_status.is_empty() {
        "-"
    } else {
        &a.heartbeat_status
    }
}

/// One row per agent.
pub(crate) fn table(agents: &[Agent]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "MODEL",
        "STATUS",
        "HEARTBEAT",
        "INTERVAL",
        "ACTIVE HOURS",
        "TIMEZONE",
        "WEBHOOK",
    ]);
    for a in agents {
        t.row(vec![
            a.id.clone(),
            a.name.clone(),
            a.model.clone(),
            status(a).to_string(),
            heartbeat_status(a).to_string(),
            duration::format_secs(a.interval_seconds),
            if a.active_hours.is_empty() {
                "always".to_string()
            } else {
                a.active_hours.clone()
            },
            a.timezone.clone(),
            a.webhook_url.clone(),
        ]);
    }
    t
}

fn details(a: &Agent) -> Details {
    let or_default = |secs: u64, default: &str| {
        if secs == 0 {
            default.to_string()
        } else {
            duration::format_secs(secs)
        }
    };
    Details::new()
        .field("ID", &a.id)
        .field("Name", &a.name)
        .field("Model", &a.model)
        .field("Status", status(a))
        .field("Pause note", &a.pause_note)
        .field("Heartbeat", heartbeat_status(a))
        .field("Last terminal run", output::timestamp(&a.last_terminal_run))
        .field("Interval", duration::format_secs(a.interval_seconds))
        .field(
            "Active hours",
            if a.active_hours.is_empty() {
                "always"
            } else {
                &a.active_hours
            },
        )
        .field("Timezone", &a.timezone)
        .field("Webhook", &a.webhook_url)
        .field("Run timeout", or_default(a.run_timeout_seconds, "default"))
        .field("Catch up", or_default(a.catch_up_seconds, "one interval"))
        .field("Stagger", output::yes_no(a.stagger.unwrap_or(true)))
        .field("Isolated session", output::yes_no(a.isolated_session))
        .field("Busy window", or_default(a.busy_window_seconds, "2m"))
        .field(
            "Busy defer max",
            or_default(a.busy_defer_max_seconds, "10m"),
        )
        .field(
            "Webhook secret",
            if a.webhook_secret.is_empty() {
                "global (CLAW_WEBHOOK_SECRET) if set".to_string()
            } else if a.webhook_secret_ref.is_empty() {
                "set".to_string()
            } else {
                format!("set ({})", a.webhook_secret_ref)
            },
        )
        .field("Created", output::timestamp(&a.created_at))
        .field("Updated", output::timestamp(&a.updated_at))
        .field(
            "Prompt",
            if a.prompt.is_empty() {
                "built-in".to_string()
            } else {
                multiline(&a.prompt)
            },
        )
        .field("Checklist", multiline(&a.checklist))
}

/// Forces the multi-line layout of [`Details`] for free text.
fn multiline(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() || text.contains('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}
