//! ChatLink: one actor per Chat Server connection. Multiplexes every session and bot of the node
//! over one connection, routes each participant's events to its SessionActor, and survives a
//! lost connection: it reconnects every `reconnect_delay` up to `reconnect_attempts` times,
//! resumes every participant with since_seq = the last event it routed, and re-sends the requests
//! that were in flight (bot posts carry client keys, so a re-send cannot post twice).
//!
//! Every decision is in `state.rs` ([`state::LinkState`], no actix or tokio inside); this actor
//! is its pump: it feeds it calls, frames, connections and timers, and carries out its effects.
//! The socket and its framing live in `src` (a [`ChatConnector`]); this actor sees typed frames.

pub(crate) mod state;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakRecipient;
use bgs_proto::chat::{
    ChatRequest, ChatResponse, ClientRole, Secret, ServerFrame, SharedClientFrame,
};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::messages::{
    Activate, ChatFenced, Deactivate, InFlight, PauseEvents, ResumeEvents, Work,
};
use crate::metrics::{metrics, Kind};

pub use state::{
    ChatCallError, Feed, FeedLost, Follow, LinkStatus, ParticipantEvents, ParticipantJoined,
};
use state::{Effect, Input, LinkConfig, LinkState};

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
/// A connection to a Chat Server, as typed frames. The outbound side is unbounded because the
/// link bounds what it sends itself (`max_queued` requests, one resume per followed bot) and
/// must never block or drop a frame.
pub struct ChatConnection {
    pub outbound: mpsc::UnboundedSender<SharedClientFrame>,
    pub inbound: mpsc::Receiver<ServerFrame>,
}

/// How a ChatLink reaches its Chat Server (TCP and the proto codec, provided by `src`).
pub trait ChatConnector: Send + Sync + 'static {
    fn connect(&self, address: &str) -> BoxFuture<'static, io::Result<ChatConnection>>;
}

/// A request to the Chat Server. With `follow`, a successful join or resume tells that
/// follower `Feed::Joined` with the token, then routes the participant's events to it.
#[derive(Message)]
#[rtype(result = "Result<ChatResponse, ChatCallError>")]
pub struct ChatCall {
    pub request: ChatRequest,
    pub follow: Option<Follow<Follower>>,
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

/// A feed in its follower's mailbox, counted as work in flight until the follower has handled
/// it (what a switchover's drain waits for: `InFlight`).
pub struct CountedFeed {
    pub feed: Feed,
    pub work: Work,
}

impl Message for CountedFeed {
    type Result = ();
}

/// A feed that nobody counts, for stand-ins that tell a session by hand.
#[cfg(test)]
impl From<Feed> for CountedFeed {
    fn from(feed: Feed) -> Self {
        CountedFeed {
            feed,
            work: Work::uncounted(),
        }
    }
}

/// Where a followed participant's feed goes: one mailbox for its join, its events and its end.
/// A route keeps it weakly: the session stops itself, and a strong sender would cost about 100
/// bytes more a route (the upgrade per routed batch is three small allocations).
pub(crate) type Follower = Recipient<CountedFeed>;

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
    /// The node's count of work in flight: each feed handed to a follower is counted.
    pub in_flight: InFlight,
}

type Reply = oneshot::Sender<Result<ChatResponse, ChatCallError>>;

/// The pump of a [`LinkState`]: the connection it uses, its timers, its mailboxes.
pub struct ChatLink {
    state: LinkState<WeakRecipient<CountedFeed>, Reply>,
    connector: Arc<dyn ChatConnector>,
    on_fenced: Option<Recipient<ChatFenced>>,
    /// The current connection's outbound side (of the state's generation), once it is open.
    outbound: Option<mpsc::UnboundedSender<SharedClientFrame>>,
    address: String,
    clock: Instant,
    /// Kept between steps, so that a step allocates nothing for its inputs and effects.
    inputs: VecDeque<Input<WeakRecipient<CountedFeed>, Reply>>,
    effects: Vec<Effect<WeakRecipient<CountedFeed>, Reply>>,
    in_flight: InFlight,
}

