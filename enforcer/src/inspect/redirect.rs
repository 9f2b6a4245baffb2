//! Transparent interception: an nftables table of the daemon's own, `inet
//! enforcer_inspect`, that redirects inspected agents' TCP connections to the TLS ports to
//! the proxy. The table is replaced as a whole (one `nft -f` transaction) whenever the set
//! of inspected interfaces changes, and deleted on shutdown.
//!
//! Only IPv4 is redirected (the transparent listener is IPv4; `SO_ORIGINAL_DST` is read
//! with `SOL_IP`). IPv6 connections from inspected interfaces to the TLS ports are
//! rejected with a TCP reset instead of passing uninspected: the agent's client falls back
//! to IPv4 or fails visibly.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use thiserror::Error;

/// The table's family and name.
pub const TABLE: &str = "inet enforcer_inspect";

/// Errors running `nft`.
#[derive(Debug, Error)]
pub enum RedirectError {
    /// `nft` could not be started.
    #[error("running nft (install nftables)")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft refused the ruleset: {stderr}")]
    Refused {
        /// What nft said.
        stderr: String,
    },
}

/// The ruleset for `interfaces` and `ports`, redirecting to `to_port`; `None` when there
/// is nothing to intercept (the table is then only deleted).
pub fn ruleset(interfaces: &[String], ports: &[u16], to_port: u16) -> Option<String> {
    if interfaces.is_empty() || ports.is_empty() {
        return None;
    }
    let ifaces = interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "table {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname {{ {ifaces} }} meta nfproto ipv4 tcp dport {{ {ports} }} redirect to :{to_port}\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname {{ {ifaces} }} meta nfproto ipv6 tcp dport {{ {ports} }} reject with tcp reset\n\
         \t}}\n\
         }}\n"
    ))
}

/// Replaces the table with `ruleset` (or just deletes it for `None`), atomically.
pub fn install(ruleset: Option<&str>) -> Result<(), RedirectError> {
    // `add` then `delete` makes the delete succeed whether or not the table exists.
    let mut script = format!("add table {TABLE}\ndelete table {TABLE}\n");
    if let Some(rules) = ruleset {
        script.push_str(rules);
    }
    nft(&script)
}

/// Deletes the table if it exists.
pub fn remove() -> Result<(), RedirectError> {
    install(None)
}

fn nft(script: &str) -> Result<(), RedirectError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RedirectError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(RedirectError::Spawn)?;
    let output = child.wait_with_output().map_err(RedirectError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Refused {
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_interfaces_ports_and_target() {
        assert_eq!(ruleset(&[], &[443], 3129), None);
        assert_eq!(ruleset(&["gwa1".into()], &[], 3129), None);
        let rules = ruleset(&["gwa1".into(), "gwa2".into()], &[443, 8443], 3129).unwrap();
        assert!(
            rules.contains(
                "iifname { \"gwa1\", \"gwa2\" } meta nfproto ipv4 tcp dport { 443, 8443 } redirect to :3129"
            ),
            "{rules}"
        );
        assert!(rules.contains("reject with tcp reset"), "{rules}");
    }
}
