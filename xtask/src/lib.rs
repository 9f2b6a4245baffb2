//! The tasks behind `cargo xtask`, as a library so that the integration tests can run
//! `install` against a scratch root without going through cargo.
//!
//! xtask does not depend on the `enforcer` crate: it has to build on a fresh machine, before
//! `setup` has installed bpf-linker, which building `enforcer` needs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub mod initramfs;
pub mod install;
pub mod package;
pub mod setup;
pub mod sysvm;
pub mod vm;

/// The workspace's target directory.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// The cargo that runs xtask (so the same toolchain builds the project), in `root`.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Test counts summed over every `test result:` line of cargo test (or of a test binary).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests that were ignored (skipped).
    pub ignored: u64,
}

impl Totals {
    /// Adds the counts of `line` if it is a `test result:` line.
    pub fn add(&mut self, line: &str) {
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

    /// Adds another set of counts.
    pub fn merge(&mut self, other: Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
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
