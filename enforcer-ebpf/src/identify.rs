//! Stage 2, identify: which agent sent the packet (interface, then exact source address,
//! then source prefix) and its policy in the active slot.

use aya_ebpf::maps::{Array, lpm_trie::Key};
use enforcer_common::{
    AGENT_ACTIVE, AgentPolicy, HostV4Key, HostV6Key, LpmV4, LpmV6, OWNER_BITS, RuleSet,
    SLOT_SRC_LPM_V4, SLOT_SRC_LPM_V6, TABLE_SRC_V4, TABLE_SRC_V6, TABLE_WAYS, TableBucket,
    TableConfig, UNKNOWN_AGENT, src_key_v4, src_key_v6, table_bucket,
};

use crate::{egress::*, maps::*, names::*};

/// An address family's side of agent identification and of the destination lookup.
pub(crate) trait Family: NameAddr {
    /// [`SlotConfig::flags`]: the slot has source prefixes of this family.
    const SLOT_SRC_LPM: u32;
    /// The agent whose exact source address this is: the slot's source table, then its
    /// overflow hash map when the table says so.
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32;
    /// The agent of the slot's longest source prefix holding this address.
    fn prefix_agent(&self, slot: u32) -> u32;
    /// The rules of the agent's longest destination prefix holding this address.
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet>;
}

impl Family for [u8; 4] {
    const SLOT_SRC_LPM: u32 = SLOT_SRC_LPM_V4;

    #[inline(always)]
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32 {
        let (agent, overflow) =
            table_probe(&SRC_TABLE_V4, slot, tables, TABLE_SRC_V4, src_key_v4(*self));
        if agent != UNKNOWN_AGENT || !overflow {
            return agent;
        }
        let key = HostV4Key { slot, addr: *self };
        // SAFETY: plain u32 value, copied out.
        unsafe { SRC_HOST_V4.get(&key) }.map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn prefix_agent(&self, slot: u32) -> u32 {
        let key = Key::new(
            OWNER_BITS + 32,
            LpmV4 {
                owner: slot.to_be_bytes(),
                addr: *self,
            },
        );
        SRC_V4.get(&key).map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet> {
        dst_v4(slot, agent, policy, tables, *self)
    }
}

impl Family for [u8; 16] {
    const SLOT_SRC_LPM: u32 = SLOT_SRC_LPM_V6;

    #[inline(always)]
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32 {
        let (agent, overflow) =
            table_probe(&SRC_TABLE_V6, slot, tables, TABLE_SRC_V6, src_key_v6(*self));
        if agent != UNKNOWN_AGENT || !overflow {
            return agent;
        }
        let key = HostV6Key { slot, addr: *self };
        // SAFETY: plain u32 value, copied out.
        unsafe { SRC_HOST_V6.get(&key) }.map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn prefix_agent(&self, slot: u32) -> u32 {
        let key = Key::new(
            OWNER_BITS + 128,
            LpmV6 {
                owner: slot.to_be_bytes(),
                addr: *self,
            },
        );
        SRC_V6.get(&key).map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet> {
        dst_v6(slot, agent, policy, tables, *self)
    }
}

/// The value of `key` in the slot's table `which` (see [`TableBucket`]), 0 if it is not
/// there, and whether a miss must also look in the table's overflow hash map (always, for a
/// slot without the table: one written before tables existed has only the hash maps).
#[inline(always)]
pub(crate) fn table_probe<const W: usize>(
    table: &Array<TableBucket<W>>,
    slot: u32,
    tables: Option<&TableConfig>,
    which: usize,
    key: [u64; W],
) -> (u32, bool) {
    let Some(t) = tables else {
        return (0, true);
    };
    let bits = t.bits[which];
    if bits == 0 {
        return (0, true);
    }
    let index = (table_bucket(&key, t.seeds[which], bits) << 1) | slot;
    // Only an index beyond the map (a table the daemon sized wrongly) fails: the overflow
    // map then decides alone.
    let Some(bucket) = table.get(index) else {
        return (0, true);
    };
    for way in 0..TABLE_WAYS {
        let value = bucket.values[way];
        // Differences folded into one word: compared with `==` (a chain of compares), the
        // 3-word IPv6 destination keys became a call to a byte-by-byte `memcmp`.
        let mut diff = 0;
        for word in 0..W {
            diff |= bucket.keys[way][word] ^ key[word];
        }
        if value != 0 && diff == 0 {
            return (value, false);
        }
    }
    (0, bucket.overflow != 0)
}

/// The agent's policy in this slot, if `agent` is a configured agent.
#[inline(always)]
pub(crate) fn agent_policy(slot: u32, stride: u32, agent: u32) -> Option<&'static AgentPolicy> {
    if agent == UNKNOWN_AGENT {
        return None;
    }
    let policy = AGENTS.get(slot * stride + agent)?;
    if policy.flags & AGENT_ACTIVE == 0 {
        return None;
    }
    Some(policy)
}
