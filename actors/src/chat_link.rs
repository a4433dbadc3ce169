//! ChatLink: one actor per Chat Server connection. Multiplexes every session and bot of the node
//! over one connection, routes each participant's events to its SessionActor, and survives a
//! lost connection: it reconnects every `reconnect_delay` up to `reconnect_attempts` times,
//! resumes every participant with since_seq = the last event it routed, and re-sends the requests
//! that were in flight (bot posts carry client keys, so a re-send cannot post twice).
//!
//! The socket and its framing live in `src` (a [`ChatConnector`]); this actor sees typed frames.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::chat::{
    ChatError, ChatErrorCode, ChatEvent, ChatRequest, ChatResponse, ClientFrame, ClientRole, Hello,
    ResumeRequest, Secret, ServerFrame, CHAT_PROTOCOL_VERSION,
};
use futures_util::future::BoxFuture;

use crate::messages::{Activate, ChatFenced, Deactivate, PauseEvents, ResumeEvents};

use crate::metrics::{metrics, Kind};

/// How long the Chat Server may take to answer the Hello of a new connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn event_kind(k: bgs_proto::chat::EventKind) -> &'static str {
    use bgs_proto::chat::EventKind::*;
    match k {
        Joined => "joined",
        Left => "left",
        Message => "message",
        Notice => "notice",
        Typing => "typing",
        Userdata => "userdata",
        Closed => "closed",
    }
}
use tokio::sync::{mpsc, oneshot};

/// A connection to a Chat Server, as typed frames. The outbound side is unbounded because the
/// link bounds what it sends itself (`max_queued` requests, one resume per followed bot) and
/// must never block or drop a frame.
pub struct ChatConnection {
    pub outbound: mpsc::UnboundedSender<ClientFrame>,
    pub inbound: mpsc::Receiver<ServerFrame>,
}

/// How a ChatLink reaches its Chat Server (TCP and the proto codec, provided by `src`).
pub trait ChatConnector: Send + Sync + 'static {
    fn connect(&self, address: &str) -> BoxFuture<'static, io::Result<ChatConnection>>;
}

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

/// Events of one followed participant.
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

/// A request to the Chat Server. With `follow`, a successful Join routes the new participant's
/// events to that recipient from the first one on.
#[derive(Message)]
#[rtype(result = "Result<ChatResponse, ChatCallError>")]
pub struct ChatCall {
    pub request: ChatRequest,
    pub follow: Option<Follower>,
}

/// A request that must reach the Chat Server even if it is unreachable now, and even after the
/// reconnect attempts ran out (the link keeps trying): it is sent when the connection is back.
/// Nobody waits for its answer (the waiting-mode outcome of a bot that ended `chat_server_lost`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChatCallLater(pub ChatRequest);

/// What sessions and bots use of the ChatLink, as Recipients: the node's ChatLink, or a test's
/// stand-in.
#[derive(Clone)]
pub struct ChatPort(std::sync::Arc<ChatPorts>);

/// The ChatLink's mailboxes that a [`ChatPort`] shares.
pub struct ChatPorts {
    pub call: Recipient<ChatCall>,
    pub later: Recipient<ChatCallLater>,
    pub unfollow: Recipient<Unfollow>,
}

impl ChatPort {
    pub fn of(link: &Addr<ChatLink>) -> Self {
        Self::new(
            link.clone().recipient(),
            link.clone().recipient(),
            link.clone().recipient(),
        )
    }

    pub fn new(
        call: Recipient<ChatCall>,
        later: Recipient<ChatCallLater>,
        unfollow: Recipient<Unfollow>,
    ) -> Self {
        ChatPort(std::sync::Arc::new(ChatPorts {
            call,
            later,
            unfollow,
        }))
    }
}

impl std::ops::Deref for ChatPort {
    type Target = ChatPorts;

    fn deref(&self) -> &ChatPorts {
        &self.0
    }
}

/// What the ChatLink tells a participant's follower.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Feed {
    Events(ParticipantEvents),
    Lost(FeedLost),
}

/// Where a followed participant's feed goes: one mailbox sender for its events and its end. A
/// route keeps it weakly: the session stops itself, and a strong sender would cost about 100
/// bytes more a route (the upgrade per routed batch is three small allocations).
pub type Follower = Recipient<Feed>;

/// Stops routing a participant's events (its bot is gone).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unfollow {
    pub session_id: String,
    pub participant_id: String,
}

/// Whether the link is up, for status and readiness.
#[derive(Message)]
#[rtype(result = "LinkStatus")]
pub struct GetLinkStatus;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    pub address: String,
    pub connected: bool,
    pub reconnects: u64,
    pub participants: usize,
}

