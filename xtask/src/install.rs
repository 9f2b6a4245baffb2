//! `cargo xtask install [--root DIR]`: lays out the daemon as a systemd service. Every step
//! says what it did; running it again changes only what differs and never overwrites the
//! operator's configuration or policy.
//!
//! | source                       | installed as                               | if it exists  |
//! |------------------------------|--------------------------------------------|---------------|
//! | `target/release/enforcer`    | `ROOT/usr/local/bin/enforcer` (0755)       | replaced      |
//! | `packaging/enforcer.service` | `ROOT/etc/systemd/system/enforcer.service` | replaced      |
//! | `packaging/enforcer.toml`    | `ROOT/etc/enforcer/enforcer.toml` (0644)   | kept          |
//! | `packaging/policy.toml`      | `ROOT/etc/enforcer/policy.toml` (0644)     | kept          |
//! |                              | `ROOT/var/lib/enforcer/` (0750)            | left as is    |
//!
//! "Replaced" means only when contents or mode differ, by a rename.
//!
//! The unit is replaced because it is ours: local changes belong in a drop-in
//! (`systemctl edit enforcer`), which a reinstall leaves alone.

use std::{
    fmt, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::setup;

/// What to install, and under which root.
#[derive(Clone, Debug)]
pub struct Install {
    /// The file-system root to install under: `/` for this machine, or a staging directory.
    pub root: PathBuf,
    /// The built `enforcer` binary.
    pub binary: PathBuf,
    /// The repository's `packaging/` directory (unit, default config and policy).
    pub packaging: PathBuf,
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file or directory did not exist and was created.
    Created,
    /// The file existed with other contents or mode and was replaced.
    Updated,
    /// The file or directory was already as it should be.
    Unchanged,
    /// The file exists and is the operator's: left as it is, whatever it holds.
    Kept,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Kept => "kept",
        })
    }
}

/// One installed path and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The path under the root.
    pub path: PathBuf,
    /// What was done.
    pub outcome: Outcome,
}

/// Whether an existing file is replaced or kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    Replace,
    Keep,
}

/// Installs the files and directories in the table above, printing each step, and returns
/// the steps in order.
pub fn install_files(install: &Install) -> Result<Vec<Step>> {
    let root = &install.root;
    let packaging = |name: &str| install.packaging.join(name);
    let mut steps = Vec::new();
    let mut record = |path: PathBuf, outcome: Outcome, note: &str| {
        println!("{outcome}: {}{note}", path.display());
        steps.push(Step { path, outcome });
    };

    let bin = root.join("usr/local/bin/enforcer");
    let outcome = place(&install.binary, &bin, 0o755, Existing::Replace)?;
    record(bin, outcome, "");

    let unit = root.join("etc/systemd/system/enforcer.service");
    let outcome = place(
        &packaging("enforcer.service"),
        &unit,
        0o644,
        Existing::Replace,
    )?;
    record(unit, outcome, "");

    let etc = root.join("etc/enforcer");
    let outcome = directory(&etc, 0o755)?;
    record(etc.clone(), outcome, "");
    for name in ["enforcer.toml", "policy.toml"] {
        let dest = etc.join(name);
        let outcome = place(&packaging(name), &dest, 0o644, Existing::Keep)?;
        let note = if outcome == Outcome::Kept {
            " (exists: not overwritten)"
        } else {
            ""
        };
        record(dest, outcome, note);
    }

    let state = root.join("var/lib/enforcer");
    let outcome = directory(&state, 0o750)?;
    record(state, outcome, "");
    Ok(steps)
}

/// After installing under `root`: if that is this machine and systemd is PID 1, reloads
/// systemd's unit files; otherwise says what to do. Never enables or starts the service:
/// when enforcement begins is the operator's call.
pub fn activate(root: &Path) -> Result<()> {
    let live = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?
        == Path::new("/");
    if !live {
        println!(
            "note: installed under {}; this machine's systemd is left alone",
            root.display()
        );
        return Ok(());
    }
    if systemd_booted() {
        setup::run_step(Command::new("systemctl").arg("daemon-reload"))
            .context("reloading systemd's unit files")?;
        println!(
            "next: edit /etc/enforcer/policy.toml, then `systemctl enable --now enforcer`; \
             after reinstalling over a running service, `systemctl restart enforcer`"
        );
    } else {
        println!(
            "note: systemd is not running here (PID 1 is not systemd), so `systemctl \
             daemon-reload` was skipped. On a systemd machine: `systemctl daemon-reload && \
             systemctl enable --now enforcer`. Without systemd: `/usr/local/bin/enforcer run \
             --config /etc/enforcer/enforcer.toml`"
        );
    }
    Ok(())
}

/// Whether PID 1 is systemd, tested the way `sd_booted(3)` does: systemd creates
/// `/run/systemd/system/` early at boot, and nothing else does.
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Installs `source` as `dest` with `mode`. A file that is already there is kept (for
/// [`Existing::Keep`]), left alone if identical, or replaced by a rename so that a running
/// binary is never written in place (which fails with ETXTBSY) and no reader ever sees
/// half a file.
fn place(source: &Path, dest: &Path, mode: u32, existing: Existing) -> Result<Outcome> {
    let current = match fs::metadata(dest) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", dest.display())),
    };
    if let Some(meta) = &current {
        ensure!(
            meta.is_file(),
            "{} exists and is not a regular file",
            dest.display()
        );
        if existing == Existing::Keep {
            return Ok(Outcome::Kept);
        }
    }
    let contents = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    if let Some(meta) = &current
        && meta.permissions().mode() & 0o7777 == mode
        && fs::read(dest).with_context(|| format!("reading {}", dest.display()))? == contents
    {
        return Ok(Outcome::Unchanged);
    }
    let parent = dest
        .parent()
        .context("installing to a path without a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let file_name = dest
        .file_name()
        .context("installing to a path without a name")?;
    let tmp = parent.join(format!(".{}.xtask-new", file_name.to_string_lossy()));
    fs::write(&tmp, &contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok(if current.is_some() {
        Outcome::Updated
    } else {
        Outcome::Created
    })
}

/// Creates `dir` (and its parents) with `mode` if it is missing; an existing directory
/// keeps its mode, which the operator may have chosen.
fn directory(dir: &Path, mode: u32) -> Result<Outcome> {
    if dir.is_dir() {
        return Ok(Outcome::Unchanged);
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(Outcome::Created)
}
