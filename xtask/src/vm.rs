//! `cargo xtask vmtest`: the integration tests inside VMs booting Debian's 6.1 and 6.12
//! kernels, which have kTLS (the host kernel may not).
//!
//! How a run goes, per kernel:
//! - the newest `linux-image-<line>-amd64-unsigned` package apt knows is downloaded and
//!   unpacked under `target/vmtest/<package>/` (cached: a later run reuses it), and `depmod`
//!   indexes its modules;
//! - an initramfs loads the virtio and 9p modules Debian builds as modules (see
//!   [`crate::initramfs`]), then hands over to vmtest's init, which shares the host's root
//!   file system into the guest over 9p and runs the guest agent;
//! - [vmtest](https://github.com/danobi/vmtest) boots it in qemu under TCG on one vCPU (KVM
//!   cannot boot these kernels on the machines this project runs on, and multi-threaded TCG
//!   on two vCPUs crashed once in 43 boots), and runs `guest.sh` as root in the guest: it
//!   points the kernel's module loader at the package's modules (so `TCP_ULP "tls"`, veth and
//!   crypto modules load on demand), brings loopback up, mounts bpffs and a tmpfs for TMPDIR,
//!   then runs each test binary of [`VM_TESTS`] with `--include-ignored`;
//! - a boot that fails (qemu or the guest kernel dies, the guest agent never answers) is
//!   retried once; a failing test is not.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use cargo_metadata::{Message, TargetKind};

use crate::{
    Totals, cargo,
    initramfs::{self, BOOT_MODULES, Cpio},
    setup::{probe, probe_bytes, run_step},
};

/// The test files (`tests/tests/<name>.rs`) run in each VM, every test in them: the
/// `#[ignore]`d ones, which need a kernel feature the host lacks, and the others, so those
/// are checked on older kernels too. Add a file here when it gains VM-only tests; keep the
/// list short, TCG is slow: `vm` (kTLS, BPF on the guest kernel) and `packets` (the packet
/// table through BPF_PROG_TEST_RUN: the verifier of each kernel accepts the program and it
/// decides the same) take about a minute per kernel; `ktls_proxy` (the proxy on kernel
/// TLS through the daemon) about five. `ktls` (the transport alone and the record layers
/// measured side by side, in process) runs on demand: `cargo xtask vmtest --test ktls`.
pub const VM_TESTS: &[&str] = &["vm", "packets", "ktls_proxy"];

/// The vmtest release `cargo xtask setup` installs (builds with rustc 1.95 and `--locked`).
pub const VMTEST_VERSION: &str = "0.18.0";

/// Guest memory: the tests load BPF objects with maps sized for thousands of agents.
const GUEST_MEMORY: &str = "2G";

/// vmtest's exit code when the VM could not run the command (sysexits' EX_UNAVAILABLE):
/// qemu or the guest kernel died, or the guest agent never answered.
const VM_UNAVAILABLE: i32 = 69;

/// A boot that takes longer than this is stuck, as is a test run: the whole suite takes a
/// few minutes per kernel under TCG, and CI's limit for everything is 90 minutes.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// vmtest prints this heading when the guest is up and the command starts.
const COMMAND_HEADING: &str = "===> Running command";

/// What `guest.sh` prints once the guest is set up, before the tests.
const KERNEL_MARKER: &str = "vmtest-guest: kernel ";

/// A Debian kernel line the VMs boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Line {
    /// Linux 6.1, bookworm's own kernel (`linux-image-6.1.0-<abi>-amd64-unsigned`).
    #[value(name = "6.1")]
    V6_1,
    /// Linux 6.12, the newer kernel bookworm carries (`linux-image-6.12.<n>+deb12-amd64-unsigned`).
    #[value(name = "6.12")]
    V6_12,
}

impl Line {
    /// Every line, oldest first: the default of `cargo xtask vmtest`.
    pub const ALL: &[Line] = &[Line::V6_1, Line::V6_12];

