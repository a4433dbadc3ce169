//! Allocations per customer message in the node, counted by a counting allocator:
//! `cargo bench --bench allocations`.
//!
//! A real ChatLink, SessionActor and BotActor with the echo plugin, on one actix System, talk to
//! an in-memory Chat Server (typed frames, no socket): each customer message comes as an
//! `Events` frame, the bot's answer goes out as a keyed post, the post comes back to the bot as
//! its own event, and the bot's turn is replicated to a stand-in HA coordinator. Only the node's
//! allocations are counted: the stand-in server builds and drops its frames uncounted. The
//! codec's share (decoding the customer's `Events` frame and the bot's own event, encoding the
//! post) is counted apart.
//!
//! docs/PERFORMANCE.md (allocations per message) has the figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use allocation_counter::{measure, opt_out};
use bgs_actors::bot::{BotFactory, CreateBot};
use bgs_actors::chat_link::{ChatConnection, ChatConnector, ChatLink, ChatLinkConfig, ChatPort};
use bgs_actors::messages::{Activate, HaPort, Replicate};
use bgs_actors::session::{BotFinished, SessionActor, SessionEnded, StartInSession};
use bgs_proto::bot::{BotKey, BotSpec};
use bgs_proto::chat::{
    ChatEvent, ChatRequest, ChatResponse, ClientFrame, ClientRole, EventKind, ParticipantType,
    ServerFrame, SharedClientFrame, Style,
};
use bgs_proto::codec::{FrameCodec, DEFAULT_MAX_FRAME};
use bytes::BytesMut;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};

/// The stand-in Chat Server's work is not the node's: not counted.
fn uncounted<T>(f: impl FnOnce() -> T) -> T {
    let mut out = None;
    opt_out(|| out = Some(f()));
    out.expect("ran")
}

const SESSION: &str = "bench-g-4711";
const CUSTOMER: &str = "b3c1f2d0a9e84c7e";
const BOT: &str = "4f7d9a2c11e04b5f";

fn customer_message(seq: u64) -> ChatEvent {
    ChatEvent {
        nickname: "Customer".into(),
        text: Some(format!("m{seq} where is my parcel?")),
        ts_ms: 1_764_000_000_000 + seq,
        ..ChatEvent::new(seq, EventKind::Message, CUSTOMER, ParticipantType::Customer)
    }
}

fn events(events: Vec<ChatEvent>) -> ServerFrame {
    ServerFrame::Events {
        session_id: SESSION.into(),
        participant_id: BOT.into(),
        events,
    }
}

/// The stand-in Chat Server: one session with a customer, the bot's join, its posts fed back.
struct Server {
    seq: u64,
    posts: Arc<AtomicU64>,
}

impl Server {
    fn answer(&mut self, frame: SharedClientFrame, out: &mpsc::Sender<ServerFrame>) {
        let id = frame.id;
        let mut feed = None;
        let result = match &*frame.request {
            ChatRequest::Hello(_) => ChatResponse::Welcome {
                version: bgs_proto::chat::CHAT_PROTOCOL_VERSION,
                server_id: "bench".into(),
                max_frame: DEFAULT_MAX_FRAME as u32,
            },
            ChatRequest::Join(_) => {
                self.seq = 2;
                feed = Some(events(vec![
                    ChatEvent::new(1, EventKind::Joined, CUSTOMER, ParticipantType::Customer),
                    ChatEvent {
                        style: Style::Bot,
                        ..ChatEvent::new(2, EventKind::Joined, BOT, ParticipantType::Agent)
                    },
                ]));
                ChatResponse::Joined {
                    session_id: SESSION.into(),
                    participant_id: BOT.into(),
                    seq: 2,
                }
            }
            ChatRequest::Post(p) => {
                self.seq += 1;
                let own = ChatEvent {
                    style: Style::Bot,
                    text: Some(p.text.clone()),
                    ..ChatEvent::new(self.seq, EventKind::Message, BOT, ParticipantType::Agent)
                };
                feed = Some(events(vec![own]));
                self.posts.fetch_add(1, Ordering::Relaxed);
                ChatResponse::Posted {
                    seq: self.seq,
                    duplicate: false,
                }
            }
            _ => ChatResponse::Pong,
        };
        let _ = out.try_send(ServerFrame::Reply {
            id,
            result: Ok(result),
        });
        if let Some(f) = feed {
            let _ = out.try_send(f);
        }
    }
}

/// Customer messages to send: the server numbers them.
type Inject = mpsc::UnboundedSender<()>;

struct Connector {
    posts: Arc<AtomicU64>,
    inject: std::sync::Mutex<Option<mpsc::UnboundedReceiver<()>>>,
}

impl ChatConnector for Connector {
    fn connect(&self, _address: &str) -> BoxFuture<'static, io::Result<ChatConnection>> {
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<SharedClientFrame>();
        let (in_tx, in_rx) = mpsc::channel::<ServerFrame>(4096);
        let mut inject = self.inject.lock().unwrap().take().expect("one connection");
        let mut server = Server {
            seq: 0,
            posts: self.posts.clone(),
        };
        actix::spawn(async move {
            loop {
                tokio::select! {
                    frame = out_rx.recv() => match frame {
                        Some(frame) => uncounted(|| server.answer(frame, &in_tx)),
                        None => break,
                    },
                    more = inject.recv() => match more {
                        Some(()) => uncounted(|| {
                            server.seq += 1;
                            let _ = in_tx.try_send(events(vec![customer_message(server.seq)]));
                        }),
                        None => break,
                    },
                }
            }
        });
        Box::pin(async move {
            Ok(ChatConnection {
                outbound: out_tx,
                inbound: in_rx,
            })
        })
    }
}

