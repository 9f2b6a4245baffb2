//! Commands that show the daemon's state: `status`, `agents`, `agent`, `stats`, `doctor`,
//! and `mode`, which changes one agent's.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::Reason;
use serde_json::json;

use super::{
    AgentCommand, Cli, ModeArg, is_not_running, join, load_config, output, print_json, table,
};
use crate::{
    dataplane::{self, Dataplane, KernelMaps, stats},
    lab::BpffsMount,
    node::{api::Request, daemon::Status},
    out, outln,
    policy::Mode,
};

/// `enforcer status`.
pub(super) fn status(cli: &Cli) -> anyhow::Result<ExitCode> {
    let v = match cli.call(Request::Status) {
        Ok(v) => v,
        Err(e) if is_not_running(&e) => return pinned_status(cli, &e),
        Err(e) => return Err(e),
    };
    if cli.json {
        print_json(&v);
    } else {
        outln!(
            "daemon pid {}, policy generation {}",
            v["pid"],
            v["generation"]
        );
        outln!(
            "policy      {} (sha256 {})",
            v["policy_origin"].as_str().unwrap_or("-"),
            v["policy_digest"].as_str().unwrap_or("-")
        );
        outln!("agents      {}", v["agents"]);
        print_hooks(&v["hooks"]);
        if v["pending"].as_array().is_some_and(|p| !p.is_empty()) {
            outln!(
                "pending     {} (not present yet: attached when they appear)",
                join(&v["pending"])
            );
        }
        outln!(
            "last apply  {}",
            v["apply_micros"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |us| format!("{:.1} ms", us / 1000.0))
        );
        if let Some(e) = v["last_error"].as_str() {
            outln!("last error  {e} (the previous policy keeps enforcing)");
        }
        outln!(
            "metrics     {}",
            v["metrics_listen"]
                .as_str()
                .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"))
        );
        let audit = &v["audit"];
        outln!(
            "audit log   {} at seq {}, head {}",
            audit["file"]
                .as_str()
                .or(v["audit_log"].as_str())
                .unwrap_or("-"),
            audit["seq"],
            audit["head"].as_str().unwrap_or("-")
        );
        if let Some(e) = audit["last_error"].as_str() {
            outln!(
                "audit error {e} (failing since {}; {} events not written, retrying)",
                audit["failing_since"].as_str().unwrap_or("?"),
                audit["events_unwritten"]
            );
        }
        if let Some(e) = audit["head_error"].as_str() {
            outln!("audit error {e}");
        }
        for found in audit["recovered"].as_array().into_iter().flatten() {
            outln!("audit start {}", found.as_str().unwrap_or_default());
        }
        let inspect = &v["inspect"];
        if let Some(layer) = inspect["record_layer"].as_str() {
            let taken: Vec<String> = inspect["connections_by_layer"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} {} ({})",
                        c["connections"],
                        c["layer"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            outln!(
                "inspect     record layer {layer}: {}; connections: {}",
                inspect["record_layer_detail"].as_str().unwrap_or("-"),
                if taken.is_empty() {
                    "none yet".to_string()
                } else {
                    taken.join(", ")
                }
            );
        }
        if let Some(o) = v["overrides"].as_object().filter(|o| !o.is_empty()) {
            outln!(
                "overrides   {}",
                o.iter()
                    .map(|(k, m)| format!("agent {k}: {}", m.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `status` when no daemon answers (as LSB `status` actions and `systemctl
/// status` use 3 for "not running"): whatever the pinned program still does is printed.
pub const EXIT_NOT_RUNNING: u8 = 3;

/// `enforcer status` with no daemon: what the pinned program still enforces, from the
/// pinned maps (generation), the kernel (what runs on each pinned interface) and the
/// status.json the last daemon left (policy digest, agents), as `cilium status` reports
/// the datapath while its agent is down. Exits with [`EXIT_NOT_RUNNING`].
fn pinned_status(cli: &Cli, not_running: &anyhow::Error) -> anyhow::Result<ExitCode> {
    // Without a configuration there is no pin path to look at: the socket error says it.
    let Ok(config) = crate::node::config::Config::load(&cli.config) else {
        return Err(anyhow::anyhow!(
            "{}",
            crate::error::error_chain(not_running.as_ref())
        ));
    };
    let generation = KernelMaps::from_pins(&config.bpffs)
        .ok()
        .and_then(|maps| maps.current_state().ok())
        .map(|state| state.generation);
    let hooks = dataplane::pinned_hooks(&config.bpffs);
    let last = Status::read(&config.runtime_dir);
    let enforcing = generation.is_some() && hooks.iter().any(|h| h.problem.is_none());
    let reason = crate::error::error_chain(not_running.as_ref());
    if cli.json {
        print_json(&serde_json::json!({
            "daemon": null,
            "not_running": reason,
            "source": "pinned maps",
            "bpffs": config.bpffs,
            "enforcing": enforcing,
            "generation": generation,
            "policy_digest": last.as_ref().map(|s| s.digest.clone()),
            "agents": last.as_ref().map(|s| s.agents.len()),
            "hooks": hooks,
        }));
    } else {
        outln!("daemon      not running: {reason}");
        match (generation, &last) {
            (None, _) => outln!(
                "enforcing   nothing: no pinned maps under {}",
                config.bpffs.display()
            ),
            (Some(generation), Some(last)) if last.generation == generation => outln!(
                "pinned      policy generation {generation} (sha256 {}, {} agent{}), from the maps under {}",
                last.digest,
                last.agents.len(),
                if last.agents.len() == 1 { "" } else { "s" },
                config.bpffs.display()
            ),
            (Some(generation), _) => outln!(
                "pinned      policy generation {generation}, from the maps under {}",
                config.bpffs.display()
            ),
        }
        if hooks.is_empty() {
            outln!("attached    (no interface): nothing enforces");
        }
        let width = hooks.iter().map(|h| h.interface.len()).max().unwrap_or(0);
        for (i, h) in hooks.iter().enumerate() {
            let label = if i == 0 { "attached" } else { "" };
            let state = match (&h.problem, h.mode) {
                (Some(problem), _) => format!("NOT ENFORCING: {problem}"),
                (None, mode) => format!(
                    "{} {:<8} program {} (pinned, running without a daemon)",
                    h.hook,
                    mode.unwrap_or("?"),
                    h.program_id
                ),
            };
            outln!("{label:<11} {:<width$}  {state}", h.interface);
        }
        if enforcing {
            outln!(
                "            the policy cannot change until a daemon runs: `enforcer run`, or `enforcer policy apply` writes the pinned maps"
            );
        }
    }
    Ok(ExitCode::from(EXIT_NOT_RUNNING))
}

/// `enforcer agents`.
pub(super) fn agents(cli: &Cli) -> anyhow::Result<ExitCode> {
    let v = cli.call(Request::Agents)?;
    if cli.json {
        print_json(&v);
    } else {
        out!("{}", agents_table(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// An agent's interfaces, those that do not exist yet marked pending.
fn interfaces_text(a: &serde_json::Value) -> String {
    let pending = &a["pending_interfaces"];
    a["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str())
        .map(|i| {
            if pending.as_array().is_some_and(|p| p.iter().any(|x| x == i)) {
                format!("{i} (pending)")
            } else {
                i.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `agents` table: one line per agent, totals scaled and right-aligned.
fn agents_table(v: &serde_json::Value) -> String {
    let mut rows = table::new(
        &[
            "ID", "NAME", "MODE", "BREAKER", "MATCH", "PASSED", "DROPPED",
        ],
        &[0, 5, 6],
    );
    for a in v.as_array().into_iter().flatten() {
        let mut matched = interfaces_text(a);
        let prefixes = join(&a["prefixes"]);
        if !prefixes.is_empty() {
            if !matched.is_empty() {
                matched.push_str(", ");
            }
            matched.push_str(&prefixes);
        }
        rows.add_row(vec![
            a["id"].to_string(),
            a["name"].as_str().unwrap_or("").to_string(),
            mode_text(a),
            a["breaker"]
                .as_str()
                .map_or_else(|| "-".to_string(), |b| b.replace('_', "-")),
            matched,
            number(&a["passed_packets"], output::count),
            number(&a["dropped_packets"], output::count),
        ]);
    }
    table::render(&rows)
}

/// `enforcer agent ID|NAME`.
pub(super) fn agent(cli: &Cli, agent: &str) -> anyhow::Result<ExitCode> {
    let v = cli.call(Request::Agent {
        agent: agent.to_owned(),
    })?;
    if cli.json {
        print_json(&v);
    } else {
        out!("{}", agent_text(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// What `agent` prints: identity, limits as people read them, rules, counters by reason.
fn agent_text(v: &serde_json::Value) -> String {
    let mut text = format!(
        "agent {} {:?}, mode {}\n",
        v["id"],
        v["name"].as_str().unwrap_or(""),
        mode_text(v)
    );
    let none = |s: String| if s.is_empty() { "-".to_string() } else { s };
    text += &format!("  interfaces  {}\n", none(interfaces_text(v)));
    if let Some(profile) = v["profile"].as_str() {
        text += &format!("  profile     {profile}\n");
    }
    text += &format!("  prefixes    {}\n", none(join(&v["prefixes"])));
    text += &format!("  rate        {}\n", rate_text(&v["rate"]));
    text += &format!(
        "  egress      default {}\n",
        v["egress_default"].as_str().unwrap_or("")
    );
    let mut rules = table::new(&["ACTION", "PROTO", "PORTS", "TO"], &[]);
    for r in v["egress"].as_array().into_iter().flatten() {
        rules.add_row(vec![
            r["action"].as_str().unwrap_or("").to_string(),
            r["proto"].as_str().unwrap_or("").to_string(),
            ports_text(r),
            join(&r["to"]),
        ]);
    }
    if v["egress"].as_array().is_some_and(|r| !r.is_empty()) {
        for line in table::render(&rules).lines() {
            text += &format!("    {line}\n");
        }
    }
    text += &guards_text(&v["guards"]);
    text += "  counters\n";
    let mut rows = table::new(&["REASON", "VERDICT", "PACKETS", "BYTES"], &[2, 3]);
    for (reason, c) in v["counters"].as_object().into_iter().flatten() {
        rows.add_row(vec![
            reason.clone(),
            verdict(reason).to_string(),
            number(&c["packets"], output::count),
            number(&c["bytes"], output::bytes),
        ]);
    }
    for line in table::render(&rows).lines() {
        text += &format!("    {line}\n");
    }
    text
}

/// The `breaker` and `quotas` lines of `agent`: the breaker's state (closed, open until
/// when and for how long still, half-open since when), cooldown level and trips; per quota
/// its use of the limit in the current window and when that ends. Nothing without guards.
fn guards_text(g: &serde_json::Value) -> String {
    let mut text = String::new();
    let b = &g["breaker"];
    if b.is_object() {
        let state = match b["state"].as_str().unwrap_or("") {
            "open" => format!(
                "open until {} ({}s left)",
                b["open_until"].as_str().unwrap_or("?"),
                number(&b["remaining_secs"], |s| format!("{s:.0}"))
            ),
            "half_open" => format!(
                "half-open since {}",
                b["half_open_since"].as_str().unwrap_or("?")
            ),
            other => other.to_string(),
        };
        text += &format!(
            "  breaker     {state}, cooldown level {}, {} trips, {}s while open\n",
            b["cooldown_level"],
            g["trips"],
            b["action"].as_str().unwrap_or("drop")
        );
    }
    let quotas = g["quotas"].as_object().filter(|q| !q.is_empty());
    for (i, (kind, q)) in quotas.into_iter().flatten().enumerate() {
        let scale: fn(f64) -> String = if kind.starts_with("bytes") {
            output::bytes
        } else {
            output::count
        };
        text += &format!(
            "  {:<12}{kind} {} of {}{}, window ends {} (in {}s)\n",
            if i == 0 { "quotas" } else { "" },
            number(&q["used"], scale),
            number(&q["limit"], scale),
            if q["exhausted"] == true {
                " (exhausted)"
            } else {
                ""
            },
            q["window_ends"].as_str().unwrap_or("?"),
            q["window_ends_in_secs"]
        );
    }
    text
}

/// The agent's mode, with the mark of a runtime override (`enforcer mode`) if it has one:
/// `monitor (override)`.
fn mode_text(a: &serde_json::Value) -> String {
    match a["override"].as_str() {
        Some(o) => format!("{o} (override)"),
        None => a["mode"].as_str().unwrap_or("").to_string(),
    }
}

/// A JSON number scaled by `scale`; anything else as it is.
fn number(v: &serde_json::Value, scale: fn(f64) -> String) -> String {
    v.as_f64().map_or_else(|| v.to_string(), scale)
}

/// Rate limits as people read them: `50 pps (burst 20), 1.00 MB/s (burst 64.0 kB)`, or
/// `unlimited`.
fn rate_text(rate: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(pps) = rate["packets_per_sec"].as_f64() {
        let mut s = format!("{} pps", output::count(pps));
        if let Some(burst) = rate["packets_burst"].as_f64() {
            s += &format!(" (burst {})", output::count(burst));
        }
        parts.push(s);
    }
    if let Some(bps) = rate["bytes_per_sec"].as_f64() {
        let mut s = format!("{}/s", output::bytes(bps));
        if let Some(burst) = rate["bytes_burst"].as_f64() {
            s += &format!(" (burst {})", output::bytes(burst));
        }
        parts.push(s);
    }
    if parts.is_empty() {
        "unlimited".to_string()
    } else {
        parts.join(", ")
    }
}

/// A rule's ports: none for ICMP (it has none, and a policy may not name any), `all` for
/// the whole range, as a policy omits them.
fn ports_text(rule: &serde_json::Value) -> String {
    match rule["ports"].as_str() {
        _ if rule["proto"] == "icmp" => String::new(),
        None | Some("0-65535") => "all".to_string(),
        Some(p) => p.to_string(),
    }
}

/// `enforcer doctor`.
pub(super) fn doctor(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli.config)?;
    // A bpffs of its own, so nothing of the running daemon's pins is touched.
    let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
    let mut dataplane = Dataplane::load(bpffs.path(), &config.limits)
        .context("loading the data plane on this kernel")?;
    dataplane
        .load_tc()
        .context("loading the tc programs on this kernel")?;
    let costs = dataplane.verifier_costs()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if cli.json {
        print_json(&serde_json::json!({ "kernel": release, "programs": costs }));
    } else {
        out!("{}", dataplane::verifier_table(&release, &costs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer stats`: from the daemon, else from the pinned maps (and it says which).
pub(super) fn stats(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut pins = None;
    let (generation, agents) = match cli.call(Request::Stats) {
        Ok(v) => (
            v["generation"].as_u64().unwrap_or(0),
            serde_json::from_value::<Vec<stats::AgentStats>>(v["agents"].clone())?,
        ),
        Err(e) if is_not_running(&e) => {
            // The pinned program keeps enforcing without a daemon: read its maps.
            let config = load_config(&cli.config)?;
            let maps = KernelMaps::from_pins(&config.bpffs).with_context(|| {
                format!(
                    "no daemon, and no pinned maps under {}",
                    config.bpffs.display()
                )
            })?;
            let names = Status::read(&config.runtime_dir)
                .map(|s| s.agents)
                .unwrap_or_default();
            pins = Some(config.bpffs);
            (
                maps.current_state()?.generation,
                stats::collect(&maps, &names)?,
            )
        }
        Err(e) => return Err(e),
    };
    if cli.json {
        let mut agents = serde_json::to_value(&agents)?;
        // Each reason says what happened to its packets, so a reader needs no list.
        for agent in agents.as_array_mut().into_iter().flatten() {
            for (reason, count) in agent["reasons"].as_object_mut().into_iter().flatten() {
                count["verdict"] = verdict(reason).into();
            }
        }
        print_json(&serde_json::json!({
            "source": if pins.is_some() { "pinned maps" } else { "daemon" },
            "generation": generation,
            "agents": agents,
        }));
    } else {
        match &pins {
            Some(bpffs) => outln!(
                "policy generation {generation}, from the pinned maps under {} (no daemon running)",
                bpffs.display()
            ),
            None => outln!("policy generation {generation}"),
        }
        out!("{}", table::stats(&agents));
    }
    Ok(ExitCode::SUCCESS)
}

/// `drop` or `pass` for a reason's name (`pass` for monitor mode's would-drops, which
/// passed); `?` for a name this build does not know.
pub(super) fn verdict(reason: &str) -> &'static str {
    match Reason::ALL.iter().find(|r| r.name() == reason) {
        Some(r) if r.is_drop() => "drop",
        Some(_) => "pass",
        None => "?",
    }
}

/// `enforcer mode AGENT monitor|enforce`, or `--clear` (`mode` is `None`): back to the
/// policy's mode.
pub(super) fn mode(cli: &Cli, agent: &str, mode: Option<ModeArg>) -> anyhow::Result<ExitCode> {
    let request = match mode {
        Some(ModeArg::Monitor) => Request::Mode {
            agent: agent.to_owned(),
            mode: Mode::Monitor,
        },
        Some(ModeArg::Enforce) => Request::Mode {
            agent: agent.to_owned(),
            mode: Mode::Enforce,
        },
        None => Request::ModeClear {
            agent: agent.to_owned(),
        },
    };
    let v = cli.call(request)?;
    if cli.json {
        print_json(&v);
    } else {
        let now = v["mode"].as_str().unwrap_or("");
        match (mode, v["cleared"].as_bool()) {
            (None, Some(true)) => outln!(
                "agent {} back in the policy's {now} mode: override cleared (generation {})",
                v["agent"],
                v["generation"]
            ),
            (None, _) => outln!(
                "agent {} has no override: it is in the policy's {now} mode",
                v["agent"]
            ),
            (Some(_), _) => outln!(
                "agent {} now in {now} mode (generation {})",
                v["agent"],
                v["generation"]
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer breaker reset AGENT`.
pub(super) fn breaker_reset(cli: &Cli, agent: &str) -> anyhow::Result<ExitCode> {
    let v = cli.call(Request::BreakerReset {
        agent: agent.to_owned(),
    })?;
    if cli.json {
        print_json(&v);
    } else {
        outln!(
            "agent {} {:?}: breaker closed (was {}; {} trips so far)",
            v["agent"],
            v["name"].as_str().unwrap_or(""),
            v["was"].as_str().unwrap_or("?").replace('_', "-"),
            v["trips"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `agent add`, `agent remove`, `agent wait`.
pub(super) fn agent_command(cli: &Cli, command: &AgentCommand) -> anyhow::Result<ExitCode> {
    let (v, what) = match command {
        AgentCommand::Add {
            profile,
            interface,
            prefixes,
        } => (
            cli.call(Request::AgentAdd {
                profile: profile.clone(),
                interface: interface.clone(),
                prefixes: prefixes.clone(),
            })?,
            "added",
        ),
        AgentCommand::Remove { agent } => (
            cli.call(Request::AgentRemove {
                agent: agent.clone(),
            })?,
            "removed",
        ),
        AgentCommand::Wait { interface, timeout } => {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
            loop {
                let status = cli.call(Request::Status)?;
                let attached = status["interfaces"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|i| i == interface.as_str()));
                let agent = cli
                    .call(Request::Agent {
                        agent: interface.clone(),
                    })
                    .ok();
                if let Some(agent) = agent.filter(|_| attached) {
                    let v = json!({
                        "id": agent["id"],
                        "name": agent["name"],
                        "interface": interface,
                        "generation": status["generation"],
                        "attached": true,
                    });
                    if cli.json {
                        print_json(&v);
                    } else {
                        outln!(
                            "agent {} (id {}) enforced on {interface} (generation {})",
                            v["name"].as_str().unwrap_or(""),
                            v["id"],
                            v["generation"]
                        );
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "{interface}: no agent enforced there after {timeout} s ({})",
                        if attached {
                            "attached, but no agent names it"
                        } else {
                            "not attached: is the interface there, and does a profile or agent name it?"
                        }
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    if cli.json {
        print_json(&v);
    } else {
        let state = if v["attached"].as_bool() == Some(true) {
            "attached"
        } else if v["pending"].as_bool() == Some(true) {
            "pending: enforced once the interface appears"
        } else {
            "not attached"
        };
        outln!(
            "{what} agent {} (id {}) on {}: {state} (generation {})",
            v["name"].as_str().unwrap_or(""),
            v["id"],
            v["interface"].as_str().unwrap_or(""),
            v["generation"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per hooked interface: the mode the kernel reports and whether the program
/// running there is this daemon's.
pub(super) fn print_hooks(hooks: &serde_json::Value) {
    let hooks = hooks.as_array().map(Vec::as_slice).unwrap_or_default();
    if hooks.is_empty() {
        outln!("attached    (no interface)");
    }
    let width = hooks
        .iter()
        .filter_map(|h| h["interface"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for (i, h) in hooks.iter().enumerate() {
        let label = if i == 0 { "attached" } else { "" };
        let interface = h["interface"].as_str().unwrap_or("?");
        let state = match (h["mode"].as_str(), h["problem"].as_str()) {
            (_, Some(problem)) => format!("NOT ENFORCING: {problem}"),
            (Some(mode), None) => {
                let whose = if h["ours"] == true {
                    "this daemon's program"
                } else {
                    "ANOTHER program"
                };
                let hook = h["hook"].as_str().unwrap_or("?");
                format!("{hook} {mode:<8} program {} ({whose})", h["program_id"])
            }
            (None, None) => "unknown".to_string(),
        };
        outln!("{label:<11} {interface:<width$}  {state}");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rates_read_as_people_say_them() {
        assert_eq!(
            rate_text(&json!({"packets_per_sec": 50, "packets_burst": 20,
                "bytes_per_sec": 1_000_000, "bytes_burst": 64_000})),
            "50 pps (burst 20), 1.00 MB/s (burst 64.0 kB)"
        );
        assert_eq!(
            rate_text(
                &json!({"packets_per_sec": 100_000, "packets_burst": 100_000,
                "bytes_per_sec": null, "bytes_burst": null})
            ),
            "100K pps (burst 100K)"
        );
        assert_eq!(
            rate_text(&json!({"packets_per_sec": null, "packets_burst": null,
                "bytes_per_sec": null, "bytes_burst": null})),
            "unlimited"
        );
    }

    #[test]
    fn agents_scale_align_and_mark_overrides() {
        let v = json!([
            {"id": 1, "name": "coder", "mode": "enforce", "override": null,
             "interfaces": ["gwa1"], "prefixes": [], "passed_packets": 1_234_567,
             "dropped_packets": 40},
            {"id": 12, "name": "b", "mode": "monitor", "override": "monitor",
             "interfaces": [], "prefixes": ["10.0.0.0/24"], "passed_packets": 5,
             "dropped_packets": 0, "breaker": "half_open"},
        ]);
        let text = agents_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].ends_with("1.23M       40"), "{text}");
        assert!(lines[2].ends_with("    5        0"), "{text}");
        assert!(lines[2].contains("monitor (override)"), "{text}");
        assert!(!lines[1].contains("override"), "{text}");
        assert_eq!(lines[1].split_whitespace().nth(3), Some("-"), "{text}");
        assert!(lines[2].contains("half-open"), "{text}");
    }

    #[test]
    fn guards_read_as_state_and_use() {
        let g = json!({"trips": 3, "breaker": {"state": "open", "cooldown_level": 1,
            "open_until": "2027-01-15T08:01:40.000000000Z", "remaining_secs": 59.6,
            "half_open_since": null, "action": "reject"},
            "quotas": {"bytes_per_hour": {"limit": 10_000_000, "used": 1_234_000,
                "exhausted": false, "window_ends": "2027-01-15T09:00:00.000000000Z",
                "window_ends_in_secs": 3477},
              "connections_per_day": {"limit": 100, "used": 100, "exhausted": true,
                "window_ends": "2027-01-16T00:00:00.000000000Z", "window_ends_in_secs": 57477}}});
        let text = guards_text(&g);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "  breaker     open until 2027-01-15T08:01:40.000000000Z (60s left), cooldown level 1, 3 trips, rejects while open"
        );
        assert_eq!(
            lines[1],
            "  quotas      bytes_per_hour 1.23 MB of 10.0 MB, window ends 2027-01-15T09:00:00.000000000Z (in 3477s)"
        );
        assert!(
            lines[2].starts_with("              connections_per_day 100 of 100 (exhausted)"),
            "{text}"
        );
        let half = json!({"trips": 1, "quotas": {}, "breaker": {"state": "half_open",
            "cooldown_level": 0, "half_open_since": "T", "action": "drop"}});
        assert_eq!(
            guards_text(&half),
            "  breaker     half-open since T, cooldown level 0, 1 trips, drops while open\n"
        );
        assert_eq!(
            guards_text(&json!({"breaker": null, "trips": 0, "quotas": {}})),
            ""
        );
        assert_eq!(guards_text(&serde_json::Value::Null), "");
    }

    #[test]
    fn icmp_rules_show_no_ports() {
        let v = json!({"id": 1, "name": "coder", "mode": "enforce", "override": "monitor",
            "interfaces": ["gwa1"], "prefixes": [], "egress_default": "deny",
            "rate": {"packets_per_sec": null, "packets_burst": null,
                     "bytes_per_sec": null, "bytes_burst": null},
            "egress": [
                {"action": "allow", "proto": "icmp", "ports": null, "to": ["10.0.0.1"]},
                {"action": "allow", "proto": "udp", "ports": "9000", "to": ["10.0.0.2"]},
                {"action": "deny", "proto": "any", "ports": "0-65535", "to": ["0.0.0.0/0"]},
            ],
            "counters": {"allowed": {"packets": 2000, "bytes": 3_000_000}}});
        let text = agent_text(&v);
        assert!(
            text.starts_with("agent 1 \"coder\", mode monitor (override)\n"),
            "{text}"
        );
        assert!(text.contains("  rate        unlimited\n"), "{text}");
        assert!(!text.contains("0-65535"), "{text}");
        let icmp = text.lines().find(|l| l.contains("icmp")).unwrap();
        assert_eq!(
            icmp.split_whitespace().collect::<Vec<_>>(),
            ["allow", "icmp", "10.0.0.1"]
        );
        assert!(text.contains("9000"), "{text}");
        let allowed = text.lines().find(|l| l.contains("allowed")).unwrap();
        assert_eq!(
            allowed.split_whitespace().collect::<Vec<_>>(),
            ["allowed", "pass", "2.00K", "3.00", "MB"]
        );
    }
}
