//! The agent link's messages: a batch of commands for one site's agent, and the agent's
//! acknowledgements, in a compact binary form. Commands travel as runs: consecutive ids to
//! consecutive devices with the same target, attempt and deadline are one 37-byte run (a plan
//! changes whole groups of identical devices, numbered together, so a grid event's 250,000 sleeps
//! are a few hundred runs, kilobytes rather than the 15 MB JSON would take); acknowledgements
//! likewise (17 bytes a run). The transport (the bus today; the site agent's own link later)
//! carries the bytes; the control plane stores the same bytes before it sends them.
//!
//! An agent applies a command at most once (idempotent by id) and refuses a batch from an epoch
//! older than the newest it has seen ([`Inbox`]): a deposed dispatcher's commands do nothing.
//!
//! Bad bytes give [`Invalid`] naming the field and the rule; nothing is half-decoded, and a batch
//! never expands to more than [`MAX_BATCH`] commands.
//!
//! Architecture invariant: pure (no IO, clock or randomness).

use hcp_model::Invalid;
use hcp_model::ids::DeviceIdx;

use crate::{Command, CommandId, Target};

const COMMANDS_MAGIC: &[u8; 4] = b"HCPC";
const ACKS_MAGIC: &[u8; 4] = b"HCPA";
const VERSION: u8 = 1;
/// magic, version, epoch, site, sent_us, count, runs.
const HEADER: usize = 4 + 1 + 8 + 4 + 8 + 4 + 4;
/// Bytes per run of commands: first id, first device, length, attempt, deadline, kind, power.
pub const RUN_BYTES: usize = 8 + 4 + 4 + 4 + 8 + 1 + 8;
/// Bytes per run of acknowledgements: first id, first device, length, answer.
pub const ACK_RUN_BYTES: usize = 8 + 4 + 4 + 1;
/// The most commands (or acknowledgements) one batch may hold.
pub const MAX_BATCH: usize = 1_000_000;

/// What a batch says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// The dispatcher's epoch (fencing: an agent refuses an older one).
    pub epoch: u64,
    /// The site, as its index in the fleet.
    pub site: u32,
    /// When the sender sent it, in microseconds of the sender's clock (for the latency it took;
    /// never used to decide anything).
    pub sent_us: i64,
}

/// A batch of commands for one site.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandBatch {
    pub header: BatchHeader,
    pub commands: Vec<Command>,
}

/// The agent's answer to one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Taken: it is being applied (its outcome comes with the device's next reports).
    Accepted,
    /// Applied or being applied already (the same id again): nothing done twice.
    Duplicate,
    /// From an epoch older than one the agent has seen: refused.
    StaleEpoch,
    /// Not a device of this agent.
    UnknownDevice,
}

impl Answer {
    fn code(self) -> u8 {
        match self {
            Answer::Accepted => 0,
            Answer::Duplicate => 1,
            Answer::StaleEpoch => 2,
            Answer::UnknownDevice => 3,
        }
    }

    fn from_code(c: u8) -> Option<Answer> {
        Some(match c {
            0 => Answer::Accepted,
            1 => Answer::Duplicate,
            2 => Answer::StaleEpoch,
            3 => Answer::UnknownDevice,
            _ => return None,
        })
    }
}

/// An agent's acknowledgements of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct AckBatch {
    /// The batch's epoch and site; `sent_us` is when the agent sent the acknowledgements.
    pub header: BatchHeader,
    /// When the agent received the batch, in microseconds of its clock.
    pub received_us: i64,
    pub acks: Vec<(CommandId, DeviceIdx, Answer)>,
}

fn put_header(out: &mut Vec<u8>, magic: &[u8; 4], h: &BatchHeader, count: usize, runs: usize) {
    out.extend_from_slice(magic);
    out.push(VERSION);
    out.extend_from_slice(&h.epoch.to_le_bytes());
    out.extend_from_slice(&h.site.to_le_bytes());
    out.extend_from_slice(&h.sent_us.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&(runs as u32).to_le_bytes());
}

