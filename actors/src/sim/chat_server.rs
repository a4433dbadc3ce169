//! A model of the Chat Server for the simulation: sessions of numbered events, participants
//! attached to a connection (detached when it closes, resumable from any seq), client-key
//! dedupe of posts, and fencing by epoch (a Hello of a higher epoch fences the connections of
//! lower ones; their requests are refused). What it accepted is durable: a crash closes every
//! connection and loses nothing (the real server acknowledges once its journal is on disk).

use std::collections::BTreeMap;

use bgs_proto::chat::{
    ChatError, ChatErrorCode, ChatEvent, ChatRequest, ChatResponse, ClientFrame, ClientRole,
    EventKind, ParticipantType, ServerFrame, Style, CHAT_PROTOCOL_VERSION,
};

pub(super) const CUSTOMER: &str = "customer";

pub(super) struct Session {
    pub(super) events: Vec<ChatEvent>,
    /// (participant, key) -> the seq of the post first accepted with it.
    keys: BTreeMap<(String, String), u64>,
    /// Participants and the connection each is attached to.
    attached: BTreeMap<String, Option<u64>>,
}

struct Conn {
    epoch: Option<u64>,
    fenced: bool,
}

/// A post the server accepted: who, in which session, by a connection of which epoch, and the
/// highest epoch the server knew then.
pub(super) struct AcceptedPost {
    pub(super) session: String,
    pub(super) epoch: u64,
    pub(super) max_epoch: u64,
}

pub(super) struct ChatServer {
    pub(super) up: bool,
    pub(super) max_epoch: u64,
    pub(super) sessions: BTreeMap<String, Session>,
    conns: BTreeMap<u64, Conn>,
    next_participant: u64,
    pub(super) accepted: Vec<AcceptedPost>,
    /// Mutation switches for the checkers' own test: a server that does not fence, or does
    /// not dedupe posts by client key.
    pub(super) fencing: bool,
    pub(super) dedupe: bool,
}

fn refuse(code: ChatErrorCode, message: &str) -> Result<ChatResponse, ChatError> {
    Err(ChatError::new(code, message))
}

impl ChatServer {
    pub(super) fn new() -> Self {
        ChatServer {
            up: true,
            max_epoch: 0,
            sessions: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_participant: 1,
            accepted: Vec::new(),
            fencing: true,
            dedupe: true,
        }
    }

    pub(super) fn open_session(&mut self, id: &str, seq_base: u64) {
        let mut joined = ChatEvent::new(1, EventKind::Joined, CUSTOMER, ParticipantType::Customer);
        joined.ts_ms = seq_base;
        let mut attached = BTreeMap::new();
        attached.insert(CUSTOMER.to_string(), None);
        self.sessions.insert(
            id.to_string(),
            Session {
                events: vec![joined],
                keys: BTreeMap::new(),
                attached,
            },
        );
    }

    /// A connection opened (false: the server is down).
    pub(super) fn connect(&mut self, conn: u64) -> bool {
        if self.up {
            self.conns.insert(
                conn,
                Conn {
                    epoch: None,
                    fenced: false,
                },
            );
        }
        self.up
    }

    /// A connection closed: its participants are detached (and go on existing).
    pub(super) fn closed(&mut self, conn: u64) {
        self.conns.remove(&conn);
        for s in self.sessions.values_mut() {
            for a in s.attached.values_mut() {
                if *a == Some(conn) {
                    *a = None;
                }
            }
        }
    }

    /// A crash: every connection is gone (the caller tells the clients); the sessions stay.
    pub(super) fn crash(&mut self) -> Vec<u64> {
        self.up = false;
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for c in &conns {
            self.closed(*c);
        }
        conns
    }

    /// The customer of `session` writes: the frames that go out to followers.
    pub(super) fn customer(
        &mut self,
        session: &str,
        kind: EventKind,
        text: &str,
    ) -> Vec<(u64, ServerFrame)> {
        let mut out = Vec::new();
        if self.up {
            let mut e = ChatEvent::new(0, kind, CUSTOMER, ParticipantType::Customer);
            e.text = Some(text.to_string());
            self.append(session, e, &mut out);
        }
        out
    }

    /// Appends an event and feeds it to every attached participant.
    fn append(
        &mut self,
        session: &str,
        mut e: ChatEvent,
        out: &mut Vec<(u64, ServerFrame)>,
    ) -> u64 {
        let Some(s) = self.sessions.get_mut(session) else {
            return 0;
        };
        e.seq = s.events.len() as u64 + 1;
        let seq = e.seq;
        s.events.push(e.clone());
        for (pid, conn) in &s.attached {
            if let Some(c) = conn {
                out.push((
                    *c,
                    ServerFrame::Events {
                        session_id: session.to_string(),
                        participant_id: pid.clone(),
                        events: vec![e.clone()],
                    },
                ));
            }
        }
        seq
    }

