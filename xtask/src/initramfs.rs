//! The small initramfs the test VMs boot with.
//!
//! Debian's kernels build virtio, 9p and (in 6.1) the virtio console as modules, so they
//! cannot mount the root file system vmtest shares over 9p, nor reach its guest agent,
//! without loading those first. The initramfs holds a static busybox, those modules in
//! dependency order and an `/init` that loads them, mounts the 9p root and hands over to the
//! init vmtest named on the kernel command line (`init=`).

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};

/// Modules the guest needs before its root file system exists: the virtio PCI transport,
/// the console the guest agent talks over, and 9p over virtio for the root. Whichever of
/// them a kernel builds in is skipped; dependencies (netfs, fscache, virtio_ring, ...) come
/// from `modules.dep`.
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_console", "9pnet_virtio", "9p"];

/// `/init`: a busybox shell script. Failing here exits PID 1, the kernel panics, and with
/// vmtest's `panic=-1` and `-no-reboot` qemu exits, so a broken initramfs shows as a boot
/// failure with this script's message at the end of the boot log.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
die() {
    echo "initramfs: $*"
    exit 1
}
$bb mount -t proc proc /proc || die "cannot mount /proc"
for module in $($bb cat /modules/order); do
    $bb insmod "/modules/$module" || die "insmod $module failed"
done
# vmtest passes its init script and the 9p options on the kernel command line.
init=
flags=trans=virtio
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
        init=*) init="${arg#init=}" ;;
        rootflags=*) flags="${arg#rootflags=}" ;;
    esac
done
[ -n "$init" ] || die "no init= on the kernel command line"
# The 9p channel appears once virtio_pci has probed the device, which may lag insmod.
tries=0
until $bb mount -t 9p -o "$flags" /dev/root /root; do
    tries=$((tries + 1))
    [ "$tries" -lt 50 ] || die "cannot mount the 9p root (tag /dev/root)"
    $bb sleep 0.1
done
$bb umount /proc
exec $bb switch_root /root "$init"
"#;

/// The module files to load for `roots`, dependencies first, as paths relative to the
/// kernel's module directory. `modules_dep` is that directory's `modules.dep` (as `depmod`
/// writes it), `modules_builtin` its `modules.builtin`; a root built into the kernel is
/// skipped, one found in neither is an error naming `kernel`.
pub fn module_load_order(
    kernel: &str,
    modules_dep: &str,
    modules_builtin: &str,
    roots: &[&str],
) -> Result<Vec<String>> {
    let mut deps: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut by_name: HashMap<String, &str> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((module, needs)) = line.split_once(':') else {
            continue;
        };
        deps.insert(module, needs.split_whitespace().collect());
        by_name.insert(module_name(module), module);
    }
    let builtin: HashSet<String> = modules_builtin.lines().map(module_name).collect();

    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for root in roots {
        let name = root.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let Some(path) = by_name.get(&name) else {
            bail!("module {root} is neither built into {kernel} nor listed in its modules.dep");
        };
        visit(path, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// Depth-first: a module's dependencies are pushed before it.
fn visit<'a>(
    module: &'a str,
    deps: &HashMap<&'a str, Vec<&'a str>>,
    seen: &mut HashSet<&'a str>,
    order: &mut Vec<String>,
) {
    if !seen.insert(module) {
        return;
    }
    for dep in deps.get(module).into_iter().flatten() {
        visit(dep, deps, seen, order);
    }
    order.push(module.to_owned());
}

/// `kernel/fs/9p/9p.ko.xz` -> `9p`; the kernel treats `-` and `_` in names alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A cpio archive in the "newc" format the kernel unpacks an initramfs from
/// (`Documentation/driver-api/early-userspace/buffer-format.rst`). Written here rather than
/// by cpio(1) so that device nodes need no mknod on the host and nothing is staged on disk.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    /// A directory (`name` without a leading slash).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let name_size = name.len() + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040_000 != 0 { 2 } else { 1 },
            0, // mtime: fixed, so the same inputs give the same bytes
            data.len() as u32,
            0, // device of the archived file: irrelevant here
            0,
            rdev.0,
            rdev.1,
            name_size as u32,
            0, // checksum, unused by "070701"
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header plus name, and file data, each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
";
    const BUILTIN: &str =
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n";

    #[test]
    fn dependencies_load_first_once_and_builtins_are_skipped() {
        let order = module_load_order(
            "test",
            DEP,
            BUILTIN,
            &["virtio_pci", "9pnet_virtio", "9p", "virtio-rng"],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/drivers/virtio/virtio_ring.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
            ]
        );
    }

    #[test]
    fn a_missing_module_is_named() {
        let err = module_load_order("6.1.0-1-amd64", DEP, BUILTIN, &["virtiofs"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module virtiofs is neither built into 6.1.0-1-amd64 nor listed in its modules.dep"
        );
    }

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("dev");
        cpio.char_device("dev/console", 0o600, 5, 1);
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        // First header: inode 1, a directory, named "dev" (4 bytes with its NUL).
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert!(header.starts_with("07070100000001000041ed"), "{header}");
        assert_eq!(&header[94..102], "00000004");
        assert_eq!(&bytes[110..114], b"dev\0");
        // The console node carries its device numbers in rdevmajor/rdevminor.
        // "dev\0" ends at 114, padded to 116.
        let console = &bytes[116..];
        let console = std::str::from_utf8(&console[..110]).unwrap();
        assert!(console.starts_with("070701"), "{console}");
        assert_eq!(&console[14..22], "00002180");
        assert_eq!(&console[78..94], "0000000500000001");
        // The file's data follows its padded name, and the archive ends with the trailer.
        let at = bytes.windows(10).position(|w| w == b"#!/bin/sh\n").unwrap();
        assert_eq!(at % 4, 0);
        // Trailer name (11 bytes with its NUL) after the 110-byte header, padded to 124.
        assert_eq!(&bytes[bytes.len() - 14..], b"TRAILER!!!\0\0\0\0");
    }
}
