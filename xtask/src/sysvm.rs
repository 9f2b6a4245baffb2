//! `cargo xtask vmtest --systemd`: the Debian package as an operator meets it, in a VM
//! booting a whole Debian 12 system with systemd as PID 1, on the 6.1 and the 6.12 kernel.
//!
//! How a run goes:
//! - the image (Debian 12, both kernels and their initrds; see [`image`]) is built once and
//!   cached outside the checkout;
//! - the binary is packaged twice, as its own version and as a newer one, so the guest can
//!   upgrade from one to the other through the maintainer scripts;
//! - a payload disk (ext4 by `mkfs.ext4 -d`, labelled [`image::PAYLOAD_LABEL`]) carries both
//!   packages, `xtask/guest/systemd-vm.sh` (the scenario) and an `env` file naming them;
//! - per kernel, qemu boots a qcow2 overlay of the image under TCG on one vCPU (see
//!   [`vm::TCG_ARGS`]); the image's runner unit runs the scenario, which installs, reloads,
//!   restarts, stops, upgrades, adds a control plane, reboots (in the same qemu process,
//!   which boots the same kernel again) and checks the service with real traffic after each;
//! - the scenario prints `SYSVM: ok NAME` / `SYSVM: FAIL NAME: WHY` per check on the serial
//!   console, `SYSVM: done` at the end, and powers off. The host streams the console,
//!   counts the checks and stops qemu at [`TIMEOUT`].

pub mod image;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    Totals, cargo,
    package::{self, Package},
    setup::run_step,
    vm::{self, Line},
};

/// The scenario, run as root in the guest.
const SCENARIO: &str = include_str!("../guest/systemd-vm.sh");

/// The suffix of the second package's version: Debian orders `0.1.0+vmtest2` after `0.1.0`.
const UPGRADE_SUFFIX: &str = "+vmtest2";

/// Guest memory: the daemon's maps are sized for thousands of agents.
const GUEST_MEMORY: &str = "2G";

/// Both boots and every check of one kernel; a run past this is stuck.
const TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What the scenario's lines on the console start with.
const MARKER: &str = "SYSVM: ";

/// How many console lines before a failure to show (the whole console is kept in a file).
const TAIL: usize = 60;

/// One check of the scenario.
pub struct Check {
    /// Its name, e.g. `fail-static-upgrade`.
    pub name: String,
    /// Why it failed, or `None` if it passed.
    pub failure: Option<String>,
}

/// What one kernel's run gave.
pub struct SystemRun {
    /// The kernel line.
    pub line: Line,
    /// `<package> <version>` of the kernel.
    pub kernel: String,
    /// The checks, in the order the guest reported them.
    pub checks: Vec<Check>,
    /// The scenario's `SYSVM: info` lines (`security <score>` is in the summary).
    pub infos: Vec<String>,
    /// From starting qemu until each `SYSVM: phase` line, then until `SYSVM: done`.
    pub milestones: Vec<(String, Duration)>,
    /// From starting qemu until it exited.
    pub elapsed: Duration,
    /// Why the run failed as a whole (a check, a boot, the timeout), or `None`.
    pub failure: Option<String>,
}

impl SystemRun {
    /// Checks as test counts: each check is a test, and a run that failed without a failed
    /// check (the VM did not boot, the scenario stopped early) counts one failure more.
    pub fn totals(&self) -> Totals {
        let failed = self.checks.iter().filter(|c| c.failure.is_some()).count() as u64;
        Totals {
            passed: self.checks.len() as u64 - failed,
            failed: failed + u64::from(failed == 0 && self.failure.is_some()),
            ignored: 0,
        }
    }

    /// One line for the summary.
    pub fn summary(&self) -> String {
        let totals = self.totals();
        let mut line = format!(
            "vmtest --systemd {:<4} {}: ",
            self.line.label(),
            self.kernel
        );
        for (what, at) in &self.milestones {
            let _ = write!(line, "{what} at {}s, ", at.as_secs());
        }
        let _ = write!(
            line,
            "total {}s: {} checks passed, {} failed",
            self.elapsed.as_secs(),
            totals.passed,
            totals.failed
        );
        // `systemd-analyze security`'s exposure score of the unit, as the guest saw it.
        if let Some(score) = self.infos.iter().find_map(|i| i.strip_prefix("security ")) {
            let _ = write!(line, ", unit exposure {score}");
        }
        if let Some(failure) = &self.failure {
            let _ = write!(line, ": FAILED: {failure}");
        }
        line
    }
}