    /// One request of a connection: its reply first, then whatever events it starts.
    pub(super) fn request(&mut self, conn: u64, frame: ClientFrame) -> Vec<(u64, ServerFrame)> {
        let mut out = Vec::new();
        let Some(c) = self.conns.get(&conn) else {
            return out;
        };
        let stale = c.fenced || c.epoch.is_some_and(|e| e < self.max_epoch);
        let id = frame.id;
        let mut feed = Vec::new();
        let result = match frame.request {
            ChatRequest::Hello(h) => {
                let epoch = match h.role {
                    ClientRole::Gateway { epoch, .. } => epoch,
                    ClientRole::Agent => 0,
                };
                if self.fencing && epoch < self.max_epoch {
                    refuse(ChatErrorCode::Fenced, "an older epoch")
                } else {
                    if epoch > self.max_epoch {
                        self.max_epoch = epoch;
                        for (other, oc) in self.conns.iter_mut() {
                            if *other != conn && oc.epoch.is_some_and(|e| e < epoch) && !oc.fenced {
                                oc.fenced = true;
                                out.push((
                                    *other,
                                    ServerFrame::Fenced {
                                        cluster_id: "bgs".into(),
                                        epoch,
                                    },
                                ));
                            }
                        }
                    }
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.epoch = Some(epoch);
                    }
                    Ok(ChatResponse::Welcome {
                        version: CHAT_PROTOCOL_VERSION,
                        server_id: "cs".into(),
                        max_frame: 1 << 20,
                    })
                }
            }
            _ if self.fencing && stale => refuse(ChatErrorCode::Fenced, "fenced"),
            ChatRequest::Join(j) => match self.sessions.get(&j.session_id) {
                None => refuse(ChatErrorCode::UnknownSession, "no such session"),
                Some(_) => {
                    let pid = format!("bot{}", self.next_participant);
                    self.next_participant += 1;
                    let mut e = ChatEvent::new(0, EventKind::Joined, &pid, ParticipantType::Agent);
                    e.style = Style::Bot;
                    let seq = self.append(&j.session_id, e, &mut out);
                    if let Some(s) = self.sessions.get_mut(&j.session_id) {
                        s.attached.insert(pid.clone(), Some(conn));
                    }
                    feed.push((j.session_id.clone(), pid.clone(), j.since_seq));
                    Ok(ChatResponse::Joined {
                        session_id: j.session_id,
                        participant_id: pid,
                        seq,
                    })
                }
            },
            ChatRequest::Resume(r) => match self.sessions.get_mut(&r.session_id) {
                // A resume from a connection older than the one the participant is attached
                // to is the client's past: refused (the real server does the same).
                Some(s)
                    if s.attached
                        .get(&r.participant_id)
                        .is_some_and(|a| a.is_some_and(|c| c > conn)) =>
                {
                    refuse(ChatErrorCode::NotAllowed, "attached to a newer connection")
                }
                Some(s) if s.attached.contains_key(&r.participant_id) => {
                    s.attached.insert(r.participant_id.clone(), Some(conn));
                    let seq = s.events.len() as u64;
                    feed.push((r.session_id.clone(), r.participant_id.clone(), r.since_seq));
                    Ok(ChatResponse::Joined {
                        session_id: r.session_id,
                        participant_id: r.participant_id,
                        seq,
                    })
                }
                _ => refuse(ChatErrorCode::UnknownParticipant, "no such participant"),
            },
            ChatRequest::Post(p) => {
                let known = self
                    .sessions
                    .get(&p.session_id)
                    .is_some_and(|s| s.attached.contains_key(&p.participant_id));
                let dup = p.key.as_ref().filter(|_| self.dedupe).and_then(|k| {
                    self.sessions
                        .get(&p.session_id)
                        .and_then(|s| s.keys.get(&(p.participant_id.clone(), k.clone())))
                        .copied()
                });
                match (known, dup) {
                    (false, _) => refuse(ChatErrorCode::UnknownParticipant, "no such participant"),
                    (true, Some(seq)) => Ok(ChatResponse::Posted {
                        seq,
                        duplicate: true,
                    }),
                    (true, None) => {
                        let mut e = ChatEvent::new(
                            0,
                            EventKind::Message,
                            &p.participant_id,
                            ParticipantType::Agent,
                        );
                        e.text = Some(p.text);
                        e.style = Style::Bot;
                        let seq = self.append(&p.session_id, e, &mut out);
                        if let (Some(k), Some(s)) = (p.key, self.sessions.get_mut(&p.session_id)) {
                            s.keys.insert((p.participant_id, k), seq);
                        }
                        let epoch = self.conns.get(&conn).and_then(|c| c.epoch).unwrap_or(0);
                        self.accepted.push(AcceptedPost {
                            session: p.session_id,
                            epoch,
                            max_epoch: self.max_epoch,
                        });
                        Ok(ChatResponse::Posted {
                            seq,
                            duplicate: false,
                        })
                    }
                }
            }
            ChatRequest::Ping => Ok(ChatResponse::Pong),
            _ => refuse(ChatErrorCode::BadRequest, "not modelled"),
        };
        // The reply goes before the events it starts (a join's replay follows its answer);
        // events appended for others were queued above, on their own connections.
        out.insert(0, (conn, ServerFrame::Reply { id, result }));
        for (session, pid, since) in feed {
            if let Some(s) = self.sessions.get(&session) {
                let events: Vec<ChatEvent> =
                    s.events.iter().filter(|e| e.seq > since).cloned().collect();
                if !events.is_empty() {
                    out.push((
                        conn,
                        ServerFrame::Events {
                            session_id: session,
                            participant_id: pid,
                            events,
                        },
                    ));
                }
            }
        }
        out
    }
}
