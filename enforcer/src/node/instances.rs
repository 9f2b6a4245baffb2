//! The daemon's table of agent instances (issue 16, "agents come and go"): one agent per
//! sandbox interface of a [`Profile`](crate::policy::Profile), made when a link matching
//! the profile's patterns appears ([`Instances::reconcile`]) or when a runtime names one
//! (`enforcer agent add`, [`Instances::add`]), and kept in a JSON file so that ids and
//! added instances survive a daemon restart.
//!
//! Pure bookkeeping: no kernel, no daemon. The daemon turns instances into agents with
//! [`Profile::instance`](crate::policy::Profile::instance) and compiles
//! [`Policy::set_instances`] into the maps.
//!
//! Ids are in `1..=max_agents` and never one a static agent of the current policy or another
//! instance holds. An id names counters, rate buckets and audit identity in the maps, so a
//! new instance should not inherit traces of an old one: ids never handed out come first,
//! from `max_agents` down (static agents' ids are usually small, so the two rarely meet),
//! and once none is left the id freed longest ago. Both the freed ids, oldest first, and the
//! ids never handed out are saved with the table, so a restart keeps that order.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::policy::{self, IpNet, Policy};

/// The version of the file format [`Instances::save`] writes and [`Instances::load`] reads.
pub const FILE_VERSION: u32 = 1;

/// How an instance came to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A link appeared whose name a profile's pattern matches; it goes with the link.
    Pattern,
    /// `enforcer agent add` named it; it stays until `enforcer agent remove`.
    Added {
        /// The caller's user id, from the API socket's peer credentials.
        uid: u32,
        /// The caller's process id, likewise.
        pid: u32,
    },
}

/// One agent instance: a profile applied to one sandbox interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Agent id, in `1..=max_agents`.
    pub id: u32,
    /// The profile's name.
    pub profile: String,
    /// The sandbox's host-side interface.
    pub interface: String,
    /// The interface's index when the instance was made (Pattern only: a new index is a new
    /// sandbox).
    pub ifindex: Option<u32>,
    /// Source prefixes that identify the instance besides its interface (added instances).
    pub prefixes: Vec<IpNet>,
    /// How it came to be.
    pub origin: Origin,
}

impl Instance {
    /// Its agent name, `<profile>/<interface>`: unique, as an interface has one instance,
    /// and never an agent's, as agent names cannot hold `/`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.profile, self.interface)
    }

    /// Whether `key` is its name, without building the name.
    fn is_named(&self, key: &str) -> bool {
        // Neither part can hold '/', so the first one splits them.
        key.split_once('/') == Some((self.profile.as_str(), self.interface.as_str()))
    }
}

/// What [`Instances::reconcile`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Instances made, by link name.
    pub added: Vec<Instance>,
    /// Instances dropped, by id.
    pub removed: Vec<Instance>,
    /// Links a profile matches that got no instance because every id is taken: their
    /// traffic is nobody's until an id frees up (the daemon should say so loudly).
    pub unassigned: Vec<String>,
}

/// A static agent of a policy claiming something an instance holds: the daemon refuses such
/// a policy, since an instance cannot be moved without its sandbox noticing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Clash {
    /// The agent's id is the instance's.
    #[error("agent \"{agent}\" has id {id}, which instance \"{instance}\" holds")]
    Id {
        /// The id.
        id: u32,
        /// The instance's name.
        instance: String,
        /// The static agent's name.
        agent: String,
    },
    /// The agent names the interface an added instance was made for (a pattern instance
    /// simply gives its interface up at the next reconcile).
    #[error(
        "agent \"{agent}\" names interface \"{interface}\", which instance \"{instance}\" was \
         added for"
    )]
    Interface {
        /// The interface.
        interface: String,
        /// The instance's name.
        instance: String,
        /// The static agent's name.
        agent: String,
    },
    /// The agent has a source prefix the instance has.
    #[error("agent \"{agent}\" has source prefix {prefix}, which instance \"{instance}\" has")]
    Prefix {
        /// The prefix.
        prefix: IpNet,
        /// The instance's name.
        instance: String,
        /// The static agent's name.
        agent: String,
    },
}

