//! `cargo xtask setup`: brings a Debian 12 machine with rustup to where the project builds
//! and its tests run. Every step checks first and says whether it acted or skipped.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

/// Debian packages: LLVM 22 and the libraries its link line names (Debian ships Polly apart
/// from llvm-22-dev) to build bpf-linker against, iproute2 for the namespace tests, and
/// systemd for `systemd-analyze verify` of the service unit (container images and CI
/// runners often lack it; the tests only verify the unit and need no running systemd),
/// what `cargo xtask bench` compares against: xdp-tools (xdp-filter; its BPF objects
/// come with libxdp1), nftables and iptables. nftables is also the inspecting proxy's
/// transparent redirect; curl is the real HTTPS client of its tests (and ca-certificates the
/// proxy's default upstream roots). And what `cargo xtask vmtest` needs: qemu, the guest
/// agent vmtest's init starts in the guest (from the shared host root), a static busybox
/// for the initramfs, kmod (depmod on the host, modprobe in the guest) and xz for 6.12's
/// compressed modules. For the DNS tests: dnsmasq (the `-base` package: the binary without
/// a system service that would start on install) and dig. And what `cargo xtask vmtest
/// --systemd` needs: mmdebstrap for the guest's Debian image, e2fsprogs for `mkfs.ext4 -d`
/// (image and payload disks without loop mounts) and qemu-img (qemu-utils) for the
/// overlays each run boots. For the fleet control plane, whose store is etcd: etcd-server
/// (the etcd 3.4 binary the tests start clusters from), etcd-client (etcdctl, which the
/// tests use to check and explain what the store holds), protobuf-compiler and
/// libprotobuf-dev (the `etcd-client` crate's build script runs protoc on etcd's protos,
/// which import the well-known types libprotobuf-dev ships). On a machine running systemd,
/// installing etcd-server also enables and starts a system `etcd.service` on
/// 127.0.0.1:2379/2380; it is left alone: the tests' clusters take free ports of their own
/// and never talk to it. python3-venv makes the venv of the MCP tests' real Python SDK
/// client and server (see [`mcp_venv`]).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "systemd",
    "xdp-tools",
    "nftables",
    "iptables",
    "curl",
    "ca-certificates",
    "qemu-system-x86",
    "qemu-guest-agent",
    "busybox-static",
    "kmod",
    "xz-utils",
    "dnsmasq-base",
    "bind9-dnsutils",
    "mmdebstrap",
    "e2fsprogs",
    "qemu-utils",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    "python3-venv",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// The MCP SDK the MCP tests run as client and server (tests/mcp/). Pinned: the tests
/// assert on what this SDK sends and answers (the 2026-07-28 protocol revision with its
/// `Mcp-Method`/`Mcp-Name` headers, the error codes it maps to `McpError`, its host check),
/// and a new release may change any of them; move the pin on purpose, with the tests.
const MCP_SDK: &str = "mcp==2.3.0";
/// Where the MCP tests look for the venv, relative to the workspace root.
pub const MCP_VENV: &str = "target/mcp-venv";

