//! Every map of the enforcer object, in one place: the policy slots, the agents' state, the
//! counters and the audit ring. Sizes here are placeholders; the daemon sizes them at load.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use enforcer_common::{
    AgentCounters, AgentPolicy, AuditConfig, AuditEvent, Bucket, Clock, DstV4Key, DstV6Key,
    FlowKey, HostV4Key, HostV6Key, IfaceKey, LpmV4, LpmV6, NameEntry, NameV4Key, NameV6Key,
    ResolverKey, RuleSet, SNI_NAME_LEN, SlotConfig, SniKey, State, TableBucket1, TableBucket2,
    TableBucket3, TableConfig, TlsPorts,
    guard::{GuardConfig, GuardPolicy, GuardState, MAX_SHARED_GROUPS, SharedBucket, SharedPolicy},
};

// Map sizes here are placeholders: the daemon sets the real ones at load time
// (`EbpfLoader::map_max_entries`) from its configuration. Every map is pinned by name so a
// restarted daemon, or a reloaded program, keeps the same policy, buckets and counters.
pub(crate) const DEFAULT_AGENTS: u32 = 1024;

#[map]
pub(crate) static STATE: Array<State> = Array::pinned(1, 0);
#[map]
pub(crate) static SLOTS: Array<SlotConfig> = Array::pinned(enforcer_common::SLOTS, 0);
#[map]
pub(crate) static AGENTS: Array<AgentPolicy> = Array::pinned(2 * (DEFAULT_AGENTS + 1), 0);
#[map]
pub(crate) static BUCKETS: Array<Bucket> = Array::pinned(DEFAULT_AGENTS + 1, 0);
#[map]
pub(crate) static COUNTERS: PerCpuArray<AgentCounters> = PerCpuArray::pinned(DEFAULT_AGENTS + 1, 0);
#[map]
pub(crate) static IFACES: HashMap<IfaceKey, u32> = HashMap::pinned(1024, 0);
#[map]
pub(crate) static SRC_HOST_V4: HashMap<HostV4Key, u32> = HashMap::pinned(1024, 0);
#[map]
pub(crate) static SRC_HOST_V6: HashMap<HostV6Key, u32> = HashMap::pinned(1024, 0);
#[map]
pub(crate) static SRC_V4: LpmTrie<LpmV4, u32> = LpmTrie::pinned(1024, 0);
#[map]
pub(crate) static SRC_V6: LpmTrie<LpmV6, u32> = LpmTrie::pinned(1024, 0);
#[map]
pub(crate) static DST_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::pinned(1024, 0);
#[map]
pub(crate) static DST_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::pinned(1024, 0);
#[map]
pub(crate) static DST_HASH_V4: HashMap<DstV4Key, RuleSet> = HashMap::pinned(1024, 0);
#[map]
pub(crate) static DST_HASH_V6: HashMap<DstV6Key, RuleSet> = HashMap::pinned(1024, 0);
/// Audit events. Pinned like the rest, so events the program writes while no daemon reads
/// them wait for the next one (until the ring fills; then they are counted as lost).
#[map]
pub(crate) static AUDIT: RingBuf = RingBuf::pinned(1 << 20, 0);
#[map]
pub(crate) static AUDIT_CONFIG: Array<AuditConfig> = Array::pinned(1, 0);
/// Audit limiter state: one GCRA theoretical arrival time per agent id. A map of its own
/// (not a third field of `Bucket`) so the layouts of the maps earlier versions pinned stay
/// as they were and an upgraded daemon can take over running pins without detaching.
#[map]
pub(crate) static AUDIT_LIMITS: Array<u64> = Array::pinned(DEFAULT_AGENTS + 1, 0);
/// Reject reply limiter state: one GCRA theoretical arrival time per agent id, a map of its
/// own for the same reason as `AUDIT_LIMITS`.
#[map]
pub(crate) static REJECT_LIMITS: Array<u64> = Array::pinned(DEFAULT_AGENTS + 1, 0);
// Host names. Maps of their own, so the layouts of the maps above stay as earlier versions
// pinned them.
#[map]
pub(crate) static TLS_PORTS: Array<TlsPorts> = Array::pinned(enforcer_common::SLOTS, 0);
#[map]
pub(crate) static RESOLVERS: HashMap<ResolverKey, u32> = HashMap::pinned(64, 0);
#[map]
pub(crate) static NAMES_V4: HashMap<NameV4Key, NameEntry> = HashMap::pinned(65536, 0);
#[map]
pub(crate) static NAMES_V6: HashMap<NameV6Key, NameEntry> = HashMap::pinned(65536, 0);
#[map]
pub(crate) static SNI: HashMap<SniKey, RuleSet> = HashMap::pinned(4096, 0);
#[map]
pub(crate) static SNI_SCRATCH: PerCpuArray<SniScratch> = PerCpuArray::pinned(1, 0);
#[map]
pub(crate) static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(65536, 0);
#[map]
pub(crate) static CLOCK: Array<Clock> = Array::pinned(1, 0);
#[map]
pub(crate) static SRC_TABLE_V4: Array<TableBucket1> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
pub(crate) static SRC_TABLE_V6: Array<TableBucket2> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
pub(crate) static DST_TABLE_V4: Array<TableBucket1> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
pub(crate) static DST_TABLE_V6: Array<TableBucket3> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
pub(crate) static RULES: Array<RuleSet> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
pub(crate) static TABLES: Array<TableConfig> = Array::pinned(enforcer_common::SLOTS, 0);
// Guards (see `guard.rs`). Maps of their own, so the layouts of the maps above stay as
// earlier versions pinned them.
#[map]
pub(crate) static GUARD_POLICY: Array<GuardPolicy> = Array::pinned(2 * (DEFAULT_AGENTS + 1), 0);
#[map]
pub(crate) static GUARDS: Array<GuardState> = Array::pinned(DEFAULT_AGENTS + 1, 0);
#[map]
pub(crate) static SHARED_POLICY: Array<SharedPolicy> = Array::pinned(2 * MAX_SHARED_GROUPS, 0);
#[map]
pub(crate) static SHARED_BUCKETS: Array<SharedBucket> = Array::pinned(MAX_SHARED_GROUPS, 0);
#[map]
pub(crate) static GUARD_CONFIG: Array<GuardConfig> = Array::pinned(1, 0);

