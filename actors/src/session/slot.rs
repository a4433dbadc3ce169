//! One bot of a session as its SessionActor keeps it: its spec, where it is in its life, its
//! view of who is present, and what waits for it.

use actix::prelude::*;
use bgs_proto::chat::ChatEvent;
use tokio::sync::oneshot;

use super::end::Roster;
use super::Started;
use crate::bot::{Bot, BotPhase};
use crate::bot_actor::BotActor;
use crate::delivery::Cursor;
use crate::esp::{BotSpec, EspError};

pub(super) struct Slot {
    pub(super) spec: std::sync::Arc<BotSpec>,
    pub(super) instance_id: String,
    pub(super) joined_seq: u64,
    /// Events up to here only build the roster; later ones go to the bot (its join for a new
    /// bot, its checkpoint for a restored one).
    pub(super) deliver_after: Cursor,
    pub(super) roster: Roster,
    /// Until the bot's own join event has arrived: the events before it, and what starts the bot
    /// (boxed: an idle bot's slot keeps only the pointer).
    pub(super) pending: Option<Box<PendingStart>>,
    pub(super) addr: Option<Addr<BotActor>>,
    /// Starting (until its own join event), running, or stopping.
    pub(super) phase: BotPhase,
    /// Shared with the bot actor: set when it is being stopped or has halted.
    pub(super) done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The stop comes from an end condition whose event is queued and must be delivered.
    pub(super) deliver_ending: bool,
    pub(super) waiters: Vec<oneshot::Sender<()>>,
}

pub(super) struct PendingStart {
    /// A new bot (not a restored one): its start is replicated.
    pub(super) new: bool,
    /// A restored bot keeps the start time it had on the old primary.
    pub(super) started_ms: Option<u64>,
    pub(super) history: Vec<ChatEvent>,
    pub(super) bot: Box<dyn Bot>,
    pub(super) restored: Option<Vec<u8>>,
    pub(super) reply: StartReply,
}

/// Where the StartBot (or the restore) that starts a bot is answered.
pub(super) type StartReply = oneshot::Sender<Result<Started, EspError>>;

/// A bot whose join (or resume) is under way: what makes its slot once it is accepted.
pub(super) struct Joining {
    pub(super) spec: std::sync::Arc<BotSpec>,
    pub(super) instance_id: String,
    pub(super) bot: Box<dyn Bot>,
    pub(super) kind: JoinKind,
}

pub(super) enum JoinKind {
    /// A new bot (StartBot), with the context it may be given to start from.
    New { restored: Option<Vec<u8>> },
    /// A bot replicated from the old primary, resumed from its checkpoint.
    Restore {
        joined_seq: u64,
        checkpoint_seq: u64,
        started_ms: u64,
        context: Option<Vec<u8>>,
    },
}

impl Slot {
    /// A bot whose join is under way (`pending` for a new one, the restoring path fills it in).
    pub(super) fn new(
        spec: std::sync::Arc<BotSpec>,
        instance_id: String,
        joined_seq: u64,
        deliver_after: u64,
        pending: Option<PendingStart>,
    ) -> Self {
        Slot {
            spec,
            instance_id,
            joined_seq,
            deliver_after: Cursor::at(deliver_after),
            roster: Roster::default(),
            pending: pending.map(Box::new),
            addr: None,
            phase: BotPhase::Starting,
            done: Default::default(),
            deliver_ending: false,
            waiters: Vec::new(),
        }
    }
}

/// The bots of one session by participant id. Nearly every session has one bot, so a vector
/// searched in order: one small allocation, where a hash map's smallest table holds four slots.
#[derive(Default)]
pub(super) struct Slots(Vec<(String, Slot)>);

impl Slots {
    pub(super) fn get(&self, pid: &str) -> Option<&Slot> {
        self.0.iter().find(|(p, _)| p == pid).map(|(_, s)| s)
    }

    pub(super) fn get_mut(&mut self, pid: &str) -> Option<&mut Slot> {
        self.0.iter_mut().find(|(p, _)| p == pid).map(|(_, s)| s)
    }

    /// Adds the bot of `pid`, or replaces the one there.
    pub(super) fn insert(&mut self, pid: String, slot: Slot) {
        match self.get_mut(&pid) {
            Some(s) => *s = slot,
            None => {
                if self.0.capacity() == 0 {
                    self.0.reserve_exact(1);
                }
                self.0.push((pid, slot));
            }
        }
    }

    pub(super) fn remove(&mut self, pid: &str) -> Option<Slot> {
        let i = self.0.iter().position(|(p, _)| p == pid)?;
        let (_, slot) = self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(slot)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Slot)> {
        self.0.iter().map(|(p, s)| (p, s))
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(p, _)| p)
    }

    pub(super) fn drain(&mut self) -> impl Iterator<Item = (String, Slot)> {
        std::mem::take(&mut self.0).into_iter()
    }
}
