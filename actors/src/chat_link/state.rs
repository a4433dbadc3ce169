//! The ChatLink's decisions, with no actix, tokio, socket or clock inside: [`LinkState::step`]
//! takes the time and one [`Input`] and returns the [`Effect`]s the pump (`chat_link/mod.rs`)
//! carries out, as `HaState` does for the HA pair. The seeded simulation (`actors/src/sim`) runs it
//! against a model of the Chat Server.
//!
//! What it keeps: one connection at a time, numbered by a generation (whatever an older one
//! says is ignored); the requests in flight, re-sent in order on the next connection (posts
//! carry client keys, so a re-send cannot post twice; a join sent on a lost connection is in
//! doubt and fails instead); and a route per followed participant with a [`Cursor`] at the
//! last event routed, from which the participant is resumed after a reconnect.
//!
//! Generic over the follower `F` (where a participant's [`Feed`] goes: a mailbox in the node, an
//! index in the simulation) and the reply `R` (where a call's answer goes).

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use bgs_proto::chat::{
    ChatError, ChatErrorCode, ChatEvent, ChatRequest, ChatResponse, ClientRole, Hello,
    ResumeRequest, Secret, ServerFrame, SharedClientFrame, CHAT_PROTOCOL_VERSION,
};

use crate::delivery::Cursor;

/// Milliseconds on a clock that only goes forward (the pump's, or the simulation's).
pub(crate) type Millis = u64;

/// Why a chat call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatCallError {
    /// The Chat Server refused the request.
    #[error("chat server refused: {0}")]
    Refused(ChatError),
    /// The Chat Server cannot be reached (after every reconnect attempt), or the link stopped.
    #[error("chat server unavailable: {0}")]
    Unavailable(String),
}

/// What the ChatLink tells a participant's follower, in order on one mailbox: the join first,
/// then its events, or that the feed is lost.
#[derive(Debug)]
pub enum Feed {
    Joined(ParticipantJoined),
    Events(ParticipantEvents),
    Lost(FeedLost),
}

/// A join (or resume) the follower asked for was accepted: the participant's events follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantJoined {
    /// The token of the call that asked (`Follow::token`).
    pub token: u64,
    pub session_id: String,
    pub participant_id: String,
    /// The join event's number (for a resume: the session's last number).
    pub seq: u64,
}

/// Events of one followed participant, each new to it.
#[derive(Debug)]
pub struct ParticipantEvents {
    pub session_id: String,
    pub participant_id: String,
    pub events: Vec<ChatEvent>,
}

/// A followed participant's feed ended without an event saying so.
#[derive(Debug, Clone)]
pub struct FeedLost {
    pub session_id: String,
    pub participant_id: String,
    /// True: the Chat Server no longer knows the participant; false: the Chat Server is gone.
    pub removed: bool,
}

/// Who follows the participant a join or resume brings, and the token its [`ParticipantJoined`]
/// carries back.
#[derive(Debug, Clone)]
pub struct Follow<F> {
    pub to: F,
    pub token: u64,
}

/// How the link behaves; the role's epoch is replaced by each activation.
#[derive(Debug, Clone)]
pub(crate) struct LinkConfig {
    pub address: String,
    pub role: ClientRole,
    pub credential: Secret,
    pub reconnect_delay_ms: Millis,
    pub reconnect_attempts: u32,
    /// Requests queued while the link is down, beyond which calls fail at once.
    pub max_queued: usize,
    /// How long the Chat Server may take to answer the Hello of a new connection.
    pub hello_timeout_ms: Millis,
}

pub(crate) enum Input<F, R> {
    /// Become the primary's link with this epoch (a connection of an older epoch is replaced).
    Activate { epoch: u64 },
    /// Not the primary any more: forget every route, fail every call.
    Deactivate,
    /// A switchover drains: drop incoming events (the next primary replays them).
    Pause,
    /// The switchover was abandoned: re-fetch what the pause dropped on a fresh connection.
    Unpause,
    /// The connection the [`Effect::Connect`] of `generation` asked for is open...
    Connected { generation: u64 },
    /// ... or could not be made.
    ConnectFailed { generation: u64, error: String },
    /// A frame read on the connection of `generation`.
    Frame { generation: u64, frame: ServerFrame },
    /// The connection of `generation` ended (read or write side).
    Closed { generation: u64 },
    /// A request; with `follow`, a successful join or resume routes the participant's events.
    /// With no `reply`, nobody waits: the request is sent whenever the link is up again.
    Call {
        request: ChatRequest,
        follow: Option<Follow<F>>,
        reply: Option<R>,
    },
    /// Stop routing a participant's events (its bot is gone, or its follower).
    Unfollow {
        session_id: String,
        participant_id: String,
    },
    /// A time the link asked to be woken at ([`Effect::WakeAt`]) may have come.
    Tick,
}

