//! The systemd VM's disk image: a Debian 12 root file system made by `mmdebstrap`, with
//! systemd as PID 1, Debian's 6.1 and 6.12 kernels and the initrds Debian's own
//! initramfs-tools made for them, packed into a raw ext4 image by `mkfs.ext4 -d` (no loop
//! mounts, so it builds in containers too).
//!
//! Building takes minutes, so the image is cached outside the checkout, in
//! `$XDG_CACHE_HOME/enforcer-xtask/sysvm/<hash>/` (or `/var/cache/enforcer-xtask/...`),
//! named by a hash of everything that goes into it: [`RECIPE`], the suite, the package list
//! with both kernels' versions, the apt sources and the files the image is customised with.
//! A change to any of them builds a new image; a half-built one is never used, because it is
//! built in a temporary directory renamed into place only when complete. Each run boots a
//! qcow2 overlay of it, so the cached image stays as built.
//!
//! The image holds only the runner ([`RUNNER`], started by [`RUNNER_UNIT`]): the scenario
//! comes on a payload disk each run, so editing it never rebuilds the image.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    setup::{probe, run_step},
    vm::{self, Line},
};

/// Bump when the recipe changes in a way [`recipe`] does not see (the code below).
const RECIPE: u32 = 2;

/// Debian 12.
const SUITE: &str = "bookworm";

/// The host's apt sources, passed to mmdebstrap as its mirror (it pastes a file it is given
/// into the guest's sources): the guest gets what the host's apt sees.
const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// Installed besides `--variant=apt`'s essentials and the kernels: systemd as PID 1 and udev
/// (which loads the virtio modules), kmod and initramfs-tools for each kernel's initrd,
/// e2fsprogs for the root file system's fsck, and what the scenario runs: ip and ss
/// (iproute2), curl for /metrics, sysctl (procps), jq for the CLI's JSON.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "initramfs-tools",
    "e2fsprogs",
    "iproute2",
    "curl",
    "procps",
    "jq",
];

/// The file system label the guest mounts the per-run payload disk by.
pub const PAYLOAD_LABEL: &str = "sysvm-payload";

/// Where the runner mounts the payload.
pub const PAYLOAD_MOUNT: &str = "/mnt/payload";

/// The scenario's file name on the payload disk.
pub const SCENARIO: &str = "systemd-vm.sh";

/// Runs the scenario once the system is up, on every boot, with its output on the serial
/// console (the host reads it there; the serial getty is masked so nothing else writes).
const RUNNER_UNIT: &str = "\
[Unit]
Description=enforcer system test runner (cargo xtask vmtest --systemd)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/enforcer-vmtest
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
";

/// Mounts the payload and runs the scenario, which ends by rebooting or powering off and
/// waiting to be stopped: if it returns instead, it stopped early, which the runner says
/// before it powers off, so the host does not wait for its timeout.
const RUNNER: &str = r#"#!/bin/sh
# Started by enforcer-vmtest.service on every boot; written by `cargo xtask vmtest --systemd`.
mkdir -p PAYLOAD_MOUNT
if ! mountpoint -q PAYLOAD_MOUNT && ! mount -o ro LABEL=PAYLOAD_LABEL PAYLOAD_MOUNT; then
    echo "SYSVM: FAIL runner: mounting the payload disk (label PAYLOAD_LABEL)"
    systemctl poweroff
    exit 1
fi
PAYLOAD=PAYLOAD_MOUNT bash PAYLOAD_MOUNT/SCENARIO
echo "SYSVM: FAIL runner: SCENARIO exited with $? before rebooting or powering off"
systemctl poweroff
"#;

/// An initramfs-tools `local-top` script, run before the initramfs looks for the root disk.
/// Its own wait is 30 s of guest uptime; under TCG on a loaded host the emulated CPU starves
/// (soft lockups of 100 s in modprobe and udev were seen) and it gave up on /dev/vda after a
/// reboot. This waits up to ten minutes, and not at all once the disk is there.
/// (`rootdelay=` is no bound: Debian's initramfs sleeps that long before it even looks.)
const WAIT_ROOT: &str = r#"#!/bin/sh
# Written by `cargo xtask vmtest --systemd`: wait up to 600 s for the virtio root disk.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
waited=0
while [ ! -b /dev/vda ] && [ "$waited" -lt 600 ]; do
    sleep 1
    waited=$((waited + 1))
done
[ "$waited" -gt 0 ] && echo "sysvm: waited ${waited}s for /dev/vda"
exit 0
"#;

