//! Stage 3, egress by prefix: the rules of the agent's longest destination prefix, from the
//! exact-match tables or the LPM tries, and the first rule matching protocol and port.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    ACTION_ALLOW, AGENT_DEFAULT_ALLOW, AGENT_DST_LPM_V4, AGENT_DST_LPM_V6, AgentPolicy, DstV4Key,
    DstV6Key, LpmV4, LpmV6, MAX_DST_PROBES, MAX_RULES_PER_PREFIX, OWNER_BITS, PROTO_ANY, PortRule,
    Reason, RuleSet, TABLE_DST_V4, TABLE_DST_V6, TableConfig, dst_key_v4, dst_key_v6, owner,
    owner_word,
};

use crate::{identify::*, maps::*, parse::*};

/// The rule set at `index` of the slot's part of `RULES`, as a destination table names it.
#[inline(always)]
pub(crate) fn rules_at(slot: u32, index: u32) -> Option<&'static RuleSet> {
    RULES.get((index << 1) | slot)
}

/// The rules of the longest of the agent's IPv4 destination prefixes that contains `dst`.
/// A few hash probes (one per prefix length the agent uses, longest first) cost less than
/// an LPM walk whose depth grows with every agent's entries; agents with many lengths use
/// the LPM trie.
#[inline(always)]
pub(crate) fn dst_v4(
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    tables: Option<&TableConfig>,
    dst: [u8; 4],
) -> Option<&'static RuleSet> {
    if policy.flags & AGENT_DST_LPM_V4 != 0 {
        let key = Key::new(
            OWNER_BITS + 32,
            LpmV4 {
                owner: owner(slot, agent),
                addr: dst,
            },
        );
        return DST_V4.get(&key);
    }
    let addr = u32::from_be_bytes(dst);
    let mut key = DstV4Key {
        owner: owner_word(slot, agent),
        len: 0,
        addr: [0; 4],
    };
    let n = policy.dst_lens_v4_count as usize;
    // One 8-byte read, each length shifted out below: indexing the array made LLVM walk
    // a pointer whose bound Linux 6.1's verifier loses (`invalid access to map value`).
    let mut lens = u64::from_le_bytes(policy.dst_lens_v4);
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = (lens & 0xff) as u32;
        lens >>= 8;
        // len is 0..=32 (compile checks). The mask has no branch for /0: one path fewer
        // per probe, which Linux 6.1's verifier multiplies by every later branch (its
        // 8192-entry limit on pending branches, `The sequence of 8193 jumps is too complex`).
        let mask = (high_bits(len) >> 32) as u32;
        let masked = addr & mask;
        let (index, overflow) = table_probe(
            &DST_TABLE_V4,
            slot,
            tables,
            TABLE_DST_V4,
            dst_key_v4(key.owner, len, masked),
        );
        if index != 0 {
            return rules_at(slot, index);
        }
        if overflow {
            key.len = len;
            key.addr = masked.to_be_bytes();
            // SAFETY: the value is only read, during this program run.
            if let Some(rules) = unsafe { DST_HASH_V4.get(&key) } {
                return Some(rules);
            }
        }
    }
    None
}

/// A u64 with its top `n` bits set, for `n` in 0..=64, without a branch (see [`dst_v4`]):
/// two shifts of at most 32 each, since one shift by 64 is undefined.
#[inline(always)]
pub(crate) fn high_bits(n: u32) -> u64 {
    let half = n / 2;
    !((u64::MAX >> half) >> (n - half))
}

/// IPv6 form of [`dst_v4`].
#[inline(always)]
pub(crate) fn dst_v6(
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    tables: Option<&TableConfig>,
    dst: [u8; 16],
) -> Option<&'static RuleSet> {
    if policy.flags & AGENT_DST_LPM_V6 != 0 {
        let key = Key::new(
            OWNER_BITS + 128,
            LpmV6 {
                owner: owner(slot, agent),
                addr: dst,
            },
        );
        return DST_V6.get(&key);
    }
    let hi = u64::from_be_bytes([
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
    ]);
    let lo = u64::from_be_bytes([
        dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
    ]);
    let owner = owner_word(slot, agent);
    let n = policy.dst_lens_v6_count as usize;
    // One 8-byte read, as in [`dst_v4`].
    let mut lens = u64::from_le_bytes(policy.dst_lens_v6);
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = (lens & 0xff) as i64;
        lens >>= 8;
        // len is 0..=128 (compile checks). Branch-free for the same reason as in
        // [`dst_v4`] (BPF has no select: a `min` or an `if` is a jump): `over` is
        // max(len - 64, 0), from the sign of len - 64.
        let over = (len - 64) & !((len - 64) >> 63);
        let (mask_hi, mask_lo) = (high_bits((len - over) as u32), high_bits(over as u32));
        let (masked_hi, masked_lo) = (hi & mask_hi, lo & mask_lo);
        let (index, overflow) = table_probe(
            &DST_TABLE_V6,
            slot,
            tables,
            TABLE_DST_V6,
            dst_key_v6(owner, len as u32, masked_hi, masked_lo),
        );
        if index != 0 {
            return rules_at(slot, index);
        }
        if overflow {
            // Built only here: zeroing it up front was a `memset` call on every packet.
            let (h, l) = (masked_hi.to_be_bytes(), masked_lo.to_be_bytes());
            let key = DstV6Key {
                owner,
                len: len as u32,
                addr: [
                    h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4],
                    l[5], l[6], l[7],
                ],
            };
            // SAFETY: the value is only read, during this program run.
            if let Some(rules) = unsafe { DST_HASH_V6.get(&key) } {
                return Some(rules);
            }
        }
    }
    None
}

