//! The command line: its definition ([`args`]), one module per group of commands, and
//! the tables they print ([`table`]). Commands are clients of the daemon's API
//! ([`crate::node::api`]) or, with no daemon, readers of the pinned maps
//! ([`crate::dataplane`]). `main.rs` only sets up logging and calls [`main`].

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::bail;
use serde_json::Value;

pub use self::args::{
    AgentCommand, AuditCommand, BreakerCommand, Cli, Command, ControlPlaneCommand, InspectCommand,
    ModeArg, PolicyCommand,
};
use self::output::print_json;
use crate::{
    error::error_chain,
    node::{
        api::{ApiError, Client, Request, Response},
        config::Config,
        daemon,
    },
};

pub mod args;
mod audit;
pub mod demo;
mod fleet;
pub mod output;
mod policy;
mod show;
mod stop;
pub mod table;
mod top;

/// Exit code for a bad configuration or policy (distinct from runtime failures).
pub const EXIT_BAD_INPUT: u8 = 2;

/// Runs the command line: parses the arguments, runs the command, reports its error.
pub fn main() -> ExitCode {
    use clap::Parser as _;
    let cli = Cli::parse();
    let e = match dispatch(&cli) {
        Ok(code) => return code,
        Err(e) => e,
    };
    let (message, code, issues) = match e.downcast_ref::<BadInputError>() {
        Some(bad) => (bad.message.clone(), EXIT_BAD_INPUT, bad.issues.as_slice()),
        None => (format!("error: {}", error_chain(e.as_ref())), 1, &[][..]),
    };
    if cli.json {
        // One JSON document on stdout, failure included: a script reads one place.
        print_json(&output::error_json(&message, code, issues));
    } else {
        eprintln!("{message}");
    }
    ExitCode::from(code)
}

/// Bad input: a message naming the place, reported with the distinct exit code.
fn bad(message: String) -> anyhow::Error {
    BadInputError {
        message,
        issues: Vec::new(),
    }
    .into()
}

/// A policy that cannot be used: its message, and its issues by place for `--json`.
pub(super) fn bad_policy(e: &crate::policy::PolicyError) -> anyhow::Error {
    BadInputError {
        message: error_chain(e),
        issues: e.issues(),
    }
    .into()
}

/// A valid policy that does not fit the maps or the host, reported like a policy issue:
/// `file:line:column: field: message`, the field found in `text` (the policy's document).
fn bad_compile(
    origin: &str,
    text: &str,
    policy: &crate::policy::Policy,
    e: &crate::dataplane::compile::CompileError,
) -> anyhow::Error {
    let Some(field) = e.field(policy) else {
        return bad(format!("{origin}: {e}"));
    };
    let issue = crate::policy::issue_at(origin, text, field, e.to_string());
    BadInputError {
        message: issue.to_string(),
        issues: vec![issue],
    }
    .into()
}

/// Marks an error as bad input (exit code 2), with the policy issues behind it if any.
#[derive(Debug)]
struct BadInputError {
    message: String,
    issues: Vec<crate::policy::Issue>,
}

impl std::fmt::Display for BadInputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BadInputError {}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| bad(format!("error: {}", error_chain(&e))))
}

