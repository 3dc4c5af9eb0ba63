//! `clawctl key add|list|get|update|rm`: the keys clients use to call the proxies.
//! The secret exists only in the answer to `add` and is printed that once.

use claw_proto::v1::{
    ClientKey, CreateClientKeyRequest, DeleteClientKeyRequest, GetClientKeyRequest,
    UpdateClientKeyRequest,
};

use serde::Serialize;

use crate::cli::{KeyAddArgs, KeyCmd, KeyUpdateArgs};
use crate::output::{self, Table};
use crate::session::Session;

/// Runs a `key` verb.
pub(crate) async fn run(session: &Session, cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::Add(args) => add(session, args).await,
        KeyCmd::List => {
            let conn = session.connect().await?;
            let resp = conn.list_client_keys_all().await?;
            session.emit(&resp.keys, |out| table(&resp.keys).write(out))
        }
        KeyCmd::Get(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(
                    conn.keys()
                        .get_client_key(GetClientKeyRequest { key: t.name }),
                )
                .await?;
            let key = resp.key.unwrap_or_default();
            session.emit(&key, |out| table(std::slice::from_ref(&key)).write(out))
        }
        KeyCmd::Update(args) => update(session, args).await,
        KeyCmd::Rm(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.keys().delete_client_key(DeleteClientKeyRequest {
                    key: t.name.clone(),
                }))
                .await?;
            session.emit(&resp, |out| writeln!(out, "key/{} deleted", t.name))
        }
    }
}

/// `--models a,b` as a list; blanks dropped, so `--models ''` is "all".
fn model_list(models: Vec<String>) -> Vec<String> {
    models
        .into_iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// Prints `warning: WHAT names agent(s) … that do not exist` for the
/// agents no configured agent has. Best effort, like the unserved-model
/// warning: when agents cannot be listed, nothing is printed.
async fn warn_unknown_agents(conn: &crate::client::Connection, what: &str, agents: &[String]) {
    if agents.is_empty() {
        return;
    }
    let Ok(resp) = conn.list_agents_all().await else {
        return;
    };
    let known: std::collections::BTreeSet<&str> =
        resp.agents.iter().map(|a| a.id.as_str()).collect();
    let unknown: Vec<String> = agents
        .iter()
        .filter(|a| !known.contains(a.as_str()))
        .map(|a| format!("{a:?}"))
        .collect();
    if !unknown.is_empty() {
        let noun = if unknown.len() == 1 {
            "agent"
        } else {
            "agents"
        };
        eprintln!(
            "warning: {what} names {noun} {} that do not exist; its x-claw-agent-id is \
             honoured for them once they are added",
            unknown.join(", ")
        );
    }
}

async fn update(session: &Session, args: KeyUpdateArgs) -> anyhow::Result<()> {
    if args.models.is_none()
        && args.rpm.is_none()
        && args.max_parallel.is_none()
        && args.agents.is_none()
    {
        anyhow::bail!(
            "key update: nothing to change; give --models, --rpm, --max-parallel and/or --agents"
        );
    }
    let replace_models = args.models.is_some();
    let models = model_list(args.models.unwrap_or_default());
    let replace_agents = args.agents.is_some();
    let agents = model_list(args.agents.unwrap_or_default());
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.keys().update_client_key(UpdateClientKeyRequest {
            key: args.name,
            replace_models,
            models,
            rpm: args.rpm,
            max_parallel: args.max_parallel,
            replace_agents,
            agents,
        }))
        .await?;
    let key = resp.key.unwrap_or_default();
    let what = format!("key {:?}", key.name);
    if replace_models {
        crate::served::warn_unserved(&conn, &what, &key.models).await;
    }
    if replace_agents {
        warn_unknown_agents(&conn, &what, &key.agents).await;
    }
    session.emit(&key, |out| table(std::slice::from_ref(&key)).write(out))
}

async fn add(session: &Session, args: KeyAddArgs) -> anyhow::Result<()> {
    let models = model_list(args.models);
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.keys().create_client_key(CreateClientKeyRequest {
            key: Some(ClientKey {
                name: args.name,
                models,
                rpm: args.rpm,
                max_parallel: args.max_parallel,
                agents: model_list(args.agents),
                ..Default::default()
            }),
        }))
        .await?;
    let key = resp.key.clone().unwrap_or_default();
    let what = format!("key {:?}", key.name);
    crate::served::warn_unserved(&conn, &what, &key.models).await;
    warn_unknown_agents(&conn, &what, &key.agents).await;
    // -o json|yaml: the ClientKey fields plus "secret", as one object.
    let value = KeyWithSecret {
        key: &key,
        secret: &resp.secret,
    };
    session.emit(&value, |out| {
        table(std::slice::from_ref(&key)).write(out)?;
        writeln!(out)?;
        writeln!(out, "secret: {}", resp.secret)?;
        writeln!(
            out,
            "This secret is shown only once and cannot be retrieved again: store it now."
        )
    })
}

/// A created key as printed by `-o json|yaml`: the key's fields, then its
/// secret.
#[derive(Serialize)]
struct KeyWithSecret<'a> {
    #[serde(flatten)]
    key: &'a ClientKey,
    secret: &'a str,
}

/// One row per client key.
pub(crate) fn table(keys: &[ClientKey]) -> Table {
    let mut t = Table::new(&[
        "NAME", "ID", "PREFIX", "MODELS", "RPM", "PARALLEL", "AGENTS", "CREATED",
    ]);
    for k in keys {
        let models = if k.models.is_empty() {
            "*".to_string()
        } else {
            k.models.join(",")
        };
        let rpm = if k.rpm == 0 {
            "unlimited".to_string()
        } else {
            k.rpm.to_string()
        };
        let name = if k.internal {
            format!("{} (internal)", k.name)
        } else {
            k.name.clone()
        };
        let parallel = if k.max_parallel == 0 {
            "unlimited".to_string()
        } else {
            k.max_parallel.to_string()
        };
        let agents = if k.agents.is_empty() {
            "-".to_string()
        } else {
            k.agents.join(",")
        };
        t.row(vec![
            name,
            k.id.clone(),
            k.prefix.clone(),
            models,
            rpm,
            parallel,
            agents,
            output::timestamp(&k.created_at),
        ]);
    }
    t
}