impl ChatLink {
    pub fn new(config: ChatLinkConfig, connector: Arc<dyn ChatConnector>) -> Self {
        let state = LinkState::new(LinkConfig {
            address: config.address.clone(),
            role: config.role,
            credential: config.credential,
            reconnect_delay_ms: config.reconnect_delay.as_millis() as u64,
            reconnect_attempts: config.reconnect_attempts,
            max_queued: config.max_queued,
            hello_timeout_ms: HELLO_TIMEOUT.as_millis() as u64,
        });
        Self {
            state,
            connector,
            on_fenced: config.on_fenced,
            outbound: None,
            address: config.address,
            clock: Instant::now(),
            inputs: VecDeque::new(),
            effects: Vec::new(),
            in_flight: config.in_flight,
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Steps the state with `input`, and with whatever carrying out its effects brings back.
    fn apply(&mut self, input: Input<WeakRecipient<CountedFeed>, Reply>, ctx: &mut Context<Self>) {
        let mut inputs = std::mem::take(&mut self.inputs);
        let mut effects = std::mem::take(&mut self.effects);
        inputs.push_back(input);
        while let Some(input) = inputs.pop_front() {
            let now = self.now();
            self.state.step_into(now, input, &mut effects);
            for effect in effects.drain(..) {
                self.carry_out(effect, &mut inputs, ctx);
            }
        }
        self.inputs = inputs;
        self.effects = effects;
    }

    fn carry_out(
        &mut self,
        effect: Effect<WeakRecipient<CountedFeed>, Reply>,
        inputs: &mut VecDeque<Input<WeakRecipient<CountedFeed>, Reply>>,
        ctx: &mut Context<Self>,
    ) {
        match effect {
            Effect::Connect {
                generation,
                reconnect,
            } => {
                self.outbound = None;
                if reconnect {
                    metrics().chat_reconnects.inc();
                }
                let connect = self.connector.connect(&self.address);
                let connecting = connect.into_actor(self).map(move |result, act, ctx| {
                    let input = match result {
                        Ok(conn) if act.state.generation() == generation => {
                            act.outbound = Some(conn.outbound);
                            ctx.add_stream(crate::frames_of(generation, conn.inbound));
                            Input::Connected { generation }
                        }
                        Ok(_) => return, // a newer connection was asked for since
                        Err(e) => Input::ConnectFailed {
                            generation,
                            error: e.to_string(),
                        },
                    };
                    act.apply(input, ctx);
                });
                ctx.spawn(connecting);
            }
            Effect::Send(frame) => {
                let sent = self
                    .outbound
                    .as_ref()
                    .is_some_and(|tx| tx.send(frame).is_ok());
                if !sent {
                    inputs.push_back(Input::Closed {
                        generation: self.state.generation(),
                    });
                }
            }
            Effect::Disconnect => self.outbound = None,
            Effect::Up(up) => {
                metrics().chat_connected.set(i64::from(up));
            }
            Effect::WakeAt(at) => {
                let after = Duration::from_millis(at.saturating_sub(self.now()));
                ctx.run_later(after, |act, ctx| act.apply(Input::Tick, ctx));
            }
            Effect::Reply { to, result } => {
                let _ = to.send(result);
            }
            Effect::Feed { to, feed } => self.tell(to, feed, inputs, ctx),
            Effect::Fenced => {
                if let Some(r) = &self.on_fenced {
                    r.do_send(ChatFenced);
                }
            }
            Effect::Dispose(routes) => crate::drop_later(routes),
        }
    }

    /// Hands a feed to its follower; a full mailbox holds the link (and so the socket's reader)
    /// until there is room, and a follower that is gone is forgotten.
    fn tell(
        &mut self,
        to: WeakRecipient<CountedFeed>,
        feed: Feed,
        inputs: &mut VecDeque<Input<WeakRecipient<CountedFeed>, Reply>>,
        ctx: &mut Context<Self>,
    ) {
        let gone = |feed: &Feed| match feed {
            Feed::Joined(j) => Some((j.session_id.clone(), j.participant_id.clone())),
            Feed::Events(e) => Some((e.session_id.clone(), e.participant_id.clone())),
            Feed::Lost(_) => None,
        };
        if let Feed::Events(e) = &feed {
            for event in &e.events {
                metrics().chat_events.inc(["in", event_kind(event.kind)]);
            }
        }
        let Some(recipient) = to.upgrade() else {
            if let Some((session_id, participant_id)) = gone(&feed) {
                inputs.push_back(Input::Unfollow {
                    session_id,
                    participant_id,
                });
            }
            return;
        };
        let feed = CountedFeed {
            feed,
            work: self.in_flight.enter(),
        };
        match recipient.try_send(feed) {
            Ok(()) => metrics().queued(Kind::Session),
            Err(SendError::Full(feed)) => {
                metrics().queued(Kind::Session);
                ctx.wait(
                    async move {
                        let _ = recipient.send(feed).await;
                    }
                    .into_actor(self),
                );
            }
            Err(SendError::Closed(feed)) => {
                if let Some((session_id, participant_id)) = gone(&feed.feed) {
                    inputs.push_back(Input::Unfollow {
                        session_id,
                        participant_id,
                    });
                }
            }
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

impl StreamHandler<(u64, Option<ServerFrame>)> for ChatLink {
    fn handle(&mut self, (generation, frame): (u64, Option<ServerFrame>), ctx: &mut Context<Self>) {
        match frame {
            Some(frame) => {
                let started = Instant::now();
                self.apply(Input::Frame { generation, frame }, ctx);
                metrics().handled(Kind::ChatLink, started.elapsed());
            }
            None => self.apply(Input::Closed { generation }, ctx),
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<ChatCall> for ChatLink {
    type Result = ResponseFuture<Result<ChatResponse, ChatCallError>>;

    fn handle(&mut self, msg: ChatCall, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let follow = msg.follow.map(|f| Follow {
            to: f.to.downgrade(),
            token: f.token,
        });
        self.apply(
            Input::Call {
                request: msg.request,
                follow,
                reply: Some(tx),
            },
            ctx,
        );
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(ChatCallError::Unavailable("the chat link stopped".into())))
        })
    }
}

impl Handler<ChatCallLater> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: ChatCallLater, ctx: &mut Context<Self>) {
        let call = Input::Call {
            request: msg.0,
            follow: None,
            reply: None,
        };
        self.apply(call, ctx);
    }
}

impl Handler<Activate> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: Activate, ctx: &mut Context<Self>) {
        self.apply(Input::Activate { epoch: msg.epoch }, ctx);
    }
}

impl Handler<Deactivate> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: Deactivate, ctx: &mut Context<Self>) {
        self.apply(Input::Deactivate, ctx);
    }
}