/// What the egress rules decided. Whether a drop is answered (a `reject` rule) is not
/// carried here: the reply stage looks the rule up again (see `enforce_reject`), since a
/// reject bit carried through the entry program split the verifier's states past its limit
/// on Linux 6.1.
#[derive(Clone, Copy)]
pub(crate) struct Verdict {
    pub(crate) reason: Reason,
}

impl Verdict {
    /// The verdict of `reason`.
    #[inline(always)]
    pub(crate) const fn of(reason: Reason) -> Verdict {
        Verdict { reason }
    }
}

/// Walks a destination's rules: the first rule whose protocol and ports match decides; no
/// match falls back to the agent's default.
#[inline(always)]
pub(crate) fn egress(rules: Option<&'static RuleSet>, proto: u8, l4: L4, flags: u32) -> Verdict {
    match rule_match(rules, proto, l4) {
        Some(verdict) => verdict,
        None if flags & AGENT_DEFAULT_ALLOW != 0 => Verdict::of(Reason::Allowed),
        None => Verdict::of(Reason::EgressDenied),
    }
}

/// The verdict of the first of `rules` whose protocol and ports match, `None` if none does.
/// A `reject` rule is a denial here: the names stage, which uses this, only drops.
#[inline(always)]
pub(crate) fn rule_verdict(rules: Option<&'static RuleSet>, proto: u8, l4: L4) -> Option<Reason> {
    rule_match(rules, proto, l4).map(|v| v.reason)
}

/// [`rule_verdict`] with the reject bit of the deciding rule.
#[inline(always)]
pub(crate) fn rule_match(rules: Option<&'static RuleSet>, proto: u8, l4: L4) -> Option<Verdict> {
    match_rules(rules, proto, l4, Verdict::of, |r| {
        Verdict::of(if r.action == ACTION_ALLOW {
            Reason::Allowed
        } else {
            Reason::EgressDenied
        })
    })
}

/// Walks `rules` to the first whose protocol and ports match and answers `on_rule` of it;
/// `decided` of a reason when no rule can be matched safely (the transport is undecidable
/// or link control, or a non-first fragment meets a rule that depends on the port); `None`
/// if no rule matches. Generic over the answer, so each caller's closures are inlined into
/// the walk: mapping an intermediate enum afterwards added branches that took
/// `enforce_names` past Linux's limit of 8,192 pending jumps.
#[inline(always)]
pub(crate) fn match_rules<T>(
    rules: Option<&'static RuleSet>,
    proto: u8,
    l4: L4,
    decided: impl Fn(Reason) -> T,
    on_rule: impl Fn(&'static PortRule) -> T,
) -> Option<T> {
    if l4 == L4::Undecidable {
        return Some(decided(Reason::Malformed));
    }
    if let Some(rules) = rules {
        let n = rules.len as usize;
        for i in 0..MAX_RULES_PER_PREFIX {
            if i >= n {
                break;
            }
            let r = &rules.rules[i];
            if r.proto != PROTO_ANY && r.proto != proto {
                continue;
            }
            match l4.kind {
                L4Kind::Port => {
                    if l4.dst < r.port_lo || l4.dst > r.port_hi {
                        continue;
                    }
                }
                L4Kind::NoPorts => {
                    if !r.any_port() {
                        continue;
                    }
                }
                // The first rule for this protocol depends on the port, which a non-first
                // fragment does not carry: no verdict is safe but a drop.
                L4Kind::Fragment => {
                    if !r.any_port() {
                        return Some(decided(Reason::Fragment));
                    }
                }
                L4Kind::Undecidable => return Some(decided(Reason::Malformed)),
                L4Kind::LinkControl => return Some(decided(Reason::LinkControl)),
            }
            return Some(on_rule(r));
        }
    }
    None
}