pub(crate) enum Effect<F, R> {
    /// Open a connection; answer with `Connected` or `ConnectFailed` of this generation. Any
    /// older connection is dropped.
    Connect {
        generation: u64,
        reconnect: bool,
    },
    /// Send on the current connection (its failure comes back as `Closed`). The request is
    /// shared with the pending call that keeps it for a re-send.
    Send(SharedClientFrame),
    /// Drop the current connection.
    Disconnect,
    /// The link is up (true) or not, for status and metrics.
    Up(bool),
    WakeAt(Millis),
    Reply {
        to: R,
        result: Result<ChatResponse, ChatCallError>,
    },
    Feed {
        to: F,
        feed: Feed,
    },
    /// The Chat Server fenced this node: tell the HA coordinator.
    Fenced,
    /// Routes to let go of (a demotion drops 100 000 of them: freed off the actor's thread).
    Dispose(Routes<F>),
}

/// The routes of followed participants, by (session, participant).
pub(crate) type Routes<F> = HashMap<(String, String), Route<F>, RouteHasher>;

/// A node hashes with random keys (no one outside can choose colliding ids); the simulation
/// with fixed ones, so that the order in which routes are resumed, and so every later draw of
/// its random numbers, is the same each time a seed runs.
#[cfg(not(test))]
type RouteHasher = std::collections::hash_map::RandomState;
#[cfg(test)]
type RouteHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

pub(crate) struct Route<F> {
    follower: F,
    cursor: Cursor,
}

struct Pending<F, R> {
    request: Arc<ChatRequest>,
    follow: Option<Follow<F>>,
    reply: Option<R>,
    /// Sent on the current connection (else queued for the next one).
    sent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Down,
    Connecting,
    /// Connected, waiting for Welcome and the resumes.
    Handshaking,
    Up,
}

enum Handshake {
    Hello,
    Resume(String, String),
}

/// Whether the link is up, for status and readiness.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    pub address: String,
    pub connected: bool,
    pub reconnects: u64,
    pub participants: usize,
}

pub(crate) struct LinkState<F, R> {
    config: LinkConfig,
    /// Only the primary is connected; a backup's link is inactive.
    active: bool,
    paused: bool,
    conn: Conn,
    generation: u64,
    /// Failed attempts since the link was last up.
    failures: u32,
    /// The attempts are exhausted: the followed bots were given up.
    gave_up: bool,
    reconnects: u64,
    next_id: u64,
    pending: BTreeMap<u64, Pending<F, R>>,
    /// Internal requests (Hello, Resume) of the current handshake.
    handshake: HashMap<u64, Handshake>,
    routes: Routes<F>,
    retry_at: Option<Millis>,
    hello_deadline: Option<Millis>,
    now: Millis,
    effects: Vec<Effect<F, R>>,
}

impl<F: Clone, R> LinkState<F, R> {
    pub(crate) fn new(config: LinkConfig) -> Self {
        Self {
            config,
            active: false,
            paused: false,
            conn: Conn::Down,
            generation: 0,
            failures: 0,
            gave_up: false,
            reconnects: 0,
            next_id: 1,
            pending: BTreeMap::new(),
            handshake: HashMap::new(),
            routes: Routes::default(),
            retry_at: None,
            hello_deadline: None,
            now: 0,
            effects: Vec::new(),
        }
    }

    pub(crate) fn status(&self) -> LinkStatus {
        LinkStatus {
            address: self.config.address.clone(),
            connected: self.conn == Conn::Up,
            reconnects: self.reconnects,
            participants: self.routes.len(),
        }
    }

    /// The generation of the connection the link uses or is opening.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// One input; the effects to carry out, in order (the tests' and the simulation's form).
    #[cfg(test)]
    pub(crate) fn step(&mut self, now: Millis, input: Input<F, R>) -> Vec<Effect<F, R>> {
        let mut out = Vec::new();
        self.step_into(now, input, &mut out);
        out
    }

    /// [`step`](Self::step) into a buffer the caller keeps (empty on entry): a step allocates
    /// nothing for its effects.
    pub(crate) fn step_into(
        &mut self,
        now: Millis,
        input: Input<F, R>,
        out: &mut Vec<Effect<F, R>>,
    ) {
        std::mem::swap(&mut self.effects, out);
        self.now = self.now.max(now);
        match input {
            Input::Activate { epoch } => self.activate(epoch),
            Input::Deactivate => self.deactivate(),
            Input::Pause => self.paused = true,
            Input::Unpause => self.unpause(),
            Input::Connected { generation } if generation == self.generation => self.connected(),
            Input::ConnectFailed { generation, error } if generation == self.generation => {
                tracing::warn!(address = %self.config.address, %error, "cannot connect to the chat server");
                self.lost();
            }
            Input::Frame { generation, frame } if generation == self.generation => {
                self.on_frame(frame)
            }
            Input::Closed { generation }
                if generation == self.generation && self.conn != Conn::Down =>
            {
                self.lost()
            }
            // Only the current connection counts: an old one ending must not drop a newer one.
            Input::Connected { .. }
            | Input::ConnectFailed { .. }
            | Input::Frame { .. }
            | Input::Closed { .. } => {}
            Input::Call {
                request,
                follow,
                reply,
            } => self.call(request, follow, reply),
            Input::Unfollow {
                session_id,
                participant_id,
            } => {
                self.routes.remove(&(session_id, participant_id));
            }
            Input::Tick => self.tick(),
        }
        std::mem::swap(&mut self.effects, out);
    }

