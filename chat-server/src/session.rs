//! One chat session: participants, numbered events, userdata, after-actions, client keys.
//!
//! Pure state, no I/O: every change is an event, built by an operation and then applied through
//! [`SessionState::apply`], the same function the journal replays at start-up. So a session
//! rebuilt from its journal is the session that was running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bgs_proto::chat::{
    may_see, AfterAction, ChatErrorCode, ChatEvent, EventKind, Participant, ParticipantType,
    PostKind, Reason, RichContent, Style, Userdata, UserdataChanges, Visibility,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{refuse, Result};

/// Who created a participant, which decides who may act for it and what a dropped connection does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// Created over HTTP: stateless, never detached.
    Http,
    /// Created over an agent TCP connection: detached when it drops, resumable by agent links.
    Agent,
    /// Created over a gateway connection of this cluster: detached when it drops, resumable by any
    /// connection of the cluster that is not fenced.
    Gateway(String),
}

impl Owner {
    pub fn is_connection_bound(&self) -> bool {
        !matches!(self, Owner::Http)
    }
}

/// An event as the journal keeps it: with who owns a joining participant and a post's client key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub event: ChatEvent,
    pub owner: Option<Owner>,
    pub key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ParticipantState {
    pub info: Participant,
    pub owner: Owner,
    /// In the session (not left, session not closed).
    pub present: bool,
    /// The connection currently speaking for this participant (connection-bound owners only).
    pub attached: Option<u64>,
    /// When it lost its connection; the grace period runs from here.
    pub detached_since: Option<Instant>,
    /// The event that removed it (its own `left`, or the session's `closed`): it sees nothing later.
    pub ended_at: Option<u64>,
    keys: HashMap<String, u64>,
}

/// Limits a session enforces.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_participants: usize,
    pub max_events: usize,
}

/// What a post came to.
#[derive(Debug, Clone, PartialEq)]
pub enum PostOutcome {
    New(Box<StoredEvent>),
    /// The client key was already accepted: the first post's sequence number.
    Duplicate(u64),
}

#[derive(Debug)]
pub struct SessionState {
    pub id: String,
    pub created_ms: u64,
    /// The userdata the session was created with (the journal starts from it).
    pub initial_userdata: Userdata,
    pub userdata: Userdata,
    participants: HashMap<String, ParticipantState>,
    events: Vec<ChatEvent>,
    closed: Option<(Reason, u64)>,
    pub last_activity: Instant,
    /// Events up to here are durable and may be read; later ones are still being written.
    pub visible_seq: u64,
    /// When the sweeper looks at this session next (its earliest alarm; none: nothing is due).
    pub armed: Option<Instant>,
}

fn system_participant() -> Participant {
    Participant {
        id: "system".into(),
        nickname: "system".into(),
        participant_type: ParticipantType::System,
        style: Style::Regular,
        visibility: Visibility::All,
    }
}