    /// "6.1" or "6.12".
    pub fn label(self) -> &'static str {
        match self {
            Line::V6_1 => "6.1",
            Line::V6_12 => "6.12",
        }
    }

    /// Tests known to fail on this line, left out of its runs with the reason printed in
    /// every run (never silently): `(test file, test name or None for the whole file, why)`.
    /// Remove an entry when its cause is fixed; a run on that line then checks it again.
    pub fn excluded(self) -> &'static [(&'static str, Option<&'static str>, &'static str)] {
        match self {
            Line::V6_1 => &[],
            Line::V6_12 => &[],
        }
    }

    /// Package names of this line are `<prefix><number><suffix>`. The generic flavour: the
    /// `cloud` one has no 9p, `rt` is another scheduler; `-unsigned` because the signed
    /// package only wraps it for Secure Boot.
    fn package_pattern(self) -> (&'static str, &'static str) {
        match self {
            Line::V6_1 => ("linux-image-6.1.0-", "-amd64-unsigned"),
            Line::V6_12 => ("linux-image-6.12.", "+deb12-amd64-unsigned"),
        }
    }
}

/// A kernel package unpacked and ready to boot.
struct Kernel {
    line: Line,
    package: String,
    version: String,
    /// `target/vmtest/<package>`.
    dir: PathBuf,
    /// The package's `uname -r`, e.g. `6.1.0-56-amd64`.
    release: String,
    vmlinuz: PathBuf,
    initramfs: PathBuf,
}

/// What one kernel's run gave.
pub struct KernelRun {
    /// The kernel line.
    pub line: Line,
    /// `<package> <version>` of the kernel.
    pub package: String,
    /// `uname -r` in the guest, if it got that far.
    pub guest_release: Option<String>,
    /// Test counts summed over the guest's `test result:` lines.
    pub totals: Totals,
    /// From starting vmtest until the command ran in the guest, of the last attempt.
    pub boot: Option<Duration>,
    /// The whole run, retries included.
    pub elapsed: Duration,
    /// Boots tried (2 when the first one failed).
    pub attempts: u32,
    /// Test files or tests left out on this line ([`Line::excluded`]).
    pub not_run: usize,
    /// Why the run failed (a test, the boot, the guest setup), or `None` if it passed.
    pub failure: Option<String>,
}

impl KernelRun {
    /// One line for the summary.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "vmtest {:<4} {}: guest {}, boot {}, total {}s: {} passed, {} failed, {} skipped",
            self.line.label(),
            self.package,
            self.guest_release.as_deref().unwrap_or("(did not start)"),
            self.boot
                .map_or_else(|| "-".to_owned(), |b| format!("{:.1}s", b.as_secs_f64())),
            self.elapsed.as_secs(),
            self.totals.passed,
            self.totals.failed,
            self.totals.ignored,
        );
        if self.not_run > 0 {
            let _ = write!(line, ", {} known failures not run", self.not_run);
        }
        if self.attempts > 1 {
            let _ = write!(line, " ({} boots)", self.attempts);
        }
        if let Some(failure) = &self.failure {
            let _ = write!(line, ": FAILED: {failure}");
        }
        line
    }
}

/// Builds the test binaries of `tests` (names of `tests/tests/*.rs`) and runs them, with
/// `args` after the harness options, in a VM for each of `lines`. Errors are for what keeps
/// the runs from starting (building, downloading); a failing VM or test is in the result.
pub fn run(
    root: &Path,
    target: &Path,
    lines: &[Line],
    tests: &[String],
    args: &[OsString],
) -> Result<Vec<KernelRun>> {
    for path in [root, target] {
        check_visible_in_guest(path)?;
    }
    // Tests that use the lab run the real daemon, which `cargo test` does not build.
    run_step(cargo(root).args(["build", "--release", "-p", "enforcer", "--bins"]))?;
    let binaries = build_tests(root, tests)?;
    let cache = target.join("vmtest");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let qemu = write_qemu_wrapper(&cache)?;

    let mut runs = Vec::new();
    for &line in lines {
        let kernel = prepare_kernel(line, &cache)?;
        runs.push(run_kernel(root, &kernel, &qemu, &binaries, args)?);
    }
    Ok(runs)
}

/// Directories the guest mounts file systems of its own on, hiding the host's: vmtest's
/// init mounts /proc, /sys, /dev and /run. (/tmp is the host's: the guest script keeps its
/// scratch space under /run, so a checkout under /tmp, where CI may clone, is visible.)
const GUEST_OWN_MOUNTS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// Stops at once, before any build, when the guest could not see `path` (the checkout or
/// its target directory) over 9p, instead of failing later inside the VM with every test
/// binary "not found".
fn check_visible_in_guest(path: &Path) -> Result<()> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    for hidden in GUEST_OWN_MOUNTS {
        ensure!(
            !path.starts_with(hidden),
            "{} is under {hidden}, which the VM guest mounts its own file system on, so the tests \
             could not be found there: clone the project (or set CARGO_TARGET_DIR) outside {}",
            path.display(),
            GUEST_OWN_MOUNTS.join(", ")
        );
    }
    Ok(())
}

