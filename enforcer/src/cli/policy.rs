//! `enforcer policy check|apply|show|diff|presets`.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Cli, PolicyCommand, bad_compile, bad_policy, is_not_running, load_config, print_json};
use crate::{
    dataplane::{
        Dataplane,
        compile::{Compiled, Limits, compile},
    },
    node::{
        api::Request,
        daemon::{self, Status},
        instances::Instances,
        netlink::if_index,
    },
    out, outln, policy,
};

/// A policy file read, validated and compiled against this host's interfaces, every
/// failure reported as bad input that names the file, and for a policy that does not fit,
/// the line, column and field.
fn compile_file(file: &Path, limits: &Limits) -> anyhow::Result<(policy::Policy, Compiled)> {
    let origin = file.display().to_string();
    let text = policy::read(file).map_err(|e| bad_policy(&e))?;
    let policy = policy::parse(&origin, &text).map_err(|e| bad_policy(&e))?;
    // Names that do not resolve here are pending, not errors: the sandbox may come later,
    // or live in another network namespace than this command's.
    let compiled = compile(&policy, limits, &if_index)
        .map_err(|e| bad_compile(&origin, &text, &policy, &e))?;
    Ok((policy, compiled))
}

/// `policy` with the agent instances the daemon keeps in `state_dir/instances.json`, as
/// the daemon would compile it; refused when a static agent would take what an instance
/// holds, as the daemon refuses it.
fn with_instances(
    mut policy: policy::Policy,
    compiled: Compiled,
    config: &crate::node::config::Config,
) -> anyhow::Result<(policy::Policy, Compiled)> {
    let path = config.state_dir.join("instances.json");
    let instances = Instances::load(&path, config.limits.max_agents)?;
    if instances.is_empty() {
        return Ok((policy, compiled));
    }
    let clashes: Vec<String> = instances
        .clashes(&policy)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !clashes.is_empty() {
        anyhow::bail!(
            "not applied: {}; remove the instance first (enforcer agent remove NAME)",
            clashes.join("; ")
        );
    }
    let agents = instances.agents(&policy);
    policy.set_instances(agents);
    let compiled = compile(&policy, &config.limits, &if_index).with_context(|| {
        format!(
            "compiling the policy with the instances of {}",
            path.display()
        )
    })?;
    Ok((policy, compiled))
}