/// Where the SNI check works: the key it looks up, and the server name as read from the
/// packet. Kernel-only (user space never reads it), and per CPU because 512 bytes do not
/// fit on the BPF stack beside everything else.
#[repr(C)]
pub(crate) struct SniScratch {
    pub(crate) key: SniKey,
    pub(crate) raw: [u8; SNI_NAME_LEN],
}

/// The tail-called stages, at the indices of `enforcer_common::programs::STAGES`. Not pinned
/// by name: each loaded object has its own, which the daemon fills before it attaches the
/// entry program, so an entry program never jumps into a stage of another build.
#[map]
pub(crate) static STAGES: ProgramArray =
    ProgramArray::with_max_entries(enforcer_common::programs::STAGE_SLOTS, 0);

/// [`STAGES`] for the tc programs: a program array holds programs of one type only.
#[map]
pub(crate) static STAGES_TC: ProgramArray =
    ProgramArray::with_max_entries(enforcer_common::programs::STAGE_SLOTS, 0);

/// Where a reply to a rejected packet is put together (see `ReplyScratch`).
#[map]
pub(crate) static REPLY_SCRATCH: PerCpuArray<crate::reject::ReplyScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// What the entry program hands the stages it tail-calls (see [`Handoff`]).
#[map]
pub(crate) static HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

/// The packet's facts for the tail-called stages. Per CPU: from the entry program's write to
/// the last stage, one packet owns its CPU's copy, because XDP and tc programs run with
/// bottom halves off, so no other packet's program runs on that CPU in between (the same
/// holds for the scratch of the SNI check). Kernel-only: user space never reads it.
#[repr(C)]
pub(crate) struct Handoff {
    /// The names stage's arguments, packed as for `learned_admission`: IP header offset,
    /// transport offset, IP end and family.
    pub(crate) layout: u64,
    /// Slot << 32 | agent.
    pub(crate) owner: u64,
    /// Transport kind, protocol and ports, packed as for `learned_admission`.
    pub(crate) l4: u64,
    /// The packet's wire bytes and segments, as the entry program measured them (see
    /// `Wire`).
    pub(crate) len: u64,
    pub(crate) segs: u64,
    /// `State::agent_stride` as the entry program read it.
    pub(crate) stride: u32,
    /// A [`Reason`](enforcer_common::Reason): the names stage's answer when no learned address admits the packet
    /// (the agent's default), then the verdict the finish stage closes with.
    pub(crate) verdict: u32,
    /// The audit tuple (family, protocol, addresses, ports); the other fields are unused.
    pub(crate) tuple: AuditEvent,
}
