//! Micro-benchmarks of the hot paths (criterion): `cargo bench --bench hot_paths`.
//!
//! - `codec`: a customer's message as the Chat Server sends it to the node (an `Events` frame),
//!   and a bot's post as the node sends it back, encoded and decoded by the one codec.
//! - `fanout`: one post in a Chat Server session and every participant's read of it (the
//!   session state the reference Chat Server fans events out from), with 3 and 16 participants.
//! - `bot_dispatch`: events through a real `BotActor` running the echo plugin, each one answered
//!   by a post to a stand-in Chat Server link and its context saved to a stand-in HA link: the
//!   node's per-message work without the sockets.
//! - `replication`: a batch of 2048 saves (a group commit) taken in by the primary's HA state
//!   machine, and the `Ops` frame that carries them to the backup, encoded and decoded.
//!
//! docs/PERFORMANCE.md has the figures and what they say.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bgs_actors::bot::{BotFactory, CreateBot};
use bgs_actors::bot_actor::{BotActor, BotNotice, BotSetup, Deliver};
use bgs_actors::chat_link::{ChatCall, ChatCallError, ChatCallLater, ChatPort, Unfollow};
use bgs_actors::ha::state::{Config, HaState, Input, Time};
use bgs_actors::messages::{InFlight, Replicate};
use bgs_proto::bot::{BotKey, BotSpec};
use bgs_proto::chat::{
    ChatEvent, ChatRequest, ChatResponse, ClientFrame, EventKind, ParticipantType, PostKind,
    PostRequest, ServerFrame, Visibility,
};
use bgs_proto::codec::{decode, encode, FrameCodec, DEFAULT_MAX_FRAME};
use bgs_proto::ha::{HaFrame, HaOp, HaRole, ReplicatedBot};
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