/// Why the table could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The file exists but could not be read.
    #[error("reading agent instances file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file could not be replaced.
    #[error("writing agent instances file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error("{}:{line}:{column}: not an agent instances file: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line of the problem, from 1.
        line: usize,
        /// Column of the problem, from 1.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file is from another version of the format.
    #[error(
        "{}: agent instances file version {version}; this enforcer reads version \
         {FILE_VERSION}",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version it says it is.
        version: u32,
    },
    /// The file parses but contradicts itself or the configuration.
    #[error("{}: {problem}", path.display())]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to get out of it.
        problem: String,
    },
    /// No profile of the policy has this name.
    #[error("no profile \"{profile}\" in the policy")]
    UnknownProfile {
        /// The name asked for.
        profile: String,
    },
    /// Not a name Linux accepts for an interface.
    #[error(
        "interface \"{interface}\" is not an interface name: 1 to 15 bytes without '/', ':' or \
         whitespace"
    )]
    InvalidInterface {
        /// The name given.
        interface: String,
    },
    /// Another agent already has the interface (an instance's name holds its interface, so
    /// this is also how a taken instance name is reported).
    #[error("interface \"{interface}\" already identifies agent \"{owner}\"")]
    InterfaceTaken {
        /// The interface.
        interface: String,
        /// The agent or instance holding it.
        owner: String,
    },
    /// Another agent already has the source prefix, or it was given twice.
    #[error("source prefix {prefix} already identifies agent \"{owner}\"")]
    PrefixTaken {
        /// The prefix.
        prefix: IpNet,
        /// The agent or instance holding it.
        owner: String,
    },
    /// Every id in `1..=max_agents` is a static agent's or an instance's.
    #[error(
        "no free agent id: every id up to {max_agents} is taken by an agent or instance; \
         raise limits.max_agents or remove instances"
    )]
    NoFreeId {
        /// The configured number of agent ids.
        max_agents: u32,
    },
    /// No instance has this name, interface or id.
    #[error("no agent instance \"{key}\" (expected an instance name, interface or id)")]
    UnknownInstance {
        /// The key given.
        key: String,
    },
}

/// The table of agent instances, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instances {
    max_agents: u32,
    by_id: BTreeMap<u32, Instance>,
    /// Ids never handed out, as disjoint inclusive ranges in ascending order; the next one is
    /// the last range's top. Usually one range, `1..=next`; a raised `max_agents` adds one
    /// above it.
    never_used: Vec<(u32, u32)>,
    /// Ids given back, the one freed longest ago first.
    freed: VecDeque<u32>,
}

/// The file, as written.
#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    /// `max_agents` when it was written: a raised one adds never-used ids.
    max_agents: u32,
    /// [`Instances::never_used`], as `[low, high]` pairs.
    never_used: Vec<[u32; 2]>,
    freed: Vec<u32>,
    instances: Vec<Instance>,
}

/// Only the version, read first: another version's other fields may not parse.
#[derive(Deserialize)]
struct Head {
    version: u32,
}

impl Instances {
    /// An empty table handing out ids in `1..=max_agents`.
    pub fn new(max_agents: u32) -> Self {
        Instances {
            max_agents,
            by_id: BTreeMap::new(),
            never_used: if max_agents > 0 {
                vec![(1, max_agents)]
            } else {
                Vec::new()
            },
            freed: VecDeque::new(),
        }
    }

