//! Supervisor: owns ESP intake. Checks every request, keeps the registry of bot instances, creates
//! one SessionActor per interaction (spread over one Arbiter per core) and routes commands to it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::esp::{BotStatus, EspRequest, EspResponse, EspResult};

use crate::bot::{BotFactory, CreateBot, StopReason};
use crate::chat_link::ChatLink;
use crate::esp::{self, EspCommand, EspError, StartSpec};
use crate::now_ms;
use crate::report::{Registry, ReportSink};
use crate::session::{
    BotFinished, DataInSession, SessionActor, SessionEnded, StartInSession, StopAll, StopInSession,
};

/// One ESP request; the answer carries the request id.
#[derive(Message)]
#[rtype(result = "EspResponse")]
pub struct Esp(pub EspRequest);

/// Stop every bot (no leave: the node is going away) and answer when they are all done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

pub struct SupervisorConfig {
    pub node_id: String,
    /// The name userdata `ChatServer` may give for the Chat Server this node serves.
    pub chat_server_name: String,
    pub handling_timeout: Duration,
    /// How long finished instances stay visible to GetBotStatus.
    pub finished_retention: Duration,
    /// Arbiters (threads) to spread sessions and bots over; 0: one per core.
    pub arbiters: usize,
}

pub struct Supervisor {
    config: SupervisorConfig,
    plugins: HashMap<String, Arc<dyn BotFactory>>,
    link: Addr<ChatLink>,
    sessions: HashMap<String, Addr<SessionActor>>,
    registry: Arc<Registry>,
    reports: Arc<dyn ReportSink>,
    arbiters: Vec<ArbiterHandle>,
    shutting_down: bool,
}

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        plugins: Vec<Arc<dyn BotFactory>>,
        link: Addr<ChatLink>,
        registry: Arc<Registry>,
        reports: Arc<dyn ReportSink>,
    ) -> Self {
        let n = if config.arbiters == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            config.arbiters
        };
        let arbiters = (0..n).map(|_| Arbiter::new().handle()).collect();
        Self {
            plugins: plugins
                .into_iter()
                .map(|p| (p.bot_id().to_string(), p))
                .collect(),
            config,
            link,
            sessions: HashMap::new(),
            registry,
            reports,
            arbiters,
            shutting_down: false,
        }
    }

    fn session(&mut self, interaction_id: &str, ctx: &mut Context<Self>) -> Addr<SessionActor> {
        if let Some(addr) = self.sessions.get(interaction_id).filter(|a| a.connected()) {
            return addr.clone();
        }
        let mut h = DefaultHasher::new();
        interaction_id.hash(&mut h);
        let arbiter = &self.arbiters[(h.finish() as usize) % self.arbiters.len()];
        let link = self.link.clone();
        let me = ctx.address();
        let id = interaction_id.to_string();
        let timeout = self.config.handling_timeout;
        let addr = SessionActor::start_in_arbiter(arbiter, move |_| {
            SessionActor::new(id, link, me.clone().recipient(), me.recipient(), timeout)
        });
        self.sessions
            .insert(interaction_id.to_string(), addr.clone());
        addr
    }

    fn start(
        &mut self,
        request_id: u64,
        spec: StartSpec,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, EspResponse> {
        let fail = |e: EspError| -> ResponseActFuture<Self, EspResponse> {
            Box::pin(actix::fut::ready(e.into_response(request_id)))
        };
        let Some(factory) = self.plugins.get(&spec.key.bot_id).cloned() else {
            let known: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
            return fail(EspError::new(
                "unknown_bot",
                format!(
                    "no plugin has ChatBotID {:?} (this node has {})",
                    spec.key.bot_id,
                    known.join(", ")
                ),
            ));
        };
        if self.registry.running.contains_key(&spec.key) {
            return fail(EspError::new(
                "already_running",
                format!("bot {} is already running", spec.key),
            ));
        }
        let create = CreateBot {
            bot_name: spec.key.bot_name.clone(),
            parameters: spec.parameters.clone(),
        };
        let bot = match factory
            .check(&create)
            .and_then(|()| factory.create(&create))
        {
            Ok(bot) => bot,
            Err(e) => return fail(EspError::new("bad_parameter", e.0)),
        };
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        self.registry.running.insert(
            spec.key.clone(),
            BotStatus {
                instance_id: instance_id.clone(),
                interaction_id: spec.key.interaction_id.clone(),
                bot_id: spec.key.bot_id.clone(),
                bot_name: spec.key.bot_name.clone(),
                state: "starting".into(),
                reason: None,
                started_ms: now_ms(),
                ended_ms: None,
                nickname: spec.nickname.clone(),
                visibility: spec.visibility.to_string(),
                category: spec.category.clone(),
                function: spec.function.clone(),
                holdup: spec.holdup,
            },
        );
        let key = spec.key.clone();
        let session = self.session(&key.interaction_id, ctx);
        let start = StartInSession {
            spec,
            instance_id,
            bot,
            restored: None,
        };
        Box::pin(session.send(start).into_actor(self).map(move |result, act, _ctx| {
            let result = result.unwrap_or_else(|e| Err(EspError::new("internal", format!("session actor: {e}"))));
            match result {
                Ok(started) => {
                    if let Some(mut s) = act.registry.running.get_mut(&key) {
                        s.state = "running".into();
                    }
                    EspResponse::ok(
                        request_id,
                        EspResult::Started {
                            instance_id: started.instance_id,
                            participant_id: started.participant_id,
                        },
                    )
                }
                Err(e) => {
                    act.registry.running.remove(&key);
                    tracing::warn!(bot = %key, code = e.code, error = %e.message, "StartBot failed");
                    e.into_response(request_id)
                }
            }
        }))
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        let retention = self.config.finished_retention;
        ctx.run_interval(Duration::from_secs(10), move |act, _| {
            let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
            act.registry.expire(cutoff);
        });
    }
}

