//! The controller's record calls: facts about machines that change no status (enlistment,
//! agent progress, heartbeats, the per-boot agent token, the image-installed mark) and the
//! appliance's other records (SSH keys, boot resources, tokens), plus the reads the API
//! serves. With [`Controller::apply`] these are the only code that writes the store, so
//! every write appends its events and wakes the event streams in one place.

use std::net::IpAddr;

use stork_proto::api::{AgentIdentity, AuditRecord, NewToken};
use stork_proto::{Inventory, MacAddr};

use super::boot::{self, BootChoice, HEARTBEAT_STATUSES, TokenGrant, choose};
use super::{Controller, Status};
use crate::store::{
    BootResource, EventRecord, Machine, MachineQuery, NamedLayout, NewEvent, Script, ScriptResult,
    SshKey, StoreError, TokenRecord, now_ms,
};

/// A new random machine or record id: 12 hex digits.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn agent_event(at: i64, status: Option<Status>, message: &str) -> NewEvent {
    NewEvent {
        at,
        actor: "agent".into(),
        old_status: status,
        new_status: None,
        message: message.into(),
    }
}

/// The boot NIC first, then the inventory's other NICs.
pub fn machine_macs(boot: MacAddr, inv: &Inventory) -> Vec<MacAddr> {
    let mut macs = vec![boot];
    macs.extend(inv.nics.iter().map(|n| n.mac).filter(|m| *m != boot));
    macs
}

/// How the event that marks a served agent boot script begins (the UI's timeline reads it).
pub const BOOT_SCRIPT_EVENT: &str = "boot script served";

/// A machine's per-boot agent credentials, made when its boot script is served.
pub struct AgentBoot {
    pub machine: Machine,
    /// Shown once, in the boot script; only its hash is stored.
    pub token: String,
}

impl Controller {
    // ---- reads ----

    pub async fn machines(&self) -> Result<Vec<Machine>, StoreError> {
        self.store.call(|s| s.list_machines()).await
    }

    /// The MACs of the machines that network-boot the signed chain.
    pub async fn signed_boot_macs(&self) -> Result<Vec<stork_proto::MacAddr>, StoreError> {
        self.store.call(|s| s.signed_boot_macs()).await
    }

    /// One page of the machines `q` selects, and how many it selects in all.
    pub async fn machine_page(&self, q: MachineQuery) -> Result<(u64, Vec<Machine>), StoreError> {
        self.store.call(move |s| s.machine_page(&q)).await
    }

    /// [`Controller::machine_page`] as summaries, from stored columns only.
    pub async fn machine_summaries(
        &self,
        q: MachineQuery,
    ) -> Result<(u64, Vec<stork_proto::api::MachineSummary>), StoreError> {
        self.store.call(move |s| s.machine_summaries(&q)).await
    }

    /// The newest agent event of each of `ids`.
    pub async fn latest_agent_events(
        &self,
        ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, EventRecord>, StoreError> {
        self.store.call(move |s| s.latest_agent_events(&ids)).await
    }

    /// The newest event's id: a live view streams the events after it.
    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        self.store.call(|s| s.last_event_id()).await
    }

    /// Records the power state a driver just reported for machine `id`. Callers record it
    /// before the event that tells of it, so whoever the event wakes reads the new state.
    pub async fn power_seen(&self, id: &str, state: crate::power::PowerState) {
        let id = id.to_string();
        let at = crate::store::now_ms();
        let who = id.clone();
        if let Err(e) = self
            .store
            .call(move |s| s.set_power_state(&id, state, at))
            .await
        {
            tracing::warn!(machine = %who, error = %e, "cannot record the power state");
        }
    }

    /// By id or MAC.
    pub async fn machine(&self, key: &str) -> Result<Machine, StoreError> {
        let key = key.to_string();
        self.store.call(move |s| s.get_machine(&key)).await
    }

    /// Events after `after`, of the machine `key` names (by id or MAC) or of all.
    pub async fn events(
        &self,
        key: Option<String>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.store
            .call(move |s| match key {
                Some(k) => {
                    let m = s.get_machine(&k)?;
                    s.events(Some(&m.id), after, limit)
                }
                None => s.events(None, after, limit),
            })
            .await
    }

    /// Events after `after`, of the machine with this stored id (none if there is no such
    /// machine) or of all.
    pub async fn events_by_id(
        &self,
        id: Option<String>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.store
            .call(move |s| s.events(id.as_deref(), after, limit))
            .await
    }

    /// What a deploy task needs besides the machine: its image and every registered key.
    pub async fn deploy_inputs(
        &self,
        image: &str,
    ) -> Result<(Option<BootResource>, Vec<SshKey>), StoreError> {
        let name = image.to_string();
        self.store
            .call(move |s| Ok((s.boot_resource(&name)?, s.ssh_keys()?)))
            .await
    }

