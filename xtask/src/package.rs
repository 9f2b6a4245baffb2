//! `cargo xtask package [--out DIR]`: a Debian package of the daemon built from this
//! checkout. The release binary embeds the eBPF objects, so the server needs no toolchain.
//!
//! | in the package                                   | from                                   |
//! |--------------------------------------------------|----------------------------------------|
//! | `/usr/sbin/enforcer` (0755)                      | `target/release/enforcer`              |
//! | `/lib/systemd/system/enforcer.service`           | `packaging/enforcer.service`, `ExecStart=` at `/usr/sbin` |
//! | `/etc/enforcer/enforcer.toml`, `policy.toml`     | `packaging/`, as conffiles: an upgrade keeps local edits |
//! | `/etc/logrotate.d/enforcer`                      | `packaging/enforcer.logrotate`, a conffile |
//! | `/usr/share/man/man1/enforcer*.1.gz`             | `enforcer generate` (clap_mangen, from the CLI definition) |
//! | bash, zsh and fish completions                   | `enforcer generate` (clap_complete)    |
//! | `/usr/share/doc/enforcer/copyright`              | the workspace licence                  |
//! | `/usr/share/doc/enforcer/schema/*.json`          | `enforcer/schema/`: the CLI's `--json` documents |
//!
//! The daemon is a system administration tool, hence `/usr/sbin` (Debian policy 9.1.1).
//! `Depends: libc6 (>= V)` names the newest glibc symbol version the binary uses, read from
//! its dynamic symbols, so a build on a newer system does not claim to run on an older one.
//!
//! The maintainer scripts never detach the pinned program: `remove` stops the service, which
//! leaves the last policy enforcing (as `systemctl stop` does), an upgrade restarts it, and
//! the new daemon takes the pinned program over in place; only `purge` removes state
//! (`/var/lib/enforcer`). `enforcer stop --detach` stays the one way to stop enforcing.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::setup::{probe, probe_bytes, run_step};

/// What to package, and where the `.deb` goes.
#[derive(Clone, Debug)]
pub struct Package {
    /// The built `enforcer` binary.
    pub binary: PathBuf,
    /// The repository's `packaging/` directory (unit, default config and policy).
    pub packaging: PathBuf,
    /// Directory the `.deb` is written to (created); its staging tree goes there too.
    pub out: PathBuf,
}

/// Where the unit in `packaging/` expects the binary (`cargo xtask install` puts it there).
const INSTALL_BINARY: &str = "/usr/local/bin/enforcer";
/// Where the package puts it.
pub const PACKAGE_BINARY: &str = "/usr/sbin/enforcer";
/// The files under `/etc` that are the operator's once installed, and where in `packaging/`
/// each comes from.
pub const CONFFILES: [(&str, &str); 3] = [
    ("/etc/enforcer/enforcer.toml", "enforcer.toml"),
    ("/etc/enforcer/policy.toml", "policy.toml"),
    // Rotates the audit log and sends SIGUSR1: the daemon reopens it, the chain goes on.
    ("/etc/logrotate.d/enforcer", "enforcer.logrotate"),
];

/// Builds the package, versioned as the binary reports itself; returns the path of the `.deb`.
pub fn build(p: &Package) -> Result<PathBuf> {
    build_as(p, &binary_version(&p.binary)?)
}