    /// The table saved at `path`; an empty one if there is no file (a first start). With a
    /// `max_agents` above the saved one the new ids count as never used; below it, ids
    /// beyond it are forgotten, and an instance holding one is an error.
    pub fn load(path: &Path, max_agents: u32) -> Result<Self, InstanceError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Instances::new(max_agents)),
            Err(source) => {
                return Err(InstanceError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let parse_error = |e: serde_json::Error| {
            let (line, column) = (e.line(), e.column());
            let message = e.to_string();
            let suffix = format!(" at line {line} column {column}");
            InstanceError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: message.strip_suffix(&suffix).unwrap_or(&message).to_owned(),
            }
        };
        let head: Head = serde_json::from_slice(&bytes).map_err(parse_error)?;
        if head.version != FILE_VERSION {
            return Err(InstanceError::Version {
                path: path.to_owned(),
                version: head.version,
            });
        }
        let file: File = serde_json::from_slice(&bytes).map_err(parse_error)?;
        let inconsistent = |problem: String| InstanceError::Inconsistent {
            path: path.to_owned(),
            problem,
        };

        let mut table = Instances::new(max_agents);
        let mut interfaces = HashSet::new();
        for instance in file.instances {
            let (id, name) = (instance.id, instance.name());
            if id == 0 || id > max_agents {
                return Err(inconsistent(format!(
                    "instance \"{name}\" has id {id}, outside 1..={max_agents} (limits.max_agents); \
                     raise limits.max_agents back, or remove the instance from the file"
                )));
            }
            if !interfaces.insert(instance.interface.clone()) {
                return Err(inconsistent(format!(
                    "interface \"{}\" has two instances",
                    instance.interface
                )));
            }
            if let Some(first) = table.by_id.insert(id, instance) {
                return Err(inconsistent(format!(
                    "instances \"{}\" and \"{name}\" both have id {id}",
                    first.name()
                )));
            }
        }
        // The rest only orders future ids, so it is made consistent rather than refused:
        // clipped to max_agents, without ids an instance holds or that appear twice.
        let mut seen = HashSet::new();
        table.freed = file
            .freed
            .into_iter()
            .filter(|&id| {
                (1..=max_agents).contains(&id) && !table.by_id.contains_key(&id) && seen.insert(id)
            })
            .collect();
        let mut ranges: Vec<(u32, u32)> = file
            .never_used
            .iter()
            .map(|&[lo, hi]| (lo.max(1), hi.min(max_agents)))
            .filter(|(lo, hi)| lo <= hi)
            .collect();
        if max_agents > file.max_agents {
            ranges.push((file.max_agents + 1, max_agents));
        }
        ranges.sort_unstable();
        // Overlaps only come from a hand-edited file; merging keeps the ranges disjoint.
        table.never_used = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match table.never_used.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => table.never_used.push((lo, hi)),
            }
        }
        Ok(table)
    }

    /// Writes the table to `path` durably ([`crate::durable::replace`]), readable by root
    /// only: it records who added which instance.
    pub fn save(&self, path: &Path) -> Result<(), InstanceError> {
        let file = File {
            version: FILE_VERSION,
            max_agents: self.max_agents,
            never_used: self.never_used.iter().map(|&(lo, hi)| [lo, hi]).collect(),
            freed: self.freed.iter().copied().collect(),
            instances: self.by_id.values().cloned().collect(),
        };
        let mut bytes =
            serde_json::to_vec_pretty(&file).expect("the file's types serialize to JSON");
        bytes.push(b'\n');
        crate::durable::replace(path, &bytes, 0o600).map_err(|source| InstanceError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The instances, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.by_id.values()
    }

    /// The instance whose name, interface or id (in decimal) is `key`, tried in that order:
    /// an interface may be all digits, and its instance's id still reaches it by name.
    pub fn get(&self, key: &str) -> Option<&Instance> {
        self.by_id
            .values()
            .find(|i| i.is_named(key))
            .or_else(|| self.by_id.values().find(|i| i.interface == key))
            .or_else(|| {
                key.parse::<u32>()
                    .ok()
                    .and_then(|id| self.by_id.get(&id))
                    .filter(|_| key.bytes().all(|b| b.is_ascii_digit()))
            })
    }

    /// How many instances there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The instances as agents of `policy`'s profiles, by id (an instance whose profile is
    /// gone has none: [`Instances::reconcile`] drops it).
    pub fn agents(&self, policy: &Policy) -> Vec<policy::Agent> {
        self.iter()
            .filter_map(|i| {
                policy
                    .profile(&i.profile)
                    .map(|p| p.instance(i.id, &i.interface, &i.prefixes))
            })
            .collect()
    }

    /// Ids static agents of `policy` use that an instance holds, as `(id, instance name,
    /// agent name)` by id: a policy bringing one is refused by the daemon. See
    /// [`Instances::clashes`] for interfaces and prefixes too.
    pub fn conflicts(&self, policy: &Policy) -> Vec<(u32, String, String)> {
        let mut out: Vec<_> = policy
            .own_agents()
            .iter()
            .filter_map(|a| {
                self.by_id
                    .get(&a.id)
                    .map(|i| (a.id, i.name(), a.name.clone()))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Everything static agents of `policy` claim that instances hold: ids (of any
    /// instance), interfaces of added instances, source prefixes. What the daemon must
    /// refuse before [`Instances::reconcile`] and [`Policy::set_instances`], since the
    /// combined policy would give one thing to two agents.
    pub fn clashes(&self, policy: &Policy) -> Vec<Clash> {
        let mut out: Vec<Clash> = self
            .conflicts(policy)
            .into_iter()
            .map(|(id, instance, agent)| Clash::Id {
                id,
                instance,
                agent,
            })
            .collect();
        for i in self.by_id.values() {
            if matches!(i.origin, Origin::Added { .. })
                && let Some(agent) = policy
                    .own_agents()
                    .iter()
                    .find(|a| a.interfaces.contains(&i.interface))
            {
                out.push(Clash::Interface {
                    interface: i.interface.clone(),
                    instance: i.name(),
                    agent: agent.name.clone(),
                });
            }
            for prefix in &i.prefixes {
                if let Some(agent) = policy
                    .own_agents()
                    .iter()
                    .find(|a| a.sources.contains(prefix))
                {
                    out.push(Clash::Prefix {
                        prefix: *prefix,
                        instance: i.name(),
                        agent: agent.name.clone(),
                    });
                }
            }
        }
        out
    }

    /// Makes an instance of `profile` on `interface` by hand (`enforcer agent add`). It has
    /// no ifindex and stays until [`Instances::remove`]: the interface may not exist yet,
    /// or may go and come back with the sandbox. `origin` is [`Origin::Added`]: a pattern
    /// instance without an ifindex would go at the next reconcile.
    pub fn add(
        &mut self,
        policy: &Policy,
        profile: &str,
        interface: &str,
        prefixes: Vec<IpNet>,
        origin: Origin,
    ) -> Result<Instance, InstanceError> {
        let Some(profile) = policy.profile(profile) else {
            return Err(InstanceError::UnknownProfile {
                profile: profile.to_owned(),
            });
        };
        if !policy::valid_ifname(interface) {
            return Err(InstanceError::InvalidInterface {
                interface: interface.to_owned(),
            });
        }
        let owner = policy
            .agent_by_interface(interface)
            .map(|a| a.name.clone())
            .or_else(|| self.holder_of(interface).map(Instance::name));
        if let Some(owner) = owner {
            return Err(InstanceError::InterfaceTaken {
                interface: interface.to_owned(),
                owner,
            });
        }
        let name = format!("{}/{interface}", profile.name);
        for (k, prefix) in prefixes.iter().enumerate() {
            let owner = if prefixes[..k].contains(prefix) {
                Some(name.clone())
            } else {
                policy
                    .own_agents()
                    .iter()
                    .find(|a| a.sources.contains(prefix))
                    .map(|a| a.name.clone())
                    .or_else(|| {
                        self.by_id
                            .values()
                            .find(|i| i.prefixes.contains(prefix))
                            .map(Instance::name)
                    })
            };
            if let Some(owner) = owner {
                return Err(InstanceError::PrefixTaken {
                    prefix: *prefix,
                    owner,
                });
            }
        }
        let id = self.allocate(&static_ids(policy))?;
        let instance = Instance {
            id,
            profile: profile.name.clone(),
            interface: interface.to_owned(),
            ifindex: None,
            prefixes,
            origin,
        };
        self.by_id.insert(id, instance.clone());
        Ok(instance)
    }

    /// Removes the instance `key` names (see [`Instances::get`]), of either origin, and
    /// frees its id. A pattern instance removed by hand comes back, with a new id, at the
    /// next reconcile if its interface still matches the profile.
    pub fn remove(&mut self, key: &str) -> Result<Instance, InstanceError> {
        let Some(id) = self.get(key).map(|i| i.id) else {
            return Err(InstanceError::UnknownInstance {
                key: key.to_owned(),
            });
        };
        Ok(self.release(id))
    }

    /// Brings the table in line with `policy` and `links` (every interface on the host now,
    /// name to ifindex). Drops instances whose profile is gone, and pattern instances whose
    /// link is gone, has another ifindex (another sandbox), or no longer belongs to the
    /// profile by [`Policy::profile_for`] (another profile comes first, or a static agent
    /// names it). Then makes a pattern instance for each link, in name order, that
    /// `profile_for` gives a profile and that no instance holds.
    pub fn reconcile(&mut self, policy: &Policy, links: &BTreeMap<String, u32>) -> Reconciled {
        let statics = static_ids(policy);
        // Policy::profile_for, with the static interfaces looked up once rather than per
        // link (a policy may have many agents).
        let static_ifaces: HashSet<&str> = policy
            .own_agents()
            .iter()
            .flat_map(|a| a.interfaces.iter().map(String::as_str))
            .collect();
        let profile_for = |iface: &str| {
            (!static_ifaces.contains(iface))
                .then(|| policy.profiles().iter().find(|p| p.matches(iface)))
                .flatten()
        };

        let mut done = Reconciled::default();
        let gone: Vec<u32> = self
            .by_id
            .values()
            .filter(|i| {
                policy.profile(&i.profile).is_none()
                    || i.origin == Origin::Pattern
                        && (links.get(&i.interface) != i.ifindex.as_ref()
                            || profile_for(&i.interface).map(|p| p.name.as_str())
                                != Some(i.profile.as_str()))
            })
            .map(|i| i.id)
            .collect();
        for id in gone {
            done.removed.push(self.release(id));
        }

        let held: HashSet<String> = self.by_id.values().map(|i| i.interface.clone()).collect();
        for (link, &ifindex) in links {
            if held.contains(link) {
                continue;
            }
            let Some(profile) = profile_for(link) else {
                continue;
            };
            match self.allocate(&statics) {
                Ok(id) => {
                    let instance = Instance {
                        id,
                        profile: profile.name.clone(),
                        interface: link.clone(),
                        ifindex: Some(ifindex),
                        prefixes: Vec::new(),
                        origin: Origin::Pattern,
                    };
                    self.by_id.insert(id, instance.clone());
                    done.added.push(instance);
                }
                Err(_) => done.unassigned.push(link.clone()),
            }
        }
        done
    }

    /// The instance on `interface`.
    fn holder_of(&self, interface: &str) -> Option<&Instance> {
        self.by_id.values().find(|i| i.interface == interface)
    }

    /// Removes instance `id`, which exists, and queues its id for reuse.
    fn release(&mut self, id: u32) -> Instance {
        let instance = self
            .by_id
            .remove(&id)
            .expect("release is given the id of an instance");
        self.freed.push_back(id);
        instance
    }

    /// A free id: the highest never handed out, else the one freed longest ago; never one
    /// in `statics` or held by an instance.
    fn allocate(&mut self, statics: &HashSet<u32>) -> Result<u32, InstanceError> {
        while let Some(id) = self.take_never_used() {
            if statics.contains(&id) {
                // A static agent's now, but the policy may drop that agent: queue it like a
                // freed id, so it is neither lost nor reused before older ones.
                self.freed.push_back(id);
                continue;
            }
            // Only a hand-edited file puts an instance's id here; it is queued when freed.
            if !self.by_id.contains_key(&id) {
                return Ok(id);
            }
        }
        for _ in 0..self.freed.len() {
            let Some(id) = self.freed.pop_front() else {
                break;
            };
            if statics.contains(&id) {
                self.freed.push_back(id);
            } else if !self.by_id.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(InstanceError::NoFreeId {
            max_agents: self.max_agents,
        })
    }

    fn take_never_used(&mut self) -> Option<u32> {
        let last = self.never_used.last_mut()?;
        let id = last.1;
        if last.0 == last.1 {
            self.never_used.pop();
        } else {
            last.1 -= 1;
        }
        Some(id)
    }
}

fn static_ids(policy: &Policy) -> HashSet<u32> {
    policy.own_agents().iter().map(|a| a.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    /// Static agents with ids 1 and 8 (on `veth-a`, `10.0.0.1`), profile `coder` for
    /// `agt-coder-*`, profile `any` for `agt-*`, profile `manual` for `agent add` only.
    fn policy() -> Policy {
        parse(
            "p.toml",
            "[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"veth-a\"]\nprefixes = [\"10.0.0.1\"]\n\
             [[agents]]\nid = 8\nname = \"b\"\ninterfaces = [\"agt-coder-9\"]\n\
             [[profiles]]\nname = \"coder\"\ninterfaces = [\"agt-coder-*\"]\n\
             [[profiles]]\nname = \"any\"\ninterfaces = [\"agt-*\"]\n\
             [[profiles]]\nname = \"manual\"\n",
        )
        .unwrap()
    }

    fn added() -> Origin {
        Origin::Added { uid: 0, pid: 42 }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn links(items: &[(&str, u32)]) -> BTreeMap<String, u32> {
        items.iter().map(|&(n, i)| (n.to_owned(), i)).collect()
    }

    fn ids(table: &Instances) -> Vec<(u32, String)> {
        table.iter().map(|i| (i.id, i.name())).collect()
    }

    /// Adds a `manual` instance on `iface` and returns its id.
    fn add(table: &mut Instances, p: &Policy, iface: &str) -> Result<u32, InstanceError> {
        table
            .add(p, "manual", iface, Vec::new(), added())
            .map(|i| i.id)
    }

    #[test]
    fn ids_go_top_down_then_oldest_freed_first_and_skip_static_ones() {
        let p = policy();
        let mut t = Instances::new(10);
        // 10 and 9 are new; 8 is agent b's; then 7.
        assert_eq!(add(&mut t, &p, "m1").unwrap(), 10);
        assert_eq!(add(&mut t, &p, "m2").unwrap(), 9);
        assert_eq!(add(&mut t, &p, "m3").unwrap(), 7);
        t.remove("m2").unwrap();
        t.remove("manual/m1").unwrap();
        // Never-used ids still come before freed ones.
        for (iface, id) in [("m4", 6), ("m5", 5), ("m6", 4), ("m7", 3), ("m8", 2)] {
            assert_eq!(add(&mut t, &p, iface).unwrap(), id);
        }
        // 1 is agent a's: now the freed ones, oldest first (9, then 10); 8 was queued when
        // it was skipped, after both, and is still agent b's.
        assert_eq!(add(&mut t, &p, "m9").unwrap(), 9);
        assert_eq!(add(&mut t, &p, "m10").unwrap(), 10);
        let e = add(&mut t, &p, "m11").unwrap_err();
        assert!(
            matches!(e, InstanceError::NoFreeId { max_agents: 10 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "no free agent id: every id up to 10 is taken by an agent or instance; raise \
             limits.max_agents or remove instances"
        );
        // Once the policy drops agent b, its id is free again.
        let without_b = parse(
            "p.toml",
            "[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"veth-a\"]\n\
             [[profiles]]\nname = \"manual\"\n",
        )
        .unwrap();
        assert_eq!(add(&mut t, &without_b, "m11").unwrap(), 8);
        assert_eq!(t.len(), 9);
    }

    #[test]
    fn reconcile_makes_and_keeps_pattern_instances() {
        let p = policy();
        let mut t = Instances::new(100);
        let host = links(&[
            ("agt-coder-1", 11),
            ("agt-coder-9", 12),
            ("agt-x", 13),
            ("eth0", 2),
            ("veth-a", 3),
        ]);
        let r = t.reconcile(&p, &host);
        assert!(r.removed.is_empty() && r.unassigned.is_empty());
        // Link name order; agt-coder-9 is agent b's, eth0 and veth-a match nothing or are
        // static; agt-x falls through to the second profile.
        assert_eq!(
            r.added,
            vec![
                Instance {
                    id: 100,
                    profile: "coder".into(),
                    interface: "agt-coder-1".into(),
                    ifindex: Some(11),
                    prefixes: Vec::new(),
                    origin: Origin::Pattern,
                },
                Instance {
                    id: 99,
                    profile: "any".into(),
                    interface: "agt-x".into(),
                    ifindex: Some(13),
                    prefixes: Vec::new(),
                    origin: Origin::Pattern,
                },
            ]
        );
        // Again and again: nothing changes, ids stay.
        for _ in 0..3 {
            assert_eq!(t.reconcile(&p, &host), Reconciled::default());
        }
        assert_eq!(
            ids(&t),
            [(99, "any/agt-x".into()), (100, "coder/agt-coder-1".into())]
        );
        let i = t.get("coder/agt-coder-1").unwrap();
        assert_eq!(t.get("agt-coder-1"), Some(i));
        assert_eq!(t.get("100"), Some(i));
        assert_eq!(t.get("+100"), None);
        assert!(t.get("coder/agt-x").is_none());
    }

    #[test]
    fn reconcile_drops_what_no_longer_holds() {
        let p = policy();
        let mut t = Instances::new(100);
        let host = links(&[("agt-coder-1", 11), ("agt-coder-2", 12), ("agt-y", 13)]);
        t.reconcile(&p, &host);
        t.add(&p, "manual", "tap0", vec![net("10.1.0.0/24")], added())
            .unwrap();
        assert_eq!(t.len(), 4);

        // agt-coder-1 gone, agt-coder-2 back as another sandbox (new ifindex).
        let host = links(&[("agt-coder-2", 22), ("agt-y", 13)]);
        let r = t.reconcile(&p, &host);
        let names = |v: &[Instance]| v.iter().map(|i| (i.id, i.name())).collect::<Vec<_>>();
        assert_eq!(
            names(&r.removed),
            [
                (99, "coder/agt-coder-2".into()),
                (100, "coder/agt-coder-1".into())
            ]
        );
        // A new sandbox is a new agent: a new id, not the one just freed.
        assert_eq!(names(&r.added), [(96, "coder/agt-coder-2".into())]);
        assert_eq!(r.added[0].ifindex, Some(22));
        // The added instance stays though its interface does not exist.
        assert!(t.get("manual/tap0").is_some());

        // A static agent takes agt-coder-2, and profile coder goes: agt-y's profile "any"
        // stays; the "manual" profile goes too, taking its added instance along.
        let next = parse(
            "p.toml",
            "[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"agt-coder-2\"]\n\
             [[profiles]]\nname = \"any\"\ninterfaces = [\"agt-*\"]\n",
        )
        .unwrap();
        let r = t.reconcile(&next, &host);
        assert_eq!(
            names(&r.removed),
            [(96, "coder/agt-coder-2".into()), (97, "manual/tap0".into())]
        );
        assert!(r.added.is_empty(), "agt-coder-2 is agent a's: {r:?}");
        assert_eq!(ids(&t), [(98, "any/agt-y".into())]);

        // A profile earlier in the document now claims agt-y: it changes hands.
        let next = parse(
            "p.toml",
            "[[profiles]]\nname = \"y\"\ninterfaces = [\"agt-y\"]\n\
             [[profiles]]\nname = \"any\"\ninterfaces = [\"agt-*\"]\n",
        )
        .unwrap();
        let r = t.reconcile(&next, &host);
        assert_eq!(names(&r.removed), [(98, "any/agt-y".into())]);
        assert_eq!(
            names(&r.added),
            [(95, "any/agt-coder-2".into()), (94, "y/agt-y".into())]
        );
    }

    #[test]
    fn reconcile_reports_links_left_without_an_id() {
        let p = policy();
        // Id 1 is static: of 1..=3, only 3 and 2 are left for three links.
        let mut t = Instances::new(3);
        let r = t.reconcile(&p, &links(&[("agt-a", 1), ("agt-b", 2), ("agt-c", 3)]));
        assert_eq!(r.added.len(), 2);
        assert_eq!(r.unassigned, ["agt-c"]);
    }

    #[test]
    fn a_removed_pattern_instance_comes_back() {
        let p = policy();
        let mut t = Instances::new(100);
        let host = links(&[("agt-coder-1", 11)]);
        t.reconcile(&p, &host);
        assert_eq!(t.remove("agt-coder-1").unwrap().id, 100);
        let r = t.reconcile(&p, &host);
        assert_eq!(r.added[0].id, 99);
    }

    #[test]
    fn add_and_remove_refuse_what_they_cannot_do() {
        let p = policy();
        let mut t = Instances::new(100);
        t.reconcile(&p, &links(&[("agt-coder-1", 11)]));
        t.add(&p, "manual", "tap0", vec![net("10.1.0.0/24")], added())
            .unwrap();
        let err = |profile: &str, iface: &str, prefixes: &[&str], t: &mut Instances| {
            let prefixes = prefixes.iter().map(|s| net(s)).collect();
            t.add(&p, profile, iface, prefixes, added())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("nope", "tap1", &[], &mut t),
            "no profile \"nope\" in the policy"
        );
        assert_eq!(
            err("manual", "tap 1", &[], &mut t),
            "interface \"tap 1\" is not an interface name: 1 to 15 bytes without '/', ':' or \
             whitespace"
        );
        assert_eq!(
            err("manual", "veth-a", &[], &mut t),
            "interface \"veth-a\" already identifies agent \"a\""
        );
        assert_eq!(
            err("coder", "agt-coder-1", &[], &mut t),
            "interface \"agt-coder-1\" already identifies agent \"coder/agt-coder-1\""
        );
        assert_eq!(
            err("manual", "tap0", &[], &mut t),
            "interface \"tap0\" already identifies agent \"manual/tap0\""
        );
        assert_eq!(
            err("manual", "tap1", &["10.0.0.1"], &mut t),
            "source prefix 10.0.0.1/32 already identifies agent \"a\""
        );
        assert_eq!(
            err("manual", "tap1", &["10.1.0.0/24"], &mut t),
            "source prefix 10.1.0.0/24 already identifies agent \"manual/tap0\""
        );
        assert_eq!(
            err("manual", "tap1", &["10.2.0.1", "10.2.0.1/32"], &mut t),
            "source prefix 10.2.0.1/32 already identifies agent \"manual/tap1\""
        );
        assert_eq!(t.len(), 2, "a refused add changes nothing");
        // An overlapping prefix is fine: the longest match decides, as in a policy.
        t.add(&p, "manual", "tap1", vec![net("10.1.0.7")], added())
            .unwrap();
        assert_eq!(
            t.remove("tap9").unwrap_err().to_string(),
            "no agent instance \"tap9\" (expected an instance name, interface or id)"
        );
        let gone = t.remove("manual/tap0").unwrap();
        assert_eq!(gone.origin, added());
        assert!(t.remove("manual/tap0").is_err());
    }

    #[test]
    fn clashes_with_a_new_policy_are_named() {
        let p = policy();
        let mut t = Instances::new(100);
        t.add(&p, "manual", "tap0", vec![net("10.1.0.0/24")], added())
            .unwrap();
        t.reconcile(&p, &links(&[("agt-x", 5)]));
        let next = parse(
            "p.toml",
            "[[agents]]\nid = 100\nname = \"new\"\ninterfaces = [\"tap0\"]\n\
             [[agents]]\nid = 2\nname = \"other\"\ninterfaces = [\"agt-x\"]\n\
             prefixes = [\"10.1.0.0/24\"]\n\
             [[profiles]]\nname = \"manual\"\n",
        )
        .unwrap();
        assert_eq!(
            t.conflicts(&next),
            [(100, "manual/tap0".into(), "new".into())]
        );
        let clashes: Vec<String> = t.clashes(&next).iter().map(Clash::to_string).collect();
        // agt-x is a pattern instance: reconcile gives it up, so it is no clash.
        assert_eq!(
            clashes,
            [
                "agent \"new\" has id 100, which instance \"manual/tap0\" holds",
                "agent \"new\" names interface \"tap0\", which instance \"manual/tap0\" was added \
                 for",
                "agent \"other\" has source prefix 10.1.0.0/24, which instance \"manual/tap0\" \
                 has",
            ]
        );
        assert!(t.clashes(&p).is_empty());
    }

    fn temp(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        (dir, path)
    }

    #[test]
    fn save_and_load_keep_ids_and_their_order() {
        let (_dir, path) = temp("instances.json");
        assert_eq!(Instances::load(&path, 10).unwrap(), Instances::new(10));

        let p = policy();
        let mut t = Instances::new(10);
        t.reconcile(&p, &links(&[("agt-coder-1", 11), ("agt-x", 12)]));
        t.add(
            &p,
            "manual",
            "tap0",
            vec![net("10.1.0.0/24"), net("fd00::/64")],
            added(),
        )
        .unwrap();
        t.remove("agt-x").unwrap();
        t.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.contains("\"kind\": \"added\""), "{text}");
        assert!(text.contains("\"fd00::/64\""), "{text}");

        let mut back = Instances::load(&path, 10).unwrap();
        assert_eq!(back, t);
        // The same next ids as the original: 10, 9 and 7 were handed out and 8 and 1 are
        // static, so 6 down to 2, then the freed 9 (8, queued before it, is static), then none.
        let mut ids = Vec::new();
        for table in [&mut t, &mut back] {
            let mut got = Vec::new();
            for iface in ["m1", "m2", "m3", "m4", "m5", "m6", "m7"] {
                got.push(add(table, &p, iface).ok());
            }
            ids.push(got);
        }
        let expected = [6, 5, 4, 3, 2, 9].map(Some);
        assert_eq!(ids[0][..6], expected);
        assert_eq!(ids[0][6], None);
        assert_eq!(ids[0], ids[1]);
    }

    #[test]
    fn a_changed_max_agents_adds_or_clips_ids() {
        let (_dir, path) = temp("instances.json");
        let p = policy();
        let mut t = Instances::new(10);
        add(&mut t, &p, "m1").unwrap();
        t.save(&path).unwrap();

        // Raised: the new ids are never used, and come first, from the top.
        let mut more = Instances::load(&path, 12).unwrap();
        assert_eq!(add(&mut more, &p, "m2").unwrap(), 12);
        assert_eq!(add(&mut more, &p, "m3").unwrap(), 11);
        assert_eq!(add(&mut more, &p, "m4").unwrap(), 9);

        // Lowered below an instance's id: an error that says how out.
        let e = Instances::load(&path, 5).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: instance \"manual/m1\" has id 10, outside 1..=5 (limits.max_agents); raise \
                 limits.max_agents back, or remove the instance from the file",
                path.display()
            )
        );
        // Lowered above it: ids beyond are forgotten.
        let mut fewer = Instances::load(&path, 10).unwrap();
        fewer.remove("m1").unwrap();
        fewer.save(&path).unwrap();
        let mut fewer = Instances::load(&path, 3).unwrap();
        assert_eq!(add(&mut fewer, &p, "m1").unwrap(), 3);
        assert_eq!(add(&mut fewer, &p, "m2").unwrap(), 2);
        assert!(add(&mut fewer, &p, "m3").is_err());
    }

    #[test]
    fn a_damaged_file_is_named() {
        let (_dir, path) = temp("instances.json");
        fs::write(&path, "{\"version\": 1,\n \"instances\": [}\n").unwrap();
        let e = Instances::load(&path, 10).unwrap_err();
        assert!(matches!(e, InstanceError::Parse { line: 2, .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&format!("{}:2:", path.display())),
            "{e}"
        );
        assert!(e.to_string().contains("not an agent instances file"), "{e}");

        fs::write(&path, "{\"version\": 2, \"whatever\": []}").unwrap();
        assert_eq!(
            Instances::load(&path, 10).unwrap_err().to_string(),
            format!(
                "{}: agent instances file version 2; this enforcer reads version 1",
                path.display()
            )
        );

        let two = r#"{"version": 1, "max_agents": 10, "never_used": [], "freed": [],
            "instances": [
              {"id": 3, "profile": "p", "interface": "a", "ifindex": null, "prefixes": [], "origin": {"kind": "pattern"}},
              {"id": 3, "profile": "p", "interface": "b", "ifindex": null, "prefixes": [], "origin": {"kind": "pattern"}}
            ]}"#;
        fs::write(&path, two).unwrap();
        assert!(
            Instances::load(&path, 10)
                .unwrap_err()
                .to_string()
                .ends_with("instances \"p/a\" and \"p/b\" both have id 3")
        );

        fs::write(&path, "{\"version\": 1, \"max_agents\": 10, \"never_used\": [], \"freed\": [], \"instances\": [{\"id\": 1, \"profile\": \"p\", \"interface\": \"a\", \"ifindex\": null, \"prefixes\": [\"10.0.0.1/8\"], \"origin\": {\"kind\": \"pattern\"}}]}").unwrap();
        let e = Instances::load(&path, 10).unwrap_err().to_string();
        assert!(e.contains("has host bits set"), "{e}");
    }
}
