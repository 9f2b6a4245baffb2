//! Agents that come and go (issue 16): the instances of the policy's profiles, one per
//! sandbox interface, and the interfaces agents live on, followed agent by agent.
//!
//! A change of a few agents (an interface appears or goes, `agent add`, `agent remove`)
//! compiles those agents alone, splices them into the enforcing [`Compiled`]
//! ([`Compiled::replace_agents`]) and applies that, which writes only their entries
//! ([`crate::dataplane::apply`]); the maps are in place before the interface's program is
//! attached, so a new sandbox's first packet already meets its policy. An id handed to a new
//! instance starts with full buckets, zero counters and no learned addresses
//! ([`KernelMaps::reset_agent`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use serde_json::{Value, json};

use super::Daemon;
use crate::{
    dataplane::compile::{self, Compiled},
    error::error_chain,
    node::{
        api::Peer,
        instances::{Instance, Instances, Origin, Reconciled},
        netlink::if_index,
    },
    policy::{Agent, IpNet},
};

/// Every interface of this network namespace, name to index (`if_nameindex(3)`).
pub(super) fn host_links() -> BTreeMap<String, u32> {
    let mut links = BTreeMap::new();
    // SAFETY: if_nameindex returns a list ending in a zeroed entry, or null; each name is a
    // NUL-terminated string owned by the list, which is freed once, after the last read.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return links;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            links.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    links
}

impl Daemon {
    /// Where the instance table is kept across restarts.
    pub(super) fn instances_path(&self) -> PathBuf {
        self.config.state_dir.join("instances.json")
    }

    /// Saves the instance table; a pattern instance only loses its id's stability across a
    /// restart if this fails, so it is logged rather than refused.
    pub(super) fn save_instances(&self) {
        if let Err(e) = self.instances.save(&self.instances_path()) {
            tracing::error!(error = %error_chain(&e), "saving the agent instance table");
        }
    }

    /// A mode override belongs to the agent, not to its id: a removed instance's goes with
    /// it, so the next holder of the id starts in its profile's mode.
    pub(super) fn forget_overrides(&mut self, ids: impl IntoIterator<Item = u32>) {
        let mut forgot = false;
        for id in ids {
            forgot |= self.status.overrides.remove(&id).is_some();
        }
        if forgot && let Err(e) = self.persist_overrides() {
            tracing::error!(error = %e, "saving the mode overrides without a removed agent's");
        }
    }