    pub async fn ssh_keys(&self) -> Result<Vec<SshKey>, StoreError> {
        self.store.call(|s| s.ssh_keys()).await
    }

    pub async fn boot_resources(&self) -> Result<Vec<BootResource>, StoreError> {
        self.store.call(|s| s.boot_resources()).await
    }

    /// Every static address deploys hold in `site` (a machine's; `""` for none), and the
    /// machine holding it.
    pub async fn static_addresses(
        &self,
        site: Option<&str>,
    ) -> Result<Vec<(std::net::IpAddr, String)>, StoreError> {
        let site = site.unwrap_or_default().to_string();
        self.store.call(move |s| s.static_addresses(&site)).await
    }

    pub async fn boot_resource(&self, name: &str) -> Result<Option<BootResource>, StoreError> {
        let name = name.to_string();
        self.store.call(move |s| s.boot_resource(&name)).await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.store.call(|s| s.list_tokens()).await
    }

    /// The admin token with this hash.
    pub async fn admin_token(&self, hash: String) -> Result<Option<TokenRecord>, StoreError> {
        self.store.call(move |s| s.token_by_hash(&hash)).await
    }

    /// Who holds the token with this hash: a machine's agent, an admin, or nobody.
    pub async fn token_holder(
        &self,
        hash: String,
    ) -> Result<(Option<Machine>, Option<TokenRecord>), StoreError> {
        self.store
            .call(move |s| Ok((s.machine_by_agent_token(&hash)?, s.token_by_hash(&hash)?)))
            .await
    }

    // ---- machine records ----

    /// Adds a machine by hand; its history starts with the change to New.
    pub async fn create_machine(&self, m: Machine, actor: &str) -> Result<Machine, StoreError> {
        let ev = NewEvent {
            at: m.created_at,
            actor: actor.to_string(),
            old_status: None,
            new_status: Some(Status::New),
            message: "created".into(),
        };
        let saved = self.store.call(move |s| s.create_machine(&m, &ev)).await?;
        self.notify();
        Ok(saved)
    }

    pub async fn delete_machine(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.store
            .call(move |s| {
                let m = s.get_machine(&key)?;
                s.delete_machine(&m.id)
            })
            .await
    }

    /// An agent enlists the machine it booted on: a new machine, or a New one enlisting
    /// again with a fresh inventory. Any other status refuses (recorded).
    pub async fn enlist(&self, mac: MacAddr, inv: Inventory) -> Result<Machine, StoreError> {
        // It booted on this appliance's network: this site serves it.
        let site = self.site().map(str::to_string);
        let result = self
            .store
            .call(move |st| {
                let now = now_ms();
                let macs = machine_macs(mac, &inv);
                match st.find_by_mac(mac)? {
                    Some(mut m) if m.status == Status::New => {
                        m.inventory = Some(inv);
                        m.site = site.or(m.site);
                        m.macs = macs;
                        m.updated_at = now;
                        let ev =
                            agent_event(now, Some(m.status), "enlisted again; inventory updated");
                        st.save_machine(&m, &[ev])
                    }
                    Some(m) => {
                        let ev = agent_event(
                            now,
                            Some(m.status),
                            "rejected: enlistment of a machine that is not New",
                        );
                        st.add_event(&m.id, &ev)?;
                        Err(StoreError::Conflict {
                            id: m.id,
                            expected: m.version,
                        })
                    }
                    None => {
                        let mut m = Machine::new(new_id(), macs, now);
                        m.inventory = Some(inv);
                        m.site = site;
                        // The creation is a status change (to New), like a machine added by
                        // hand, so every history starts with one.
                        let ev = NewEvent {
                            new_status: Some(Status::New),
                            ..agent_event(now, None, "enlisted")
                        };
                        st.create_machine(&m, &ev)
                    }
                }
            })
            .await;
        self.notify();
        result
    }

    /// A report from an agent without a token (it failed while enlisting): an event on the
    /// machine with that MAC; whether there was one.
    pub async fn agent_report(&self, mac: MacAddr, message: String) -> Result<bool, StoreError> {
        let known = self
            .store
            .call(move |st| match st.find_by_mac(mac)? {
                Some(m) => st
                    .add_event(&m.id, &agent_event(now_ms(), Some(m.status), &message))
                    .map(|_| true),
                None => Ok(false),
            })
            .await?;
        self.notify();
        Ok(known)
    }

