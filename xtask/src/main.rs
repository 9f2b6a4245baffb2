//! Project tasks: `cargo xtask setup | test | vmtest | demo | bench | fmt | install | package`; the
//! tasks themselves live in the library (`src/lib.rs`).

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use xtask::{Totals, cargo, install, package, setup, sysvm, target_dir, vm};

/// Project tasks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask", about)]
enum Task {
    /// Install what building and testing need: apt packages, the nightly toolchain with
    /// rust-src, bpf-linker, and bpffs on /sys/fs/bpf. Idempotent.
    Setup,
    /// Run setup, then every test in release mode, one at a time (rate tests need quiet CPUs),
    /// the quick benchmark, and `vmtest` (the test files, then `--systemd`) on every kernel.
    Test {
        /// Passed to the test binaries, after `--test-threads=1`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run setup, then the integration tests inside VMs booting Debian's 6.1 and 6.12
    /// kernels (which have kTLS), under TCG: every test of each test file, `#[ignore]`d ones
    /// included. Kernels are downloaded and cached under target/vmtest/.
    Vmtest {
        /// Boot only this kernel line (repeat for several); all of them by default.
        #[arg(long = "kernel", value_enum)]
        kernels: Vec<vm::Line>,
        /// Run this test file (tests/tests/NAME.rs; repeat for several) instead of the
        /// default list, `xtask::vm::VM_TESTS`.
        #[arg(long = "test", value_name = "NAME", conflicts_with = "systemd")]
        tests: Vec<String>,
        /// Instead of the test files: boot a whole Debian 12 system with systemd as PID 1,
        /// install the .deb with apt and check the service with real traffic across reload,
        /// restart, stop, upgrade, a control plane and a reboot (xtask/guest/systemd-vm.sh).
        /// The image is cached in /var/cache/enforcer-xtask (or $XDG_CACHE_HOME).
        #[arg(long)]
        systemd: bool,
        /// With --systemd: package this enforcer binary instead of building one.
        #[arg(long, value_name = "PATH", requires = "systemd")]
        binary: Option<PathBuf>,
        /// Passed to the test binaries after `--include-ignored --test-threads=1` (a test
        /// name filter, for example).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run setup, build the enforcer and run its demo.
    Demo {
        /// Passed to `enforcer demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run setup, then the comparison benchmark (in-kernel cost, packet path against
    /// nftables, iptables and xdp-filter, rate accuracy, policy scale, daemon overhead):
    /// bench/results/<date>-<host>[-quick].{json,md} and SVG plots.
    Bench {
        /// Fewer sizes, rounds and shorter windows (under 2 minutes): what CI runs so the
        /// harness cannot rot. The full run is for people, on a quiet machine.
        #[arg(long)]
        quick: bool,
        /// Passed to the benchmark (e.g. `--sections live,accuracy`, `--out DIR`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Format the workspace with nightly rustfmt (rustfmt.toml uses unstable options).
    Fmt {
        /// Only check; fail if a file would change.
        #[arg(long)]
        check: bool,
    },
    /// Build the release binary and install it as a systemd service: the binary, the unit,
    /// and (never overwriting existing ones) the default configuration and policy.
    /// Idempotent. Reloads systemd when installing to / on a machine that runs it.
    Install {
        /// Install under this directory instead of the live system (for images, packages
        /// and tests); systemd is then left alone.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Build the release binary and a Debian package of it (binary, unit, default
    /// configuration as conffiles, man pages, completions): target/package/enforcer_*.deb.
    Package {
        /// Directory for the .deb (default: target/package).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<ExitCode> {
    let root = workspace_root();
    match Task::parse() {
        Task::Setup => setup::run(&root)?,
        Task::Test { args } => {
            setup::run(&root)?;
            // The traffic tests run the real `enforcer` binary, which `cargo test` does not
            // build for another package's tests.
            let built = cargo(&root)
                .args(["build", "--release", "--bins"])
                .status()
                .context("starting cargo build")?;
            if !built.success() {
                return Ok(ExitCode::from(built.code().unwrap_or(1).clamp(1, 255) as u8));
            }
            // The default members: every crate but the eBPF one, which only builds for the
            // BPF target (enforcer/build.rs builds it, so its code is still under test).
            // Output is passed through as it comes and the per-binary results are summed.
            let mut child = cargo(&root)
                .args(["test", "--release", "--", "--test-threads=1"])
                .args(&args)
                .stdout(Stdio::piped())
                .spawn()
                .context("starting cargo test")?;
            let mut totals = Totals::default();
            let stdout = child.stdout.take().context("cargo test's stdout")?;
            for line in BufReader::new(stdout).lines() {
                let line = line.context("reading cargo test's output")?;
                println!("{line}");
                totals.add(&line);
            }
            let status = child.wait().context("waiting for cargo test")?;
            if status.success() {
                // The benchmark harness runs too, in its quick mode, so it cannot rot; its
                // numbers are not judged here (never a wall-clock threshold in a test).
                let mut bench = cargo(&root);
                bench.args([
                    "bench", "-p", "enforcer", "--bench", "compare", "--", "--quick",
                ]);
                let bench_ok = bench
                    .status()
                    .context("starting the quick benchmark")?
                    .success();
                println!(
                    "quick benchmark: {}",
                    if bench_ok { "ran" } else { "FAILED" }
                );
                if !bench_ok {
                    totals.failed += 1;
                }
            }
            if status.success() && totals.failed == 0 {
                // The tests that need a kernel feature the host lacks, on every kernel line,
                // with the same test arguments (a name filter reaches the VM tests too).
                match vm::run(
                    &root,
                    &target_dir(&root),
                    vm::Line::ALL,
                    &default_vm_tests(),
                    &args,
                ) {
                    Ok(runs) => {
                        totals.failed += vm_summary(&runs);
                        for run in &runs {
                            totals.merge(run.totals);
                        }
                    }
                    Err(e) => {
                        println!("vmtest: FAILED: {e:#}");
                        totals.failed += 1;
                    }
                }
                // The package as an operator installs it, on a whole system with systemd.
                match sysvm::run(&root, &target_dir(&root), vm::Line::ALL, None) {
                    Ok(runs) => totals.merge(sysvm_summary(&runs)),
                    Err(e) => {
                        println!("vmtest --systemd: FAILED: {e:#}");
                        totals.failed += 1;
                    }
                }
            }
            // One plain closing line for CI, after everything else.
            println!(
                "tests: {} passed, {} failed, {} skipped",
                totals.passed, totals.failed, totals.ignored
            );
            let code = if status.success() && totals.failed == 0 {
                0
            } else {
                status.code().unwrap_or(1).clamp(1, 255)
            };
            return Ok(ExitCode::from(code as u8));
        }
        Task::Vmtest {
            kernels,
            tests,
            systemd,
            binary,
            args,
        } => {
            setup::run(&root)?;
            let lines = if kernels.is_empty() {
                vm::Line::ALL.to_vec()
            } else {
                kernels
            };
            if systemd {
                let runs = sysvm::run(&root, &target_dir(&root), &lines, binary)?;
                let totals = sysvm_summary(&runs);
                println!(
                    "vmtest --systemd: {} passed, {} failed",
                    totals.passed, totals.failed
                );
                return Ok(if runs.iter().any(|run| run.failure.is_some()) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                });
            }
            let tests = if tests.is_empty() {
                default_vm_tests()
            } else {
                tests
            };
            let runs = vm::run(&root, &target_dir(&root), &lines, &tests, &args)?;
            let failed = vm_summary(&runs);
            let mut totals = Totals::default();
            for run in &runs {
                totals.merge(run.totals);
            }
            println!(
                "vmtest: {} passed, {} failed, {} skipped",
                totals.passed,
                totals.failed + failed,
                totals.ignored
            );
            if runs.iter().any(|run| run.failure.is_some()) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::Demo { args } => {
            setup::run(&root)?;
            setup::run_step(cargo(&root).args(["build", "--release", "-p", "enforcer"]))?;
            let binary = target_dir(&root).join("release/enforcer");
            // exec: the demo owns the terminal, and Ctrl-C reaches it directly.
            let err = Command::new(&binary).arg("demo").args(args).exec();
            return Err(err).with_context(|| format!("running {} demo", binary.display()));
        }
        Task::Bench { quick, args } => {
            setup::run(&root)?;
            // One target measures everything and writes one combined result. For focused
            // work on the program: `-- --sections inkernel --only AGENTS:PREFIXES --rounds N`.
            let mut bench = cargo(&root);
            bench.args(["bench", "-p", "enforcer", "--bench", "compare", "--"]);
            if quick {
                bench.arg("--quick");
            }
            bench.args(args);
            setup::run_step(&mut bench)?;
        }
        Task::Fmt { check } => {
            setup::ensure_nightly()?;
            setup::ensure_nightly_component("rustfmt")?;
            // `+nightly` is understood by rustup's `cargo` proxy, not by the toolchain's
            // cargo binary in $CARGO, so this one goes through PATH.
            let mut fmt = Command::new("cargo");
            fmt.current_dir(&root).args(["+nightly", "fmt", "--all"]);
            if check {
                fmt.arg("--check");
            }
            let status = fmt.status().context("starting cargo +nightly fmt")?;
            if !status.success() {
                bail!(if check {
                    "formatting differs: run `cargo xtask fmt`"
                } else {
                    "cargo +nightly fmt failed"
                });
            }
        }
        Task::Install { root: dest } => {
            setup::run_step(cargo(&root).args(["build", "--release", "-p", "enforcer"])).context(
                "building the enforcer (on a fresh machine, run `cargo xtask setup` first)",
            )?;
            install::install_files(&install::Install {
                root: dest.clone(),
                binary: target_dir(&root).join("release/enforcer"),
                packaging: root.join("packaging"),
            })?;
            install::activate(&dest)?;
        }
        Task::Package { out } => {
            setup::run(&root)?;
            setup::run_step(cargo(&root).args(["build", "--release", "-p", "enforcer"]))?;
            let deb = package::build(&package::Package {
                binary: target_dir(&root).join("release/enforcer"),
                packaging: root.join("packaging"),
                out: out.unwrap_or_else(|| target_dir(&root).join("package")),
            })?;
            println!("package: {}", deb.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: xtask's manifest lives one directory below it.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

fn default_vm_tests() -> Vec<String> {
    vm::VM_TESTS.iter().map(|t| (*t).to_owned()).collect()
}

/// Prints one line per kernel of `vmtest --systemd` and returns its checks as test counts.
fn sysvm_summary(runs: &[sysvm::SystemRun]) -> Totals {
    let mut totals = Totals::default();
    for run in runs {
        println!("{}", run.summary());
        totals.merge(run.totals());
    }
    totals
}

/// Prints one line per kernel and returns how many kernels failed for a reason their test
/// counts do not show (the VM did not boot, the guest setup failed, a binary did not report).
fn vm_summary(runs: &[vm::KernelRun]) -> u64 {
    let mut unaccounted = 0;
    for run in runs {
        println!("{}", run.summary());
        if run.failure.is_some() && run.totals.failed == 0 {
            unaccounted += 1;
        }
    }
    unaccounted
}
