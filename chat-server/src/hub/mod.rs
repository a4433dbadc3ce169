//! The hub: every session, every TCP connection, fencing, durability and the sweeper. This file
//! holds the types; the rest is split by concern: `changes` (the requests), `connection` (TCP
//! connections and their attachments, detach), `fencing` (the Hello and epochs), `feed` (the
//! feed loop, `follow`), `durability` (the journal glue and compaction), `recovery` (start-up
//! and replay), `sweep` (idle, grace, shutdown).
//!
//! Locking: a session's state sits behind its own short-held mutex (never held across an await).
//! Lock order is session, then a connection's attachment table; the fencing table is taken before
//! either. Events become readable only when durable: [`Session::publish`] advances the session's
//! `visible_seq` and wakes its readers through a `watch` channel. Readers (TCP feeds, WebSockets,
//! long-polls) keep only a cursor, so a slow reader costs no memory on the server.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bgs_proto::chat::{
    AfterAction, ChatErrorCode, ChatEvent, ClientRole, EventKind, Hello, Participant,
    ParticipantType, PostKind, Reason, RichContent, ServerFrame, Style, Userdata, UserdataChanges,
    Visibility, CHAT_PROTOCOL_VERSION, MAX_RICH_ITEMS,
};
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::check::{check_id, check_len, MAX_ID};
use crate::config::Config;
use crate::error::{refuse, ChatServerError, Result};
use crate::journal::{self, Journal, JournalRecord};
use crate::session::{Owner, PostOutcome, Session, SessionLimits, SessionState};

mod changes;
mod connection;
mod durability;
mod feed;
mod fencing;
mod recovery;
mod sweep;

pub use connection::Connection;
use durability::session_records;
pub use feed::follow;

/// Most events one feed delivers in one frame, and about how many bytes of them.
pub const FEED_BATCH_EVENTS: usize = 256;
pub const FEED_BATCH_BYTES: usize = 64 * 1024;
const MAX_USERDATA_KEYS: usize = 256;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What must happen before an acknowledgement may go out.
pub enum Wait {
    Nothing,
    Journal(oneshot::Receiver<()>),
    /// A duplicate post: its original may still be on its way to disk.
    Visible(Arc<Session>, u64),
}

/// A result that may be acknowledged once it is durable.
pub struct Ack<T> {
    pub value: T,
    pub wait: Wait,
}

impl<T> Ack<T> {
    pub fn now(value: T) -> Self {
        Ack {
            value,
            wait: Wait::Nothing,
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Ack<U> {
        Ack {
            value: f(self.value),
            wait: self.wait,
        }
    }

    /// Waits until the change is durable (and readable), then yields the value.
    pub async fn durable(self) -> Result<T> {
        match self.wait {
            Wait::Nothing => {}
            Wait::Journal(rx) => rx
                .await
                .map_err(|_| ChatServerError::Journal("journal writer stopped".into()))?,
            Wait::Visible(session, seq) => {
                let mut rx = session.subscribe();
                rx.wait_for(|v| *v >= seq)
                    .await
                    .map_err(|_| ChatServerError::Journal("session was dropped".into()))?;
            }
        }
        Ok(self.value)
    }
}

/// Who is asking: a stateless HTTP client or a TCP connection.
#[derive(Clone, Copy)]
pub enum Actor<'a> {
    Http,
    Conn(&'a Connection),
}

/// A successful join (or resume).
pub struct Joined {
    pub session: Arc<Session>,
    pub participant_id: String,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub sessions_open: usize,
    pub sessions_closed: usize,
    pub connections: usize,
    pub events: u64,
    /// TCP connections refused since start, by cause (docs/CHAT.md 6.2).
    pub refused: RefusalCounts,
}

/// Connections refused since start, by cause.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RefusalCounts {
    /// A Hello without its role's credential, or with a wrong one.
    pub unauthorized: u64,
    /// `--max-connections` was reached.
    pub capacity: u64,
    /// No Hello in time, another first frame, or an undecodable or oversized one.
    pub handshake: u64,
}

#[derive(Default)]
pub struct Refusals {
    pub unauthorized: AtomicU64,
    pub capacity: AtomicU64,
    pub handshake: AtomicU64,
}

impl Refusals {
    pub fn counts(&self) -> RefusalCounts {
        RefusalCounts {
            unauthorized: self.unauthorized.load(Ordering::Relaxed),
            capacity: self.capacity.load(Ordering::Relaxed),
            handshake: self.handshake.load(Ordering::Relaxed),
        }
    }
}

pub struct Hub {
    pub config: Config,
    pub server_id: String,
    limits: SessionLimits,
    sessions: DashMap<String, Arc<Session>>,
    epochs: Mutex<HashMap<String, u64>>,
    /// `--credentials`: who may say Hello (none: anyone).
    credentials: Option<Credentials>,
    pub refusals: Refusals,
    connections: DashMap<u64, Arc<Connection>>,
    next_conn: AtomicU64,
    journal: Option<Journal>,
    /// Every change takes the read side while it journals; a compaction takes the write side,
    /// so it sees every session and epoch at one point of the journal's order.
    gate: std::sync::RwLock<()>,
    /// When sessions need the sweeper (idle, grace, retention), earliest first.
    alarms: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<sweep::Alarm>>>,
}