struct Route {
    follower: actix::WeakRecipient<Feed>,
    last_seq: u64,
}

impl Route {
    /// Tells the follower, if it is still there.
    fn tell(&self, feed: Feed) {
        if let Some(f) = self.follower.upgrade() {
            f.do_send(feed);
        }
    }
}

struct Pending {
    request: ChatRequest,
    follow: Option<Follower>,
    reply: oneshot::Sender<Result<ChatResponse, ChatCallError>>,
    /// Sent on the current connection (else queued for the next one).
    sent: bool,
}

enum State {
    Down,
    /// Connected, waiting for Welcome and resumes.
    Handshaking(mpsc::UnboundedSender<ClientFrame>),
    Up(mpsc::UnboundedSender<ClientFrame>),
}

pub struct ChatLinkConfig {
    pub address: String,
    /// The gateway role; its epoch is replaced by the one [`Activate`] gives.
    pub role: ClientRole,
    /// The token the Chat Server's `--credentials` lists for this cluster (empty: none).
    pub credential: Secret,
    /// Told when the Chat Server fences this node.
    pub on_fenced: Option<Recipient<ChatFenced>>,
    pub reconnect_delay: Duration,
    pub reconnect_attempts: u32,
    /// Requests queued while the link is down, beyond which calls fail at once.
    pub max_queued: usize,
}

pub struct ChatLink {
    config: ChatLinkConfig,
    /// Only the primary is connected; a backup's link is inactive.
    active: bool,
    paused: bool,
    connector: Arc<dyn ChatConnector>,
    state: State,
    generation: u64,
    /// Failed attempts since the link was last up.
    failures: u32,
    /// The attempts are exhausted: the followed bots were given up.
    gave_up: bool,
    reconnects: u64,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    /// Internal requests (Hello, Resume) of the current handshake.
    handshake: HashMap<u64, Handshake>,
    routes: HashMap<(String, String), Route>,
}

enum Handshake {
    Hello,
    Resume(String, String),
}