/// Builds the integration-test binaries named `tests` in release and returns `(name, path)`.
fn build_tests(root: &Path, tests: &[String]) -> Result<Vec<(String, PathBuf)>> {
    ensure!(!tests.is_empty(), "no test files to run in the VM");
    let mut cmd = cargo(root);
    cmd.args([
        "test",
        "--release",
        "-p",
        "integration-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for test in tests {
        cmd.args(["--test", test]);
    }
    println!(
        "run: cargo test --release -p integration-tests --no-run --test {}",
        tests.join(" --test ")
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binaries = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        if let Message::CompilerArtifact(artifact) = message.context("reading cargo's messages")?
            && artifact.target.is_kind(TargetKind::Test)
            && let Some(exe) = artifact.executable
        {
            binaries.push((artifact.target.name, exe.into_std_path_buf()));
        }
    }
    let status = child.wait().context("waiting for cargo test --no-run")?;
    ensure!(
        status.success(),
        "building the VM test binaries failed ({status})"
    );
    // Keep the order asked for: the closing summary reads in that order.
    let mut ordered = Vec::new();
    for test in tests {
        let found = binaries
            .iter()
            .find(|(name, _)| name == test)
            .with_context(|| format!("cargo built no test binary named {test}"))?;
        ordered.push(found.clone());
    }
    Ok(ordered)
}

/// How qemu runs the test kernels: KVM cannot boot them where this project runs (nested
/// virtualisation: qemu dies on an MSR write), so TCG, single-threaded (multi-threaded TCG
/// on two vCPUs crashed once in 43 boots), on the `max` CPU model.
pub(crate) const TCG_ARGS: [&str; 4] = ["-accel", "tcg,thread=single", "-cpu", "max"];

/// vmtest passes `-enable-kvm -cpu host` whenever /dev/kvm exists, so qemu is started
/// through this script, which drops those and adds [`TCG_ARGS`].
fn write_qemu_wrapper(cache: &Path) -> Result<PathBuf> {
    let path = cache.join("qemu-tcg");
    let script = r#"#!/bin/sh
# Written by `cargo xtask vmtest`: qemu for vmtest, under TCG whatever vmtest asks for.
# vmtest adds -enable-kvm and -cpu host when /dev/kvm exists; KVM cannot boot the test
# kernels here, so both go, and single-threaded TCG on the `max` CPU model replaces them.
skip=
for arg do
    shift
    if [ -n "$skip" ]; then
        skip=
        continue
    fi
    case "$arg" in
        -enable-kvm) continue ;;
        -cpu) skip=1; continue ;;
    esac
    set -- "$@" "$arg"
done
exec qemu-system-x86_64 "$@" TCG_ARGS
"#
    .replace("TCG_ARGS", &TCG_ARGS.join(" "));
    write_executable(&path, &script)?;
    Ok(path)
}

