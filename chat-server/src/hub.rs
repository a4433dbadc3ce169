//! The hub: every session, every TCP connection, fencing, durability and the sweeper.
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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{refuse, ChatServerError, Result};
use crate::journal::{self, Journal, JournalRecord};
use crate::session::{Owner, PostOutcome, SessionLimits, SessionState};

/// Most events one feed delivers in one frame, and about how many bytes of them.
pub const FEED_BATCH_EVENTS: usize = 256;
pub const FEED_BATCH_BYTES: usize = 64 * 1024;
const MAX_ID: usize = 128;
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

/// One session and the channel that tells its readers how far they may read.
pub struct Session {
    pub id: String,
    state: Mutex<SessionState>,
    visible: watch::Sender<u64>,
}

impl Session {
    fn new(state: SessionState) -> Arc<Session> {
        Arc::new(Session {
            id: state.id.clone(),
            visible: watch::Sender::new(state.visible_seq),
            state: Mutex::new(state),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        // A panic while holding the lock is a bug that stops the process (panic hook); if it did
        // not, the state is still the last consistent one: every change is one `apply`.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible.subscribe()
    }

    /// Makes events up to `seq` readable (called once they are durable).
    pub fn publish(&self, seq: u64) {
        let mut st = self.lock();
        st.visible_seq = st.visible_seq.max(seq);
        drop(st);
        self.signal(seq);
    }

    fn signal(&self, seq: u64) {
        self.visible.send_modify(|v| *v = (*v).max(seq));
    }
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

#[derive(Default)]
struct Attachments {
    closed: bool,
    next_gen: u64,
    /// (session, participant) -> (feed generation, the feed task).
    map: HashMap<(String, String), (u64, Option<AbortHandle>)>,
}

/// A TCP connection as the hub knows it.
pub struct Connection {
    pub id: u64,
    pub owner: Owner,
    pub epoch: u64,
    pub name: String,
    fenced: AtomicBool,
    /// Frames to the client (bounded: a full queue makes feeds wait, never grow).
    pub tx: mpsc::Sender<ServerFrame>,
    /// Cancelled when the connection closes or is fenced: ends its feeds.
    pub cancel: CancellationToken,
    attachments: Mutex<Attachments>,
}

type Key = (String, String);

impl Connection {
    fn attachments(&self) -> MutexGuard<'_, Attachments> {
        self.attachments.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Refuses requests of a fenced connection.
    pub fn check_live(&self) -> Result<()> {
        if self.is_fenced() {
            let cluster = match &self.owner {
                Owner::Gateway(c) => c.as_str(),
                _ => "",
            };
            return refuse(
                ChatErrorCode::Fenced,
                format!(
                    "this connection (cluster {cluster}, epoch {}) is fenced: a higher epoch of its cluster is connected",
                    self.epoch
                ),
            );
        }
        Ok(())
    }

    /// Records that this connection speaks for a participant. False once the connection is gone.
    fn attach(&self, key: Key) -> bool {
        let mut a = self.attachments();
        if a.closed {
            return false;
        }
        a.map.entry(key).or_insert((0, None));
        true
    }

    /// Starts a new feed generation for a participant (ending the previous feed, if any).
    pub fn begin_feed(&self, key: &Key) -> Option<u64> {
        let mut a = self.attachments();
        if a.closed {
            return None;
        }
        a.next_gen += 1;
        let gen = a.next_gen;
        if let Some((_, Some(old))) = a.map.insert(key.clone(), (gen, None)) {
            old.abort();
        }
        Some(gen)
    }

    pub fn set_feed_task(&self, key: &Key, gen: u64, handle: AbortHandle) {
        let mut a = self.attachments();
        match a.map.get_mut(key) {
            Some(entry) if entry.0 == gen => entry.1 = Some(handle),
            _ => {}
        }
    }

    pub fn feed_finished(&self, key: &Key, gen: u64) {
        let mut a = self.attachments();
        if a.map.get(key).is_some_and(|e| e.0 == gen) {
            a.map.remove(key);
        }
    }

    /// Another connection took the participant over.
    fn release(&self, key: &Key) {
        if let Some((_, Some(task))) = self.attachments().map.remove(key) {
            task.abort();
        }
    }

    /// Ends every feed and returns what this connection was attached to.
    fn close_attachments(&self) -> Vec<Key> {
        let mut a = self.attachments();
        a.closed = true;
        a.map
            .drain()
            .map(|(k, (_, task))| {
                if let Some(t) = task {
                    t.abort();
                }
                k
            })
            .collect()
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
}

pub struct Hub {
    pub config: Config,
    pub server_id: String,
    limits: SessionLimits,
    sessions: DashMap<String, Arc<Session>>,
    epochs: Mutex<HashMap<String, u64>>,
    connections: DashMap<u64, Arc<Connection>>,
    next_conn: AtomicU64,
    journal: Option<Journal>,
    /// Every change takes the read side while it journals; a compaction takes the write side,
    /// so it sees every session and epoch at one point of the journal's order.
    gate: std::sync::RwLock<()>,
}

pub fn check_id(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if !ok {
        return refuse(
            ChatErrorCode::BadRequest,
            format!(
                "{what} must be 1 to {MAX_ID} characters of A-Z a-z 0-9 - _ . : @, not {value:?}"
            ),
        );
    }
    Ok(())
}

fn check_len(what: &str, value: &str, min: usize, max: usize) -> Result<()> {
    if value.len() < min || value.len() > max {
        return refuse(
            ChatErrorCode::BadRequest,
            format!(
                "{what} must be {min} to {max} bytes long, not {}",
                value.len()
            ),
        );
    }
    Ok(())
}

impl Hub {
    /// A hub with memory only, or rebuilt from the journal in `--data-dir`.
    pub fn open(config: Config) -> Result<Arc<Hub>> {
        config.validate()?;
        let limits = SessionLimits {
            max_participants: config.max_participants,
            max_events: config.max_events,
        };
        let mut hub = Hub {
            server_id: new_id(),
            limits,
            sessions: DashMap::new(),
            epochs: Mutex::new(HashMap::new()),
            connections: DashMap::new(),
            next_conn: AtomicU64::new(1),
            journal: None,
            gate: std::sync::RwLock::new(()),
            config,
        };
        if let Some(dir) = hub.config.data_dir.clone() {
            let kept = hub.replay(&dir)?;
            hub.journal = Some(Journal::create(&dir, &kept)?);
        }
        Ok(Arc::new(hub))
    }

    /// Rebuilds sessions and epochs from the journal; returns the records worth keeping.
    fn replay(&mut self, dir: &Path) -> Result<Vec<JournalRecord>> {
        let records = journal::read(dir)?;
        let count = records.len();
        let now = Instant::now();
        let mut order: Vec<String> = Vec::new();
        let mut states: HashMap<String, SessionState> = HashMap::new();
        let mut epochs = HashMap::new();
        for record in records {
            match record {
                JournalRecord::SessionCreated {
                    session_id,
                    created_ms,
                    userdata,
                } => {
                    order.push(session_id.clone());
                    let st = SessionState::new(session_id.clone(), created_ms, userdata, now);
                    states.insert(session_id, st);
                }
                JournalRecord::Event { session_id, stored } => {
                    if let Some(st) = states.get_mut(&session_id) {
                        if stored.event.seq == st.last_seq() + 1 {
                            st.apply(stored, now);
                        } else {
                            tracing::warn!(
                                session_id,
                                seq = stored.event.seq,
                                "journal event out of order; skipped"
                            );
                        }
                    }
                }
                JournalRecord::Epoch { cluster_id, epoch } => {
                    let e = epochs.entry(cluster_id).or_insert(0);
                    *e = (*e).max(epoch);
                }
            }
        }
        let retention_ms = self.config.closed_retention * 1000;
        let wall = now_ms();
        let mut kept = Vec::new();
        for (cluster_id, epoch) in &epochs {
            kept.push(JournalRecord::Epoch {
                cluster_id: cluster_id.clone(),
                epoch: *epoch,
            });
        }
        for id in order {
            let Some(mut st) = states.remove(&id) else {
                continue;
            };
            if st
                .closed_at_ms()
                .is_some_and(|t| wall.saturating_sub(t) > retention_ms)
            {
                continue;
            }
            kept.extend(session_records(&st));
            st.visible_seq = st.last_seq();
            self.sessions.insert(id, Session::new(st));
        }
        *self.epochs.lock().unwrap_or_else(|p| p.into_inner()) = epochs;
        tracing::info!(
            records = count,
            sessions = self.sessions.len(),
            dir = %dir.display(),
            "journal replayed"
        );
        Ok(kept)
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            sessions_open: 0,
            sessions_closed: 0,
            connections: self.connections.len(),
            events: 0,
        };
        for entry in self.sessions.iter() {
            let st = entry.value().lock();
            if st.is_closed() {
                s.sessions_closed += 1;
            } else {
                s.sessions_open += 1;
            }
            s.events += st.last_seq();
        }
        s
    }

    /// The session a change by `actor` applies to (a fenced connection changes nothing).
    fn session_for(&self, actor: Actor<'_>, session_id: &str) -> Result<Arc<Session>> {
        if let Actor::Conn(c) = actor {
            c.check_live()?;
        }
        self.session(session_id)
    }

    pub fn session(&self, id: &str) -> Result<Arc<Session>> {
        match self.sessions.get(id) {
            Some(s) => Ok(s.value().clone()),
            None => refuse(ChatErrorCode::UnknownSession, format!("no session {id:?}")),
        }
    }

    /// Journals what a change produced (or, without a data dir, publishes it at once).
    /// Called with the session locked, so the journal sees each session's events in order.
    fn persist(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        records: Vec<JournalRecord>,
    ) -> Result<Wait> {
        let last = st.last_seq();
        match &self.journal {
            None => {
                st.visible_seq = last;
                session.signal(last);
                Ok(Wait::Nothing)
            }
            Some(j) => Ok(Wait::Journal(
                j.append(&records, Some((session.clone(), last)))?,
            )),
        }
    }

    fn event_records(
        session_id: &str,
        events: Vec<crate::session::StoredEvent>,
    ) -> Vec<JournalRecord> {
        events
            .into_iter()
            .map(|stored| JournalRecord::Event {
                session_id: session_id.to_string(),
                stored,
            })
            .collect()
    }

    fn check_userdata(&self, changes: &UserdataChanges) -> Result<()> {
        if changes.len() > MAX_USERDATA_KEYS {
            return refuse(
                ChatErrorCode::BadRequest,
                format!(
                    "at most {MAX_USERDATA_KEYS} userdata keys at once, not {}",
                    changes.len()
                ),
            );
        }
        for (k, v) in changes {
            check_len("a userdata key", k, 1, 256)?;
            if let Some(v) = v {
                check_len("a userdata value", v, 0, self.config.max_text)?;
            }
        }
        Ok(())
    }

    /// A customer opens a session (HTTP). The interaction id is generated when not given.
    pub fn create_session(
        &self,
        interaction_id: Option<String>,
        nickname: String,
        userdata: Userdata,
    ) -> Result<Ack<(String, String, u64)>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let id = interaction_id.unwrap_or_else(new_id);
        check_id("interaction_id", &id)?;
        check_len("nickname", &nickname, 1, MAX_ID)?;
        let as_changes: UserdataChanges = userdata
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        self.check_userdata(&as_changes)?;
        if self.sessions.len() >= self.config.max_sessions {
            return refuse(
                ChatErrorCode::LimitExceeded,
                format!(
                    "the server holds its limit of {} sessions",
                    self.config.max_sessions
                ),
            );
        }
        let now = Instant::now();
        let ts = now_ms();
        let session = Session::new(SessionState::new(id.clone(), ts, userdata.clone(), now));
        match self.sessions.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return refuse(
                    ChatErrorCode::SessionExists,
                    format!("session {id:?} already exists"),
                )
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(session.clone());
            }
        }
        let mut st = session.lock();
        let customer = Participant {
            id: new_id(),
            nickname,
            participant_type: ParticipantType::Customer,
            style: Style::Regular,
            visibility: Visibility::All,
        };
        let pid = customer.id.clone();
        let stored = st.join(customer, Owner::Http, &self.limits, ts, now)?;
        let seq = stored.event.seq;
        let mut records = vec![JournalRecord::SessionCreated {
            session_id: id.clone(),
            created_ms: ts,
            userdata,
        }];
        records.extend(Self::event_records(&id, vec![stored]));
        let wait = self.persist(&session, &mut st, records)?;
        tracing::info!(session_id = %id, participant_id = %pid, "session created");
        Ok(Ack {
            value: (id, pid, seq),
            wait,
        })
    }