impl Handler<Esp> for Supervisor {
    type Result = ResponseActFuture<Self, EspResponse>;

    fn handle(&mut self, Esp(request): Esp, ctx: &mut Context<Self>) -> Self::Result {
        let id = request.request_id;
        let ready = |r: EspResponse| -> ResponseActFuture<Self, EspResponse> {
            Box::pin(actix::fut::ready(r))
        };
        let command = match esp::parse(&request, &self.config.chat_server_name) {
            Ok(c) => c,
            Err(e) => return ready(e.into_response(id)),
        };
        if self.shutting_down {
            return ready(EspError::new("draining", "the node is shutting down").into_response(id));
        }
        match command {
            EspCommand::Start(spec) => self.start(id, spec, ctx),
            EspCommand::Stop(key) => {
                let Some(session) = self.sessions.get(&key.interaction_id).cloned() else {
                    return ready(
                        EspError::new("no_such_instance", format!("no running bot {key}"))
                            .into_response(id),
                    );
                };
                Box::pin(
                    session
                        .send(StopInSession {
                            key,
                            reason: StopReason::StopRequested,
                        })
                        .into_actor(self)
                        .map(move |r, _, _| match r {
                            Ok(Ok(instance_id)) => {
                                EspResponse::ok(id, EspResult::Stopped { instance_id })
                            }
                            Ok(Err(e)) => e.into_response(id),
                            Err(_) => {
                                EspError::new("no_such_instance", "the bot's session has ended")
                                    .into_response(id)
                            }
                        }),
                )
            }
            EspCommand::SendData { key, data } => {
                let Some(session) = self.sessions.get(&key.interaction_id).cloned() else {
                    return ready(
                        EspError::new("no_such_instance", format!("no running bot {key}"))
                            .into_response(id),
                    );
                };
                Box::pin(
                    session
                        .send(DataInSession { key, data })
                        .into_actor(self)
                        .map(move |r, _, _| match r {
                            Ok(Ok(instance_id)) => {
                                EspResponse::ok(id, EspResult::DataSent { instance_id })
                            }
                            Ok(Err(e)) => e.into_response(id),
                            Err(_) => {
                                EspError::new("no_such_instance", "the bot's session has ended")
                                    .into_response(id)
                            }
                        }),
                )
            }
            EspCommand::Status {
                interaction_id,
                bot_id,
                bot_name,
            } => {
                let bots =
                    self.registry
                        .status(&interaction_id, bot_id.as_deref(), bot_name.as_deref());
                ready(EspResponse::ok(id, EspResult::Status { bots }))
            }
        }
    }
}

impl Handler<BotFinished> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: BotFinished, _ctx: &mut Context<Self>) {
        let r = &msg.report;
        tracing::info!(
            interaction_id = %r.interaction_id,
            bot_id = %r.bot_id,
            bot_instance = %r.instance_id,
            reason = %r.end_reason,
            abnormal = r.abnormal,
            duration_ms = r.duration_ms,
            "bot finished"
        );
        self.registry.finish(&msg.key, &r.end_reason, r.ended_ms);
        self.reports.write(r);
    }
}

impl Handler<SessionEnded> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Context<Self>) {
        if self
            .sessions
            .get(&msg.interaction_id)
            .is_some_and(|a| !a.connected())
        {
            self.sessions.remove(&msg.interaction_id);
        }
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let sessions: Vec<Addr<SessionActor>> = self.sessions.values().cloned().collect();
        Box::pin(async move {
            for s in sessions {
                let _ = s
                    .send(StopAll {
                        reason: StopReason::Shutdown,
                    })
                    .await;
            }
        })
    }
}