impl SessionState {
    pub fn new(id: String, created_ms: u64, userdata: Userdata, now: Instant) -> Self {
        Self {
            id,
            created_ms,
            initial_userdata: userdata.clone(),
            userdata,
            participants: HashMap::new(),
            events: Vec::new(),
            closed: None,
            last_activity: now,
            visible_seq: 0,
            armed: None,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.events.len() as u64
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Unix ms when the session closed, if it did.
    pub fn closed_at_ms(&self) -> Option<u64> {
        self.closed.map(|(_, ts)| ts)
    }

    pub fn events(&self) -> &[ChatEvent] {
        &self.events
    }

    pub fn participant(&self, id: &str) -> Option<&ParticipantState> {
        self.participants.get(id)
    }

    pub fn participant_mut(&mut self, id: &str) -> Option<&mut ParticipantState> {
        self.participants.get_mut(id)
    }

    pub fn participants(&self) -> impl Iterator<Item = &ParticipantState> {
        self.participants.values()
    }

    pub fn participants_mut(&mut self) -> impl Iterator<Item = &mut ParticipantState> {
        self.participants.values_mut()
    }

    fn ensure_open(&self) -> Result<()> {
        match self.closed {
            Some((reason, _)) => refuse(
                ChatErrorCode::SessionClosed,
                format!("session {} is closed ({})", self.id, reason_str(reason)),
            ),
            None => Ok(()),
        }
    }

    /// The participant, if it is present in an open session; else the error that says why not.
    pub fn check_present(&self, participant_id: &str) -> Result<&ParticipantState> {
        self.ensure_open()?;
        match self.participants.get(participant_id) {
            Some(p) if p.present => Ok(p),
            Some(_) => refuse(
                ChatErrorCode::UnknownParticipant,
                format!("participant {participant_id} has left session {}", self.id),
            ),
            None => refuse(
                ChatErrorCode::UnknownParticipant,
                format!("no participant {participant_id} in session {}", self.id),
            ),
        }
    }

    fn ensure_room(&self, limits: &SessionLimits) -> Result<()> {
        if self.events.len() >= limits.max_events {
            return refuse(
                ChatErrorCode::LimitExceeded,
                format!(
                    "session {} reached its limit of {} events",
                    self.id, limits.max_events
                ),
            );
        }
        Ok(())
    }

    fn event(
        &self,
        kind: EventKind,
        who: &Participant,
        visibility: Visibility,
        ts_ms: u64,
    ) -> ChatEvent {
        ChatEvent {
            seq: self.last_seq() + 1,
            ts_ms,
            kind,
            participant_id: who.id.clone(),
            nickname: who.nickname.clone(),
            participant_type: who.participant_type,
            style: who.style,
            visibility,
            text: None,
            after_action: None,
            reason: None,
            userdata: None,
            rich: None,
        }
    }

    /// Applies one event: the only way state changes, live or in replay.
    pub fn apply(&mut self, stored: StoredEvent, now: Instant) {
        let event = stored.event;
        match event.kind {
            EventKind::Joined => {
                let owner = stored.owner.unwrap_or(Owner::Http);
                let detached_since = owner.is_connection_bound().then_some(now);
                self.participants.insert(
                    event.participant_id.clone(),
                    ParticipantState {
                        info: Participant {
                            id: event.participant_id.clone(),
                            nickname: event.nickname.clone(),
                            participant_type: event.participant_type,
                            style: event.style,
                            visibility: event.visibility,
                        },
                        owner,
                        present: true,
                        attached: None,
                        detached_since,
                        ended_at: None,
                        keys: HashMap::new(),
                    },
                );
            }
            EventKind::Left => {
                if let Some(p) = self.participants.get_mut(&event.participant_id) {
                    p.present = false;
                    p.attached = None;
                    p.detached_since = None;
                    p.ended_at = Some(event.seq);
                }
            }
            EventKind::Message | EventKind::Notice | EventKind::Typing => {
                if let (Some(key), Some(p)) =
                    (stored.key, self.participants.get_mut(&event.participant_id))
                {
                    p.keys.insert(key, event.seq);
                }
            }
            EventKind::Userdata => {
                for (k, v) in event.userdata.iter().flatten() {
                    match v {
                        Some(v) => self.userdata.insert(k.clone(), v.clone()),
                        None => self.userdata.remove(k),
                    };
                }
            }
            EventKind::Closed => {
                self.closed = Some((event.reason.unwrap_or(Reason::Server), event.ts_ms));
                for p in self.participants.values_mut() {
                    if p.present {
                        p.ended_at = Some(event.seq);
                    }
                    p.present = false;
                    p.attached = None;
                    p.detached_since = None;
                }
            }
        }
        if matches!(
            event.kind,
            EventKind::Joined | EventKind::Left | EventKind::Message | EventKind::Notice
        ) {
            self.last_activity = now;
        }
        self.events.push(event);
    }

    /// Builds and applies a batch of events, returning them for the journal.
    fn commit(&mut self, events: Vec<StoredEvent>, now: Instant) -> Vec<StoredEvent> {
        for e in &events {
            self.apply(e.clone(), now);
        }
        events
    }

    pub fn join(
        &mut self,
        info: Participant,
        owner: Owner,
        limits: &SessionLimits,
        ts_ms: u64,
        now: Instant,
    ) -> Result<StoredEvent> {
        self.ensure_open()?;
        self.ensure_room(limits)?;
        let present = self.participants.values().filter(|p| p.present).count();
        if present >= limits.max_participants {
            return refuse(
                ChatErrorCode::LimitExceeded,
                format!(
                    "session {} already has {present} participants (limit {})",
                    self.id, limits.max_participants
                ),
            );
        }
        let visibility = info.visibility;
        let event = self.event(EventKind::Joined, &info, visibility, ts_ms);
        let stored = StoredEvent {
            event,
            owner: Some(owner),
            key: None,
        };
        Ok(self.commit(vec![stored], now).remove(0))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &mut self,
        participant_id: &str,
        kind: PostKind,
        text: String,
        rich: Option<RichContent>,
        requested: Visibility,
        key: Option<String>,
        limits: &SessionLimits,
        ts_ms: u64,
        now: Instant,
    ) -> Result<PostOutcome> {
        let p = self.check_present(participant_id)?;
        if let Some(seq) = key.as_ref().and_then(|k| p.keys.get(k)) {
            return Ok(PostOutcome::Duplicate(*seq));
        }
        self.ensure_room(limits)?;
        let visibility = p.info.visibility.narrow(requested);
        let mut event = self.event(kind.into(), &p.info, visibility, ts_ms);
        event.text = Some(text);
        event.rich = rich;
        let stored = StoredEvent {
            event,
            owner: None,
            key,
        };
        Ok(PostOutcome::New(Box::new(
            self.commit(vec![stored], now).remove(0),
        )))
    }

    /// The participant leaves; the after-action may close the session.
    pub fn leave(
        &mut self,
        participant_id: &str,
        after_action: AfterAction,
        reason: Reason,
        ts_ms: u64,
        now: Instant,
    ) -> Result<Vec<StoredEvent>> {
        let p = self.check_present(participant_id)?;
        let mut left = self.event(EventKind::Left, &p.info, p.info.visibility, ts_ms);
        left.after_action = Some(after_action);
        left.reason = Some(reason);
        let mut out = self.commit(
            vec![StoredEvent {
                event: left,
                owner: None,
                key: None,
            }],
            now,
        );
        let agents_remain = self.participants.values().any(|p| {
            p.present
                && p.info.participant_type == ParticipantType::Agent
                && p.info.style != Style::Bot
        });
        let anyone_remains = self.participants.values().any(|p| p.present);
        let close = match after_action {
            AfterAction::ForceClose => Some(Reason::ForceClose),
            AfterAction::CloseIfNoAgents if !agents_remain => Some(Reason::NoAgents),
            _ if !anyone_remains => Some(Reason::NoParticipants),
            _ => None,
        };
        if let Some(reason) = close {
            out.extend(self.close(reason, ts_ms, now));
        }
        Ok(out)
    }

    pub fn update_userdata(
        &mut self,
        participant_id: Option<&str>,
        changes: UserdataChanges,
        limits: &SessionLimits,
        ts_ms: u64,
        now: Instant,
    ) -> Result<StoredEvent> {
        let who = match participant_id {
            Some(id) => self.check_present(id)?.info.clone(),
            // The system may write to a closed session too: the interaction's userdata outlive
            // the chat (a waiting workflow reads the bot's outcome after a close).
            None => system_participant(),
        };
        self.ensure_room(limits)?;
        let mut event = self.event(EventKind::Userdata, &who, Visibility::Int, ts_ms);
        event.userdata = Some(changes);
        let stored = StoredEvent {
            event,
            owner: None,
            key: None,
        };
        Ok(self.commit(vec![stored], now).remove(0))
    }

    /// Closes the session (no-op if closed already). Closing removes every participant.
    pub fn close(&mut self, reason: Reason, ts_ms: u64, now: Instant) -> Option<StoredEvent> {
        if self.is_closed() {
            return None;
        }
        let mut event = self.event(
            EventKind::Closed,
            &system_participant(),
            Visibility::All,
            ts_ms,
        );
        event.reason = Some(reason);
        let stored = StoredEvent {
            event,
            owner: None,
            key: None,
        };
        Some(self.commit(vec![stored], now).remove(0))
    }

    /// The events as the journal keeps them (owners of joiners, client keys of posts), for
    /// rewriting a compacted journal.
    pub fn stored_events(&self) -> Vec<StoredEvent> {
        let keys: HashMap<u64, &String> = self
            .participants
            .values()
            .flat_map(|p| p.keys.iter().map(|(k, seq)| (*seq, k)))
            .collect();
        self.events
            .iter()
            .map(|e| StoredEvent {
                event: e.clone(),
                owner: (e.kind == EventKind::Joined)
                    .then(|| {
                        self.participants
                            .get(&e.participant_id)
                            .map(|p| p.owner.clone())
                    })
                    .flatten(),
                key: keys.get(&e.seq).map(|k| (*k).clone()),
            })
            .collect()
    }

    /// Whether `viewer` may see `event`.
    pub fn may_view(viewer: &Participant, event: &ChatEvent) -> bool {
        event.participant_id == viewer.id
            || may_see(viewer.participant_type, viewer.visibility, event.visibility)
    }

    /// Readable events after `since` for `viewer`, at most `max_events` and about `max_bytes` of
    /// text; and the last sequence number examined (the next `since`).
    /// A participant that has left (or whose session closed) reads nothing after that event.
    pub fn read_for(
        &self,
        viewer: &ParticipantState,
        since: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> (Vec<ChatEvent>, u64) {
        let mut out = Vec::new();
        let mut bytes = 0;
        let limit = viewer
            .ended_at
            .map_or(self.visible_seq, |e| e.min(self.visible_seq));
        let mut scanned = since.min(limit);
        let start = scanned as usize;
        let end = limit as usize;
        let viewer = &viewer.info;
        for event in &self.events[start..end] {
            if out.len() >= max_events || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            scanned = event.seq;
            if Self::may_view(viewer, event) {
                bytes += 128
                    + event.text.as_ref().map_or(0, String::len)
                    + event.nickname.len()
                    + event
                        .userdata
                        .iter()
                        .flatten()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len) + 8)
                        .sum::<usize>();
                out.push(event.clone());
            }
        }
        (out, scanned)
    }
}

pub fn reason_str(reason: Reason) -> &'static str {
    match reason {
        Reason::Requested => "requested",
        Reason::Disconnected => "disconnected",
        Reason::Idle => "idle",
        Reason::ForceClose => "force-close",
        Reason::NoAgents => "no-agents",
        Reason::NoParticipants => "no-participants",
        Reason::Server => "server",
    }
}

