//! The agent link over the bus: the control plane's side sends a plan's commands to each site's
//! agent (stored first, then published on `hcp.agent.<site>.commands`), and an agent's side takes
//! them (at most once per id, refusing older epochs: `hcp_fleet::wire::Inbox`), hands them to its
//! devices and publishes its acknowledgements on `hcp.agent.<site>.acks`.
//!
//! The messages are `hcp_fleet::wire`'s bytes. This is the link `hcp bench switching
//! --end-to-end` measures; a site agent process outside the platform speaks the same messages.
//!
//! What it must never do: publish a batch that is not stored (storage first, then the bus), or
//! decide anything (which commands, to whom: the engine did).

use std::time::{SystemTime, UNIX_EPOCH};

use hcp_bus::{Bus, From};
use hcp_fleet::Command;
use hcp_fleet::wire::{self, AckBatch, BatchHeader, Inbox};
use hcp_model::fleet::Fleet;
use hcp_store::{CommandBatchRow, Store};

/// Commands per message: even as single-command runs (37 bytes), 20,000 stay under the bus's 1 MiB
/// message limit.
pub const BATCH_COMMANDS: usize = 20_000;

pub fn commands_subject(site_id: &str) -> String {
    format!("hcp.agent.{site_id}.commands")
}

pub fn acks_subject(site_id: &str) -> String {
    format!("hcp.agent.{site_id}.acks")
}

/// Microseconds since the Unix epoch: the stamp a batch carries (for latency only; two machines
/// compare them only as well as their clocks agree).
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// What sending one plan's commands took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub batches: usize,
    pub commands: usize,
    /// The batches' bytes (stored and published alike).
    pub bytes: usize,
    /// Encoded and stored (one transaction), microseconds of the clock of [`now_us`].
    pub stored_us: i64,
    /// The last batch published.
    pub published_us: i64,
}

/// The control plane's side.
pub struct Sender {
    pub store: Store,
    pub bus: Bus,
    /// The dispatcher's epoch (fencing).
    pub epoch: u64,
    /// Each device's site (index into the fleet's sites) and the sites' ids.
    site_of: Vec<u32>,
    site_ids: Vec<String>,
}