    pub fn join(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        nickname: String,
        participant_type: ParticipantType,
        style: Style,
        visibility: Visibility,
    ) -> Result<Ack<Joined>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        check_len("nickname", &nickname, 1, MAX_ID)?;
        let owner = match actor {
            Actor::Http => Owner::Http,
            Actor::Conn(c) => {
                c.check_live()?;
                c.owner.clone()
            }
        };
        let session = self.session(session_id)?;
        let mut st = session.lock();
        let info = Participant {
            id: new_id(),
            nickname,
            participant_type,
            style,
            visibility,
        };
        let pid = info.id.clone();
        let stored = st.join(info.clone(), owner, &self.limits, now_ms(), Instant::now())?;
        let seq = stored.event.seq;
        if let Actor::Conn(c) = actor {
            if c.attach((session_id.to_string(), pid.clone())) {
                if let Some(p) = st.participant_mut(&pid) {
                    p.attached = Some(c.id);
                    p.detached_since = None;
                }
            }
        }
        let wait = self.persist(
            &session,
            &mut st,
            Self::event_records(session_id, vec![stored]),
        )?;
        drop(st);
        tracing::info!(
            session_id,
            participant_id = %pid,
            participant_type = ?info.participant_type,
            style = ?info.style,
            visibility = %info.visibility,
            "participant joined"
        );
        Ok(Ack {
            value: Joined {
                session: session.clone(),
                participant_id: pid,
                seq,
            },
            wait,
        })
    }

    /// A connection takes over a participant (after a reconnect, a restart or a switchover).
    /// No event is emitted: nobody in the session sees it. Participants that have left, or whose
    /// session closed, may be resumed too: their feed then ends with the event that removed them.
    pub fn resume(
        &self,
        conn: &Connection,
        session_id: &str,
        participant_id: &str,
    ) -> Result<Joined> {
        conn.check_live()?;
        let session = self.session(session_id)?;
        let mut st = session.lock();
        // What is readable now (an event still on its way to disk is not a safe checkpoint).
        let last = st.visible_seq;
        let Some(p) = st.participant_mut(participant_id) else {
            return refuse(
                ChatErrorCode::UnknownParticipant,
                format!("no participant {participant_id} in session {session_id}"),
            );
        };
        if p.owner != conn.owner {
            return refuse(
                ChatErrorCode::NotAllowed,
                format!(
                    "participant {participant_id} belongs to {:?}, not to this connection",
                    p.owner
                ),
            );
        }
        let mut previous = None;
        if p.present && conn.attach((session_id.to_string(), participant_id.to_string())) {
            previous = p.attached.replace(conn.id);
            p.detached_since = None;
        }
        drop(st);
        if let Some(prev) = previous.filter(|prev| *prev != conn.id) {
            if let Some(c) = self.connections.get(&prev) {
                c.release(&(session_id.to_string(), participant_id.to_string()));
            }
        }
        tracing::info!(
            session_id,
            participant_id,
            connection = conn.id,
            "participant resumed"
        );
        Ok(Joined {
            session,
            participant_id: participant_id.to_string(),
            seq: last,
        })
    }

    fn authorize(st: &SessionState, participant_id: &str, actor: Actor<'_>) -> Result<()> {
        st.check_present(participant_id)?;
        let Some(p) = st.participant(participant_id) else {
            return refuse(ChatErrorCode::UnknownParticipant, "unknown participant");
        };
        match actor {
            Actor::Http if p.owner != Owner::Http => refuse(
                ChatErrorCode::NotAllowed,
                format!("participant {participant_id} belongs to a TCP connection"),
            ),
            Actor::Conn(c) if p.attached != Some(c.id) => refuse(
                ChatErrorCode::NotAllowed,
                format!("participant {participant_id} is not attached to this connection: resume it first"),
            ),
            _ => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: &str,
        kind: PostKind,
        text: String,
        rich: Option<RichContent>,
        visibility: Visibility,
        key: Option<String>,
    ) -> Result<Ack<(u64, bool)>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        check_len("text", &text, 0, self.config.max_text)?;
        let rich = rich.filter(|r| !r.is_empty());
        if let Some(r) = &rich {
            if r.items() > MAX_RICH_ITEMS {
                return refuse(
                    ChatErrorCode::BadRequest,
                    format!(
                        "rich content has {} buttons and cards; at most {MAX_RICH_ITEMS}",
                        r.items()
                    ),
                );
            }
            if r.text_len() > self.config.max_text {
                return refuse(
                    ChatErrorCode::BadRequest,
                    format!(
                        "rich content holds {} bytes of text; at most {}",
                        r.text_len(),
                        self.config.max_text
                    ),
                );
            }
        }
        if let Some(k) = &key {
            check_len("key", k, 1, MAX_ID)?;
        }
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        Self::authorize(&st, participant_id, actor)?;
        let outcome = st.post(
            participant_id,
            kind,
            text,
            rich,
            visibility,
            key,
            &self.limits,
            now_ms(),
            Instant::now(),
        )?;
        match outcome {
            PostOutcome::New(stored) => {
                let seq = stored.event.seq;
                let wait = self.persist(
                    &session,
                    &mut st,
                    Self::event_records(session_id, vec![*stored]),
                )?;
                Ok(Ack {
                    value: (seq, false),
                    wait,
                })
            }
            PostOutcome::Duplicate(seq) => {
                tracing::debug!(
                    session_id,
                    participant_id,
                    seq,
                    "duplicate client key dropped"
                );
                Ok(Ack {
                    value: (seq, true),
                    wait: Wait::Visible(session.clone(), seq),
                })
            }
        }
    }

    pub fn leave(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: &str,
        after_action: AfterAction,
    ) -> Result<Ack<u64>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        Self::authorize(&st, participant_id, actor)?;
        let events = st.leave(
            participant_id,
            after_action,
            Reason::Requested,
            now_ms(),
            Instant::now(),
        )?;
        let seq = events.first().map_or(0, |e| e.event.seq);
        let closed = events
            .iter()
            .find(|e| e.event.kind == EventKind::Closed)
            .and_then(|e| e.event.reason);
        let wait = self.persist(&session, &mut st, Self::event_records(session_id, events))?;
        drop(st);
        tracing::info!(
            session_id,
            participant_id,
            ?after_action,
            ?closed,
            "participant left"
        );
        Ok(Ack { value: seq, wait })
    }

    pub fn userdata(&self, session_id: &str) -> Result<Userdata> {
        Ok(self.session(session_id)?.lock().userdata.clone())
    }

    /// Changes userdata; `participant_id` None: the change is the system's (HTTP PATCH).
    pub fn update_userdata(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: Option<&str>,
        changes: UserdataChanges,
    ) -> Result<Ack<Userdata>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_userdata(&changes)?;
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        if let Some(pid) = participant_id {
            Self::authorize(&st, pid, actor)?;
        }
        let stored = st.update_userdata(
            participant_id,
            changes,
            &self.limits,
            now_ms(),
            Instant::now(),
        )?;
        let wait = self.persist(
            &session,
            &mut st,
            Self::event_records(session_id, vec![stored]),
        )?;
        Ok(Ack {
            value: st.userdata.clone(),
            wait,
        })
    }

    /// Readable events of a session for one participant (HTTP): events, last seq examined, and
    /// whether the session is closed.
    pub fn read(
        &self,
        session: &Session,
        participant_id: &str,
        since: u64,
    ) -> Result<(Vec<ChatEvent>, u64, bool)> {
        let st = session.lock();
        let Some(p) = st.participant(participant_id) else {
            return refuse(
                ChatErrorCode::UnknownParticipant,
                format!("no participant {participant_id} in session {}", session.id),
            );
        };
        let (events, last) = st.read_for(p, since, 1000, 1 << 20);
        Ok((events, last.max(since.min(st.visible_seq)), st.is_closed()))
    }

    /// Every readable event, unfiltered, with the closed flag and the userdata.
    pub fn transcript(&self, session_id: &str) -> Result<(Vec<ChatEvent>, bool, Userdata)> {
        let session = self.session(session_id)?;
        let st = session.lock();
        let visible = st.visible_seq as usize;
        Ok((
            st.events()[..visible].to_vec(),
            st.is_closed(),
            st.userdata.clone(),
        ))
    }

    /// Registers a TCP connection after its Hello; a gateway's epoch may fence older connections
    /// of its cluster, or be fenced itself.
    pub fn hello(
        &self,
        hello: Hello,
        tx: mpsc::Sender<ServerFrame>,
    ) -> Result<Ack<Arc<Connection>>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if hello.version != CHAT_PROTOCOL_VERSION {
            return refuse(
                ChatErrorCode::UnsupportedVersion,
                format!(
                    "chat protocol version {} is not supported (this server speaks {CHAT_PROTOCOL_VERSION})",
                    hello.version
                ),
            );
        }
        check_len("client_name", &hello.client_name, 0, MAX_ID)?;
        let (owner, epoch) = match &hello.role {
            ClientRole::Gateway {
                cluster_id,
                epoch,
                node_id,
            } => {
                check_id("cluster_id", cluster_id)?;
                check_len("node_id", node_id, 0, MAX_ID)?;
                (Owner::Gateway(cluster_id.clone()), *epoch)
            }
            ClientRole::Agent => (Owner::Agent, 0),
        };
        let conn = Arc::new(Connection {
            id: self.next_conn.fetch_add(1, Ordering::SeqCst),
            owner: owner.clone(),
            epoch,
            name: hello.client_name,
            fenced: AtomicBool::new(false),
            tx,
            cancel: CancellationToken::new(),
            attachments: Mutex::new(Attachments::default()),
        });
        let Owner::Gateway(cluster) = &owner else {
            self.connections.insert(conn.id, conn.clone());
            return Ok(Ack::now(conn));
        };
        let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        let highest = epochs.get(cluster).copied().unwrap_or(0);
        if epoch < highest {
            tracing::warn!(cluster_id = %cluster, epoch, highest, "fenced connection refused");
            return refuse(
                ChatErrorCode::Fenced,
                format!("cluster {cluster} epoch {epoch} is fenced: epoch {highest} has been seen"),
            );
        }
        self.connections.insert(conn.id, conn.clone());
        let mut wait = Wait::Nothing;
        if epoch > highest {
            epochs.insert(cluster.clone(), epoch);
            if let Some(j) = &self.journal {
                let record = JournalRecord::Epoch {
                    cluster_id: cluster.clone(),
                    epoch,
                };
                wait = Wait::Journal(j.append(&[record], None)?);
            }
            let older: Vec<Arc<Connection>> = self
                .connections
                .iter()
                .filter(|c| c.owner == owner && c.epoch < epoch)
                .map(|c| c.value().clone())
                .collect();
            for old in older {
                tracing::warn!(cluster_id = %cluster, old_epoch = old.epoch, epoch, connection = old.id, "connection fenced");
                old.fenced.store(true, Ordering::SeqCst);
                let _ = old.tx.try_send(ServerFrame::Fenced {
                    cluster_id: cluster.clone(),
                    epoch,
                });
                self.detach(&old);
            }
        }
        drop(epochs);
        tracing::info!(connection = conn.id, owner = ?conn.owner, epoch, name = %conn.name, "connection registered");
        Ok(Ack { value: conn, wait })
    }

    /// Participants of a connection that is gone (or fenced) stay, detached, for the grace period.
    fn detach(&self, conn: &Connection) {
        conn.cancel.cancel();
        let now = Instant::now();
        for (sid, pid) in conn.close_attachments() {
            let Ok(session) = self.session(&sid) else {
                continue;
            };
            let mut st = session.lock();
            if let Some(p) = st.participant_mut(&pid) {
                if p.attached == Some(conn.id) {
                    p.attached = None;
                    p.detached_since = Some(now);
                    tracing::info!(session_id = %sid, participant_id = %pid, "participant detached");
                }
            }
        }
    }

    pub fn connection_closed(&self, conn: &Connection) {
        self.detach(conn);
        self.connections.remove(&conn.id);
        tracing::info!(connection = conn.id, "connection closed");
    }

    /// Idle control, detach grace and forgetting old closed sessions. Called periodically.
    pub fn sweep(&self) {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let ts = now_ms();
        let grace = Duration::from_secs(self.config.detach_grace);
        let idle = self.config.idle();
        let retention_ms = self.config.closed_retention * 1000;
        let sessions: Vec<Arc<Session>> = self.sessions.iter().map(|e| e.value().clone()).collect();
        let mut forget = Vec::new();
        for session in sessions {
            let mut st = session.lock();
            if let Some(closed) = st.closed_at_ms() {
                if ts.saturating_sub(closed) > retention_ms {
                    forget.push(session.id.clone());
                }
                continue;
            }
            let expired: Vec<String> = st
                .participants()
                .filter(|p| {
                    p.present
                        && p.attached.is_none()
                        && p.detached_since
                            .is_some_and(|d| now.duration_since(d) >= grace)
                })
                .map(|p| p.info.id.clone())
                .collect();
            let mut events = Vec::new();
            for pid in expired {
                match st.leave(&pid, AfterAction::KeepAlive, Reason::Disconnected, ts, now) {
                    Ok(e) => {
                        tracing::info!(session_id = %session.id, participant_id = %pid, "detached participant left after the grace period");
                        events.extend(e);
                    }
                    Err(_) => break,
                }
            }
            if let Some(idle) = idle {
                if now.duration_since(st.last_activity) >= idle {
                    if let Some(e) = st.close(Reason::Idle, ts, now) {
                        tracing::info!(session_id = %session.id, "session closed by idle control");
                        events.push(e);
                    }
                }
            }
            if !events.is_empty() {
                let records = Self::event_records(&session.id, events);
                if let Err(e) = self.persist(&session, &mut st, records) {
                    tracing::error!(session_id = %session.id, error = %e, "cannot journal");
                }
            }
        }
        for id in forget {
            self.sessions.remove(&id);
            tracing::debug!(session_id = %id, "closed session forgotten");
        }
    }

    /// Rewrites the journal with only what is kept (open sessions, recently closed ones,
    /// epochs) once it has grown past `--journal-compact-bytes` and twice its last compacted
    /// size. Changes wait meanwhile (the gate); the writer swaps the file in its own thread.
    pub fn maybe_compact(&self) {
        let Some(j) = &self.journal else { return };
        if !j.wants_compaction(self.config.journal_compact_bytes) {
            return;
        }
        let size = j.size();
        let records = {
            let _all = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut records: Vec<JournalRecord> = self
                .epochs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(cluster_id, epoch)| JournalRecord::Epoch {
                    cluster_id: cluster_id.clone(),
                    epoch: *epoch,
                })
                .collect();
            let sessions: Vec<Arc<Session>> =
                self.sessions.iter().map(|e| e.value().clone()).collect();
            for session in sessions {
                records.extend(session_records(&session.lock()));
            }
            // Queued under the gate: exactly the state after every change journaled before.
            let n = records.len();
            if let Err(e) = j.rewrite(records) {
                tracing::error!(error = %e, "cannot compact the journal");
                return;
            }
            n
        };
        tracing::info!(from_bytes = size, records, "journal compaction queued");
    }

    /// Says goodbye to every TCP client and waits until the journal has everything queued.
    pub fn shutdown(&self) {
        for c in self.connections.iter() {
            let _ =
                c.tx.try_send(ServerFrame::Goodbye(bgs_proto::chat::ChatError::new(
                    ChatErrorCode::ShuttingDown,
                    "the chat server is shutting down",
                )));
        }
        if let Some(j) = &self.journal {
            j.close();
        }
    }
}

