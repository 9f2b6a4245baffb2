//! `enforcer policy check|apply|show|diff|presets`.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Cli, PolicyCommand, bad, bad_policy, is_not_running, load_config, print_json};
use crate::{
    dataplane::Dataplane,
    error::error_chain,
    node::{
        api::Request,
        daemon::{self, Status},
    },
    out, outln, policy,
};

pub(super) fn command(cli: &Cli, command: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => {
            let limits = if cli.config.exists() {
                load_config(&cli.config)?.limits
            } else {
                Default::default()
            };
            let policy = policy::load(file).map_err(|e| bad_policy(&e))?;
            // Interfaces may live in another network namespace than the checker's; their
            // existence is checked when the daemon applies the policy.
            let compiled = crate::dataplane::compile::compile(&policy, &limits, &|_| Some(1))
                .map_err(|e| bad(format!("{}: {}", file.display(), error_chain(&e))))?;
            outln!(
                "{}: ok: {} agents, {} source entries, {} destination entries",
                file.display(),
                compiled.agents.len(),
                compiled.source_hosts_v4.len()
                    + compiled.source_hosts_v6.len()
                    + compiled.source_prefixes_v4.len()
                    + compiled.source_prefixes_v6.len(),
                compiled.destinations_v4.len() + compiled.destinations_v6.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Apply { file } => {
            let config = load_config(&cli.config)?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Validate here first, so errors name the file as the operator wrote it.
            let (policy, compiled) =
                daemon::load_policy(file, &config.limits).map_err(|e| match &e {
                    daemon::LoadError::Policy(p) => bad_policy(p),
                    daemon::LoadError::Compile { .. } => bad(error_chain(&e)),
                })?;
            let origin = file.display().to_string();
            match cli.call(Request::PolicyApply { text, origin }) {
                Ok(v) => {
                    if cli.json {
                        print_json(&v);
                    } else {
                        outln!("applied: generation {}", v["generation"]);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if is_not_running(&e) => {
                    // No daemon: the pinned program still enforces; update its maps directly
                    // and install the file for the next daemon start.
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
                    outln!(
                        "applied to the pinned maps (no daemon running): generation {generation}"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e),
            }
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
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
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