    /// An agent's progress line on machine `id`.
    pub async fn agent_progress(&self, id: &str, text: String) -> Result<(), StoreError> {
        let id = id.to_string();
        self.store
            .call(move |st| {
                let m = st.get_machine(&id)?;
                st.add_event(&m.id, &agent_event(now_ms(), Some(m.status), &text))
            })
            .await?;
        self.notify();
        Ok(())
    }

    /// Records a heartbeat while the machine's status expects them; `deadline` `None` means
    /// the agent is leaving (no more heartbeats this boot), which is noted in the history.
    /// Returns whether it was recorded.
    pub async fn heartbeat(
        &self,
        id: &str,
        step: String,
        now: i64,
        deadline: Option<i64>,
    ) -> Result<bool, StoreError> {
        let leaving = deadline
            .is_none()
            .then(|| format!("agent handing over after step {step}; heartbeats stop"));
        let key = id.to_string();
        let recorded = self
            .store
            .call(move |st| st.record_heartbeat(&key, &HEARTBEAT_STATUSES, now, &step, deadline))
            .await?;
        // Leaving is once per boot and explains the silence after it: worth a history line.
        if let Some(note) = leaving.filter(|_| recorded) {
            self.note(id, "agent", note).await?;
        }
        Ok(recorded)
    }

    /// The agent wrote the image: the next boot is from disk, and the machine stays
    /// Deploying until the installed OS phones home. Only while Deploying: otherwise the
    /// refusal is recorded and `false` returned.
    pub async fn image_installed(&self, mut m: Machine) -> Result<bool, StoreError> {
        let status = m.status;
        if status != Status::Deploying {
            let msg = format!("rejected: image installed reported while {status}");
            let id = m.id.clone();
            self.store
                .call(move |st| st.add_event(&id, &agent_event(now_ms(), Some(status), &msg)))
                .await?;
            self.notify();
            return Ok(false);
        }
        m.netboot = false;
        // The agent reboots into the installed OS, which takes minutes to phone home: its
        // silence from now on is expected, and only the status timeout applies.
        m.heartbeat_deadline = None;
        m.updated_at = now_ms();
        let ev = agent_event(
            m.updated_at,
            Some(status),
            "image installed; next boot from disk",
        );
        let saved = self
            .store
            .call(move |st| st.save_machine(&m, &[ev]))
            .await?;
        self.notify();
        self.boot_disk_next(&saved).await;
        Ok(true)
    }

    /// What the machine with `mac` boots now, asked from `from`; for the agent, this boot's
    /// token when [`boot::grant`] gives it (a new token replaces an unused one from the
    /// same address). `lease` is the MAC's lease, of `from`'s family, where this appliance leases them.
    pub async fn boot(
        &self,
        mac: MacAddr,
        from: IpAddr,
        lease: Option<Option<IpAddr>>,
    ) -> Result<(BootChoice, Option<AgentBoot>), StoreError> {
        let site = self.site().map(str::to_string);
        let (choice, agent) = self
            .store
            .call(move |st| {
                let m = st.find_by_mac(mac)?;
                let choice = choose(m.as_ref());
                tracing::info!(%mac, %from, ?choice, "serving iPXE script");
                let agent = match (&choice, m) {
                    (BootChoice::Agent { .. }, Some(mut m)) => {
                        match boot::grant(&m.agent, from, lease) {
                            TokenGrant::Issue => {
                                let (token, hash) =
                                    crate::auth::generate(crate::auth::AGENT_PREFIX);
                                m.agent = AgentIdentity {
                                    token_hash: Some(hash),
                                    ip: Some(boot::canonical(from)),
                                    used: false,
                                };
                                m.updated_at = now_ms();
                                // It boots on this appliance's network: from now on this
                                // site does its power actions.
                                m.site = site.or(m.site);
                                // The end of the firmware's part of the boot (power-on, DHCP,
                                // PXE): the timeline's first phase ends here.
                                let ev = NewEvent {
                                    at: m.updated_at,
                                    actor: "boot".into(),
                                    old_status: None,
                                    new_status: None,
                                    message: format!(
                                        "{BOOT_SCRIPT_EVENT} with an agent token, to {from}"
                                    ),
                                };
                                let machine = st.save_machine(&m, &[ev])?;
                                Some(Ok(AgentBoot { machine, token }))
                            }
                            TokenGrant::Refuse(why) => Some(Err((m.id, why))),
                        }
                    }
                    _ => None,
                };
                Ok((choice, agent))
            })
            .await?;
        match agent {
            Some(Err((id, why))) => {
                tracing::warn!(machine = %id, %mac, %from, reason = %why, "boot script served without the agent token");
                self.note(
                    &id,
                    "controller",
                    format!("boot script for {mac} asked from {from}: no agent token ({why})"),
                )
                .await?;
                Ok((choice, None))
            }
            Some(Ok(a)) => Ok((choice, Some(a))),
            None => Ok((choice, None)),
        }
    }