/// Downloads and unpacks the newest package of `line` (unless the cache has it), indexes
/// its modules and builds the initramfs.
fn prepare_kernel(line: Line, cache: &Path) -> Result<Kernel> {
    let package = newest_package(line)?;
    let version = candidate_version(&package)?;
    let dir = cache.join(&package);
    let root = dir.join("root");
    let stamp = dir.join("unpacked");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(version.as_str()) {
        println!("ok: {package} {version} unpacked in {}", dir.display());
    } else {
        unpack(&package, &version, &dir, &root)?;
        fs::write(&stamp, &version).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let modules = root.join("lib/modules");
    let release = single_entry(&modules)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    ensure!(vmlinuz.is_file(), "{package} has no {}", vmlinuz.display());
    let initramfs = dir.join("initramfs.cpio");
    // Rebuilt every run (milliseconds), so a change to the init script always takes effect.
    build_initramfs(&modules.join(&release), &release, &initramfs)?;
    // The kernel runs this to load a module on demand: modprobe looks under the unpacked
    // package rather than the host's /lib/modules, which the guest shares.
    write_executable(
        &dir.join("modprobe"),
        &format!(
            "#!/bin/sh\n# Written by `cargo xtask vmtest`: the guest kernel's module loader.\n\
             exec modprobe -d {} \"$@\"\n",
            sh_quote(&root.to_string_lossy())
        ),
    )?;
    Ok(Kernel {
        line,
        package,
        version,
        dir,
        release,
        vmlinuz,
        initramfs,
    })
}

/// The newest package of `line` apt knows, updating apt's lists once if it knows none.
pub(crate) fn newest_package(line: Line) -> Result<String> {
    let (prefix, suffix) = line.package_pattern();
    for attempt in 0..2 {
        if attempt == 1 {
            run_step(Command::new("apt-get").arg("update"))
                .context("updating apt package lists")?;
        }
        let names = probe(Command::new("apt-cache").args(["pkgnames", prefix]))?;
        let newest = names
            .lines()
            .filter_map(|name| {
                let number = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
                Some((number.parse::<u64>().ok()?, name))
            })
            .max();
        if let Some((_, name)) = newest {
            return Ok(name.to_owned());
        }
    }
    bail!(
        "apt knows no {prefix}N{suffix} package (Debian 12's main and security archives carry them)"
    )
}

/// The version of `package` apt would install.
pub(crate) fn candidate_version(package: &str) -> Result<String> {
    let show = probe(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    show.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache show {package} names no version"))
}

/// `apt-get download`, `dpkg-deb -x`, `depmod`: the kernel image and its modules, indexed.
fn unpack(package: &str, version: &str, dir: &Path, root: &Path) -> Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // As root apt drops to its `_apt` user to download, which cannot write into target/.
    run_step(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}={version}")),
    )
    .with_context(|| format!("downloading {package} {version}"))?;
    let deb = single_entry_matching(dir, ".deb")?;
    let deb = dir.join(deb);
    run_step(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    // The image is unpacked and the package is not kept: 70-110 MB each.
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    // Debian's package ships no modules.dep: its postinst runs depmod.
    let release = single_entry(&root.join("lib/modules"))?;
    run_step(Command::new("depmod").arg("-b").arg(root).arg(&release))
        .with_context(|| format!("indexing the modules of {release}"))
}

/// The initramfs: static busybox, [`initramfs::INIT_SCRIPT`], and the modules of
/// [`BOOT_MODULES`] with their dependencies, uncompressed (busybox's insmod reads plain
/// `.ko` files; 6.12's are `.ko.xz`).
fn build_initramfs(modules: &Path, release: &str, out: &Path) -> Result<()> {
    let read = |name: &str| {
        let path = modules.join(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let order = initramfs::module_load_order(
        release,
        &read("modules.dep")?,
        &read("modules.builtin")?,
        BOOT_MODULES,
    )?;
    let busybox = Path::new("/bin/busybox");
    let busybox_bytes = fs::read(busybox)
        .with_context(|| format!("reading {} (from busybox-static)", busybox.display()))?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "root", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for /init before anything could mount devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox_bytes);
    cpio.file("init", 0o755, initramfs::INIT_SCRIPT.as_bytes());
    let mut names = String::new();
    for relative in &order {
        let path = modules.join(relative);
        let file = relative.rsplit('/').next().unwrap_or(relative);
        let (name, bytes) = if let Some(stem) = file.strip_suffix(".xz") {
            (stem, probe_bytes(Command::new("xz").arg("-dc").arg(&path))?)
        } else if file.ends_with(".ko") {
            (
                file,
                fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            )
        } else {
            bail!(
                "{}: only .ko and .ko.xz modules are handled",
                path.display()
            );
        };
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("modules/order", 0o644, names.as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// Boots `kernel` and runs `binaries` in it, retrying once if the VM itself fails.
fn run_kernel(
    root: &Path,
    kernel: &Kernel,
    qemu: &Path,
    binaries: &[(String, PathBuf)],
    args: &[OsString],
) -> Result<KernelRun> {
    let mut skips = Vec::new();
    let mut runnable = Vec::new();
    let mut not_run = 0;
    for (name, exe) in binaries {
        let excluded = kernel
            .line
            .excluded()
            .iter()
            .filter(|(file, _, _)| file == name);
        let mut whole_file = false;
        for (file, test, why) in excluded {
            not_run += 1;
            match test {
                None => whole_file = true,
                Some(test) => skips.push((*test).to_owned()),
            }
            println!(
                "vmtest {}: NOT RUN: {}: {why}",
                kernel.line.label(),
                test.map_or_else(
                    || format!("tests/tests/{file}.rs"),
                    |t| format!("{file}::{t}")
                )
            );
        }
        if !whole_file {
            runnable.push((name.clone(), exe.clone()));
        }
    }
    let binaries = &runnable[..];
    let guest = kernel.dir.join("guest.sh");
    write_executable(&guest, &guest_script(root, kernel, binaries, &skips, args))?;
    let config = kernel.dir.join("vmtest.toml");
    fs::write(&config, vmtest_config(kernel, qemu, &guest))
        .with_context(|| format!("writing {}", config.display()))?;

    println!(
        "vmtest {}: booting {} {} ({}) under TCG, 1 vCPU, {GUEST_MEMORY}",
        kernel.line.label(),
        kernel.package,
        kernel.version,
        kernel.release
    );
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = boot_once(kernel, &config)?;
        let retry = attempt.code == Some(VM_UNAVAILABLE) && attempts == 1;
        let failure = match attempt.code {
            Some(0) if attempt.results != binaries.len() => Some(format!(
                "{} of {} test binaries reported results",
                attempt.results,
                binaries.len()
            )),
            Some(0) => None,
            Some(VM_UNAVAILABLE) => Some("the VM failed (boot log above)".to_owned()),
            Some(code) if attempt.boot.is_none() => Some(format!("vmtest exited with {code}")),
            Some(_) if attempt.release.is_none() => Some("guest setup failed".to_owned()),
            Some(_) => Some("tests failed".to_owned()),
            None if attempt.timed_out => Some(format!(
                "stopped after {} minutes",
                VM_TIMEOUT.as_secs() / 60
            )),
            None => Some("vmtest was killed by a signal".to_owned()),
        };
        if retry {
            println!(
                "vmtest {}: the VM failed; booting once more",
                kernel.line.label()
            );
            continue;
        }
        return Ok(KernelRun {
            line: kernel.line,
            package: format!("{} {}", kernel.package, kernel.version),
            guest_release: attempt.release,
            totals: attempt.totals,
            boot: attempt.boot,
            elapsed: start.elapsed(),
            attempts,
            not_run,
            failure,
        });
    }
}

/// One boot's outcome.
struct Attempt {
    /// vmtest's exit code: the command's, or [`VM_UNAVAILABLE`].
    code: Option<i32>,
    timed_out: bool,
    boot: Option<Duration>,
    release: Option<String>,
    totals: Totals,
    /// How many `test result:` lines the guest printed.
    results: usize,
}

/// Runs vmtest once. The boot log is kept quiet unless the boot fails; the guest's output is
/// passed through as it comes; everything goes to `vmtest.log` beside the config.
fn boot_once(kernel: &Kernel, config: &Path) -> Result<Attempt> {
    let log_path = kernel.dir.join("vmtest.log");
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let start = Instant::now();
    let mut child = Command::new("vmtest")
        .arg("--config")
        .arg(config)
        // Plain lines instead of the terminal UI's scrolling window.
        .env("VMTEST_NO_UI", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting vmtest (run `cargo xtask setup`)")?;
    let stdout = child.stdout.take().context("vmtest's stdout")?;
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut attempt = Attempt {
        code: None,
        timed_out: false,
        boot: None,
        release: None,
        totals: Totals::default(),
        results: 0,
    };
    let mut boot_log = Vec::new();
    loop {
        let left = VM_TIMEOUT.saturating_sub(start.elapsed());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                attempt.timed_out = true;
                kill_tree(child.id());
                break;
            }
        };
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        if attempt.boot.is_none() {
            if line == COMMAND_HEADING {
                attempt.boot = Some(start.elapsed());
            } else {
                boot_log.push(line);
            }
            continue;
        }
        if let Some(release) = line.strip_prefix(KERNEL_MARKER) {
            attempt.release = Some(release.trim().to_owned());
        }
        if line.starts_with("test result: ") {
            attempt.results += 1;
        }
        attempt.totals.add(&line);
        println!("{line}");
    }
    let status = child.wait().context("waiting for vmtest")?;
    attempt.code = status.code();
    if attempt.boot.is_none() || attempt.code == Some(VM_UNAVAILABLE) {
        // Only now is the boot log worth reading: the end says why.
        const TAIL: usize = 80;
        println!(
            "vmtest {}: boot log (last {TAIL} lines; all of it in {}):",
            kernel.line.label(),
            log_path.display()
        );
        for line in &boot_log[boot_log.len().saturating_sub(TAIL)..] {
            println!("  {line}");
        }
    }
    Ok(attempt)
}

/// Kills vmtest and the qemu it started (its children), which a timeout leaves running.
fn kill_tree(pid: u32) {
    let mut pids = vec![pid.to_string()];
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(children) = fs::read_to_string(task.path().join("children")) {
                pids.extend(children.split_whitespace().map(str::to_owned));
            }
        }
    }
    let _ = Command::new("kill").arg("-KILL").args(&pids).status();
}

/// The guest's scratch directory (TMPDIR), a tmpfs of its own.
const GUEST_TMP: &str = "/run/vmtest-tmp";

/// The script the guest agent runs as root in the VM (vmtest passes our environment, so
/// `CI=true` reaches the tests).
fn guest_script(
    root: &Path,
    kernel: &Kernel,
    binaries: &[(String, PathBuf)],
    skips: &[String],
    args: &[OsString],
) -> String {
    let mut script = format!(
        r#"#!/bin/bash
# Written by `cargo xtask vmtest`: runs in the VM booting {package} {version}.
set -eu
# Modules load on demand (tls, veth, crypto) from the package, not from the host's /lib/modules.
echo {modprobe} > /proc/sys/kernel/modprobe
# The guest CPU (-cpu max) has AES-NI and PCLMULQDQ. A Debian system loads their crypto
# drivers at boot (udev, by CPU modalias), which this init does not run: load them here, so
# kernel TLS uses them as it would on a real machine.
{modprobe} aesni_intel 2>/dev/null || true
# vmtest's init leaves loopback down and bpffs unmounted.
ip link set lo up
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# /tmp is the host's over 9p, where Unix sockets do not work: the tests' scratch space
# (TMPDIR) is a tmpfs of the guest's own under /run instead. Mounting over /tmp would hide
# a checkout under /tmp, where CI may clone.
mkdir -p /run/netns {guest_tmp}
mount -t tmpfs -o mode=1777 tmpfs {guest_tmp}
export TMPDIR={guest_tmp}
echo "{KERNEL_MARKER}$(uname -r)"
set +e
# Where cargo runs integration tests from.
cd {tests_dir}
status=0
"#,
        package = kernel.package,
        version = kernel.version,
        modprobe = sh_quote(&kernel.dir.join("modprobe").to_string_lossy()),
        tests_dir = sh_quote(&root.join("tests").to_string_lossy()),
        guest_tmp = GUEST_TMP,
    );
    let mut extra: Vec<String> = args
        .iter()
        .map(|a| sh_quote(&a.to_string_lossy()))
        .collect();
    for test in skips {
        extra.push(format!("--skip {}", sh_quote(test)));
    }
    for (name, exe) in binaries {
        let _ = writeln!(
            script,
            "echo \"     Running tests/tests/{name}.rs in the VM ($(uname -r))\"\n\
             {} --include-ignored --test-threads=1 {} || status=1",
            sh_quote(&exe.to_string_lossy()),
            extra.join(" ")
        );
    }
    script.push_str("exit $status\n");
    script
}

fn vmtest_config(kernel: &Kernel, qemu: &Path, guest: &Path) -> String {
    let path = |p: &Path| toml_str(&p.to_string_lossy());
    format!(
        "# Written by `cargo xtask vmtest`.\n\
         [[target]]\n\
         name = {name}\n\
         kernel = {kernel}\n\
         # Speculation mitigations only slow an emulated CPU down; nothing here is hostile.\n\
         kernel_args = \"mitigations=off\"\n\
         qemu_command = {qemu}\n\
         command = {command}\n\
         [target.vm]\n\
         num_cpus = 1\n\
         memory = \"{GUEST_MEMORY}\"\n\
         extra_args = [\"-initrd\", {initramfs}]\n",
        name = toml_str(&format!("{} {}", kernel.package, kernel.version)),
        kernel = path(&kernel.vmlinuz),
        qemu = path(qemu),
        command = toml_str(&format!("bash {}", sh_quote(&guest.to_string_lossy()))),
        initramfs = path(&kernel.initramfs),
    )
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A word for sh: single-quoted, with embedded single quotes closed and escaped.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

/// The one entry of a directory (a kernel package has one release under lib/modules).
fn single_entry(dir: &Path) -> Result<String> {
    single_entry_matching(dir, "")
}

fn single_entry_matching(dir: &Path, suffix: &str) -> Result<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(suffix) {
            names.push(name);
        }
    }
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one entry ending in {suffix:?} in {}, found {names:?}",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    }
}