/// Packages `binary` (built from the checkout if `None`) and runs the scenario in a VM per
/// line. Errors are for what keeps the runs from starting (building the image or the
/// packages); a failing boot or check is in the result.
pub fn run(
    root: &Path,
    target: &Path,
    lines: &[Line],
    binary: Option<PathBuf>,
) -> Result<Vec<SystemRun>> {
    let binary = match binary {
        Some(binary) => binary,
        None => {
            run_step(cargo(root).args(["build", "--release", "-p", "enforcer", "--bins"]))?;
            target.join("release/enforcer")
        }
    };
    let image = image::ensure()?;
    let work = Scratch::new(target.join("sysvm"))?;
    let payload = make_payload(root, &binary, &work.0)?;
    let mut runs = Vec::new();
    for &line in lines {
        let kernel = image.kernel(line)?;
        let overlay = work.0.join(format!("{}.qcow2", line.label()));
        run_step(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&image.base)
                .arg(&overlay),
        )
        .context("creating the VM's overlay of the image (qemu-img is in qemu-utils)")?;
        let log = target.join(format!("sysvm-{}.log", line.label()));
        let run = boot(kernel, &image.base, &overlay, &payload, &log);
        // The overlay holds everything the guest wrote: up to a few hundred megabytes.
        let _ = fs::remove_file(&overlay);
        runs.push(run?);
    }
    Ok(runs)
}