/// Splits items into runs: `next(a, b)` says whether `b` continues the run that `a` is the last
/// item of. Returns (start, length) pairs.
fn runs<T>(items: &[T], next: impl Fn(&T, &T) -> bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![];
    for (i, x) in items.iter().enumerate() {
        match out.last_mut() {
            Some((start, len)) if next(&items[*start + *len - 1], x) => *len += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Reads little-endian fields in order; every read checks the length.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Invalid> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| Invalid::new(field, "truncated"))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, Invalid> {
        Ok(self.take(1, f)?[0])
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, Invalid> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, Invalid> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self, f: &'static str) -> Result<i64, Invalid> {
        Ok(i64::from_le_bytes(self.take(8, f)?.try_into().expect("8 bytes")))
    }
    fn f64(&mut self, f: &'static str) -> Result<f64, Invalid> {
        Ok(f64::from_le_bytes(self.take(8, f)?.try_into().expect("8 bytes")))
    }
}

fn get_header<'a>(
    b: &'a [u8],
    magic: &[u8; 4],
    per_run: usize,
) -> Result<(BatchHeader, usize, usize, Reader<'a>), Invalid> {
    let mut r = Reader { b, at: 0 };
    if r.take(4, "magic")? != magic {
        return Err(Invalid::new("magic", "is not this kind of batch"));
    }
    let v = r.u8("version")?;
    if v != VERSION {
        return Err(Invalid::new("version", "must be 1"));
    }
    let h = BatchHeader { epoch: r.u64("epoch")?, site: r.u32("site")?, sent_us: r.i64("sent_us")? };
    let count = r.u32("count")? as usize;
    if count > MAX_BATCH {
        return Err(Invalid::new("count", "must be at most 1000000"));
    }
    let runs = r.u32("runs")? as usize;
    let rest = b.len() - r.at;
    // An acknowledgement batch carries its receive time after the header.
    let body = if magic == ACKS_MAGIC { rest.checked_sub(8) } else { Some(rest) };
    if body != runs.checked_mul(per_run) || runs > count || (runs == 0 && count > 0) {
        return Err(Invalid::new("runs", "must match the batch's length and be at most its count"));
    }
    Ok((h, count, runs, r))
}

/// A run's length, checked against what the batch has left and against overflowing its ids and
/// devices.
fn run_len(r: &mut Reader<'_>, field: &'static str, id: u64, device: u32, left: usize) -> Result<usize, Invalid> {
    let len = r.u32(field)? as usize;
    if len == 0 || len > left {
        return Err(Invalid::new(field, "must be >= 1 and add up to the batch's count"));
    }
    if id.checked_add(len as u64 - 1).is_none() || device.checked_add(len as u32 - 1).is_none() {
        return Err(Invalid::new(field, "must not run past the largest id or device"));
    }
    Ok(len)
}