impl ChatLink {
    pub fn new(config: ChatLinkConfig, connector: Arc<dyn ChatConnector>) -> Self {
        Self {
            config,
            active: false,
            paused: false,
            connector,
            state: State::Down,
            generation: 0,
            failures: 0,
            gave_up: false,
            reconnects: 0,
            next_id: 1,
            pending: BTreeMap::new(),
            handshake: HashMap::new(),
            routes: HashMap::new(),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let connect = self.connector.connect(&self.config.address);
        ctx.spawn(connect.into_actor(self).map(move |result, act, ctx| {
            if act.generation != generation {
                return;
            }
            match result {
                Ok(conn) => act.connected(conn, ctx),
                Err(e) => {
                    tracing::warn!(address = %act.config.address, error = %e, "cannot connect to the chat server");
                    act.lost(ctx);
                }
            }
        }));
    }

    fn connected(&mut self, conn: ChatConnection, ctx: &mut Context<Self>) {
        let ChatConnection { outbound, inbound } = conn;
        let generation = self.generation;
        self.handshake.clear();
        let id = self.take_id();
        self.handshake.insert(id, Handshake::Hello);
        let hello = ClientFrame {
            id,
            request: ChatRequest::Hello(Hello {
                version: CHAT_PROTOCOL_VERSION,
                role: self.config.role.clone(),
                client_name: "bgs".into(),
                credential: self.config.credential.clone(),
            }),
        };
        if outbound.send(hello).is_err() {
            self.lost(ctx);
            return;
        }
        self.state = State::Handshaking(outbound);
        // A server that accepts the connection but never answers the Hello is as good as down.
        ctx.run_later(HELLO_TIMEOUT, move |act, ctx| {
            if act.generation == generation && matches!(act.state, State::Handshaking(_)) {
                tracing::warn!(address = %act.config.address, "no answer to Hello; reconnecting");
                act.lost(ctx);
            }
        });
        ctx.add_stream(InboundStream {
            generation,
            inner: inbound,
            ended: false,
        });
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The connection is gone (or could not be made): retry later, or give up on the bots.
    fn lost(&mut self, ctx: &mut Context<Self>) {
        let was_up = matches!(self.state, State::Up(_));
        self.state = State::Down;
        metrics().chat_connected.set(0);
        self.generation += 1;
        self.handshake.clear();
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
        ctx.run_later(self.config.reconnect_delay, |act, ctx| {
            if act.active && matches!(act.state, State::Down) {
                act.reconnects += 1;
                metrics().chat_reconnects.inc();
                act.connect(ctx);
            }
        });
    }

    /// Every attempt failed: the followed bots end (chat_server_lost), calls fail.
    fn give_up(&mut self) {
        self.gave_up = true;
        tracing::error!(
            address = %self.config.address,
            attempts = self.config.reconnect_attempts,
            "chat server unreachable after every reconnect attempt; bots on it are stopped"
        );
        for ((session_id, participant_id), route) in self.routes.drain() {
            route.tell(Feed::Lost(FeedLost {
                session_id,
                participant_id,
                removed: false,
            }));
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(ChatCallError::Unavailable(
                "the chat server cannot be reached".into(),
            )));
        }
    }

    fn send_frame(&mut self, id: u64) -> bool {
        let tx = match &self.state {
            State::Up(tx) => tx.clone(),
            _ => return false,
        };
        let Some(p) = self.pending.get_mut(&id) else {
            return false;
        };
        let frame = ClientFrame {
            id,
            request: p.request.clone(),
        };
        match tx.send(frame) {
            Ok(()) => {
                p.sent = true;
                true
            }
            Err(_) => false,
        }
    }

    fn on_frame(&mut self, frame: ServerFrame, ctx: &mut Context<Self>) {
        match frame {
            ServerFrame::Reply { id, result } => {
                if let Some(h) = self.handshake.remove(&id) {
                    self.on_handshake_reply(h, result, ctx);
                } else if let Some(p) = self.pending.remove(&id) {
                    let since = match &p.request {
                        ChatRequest::Join(r) => r.since_seq,
                        ChatRequest::Resume(r) => r.since_seq,
                        _ => 0,
                    };
                    if let (
                        Ok(ChatResponse::Joined {
                            session_id,
                            participant_id,
                            ..
                        }),
                        Some(follower),
                    ) = (&result, p.follow)
                    {
                        self.routes.insert(
                            (session_id.clone(), participant_id.clone()),
                            Route {
                                follower: follower.downgrade(),
                                last_seq: since,
                            },
                        );
                    }
                    let fenced = matches!(&result, Err(e) if e.code == ChatErrorCode::Fenced);
                    let _ = p.reply.send(result.map_err(ChatCallError::Refused));
                    if fenced {
                        // The Fenced notice may have been missed; a refused request says the same.
                        self.fenced(ctx);
                    }
                }
            }
            ServerFrame::Events {
                session_id,
                participant_id,
                events,
            } => self.route(session_id, participant_id, events, ctx),
            ServerFrame::Fenced { cluster_id, epoch } => {
                tracing::error!(
                    cluster_id,
                    epoch,
                    "the chat server fenced this node: a newer epoch of the cluster is connected"
                );
                self.fenced(ctx);
            }
            ServerFrame::Goodbye(e) => {
                tracing::warn!(code = e.code.as_str(), detail = %e.message, "the chat server closed the connection");
                if e.code == ChatErrorCode::Fenced {
                    self.fenced(ctx);
                }
            }
        }
    }

    fn route(
        &mut self,
        session_id: String,
        participant_id: String,
        events: Vec<ChatEvent>,
        ctx: &mut Context<Self>,
    ) {
        if self.paused {
            // Draining for a switchover: the next primary replays these from the checkpoints.
            return;
        }
        let key = (session_id, participant_id);
        let Some(route) = self.routes.get_mut(&key) else {
            tracing::debug!(session_id = %key.0, participant_id = %key.1, "events for a participant nobody follows");
            return;
        };
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        // A replay after a reconnect may overlap what was routed already.
        let fresh: Vec<ChatEvent> = events
            .into_iter()
            .filter(|e| e.seq > route.last_seq)
            .collect();
        route.last_seq = route.last_seq.max(last);
        if fresh.is_empty() {
            return;
        }
        for e in &fresh {
            metrics().chat_events.inc(&["in", event_kind(e.kind)]);
        }
        let msg = Feed::Events(ParticipantEvents {
            session_id: key.0.clone(),
            participant_id: key.1.clone(),
            events: fresh,
        });
        let Some(recipient) = route.follower.upgrade() else {
            self.routes.remove(&key);
            return;
        };
        match recipient.try_send(msg) {
            Ok(()) => metrics().queued(Kind::Session),
            Err(SendError::Full(msg)) => {
                // Backpressure: the link waits for the session (and so stops reading the socket).
                metrics().queued(Kind::Session);
                ctx.wait(
                    async move {
                        let _ = recipient.send(msg).await;
                    }
                    .into_actor(self),
                );
            }
            Err(SendError::Closed(_)) => {
                self.routes.remove(&key);
            }
        }
    }

    fn on_handshake_reply(
        &mut self,
        step: Handshake,
        result: Result<ChatResponse, ChatError>,
        ctx: &mut Context<Self>,
    ) {
        match (step, result) {
            (Handshake::Hello, Ok(_)) => {
                let tx = match &self.state {
                    State::Handshaking(tx) => tx.clone(),
                    _ => return,
                };
                // Resume every followed participant from the last event routed to it.
                if !self.resume_routes(&tx) {
                    self.lost(ctx);
                    return;
                }
                self.up(tx);
            }
            (Handshake::Hello, Err(e)) if e.code == ChatErrorCode::Fenced => {
                tracing::error!(detail = %e.message, "the chat server refused this node's epoch");
                self.fenced(ctx);
            }
            (Handshake::Hello, Err(e)) if e.code == ChatErrorCode::Unauthorized => {
                tracing::error!(detail = %e.message, "the chat server refused this node's credential: set chat-server.credential to the token its --credentials file lists for this cluster");
                self.lost(ctx);
            }
            (Handshake::Hello, Err(e)) => {
                tracing::error!(code = e.code.as_str(), detail = %e.message, "the chat server refused the handshake");
                self.lost(ctx);
            }
            (Handshake::Resume(..), Ok(_)) => {}
            (Handshake::Resume(..), Err(e)) if e.code == ChatErrorCode::Fenced => {
                tracing::error!(detail = %e.message, "the chat server refused a resume: this node is fenced");
                self.fenced(ctx);
            }
            (Handshake::Resume(session_id, participant_id), Err(e)) => {
                tracing::warn!(%session_id, %participant_id, code = e.code.as_str(), "cannot resume a participant");
                if let Some(route) = self
                    .routes
                    .remove(&(session_id.clone(), participant_id.clone()))
                {
                    route.tell(Feed::Lost(FeedLost {
                        session_id,
                        participant_id,
                        removed: e.code != ChatErrorCode::Fenced,
                    }));
                }
            }
        }
    }

    /// Resumes every followed participant from the last event routed to it (after a reconnect,
    /// or to re-fetch what a pause dropped). False when the connection is gone.
    fn resume_routes(&mut self, tx: &mpsc::UnboundedSender<ClientFrame>) -> bool {
        let resumes: Vec<(String, String, u64)> = self
            .routes
            .iter()
            .map(|((s, p), r)| (s.clone(), p.clone(), r.last_seq))
            .collect();
        for (session_id, participant_id, since_seq) in resumes {
            let id = self.take_id();
            self.handshake.insert(
                id,
                Handshake::Resume(session_id.clone(), participant_id.clone()),
            );
            let frame = ClientFrame {
                id,
                request: ChatRequest::Resume(ResumeRequest {
                    session_id,
                    participant_id,
                    since_seq,
                }),
            };
            if tx.send(frame).is_err() {
                return false;
            }
        }
        true
    }

    fn fenced(&mut self, ctx: &mut Context<Self>) {
        if let Some(r) = &self.config.on_fenced {
            r.do_send(ChatFenced);
        }
        self.deactivate(ctx);
    }

    fn deactivate(&mut self, _ctx: &mut Context<Self>) {
        self.active = false;
        self.paused = false;
        self.state = State::Down;
        metrics().chat_connected.set(0);
        self.generation += 1;
        self.handshake.clear();
        if !self.routes.is_empty() {
            crate::drop_later(std::mem::take(&mut self.routes));
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(ChatCallError::Unavailable(
                "this node is not the primary".into(),
            )));
        }
    }

