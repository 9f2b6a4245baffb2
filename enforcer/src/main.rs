//! `enforcer`: the daemon (`run`) and the local CLI.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use enforcer::{
    config::Config,
    daemon::{self, Status, error_chain},
    dataplane::{self, Dataplane, KernelMaps},
    policy, stats,
};

/// Exit code for a bad configuration or policy (distinct from runtime failures).
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "XDP rate limiting and egress allow-listing for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load, pin and attach the XDP program and enforce the policy.
    Run {
        /// Daemon configuration file.
        #[arg(long, default_value = "/etc/enforcer/enforcer.toml")]
        config: PathBuf,
    },
    /// Check, apply or inspect policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print per-agent counters from the pinned maps.
    Stats {
        /// Daemon configuration file (for the pin directory and state directory).
        #[arg(long, default_value = "/etc/enforcer/enforcer.toml")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon; with --detach also remove the pinned program and maps.
    Stop {
        /// Daemon configuration file.
        #[arg(long, default_value = "/etc/enforcer/enforcer.toml")]
        config: PathBuf,
        /// Detach from every interface and remove all pins: nothing enforces afterwards.
        #[arg(long)]
        detach: bool,
    },
    /// Run a demo: agents in network namespaces behind the enforcer, with live counters.
    Demo {
        /// How long to run traffic, in seconds.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file and report every error with file, line and field.
    Check {
        /// The policy file.
        file: PathBuf,
        /// Configuration whose limits the policy must fit (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Install a policy: validate it, make it the daemon's policy file and reload the
    /// daemon (or, with no daemon running, write it into the pinned maps directly).
    Apply {
        /// The policy file.
        file: PathBuf,
        /// Daemon configuration file.
        #[arg(long, default_value = "/etc/enforcer/enforcer.toml")]
        config: PathBuf,
    },
    /// List the destination presets a policy can name with `@`.
    Presets,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {}", error_chain(&e));
        ExitCode::from(EXIT_BAD_INPUT)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            match daemon::run(config) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(daemon::DaemonError::Policy(e)) => {
                    eprintln!("error: {}", error_chain(&e));
                    Ok(ExitCode::from(EXIT_BAD_INPUT))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Policy { command } => policy_command(command),
        Command::Stats { config, json } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let maps = KernelMaps::from_pins(&config.bpffs).with_context(|| {
                format!(
                    "opening the pinned maps under {} (is the enforcer running?)",
                    config.bpffs.display()
                )
            })?;
            let names = Status::read(&config.state_dir)
                .map(|s| s.agents)
                .unwrap_or_default();
            let agents = stats::collect(&maps, &names).context("reading counters")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else {
                let state = maps.current_state()?;
                println!(
                    "policy generation {} (slot {})",
                    state.generation, state.active_slot
                );
                print!("{}", stats::table(&agents));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop { config, detach } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if let Some(status) = Status::read(&config.state_dir).filter(Status::daemon_alive) {
                // SAFETY: plain kill(2) on a pid we read from our own status file.
                unsafe { libc::kill(status.pid as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while status.daemon_alive() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                if status.daemon_alive() {
                    bail!("daemon {} did not exit within 10 s of SIGTERM", status.pid);
                }
                println!(
                    "daemon {} stopped; the pinned program keeps enforcing",
                    status.pid
                );
            }
            if detach {
                dataplane::remove_pins(&config.bpffs)
                    .with_context(|| format!("removing pins under {}", config.bpffs.display()))?;
                println!(
                    "detached: removed every pin under {}",
                    config.bpffs.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { seconds } => {
            enforcer::demo::run(Duration::from_secs(seconds))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file, config } => {
            let limits = match config.map(|c| load_config(&c)) {
                Some(Ok(c)) => c.limits,
                Some(Err(code)) => return Ok(code),
                None => Default::default(),
            };
            let policy = match policy::load(&file) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{}", error_chain(&e));
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                }
            };
            // Interfaces may live in another network namespace than the checker's; their
            // existence is checked when the daemon applies the policy.
            let compiled = match enforcer::compile::compile(&policy, &limits, &|_| Some(1)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {}", file.display(), error_chain(&e));
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                }
            };
            println!(
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
        PolicyCommand::Apply { file, config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (policy, compiled) = match daemon::load_policy(&file, &config.limits) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("{}", error_chain(&e));
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                }
            };
            install(&file, &config.policy)?;
            match Status::read(&config.state_dir).filter(Status::daemon_alive) {
                Some(status) => {
                    // SAFETY: plain kill(2) on the pid from our own status file.
                    unsafe { libc::kill(status.pid as i32, libc::SIGHUP) };
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let now = Status::read(&config.state_dir).unwrap_or_default();
                        if now.attempts > status.attempts {
                            if let Some(error) = now.last_error {
                                eprintln!("daemon rejected the policy: {error}");
                                return Ok(ExitCode::FAILURE);
                            }
                            println!("applied: generation {}", now.generation);
                            return Ok(ExitCode::SUCCESS);
                        }
                        if Instant::now() > deadline {
                            bail!(
                                "daemon {} did not report the reload within 30 s",
                                status.pid
                            );
                        }
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                None => {
                    // No daemon: the pinned program still enforces; update its maps directly.
                    let mut dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
                    let generation = dataplane.apply(&compiled)?;
                    let mut status = Status::read(&config.state_dir).unwrap_or_default();
                    status.generation = generation;
                    status.agents = daemon::agent_names(&policy);
                    std::fs::create_dir_all(&config.state_dir)?;
                    std::fs::write(
                        config.state_dir.join("status.json"),
                        serde_json::to_string_pretty(&status)?,
                    )?;
                    println!(
                        "applied to the pinned maps (no daemon running): generation {generation}"
                    );
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        PolicyCommand::Presets => {
            for (name, prefixes) in policy::PRESETS {
                println!("{name:<13} {}", prefixes.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Makes `file` the daemon's policy file, atomically (write beside it, then rename).
fn install(file: &Path, target: &Path) -> anyhow::Result<()> {
    if file.canonicalize().ok() == target.canonicalize().ok() {
        return Ok(());
    }
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let tmp = target.with_extension("toml.new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, target).with_context(|| format!("installing {}", target.display()))?;
    Ok(())
}