    /// The agent has used its token (by its hash): no boot script gives another this boot.
    pub async fn agent_token_used(&self, hash: String) -> Result<(), StoreError> {
        self.store
            .call(move |st| st.mark_agent_token_used(&hash))
            .await
            .map(drop)
    }

    // ---- the appliance's other records ----

    pub async fn add_ssh_key(&self, name: String, key: String) -> Result<SshKey, StoreError> {
        let rec = SshKey {
            id: new_id(),
            name,
            key: key.trim().to_string(),
            created_at: now_ms(),
        };
        let out = rec.clone();
        self.store.call(move |s| s.add_ssh_key(&rec)).await?;
        Ok(out)
    }

    /// Whether there was such a key.
    pub async fn delete_ssh_key(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.store.call(move |s| s.delete_ssh_key(&id)).await
    }

    pub async fn scripts(&self) -> Result<Vec<Script>, StoreError> {
        self.store.call(|s| s.scripts()).await
    }

    pub async fn put_script(&self, sc: Script) -> Result<(), StoreError> {
        self.store.call(move |s| s.put_script(&sc)).await
    }

    /// Whether there was such a script.
    pub async fn delete_script(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.store.call(move |s| s.delete_script(&name)).await
    }

    pub async fn put_layout(&self, l: NamedLayout) -> Result<(), StoreError> {
        self.store.call(move |s| s.put_layout(&l)).await
    }

    pub async fn layouts(&self) -> Result<Vec<NamedLayout>, StoreError> {
        self.store.call(|s| s.layouts()).await
    }

    pub async fn layout(&self, name: &str) -> Result<Option<NamedLayout>, StoreError> {
        let name = name.to_string();
        self.store.call(move |s| s.layout(&name)).await
    }

    /// See [`crate::store::Store::delete_layout`].
    pub async fn delete_layout(&self, name: &str) -> Result<Result<bool, Vec<String>>, StoreError> {
        let name = name.to_string();
        self.store.call(move |s| s.delete_layout(&name)).await
    }

    /// Sets (`Some`) or clears setting `what` of machine `m` (`set` puts the value in
    /// place: the default layout, the minimum kernel) with an event by `actor` saying what
    /// it is now.
    pub async fn set_machine_setting(
        &self,
        mut m: Machine,
        what: &str,
        value: Option<String>,
        set: fn(&mut Machine, Option<String>),
        actor: &str,
    ) -> Result<Machine, StoreError> {
        m.updated_at = now_ms();
        let ev = NewEvent {
            at: m.updated_at,
            actor: actor.to_string(),
            old_status: None,
            new_status: None,
            message: match &value {
                Some(v) => format!("{what}: {v}"),
                None => format!("{what} cleared"),
            },
        };
        set(&mut m, value);
        let saved = self
            .store
            .call(move |st| st.save_machine(&m, &[ev]))
            .await?;
        self.notify();
        Ok(saved)
    }

    pub async fn put_script_result(&self, id: &str, r: ScriptResult) -> Result<(), StoreError> {
        let id = id.to_string();
        self.store.call(move |s| s.put_script_result(&id, &r)).await
    }

    pub async fn script_results(&self, id: &str) -> Result<Vec<ScriptResult>, StoreError> {
        let id = id.to_string();
        self.store.call(move |s| s.script_results(&id)).await
    }

    pub async fn clear_script_results(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.store.call(move |s| s.clear_script_results(&id)).await
    }

    /// Whether there was such a resource.
    pub async fn delete_boot_resource(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.store
            .call(move |s| s.delete_boot_resource(&name))
            .await
    }

    pub async fn put_boot_resource(&self, r: BootResource) -> Result<(), StoreError> {
        self.store
            .call(move |s| s.put_boot_resource(&r, now_ms()))
            .await
    }

    /// A new API token: its record, and the token itself (shown once).
    pub async fn create_token(&self, req: NewToken) -> Result<(TokenRecord, String), StoreError> {
        self.store
            .call(move |s| crate::auth::create_token(s, &req))
            .await
    }

    pub async fn revoke_token(&self, id: String) -> Result<TokenRecord, StoreError> {
        self.store
            .call(move |s| s.revoke_token(&id, now_ms()))
            .await
    }

    /// Records a change asked through the API (the audit log).
    pub async fn audit(&self, entry: AuditRecord) -> Result<(), StoreError> {
        self.store.call(move |s| s.add_audit(&entry)).await
    }

    pub async fn audit_log(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.store.call(move |s| s.audit(after, limit)).await
    }
}