/// A per-run directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: PathBuf) -> Result<Scratch> {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The payload disk: both packages, the scenario and `env`.
fn make_payload(root: &Path, binary: &Path, work: &Path) -> Result<PathBuf> {
    let v1 = package::binary_version(binary)?;
    let v2 = format!("{v1}{UPGRADE_SUFFIX}");
    let debs = work.join("debs");
    let package = Package {
        binary: binary.to_path_buf(),
        packaging: root.join("packaging"),
        out: debs.clone(),
    };
    let dir = work.join("payload");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut env = String::new();
    for (n, version) in [(1, &v1), (2, &v2)] {
        let deb = package::build_as(&package, version)
            .with_context(|| format!("packaging {} as version {version}", binary.display()))?;
        let name = deb
            .file_name()
            .context("the package has no file name")?
            .to_string_lossy()
            .into_owned();
        fs::rename(&deb, dir.join(&name))
            .with_context(|| format!("moving {} to {}", deb.display(), dir.display()))?;
        let _ = writeln!(env, "DEB_V{n}={name}\nVERSION_V{n}={version}");
    }
    fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    for (name, text) in [("env", env.as_str()), (image::SCENARIO, SCENARIO)] {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let disk = work.join("payload.img");
    run_step(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", image::PAYLOAD_LABEL, "-d"])
            .arg(&dir)
            .arg(&disk)
            // Two packages of ~5 MB each, and ext4's own overhead.
            .arg("64M"),
    )
    .context("making the payload disk")?;
    Ok(disk)
}

/// qemu, killed if dropped while it still runs (an error or the timeout).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots `kernel` on `overlay` with the payload attached and follows the scenario on the
/// serial console until qemu exits (the guest powered off) or [`TIMEOUT`].
fn boot(
    kernel: &image::BootKernel,
    base: &Path,
    overlay: &Path,
    payload: &Path,
    log_path: &Path,
) -> Result<SystemRun> {
    let label = kernel.line.label();
    println!(
        "vmtest --systemd {label}: booting {} ({}) with systemd under TCG, 1 vCPU, {GUEST_MEMORY}, \
         on an overlay of {}",
        kernel.package,
        kernel.release,
        base.display()
    );
    let mut log =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let drive = |path: &Path, options: &str| {
        let mut arg = std::ffi::OsString::from("file=");
        arg.push(path);
        arg.push(options);
        arg
    };
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(vm::TCG_ARGS)
        .args(["-smp", "1", "-m", GUEST_MEMORY])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-chardev", "stdio,id=console,signal=off"])
        .args(["-serial", "chardev:console"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .args([
            "-append",
            // quiet: the kernel's boot messages cost time on an emulated serial port; the
            // scenario's output and systemd's errors still come. No rootdelay=: Debian's
            // initramfs sleeps that long unconditionally (its `init`); the image's own
            // local-top script bounds the wait for the root disk instead (see image.rs).
            "root=/dev/vda rw console=ttyS0 mitigations=off quiet",
        ])
        // cache=unsafe: the overlay is thrown away after the run; syncs only cost time.
        .arg("-drive")
        .arg(drive(overlay, ",if=virtio,format=qcow2,cache=unsafe"))
        .arg("-drive")
        .arg(drive(payload, ",if=virtio,format=raw,readonly=on"))
        // The TLS keys and certificates the scenario makes need entropy early.
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Qemu(
        qemu.spawn()
            .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?,
    );
    let (tx, lines) = mpsc::channel();
    for stream in [
        child
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            // The console is bytes, not always UTF-8, with \r\n line ends.
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\r', '\n']).replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);

    let mut run = SystemRun {
        line: kernel.line,
        kernel: kernel.package.clone(),
        checks: Vec::new(),
        infos: Vec::new(),
        milestones: Vec::new(),
        elapsed: Duration::ZERO,
        failure: None,
    };
    let mut recent: Vec<String> = Vec::new();
    let mut done = false;
    let mut stopped = None;
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stopped = Some(format!("stopped after {} minutes", TIMEOUT.as_secs() / 60));
                break;
            }
        };
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        // A marker may follow other output on the same console line.
        let Some(at) = line.find(MARKER) else {
            if line.contains("Kernel panic") {
                stopped = Some(format!("the guest kernel panicked: {line}"));
                print_tail(label, &recent, &line);
                break;
            }
            if line.trim_start().starts_with("journal: ") || line.trim_start().starts_with("diag: ")
            {
                println!("  {line}");
            }
            recent.push(line);
            continue;
        };
        let said = &line[at + MARKER.len()..];
        println!("sysvm {label} {:>4}s: {said}", start.elapsed().as_secs());
        if let Some(name) = said.strip_prefix("ok ") {
            run.checks.push(Check {
                name: name.trim().to_owned(),
                failure: None,
            });
        } else if let Some(rest) = said.strip_prefix("FAIL ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, "(no reason given)"));
            run.checks.push(Check {
                name: name.trim().to_owned(),
                failure: Some(why.to_owned()),
            });
            print_tail(label, &recent, &line);
        } else if let Some(what) = said.strip_prefix("info ") {
            run.infos.push(what.to_owned());
        } else if said.starts_with("phase ") {
            let phase = said
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            run.milestones.push((phase, start.elapsed()));
        } else if said.trim() == "done" {
            done = true;
            run.milestones.push(("done".to_owned(), start.elapsed()));
        }
        recent.clear();
    }
    drop(lines);
    if stopped.is_some() {
        print_tail(label, &recent, "(stopped)");
    }
    // After a timeout or a panic qemu still runs: dropping it kills it. Otherwise it has
    // closed its output and is exiting.
    let status = if stopped.is_none() {
        Some(child.0.wait().context("waiting for qemu")?)
    } else {
        None
    };
    drop(child);
    run.elapsed = start.elapsed();
    let failed: Vec<&str> = run
        .checks
        .iter()
        .filter(|c| c.failure.is_some())
        .map(|c| c.name.as_str())
        .collect();
    run.failure = if let Some(why) = stopped {
        Some(why)
    } else if !done {
        print_tail(label, &recent, "(qemu exited)");
        Some(format!(
            "the guest stopped before the scenario's end (qemu: {}; console in {})",
            status.map_or_else(|| "killed".to_owned(), |s| s.to_string()),
            log_path.display()
        ))
    } else if !failed.is_empty() {
        Some(format!("checks failed: {}", failed.join(", ")))
    } else {
        status
            .filter(|s| !s.success())
            .map(|s| format!("qemu exited with {s}"))
    };
    Ok(run)
}

/// Prints the console lines that led up to `last`, for a failure.
fn print_tail(label: &str, recent: &[String], last: &str) {
    if recent.is_empty() {
        return;
    }
    println!("sysvm {label}: console before that (last {TAIL} lines):");
    for line in &recent[recent.len().saturating_sub(TAIL)..] {
        println!("  | {line}");
    }
    println!("  | {last}");
}