/// Runs every setup step in order; `root` is the workspace root.
pub fn run(root: &Path) -> Result<()> {
    if is_root()? {
        println!("ok: running as root");
    } else {
        println!("note: not root; steps that need to install or mount will fail");
    }
    apt_packages()?;
    ensure_nightly()?;
    ensure_nightly_component("rust-src")?;
    bpf_linker()?;
    vmtest()?;
    bpffs()?;
    mcp_venv(root)?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in APT_PACKAGES {
        if dpkg_installed(package)? {
            println!("ok: {package} installed");
        } else {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    run_step(Command::new("apt-get").arg("update")).context("updating apt package lists")?;
    run_step(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (setup expects Debian 12)")?;
    // dpkg-query fails for a package it has never heard of: that is "missing" too.
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

/// Installs the `nightly` toolchain if rustup does not have it (the eBPF crate needs it).
pub fn ensure_nightly() -> Result<()> {
    let list = probe(Command::new("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    // "nightly-x86_64-unknown-linux-gnu", not a dated "nightly-2026-01-01-...".
    let has_nightly = list.lines().any(|line| {
        line.split_whitespace()
            .next()
            .and_then(|name| name.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if has_nightly {
        println!("ok: nightly toolchain present");
        return Ok(());
    }
    run_step(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
    .context("installing the nightly toolchain")
}

/// Adds `component` to the nightly toolchain if it is missing; call [`ensure_nightly`] first.
pub fn ensure_nightly_component(component: &str) -> Result<()> {
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("listing nightly components")?;
    // Installed components are listed with their target triple, except rust-src.
    if installed
        .lines()
        .any(|l| l == component || l.starts_with(&format!("{component}-")))
    {
        println!("ok: {component} present on nightly");
        return Ok(());
    }
    run_step(Command::new("rustup").args(["component", "add", component, "--toolchain", "nightly"]))
        .with_context(|| format!("adding {component} to the nightly toolchain"))
}

fn bpf_linker_version() -> Option<String> {
    probe(Command::new("bpf-linker").arg("--version"))
        .ok()
        .map(|out| {
            out.trim()
                .trim_start_matches("bpf-linker")
                .trim()
                .to_owned()
        })
}

fn bpf_linker() -> Result<()> {
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            println!("ok: bpf-linker {v} present");
            return Ok(());
        }
        Some(v) => println!("note: bpf-linker {v} found, {BPF_LINKER_VERSION} wanted"),
        None => println!("note: bpf-linker not found"),
    }
    let install = |locked: bool| {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        if locked {
            cmd.arg("--locked");
        }
        run_step(&mut cmd)
    };
    // --locked builds what upstream tested; without it, if a pinned dependency was yanked.
    if let Err(e) = install(true) {
        println!("note: {e:#}; retrying without --locked");
        install(false).context("installing bpf-linker")?;
    }
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            println!("ok: bpf-linker {v} installed");
            Ok(())
        }
        found => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but `bpf-linker --version` finds \
             {found:?}: put cargo's bin directory (usually ~/.cargo/bin) first on PATH"
        ),
    }
}

/// The vmtest tool, from crates.io, at the version `cargo xtask vmtest` is written against.
fn vmtest() -> Result<()> {
    let wanted = crate::vm::VMTEST_VERSION;
    let found = probe(Command::new("vmtest").arg("--version"))
        .ok()
        .map(|out| out.trim().trim_start_matches("vmtest").trim().to_owned());
    if found.as_deref() == Some(wanted) {
        println!("ok: vmtest {wanted} present");
        return Ok(());
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "--locked", &format!("vmtest@{wanted}")]);
    run_step(&mut cmd).context("installing vmtest")
}

/// The Python venv with the MCP SDK ([`MCP_SDK`]) at [`MCP_VENV`] under `root`, for the MCP
/// tests' client and server. Skipped when its python already imports `mcp`.
fn mcp_venv(root: &Path) -> Result<()> {
    let venv = root.join(MCP_VENV);
    let python = venv.join("bin/python");
    let imports = || {
        Command::new(&python)
            .args(["-c", "import mcp"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports() {
        println!("ok: MCP SDK venv present at {}", venv.display());
        return Ok(());
    }
    run_step(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .with_context(|| format!("creating the venv {}", venv.display()))?;
    // Quiet unless it fails, then all of pip's output: a resolver or network error is
    // only explained there.
    let line = format!("{} -m pip install {MCP_SDK}", python.display());
    println!("run: {line}");
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            MCP_SDK,
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    ensure!(
        output.status.success(),
        "`{line}` failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        imports(),
        "{MCP_SDK} installed into {} but its python cannot import mcp",
        venv.display()
    );
    println!("ok: MCP SDK venv created at {}", venv.display());
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        println!("ok: bpffs mounted on {BPFFS}");
        return Ok(());
    }
    require_root(&format!("mounting bpffs on {BPFFS}"))?;
    run_step(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("mounting bpffs on {BPFFS}"))
}

/// Whether the effective user is root, from the `Uid:` line of /proc/self/status (real,
/// effective, saved, fs), which saves a libc dependency.
fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

fn require_root(what: &str) -> Result<()> {
    ensure!(
        is_root()?,
        "{what} needs root: run `cargo xtask setup` as root (e.g. `sudo -E env \"PATH=$PATH\" \
         cargo xtask setup`), or do that step by hand"
    );
    Ok(())
}

/// Prints and runs a command, failing with its command line if it does not succeed.
pub fn run_step(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("run: {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `{line}`"))?;
    ensure!(status.success(), "`{line}` failed ({status})");
    Ok(())
}

/// Runs a command quietly and returns its stdout, failing if it cannot run or fails.
pub fn probe(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&probe_bytes(cmd)?).into_owned())
}

/// [`probe`] for output that is not text.
pub fn probe_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let line = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    ensure!(
        output.status.success(),
        "`{line}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output.stdout)
}

fn describe(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            line.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