    fn emit(&mut self, effect: Effect<F, R>) {
        self.effects.push(effect);
    }

    fn reply(&mut self, to: Option<R>, result: Result<ChatResponse, ChatCallError>) {
        if let Some(to) = to {
            self.emit(Effect::Reply { to, result });
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn activate(&mut self, epoch: u64) {
        if let ClientRole::Gateway { epoch: e, .. } = &mut self.config.role {
            *e = epoch;
        }
        self.active = true;
        self.paused = false;
        self.gave_up = false;
        self.failures = 0;
        tracing::info!(epoch, address = %self.config.address, "connecting to the chat server as primary");
        self.connect(false);
    }

    /// Opens a new connection, dropping the one there was.
    fn connect(&mut self, reconnect: bool) {
        if self.conn == Conn::Up {
            self.emit(Effect::Up(false));
        }
        self.generation += 1;
        self.conn = Conn::Connecting;
        self.handshake.clear();
        self.hello_deadline = None;
        self.retry_at = None;
        let generation = self.generation;
        self.emit(Effect::Connect {
            generation,
            reconnect,
        });
    }

    fn connected(&mut self) {
        self.handshake.clear();
        let id = self.take_id();
        self.handshake.insert(id, Handshake::Hello);
        let hello = SharedClientFrame {
            id,
            request: Arc::new(ChatRequest::Hello(Hello {
                version: CHAT_PROTOCOL_VERSION,
                role: self.config.role.clone(),
                client_name: "bgs".into(),
                credential: self.config.credential.clone(),
            })),
        };
        self.emit(Effect::Send(hello));
        self.conn = Conn::Handshaking;
        // A server that accepts the connection but never answers the Hello is as good as down.
        let deadline = self.now + self.config.hello_timeout_ms;
        self.hello_deadline = Some(deadline);
        self.emit(Effect::WakeAt(deadline));
    }

    fn tick(&mut self) {
        if self.conn == Conn::Handshaking && self.hello_deadline.is_some_and(|d| self.now >= d) {
            tracing::warn!(address = %self.config.address, "no answer to Hello; reconnecting");
            self.lost();
        }
        if self.retry_at.is_some_and(|r| self.now >= r) {
            self.retry_at = None;
            if self.active && self.conn == Conn::Down {
                self.reconnects += 1;
                self.connect(true);
            }
        }
    }

    /// The connection is gone (or could not be made): retry later, or give up on the bots.
    fn lost(&mut self) {
        let was_up = self.conn == Conn::Up;
        self.conn = Conn::Down;
        self.emit(Effect::Disconnect);
        if was_up {
            self.emit(Effect::Up(false));
        }
        self.generation += 1;
        self.handshake.clear();
        self.hello_deadline = None;
        if was_up {
            self.failures = 0;
            tracing::warn!(address = %self.config.address, "chat server connection lost; reconnecting");
        } else {
            self.failures += 1;
        }
        if !self.active {
            return;
        }
        if self.failures >= self.config.reconnect_attempts && !self.gave_up {
            self.give_up();
        }
        let at = self.now + self.config.reconnect_delay_ms;
        self.retry_at = Some(at);
        self.emit(Effect::WakeAt(at));
    }

    /// Every attempt failed: the followed bots end (chat_server_lost), calls fail. Requests
    /// nobody waits for stay queued: they are sent when the Chat Server is back.
    fn give_up(&mut self) {
        self.gave_up = true;
        tracing::error!(
            address = %self.config.address,
            attempts = self.config.reconnect_attempts,
            "chat server unreachable after every reconnect attempt; bots on it are stopped"
        );
        for ((session_id, participant_id), route) in std::mem::take(&mut self.routes) {
            self.emit(Effect::Feed {
                to: route.follower,
                feed: Feed::Lost(FeedLost {
                    session_id,
                    participant_id,
                    removed: false,
                }),
            });
        }
        let waited: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.reply.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waited {
            if let Some(p) = self.pending.remove(&id) {
                self.reply(
                    p.reply,
                    Err(ChatCallError::Unavailable(
                        "the chat server cannot be reached".into(),
                    )),
                );
            }
        }
    }

    fn call(&mut self, request: ChatRequest, follow: Option<Follow<F>>, reply: Option<R>) {
        if !self.active {
            match reply {
                Some(_) => self.reply(
                    reply,
                    Err(ChatCallError::Unavailable(
                        "this node is not the primary".into(),
                    )),
                ),
                None => tracing::warn!(
                    "a request for when the chat server is back was dropped: not primary"
                ),
            }
            return;
        }
        let queued_full = self.pending.len() >= self.config.max_queued;
        let refused = match reply {
            Some(_) => self.conn != Conn::Up && (self.gave_up || queued_full),
            None => queued_full,
        };
        if refused {
            match reply {
                Some(_) => self.reply(
                    reply,
                    Err(ChatCallError::Unavailable(
                        "the chat server cannot be reached".into(),
                    )),
                ),
                None => tracing::warn!(
                    "a request for when the chat server is back was dropped: the queue is full"
                ),
            }
            return;
        }
        let id = self.take_id();
        self.pending.insert(
            id,
            Pending {
                request: Arc::new(request),
                follow,
                reply,
                sent: false,
            },
        );
        self.send_pending(id);
    }

    fn send_pending(&mut self, id: u64) {
        if self.conn != Conn::Up {
            return;
        }
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        p.sent = true;
        let frame = SharedClientFrame {
            id,
            request: p.request.clone(),
        };
        self.emit(Effect::Send(frame));
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Reply { id, result } => {
                if let Some(h) = self.handshake.remove(&id) {
                    self.on_handshake_reply(h, result);
                } else if let Some(p) = self.pending.remove(&id) {
                    self.on_reply(p, result);
                }
            }
            ServerFrame::Events {
                session_id,
                participant_id,
                events,
            } => self.route(session_id, participant_id, events),
            ServerFrame::Fenced { cluster_id, epoch } => {
                tracing::error!(
                    cluster_id,
                    epoch,
                    "the chat server fenced this node: a newer epoch of the cluster is connected"
                );
                self.fenced();
            }
            ServerFrame::Goodbye(e) => {
                tracing::warn!(code = e.code.as_str(), detail = %e.message, "the chat server closed the connection");
                if e.code == ChatErrorCode::Fenced {
                    self.fenced();
                }
            }
        }
    }

    fn on_reply(&mut self, p: Pending<F, R>, result: Result<ChatResponse, ChatError>) {
        let since = match &*p.request {
            ChatRequest::Join(r) => r.since_seq,
            ChatRequest::Resume(r) => r.since_seq,
            _ => 0,
        };
        if let (
            Ok(ChatResponse::Joined {
                session_id,
                participant_id,
                seq,
            }),
            Some(follow),
        ) = (&result, p.follow)
        {
            // The follower hears of the join before any of its events: one ordered path.
            self.routes.insert(
                (session_id.clone(), participant_id.clone()),
                Route {
                    follower: follow.to.clone(),
                    cursor: Cursor::at(since),
                },
            );
            self.emit(Effect::Feed {
                to: follow.to,
                feed: Feed::Joined(ParticipantJoined {
                    token: follow.token,
                    session_id: session_id.clone(),
                    participant_id: participant_id.clone(),
                    seq: *seq,
                }),
            });
        }
        let fenced = matches!(&result, Err(e) if e.code == ChatErrorCode::Fenced);
        self.reply(p.reply, result.map_err(ChatCallError::Refused));
        if fenced {
            // The Fenced notice may have been missed; a refused request says the same.
            self.fenced();
        }
    }

    fn route(&mut self, session_id: String, participant_id: String, events: Vec<ChatEvent>) {
        if self.paused {
            // Draining for a switchover: the next primary replays these from the checkpoints.
            return;
        }
        let key = (session_id, participant_id);
        let Some(route) = self.routes.get_mut(&key) else {
            tracing::debug!(session_id = %key.0, participant_id = %key.1, "events for a participant nobody follows");
            return;
        };
        // A replay after a reconnect may overlap what was routed already.
        let fresh = route.cursor.take_new(events);
        if fresh.is_empty() {
            return;
        }
        let to = route.follower.clone();
        let (session_id, participant_id) = key;
        self.emit(Effect::Feed {
            to,
            feed: Feed::Events(ParticipantEvents {
                session_id,
                participant_id,
                events: fresh,
            }),
        });
    }

    fn on_handshake_reply(&mut self, step: Handshake, result: Result<ChatResponse, ChatError>) {
        match (step, result) {
            (Handshake::Hello, Ok(_)) => {
                if self.conn != Conn::Handshaking {
                    return;
                }
                // Resume every followed participant from the last event routed to it.
                self.resume_routes();
                self.up();
            }
            (Handshake::Hello, Err(e)) if e.code == ChatErrorCode::Fenced => {
                tracing::error!(detail = %e.message, "the chat server refused this node's epoch");
                self.fenced();
            }
            (Handshake::Hello, Err(e)) if e.code == ChatErrorCode::Unauthorized => {
                tracing::error!(detail = %e.message, "the chat server refused this node's credential: set chat-server.credential to the token its --credentials file lists for this cluster");
                self.lost();
            }
            (Handshake::Hello, Err(e)) => {
                tracing::error!(code = e.code.as_str(), detail = %e.message, "the chat server refused the handshake");
                self.lost();
            }
            (Handshake::Resume(..), Ok(_)) => {}
            (Handshake::Resume(..), Err(e)) if e.code == ChatErrorCode::Fenced => {
                tracing::error!(detail = %e.message, "the chat server refused a resume: this node is fenced");
                self.fenced();
            }
            (Handshake::Resume(session_id, participant_id), Err(e)) => {
                tracing::warn!(%session_id, %participant_id, code = e.code.as_str(), "cannot resume a participant");
                let key = (session_id, participant_id);
                if let Some(route) = self.routes.remove(&key) {
                    let (session_id, participant_id) = key;
                    self.emit(Effect::Feed {
                        to: route.follower,
                        feed: Feed::Lost(FeedLost {
                            session_id,
                            participant_id,
                            removed: true,
                        }),
                    });
                }
            }
        }
    }

    /// Resumes every followed participant from the last event routed to it (after a reconnect,
    /// or to re-fetch what a pause dropped).
    fn resume_routes(&mut self) {
        let resumes: Vec<(String, String, u64)> = self
            .routes
            .iter()
            .map(|((s, p), r)| (s.clone(), p.clone(), r.cursor.seq()))
            .collect();
        for (session_id, participant_id, since_seq) in resumes {
            let id = self.take_id();
            self.handshake.insert(
                id,
                Handshake::Resume(session_id.clone(), participant_id.clone()),
            );
            self.emit(Effect::Send(SharedClientFrame {
                id,
                request: Arc::new(ChatRequest::Resume(ResumeRequest {
                    session_id,
                    participant_id,
                    since_seq,
                })),
            }));
        }
    }

    fn up(&mut self) {
        self.conn = Conn::Up;
        self.hello_deadline = None;
        self.emit(Effect::Up(true));
        if self.failures > 0 || self.reconnects > 0 {
            tracing::info!(address = %self.config.address, "chat server connection restored");
        }
        self.failures = 0;
        self.gave_up = false;
        // Re-send what was in flight or queued, in order. A join sent on the lost connection
        // may or may not have happened: it fails (the workflow may retry); everything else is
        // idempotent or keyed, so it is sent again.
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let join_in_doubt = self
                .pending
                .get(&id)
                .is_some_and(|p| matches!(*p.request, ChatRequest::Join(_)) && p.sent);
            if join_in_doubt {
                if let Some(p) = self.pending.remove(&id) {
                    self.reply(
                        p.reply,
                        Err(ChatCallError::Unavailable(
                            "connection lost during join".into(),
                        )),
                    );
                }
                continue;
            }
            self.send_pending(id);
        }
    }