/// A session as journal records: its creation and every event with owners and client keys.
fn session_records(st: &SessionState) -> Vec<JournalRecord> {
    let mut out = vec![JournalRecord::SessionCreated {
        session_id: st.id.clone(),
        created_ms: st.created_ms,
        // The userdata a session started with: the replayed events change it again.
        userdata: st.initial_userdata.clone(),
    }];
    out.extend(
        st.stored_events()
            .into_iter()
            .map(|stored| JournalRecord::Event {
                session_id: st.id.clone(),
                stored,
            }),
    );
    out
}

/// Follows a session for one participant: delivers, in order and without gaps, every event after
/// `since` that it may see, until its own `left` event or the session's `closed` event has been
/// delivered, the feed is cancelled, or `deliver` says the reader is gone. Holds only a cursor.
/// `attached_to`: stop as soon as another connection speaks for the participant.
pub async fn follow<F, Fut>(
    session: Arc<Session>,
    participant_id: String,
    mut since: u64,
    attached_to: Option<u64>,
    cancel: CancellationToken,
    mut deliver: F,
) where
    F: FnMut(Vec<ChatEvent>) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut rx = session.subscribe();
    loop {
        rx.borrow_and_update();
        let (mut events, scanned, more) = {
            let st = session.lock();
            let Some(p) = st.participant(&participant_id) else {
                return;
            };
            if let (Some(me), Some(now)) = (attached_to, p.attached) {
                if me != now {
                    return;
                }
            }
            let (events, scanned) = st.read_for(p, since, FEED_BATCH_EVENTS, FEED_BATCH_BYTES);
            // Past the event that removed the participant there is nothing more for it.
            if events.is_empty() && p.ended_at.is_some_and(|end| scanned >= end) {
                return;
            }
            (events, scanned, scanned < st.visible_seq)
        };
        since = scanned;
        let end = events.iter().position(|e| {
            e.kind == EventKind::Closed
                || (e.kind == EventKind::Left && e.participant_id == participant_id)
        });
        if let Some(end) = end {
            events.truncate(end + 1);
        }
        if !events.is_empty() && !deliver(events).await {
            return;
        }
        if end.is_some() {
            return;
        }
        if more {
            continue;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}
