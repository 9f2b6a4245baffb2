//! xdp-filter (Debian's xdp-tools 1.3.1) as a comparison point: its BPF object, loaded
//! with aya from the libxdp1 package and filled the way `xdp-filter ip` would fill it.
//!
//! The object for IPv4 + IPv6 address rules with a default-deny policy is
//! `xdpfilt_dny_ip.o` (`xdp-filter load --policy deny --features ipv4,ipv6` picks it). Its
//! maps `filter_ipv4` (u32 → u64) and `filter_ipv6` (in6_addr → u64) are per-CPU hashes
//! whose value is a mask of `MAP_FLAG_SRC` (1) and `MAP_FLAG_DST` (2), plus a hit counter
//! from bit 6 (`xdp-filter/common_kern_user.h`). Per packet it looks up the destination,
//! then the source; in deny mode a hit passes and a double miss drops.
//!
//! The object declares 10,000 entries per map; `xdp-filter` cannot hold more. To compare
//! at the enforcer's sizes the loader raises `max_entries` (the program is unchanged; a
//! hash lookup does not depend on the table's capacity).

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap, PerCpuValues},
    programs::Xdp,
};

/// Where libxdp1 installs the xdp-filter objects on Debian (amd64, then other arches).
const OBJECT_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/bpf",
    "/usr/lib/aarch64-linux-gnu/bpf",
    "/usr/lib/bpf",
];
/// The default-deny IP-rules program (and its file, without `.o`).
pub const PROGRAM: &str = "xdpfilt_dny_ip";
/// `MAP_FLAG_SRC`: the entry matches the packet's source address.
pub const FLAG_SRC: u64 = 1;
/// `MAP_FLAG_DST`: the entry matches the packet's destination address.
pub const FLAG_DST: u64 = 2;

/// The object file of `program` (e.g. `xdpfilt_dny_ip`), if libxdp1 is installed.
pub fn object_file(program: &str) -> Option<std::path::PathBuf> {
    OBJECT_DIRS
        .iter()
        .map(|d| Path::new(d).join(format!("{program}.o")))
        .find(|p| p.exists())
}

/// The default-deny object's file, if libxdp1 is installed.
pub fn object_path() -> Option<std::path::PathBuf> {
    object_file(PROGRAM)
}

/// xdp-filter's program, loaded, with room for `entries` rules per family.
pub struct XdpFilter {
    ebpf: Ebpf,
    name: &'static str,
}

impl XdpFilter {
    /// Loads the default-deny object with its maps pinned (as the object asks) under
    /// `pin_dir`, a private bpffs.
    pub fn load(pin_dir: &Path, entries: u32) -> Result<XdpFilter, String> {
        Self::load_object(pin_dir, PROGRAM, entries)
    }

    /// Loads xdp-filter's object `name` (`xdpfilt_{alw,dny}_{ip,all,...}`; the program
    /// inside has the file's name).
    pub fn load_object(
        pin_dir: &Path,
        name: &'static str,
        entries: u32,
    ) -> Result<XdpFilter, String> {
        let path =
            object_file(name).ok_or_else(|| format!("{name}.o not found: install libxdp1"))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries("filter_ipv4", entries.max(16))
            .map_max_entries("filter_ipv6", entries.max(16))
            .load_file(&path)
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no {name} program in the object"))?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load()
            .map_err(|e| format!("verifying xdp-filter: {e}"))?;
        Ok(XdpFilter { ebpf, name })
    }

    /// The program.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(self.name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in load()")
    }

    /// The program, to attach it.
    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(self.name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in load()")
    }

    /// Adds `addr` with `flags` (`FLAG_SRC`, `FLAG_DST`), as `xdp-filter ip ADDR --mode
    /// src|dst` does.
    pub fn add(&mut self, addr: IpAddr, flags: u64) -> Result<(), String> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
        let values =
            PerCpuValues::try_from(vec![flags; cpus]).map_err(|e| format!("values: {e}"))?;
        match addr {
            IpAddr::V4(a) => {
                let mut map: PerCpuHashMap<&mut MapData, u32, u64> = self
                    .ebpf
                    .map_mut("filter_ipv4")
                    .ok_or("no filter_ipv4")?
                    .try_into()
                    .map_err(|e| format!("{e}"))?;
                // The program reads the address as it sits in the packet (network order).
                map.insert(u32::from_ne_bytes(a.octets()), values, 0)
                    .map_err(|e| format!("adding {a}: {e}"))
            }
            IpAddr::V6(a) => {
                let mut map: PerCpuHashMap<&mut MapData, [u8; 16], u64> = self
                    .ebpf
                    .map_mut("filter_ipv6")
                    .ok_or("no filter_ipv6")?
                    .try_into()
                    .map_err(|e| format!("{e}"))?;
                map.insert(a.octets(), values, 0)
                    .map_err(|e| format!("adding {a}: {e}"))
            }
        }
    }

    /// Frames counted by the program's own statistics for `action` (XDP_DROP = 1,
    /// XDP_PASS = 2), summed over CPUs.
    pub fn action_count(&self, action: u32) -> u64 {
        let Some(map) = self.ebpf.map("xdp_stats_map") else {
            return 0;
        };
        let Ok(map) = aya::maps::PerCpuArray::<&MapData, [u64; 2]>::try_from(map) else {
            return 0;
        };
        map.get(&action, 0)
            .map(|v| v.iter().map(|r| r[0]).sum())
            .unwrap_or(0)
    }
}