    fn up(&mut self, tx: mpsc::UnboundedSender<ClientFrame>) {
        self.state = State::Up(tx);
        metrics().chat_connected.set(1);
        if self.failures > 0 || self.reconnects > 0 {
            tracing::info!(address = %self.config.address, "chat server connection restored");
        }
        self.failures = 0;
        self.gave_up = false;
        // Re-send what was in flight or queued, in order (joins cannot be re-sent safely).
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            // A join sent on the lost connection may or may not have happened: fail it (the
            // workflow may retry); everything else is idempotent or keyed, so send it again.
            let join_in_doubt = self
                .pending
                .get(&id)
                .is_some_and(|p| matches!(p.request, ChatRequest::Join(_)) && p.sent);
            if join_in_doubt {
                if let Some(p) = self.pending.remove(&id) {
                    let _ = p.reply.send(Err(ChatCallError::Unavailable(
                        "connection lost during join".into(),
                    )));
                }
                continue;
            }
            self.send_frame(id);
        }
    }
}

impl Actor for ChatLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::ChatLink);
        ctx.set_mailbox_capacity(1024);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        metrics().actor_stopped(Kind::ChatLink);
    }
}

struct InboundStream {
    generation: u64,
    inner: mpsc::Receiver<ServerFrame>,
    ended: bool,
}