/// One session and the channel that tells its readers how far they may read.
pub struct Session {
    pub id: String,
    state: Mutex<SessionState>,
    visible: watch::Sender<u64>,
}

impl Session {
    pub(crate) fn new(state: SessionState) -> Arc<Session> {
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

    pub(crate) fn signal(&self, seq: u64) {
        self.visible.send_modify(|v| *v = (*v).max(seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits {
        max_participants: 8,
        max_events: 100,
    };

    fn person(id: &str, t: ParticipantType, style: Style, v: Visibility) -> Participant {
        Participant {
            id: id.into(),
            nickname: id.into(),
            participant_type: t,
            style,
            visibility: v,
        }
    }

    fn session() -> SessionState {
        let now = Instant::now();
        let mut s = SessionState::new("s".into(), 0, Userdata::new(), now);
        for p in [
            person(
                "cust",
                ParticipantType::Customer,
                Style::Regular,
                Visibility::All,
            ),
            person(
                "agent",
                ParticipantType::Agent,
                Style::Regular,
                Visibility::All,
            ),
            person("bot", ParticipantType::Agent, Style::Bot, Visibility::Int),
            person(
                "sup",
                ParticipantType::Supervisor,
                Style::Regular,
                Visibility::Vip,
            ),
        ] {
            s.join(p, Owner::Http, &LIMITS, 0, now).unwrap();
        }
        s.visible_seq = s.last_seq();
        s
    }

    fn seen_by(s: &SessionState, who: &str) -> Vec<u64> {
        let viewer = s.participant(who).unwrap();
        s.read_for(viewer, 0, 1000, usize::MAX)
            .0
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    #[test]
    fn visibility_of_joins_and_posts() {
        let mut s = session();
        let now = Instant::now();
        // 5: INT bot posts ALL: narrowed to INT.
        let out = s
            .post(
                "bot",
                PostKind::Message,
                "hi".into(),
                None,
                Visibility::All,
                None,
                &LIMITS,
                0,
                now,
            )
            .unwrap();
        let PostOutcome::New(e) = out else { panic!() };
        assert_eq!(e.event.visibility, Visibility::Int);
        // 6: agent narrows its post to VIP.
        s.post(
            "agent",
            PostKind::Message,
            "psst".into(),
            None,
            Visibility::Vip,
            None,
            &LIMITS,
            0,
            now,
        )
        .unwrap();
        s.visible_seq = s.last_seq();
        assert_eq!(seen_by(&s, "cust"), vec![1, 2]);
        assert_eq!(seen_by(&s, "agent"), vec![1, 2, 3, 5, 6]);
        assert_eq!(seen_by(&s, "sup"), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(seen_by(&s, "bot"), vec![1, 2, 3, 5]);
    }

    #[test]
    fn client_key_is_accepted_once() {
        let mut s = session();
        let now = Instant::now();
        let post = |s: &mut SessionState| {
            s.post(
                "cust",
                PostKind::Message,
                "x".into(),
                None,
                Visibility::All,
                Some("k".into()),
                &LIMITS,
                0,
                now,
            )
            .unwrap()
        };
        let first = post(&mut s);
        assert!(matches!(first, PostOutcome::New(ref e) if e.event.seq == 5));
        assert_eq!(post(&mut s), PostOutcome::Duplicate(5));
        assert_eq!(s.last_seq(), 5);
    }

    #[test]
    fn after_actions() {
        let now = Instant::now();
        let mut s = session();
        let out = s
            .leave("sup", AfterAction::KeepAlive, Reason::Requested, 0, now)
            .unwrap();
        assert_eq!(out.len(), 1);
        // The customer leaves close-if-no-agents while a human agent remains: the chat goes on.
        let out = s
            .leave(
                "cust",
                AfterAction::CloseIfNoAgents,
                Reason::Requested,
                0,
                now,
            )
            .unwrap();
        assert_eq!(out.len(), 1);
        // The agent leaves close-if-no-agents: only a bot remains, bots are not agents.
        let out = s
            .leave(
                "agent",
                AfterAction::CloseIfNoAgents,
                Reason::Requested,
                0,
                now,
            )
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].event.reason, Some(Reason::NoAgents));
        assert!(s.is_closed());
        assert!(s
            .post(
                "bot",
                PostKind::Message,
                "x".into(),
                None,
                Visibility::All,
                None,
                &LIMITS,
                0,
                now
            )
            .is_err());

        let mut s = session();
        let out = s
            .leave("bot", AfterAction::ForceClose, Reason::Requested, 0, now)
            .unwrap();
        assert_eq!(out[1].event.reason, Some(Reason::ForceClose));

        let mut s = session();
        for who in ["cust", "agent", "bot"] {
            assert_eq!(
                s.leave(who, AfterAction::KeepAlive, Reason::Requested, 0, now)
                    .unwrap()
                    .len(),
                1
            );
        }
        let out = s
            .leave("sup", AfterAction::KeepAlive, Reason::Requested, 0, now)
            .unwrap();
        assert_eq!(out[1].event.reason, Some(Reason::NoParticipants));
    }

    #[test]
    fn replay_rebuilds_the_same_state() {
        let now = Instant::now();
        let mut s = session();
        let mut log: Vec<StoredEvent> = Vec::new();
        let mut s2 = SessionState::new("s".into(), 0, Userdata::new(), now);
        // Re-create the joins as stored events.
        for e in s.events().to_vec() {
            log.push(StoredEvent {
                event: e,
                owner: Some(Owner::Http),
                key: None,
            });
        }
        log.push(
            match s
                .post(
                    "cust",
                    PostKind::Message,
                    "a".into(),
                    None,
                    Visibility::All,
                    Some("k1".into()),
                    &LIMITS,
                    0,
                    now,
                )
                .unwrap()
            {
                PostOutcome::New(e) => *e,
                PostOutcome::Duplicate(_) => panic!(),
            },
        );
        log.push(
            s.update_userdata(
                Some("agent"),
                [("x".to_string(), Some("1".to_string()))].into(),
                &LIMITS,
                0,
                now,
            )
            .unwrap(),
        );
        for e in log {
            s2.apply(e, now);
        }
        assert_eq!(s2.events(), s.events());
        assert_eq!(s2.userdata, s.userdata);
        assert_eq!(
            s2.post(
                "cust",
                PostKind::Message,
                "a".into(),
                None,
                Visibility::All,
                Some("k1".into()),
                &LIMITS,
                0,
                now
            )
            .unwrap(),
            PostOutcome::Duplicate(5)
        );
    }

    #[test]
    fn limits_are_enforced() {
        let now = Instant::now();
        let limits = SessionLimits {
            max_participants: 4,
            max_events: 6,
        };
        let mut s = session();
        let extra = person("x", ParticipantType::Agent, Style::Regular, Visibility::All);
        assert!(s.join(extra, Owner::Http, &limits, 0, now).is_err());
        s.post(
            "cust",
            PostKind::Message,
            "1".into(),
            None,
            Visibility::All,
            None,
            &limits,
            0,
            now,
        )
        .unwrap();
        s.post(
            "cust",
            PostKind::Message,
            "2".into(),
            None,
            Visibility::All,
            None,
            &limits,
            0,
            now,
        )
        .unwrap();
        let err = s.post(
            "cust",
            PostKind::Message,
            "3".into(),
            None,
            Visibility::All,
            None,
            &limits,
            0,
            now,
        );
        assert!(err.is_err());
        // Leaving still works at the limit, so a full session can always end.
        s.leave("cust", AfterAction::ForceClose, Reason::Requested, 0, now)
            .unwrap();
        assert!(s.is_closed());
    }
}

/// Random sequences of joins, posts, leaves, userdata changes and closes against the session
/// state machine, checked after every step: numbering, visibility, keys, the end, and replay.
#[cfg(test)]
mod state_machine {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    const LIMITS: SessionLimits = SessionLimits {
        max_participants: 6,
        max_events: 40,
    };

    #[derive(Debug, Clone)]
    enum Op {
        Join(ParticipantType, Style, Visibility),
        Post(usize, PostKind, Visibility, Option<u8>),
        Leave(usize, AfterAction),
        Userdata(Option<usize>, u8),
        Close,
    }

    fn visibility() -> impl Strategy<Value = Visibility> {
        prop_oneof![
            Just(Visibility::All),
            Just(Visibility::Int),
            Just(Visibility::Vip)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let kind = prop_oneof![
            Just(ParticipantType::Customer),
            Just(ParticipantType::Agent),
            Just(ParticipantType::Supervisor),
        ];
        let style = prop_oneof![Just(Style::Regular), Just(Style::Bot)];
        let post = prop_oneof![
            Just(PostKind::Message),
            Just(PostKind::Notice),
            Just(PostKind::Typing)
        ];
        let after = prop_oneof![
            Just(AfterAction::KeepAlive),
            Just(AfterAction::CloseIfNoAgents),
            Just(AfterAction::ForceClose)
        ];
        prop_oneof![
            3 => (kind, style, visibility()).prop_map(|(k, s, v)| Op::Join(k, s, v)),
            6 => (0..8usize, post, visibility(), proptest::option::of(0..4u8))
                .prop_map(|(i, k, v, key)| Op::Post(i, k, v, key)),
            2 => (0..8usize, after).prop_map(|(i, a)| Op::Leave(i, a)),
            1 => (proptest::option::of(0..8usize), any::<u8>()).prop_map(|(i, v)| Op::Userdata(i, v)),
            1 => Just(Op::Close),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_sequence_keeps_the_session_rules(ops in proptest::collection::vec(op(), 1..80)) {
            let now = Instant::now();
            let mut s = SessionState::new("s".into(), 0, Userdata::new(), now);
            let mut joined: Vec<String> = Vec::new();
            let mut first_post_of_key: HashMap<(String, u8), u64> = HashMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                let before = s.last_seq();
                let was_closed = s.is_closed();
                match op {
                    Op::Join(t, style, v) => {
                        let id = format!("p{n}");
                        let info = Participant { id: id.clone(), nickname: id.clone(), participant_type: t, style, visibility: v };
                        if s.join(info, Owner::Http, &LIMITS, 0, now).is_ok() {
                            joined.push(id);
                        }
                    }
                    Op::Post(i, kind, v, key) => {
                        let Some(id) = joined.get(i).cloned() else { continue };
                        let own = s.participant(&id).map(|p| p.info.visibility);
                        let result = s.post(&id, kind, "t".into(), None, v, key.map(|k| k.to_string()), &LIMITS, 0, now);
                        match result {
                            Ok(PostOutcome::New(e)) => {
                                // A post may narrow its participant's visibility, never widen it.
                                prop_assert_eq!(e.event.visibility, own.unwrap().narrow(v));
                                if let Some(k) = key {
                                    prop_assert!(first_post_of_key.insert((id, k), e.event.seq).is_none());
                                }
                            }
                            Ok(PostOutcome::Duplicate(seq)) => {
                                // A repeated key writes nothing and names the first post.
                                prop_assert_eq!(s.last_seq(), before);
                                prop_assert_eq!(Some(&seq), first_post_of_key.get(&(id, key.unwrap())));
                            }
                            Err(_) => prop_assert_eq!(s.last_seq(), before),
                        }
                    }
                    Op::Leave(i, after) => {
                        let Some(id) = joined.get(i).cloned() else { continue };
                        let _ = s.leave(&id, after, Reason::Requested, 0, now);
                        if after == AfterAction::ForceClose && s.last_seq() > before {
                            prop_assert!(s.is_closed(), "force-close closes");
                        }
                    }
                    Op::Userdata(i, v) => {
                        let who = i.and_then(|i| joined.get(i).cloned());
                        let changes: UserdataChanges = [("k".to_string(), Some(v.to_string()))].into();
                        let ok = s.update_userdata(who.as_deref(), changes, &LIMITS, 0, now).is_ok();
                        if ok {
                            prop_assert_eq!(s.userdata.get("k"), Some(&v.to_string()));
                        }
                    }
                    Op::Close => {
                        let _ = s.close(Reason::Server, 0, now);
                        prop_assert!(s.is_closed());
                    }
                }
                // Numbering: 1, 2, 3, ... without gaps.
                for (i, e) in s.events().iter().enumerate() {
                    prop_assert_eq!(e.seq, i as u64 + 1);
                }
                // After the close only the system's userdata may be written.
                if was_closed {
                    for e in &s.events()[before as usize..] {
                        prop_assert!(e.kind == EventKind::Userdata && e.participant_type == ParticipantType::System, "{:?} after the close", e.kind);
                    }
                    prop_assert!(s.participants().all(|p| !p.present));
                }
                // Joins and posts stop at the limit; leaves and closes may go a little beyond.
                prop_assert!(s.events().len() <= LIMITS.max_events + 2 * LIMITS.max_participants + 1);
            }
            // Replaying what the journal keeps rebuilds the same session.
            let mut replayed = SessionState::new("s".into(), 0, Userdata::new(), now);
            for stored in s.stored_events() {
                replayed.apply(stored, now);
            }
            prop_assert_eq!(replayed.events(), s.events());
            prop_assert_eq!(&replayed.userdata, &s.userdata);
            prop_assert_eq!(replayed.is_closed(), s.is_closed());
            for p in s.participants() {
                let r = replayed.participant(&p.info.id).unwrap();
                prop_assert_eq!((r.present, r.ended_at, &r.keys), (p.present, p.ended_at, &p.keys));
            }
        }
    }
}