    /// Ids handed to new agents start afresh: nothing of a previous holder's rate state,
    /// counters, audit budget or learned addresses.
    pub(super) fn reset_fresh_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if let Err(e) = self.dataplane.maps().reset_agent(id) {
                tracing::error!(agent = id, error = %error_chain(&e), "clearing the kernel state of a reused agent id");
            }
        }
    }

    /// Applies a change of a few agents without touching the others: `gone` leave (their
    /// entries and the interfaces they named), `now` (compiled alone) take their place or
    /// come new, `instances` becomes the instance table, and `fresh` ids are cleared first.
    /// Any error leaves everything as it was.
    pub(super) fn apply_agents(
        &mut self,
        gone: &[Agent],
        now: &[Agent],
        fresh: &[u32],
        instances: Instances,
        why: &str,
    ) -> Result<u64, String> {
        let started = Instant::now();
        let current = self
            .current
            .as_ref()
            .ok_or("no policy of this daemon is enforcing yet")?;
        let limits = &self.config.limits;
        let fragment = compile::compile_agents(&current.policy, now, limits, &if_index)
            .map_err(|e| format!("{why}: {}", error_chain(&e)))?;
        let ids = gone.iter().map(|a| a.id).collect();
        let names: Vec<String> = gone.iter().flat_map(|a| a.interfaces.clone()).collect();
        let who = now.first().or(gone.first()).map_or("", |a| a.name.as_str());
        let next: Compiled = current
            .compiled
            .clone()
            .replace_agents(&ids, &names, fragment, limits, who)
            .map_err(|e| format!("{why}: {}", error_chain(&e)))?;
        self.reset_fresh_ids(fresh.iter().copied());
        let generation = self
            .dataplane
            .apply(&next)
            .map_err(|e| format!("{why}: {}", error_chain(&e)))?;
        let micros = started.elapsed().as_micros() as u64;
        self.instances = instances;
        let staying: BTreeSet<u32> = now.iter().map(|a| a.id).collect();
        self.forget_overrides(gone.iter().map(|a| a.id).filter(|id| !staying.contains(id)));
        let current = self.current.as_mut().expect("checked above");
        current.compiled = next;
        let agents = self.instances.agents(&current.policy);
        current.policy.set_instances(agents);
        self.status.generation = generation;
        self.status.agents = super::agent_names(&current.policy);
        self.status.apply_micros = micros;
        tracing::info!(generation, why, micros, "agents applied");
        // The file's digest is unchanged (instances are not in it): no need to hash it again.
        let by_id = self.status.agents.clone();
        self.audit.send_modify(|context| {
            context.generation = generation;
            context.agents = by_id;
        });
        self.inspect_policy
            .send_replace(Some(Arc::new(current.policy.clone())));
        // The maps first, then the hooks: a new interface's first packet meets its policy.
        let touched: Vec<String> = names
            .into_iter()
            .chain(now.iter().flat_map(|a| a.interfaces.clone()))
            .collect();
        self.attach_some(&touched);
        self.save_instances();
        if let Err(e) = self.status.write(&self.config.runtime_dir) {
            tracing::warn!(error = %error_chain(&e), "writing status.json");
        }
        self.publish();
        Ok(generation)
    }

    /// Follows a reconcile of the instance table with the host's interfaces, plus the
    /// document's agents whose interfaces `changed` (appeared, went, or have a new index).
    pub(super) fn follow(&mut self, changed: &[String], why: &str) {
        let Some(current) = self.current.as_ref() else {
            return;
        };
        let mut instances = self.instances.clone();
        let Reconciled {
            added,
            removed,
            unassigned,
        } = instances.reconcile(&current.policy, &self.links);
        if !unassigned.is_empty() {
            tracing::error!(
                interfaces = ?unassigned,
                max_agents = self.config.limits.max_agents,
                "sandbox interfaces match a profile but every agent id is taken: their traffic is no agent's until ids free up (raise max_agents)"
            );
        }
        // Agents that stay but whose interfaces changed (the document's, and instances a
        // runtime added before their interface existed): compiled again, so the interface
        // map follows.
        let moving: BTreeSet<u32> = removed.iter().map(|i| i.id).collect();
        let statics: Vec<Agent> = current
            .policy
            .agents()
            .iter()
            .filter(|a| !moving.contains(&a.id))
            .filter(|a| a.interfaces.iter().any(|i| changed.contains(i)))
            .cloned()
            .collect();
        let by_id = |id: u32| current.policy.agents().iter().find(|a| a.id == id).cloned();
        let mut gone: Vec<Agent> = removed.iter().filter_map(|i| by_id(i.id)).collect();
        gone.extend(statics.iter().cloned());
        let mut now: Vec<Agent> = added
            .iter()
            .filter_map(|i| {
                current
                    .policy
                    .profile(&i.profile)
                    .map(|p| p.instance(i.id, &i.interface, &i.prefixes))
            })
            .collect();
        now.extend(statics);
        // Interfaces that only the configuration names still want their hook.
        let config_named: Vec<String> = self
            .config
            .interfaces
            .iter()
            .filter(|i| changed.contains(i))
            .cloned()
            .collect();
        if gone.is_empty() && now.is_empty() {
            self.attach_some(&config_named);
            return;
        }
        let fresh: Vec<u32> = added.iter().map(|i| i.id).collect();
        match self.apply_agents(&gone, &now, &fresh, instances, why) {
            Ok(_) => {
                for i in &added {
                    tracing::info!(agent = %i.name(), id = i.id, "sandbox interface appeared: agent instance made");
                }
                for i in &removed {
                    tracing::info!(agent = %i.name(), id = i.id, "agent instance removed");
                }
                self.attach_some(&config_named);
            }
            Err(message) => {
                tracing::error!(why, error = %message, "following interface changes; the previous policy keeps enforcing");
                self.status.last_error = Some(message);
            }
        }
    }

    /// `agent add`: a sandbox the runtime names itself. Saved before it enforces; if the
    /// kernel refuses it, the saved table is put back.
    pub(super) fn add_instance(
        &mut self,
        profile: &str,
        interface: &str,
        prefixes: &[String],
        peer: Option<&Peer>,
    ) -> Result<Value, String> {
        let current = self
            .current
            .as_ref()
            .ok_or("no policy of this daemon is enforcing yet")?;
        let prefixes = prefixes
            .iter()
            .map(|p| p.parse::<IpNet>().map_err(|e| format!("prefix {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let origin = Origin::Added {
            uid: peer.map_or(0, |p| p.uid),
            pid: peer.and_then(|p| p.pid).map_or(0, |p| p as u32),
        };
        let mut instances = self.instances.clone();
        let instance = instances
            .add(&current.policy, profile, interface, prefixes, origin)
            .map_err(|e| error_chain(&e))?;
        let agent = current
            .policy
            .profile(profile)
            .map(|p| p.instance(instance.id, &instance.interface, &instance.prefixes))
            .ok_or_else(|| format!("no profile {profile:?} in the enforcing policy"))?;
        instances.save(&self.instances_path()).map_err(|e| {
            format!(
                "not added: the agent instance table cannot be saved ({}); under the systemd unit state_dir must be below ReadWritePaths=",
                error_chain(&e)
            )
        })?;
        match self.apply_agents(&[], &[agent], &[instance.id], instances, "agent add") {
            Ok(generation) => Ok(self.instance_json(&instance, generation)),
            Err(message) => {
                self.save_instances();
                Err(message)
            }
        }
    }

    /// `agent remove`: any instance, by name, interface or id. Saved first as well.
    pub(super) fn remove_instance(&mut self, key: &str) -> Result<Value, String> {
        let current = self
            .current
            .as_ref()
            .ok_or("no policy of this daemon is enforcing yet")?;
        if self.instances.get(key).is_none()
            && let Some(a) = current
                .policy
                .own_agents()
                .iter()
                .find(|a| a.name == key || key.parse::<u32>().ok() == Some(a.id))
        {
            return Err(format!(
                "agent {:?} is the policy's own: remove it from the policy file instead",
                a.name
            ));
        }
        let mut instances = self.instances.clone();
        let instance = instances.remove(key).map_err(|e| error_chain(&e))?;
        let gone: Vec<Agent> = current
            .policy
            .agents()
            .iter()
            .filter(|a| a.id == instance.id)
            .cloned()
            .collect();
        instances.save(&self.instances_path()).map_err(|e| {
            format!(
                "not removed: the agent instance table cannot be saved ({})",
                error_chain(&e)
            )
        })?;
        match self.apply_agents(&gone, &[], &[], instances, "agent remove") {
            Ok(generation) => Ok(self.instance_json(&instance, generation)),
            Err(message) => {
                self.save_instances();
                Err(message)
            }
        }
    }

    /// What `agent add` and `agent remove` answer.
    fn instance_json(&self, instance: &Instance, generation: u64) -> Value {
        json!({
            "id": instance.id,
            "name": instance.name(),
            "profile": instance.profile,
            "interface": instance.interface,
            "prefixes": instance.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "generation": generation,
            "attached": self.status.interfaces.contains(&instance.interface),
            "pending": self.status.pending.contains(&instance.interface),
        })
    }
}