/// mmdebstrap's essential hook, run on the host after the essential packages and before the
/// kernels, with the guest's root as `$1` and the runner's files as `$2`: the kernels'
/// postinst then builds initrds that hold [`WAIT_ROOT`].
const ESSENTIAL: &str = r#"#!/bin/sh
set -eu
mkdir -p "$1/etc/initramfs-tools/scripts/local-top"
install -m 0755 "$2/wait-root" "$1/etc/initramfs-tools/scripts/local-top/sysvm-wait-root"
"#;

/// mmdebstrap's customize hook, run on the host with the guest's root as `$1` and the
/// directory holding the runner's files as `$2`.
const CUSTOMIZE: &str = r#"#!/bin/sh
set -eu
root=$1
files=$2
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$root/etc/fstab"
echo sysvm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 sysvm\n' >"$root/etc/hosts"
install -m 0755 "$files/enforcer-vmtest" "$root/usr/local/sbin/enforcer-vmtest"
install -m 0644 "$files/enforcer-vmtest.service" "$root/etc/systemd/system/enforcer-vmtest.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/enforcer-vmtest.service \
    "$root/etc/systemd/system/multi-user.target.wants/enforcer-vmtest.service"
# Nothing else writes to the serial console, and nothing slow or periodic runs: timers
# that would start apt or fstrim mid-test, and waiting for a network the guest has none of.
for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
    apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer e2scrub_reap.service \
    systemd-networkd-wait-online.service systemd-timesyncd.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# A unit that hangs on stop must not hold the reboot or power-off up for 90 s.
mkdir -p "$root/etc/systemd/system.conf.d"
printf '[Manager]\nDefaultTimeoutStopSec=20s\n' >"$root/etc/systemd/system.conf.d/sysvm.conf"
"#;

/// A kernel of the image, ready to boot with `-kernel` and `-initrd`.
pub struct BootKernel {
    /// The kernel line.
    pub line: Line,
    /// `<package> <version>`.
    pub package: String,
    /// `uname -r`.
    pub release: String,
    /// The kernel image, copied out of the image's /boot.
    pub vmlinuz: PathBuf,
    /// The initrd Debian's initramfs-tools made for it in the image.
    pub initrd: PathBuf,
}

/// The cached image.
pub struct Image {
    /// The raw ext4 root file system (never written to: runs boot an overlay).
    pub base: PathBuf,
    /// Every line's kernel.
    pub kernels: Vec<BootKernel>,
}

impl Image {
    /// The kernel of `line`.
    pub fn kernel(&self, line: Line) -> Result<&BootKernel> {
        self.kernels
            .iter()
            .find(|k| k.line == line)
            .with_context(|| format!("the image has no {} kernel", line.label()))
    }
}

/// A kernel package of the recipe.
struct KernelPackage {
    line: Line,
    name: String,
    version: String,
    release: String,
}

/// Returns the cached image for the current recipe, building it first if there is none.
pub fn ensure() -> Result<Image> {
    let mut kernels = Vec::new();
    for &line in Line::ALL {
        let name = vm::newest_package(line)?;
        let version = vm::candidate_version(&name)?;
        // linux-image-6.1.0-57-amd64-unsigned installs /boot/vmlinuz-6.1.0-57-amd64.
        let release = name
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-unsigned"))
            .with_context(|| format!("{name} is not named linux-image-<release>-unsigned"))?
            .to_owned();
        kernels.push(KernelPackage {
            line,
            name,
            version,
            release,
        });
    }
    let sources = fs::read_to_string(SOURCES).with_context(|| {
        format!("reading {SOURCES} (the apt sources the guest image is built from)")
    })?;
    let recipe = recipe(&kernels, &sources);
    let cache = cache_dir();
    let dir = cache.join(format!("{:016x}", fnv1a(recipe.as_bytes())));
    let image = Image {
        base: dir.join("base.img"),
        kernels: kernels
            .iter()
            .map(|k| BootKernel {
                line: k.line,
                package: format!("{} {}", k.name, k.version),
                release: k.release.clone(),
                vmlinuz: dir.join(format!("vmlinuz-{}", k.release)),
                initrd: dir.join(format!("initrd.img-{}", k.release)),
            })
            .collect(),
    };
    if dir.is_dir() {
        println!("ok: systemd VM image cached in {}", dir.display());
        return Ok(image);
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let start = Instant::now();
    let tmp = cache.join(format!("building-{}", std::process::id()));
    let built = build(&tmp, &kernels, &recipe);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "building the systemd VM image in {}",
            tmp.display()
        )));
    }
    fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    println!(
        "systemd VM image built in {}s: {}",
        start.elapsed().as_secs(),
        dir.display()
    );
    remove_stale(&cache, &dir);
    Ok(image)
}

