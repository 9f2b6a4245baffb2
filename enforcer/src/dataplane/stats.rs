//! Per-agent counters read from the pinned maps, summed by verdict, for the API's JSON and
//! the CLI's tables ([`crate::cli::table::stats`]).

use std::collections::BTreeMap;

use enforcer_common::{Counter, Reason, UNKNOWN_AGENT};
use serde::{Deserialize, Serialize};

use crate::dataplane::{KernelMaps, MapsError};

/// One agent's counters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStats {
    /// Agent id (0 = traffic from no known agent).
    pub id: u32,
    /// Agent name from the applied policy, if known.
    pub name: String,
    /// Packets and bytes per reason, by reason name; reasons never seen are omitted.
    pub reasons: BTreeMap<String, ReasonCount>,
    /// Packets passed (all pass reasons, including monitor-mode would-drops).
    pub passed_packets: u64,
    /// Packets dropped.
    pub dropped_packets: u64,
    /// The agent's circuit breaker now (`closed`, `open`, `half_open`); absent for agents
    /// without one, and when read from the pins without a daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
}

/// Packets and bytes for one reason.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonCount {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames).
    pub bytes: u64,
}

/// Collects every active agent's counters (and the unknown agent's); `names` maps ids to
/// names from the applied policy.
pub fn collect(
    maps: &KernelMaps,
    names: &BTreeMap<u32, String>,
) -> Result<Vec<AgentStats>, MapsError> {
    Ok(maps
        .all_counters()?
        .into_iter()
        .map(|(id, counters)| summarize(id, names, &counters))
        .collect())
}

fn summarize(id: u32, names: &BTreeMap<u32, String>, counters: &[Counter]) -> AgentStats {
    let name = if id == UNKNOWN_AGENT {
        "(unknown)".to_string()
    } else {
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("agent-{id}"))
    };
    let mut stats = AgentStats {
        id,
        name,
        reasons: BTreeMap::new(),
        passed_packets: 0,
        dropped_packets: 0,
        breaker: None,
    };
    for reason in Reason::ALL {
        let c = counters[reason as usize];
        if c.packets == 0 {
            continue;
        }
        if reason.is_drop() {
            stats.dropped_packets += c.packets;
        } else {
            stats.passed_packets += c.packets;
        }
        stats.reasons.insert(
            reason.name().to_string(),
            ReasonCount {
                packets: c.packets,
                bytes: c.bytes,
            },
        );
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_splits_pass_and_drop_and_names_agents() {
        let mut counters = [Counter::default(); Reason::COUNT as usize];
        counters[Reason::Allowed as usize] = Counter {
            packets: 5,
            bytes: 500,
        };
        counters[Reason::MonitorEgressDenied as usize] = Counter {
            packets: 2,
            bytes: 120,
        };
        counters[Reason::RateLimitedBytes as usize] = Counter {
            packets: 3,
            bytes: 4500,
        };
        let names = BTreeMap::from([(7, "coder".to_string())]);
        let s = summarize(7, &names, &counters);
        assert_eq!(s.name, "coder");
        assert_eq!(s.passed_packets, 7);
        assert_eq!(s.dropped_packets, 3);
        assert_eq!(s.reasons.len(), 3);
        assert_eq!(summarize(0, &names, &counters).name, "(unknown)");
        assert_eq!(summarize(9, &names, &counters).name, "agent-9");
    }
}