pub(super) fn command(cli: &Cli, command: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => {
            let limits = if cli.config.exists() {
                load_config(&cli.config)?.limits
            } else {
                Default::default()
            };
            let (_, compiled) = compile_file(file, &limits)?;
            let sources = compiled.source_hosts_v4.len()
                + compiled.source_hosts_v6.len()
                + compiled.source_prefixes_v4.len()
                + compiled.source_prefixes_v6.len();
            let destinations = compiled.destinations_v4.len() + compiled.destinations_v6.len();
            if cli.json {
                print_json(&json!({
                    "ok": true,
                    "file": file.display().to_string(),
                    "agents": compiled.agents.len(),
                    "interface_entries": compiled.interfaces.len(),
                    "source_entries": sources,
                    "destination_entries": destinations,
                    "server_name_entries": compiled.server_names.len(),
                    "unchecked_interfaces": compiled.pending,
                }));
                return Ok(ExitCode::SUCCESS);
            }
            outln!(
                "{}: ok: {} agents, {sources} source entries, {destinations} destination entries",
                file.display(),
                compiled.agents.len(),
            );
            if !compiled.pending.is_empty() {
                outln!(
                    "{}: not on this host: {}; checked when the daemon applies it",
                    file.display(),
                    compiled.pending.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Apply { file } => {
            let config = load_config(&cli.config)?;
            let text = policy::read(file).map_err(|e| bad_policy(&e))?;
            // The daemon parses and compiles the policy itself: a valid policy is not
            // compiled twice (at 100,000 agents that doubled the time to enforce).
            let refused = match cli.call(Request::PolicyApply {
                text,
                origin: file.display().to_string(),
            }) {
                Ok(v) => {
                    if cli.json {
                        print_json(&json!({
                            "generation": v["generation"],
                            "to": "daemon",
                            "pending_interfaces": v["pending_interfaces"],
                        }));
                    } else {
                        outln!("applied: generation {}", v["generation"]);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => e,
            };
            // Refused, or no daemon: a policy that is bad input is reported as `policy
            // check` does, with the file, line, column and field as the operator wrote them.
            let (policy, compiled) = compile_file(file, &config.limits)?;
            if !is_not_running(&refused) {
                return Err(refused);
            }
            // No daemon: the pinned program still enforces; update its maps directly
            // and install the file for the next daemon start. The daemon's agent
            // instances stay enforced (its next start follows the interfaces there are).
            let (policy, compiled) = with_instances(policy, compiled, &config)?;
            let mut dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
            let generation = dataplane.apply(&compiled)?;
            std::fs::copy(file, &config.policy)
                .with_context(|| format!("installing {}", config.policy.display()))?;
            let mut status = Status::read(&config.runtime_dir).unwrap_or_default();
            status.generation = generation;
            status.agents = daemon::agent_names(&policy);
            std::fs::create_dir_all(&config.runtime_dir)?;
            std::fs::write(
                config.runtime_dir.join("status.json"),
                serde_json::to_string_pretty(&status)?,
            )?;
            if cli.json {
                print_json(&json!({
                    "generation": generation,
                    "to": "pinned maps",
                    "installed": config.policy.display().to_string(),
                    "pending_interfaces": compiled.pending,
                }));
            } else {
                outln!(
                    "applied to the pinned maps (no daemon running): generation \
                     {generation}"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show => {
            let v = cli.call(Request::PolicyShow)?;
            if cli.json {
                print_json(&v);
            } else {
                outln!(
                    "# {} (generation {}, sha256 {})",
                    v["origin"].as_str().unwrap_or(""),
                    v["generation"],
                    v["digest"].as_str().unwrap_or("")
                );
                if let Some(o) = v["overrides"].as_object().filter(|o| !o.is_empty()) {
                    outln!("# runtime mode overrides: {}", Value::Object(o.clone()));
                }
                out!("{}", v["text"].as_str().unwrap_or(""));
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { file } => {
            let text = policy::read(file).map_err(|e| bad_policy(&e))?;
            policy::parse(&file.display().to_string(), &text).map_err(|e| bad_policy(&e))?;
            let v = cli.call(Request::PolicyDiff {
                text,
                origin: file.display().to_string(),
            })?;
            if cli.json {
                print_json(&v);
            } else {
                for (key, label) in [
                    ("agents_added", "added"),
                    ("agents_removed", "removed"),
                    ("agents_changed", "changed"),
                ] {
                    for a in v[key].as_array().into_iter().flatten() {
                        outln!("{label:<8} agent {} {}", a["id"], a["name"]);
                    }
                }
                out!("{}", v["diff"].as_str().unwrap_or(""));
                // Runtime state, not the file's: `mode AGENT --clear` drops one.
                let overrides: Vec<String> = v["overrides"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| {
                        let who = o["name"]
                            .as_str()
                            .map_or_else(|| o["id"].to_string(), str::to_string);
                        format!("agent {who}: {}", o["mode"].as_str().unwrap_or("?"))
                    })
                    .collect();
                if !overrides.is_empty() {
                    outln!(
                        "runtime overrides (not in the file): {}",
                        overrides.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Presets => {
            if cli.json {
                let presets: serde_json::Map<String, Value> = policy::PRESETS
                    .iter()
                    .map(|p| {
                        let preset = json!({
                            "prefixes": p.prefixes,
                            "description": p.description,
                        });
                        (p.name.to_owned(), preset)
                    })
                    .collect();
                print_json(&Value::Object(presets));
                return Ok(ExitCode::SUCCESS);
            }
            for p in policy::PRESETS {
                outln!("{:<13} {}", p.name, p.prefixes.join(", "));
                outln!("{:<13} {}", "", p.description);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