/// Everything that decides the image's contents, in one text: its hash names the cache
/// directory, and it is kept beside the image as `recipe.txt`.
fn recipe(kernels: &[KernelPackage], sources: &str) -> String {
    let mut text = format!("recipe {RECIPE}\nsuite {SUITE}\npackages");
    for package in PACKAGES {
        let _ = write!(text, " {package}");
    }
    for k in kernels {
        let _ = write!(text, " {}={}", k.name, k.version);
    }
    let _ = write!(
        text,
        "\npayload {PAYLOAD_LABEL} {PAYLOAD_MOUNT} {SCENARIO}\n--- {SOURCES}\n{sources}\n\
         --- essential\n{ESSENTIAL}\n--- wait-root\n{WAIT_ROOT}\n--- customize\n{CUSTOMIZE}\n--- runner\n{RUNNER}\n--- unit\n{RUNNER_UNIT}\n"
    );
    text
}

/// 64-bit FNV-1a: a stable hash for the cache's directory name (std's hasher may change
/// between Rust releases, which would rebuild the image for nothing).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `$XDG_CACHE_HOME/enforcer-xtask/sysvm`, else `/var/cache/enforcer-xtask/sysvm`: outside the
/// checkout, so a fresh clone or `cargo clean` does not rebuild the image.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache"), PathBuf::from)
        .join("enforcer-xtask/sysvm")
}

/// mmdebstrap into `tmp/root`, the kernels and initrds copied out, the ext4 image made, the
/// root tree removed.
fn build(tmp: &Path, kernels: &[KernelPackage], recipe: &str) -> Result<()> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let files = tmp.join("files");
    fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
    let runner = RUNNER
        .replace("PAYLOAD_MOUNT", PAYLOAD_MOUNT)
        .replace("PAYLOAD_LABEL", PAYLOAD_LABEL)
        .replace("SCENARIO", SCENARIO);
    for (name, text) in [
        ("enforcer-vmtest", runner.as_str()),
        ("enforcer-vmtest.service", RUNNER_UNIT),
        ("customize.sh", CUSTOMIZE),
        ("essential.sh", ESSENTIAL),
        ("wait-root", WAIT_ROOT),
    ] {
        let path = files.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let root = tmp.join("root");
    let mut include = PACKAGES.join(",");
    for k in kernels {
        let _ = write!(include, ",{}={}", k.name, k.version);
    }
    let hook = |script: &str| {
        format!(
            "sh {} \"$1\" {}",
            sh_word(&files.join(script)),
            sh_word(&files)
        )
    };
    run_step(
        Command::new("mmdebstrap")
            .args(["--variant=apt", "--mode=root", "--format=directory"])
            .arg(format!("--include={include}"))
            // Documentation is of no use in a test guest and only makes the image bigger.
            .args([
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
            ])
            .arg(format!("--essential-hook={}", hook("essential.sh")))
            .arg(format!("--customize-hook={}", hook("customize.sh")))
            .arg(SUITE)
            .arg(&root)
            .arg(SOURCES),
    )
    .context("running mmdebstrap (`cargo xtask setup` installs it)")?;
    for k in kernels {
        for name in [
            format!("vmlinuz-{}", k.release),
            format!("initrd.img-{}", k.release),
        ] {
            let from = root.join("boot").join(&name);
            ensure!(
                from.is_file(),
                "{} is missing: {} did not install a kernel and initrd (see mmdebstrap's output)",
                from.display(),
                k.name
            );
            fs::copy(&from, tmp.join(&name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    // The tree's size plus room for the packages and logs the runs write to their overlay.
    let used_mib: u64 = probe(
        Command::new("du")
            .args(["-s", "--block-size=1M"])
            .arg(&root),
    )?
    .split_whitespace()
    .next()
    .and_then(|n| n.parse().ok())
    .context("reading du's output")?;
    let size_mib = used_mib + used_mib / 4 + 512;
    let base = tmp.join("base.img");
    run_step(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "sysvm-root", "-d"])
            .arg(&root)
            .arg(&base)
            .arg(format!("{size_mib}M")),
    )
    .context("making the image's ext4 file system")?;
    fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    fs::remove_dir_all(&files).with_context(|| format!("removing {}", files.display()))?;
    let path = tmp.join("recipe.txt");
    fs::write(&path, recipe).with_context(|| format!("writing {}", path.display()))
}

/// Removes images of older recipes and builds that died half-way (each is about a
/// gigabyte), keeping `keep`. Best effort: a directory another run is building in is
/// `building-<its pid>`, left alone while that process lives.
fn remove_stale(cache: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("building-")
            && Path::new("/proc").join(pid).exists()
        {
            continue;
        }
        println!("removing the stale systemd VM image {}", path.display());
        let _ = fs::remove_dir_all(&path);
    }
}

/// A path as one sh word.
fn sh_word(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_reference() {
        // From the FNV reference test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
