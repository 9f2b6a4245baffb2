//! Commands for keys, certificates, the control plane and the inspection CA, and the
//! generated man pages and completions.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use serde_json::json;

use super::{Cli, bad, bad_policy, load_config, print_json, table};
use crate::{out, outln};

/// `enforcer inspect ca`.
pub(super) fn inspect_ca(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli.config)?;
    let dir = config
        .inspect
        .map_or(config.state_dir, |inspect| inspect.ca_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = crate::inspect::ca::NodeCa::load_or_create(&dir)?;
    if cli.json {
        print_json(&json!({ "dir": dir, "cert_pem": ca.cert_pem() }));
    } else {
        out!("{}", ca.cert_pem());
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer keygen`.
pub(super) fn keygen(cli: &Cli, dir: &Path) -> anyhow::Result<ExitCode> {
    let keys = crate::controlplane::bundle::keygen(dir)?;
    let public = std::fs::read_to_string(&keys.public_key)?;
    if cli.json {
        print_json(&json!({
            "private_key": keys.private_key,
            "public_key": keys.public_key,
            "key_id": keys.key_id,
            "trusted_key": public.trim(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "private key {} (keep it on the control plane only)",
        keys.private_key.display()
    );
    outln!(
        "public key  {} (key id {})",
        keys.public_key.display(),
        keys.key_id
    );
    outln!("trust it on nodes: trusted_keys = [\"{}\"]", public.trim());
    Ok(ExitCode::SUCCESS)
}

/// `enforcer certs`.
pub(super) fn certs(
    cli: &Cli,
    dir: &Path,
    server_names: &[String],
    clients: &[String],
) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let paths = crate::controlplane::certs::generate(dir, &names, &clients)?;
    if cli.json {
        let pair =
            |p: &crate::controlplane::certs::CertKeyPaths| json!({"cert": p.cert, "key": p.key});
        print_json(&json!({
            "ca": pair(&paths.ca),
            "server": pair(&paths.server),
            "server_names": names,
            "clients": paths.clients.iter().map(|(n, p)| (n.clone(), pair(p))).collect::<serde_json::Map<_, _>>(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    outln!("CA      {}", paths.ca.cert.display());
    outln!(
        "server  {} ({})",
        paths.server.cert.display(),
        names.join(", ")
    );
    for (name, p) in &paths.clients {
        outln!("client  {} ({name})", p.cert.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer control-plane serve FILE`.
pub(super) fn serve(file: &Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut cfg: crate::controlplane::ControlPlaneConfig =
        toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", file.display())))?;
    cfg.resolve_paths(file.parent().unwrap_or(Path::new(".")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::controlplane::serve(cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }))?;
    Ok(ExitCode::SUCCESS)
}

/// What `enforcer control-plane publish` was given.
pub(super) struct Publish<'a> {
    /// The policy file.
    pub file: &'a Path,
    /// The signing key file.
    pub signing_key: &'a Path,
    /// Where etcd is.
    pub etcd: crate::controlplane::etcd::EtcdConfig,
    /// `--node`.
    pub node: Option<&'a str>,
    /// `--selector`.
    pub selector: Option<&'a str>,
}

/// `enforcer control-plane publish`.
pub(super) fn publish(cli: &Cli, args: Publish<'_>) -> anyhow::Result<ExitCode> {
    use crate::controlplane::{bundle, etcd};
    let target = match (args.node, args.selector) {
        (Some(id), None) => {
            bundle::Target::parse(&format!("node:{id}")).map_err(|e| bad(format!("--node: {e}")))?
        }
        (None, Some(pairs)) => {
            bundle::Target::selector(pairs).map_err(|e| bad(format!("--selector: {e}")))?
        }
        (None, None) => bundle::Target::All,
        (Some(_), Some(_)) => return Err(bad("--node and --selector: give one".into())),
    };
    args.etcd.validate().map_err(|e| bad(e.to_string()))?;
    let text = std::fs::read_to_string(args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    // Rejected whole before anything is signed: the nodes keep the last good bundle.
    crate::policy::parse(&args.file.display().to_string(), &text).map_err(|e| bad_policy(&e))?;
    let key = bundle::SigningKey::load(args.signing_key)
        .map_err(|e| bad(crate::error::error_chain(&e)))?;
    let source = args
        .file
        .file_name()
        .map_or_else(|| "policy".into(), |n| n.to_string_lossy().into_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bundle = runtime.block_on(async {
        let store = etcd::Store::connect(&args.etcd).await?;
        store
            .publish(&key, &source, &target, text.into_bytes())
            .await
    })?;
    if cli.json {
        print_json(&json!({
            "version": bundle.version,
            "target": bundle.target,
            "source": bundle.source,
            "key_id": bundle.key_id,
            "issued_at_unix_ms": bundle.issued_at_unix_ms,
        }));
    } else {
        outln!(
            "published version {} for {} (key id {})",
            bundle.version,
            bundle.target,
            bundle.key_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer control-plane nodes`.
pub(super) fn nodes(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli.config)?;
    let cp = config.control_plane.ok_or_else(|| {
        bad(format!(
            "{}: no [control_plane] table",
            cli.config.display()
        ))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Any replica answers for the fleet: the first that does.
    let nodes = runtime.block_on(async {
        let mut last = None;
        for endpoint in cp.endpoints() {
            match crate::controlplane::nodes(&endpoint).await {
                Ok(nodes) => return Ok(nodes),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("validated: at least one url"))
    })?;
    if cli.json {
        print_json(&serde_json::to_value(&nodes)?);
    } else {
        let mut rows = table::new(
            &[
                "NODE",
                "CONNECTED",
                "REPLICA",
                "TARGET",
                "SENT",
                "ACKED",
                "AUDIT",
                "LAST NACK",
            ],
            &[4, 5, 6],
        );
        for n in nodes {
            rows.add_row(vec![
                n.node_id,
                n.connected.to_string(),
                n.replica.unwrap_or_default(),
                n.target.unwrap_or_default(),
                n.version_sent.to_string(),
                n.version_acked.to_string(),
                n.audit_records.to_string(),
                n.last_nack_reason.unwrap_or_default(),
            ]);
        }
        out!("{}", table::render(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Man pages (one per command and subcommand, clap_mangen) into `dir/man` and completions
/// for bash, zsh and fish (clap_complete) into `dir/completions`.
pub(super) fn generate(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "enforcer", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}