/// Whether a site id can be a token of a bus subject (checked before anything is stored).
fn subject_token(site_id: &str) -> bool {
    !site_id.is_empty() && site_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Sender {
    /// A sender for a fleet whose site ids can name bus subjects (letters, digits, `-`, `_`).
    pub fn new(fleet: &Fleet, store: Store, bus: Bus, epoch: u64) -> anyhow::Result<Sender> {
        if let Some(bad) = fleet.sites.iter().find(|s| !subject_token(&s.id)) {
            anyhow::bail!(
                "sites.id: {:?} must be letters, digits, '-' or '_' to name the agent link's subjects",
                bad.id
            );
        }
        Ok(Sender {
            store,
            bus,
            epoch,
            site_of: fleet.devices.iter().map(|d| u32::from(d.site.0)).collect(),
            site_ids: fleet.sites.iter().map(|s| s.id.clone()).collect(),
        })
    }

    /// Sends commands to their sites' agents: split by site into batches, all stored in one
    /// transaction, then published site by site. A command for a device not in the fleet is an
    /// error and nothing is sent.
    pub async fn send(&self, commands: &[Command], issued_ms: i64) -> anyhow::Result<Sent> {
        let mut per_site: Vec<Vec<Command>> = vec![Vec::new(); self.site_ids.len()];
        for c in commands {
            let site = self
                .site_of
                .get(c.device.index())
                .ok_or_else(|| anyhow::anyhow!("commands.device: {} is not a device of the fleet", c.device.0))?;
            per_site[*site as usize].push(*c);
        }
        let sent_us = now_us();
        let mut rows = vec![];
        for (s, cmds) in per_site.iter().enumerate() {
            for chunk in cmds.chunks(BATCH_COMMANDS) {
                let header = BatchHeader { epoch: self.epoch, site: s as u32, sent_us };
                rows.push(CommandBatchRow {
                    seq: 0,
                    epoch: self.epoch as i64,
                    site_id: self.site_ids[s].clone(),
                    issued_ms,
                    first_id: chunk.iter().map(|c| c.id).min().unwrap_or(0) as i64,
                    last_id: chunk.iter().map(|c| c.id).max().unwrap_or(0) as i64,
                    commands: chunk.len() as i64,
                    body: wire::encode_commands(&header, chunk),
                });
            }
        }
        self.store.add_command_batches(&rows).await?;
        let stored_us = now_us();
        for r in &rows {
            self.bus.publish(&commands_subject(&r.site_id), &r.body).await?;
        }
        let bytes = rows.iter().map(|r| r.body.len()).sum();
        Ok(Sent { batches: rows.len(), commands: commands.len(), bytes, stored_us, published_us: now_us() })
    }
}

/// One site's agent on the bus: takes each command batch for its site (a batch that does not
/// decode, or names another site, is logged and skipped: the sender will time its commands out),
/// gives the commands to take to `apply`, and publishes the answers, in messages of at most
/// [`BATCH_COMMANDS`] (a failed publish is logged: the sender times those commands out and
/// retries them). Runs until the bus closes.
/// `ready` is told once the subscription is in place.
pub async fn run_agent(
    bus: Bus,
    site_id: String,
    site: u32,
    mut inbox: Inbox,
    mut apply: impl FnMut(&[Command]) + Send,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let mut sub = bus.subscribe(&commands_subject(&site_id), From::New).await?;
    let _ = ready.send(());
    let acks_to = acks_subject(&site_id);
    let (mut take, mut acks) = (Vec::new(), Vec::new());
    loop {
        let m = sub.next().await?;
        let received_us = now_us();
        let batch = match wire::decode_commands(&m.payload) {
            Ok(b) if b.header.site == site => b,
            Ok(b) => {
                tracing::warn!(site = %site_id, named = b.header.site, "agent link: a batch for another site, skipped");
                continue;
            }
            Err(e) => {
                tracing::warn!(site = %site_id, error = %e, "agent link: a batch that does not decode, skipped");
                continue;
            }
        };
        take.clear();
        acks.clear();
        inbox.take(&batch, &mut take, &mut acks);
        apply(&take);
        for chunk in acks.chunks(BATCH_COMMANDS) {
            let out = AckBatch {
                header: BatchHeader { sent_us: now_us(), ..batch.header },
                received_us,
                acks: chunk.to_vec(),
            };
            if let Err(e) = bus.publish(&acks_to, &wire::encode_acks(&out)).await {
                tracing::warn!(site = %site_id, error = %e, "agent link: acknowledgements not published");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_fleet::Target;
    use hcp_fleet::wire::Answer;
    use hcp_model::ids::DeviceIdx;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn commands_are_stored_before_they_reach_the_agents_and_taken_once() {
        let fleet = hcp_model::fleet::Fleet::from_toml(
            "small.toml",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/fleets/small.toml")),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("hcp-agentlink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite:{}", dir.join("s.db").display())).await.unwrap();
        store.migrate().await.unwrap();
        let bus = Bus::connect(None, Default::default()).await.unwrap();
        let applied: Arc<Mutex<Vec<Command>>> = Arc::default();
        let mut agents = vec![];
        for s in &fleet.sites {
            let members =
                (0..fleet.devices.len() as u32).map(DeviceIdx).filter(|x| fleet.devices[x.index()].site == s.idx);
            let inbox = Inbox::new(fleet.devices.len(), members);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let applied = applied.clone();
            agents.push(tokio::spawn(run_agent(
                bus.clone(),
                s.id.clone(),
                u32::from(s.idx.0),
                inbox,
                move |c: &[Command]| applied.lock().unwrap().extend_from_slice(c),
                tx,
            )));
            rx.await.unwrap();
        }
        let mut acks = bus.subscribe("hcp.agent.*.acks", From::New).await.unwrap();
        let cmds: Vec<Command> = (0..fleet.devices.len() as u32)
            .map(|i| Command {
                id: 1 + u64::from(i),
                device: DeviceIdx(i),
                target: Target::Sleep,
                attempt: 1,
                deadline_ms: 10_000,
            })
            .collect();
        let sender = Sender::new(&fleet, store.clone(), bus.clone(), 5).unwrap();
        let sent = sender.send(&cmds, 1_000).await.unwrap();
        assert_eq!(sent.commands, cmds.len());
        // Stored before published: every batch is in storage, bytes as sent.
        let mut stored = 0;
        for s in &fleet.sites {
            for b in store.command_batches(&s.id, 0, 100).await.unwrap() {
                stored += wire::decode_commands(&b.body).unwrap().commands.len();
            }
        }
        assert_eq!(stored, cmds.len());
        let mut answered = 0;
        while answered < cmds.len() {
            let a = wire::decode_acks(&acks.next().await.unwrap().payload).unwrap();
            assert!(a.acks.iter().all(|x| x.2 == Answer::Accepted));
            answered += a.acks.len();
        }
        assert_eq!(applied.lock().unwrap().len(), cmds.len());
        // The same commands again (a resend): answered as duplicates, nothing applied twice; an
        // older epoch's batch is refused.
        sender.send(&cmds[..3], 1_001).await.unwrap();
        let old = Sender::new(&fleet, store.clone(), bus.clone(), 4).unwrap();
        let mut fresh = cmds[3];
        fresh.id = 999_999;
        old.send(&[fresh], 1_002).await.unwrap();
        let mut seen = vec![];
        while seen.len() < 4 {
            seen.extend(wire::decode_acks(&acks.next().await.unwrap().payload).unwrap().acks);
        }
        assert_eq!(seen.iter().filter(|x| x.2 == Answer::Duplicate).count(), 3);
        assert!(seen.contains(&(999_999, DeviceIdx(fresh.device.0), Answer::StaleEpoch)));
        assert_eq!(applied.lock().unwrap().len(), cmds.len());
        // A site id that cannot name a subject is refused before anything is stored.
        let mut dotted = fleet.clone();
        dotted.sites[0].id = "tx.south".into();
        let e = Sender::new(&dotted, store.clone(), bus.clone(), 6).err().unwrap();
        assert!(e.to_string().contains("sites.id"), "{e}");
        // A command for a device outside the fleet sends nothing.
        let bad = Command { device: DeviceIdx(u32::MAX), ..cmds[0] };
        assert!(sender.send(&[bad], 1_003).await.is_err());
        for a in agents {
            a.abort();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