fn customer_message(seq: u64) -> ChatEvent {
    ChatEvent {
        nickname: "Customer".into(),
        text: Some(format!("m{seq} where is my parcel?")),
        ts_ms: 1_764_000_000_000 + seq,
        ..ChatEvent::new(
            seq,
            EventKind::Message,
            "b3c1f2d0a9e84c7e",
            ParticipantType::Customer,
        )
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let events = ServerFrame::Events {
        session_id: "bench-g-4711".into(),
        participant_id: "4f7d9a2c11e04b5f".into(),
        events: vec![customer_message(12)],
    };
    let post = ClientFrame {
        id: 77,
        request: ChatRequest::Post(PostRequest {
            session_id: "bench-g-4711".into(),
            participant_id: "4f7d9a2c11e04b5f".into(),
            kind: PostKind::Message,
            text: "echo: m12 where is my parcel?".into(),
            rich: None,
            visibility: Visibility::All,
            key: Some("6a0c2e4b8d1f4e3a:12s-0".into()),
        }),
    };
    let mut server_side: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut node_side: FrameCodec<ServerFrame, ClientFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(4096);
    g.bench_function("events_frame_encode", |b| {
        b.iter(|| {
            buf.clear();
            server_side.encode(events.clone(), &mut buf).unwrap();
        })
    });
    let mut one = BytesMut::new();
    server_side.encode(events.clone(), &mut one).unwrap();
    g.bench_function("events_frame_decode", |b| {
        b.iter_batched_ref(
            || one.clone(),
            |bytes| node_side.decode(bytes).unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("post_frame_encode", |b| {
        b.iter(|| {
            buf.clear();
            node_side.encode(post.clone(), &mut buf).unwrap();
        })
    });
    let mut one = BytesMut::new();
    node_side.encode(post.clone(), &mut one).unwrap();
    g.bench_function("post_frame_decode", |b| {
        b.iter_batched_ref(
            || one.clone(),
            |bytes| server_side.decode(bytes).unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for n in [3usize, 16] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("post_then_read_by_{n}"), |b| {
            b.iter_custom(|iters| {
                let (mut session, ids) = fanout_session(n);
                let mut readers: Vec<_> = ids
                    .iter()
                    .map(|id| (id.clone(), session.last_seq()))
                    .collect();
                let started = Instant::now();
                for i in 0..iters {
                    fanout_post(&mut session, &ids[0], i);
                    for (id, since) in readers.iter_mut() {
                        let viewer = session.participant(id).unwrap();
                        let (events, next) = session.read_for(viewer, *since, 64, 1 << 20);
                        *since = next;
                        std::hint::black_box(events);
                    }
                }
                started.elapsed()
            })
        });
    }
    g.finish();
}

fn fanout_session(n: usize) -> (bgs_chat_server::session::SessionState, Vec<String>) {
    use bgs_chat_server::session::{Owner, SessionLimits, SessionState};
    use bgs_proto::chat::{Participant, Style};
    let now = tokio::time::Instant::now();
    let mut s = SessionState::new("bench".into(), 0, Default::default(), now);
    let limits = SessionLimits {
        max_participants: 64,
        max_events: usize::MAX,
    };
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("participant-{i}");
        let info = Participant {
            id: id.clone(),
            nickname: format!("P{i}"),
            participant_type: if i == 0 {
                ParticipantType::Customer
            } else {
                ParticipantType::Agent
            },
            style: if i == 1 { Style::Bot } else { Style::Regular },
            visibility: Visibility::All,
        };
        s.join(info, Owner::Http, &limits, 0, now).unwrap();
        ids.push(id);
    }
    (s, ids)
}

fn fanout_post(s: &mut bgs_chat_server::session::SessionState, from: &str, i: u64) {
    use bgs_chat_server::session::SessionLimits;
    let limits = SessionLimits {
        max_participants: 64,
        max_events: usize::MAX,
    };
    s.post(
        from,
        PostKind::Message,
        format!("m{i}"),
        None,
        Visibility::All,
        Some(format!("k{i}")),
        &limits,
        i,
        tokio::time::Instant::now(),
    )
    .unwrap();
}

/// A stand-in Chat Server link: answers every post at once and counts them.
struct Answering {
    posts: Arc<AtomicU64>,
}

impl Actor for Answering {
    type Context = Context<Self>;
}

impl Handler<ChatCall> for Answering {
    type Result = Result<ChatResponse, ChatCallError>;

    fn handle(&mut self, msg: ChatCall, _ctx: &mut Context<Self>) -> Self::Result {
        Ok(match msg.request {
            ChatRequest::Post(_) => {
                let seq = self.posts.fetch_add(1, Ordering::Relaxed) + 1;
                ChatResponse::Posted {
                    seq,
                    duplicate: false,
                }
            }
            ChatRequest::Leave(_) => ChatResponse::Left { seq: 0 },
            _ => ChatResponse::Userdata(Default::default()),
        })
    }
}

impl Handler<ChatCallLater> for Answering {
    type Result = ();
    fn handle(&mut self, _: ChatCallLater, _ctx: &mut Context<Self>) {}
}

impl Handler<Unfollow> for Answering {
    type Result = ();
    fn handle(&mut self, _: Unfollow, _ctx: &mut Context<Self>) {}
}

/// Stands in for the session (notices) and the HA coordinator (saves): drops what it gets.
struct Sink;

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<BotNotice> for Sink {
    type Result = ();
    fn handle(&mut self, _: BotNotice, _ctx: &mut Context<Self>) {}
}

impl Handler<Replicate> for Sink {
    type Result = ();
    fn handle(&mut self, _: Replicate, _ctx: &mut Context<Self>) {}
}

fn spec() -> BotSpec {
    let key = BotKey {
        interaction_id: "bench-g-4711".into(),
        bot_id: "echo".into(),
        bot_name: String::new(),
    };
    BotSpec {
        userdata: [("InteractionId".to_string(), "bench-g-4711".to_string())]
            .into_iter()
            .collect(),
        ..BotSpec::new(key, "Echo")
    }
}

fn bot_dispatch(c: &mut Criterion) {
    // A load test, not a misbehaving bot: no rate limit.
    bgs_actors::bot_limits::set_limits(bgs_actors::bot_limits::BotLimits {
        events_per_minute: u32::MAX,
        ..Default::default()
    });
    let mut g = c.benchmark_group("bot_dispatch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("echo_event_to_post", |b| {
        b.iter_custom(|iters| {
            let system = actix::System::new();
            let took = system.block_on(async move {
                let posts = Arc::new(AtomicU64::new(0));
                let chat = Answering {
                    posts: posts.clone(),
                }
                .start();
                let sink = Sink.start();
                let in_flight = InFlight::default();
                let bot = BotActor::new(BotSetup {
                    spec: Arc::new(spec()),
                    instance_id: "6a0c2e4b8d1f4e3a".into(),
                    participant_id: "4f7d9a2c11e04b5f".into(),
                    joined_seq: 2,
                    bot: bgs::plugins::echo::EchoFactory
                        .create(&CreateBot {
                            bot_name: String::new(),
                            parameters: Default::default(),
                        })
                        .unwrap(),
                    history: Vec::new(),
                    restored: None,
                    link: ChatPort::new(
                        chat.clone().recipient(),
                        chat.clone().recipient(),
                        chat.recipient(),
                    ),
                    notices: sink.clone().recipient(),
                    ha: sink.recipient().into(),
                    handling_timeout: Duration::from_secs(5),
                    started_ms: 0,
                    checkpoint: 2,
                    done: Arc::new(AtomicBool::new(false)),
                    work: in_flight.enter(),
                })
                .start();
                let started = Instant::now();
                let mut sent = 0u64;
                while sent < iters {
                    // At most 12 events ahead of the posts: a mailbox in use, never a backlog.
                    while sent - posts.load(Ordering::Relaxed) < 12 && sent < iters {
                        bot.do_send(Deliver::Event(
                            customer_message(3 + sent),
                            in_flight.enter(),
                        ));
                        sent += 1;
                    }
                    tokio::task::yield_now().await;
                }
                while posts.load(Ordering::Relaxed) < iters {
                    tokio::task::yield_now().await;
                }
                started.elapsed()
            });
            took
        })
    });
    g.finish();
}

fn replication(c: &mut Criterion) {
    let mut g = c.benchmark_group("replication");
    const BATCH: usize = 2048;
    g.throughput(Throughput::Elements(BATCH as u64));
    let config = Config {
        node_id: "a".into(),
        cluster_id: "bgs".into(),
        role: HaRole::Primary,
        has_peer: false,
        peer: None,
        secret: "s".into(),
        failover_after_ms: 1000,
        sync: false,
        http_url: "http://a".into(),
        peer_http: None,
        state_file: false,
        durable: false,
    };
    let now = Time {
        mono_ms: 1,
        wall_ms: 1,
    };
    let ids: Vec<String> = (0..BATCH).map(|i| format!("{i:016x}")).collect();
    let spec = Arc::new(spec());
    g.bench_function("primary_takes_2048_saves", |b| {
        b.iter_batched_ref(
            || {
                let mut state = HaState::new(config.clone(), HaRole::Primary, 1, "run".into(), now);
                for id in &ids {
                    state.step(
                        now,
                        Input::Replicate {
                            op: HaOp::Started(Box::new(ReplicatedBot {
                                instance_id: id.clone(),
                                spec: spec.clone(),
                                participant_id: "p".into(),
                                joined_seq: 2,
                                started_ms: 0,
                                context: None,
                                checkpoint_seq: 2,
                            })),
                            waiter: None,
                        },
                    );
                }
                state.step(now, Input::Flush);
                state
            },
            |state| {
                for (i, id) in ids.iter().enumerate() {
                    state.step(
                        now,
                        Input::Replicate {
                            op: HaOp::Saved {
                                instance_id: id.clone(),
                                context: (i as u64).to_le_bytes().to_vec().into(),
                                checkpoint_seq: 3 + i as u64,
                            },
                            waiter: None,
                        },
                    );
                }
                std::hint::black_box(state.step(now, Input::Flush));
            },
            BatchSize::LargeInput,
        )
    });
    let frame = HaFrame::Ops {
        epoch: 1,
        first_op: 1,
        ops: ids
            .iter()
            .enumerate()
            .map(|(i, id)| HaOp::Saved {
                instance_id: id.clone(),
                context: (i as u64).to_le_bytes().to_vec().into(),
                checkpoint_seq: 3 + i as u64,
            })
            .collect(),
    };
    g.bench_function("ops_frame_of_2048_saves_encode", |b| {
        b.iter(|| std::hint::black_box(encode(&frame).unwrap()))
    });
    let bytes = encode(&frame).unwrap();
    g.bench_function("ops_frame_of_2048_saves_decode", |b| {
        b.iter(|| std::hint::black_box(decode::<HaFrame>(&bytes).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = codec, fanout, bot_dispatch, replication
}
criterion_main!(hot_paths);