/// Builds the package with `version` as its Debian version, whatever the binary says: the
/// systemd VM test packages one binary twice, the second time as a newer version, to run
/// an upgrade's maintainer scripts.
pub fn build_as(p: &Package, version: &str) -> Result<PathBuf> {
    let arch = probe(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let stage = p.out.join(format!("enforcer_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    copy(&p.binary, &stage.join(&PACKAGE_BINARY[1..]), 0o755)?;
    let unit = read(&p.packaging.join("enforcer.service"))?;
    ensure!(
        unit.contains(INSTALL_BINARY),
        "packaging/enforcer.service does not run {INSTALL_BINARY}: update the package's path rewrite"
    );
    write(
        &stage.join("lib/systemd/system/enforcer.service"),
        &unit.replace(INSTALL_BINARY, PACKAGE_BINARY),
        0o644,
    )?;
    for (conffile, source) in CONFFILES {
        copy(
            &p.packaging.join(source),
            &stage.join(&conffile[1..]),
            0o644,
        )?;
    }

    // Man pages and completions, from the binary's own CLI definition.
    let generated = p.out.join("generated");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    run_step(
        Command::new(&p.binary)
            .args(["generate", "--dir"])
            .arg(&generated),
    )?;
    let man_dir = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man_dir)?;
    let mut pages = 0;
    for entry in fs::read_dir(generated.join("man"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        // -n: no name or time stamp in the header, so a rebuild is byte-identical.
        let gz = probe_bytes(Command::new("gzip").args(["-9n", "-c"]).arg(&path))?;
        write_bytes(&man_dir.join(format!("{name}.gz")), &gz, 0o644)?;
        pages += 1;
    }
    ensure!(pages > 0, "`enforcer generate` wrote no man page");
    for (from, to) in [
        (
            "enforcer.bash",
            "usr/share/bash-completion/completions/enforcer",
        ),
        ("_enforcer", "usr/share/zsh/vendor-completions/_enforcer"),
        (
            "enforcer.fish",
            "usr/share/fish/vendor_completions.d/enforcer.fish",
        ),
    ] {
        copy(
            &generated.join("completions").join(from),
            &stage.join(to),
            0o644,
        )?;
    }
    write(
        &stage.join("usr/share/doc/enforcer/copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: enforcer\n\n\
         Files: *\nCopyright: the enforcer authors\nLicense: MIT or Apache-2.0\n \
         On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;
    // The JSON Schemas of the CLI's --json output, for whoever scripts against it.
    let schemas = p.packaging.join("../enforcer/schema");
    let mut names: Vec<_> = fs::read_dir(&schemas)
        .with_context(|| format!("reading {}", schemas.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        copy(
            &schemas.join(&name),
            &stage.join("usr/share/doc/enforcer/schema").join(&name),
            0o644,
        )?;
    }
    fs::remove_dir_all(&generated)?;

    let debian = stage.join("DEBIAN");
    write(
        &debian.join("control"),
        &format!(
            "Package: enforcer\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: enforcer maintainers <maintainers@localhost>\n\
             Installed-Size: {}\n\
             Depends: libc6 (>= {})\n\
             Recommends: systemd\n\
             Section: net\n\
             Priority: optional\n\
             Description: eBPF traffic enforcer for AI agents\n \
             Per-agent rate limiting and egress allow-listing in the kernel: XDP on network\n \
             cards, tc on the host side of agent sandboxes' veths. A daemon loads and pins\n \
             the programs, takes signed policy from a control plane over gRPC, exports\n \
             Prometheus counters and keeps a hash-chained audit trail.\n",
            installed_kib(&stage)?,
            glibc_floor(&p.binary)?,
        ),
        0o644,
    )?;
    write(
        &debian.join("conffiles"),
        &(CONFFILES.map(|(path, _)| path).join("\n") + "\n"),
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("prerm"), PRERM, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;

    let deb = p.out.join(format!("enforcer_{version}_{arch}.deb"));
    run_step(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// After unpacking: the state directory, and the service enabled and started on a first
/// install (the shipped policy has no agents, so it enforces nothing until the operator's
/// policy is in place) or restarted on an upgrade, which swaps the pinned program in place.
/// A start that fails leaves the package installed, as debhelper's scripts do.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    mkdir -p /var/lib/enforcer
    chmod 0750 /var/lib/enforcer
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        if [ -z "$2" ]; then
            systemctl enable enforcer.service || true
            systemctl start enforcer.service || true
        else
            systemctl try-restart enforcer.service || true
        fi
    fi
fi
exit 0
"#;

/// Before removal: stop and disable the service. Stopping leaves the pinned program and the
/// last policy enforcing; nothing here detaches it. An upgrade does nothing here.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now enforcer.service || true
fi
exit 0
"#;

/// After removal: the unit is gone; a purge also removes the state directory.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/enforcer
fi
exit 0
"#;

/// The version `binary --version` reports ("enforcer 0.1.0").
pub fn binary_version(binary: &Path) -> Result<String> {
    let text = probe(Command::new(binary).arg("--version"))?;
    match text.split_whitespace().collect::<Vec<_>>()[..] {
        ["enforcer", version] => Ok(version.to_owned()),
        _ => bail!("{} --version said {text:?}", binary.display()),
    }
}

/// The newest `GLIBC_x.y` symbol version `binary` needs, from `objdump -T`.
fn glibc_floor(binary: &Path) -> Result<String> {
    let symbols = probe(Command::new("objdump").arg("-T").arg(binary))?;
    let mut newest: Option<Vec<u32>> = None;
    for word in symbols.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        let Some(v) = word.strip_prefix("GLIBC_") else {
            continue;
        };
        let Ok(parts) = v
            .split('.')
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|n| parts > *n) {
            newest = Some(parts);
        }
    }
    let newest = newest.context("objdump -T shows no GLIBC_ symbol version")?;
    Ok(newest
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("."))
}

/// Size of the staged files in KiB, as `Installed-Size` wants it.
fn installed_kib(dir: &Path) -> Result<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        bytes += if meta.is_dir() {
            installed_kib(&entry.path())? * 1024
        } else {
            meta.len().div_ceil(1024) * 1024
        };
    }
    Ok(bytes / 1024)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    write_bytes(path, text.as_bytes(), mode)
}

fn write_bytes(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, mode)
}
