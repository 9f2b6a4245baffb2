//! Project tasks: `cargo xtask setup | test | demo | bench | fmt | install`; the tasks
//! themselves live in the library (`src/lib.rs`).

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use xtask::{install, setup};

/// Project tasks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask", about)]
enum Task {
    /// Install what building and testing need: apt packages, the nightly toolchain with
    /// rust-src, bpf-linker, and bpffs on /sys/fs/bpf. Idempotent.
    Setup,
    /// Run setup, then every test in release mode, one at a time (rate tests need quiet CPUs).
    Test {
        /// Passed to the test binaries, after `--test-threads=1`.
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
}

fn main() -> Result<ExitCode> {
    let root = workspace_root();
    match Task::parse() {
        Task::Setup => setup::run()?,
        Task::Test { args } => {
            setup::run()?;
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
                .args(args)
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
        Task::Demo { args } => {
            setup::run()?;
            setup::run_step(cargo(&root).args(["build", "--release", "-p", "enforcer"]))?;
            let binary = target_dir(&root).join("release/enforcer");
            // exec: the demo owns the terminal, and Ctrl-C reaches it directly.
            let err = Command::new(&binary).arg("demo").args(args).exec();
            return Err(err).with_context(|| format!("running {} demo", binary.display()));
        }
        Task::Bench { quick, args } => {
            setup::run()?;
            // One target measures everything and writes one combined result; the older
            // `dataplane` bench (in-kernel cost only) stays for focused work:
            // `cargo bench -p enforcer --bench dataplane -- --only AGENTS:PREFIXES`.
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

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// The cargo that runs xtask (so the same toolchain builds the project), in the root.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Test counts summed over every `test result:` line of cargo test.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        let count = |word: &str| {
            rest.split(';')
                .find_map(|part| {
                    part.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)
                })
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        self.passed += count("passed");
        self.failed += count("failed");
        self.ignored += count("ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn totals_sum_every_result_line() {
        let mut t = Totals::default();
        t.add("test result: ok. 86 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.36s");
        t.add("test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (88, 1, 1));
    }
}