    fn fenced(&mut self) {
        self.emit(Effect::Fenced);
        self.deactivate();
    }

    fn deactivate(&mut self) {
        self.active = false;
        self.paused = false;
        if self.conn == Conn::Up {
            self.emit(Effect::Up(false));
        }
        if self.conn != Conn::Down {
            self.emit(Effect::Disconnect);
        }
        self.conn = Conn::Down;
        self.generation += 1;
        self.handshake.clear();
        self.hello_deadline = None;
        self.retry_at = None;
        if !self.routes.is_empty() {
            let routes = std::mem::take(&mut self.routes);
            self.emit(Effect::Dispose(routes));
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            self.reply(
                p.reply,
                Err(ChatCallError::Unavailable(
                    "this node is not the primary".into(),
                )),
            );
        }
    }

    fn unpause(&mut self) {
        self.paused = false;
        if !self.active {
            return;
        }
        // What arrived while paused was dropped. A fresh connection carries only the new feeds,
        // each resumed from the last event routed: nothing old can overtake the replay.
        tracing::info!("reconnecting to re-fetch the chat events of an abandoned switchover");
        if self.conn != Conn::Down {
            self.emit(Effect::Disconnect);
        }
        self.connect(false);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bgs_proto::chat::{
        EventKind, JoinRequest, ParticipantType, PostKind, PostRequest, Style, Visibility,
    };

    /// Followers and replies are plain numbers here.
    type Link = LinkState<u32, u32>;
    type Out = Vec<Effect<u32, u32>>;

    fn link(attempts: u32, max_queued: usize) -> Link {
        LinkState::new(LinkConfig {
            address: "chat:1".into(),
            role: ClientRole::Gateway {
                cluster_id: "c".into(),
                epoch: 0,
                node_id: "a".into(),
            },
            credential: Secret::default(),
            reconnect_delay_ms: 100,
            reconnect_attempts: attempts,
            max_queued,
            hello_timeout_ms: 1000,
        })
    }

    fn post(key: &str) -> ChatRequest {
        ChatRequest::Post(PostRequest {
            session_id: "s".into(),
            participant_id: "p".into(),
            kind: PostKind::Message,
            text: "hi".into(),
            visibility: Visibility::All,
            key: Some(key.into()),
            rich: None,
        })
    }

    fn join() -> ChatRequest {
        ChatRequest::Join(JoinRequest {
            session_id: "s".into(),
            nickname: "Bot".into(),
            participant_type: ParticipantType::Agent,
            style: Style::Bot,
            visibility: Visibility::All,
            since_seq: 0,
        })
    }

    fn event(seq: u64) -> ChatEvent {
        ChatEvent::new(seq, EventKind::Message, "c", ParticipantType::Customer)
    }

    fn sent(out: &Out) -> Vec<(u64, String)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Send(f) => Some((
                    f.id,
                    match &*f.request {
                        ChatRequest::Hello(_) => "hello".to_string(),
                        ChatRequest::Join(_) => "join".to_string(),
                        ChatRequest::Resume(r) => format!("resume {}", r.since_seq),
                        ChatRequest::Post(p) => format!("post {}", p.key.clone().unwrap()),
                        other => format!("{other:?}"),
                    },
                )),
                _ => None,
            })
            .collect()
    }

    fn replies(out: &Out) -> Vec<(u32, Result<(), String>)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Reply { to, result } => {
                    Some((*to, result.as_ref().map(|_| ()).map_err(|e| e.to_string())))
                }
                _ => None,
            })
            .collect()
    }

    /// What followers are told, in order: `joined TOKEN`, `events SEQS`, `lost removed?`.
    fn feeds(out: &Out) -> Vec<(u32, String)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Feed { to, feed } => Some((
                    *to,
                    match feed {
                        Feed::Joined(j) => format!("joined {} {}", j.token, j.seq),
                        Feed::Events(ev) => format!(
                            "events {:?}",
                            ev.events.iter().map(|e| e.seq).collect::<Vec<_>>()
                        ),
                        Feed::Lost(l) => format!("lost {}", l.removed),
                    },
                )),
                _ => None,
            })
            .collect()
    }

    fn ok(id: u64, response: ChatResponse) -> ServerFrame {
        ServerFrame::Reply {
            id,
            result: Ok(response),
        }
    }

    fn welcome() -> ChatResponse {
        ChatResponse::Welcome {
            version: CHAT_PROTOCOL_VERSION,
            server_id: "cs".into(),
            max_frame: 1 << 20,
        }
    }

    fn frame(l: &mut Link, now: u64, frame: ServerFrame) -> Out {
        let generation = l.generation();
        l.step(now, Input::Frame { generation, frame })
    }

    /// Activates and connects: returns the id of the Hello.
    fn connect(l: &mut Link, now: u64) -> (u64, Out) {
        let generation = l.generation();
        let out = l.step(now, Input::Connected { generation });
        let hello = sent(&out)[0].0;
        (hello, out)
    }

    fn up(l: &mut Link, now: u64) -> Out {
        let (hello, _) = connect(l, now);
        frame(l, now, ok(hello, welcome()))
    }

    fn call(l: &mut Link, request: ChatRequest, follow: Option<u32>, reply: u32) -> Out {
        l.step(
            0,
            Input::Call {
                request,
                follow: follow.map(|to| Follow {
                    to,
                    token: 70 + u64::from(to),
                }),
                reply: Some(reply),
            },
        )
    }

    /// A link activated at epoch 1 and up.
    fn active(attempts: u32, max_queued: usize) -> Link {
        let mut l = link(attempts, max_queued);
        l.step(0, Input::Activate { epoch: 1 });
        up(&mut l, 0);
        l
    }

    /// Joins participant `p` of session `s` at seq 3, followed by 7 (token 77): the effects of
    /// the join's answer.
    fn join_p(l: &mut Link, now: u64) -> Out {
        let out = call(l, join(), Some(7), 1);
        let id = sent(&out)[0].0;
        let joined = ChatResponse::Joined {
            session_id: "s".into(),
            participant_id: "p".into(),
            seq: 3,
        };
        frame(l, now, ok(id, joined))
    }

    fn events_of_p(seqs: &[u64]) -> ServerFrame {
        ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "p".into(),
            events: seqs.iter().map(|s| event(*s)).collect(),
        }
    }

    #[test]
    fn a_link_connects_says_hello_and_sends_what_was_queued_in_order() {
        let mut l = link(3, 10);
        // Not active: refused at once.
        assert_eq!(
            replies(&call(&mut l, post("k0"), None, 1)),
            [(
                1,
                Err("chat server unavailable: this node is not the primary".into())
            )]
        );
        let out = l.step(0, Input::Activate { epoch: 4 });
        assert!(matches!(
            out[..],
            [Effect::Connect {
                reconnect: false,
                ..
            }]
        ));
        // Queued while connecting.
        assert!(call(&mut l, post("k1"), None, 2).is_empty());
        let (hello, out) = connect(&mut l, 0);
        match &out[0] {
            Effect::Send(f) => match &*f.request {
                ChatRequest::Hello(h) => {
                    assert!(matches!(h.role, ClientRole::Gateway { epoch: 4, .. }))
                }
                _ => panic!("the Hello goes first"),
            },
            _ => panic!("the Hello goes first"),
        }
        assert!(call(&mut l, post("k2"), None, 3).is_empty());
        let out = frame(&mut l, 5, ok(hello, welcome()));
        assert!(out.iter().any(|e| matches!(e, Effect::Up(true))));
        let keys: Vec<String> = sent(&out).into_iter().map(|(_, s)| s).collect();
        assert_eq!(keys, ["post k1", "post k2"]);
        // Up: a call goes out at once, and its answer comes back to its caller.
        let out = call(&mut l, post("k3"), None, 4);
        let (id, text) = sent(&out)[0].clone();
        assert_eq!(text, "post k3");
        let out = frame(
            &mut l,
            6,
            ok(
                id,
                ChatResponse::Posted {
                    seq: 9,
                    duplicate: false,
                },
            ),
        );
        assert_eq!(replies(&out), [(4, Ok(()))]);
        assert!(l.status().connected);
    }

    #[test]
    fn a_join_is_told_to_its_follower_before_its_events_and_before_its_answer() {
        let mut l = link(3, 10);
        l.step(0, Input::Activate { epoch: 1 });
        up(&mut l, 0);
        let out = call(&mut l, join(), Some(7), 1);
        let id = sent(&out)[0].0;
        let out = frame(
            &mut l,
            1,
            ok(
                id,
                ChatResponse::Joined {
                    session_id: "s".into(),
                    participant_id: "p".into(),
                    seq: 3,
                },
            ),
        );
        assert_eq!(feeds(&out), [(7, "joined 77 3".into())]);
        let feed_at = out
            .iter()
            .position(|e| matches!(e, Effect::Feed { .. }))
            .unwrap();
        let reply_at = out
            .iter()
            .position(|e| matches!(e, Effect::Reply { .. }))
            .unwrap();
        assert!(feed_at < reply_at);
        let events = events_of_p;
        let out = frame(&mut l, 2, events(&[1, 2, 3]));
        assert_eq!(feeds(&out), [(7, "events [1, 2, 3]".into())]);
        // An overlap (a replay) is dropped; what is new goes on.
        let out = frame(&mut l, 3, events(&[2, 3, 4]));
        assert_eq!(feeds(&out), [(7, "events [4]".into())]);
        assert!(frame(&mut l, 3, events(&[4])).is_empty());
        // Nobody follows another participant.
        let stranger = ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "q".into(),
            events: vec![event(5)],
        };
        assert!(frame(&mut l, 3, stranger).is_empty());
        // Unfollowed: nothing more is routed.
        l.step(
            4,
            Input::Unfollow {
                session_id: "s".into(),
                participant_id: "p".into(),
            },
        );
        assert!(frame(&mut l, 4, events(&[5])).is_empty());
        assert_eq!(l.status().participants, 0);
    }

    /// After a lost connection: every followed participant is resumed from the last event
    /// routed to it, posts in flight are re-sent with the same frame (their keys dedupe), and a
    /// join in flight is in doubt and fails.
    #[test]
    fn a_reconnect_resumes_from_the_cursor_re_sends_posts_and_fails_a_join_in_doubt() {
        let mut l = active(3, 10);
        join_p(&mut l, 1);
        let routed = ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "p".into(),
            events: vec![event(3), event(4)],
        };
        frame(&mut l, 1, routed);
        let post_out = call(&mut l, post("k1"), None, 2);
        let (post_id, _) = sent(&post_out)[0].clone();
        call(&mut l, join(), Some(8), 3);

        let old = l.generation();
        let out = l.step(10, Input::Closed { generation: old });
        assert!(out.iter().any(|e| matches!(e, Effect::Disconnect)));
        assert!(out.iter().any(|e| matches!(e, Effect::WakeAt(110))));
        // Too early: nothing; then the retry.
        assert!(l.step(50, Input::Tick).is_empty());
        let out = l.step(110, Input::Tick);
        assert!(matches!(
            out[..],
            [Effect::Connect {
                reconnect: true,
                ..
            }]
        ));
        // A frame of the old connection is ignored.
        let late = ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "p".into(),
            events: vec![event(5)],
        };
        assert!(l
            .step(
                111,
                Input::Frame {
                    generation: old,
                    frame: late
                }
            )
            .is_empty());
        let (hello, _) = connect(&mut l, 120);
        let out = frame(&mut l, 121, ok(hello, welcome()));
        let texts: Vec<String> = sent(&out).into_iter().map(|(_, s)| s).collect();
        assert_eq!(texts, ["resume 4", "post k1"]);
        assert_eq!(sent(&out)[1].0, post_id, "the same frame, the same id");
        assert_eq!(
            replies(&out),
            [(
                3,
                Err("chat server unavailable: connection lost during join".into())
            )]
        );
        assert_eq!(l.status().reconnects, 1);
    }

    #[test]
    fn a_silent_server_is_dropped_and_the_bots_given_up_after_every_attempt() {
        let mut l = active(2, 10);
        join_p(&mut l, 0);
        let g = l.generation();
        l.step(0, Input::Closed { generation: g });
        call(&mut l, post("k1"), None, 2);
        // Nobody waits for this one: it stays queued through the give-up.
        l.step(
            0,
            Input::Call {
                request: post("later"),
                follow: None,
                reply: None,
            },
        );
        // Attempt 1: connected, but no answer to the Hello within its timeout.
        l.step(100, Input::Tick);
        connect(&mut l, 100);
        assert!(l.step(500, Input::Tick).is_empty());
        let out = l.step(1100, Input::Tick);
        assert!(out.iter().any(|e| matches!(e, Effect::Disconnect)));
        assert!(feeds(&out).is_empty());
        // Attempt 2: refused outright; the attempts are spent.
        l.step(1200, Input::Tick);
        let g = l.generation();
        let out = l.step(
            1200,
            Input::ConnectFailed {
                generation: g,
                error: "refused".into(),
            },
        );
        assert_eq!(feeds(&out), [(7, "lost false".into())]);
        assert_eq!(
            replies(&out),
            [(
                2,
                Err("chat server unavailable: the chat server cannot be reached".into())
            )]
        );
        // Given up: calls fail at once, but the link keeps trying.
        assert_eq!(replies(&call(&mut l, post("k2"), None, 3)).len(), 1);
        l.step(1300, Input::Tick);
        let out = up(&mut l, 1300);
        let texts: Vec<String> = sent(&out).into_iter().map(|(_, s)| s).collect();
        assert_eq!(texts, ["post later"]);
    }

    #[test]
    fn a_fenced_link_lets_go_of_everything_and_says_so() {
        let mut l = active(3, 10);
        join_p(&mut l, 0);
        call(&mut l, post("k1"), None, 2);
        let out = frame(
            &mut l,
            1,
            ServerFrame::Fenced {
                cluster_id: "c".into(),
                epoch: 2,
            },
        );
        assert!(out.iter().any(|e| matches!(e, Effect::Fenced)));
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::Dispose(r) if r.len() == 1)));
        assert_eq!(
            replies(&out),
            [(
                2,
                Err("chat server unavailable: this node is not the primary".into())
            )]
        );
        // A refused request says the same as the notice.
        let mut l = link(3, 10);
        l.step(0, Input::Activate { epoch: 1 });
        up(&mut l, 0);
        let out = call(&mut l, post("k1"), None, 1);
        let id = sent(&out)[0].0;
        let refused = ServerFrame::Reply {
            id,
            result: Err(ChatError::new(ChatErrorCode::Fenced, "epoch 1 < 2")),
        };
        let out = frame(&mut l, 1, refused);
        assert!(out.iter().any(|e| matches!(e, Effect::Fenced)));
        assert_eq!(replies(&call(&mut l, post("k2"), None, 2)).len(), 1);
        assert!(!l.status().connected);
    }

    #[test]
    fn a_pause_drops_events_and_an_unpause_re_fetches_them_from_the_cursor() {
        let mut l = active(3, 10);
        join_p(&mut l, 0);
        let events = events_of_p;
        frame(&mut l, 0, events(&[3]));
        l.step(1, Input::Pause);
        assert!(frame(&mut l, 1, events(&[4, 5])).is_empty());
        let out = l.step(2, Input::Unpause);
        assert!(out.iter().any(|e| matches!(e, Effect::Connect { .. })));
        let out = up(&mut l, 3);
        let texts: Vec<String> = sent(&out).into_iter().map(|(_, s)| s).collect();
        assert_eq!(texts, ["resume 3"]);
        assert_eq!(
            feeds(&frame(&mut l, 4, events(&[4, 5]))),
            [(7, "events [4, 5]".into())]
        );
    }

    #[test]
    fn a_participant_the_chat_server_forgot_is_lost_and_the_queue_is_bounded() {
        let mut l = active(3, 1);
        join_p(&mut l, 0);
        let g = l.generation();
        l.step(0, Input::Closed { generation: g });
        // One queued call is the bound: the next fails at once.
        assert!(call(&mut l, post("k1"), None, 2).is_empty());
        assert_eq!(replies(&call(&mut l, post("k2"), None, 3)).len(), 1);
        l.step(100, Input::Tick);
        let (hello, _) = connect(&mut l, 100);
        let out = frame(&mut l, 100, ok(hello, welcome()));
        let resume = sent(&out)[0].0;
        let refused = ServerFrame::Reply {
            id: resume,
            result: Err(ChatError::new(ChatErrorCode::UnknownParticipant, "gone")),
        };
        assert_eq!(
            feeds(&frame(&mut l, 101, refused)),
            [(7, "lost true".into())]
        );
        assert_eq!(l.status().participants, 0);
    }
}
