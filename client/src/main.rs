//! `kakuremichi`: kakuremichi's command line.
//!
//! `kakuremichi login`, then `kakuremichi sites|gateways|resources|policies|users|keys|roles
//! list|get|create|update|rm|token` against control's `/api/v1` (tables, or `--json`); and
//! `kakuremichi sessions start|search|rm|open|tail|send|mcp` against the gateways' sessions
//! hostname or control's `/api/v1/sessions`, with a personal API key.

#![allow(clippy::print_stdout)] // A CLI: its output is stdout.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::StreamExt as _;
use kakuremichi_client::{Client, StartRequest};

mod cli_admin;
use cli_admin as admin;

#[derive(Debug, Parser)]
#[command(name = "kakuremichi", version, about = "kakuremichi's command line")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Check an API key against control and keep it (with control's URL, in a 0600 file) for
    /// the next commands.
    Login {
        /// Control's URL (https://control.example.com).
        #[arg(long, env = "KAKUREMICHI_CONTROL")]
        control: String,
        /// The API key (an admin key, or a personal or scoped one).
        #[arg(long, env = "KAKUREMICHI_API_KEY", hide_env_values = true)]
        api_key: String,
    },
    /// Forget the saved login.
    Logout,
    /// Make control match a declarative file (YAML): prints the plan, then carries it out.
    Apply {
        /// The file (kakuremichi.yaml; - for stdin).
        #[arg(long, short)]
        file: String,
        /// Also delete what the file no longer names (in each kind the file lists).
        #[arg(long)]
        prune: bool,
        /// Control's URL [default: the saved login's].
        #[arg(long, env = "KAKUREMICHI_CONTROL")]
        control: Option<String>,
        /// The API key [default: the saved login's].
        #[arg(long, env = "KAKUREMICHI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print the plan `apply` would carry out, changing nothing.
    Diff {
        /// The file (kakuremichi.yaml; - for stdin).
        #[arg(long, short)]
        file: String,
        /// Plan the deletes of --prune too.
        #[arg(long)]
        prune: bool,
        /// Control's URL [default: the saved login's].
        #[arg(long, env = "KAKUREMICHI_CONTROL")]
        control: Option<String>,
        /// The API key [default: the saved login's].
        #[arg(long, env = "KAKUREMICHI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print the JSON Schema of the declarative file.
    Schema,
    /// Sites (agents): list, get, create NAME, update, rm, token (a new one-line install).
    Sites(ObjectArgs),
    /// Gateways: list, get, create NAME --set endpoint=HOST:PORT, update, rm, token.
    Gateways(ObjectArgs),
    /// Resources: list, get, create HOSTNAME --set site_id=SITE --set target=HOST:PORT, ...
    Resources(ObjectArgs),
    /// Access policies: create NAME --set 'access:={"roles":["member"]}', ...
    Policies(ObjectArgs),
    /// Users: create EMAIL --set password=... --set 'roles:=["member"]', ...
    Users(ObjectArgs),
    /// API keys: create NAME --set 'scopes:=["site:read"]' (the secret is shown once), rm.
    Keys(ObjectArgs),
    /// Roles and their permissions.
    Roles(ObjectArgs),
    /// Agent sessions.
    Sessions {
        /// The sessions endpoint: the gateways' sessions hostname (https://agents.example.com)
        /// or control's https://control.example.com/api/v1/sessions.
        #[arg(long, env = "KAKUREMICHI_ENDPOINT")]
        endpoint: String,
        /// A personal API key (kmk_...).
        #[arg(long, env = "KAKUREMICHI_API_KEY", hide_env_values = true)]
        api_key: String,
        /// Reach the endpoint's host at this address instead of resolving it (split DNS, tests).
        #[arg(long, env = "KAKUREMICHI_CONNECT_TO")]
        connect_to: Option<SocketAddr>,
        #[command(subcommand)]
        command: Sessions,
    },
}

/// What every object command takes.
#[derive(Debug, clap::Args)]
struct ObjectArgs {
    /// Control's URL [default: the saved login's].
    #[arg(long, env = "KAKUREMICHI_CONTROL")]
    control: Option<String>,
    /// The API key [default: the saved login's].
    #[arg(long, env = "KAKUREMICHI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print control's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// List them.
    List,
    /// One, by id or name.
    Get {
        /// Its id or name.
        id: String,
    },
    /// Create one.
    Create {
        /// Its name (a resource's hostname, a user's email).
        name: Option<String>,
        /// KEY=VALUE (a string) or KEY:=JSON (repeatable); site_id takes a site's name too.
        #[arg(long = "set", short)]
        set: Vec<String>,
        /// The whole JSON body (the --set pairs go over it).
        #[arg(long)]
        data: Option<String>,
    },
    /// Change one (PATCH).
    Update {
        /// Its id or name.
        id: String,
        /// KEY=VALUE or KEY:=JSON (repeatable).
        #[arg(long = "set", short)]
        set: Vec<String>,
        /// The whole JSON body.
        #[arg(long)]
        data: Option<String>,
    },
    /// Delete (revoke, for a key) one.
    Rm {
        /// Its id or name.
        id: String,
    },
    /// A new enrollment token for a site or gateway (its old credential is revoked): prints the
    /// token and, for a site, the one-line install.
    Token {
        /// Its id or name.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum Sessions {
    /// Start a session; prints its id.
    Start {
        /// A first message for the agent.
        #[arg(long, short)]
        message: Option<String>,
        /// KEY=VALUE for the agent's environment (repeatable).
        #[arg(long = "env", short)]
        env: Vec<String>,
        /// KEY=VALUE tag (repeatable).
        #[arg(long = "tag", short)]
        tags: Vec<String>,
        /// The site (agent) to run on.
        #[arg(long)]
        site: Option<String>,
        /// Start a team session for this team.
        #[arg(long)]
        team: Option<String>,
        /// End it after this long (48h, 30m).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List sessions, newest first.
    Search {
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only with this KEY=VALUE tag (repeatable).
        #[arg(long = "tag", short)]
        tags: Vec<String>,
        /// Team sessions (of this team, or of all yours with "all").
        #[arg(long)]
        team: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a session.
    Rm {
        /// Its id.
        id: String,
    },
    /// Print a read-only share link of a session (made when it has none).
    Open {
        /// Its id.
        id: String,
    },
    /// Follow a session's events.
    Tail {
        /// Its id.
        id: String,
    },
    /// Send a message to a session's agent.
    Send {
        /// Its id.
        id: String,
        /// The message.
        message: String,
        /// Wait for the agent's answer and print it.
        #[arg(long, short)]
        wait: bool,
    },
    /// Serve MCP on stdin/stdout (tools: list_sessions, create_session, send_message,
    /// get_messages, delete_session).
    Mcp,
}

fn pairs(list: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{what} {p:?} is not KEY=VALUE"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (endpoint, api_key, connect_to, command) = match Cli::parse().command {
        Top::Sessions {
            endpoint,
            api_key,
            connect_to,
            command,
        } => (endpoint, api_key, connect_to, command),
        Top::Login { control, api_key } => return admin::login(&control, &api_key).await,
        Top::Logout => {
            let had = kakuremichi_client::admin::Login::forget()?;
            println!("{}", if had { "logged out" } else { "no saved login" });
            return Ok(());
        }
        Top::Apply {
            file,
            prune,
            control,
            api_key,
        } => return admin::apply(&file, prune, control, api_key, true).await,
        Top::Diff {
            file,
            prune,
            control,
            api_key,
        } => return admin::apply(&file, prune, control, api_key, false).await,
        Top::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&kakuremichi_client::apply::schema())?
            );
            return Ok(());
        }
        Top::Sites(a) => return admin::run("sites", a).await,
        Top::Gateways(a) => return admin::run("gateways", a).await,
        Top::Resources(a) => return admin::run("resources", a).await,
        Top::Policies(a) => return admin::run("policies", a).await,
        Top::Users(a) => return admin::run("users", a).await,
        Top::Keys(a) => return admin::run("keys", a).await,
        Top::Roles(a) => return admin::run("roles", a).await,
    };
    let client = Client::new(&endpoint, &api_key, connect_to)?;
    match command {
        Sessions::Start {
            message,
            env,
            tags,
            site,
            team,
            ttl,
        } => {
            let mut req = StartRequest {
                environment: pairs(&env, "--env")?,
                tags: pairs(&tags, "--tag")?,
                site,
                ..Default::default()
            };
            if let Some(m) = message {
                req.params.insert("message".into(), m.into());
            }
            if let Some(t) = ttl {
                req.params.insert("session_ttl".into(), t.into());
            }
            if let Some(t) = team {
                req.scope = Some("team".into());
                req.team_id = Some(t);
            }
            println!("{}", client.start(&req).await?);
        }
        Sessions::Search {
            status,
            tags,
            team,
            json,
        } => {
            let mut q = Vec::new();
            if let Some(s) = status {
                q.push(("status".to_owned(), s));
            }
            match team.as_deref() {
                None => {}
                Some("all") => q.push(("scope".into(), "team".into())),
                Some(t) => q.push(("team_id".into(), t.into())),
            }
            for (k, v) in pairs(&tags, "--tag")? {
                q.push((format!("tag.{k}"), v));
            }
            let found = client.search(&q).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                println!("{:<36}  {:<9}  {:<20}  TAGS", "ID", "STATUS", "STARTED");
                for s in found {
                    let tags: Vec<String> =
                        s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "{:<36}  {:<9}  {:<20}  {}",
                        s.session_id,
                        s.status,
                        s.started_at,
                        tags.join(",")
                    );
                }
            }
        }
        Sessions::Rm { id } => {
            client.delete(&id).await?;
            println!("ended {id}");
        }
        Sessions::Open { id } => {
            let share = client.share(&id).await?;
            println!("{}", client.url(&share.share_url));
        }
        Sessions::Tail { id } => {
            let mut events = Box::pin(client.events(&id).await?);
            while let Some(e) = events.next().await {
                let e = e?;
                println!(
                    "{}: {}",
                    if e.event.is_empty() {
                        "message"
                    } else {
                        &e.event
                    },
                    e.data
                );
            }
        }
        Sessions::Send { id, message, wait } => {
            // agentapi takes a message only while its agent waits for one.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while client.status(&id).await? != "stable" {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the session's agent is still busy after 60 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let before = client.messages(&id).await?.len();
            client.send(&id, &message).await?;
            if wait {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let all = client.messages(&id).await?;
                    if let Some(m) = all.iter().skip(before).find(|m| m.role != "user") {
                        if client.status(&id).await? == "stable" {
                            println!("{}", m.content);
                            break;
                        }
                    }
                }
            }
        }
        Sessions::Mcp => kakuremichi_client::mcp::serve_stdio(client).await?,
    }
    Ok(())
}
