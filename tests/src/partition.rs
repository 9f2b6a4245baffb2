//! Network partitions on loopback, for tests of a cluster whose members listen on
//! different loopback aliases (127.0.0.x): an nftables table that drops every packet sent to
//! one of them, deleted on [`LoopbackPartition::heal`] or on drop, also when a test panics.
//!
//! Dropping at the output hook cuts both directions of every TCP connection with that
//! address (its SYNs and its ACKs are both sent to it), while leaving 127.0.0.1, and so the
//! rest of the machine, alone. Needs root (`CAP_NET_ADMIN`); tests gate on
//! `enforcer::lab::require_root`.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
};

/// The nftables command-line tool (Debian's nftables, which `cargo xtask setup` installs).
const NFT: &str = "nft";

/// Packets to one loopback alias are dropped while this lives.
#[derive(Debug)]
pub struct LoopbackPartition {
    table: String,
    addr: Ipv4Addr,
    healed: bool,
}

impl LoopbackPartition {
    /// Adds a table `inet enforcer_test_part_<pid>_<n>` whose output-hook chain drops
    /// packets to `addr`, a loopback alias other than 127.0.0.1 (dropping that would cut
    /// off everything else on the machine). Panics with nft's message if it fails.
    pub fn drop_to(addr: Ipv4Addr) -> Self {
        static TABLES: AtomicU64 = AtomicU64::new(0);
        assert!(
            addr.is_loopback() && addr != Ipv4Addr::LOCALHOST,
            "a loopback partition drops packets to a 127.0.0.x alias other than 127.0.0.1, not {addr}"
        );
        let table = format!(
            "enforcer_test_part_{}_{}",
            std::process::id(),
            TABLES.fetch_add(1, Ordering::Relaxed)
        );
        // Priority 0 (filter); a table of its own, so nothing else's rules are touched and
        // deleting the table undoes everything.
        nft_script(&format!(
            "table inet {table} {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\tip daddr {addr} drop\n\
             \t}}\n\
             }}\n"
        ));
        Self {
            table,
            addr,
            healed: false,
        }
    }

    /// The address packets are dropped to.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The nftables table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table: packets to the address flow again. Panics with nft's message if
    /// the table cannot be deleted.
    pub fn heal(mut self) {
        nft_script(&format!("delete table inet {}\n", self.table));
        // Only now: if nft failed, the drop while unwinding tries once more.
        self.healed = true;
    }
}

impl Drop for LoopbackPartition {
    fn drop(&mut self) {
        if !self.healed {
            let _ = Command::new(NFT)
                .args(["delete", "table", "inet", &self.table])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `nft -f -` with `script` on stdin; panics with what nft printed if it fails.
fn nft_script(script: &str) {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{NFT} -f -` (is nftables installed?): {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .unwrap_or_else(|e| panic!("writing the script to `{NFT} -f -`: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for `{NFT} -f -`: {e}"));
    assert!(
        out.status.success(),
        "`{NFT} -f -` failed ({}): {}\nscript:\n{script}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
