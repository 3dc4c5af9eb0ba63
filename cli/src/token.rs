//! `clawctl token add|list|rm` and `clawctl whoami`: the named admin tokens
//! operators and the dashboard use. A token's secret exists only in the
//! answer to `add` and is printed that once.

use clap::{Args, Subcommand, ValueEnum};
use claw_proto::v1::{
    AdminToken, CreateTokenRequest, DeleteTokenRequest, ListTokensRequest, Role, WhoAmIRequest,
};
use serde::Serialize;

use crate::output::{self, Table};
use crate::session::Session;

/// `clawctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a named admin token and print its secret (shown only once).
    #[command(after_help = "\
Examples:
  clawctl token add alice --role admin
  clawctl token add dashboard --role viewer
  SECRET=$(clawctl token add ci --role viewer -o json | jq -r .secret)")]
    Add(TokenAddArgs),
    /// List named admin tokens (CLAW_ADMIN_TOKEN, \"bootstrap\", is not listed).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a token; it stops working at once.
    #[command(visible_alias = "delete")]
    Rm(TokenTarget),
}

/// Flags of `token add`.
#[derive(Debug, Args)]
pub struct TokenAddArgs {
    /// Unique name of the token (what the audit log records).
    pub name: String,
    /// What the token may do: admin (everything) or viewer (reads only).
    #[arg(long, value_enum)]
    pub role: RoleArg,
}

/// A token named by its name or id.
#[derive(Debug, Args)]
pub struct TokenTarget {
    /// Name or id.
    #[arg(value_name = "NAME|ID")]
    pub name: String,
}

/// `--role`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// Every RPC and the dashboard's actions.
    Admin,
    /// Every read RPC and the dashboard; no writes.
    Viewer,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Viewer => Role::Viewer,
        }
    }
}

/// `admin`, `viewer` or `-`.
fn role_name(raw: i32) -> &'static str {
    match Role::try_from(raw) {
        Ok(Role::Admin) => "admin",
        Ok(Role::Viewer) => "viewer",
        _ => "-",
    }
}

/// Runs a `token` verb.
pub(crate) async fn run(session: &Session, cmd: TokenCmd) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    match cmd {
        TokenCmd::Add(args) => {
            let resp = conn
                .call(conn.tokens().create_token(CreateTokenRequest {
                    name: args.name,
                    role: Role::from(args.role) as i32,
                }))
                .await?;
            let token = resp.token.clone().unwrap_or_default();
            let value = TokenWithSecret {
                token: &token,
                secret: &resp.secret,
            };
            session.emit(&value, |out| {
                table(std::slice::from_ref(&token)).write(out)?;
                writeln!(out)?;
                writeln!(out, "secret: {}", resp.secret)?;
                writeln!(
                    out,
                    "This secret is shown only once and cannot be retrieved again: store it now."
                )
            })
        }
        TokenCmd::List => {
            let resp = conn
                .call(conn.tokens().list_tokens(ListTokensRequest {}))
                .await?;
            session.emit(&resp.tokens, |out| table(&resp.tokens).write(out))
        }
        TokenCmd::Rm(t) => {
            let resp = conn
                .call(conn.tokens().delete_token(DeleteTokenRequest {
                    token: t.name.clone(),
                }))
                .await?;
            session.emit(&resp, |out| writeln!(out, "token/{} deleted", t.name))
        }
    }
}

/// `clawctl whoami`: the caller's token name and role.
pub(crate) async fn whoami(session: &Session) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn.call(conn.tokens().who_am_i(WhoAmIRequest {})).await?;
    session.emit(&resp, |out| {
        writeln!(out, "name: {}", resp.name)?;
        writeln!(out, "role: {}", role_name(resp.role))
    })
}

/// A created token as printed by `-o json|yaml`: its fields, then its secret.
#[derive(Serialize)]
struct TokenWithSecret<'a> {
    #[serde(flatten)]
    token: &'a AdminToken,
    secret: &'a str,
}

/// One row per token.
fn table(tokens: &[AdminToken]) -> Table {
    let mut t = Table::new(&["NAME", "ROLE", "PREFIX", "CREATED", "CREATED BY"]);
    for k in tokens {
        t.row(vec![
            k.name.clone(),
            role_name(k.role).to_string(),
            k.prefix.clone(),
            output::timestamp(&k.created_at),
            k.created_by.clone(),
        ]);
    }
    t
}