impl Cli {
    fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            Config::load(&self.config)
                .map(|c| c.socket)
                .unwrap_or_else(|_| PathBuf::from("/run/enforcer/enforcer.sock"))
        })
    }

    /// The read-only socket: the configuration's, or `enforcer-ro.sock` beside the socket.
    fn read_socket(&self) -> PathBuf {
        match (&self.socket, Config::load(&self.config)) {
            (None, Ok(c)) => c.read_socket,
            _ => self.socket().with_file_name("enforcer-ro.sock"),
        }
    }

    /// Sends one request to the daemon; an error answer becomes an error. A request that
    /// only reads goes to the read-only socket when the admin socket refuses this user.
    fn call(&self, request: Request) -> anyhow::Result<Value> {
        let mut client = match Client::connect(&self.socket()) {
            Err(ApiError::PermissionDenied { .. }) if request.read_only() => {
                Client::connect(&self.read_socket())?
            }
            connected => connected?,
        };
        match client.call(&request)? {
            Response::Ok(value) => Ok(value),
            Response::Error(message) => bail!("{message}"),
        }
    }
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn is_not_running(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ApiError>(),
        Some(ApiError::NotRunning { .. })
    )
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run => {
            let config = load_config(&cli.config)?;
            match daemon::run(config) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                // A policy that does not fit: located in its file, as `policy check` does.
                Err(daemon::DaemonError::Policy(daemon::LoadError::Compile { origin, source })) => {
                    let parsed = std::fs::read_to_string(&origin).ok().and_then(|text| {
                        crate::policy::parse(&origin, &text)
                            .ok()
                            .map(|policy| (text, policy))
                    });
                    Err(match parsed {
                        Some((text, policy)) => bad_compile(&origin, &text, &policy, &source),
                        None => bad(format!("error: {origin}: {}", error_chain(&*source))),
                    })
                }
                Err(daemon::DaemonError::Policy(e)) => {
                    Err(bad(format!("error: {}", error_chain(&e))))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Status => show::status(cli),
        Command::Agents => show::agents(cli),
        Command::Agent {
            command: Some(command),
            ..
        } => show::agent_command(cli, command),
        Command::Agent { agent, .. } => show::agent(cli, agent.as_deref().unwrap_or_default()),
        Command::Doctor => show::doctor(cli),
        Command::Stats => show::stats(cli),
        Command::Top {
            interval,
            count,
            sort,
        } => top::top(
            cli,
            Duration::from_secs_f64(interval.max(0.1)),
            *count,
            *sort,
        ),
        Command::Policy { command } => policy::command(cli, command),
        Command::Mode { agent, mode, .. } => show::mode(cli, agent, *mode),
        Command::Breaker {
            command: BreakerCommand::Reset { agent },
        } => show::breaker_reset(cli, agent),
        Command::Audit {
            command:
                AuditCommand::Tail {
                    lines,
                    follow,
                    agent,
                    reason,
                    verdict,
                },
        } => audit::tail(cli, *lines, *follow, agent, reason, verdict),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    continued,
                    head,
                    no_head,
                },
        } => audit::verify(cli, files, *continued, head.as_deref(), *no_head),
        Command::Stop { detach } => stop::stop(cli, *detach),
        Command::Inspect {
            command: InspectCommand::Ca,
        } => fleet::inspect_ca(cli),
        Command::Generate { dir } => {
            fleet::generate(dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { dir } => fleet::keygen(cli, dir),
        Command::Certs {
            dir,
            server_names,
            clients,
        } => fleet::certs(cli, dir, server_names, clients),
        Command::ControlPlane {
            command: ControlPlaneCommand::Serve { file },
        } => fleet::serve(file),
        Command::ControlPlane {
            command: ControlPlaneCommand::Nodes,
        } => fleet::nodes(cli),
        Command::ControlPlane {
            command:
                ControlPlaneCommand::Publish {
                    file,
                    signing_key,
                    etcd,
                    etcd_prefix,
                    etcd_ca,
                    etcd_cert,
                    etcd_key,
                    node,
                    selector,
                },
        } => fleet::publish(
            cli,
            fleet::Publish {
                file,
                signing_key,
                etcd: crate::controlplane::etcd::EtcdConfig {
                    endpoints: etcd.clone(),
                    prefix: etcd_prefix.clone(),
                    ca: etcd_ca.clone(),
                    cert: etcd_cert.clone(),
                    key: etcd_key.clone(),
                },
                node: node.as_deref(),
                selector: selector.as_deref(),
            },
        ),
        Command::Demo { seconds } => {
            demo::run(Duration::from_secs(*seconds))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