/// The bytes of a command batch (at most [`MAX_BATCH`] commands: the sender splits). Panics on a
/// command the decoder would refuse (id or attempt 0, a run target whose power is not finite and
/// above 0): the resource manager never makes one.
pub fn encode_commands(header: &BatchHeader, commands: &[Command]) -> Vec<u8> {
    assert!(commands.len() <= MAX_BATCH, "a command batch holds at most {MAX_BATCH} commands");
    assert!(
        commands.iter().all(|c| c.id > 0
            && c.attempt > 0
            && match c.target {
                Target::Sleep => true,
                Target::Run { power_w } => power_w.is_finite() && power_w > 0.0,
            }),
        "a command with id and attempt >= 1 and a finite power above 0"
    );
    let rs = runs(commands, |a, b| {
        a.id.checked_add(1) == Some(b.id)
            && a.device.0.checked_add(1) == Some(b.device.0)
            && b.target == a.target
            && b.attempt == a.attempt
            && b.deadline_ms == a.deadline_ms
    });
    let mut out = Vec::with_capacity(HEADER + rs.len() * RUN_BYTES);
    put_header(&mut out, COMMANDS_MAGIC, header, commands.len(), rs.len());
    for (start, len) in rs {
        let c = &commands[start];
        out.extend_from_slice(&c.id.to_le_bytes());
        out.extend_from_slice(&c.device.0.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&c.attempt.to_le_bytes());
        out.extend_from_slice(&c.deadline_ms.to_le_bytes());
        let (kind, w) = match c.target {
            Target::Sleep => (0u8, 0.0),
            Target::Run { power_w } => (1u8, power_w),
        };
        out.push(kind);
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// A command batch from its bytes.
pub fn decode_commands(b: &[u8]) -> Result<CommandBatch, Invalid> {
    let (header, count, runs, mut r) = get_header(b, COMMANDS_MAGIC, RUN_BYTES)?;
    let mut commands = Vec::with_capacity(count);
    for _ in 0..runs {
        let id = r.u64("commands.id")?;
        let device = r.u32("commands.device")?;
        let len = run_len(&mut r, "commands.len", id, device, count - commands.len())?;
        let attempt = r.u32("commands.attempt")?;
        let deadline_ms = r.i64("commands.deadline_ms")?;
        let kind = r.u8("commands.kind")?;
        let w = r.f64("commands.power_w")?;
        let target = match kind {
            0 => Target::Sleep,
            1 if w.is_finite() && w > 0.0 => Target::Run { power_w: w },
            1 => return Err(Invalid::new("commands.power_w", "must be finite and > 0 to run")),
            _ => return Err(Invalid::new("commands.kind", "must be 0 (sleep) or 1 (run)")),
        };
        if id == 0 || attempt == 0 {
            return Err(Invalid::new("commands.id", "id and attempt must be >= 1"));
        }
        for k in 0..len {
            commands.push(Command {
                id: id + k as u64,
                device: DeviceIdx(device + k as u32),
                target,
                attempt,
                deadline_ms,
            });
        }
    }
    if commands.len() != count {
        return Err(Invalid::new("count", "must equal the commands the runs hold"));
    }
    Ok(CommandBatch { header, commands })
}

/// The bytes of an acknowledgement batch (at most [`MAX_BATCH`] acknowledgements).
pub fn encode_acks(a: &AckBatch) -> Vec<u8> {
    assert!(a.acks.len() <= MAX_BATCH, "an acknowledgement batch holds at most {MAX_BATCH}");
    let rs = runs(&a.acks, |x, y| x.0.checked_add(1) == Some(y.0) && x.1.0.checked_add(1) == Some(y.1.0) && y.2 == x.2);
    let mut out = Vec::with_capacity(HEADER + 8 + rs.len() * ACK_RUN_BYTES);
    put_header(&mut out, ACKS_MAGIC, &a.header, a.acks.len(), rs.len());
    out.extend_from_slice(&a.received_us.to_le_bytes());
    for (start, len) in rs {
        let (id, d, ans) = a.acks[start];
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&d.0.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(ans.code());
    }
    out
}

/// An acknowledgement batch from its bytes.
pub fn decode_acks(b: &[u8]) -> Result<AckBatch, Invalid> {
    let (header, count, runs, mut r) = get_header(b, ACKS_MAGIC, ACK_RUN_BYTES)?;
    let received_us = r.i64("received_us")?;
    let mut acks = Vec::with_capacity(count);
    for _ in 0..runs {
        let id = r.u64("acks.id")?;
        let d = r.u32("acks.device")?;
        let len = run_len(&mut r, "acks.len", id, d, count - acks.len())?;
        let ans = Answer::from_code(r.u8("acks.answer")?).ok_or_else(|| Invalid::new("acks.answer", "must be 0-3"))?;
        acks.extend((0..len).map(|k| (id + k as u64, DeviceIdx(d + k as u32), ans)));
    }
    if acks.len() != count {
        return Err(Invalid::new("count", "must equal the acknowledgements the runs hold"));
    }
    Ok(AckBatch { header, received_us, acks })
}

/// What an agent remembers to apply each command at most once and to refuse older epochs: the
/// newest epoch seen and, per device, the last command id and attempt taken. Command ids only rise
/// (a new dispatcher continues after the stored ones), so an id at or below the last one is a
/// redelivery and does nothing; a retry (the same id, a later attempt: the control plane heard
/// nothing) is handed on again, to a device layer that applies an id once.
#[derive(Clone, Debug)]
pub struct Inbox {
    epoch: u64,
    last: Vec<(CommandId, u32)>,
    mine: Vec<bool>,
}

impl Inbox {
    /// An agent for the listed devices of a fleet of `fleet_len` devices.
    pub fn new(fleet_len: usize, devices: impl IntoIterator<Item = DeviceIdx>) -> Inbox {
        let mut mine = vec![false; fleet_len];
        for d in devices {
            if let Some(m) = mine.get_mut(d.index()) {
                *m = true;
            }
        }
        Inbox { epoch: 0, last: vec![(0, 0); fleet_len], mine }
    }

    /// The newest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sorts a batch: the commands to apply go to `apply`, every command gets its answer in
    /// `acks` (in the batch's order).
    pub fn take(
        &mut self,
        batch: &CommandBatch,
        apply: &mut Vec<Command>,
        acks: &mut Vec<(CommandId, DeviceIdx, Answer)>,
    ) {
        let stale = batch.header.epoch < self.epoch;
        if !stale {
            self.epoch = batch.header.epoch;
        }
        for c in &batch.commands {
            let i = c.device.index();
            let ans = if stale {
                Answer::StaleEpoch
            } else if !self.mine.get(i).copied().unwrap_or(false) {
                Answer::UnknownDevice
            } else if (c.id, c.attempt) <= self.last[i] {
                Answer::Duplicate
            } else {
                self.last[i] = (c.id, c.attempt);
                apply.push(*c);
                Answer::Accepted
            };
            acks.push((c.id, c.device, ans));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmds() -> Vec<Command> {
        vec![
            Command { id: 7, device: DeviceIdx(3), target: Target::Sleep, attempt: 1, deadline_ms: 10_000 },
            Command {
                id: 8,
                device: DeviceIdx(4),
                target: Target::Run { power_w: 3_250.5 },
                attempt: 2,
                deadline_ms: -5,
            },
        ]
    }

    const H: BatchHeader = BatchHeader { epoch: 3, site: 1, sent_us: 123_456 };

    #[test]
    fn batches_round_trip_as_runs() {
        let b = encode_commands(&H, &cmds());
        // Ids 7 and 8 are consecutive, devices 3 and 4 too, but the targets differ: two runs.
        assert_eq!(b.len(), HEADER + 2 * RUN_BYTES);
        assert_eq!(decode_commands(&b).unwrap(), CommandBatch { header: H, commands: cmds() });
        // A group's worth of identical commands is one run.
        let many: Vec<Command> = (0..5_000u32)
            .map(|k| Command {
                id: 100 + u64::from(k),
                device: DeviceIdx(40 + k),
                target: Target::Sleep,
                attempt: 1,
                deadline_ms: 9,
            })
            .collect();
        let b = encode_commands(&H, &many);
        assert_eq!(b.len(), HEADER + RUN_BYTES);
        assert_eq!(decode_commands(&b).unwrap().commands, many);
        let a = AckBatch {
            header: H,
            received_us: 99,
            acks: vec![
                (7, DeviceIdx(3), Answer::Accepted),
                (8, DeviceIdx(4), Answer::Accepted),
                (9, DeviceIdx(9), Answer::StaleEpoch),
            ],
        };
        let bytes = encode_acks(&a);
        assert_eq!(bytes.len(), HEADER + 8 + 2 * ACK_RUN_BYTES);
        assert_eq!(decode_acks(&bytes).unwrap(), a);
    }

    #[test]
    fn bad_bytes_name_the_field_and_never_half_decode() {
        let b = encode_commands(&H, &cmds());
        let field = |r: Result<CommandBatch, Invalid>| r.unwrap_err().field;
        assert_eq!(field(decode_commands(&b[..b.len() - 1])), "runs");
        assert_eq!(field(decode_commands(&b[..10])), "epoch");
        assert_eq!(field(decode_commands(b"")), "magic");
        assert_eq!(
            field(decode_commands(&encode_acks(&AckBatch { header: H, received_us: 0, acks: vec![] }))),
            "magic"
        );
        let mut v = b.clone();
        v[4] = 2;
        assert_eq!(field(decode_commands(&v)), "version");
        // First run: id 0..8, device 8..12, len 12..16, attempt 16..20, deadline 20..28, kind 28.
        let mut k = b.clone();
        k[HEADER + 28] = 9;
        assert_eq!(field(decode_commands(&k)), "commands.kind");
        let mut p = b.clone();
        let at = HEADER + RUN_BYTES + 29;
        p[at..at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(field(decode_commands(&p)), "commands.power_w");
        // A count over the limit is refused before anything is allocated; a run longer than the
        // count says, or one that says less, is refused.
        let mut c = b.clone();
        c[HEADER - 8..HEADER - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(field(decode_commands(&c)), "count");
        let mut l = b.clone();
        l[HEADER + 12..HEADER + 16].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(field(decode_commands(&l)), "commands.len");
        let mut short = b.clone();
        short[HEADER - 8..HEADER - 4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(field(decode_commands(&short)), "count");
        // The second run (one command) at device u32::MAX ends exactly there: fine; the first
        // run's device at u32::MAX - 0 with a run of 2 would pass it.
        let mut edge = b.clone();
        let at = HEADER + RUN_BYTES + 8;
        edge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_commands(&edge).unwrap().commands[1].device, DeviceIdx(u32::MAX));
        let mut over = b.clone();
        over[HEADER + 8..HEADER + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        over[HEADER + 12..HEADER + 16].copy_from_slice(&2u32.to_le_bytes());
        over[HEADER - 8..HEADER - 4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(field(decode_commands(&over)), "commands.len");
        // No runs for a non-zero count: refused before anything is allocated.
        let mut empty = encode_commands(&H, &[]);
        empty[HEADER - 8..HEADER - 4].copy_from_slice(&1_000u32.to_le_bytes());
        assert_eq!(field(decode_commands(&empty)), "runs");
        // Ids and devices at the top of their range never wrap into one run.
        let top = [
            Command { id: u64::MAX, device: DeviceIdx(u32::MAX), target: Target::Sleep, attempt: 1, deadline_ms: 0 },
            Command { id: 1, device: DeviceIdx(0), target: Target::Sleep, attempt: 1, deadline_ms: 0 },
        ];
        assert_eq!(decode_commands(&encode_commands(&H, &top)).unwrap().commands, top);
        let mut a =
            encode_acks(&AckBatch { header: H, received_us: 0, acks: vec![(1, DeviceIdx(0), Answer::Duplicate)] });
        *a.last_mut().unwrap() = 7;
        assert_eq!(decode_acks(&a).unwrap_err().field, "acks.answer");
    }

    #[test]
    fn an_inbox_applies_once_and_refuses_older_epochs_and_other_devices() {
        let mut inbox = Inbox::new(10, [DeviceIdx(3), DeviceIdx(4)]);
        let (mut apply, mut acks) = (vec![], vec![]);
        let batch = CommandBatch { header: H, commands: cmds() };
        inbox.take(&batch, &mut apply, &mut acks);
        assert_eq!(apply.len(), 2);
        assert!(acks.iter().all(|a| a.2 == Answer::Accepted));
        // The same batch again (a redelivery): nothing applied twice.
        let (mut apply, mut acks) = (vec![], vec![]);
        inbox.take(&batch, &mut apply, &mut acks);
        assert!(apply.is_empty());
        assert!(acks.iter().all(|a| a.2 == Answer::Duplicate));
        // A retry (same id, next attempt) is handed on again; an older id is a redelivery.
        let mut retry = batch.clone();
        retry.commands.truncate(1);
        retry.commands[0].attempt = 2;
        let (mut apply, mut acks) = (vec![], vec![]);
        inbox.take(&retry, &mut apply, &mut acks);
        assert_eq!((apply.len(), acks[0].2), (1, Answer::Accepted));
        let mut older = batch.clone();
        older.commands[0].id = 6;
        let (mut apply, mut acks) = (vec![], vec![]);
        inbox.take(&older, &mut apply, &mut acks);
        assert_eq!(acks[0].2, Answer::Duplicate);
        // A newer epoch's new command is taken; then the older epoch is refused.
        let mut newer = CommandBatch { header: BatchHeader { epoch: 4, ..H }, commands: cmds() };
        newer.commands[0].id = 9;
        newer.commands[1].device = DeviceIdx(5);
        let (mut apply, mut acks) = (vec![], vec![]);
        inbox.take(&newer, &mut apply, &mut acks);
        assert_eq!(apply.len(), 1);
        assert_eq!(acks[1].2, Answer::UnknownDevice);
        assert_eq!(inbox.epoch(), 4);
        let mut old = batch.clone();
        old.commands[0].id = 10;
        let (mut apply, mut acks) = (vec![], vec![]);
        inbox.take(&old, &mut apply, &mut acks);
        assert!(apply.is_empty());
        assert!(acks.iter().all(|a| a.2 == Answer::StaleEpoch));
    }
}