struct Inbound {
    generation: u64,
    /// `None`: this connection ended.
    frame: Option<ServerFrame>,
}

impl futures_util::Stream for InboundStream {
    type Item = Inbound;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Inbound>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let generation = self.generation;
        match self.inner.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Inbound {
                generation,
                frame: Some(frame),
            })),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Inbound {
                    generation,
                    frame: None,
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl StreamHandler<Inbound> for ChatLink {
    fn handle(&mut self, item: Inbound, ctx: &mut Context<Self>) {
        // Only the current connection counts: an old one ending must not drop a newer one.
        if item.generation != self.generation {
            return;
        }
        match item.frame {
            Some(frame) => {
                let started = std::time::Instant::now();
                self.on_frame(frame, ctx);
                metrics().handled(Kind::ChatLink, started.elapsed());
            }
            None => {
                if !matches!(self.state, State::Down) {
                    self.lost(ctx);
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<ChatCall> for ChatLink {
    type Result = ResponseFuture<Result<ChatResponse, ChatCallError>>;

    fn handle(&mut self, msg: ChatCall, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let down = !matches!(self.state, State::Up(_));
        if !self.active {
            return Box::pin(async {
                Err(ChatCallError::Unavailable(
                    "this node is not the primary".into(),
                ))
            });
        }
        if down && (self.gave_up || self.pending.len() >= self.config.max_queued) {
            return Box::pin(async {
                Err(ChatCallError::Unavailable(
                    "the chat server cannot be reached".into(),
                ))
            });
        }
        let id = self.take_id();
        self.pending.insert(
            id,
            Pending {
                request: msg.request,
                follow: msg.follow,
                reply: tx,
                sent: false,
            },
        );
        self.send_frame(id);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(ChatCallError::Unavailable("the chat link stopped".into())))
        })
    }
}

impl Handler<ChatCallLater> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: ChatCallLater, _ctx: &mut Context<Self>) {
        if !self.active || self.pending.len() >= self.config.max_queued {
            tracing::warn!("a request for when the chat server is back was dropped (not primary, or the queue is full)");
            return;
        }
        let (tx, _rx) = oneshot::channel();
        let id = self.take_id();
        self.pending.insert(
            id,
            Pending {
                request: msg.0,
                follow: None,
                reply: tx,
                sent: false,
            },
        );
        self.send_frame(id);
    }
}

impl Handler<Activate> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: Activate, ctx: &mut Context<Self>) {
        if let ClientRole::Gateway { epoch, .. } = &mut self.config.role {
            *epoch = msg.epoch;
        }
        self.active = true;
        self.paused = false;
        self.gave_up = false;
        self.failures = 0;
        // A connection of an older epoch is replaced.
        self.state = State::Down;
        metrics().chat_connected.set(0);
        self.handshake.clear();
        tracing::info!(epoch = msg.epoch, address = %self.config.address, "connecting to the chat server as primary");
        self.connect(ctx);
    }
}

impl Handler<Deactivate> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: Deactivate, ctx: &mut Context<Self>) {
        self.deactivate(ctx);
    }
}

impl Handler<PauseEvents> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: PauseEvents, _ctx: &mut Context<Self>) {
        self.paused = true;
    }
}

impl Handler<ResumeEvents> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: ResumeEvents, ctx: &mut Context<Self>) {
        self.paused = false;
        if !self.active {
            return;
        }
        // What arrived while paused was dropped. A fresh connection carries only the new feeds,
        // each resumed from the last event routed: nothing old can overtake the replay.
        tracing::info!("reconnecting to re-fetch the chat events of an abandoned switchover");
        self.state = State::Down;
        metrics().chat_connected.set(0);
        self.handshake.clear();
        self.connect(ctx);
    }
}

impl Handler<Unfollow> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: Unfollow, _ctx: &mut Context<Self>) {
        self.routes.remove(&(msg.session_id, msg.participant_id));
    }
}

impl Handler<GetLinkStatus> for ChatLink {
    type Result = MessageResult<GetLinkStatus>;

    fn handle(&mut self, _: GetLinkStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(LinkStatus {
            address: self.config.address.clone(),
            connected: matches!(self.state, State::Up(_)),
            reconnects: self.reconnects,
            participants: self.routes.len(),
        })
    }
}
