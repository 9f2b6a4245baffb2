//! `enforcer stop`.

use std::{
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Cli, load_config};
use crate::{dataplane, node::daemon::Status, outln};

/// `enforcer stop [--detach]`.
pub(super) fn stop(cli: &Cli, detach: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli.config)?;
    let status = Status::read(&config.runtime_dir);
    if let Some(reused) = status.as_ref().and_then(Status::reused_pid) {
        // A daemon killed outright leaves its pid in status.json; the pid may since
        // belong to anything. Not ours to signal.
        eprintln!(
            "no daemon to stop: {}/status.json names a daemon that is gone ({reused}); not signalling it",
            config.runtime_dir.display()
        );
    }
    if let Some(status) = status
        && status
            .signal_daemon(libc::SIGTERM)
            .with_context(|| format!("signalling daemon {}", status.pid))?
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        while status.daemon_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if status.daemon_alive() {
            bail!("daemon {} did not exit within 10 s of SIGTERM", status.pid);
        }
        outln!(
            "daemon {} stopped; the pinned program keeps enforcing",
            status.pid
        );
    }
    if detach {
        dataplane::remove_pins(&config.bpffs)
            .with_context(|| format!("removing pins under {}", config.bpffs.display()))?;
        outln!(
            "detached: removed every pin under {}",
            config.bpffs.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