impl Handler<PauseEvents> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: PauseEvents, ctx: &mut Context<Self>) {
        self.apply(Input::Pause, ctx);
    }
}

impl Handler<ResumeEvents> for ChatLink {
    type Result = ();

    fn handle(&mut self, _: ResumeEvents, ctx: &mut Context<Self>) {
        self.apply(Input::Unpause, ctx);
    }
}

impl Handler<Unfollow> for ChatLink {
    type Result = ();

    fn handle(&mut self, msg: Unfollow, ctx: &mut Context<Self>) {
        let input = Input::Unfollow {
            session_id: msg.session_id,
            participant_id: msg.participant_id,
        };
        self.apply(input, ctx);
    }
}

impl Handler<GetLinkStatus> for ChatLink {
    type Result = MessageResult<GetLinkStatus>;

    fn handle(&mut self, _: GetLinkStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state.status())
    }
}

/// The pump in process: a real ChatLink over an in-memory connector that plays the Chat Server,
/// a follower that records what it is told, and a connection cut under it.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bgs_proto::chat::{
        ChatEvent, EventKind, JoinRequest, ParticipantType, PostKind, PostRequest, Style,
        Visibility,
    };

    /// Each connection the link opens, as the server sees it: what the link sends, and a way to
    /// answer.
    struct Conn {
        from_link: mpsc::UnboundedReceiver<SharedClientFrame>,
        to_link: mpsc::Sender<ServerFrame>,
    }

    struct Connector(mpsc::UnboundedSender<Conn>);

    impl ChatConnector for Connector {
        fn connect(&self, _address: &str) -> BoxFuture<'static, io::Result<ChatConnection>> {
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            let (in_tx, in_rx) = mpsc::channel(64);
            let _ = self.0.send(Conn {
                from_link: out_rx,
                to_link: in_tx,
            });
            Box::pin(async move {
                Ok(ChatConnection {
                    outbound: out_tx,
                    inbound: in_rx,
                })
            })
        }
    }

    /// Records the feed it is told, in order.
    struct Recorder(mpsc::UnboundedSender<String>);

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<CountedFeed> for Recorder {
        type Result = ();
        fn handle(&mut self, feed: CountedFeed, _ctx: &mut Context<Self>) {
            let line = match feed.feed {
                Feed::Joined(j) => format!("joined {} {}", j.token, j.seq),
                Feed::Events(e) => format!(
                    "events {:?}",
                    e.events.iter().map(|e| e.seq).collect::<Vec<_>>()
                ),
                Feed::Lost(l) => format!("lost {}", l.removed),
            };
            let _ = self.0.send(line);
        }
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    async fn frame(conn: &mut Conn) -> SharedClientFrame {
        tokio::time::timeout(Duration::from_secs(5), conn.from_link.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    async fn reply(conn: &Conn, id: u64, response: ChatResponse) {
        let frame = ServerFrame::Reply {
            id,
            result: Ok(response),
        };
        conn.to_link.send(frame).await.unwrap();
    }

    /// Answers the Hello of a new connection (and what resumes it asks for: their ids).
    async fn welcome(conn: &mut Conn) {
        let hello = frame(conn).await;
        assert!(matches!(*hello.request, ChatRequest::Hello(_)));
        let welcome = ChatResponse::Welcome {
            version: bgs_proto::chat::CHAT_PROTOCOL_VERSION,
            server_id: "cs".into(),
            max_frame: 1 << 20,
        };
        reply(conn, hello.id, welcome).await;
    }

    fn events(seqs: &[u64]) -> ServerFrame {
        ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "p".into(),
            events: seqs
                .iter()
                .map(|s| ChatEvent::new(*s, EventKind::Message, "c", ParticipantType::Customer))
                .collect(),
        }
    }

    #[actix::test]
    async fn the_pump_joins_routes_reconnects_and_resends_through_a_real_actor() {
        let (conns_tx, mut conns) = mpsc::unbounded_channel();
        let link = ChatLink::new(
            ChatLinkConfig {
                address: "chat".into(),
                role: ClientRole::Gateway {
                    cluster_id: "bgs".into(),
                    epoch: 0,
                    node_id: "a".into(),
                },
                credential: Secret::default(),
                on_fenced: None,
                reconnect_delay: Duration::from_millis(10),
                reconnect_attempts: 5,
                max_queued: 100,
                in_flight: Default::default(),
            },
            Arc::new(Connector(conns_tx)),
        )
        .start();
        let (told_tx, mut told) = mpsc::unbounded_channel();
        let follower = Recorder(told_tx).start();
        link.do_send(Activate { epoch: 3 });
        let mut conn = next(&mut conns).await;
        welcome(&mut conn).await;

        // A join: the follower hears of it before its events, and the caller gets the answer.
        let join = link.send(ChatCall {
            request: ChatRequest::Join(JoinRequest {
                session_id: "s".into(),
                nickname: "Bot".into(),
                participant_type: ParticipantType::Agent,
                style: Style::Bot,
                visibility: Visibility::All,
                since_seq: 0,
            }),
            follow: Some(Follow {
                to: follower.clone().recipient(),
                token: 42,
            }),
        });
        let asked = frame(&mut conn).await;
        let joined = ChatResponse::Joined {
            session_id: "s".into(),
            participant_id: "p".into(),
            seq: 2,
        };
        reply(&conn, asked.id, joined).await;
        conn.to_link.send(events(&[1, 2])).await.unwrap();
        assert!(matches!(
            join.await.unwrap(),
            Ok(ChatResponse::Joined { seq: 2, .. })
        ));
        assert_eq!(next(&mut told).await, "joined 42 2");
        assert_eq!(next(&mut told).await, "events [1, 2]");
        conn.to_link.send(events(&[2, 3])).await.unwrap();
        assert_eq!(next(&mut told).await, "events [3]");

        // A post in flight when the connection drops is sent again, the same request, and the
        // participant is resumed from the last event routed.
        let post = link.send(ChatCall {
            request: ChatRequest::Post(PostRequest {
                session_id: "s".into(),
                participant_id: "p".into(),
                kind: PostKind::Message,
                text: "hi".into(),
                visibility: Visibility::All,
                key: Some("i:3:0".into()),
                rich: None,
            }),
            follow: None,
        });
        let sent = frame(&mut conn).await;
        drop(conn);
        let mut conn = next(&mut conns).await;
        welcome(&mut conn).await;
        let resume = frame(&mut conn).await;
        match &*resume.request {
            ChatRequest::Resume(r) => {
                assert_eq!((r.participant_id.as_str(), r.since_seq), ("p", 3))
            }
            other => panic!("a resume first, not {other:?}"),
        }
        let again = frame(&mut conn).await;
        assert_eq!((again.id, &again.request), (sent.id, &sent.request));
        let posted = ChatResponse::Posted {
            seq: 4,
            duplicate: true,
        };
        reply(&conn, again.id, posted).await;
        assert!(matches!(
            post.await.unwrap(),
            Ok(ChatResponse::Posted { seq: 4, .. })
        ));
        let status = link.send(GetLinkStatus).await.unwrap();
        assert!(status.connected && status.reconnects >= 1 && status.participants == 1);
    }
}