/// The HA coordinator and the Supervisor, as far as a session needs them.
struct Sink;

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Replicate> for Sink {
    type Result = ();
    fn handle(&mut self, _: Replicate, _ctx: &mut Context<Self>) {}
}

impl Handler<BotFinished> for Sink {
    type Result = ();
    fn handle(&mut self, _: BotFinished, _ctx: &mut Context<Self>) {}
}

impl Handler<SessionEnded> for Sink {
    type Result = ();
    fn handle(&mut self, _: SessionEnded, _ctx: &mut Context<Self>) {}
}

async fn until(posts: &AtomicU64, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while posts.load(Ordering::Relaxed) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the bot stopped answering"
        );
        tokio::task::yield_now().await;
    }
}

/// Sends `n` customer messages, at most 12 ahead of the answers.
async fn run(inject: &Inject, posts: &AtomicU64, n: u64) {
    let first = posts.load(Ordering::Relaxed);
    let mut sent = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sent < n {
        while sent < n && sent - (posts.load(Ordering::Relaxed) - first) < 12 {
            uncounted(|| inject.send(()).unwrap());
            sent += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bot stopped answering after {} of {sent}",
            posts.load(Ordering::Relaxed) - first
        );
        tokio::task::yield_now().await;
    }
    until(posts, first + n).await;
}

fn actors(n: u64) -> f64 {
    let system = actix::System::new();
    // The actors' addresses are kept: an actor nobody holds stops.
    let (inject, posts, _actors) = system.block_on(async move {
        let posts = Arc::new(AtomicU64::new(0));
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let connector = Arc::new(Connector {
            posts: posts.clone(),
            inject: std::sync::Mutex::new(Some(inject_rx)),
        });
        // One count of work in flight, as a node has: the link's feeds and the bots' inputs.
        let in_flight = bgs_actors::messages::InFlight::default();
        let link = ChatLink::new(
            ChatLinkConfig {
                address: "bench".into(),
                role: ClientRole::Gateway {
                    cluster_id: "bgs".into(),
                    epoch: 1,
                    node_id: "a".into(),
                },
                credential: Default::default(),
                on_fenced: None,
                reconnect_delay: Duration::from_secs(1),
                reconnect_attempts: 3,
                max_queued: 1000,
                in_flight: in_flight.clone(),
            },
            connector,
        )
        .start();
        link.do_send(Activate { epoch: 1 });
        let sink = Sink.start();
        let session = SessionActor::new(
            SESSION.into(),
            ChatPort::of(&link),
            sink.clone().recipient().into(),
            sink.clone().recipient().into(),
            // `ha.mode = "async"`, the default: saves are sent, not waited for.
            HaPort::new(sink.recipient().into(), false, in_flight),
            Duration::from_secs(5),
        )
        .start();
        let key = BotKey {
            interaction_id: SESSION.into(),
            bot_id: "echo".into(),
            bot_name: String::new(),
        };
        let bot = bgs::plugins::echo::EchoFactory
            .create(&CreateBot {
                bot_name: String::new(),
                parameters: Default::default(),
            })
            .unwrap();
        session
            .send(StartInSession {
                spec: Arc::new(BotSpec::new(key, "Echo")),
                instance_id: "6a0c2e4b8d1f4e3a".into(),
                bot,
                restored: None,
            })
            .await
            .unwrap()
            .unwrap();
        // Warm up: mailboxes, maps, the metric series.
        run(&inject, &posts, 1000).await;
        (inject, posts, (link, session))
    });
    let info = measure(|| system.block_on(run(&inject, &posts, n)));
    info.count_total as f64 / n as f64
}

/// The codec's share: the customer's `Events` frame and the bot's own event decoded, the post
/// encoded.
fn codec(n: u64) -> f64 {
    let mut server: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut node: FrameCodec<ServerFrame, SharedClientFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
    let post = SharedClientFrame {
        id: 77,
        request: Arc::new(ChatRequest::Post(bgs_proto::chat::PostRequest {
            session_id: SESSION.into(),
            participant_id: BOT.into(),
            kind: bgs_proto::chat::PostKind::Message,
            text: "echo: m12 where is my parcel?".into(),
            rich: None,
            visibility: bgs_proto::chat::Visibility::All,
            key: Some("6a0c2e4b8d1f4e3a:12:0".into()),
        })),
    };
    let mut wire = BytesMut::with_capacity(1 << 16);
    let mut out = BytesMut::with_capacity(1 << 16);
    let info = measure(|| {
        for i in 0..n {
            uncounted(|| {
                wire.clear();
                server
                    .encode(events(vec![customer_message(i)]), &mut wire)
                    .unwrap();
                let own = ChatEvent::new(i, EventKind::Message, BOT, ParticipantType::Agent);
                server.encode(events(vec![own]), &mut wire).unwrap();
            });
            let a = node.decode(&mut wire).unwrap().unwrap();
            let b = node.decode(&mut wire).unwrap().unwrap();
            out.clear();
            node.encode(post.clone(), &mut out).unwrap();
            uncounted(|| drop((a, b)));
        }
    });
    info.count_total as f64 / n as f64
}

fn main() {
    let n = std::env::var("BGS_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    // A load test, not a misbehaving bot: no rate limit.
    bgs_actors::bot_limits::set_limits(bgs_actors::bot_limits::BotLimits {
        events_per_minute: u32::MAX,
        ..Default::default()
    });
    let in_actors = actors(n);
    let in_codec = codec(n);
    println!("allocations per customer message, {n} messages:");
    println!("  actors (ChatLink, SessionActor, BotActor, echo plugin): {in_actors:.1}");
    println!("  codec (two Events frames decoded, the post encoded):    {in_codec:.1}");
    println!(
        "  total:                                                   {:.1}",
        in_actors + in_codec
    );
}
