//! Supervisor: owns ESP intake. Checks every request, keeps the registry of bot instances, creates
//! one SessionActor per interaction (spread over one Arbiter per core) and routes commands to it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::esp::{EspRequest, EspResponse, EspResult};

use crate::bot::{BotFactory, CreateBot, StopReason};
use crate::chat_link::ChatPort;
use crate::esp::BotKey;
use crate::esp::{self, BotSpec, ErrorCode, EspCommand, EspError};
use crate::messages::{BecomeBackup, BecomePrimary, Drain, HaPort, InFlight, Replicate, Shared};
use crate::metrics::{metrics, Kind};
use crate::now_ms;
use crate::report::{Registry, ReportSink, RunningBot};
use crate::role::RoleView;
use crate::session::{
    BotFinished, DataInSession, RestoreInSession, SessionActor, SessionControl, SessionEnded,
    StartInSession, StopInSession,
};
use bgs_proto::ha::HaOp;

/// One ESP request; the answer carries the request id.
#[derive(Message)]
#[rtype(result = "EspResponse")]
pub struct Esp(pub EspRequest);

/// Answers after every message sent before it (a barrier: reports of finished bots are out).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Barrier;

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
    /// Arbiters (threads) of their own to spread sessions and bots over. 0: automatic, which is
    /// none on up to 2 cores (sessions and bots run on the main thread, with the ChatLink, the
    /// HA coordinator and this Supervisor: no wake-up between threads per message), and one per
    /// core but one beyond (docs/PERFORMANCE.md 5.12).
    pub arbiters: usize,
    /// Bots restored at once after a promotion (`ha-bot-recovery-batch`).
    pub recovery_batch: usize,
    /// `ha.mode = "sync"`: a bot's start and saves wait for the backup.
    pub replication_waits: bool,
    /// The node's count of work in flight, shared with its ChatLink (what a drain waits for).
    pub in_flight: InFlight,
}

pub struct Supervisor {
    config: SupervisorConfig,
    plugins: HashMap<String, Arc<dyn BotFactory>>,
    link: ChatPort,
    sessions: HashMap<String, Addr<SessionActor>>,
    registry: Arc<Registry>,
    reports: Arc<dyn ReportSink>,
    /// Empty: sessions and bots run on this (the main) thread.
    arbiters: Vec<ArbiterHandle>,
    shutting_down: bool,
    ha: HaPort,
    /// What every session is handed (shared: made once, at the first session).
    session_ports: Option<(ChatPort, Shared<BotFinished>, Shared<SessionEnded>)>,
    /// The node's role, as the HaCoordinator sets it.
    role: RoleView,
    /// Counts promotions and demotions: a restore in batches goes on while this is unchanged.
    restore_run: u64,
    /// Interactions with bots still to restore, by the id's fingerprint (no copy of 100 000
    /// ids at a promotion), and how many (ESP to them: retry shortly; an interaction that
    /// shares a fingerprint is told the same until the restore is over).
    restoring: HashMap<u64, u32>,
}

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        plugins: Vec<Arc<dyn BotFactory>>,
        link: ChatPort,
        registry: Arc<Registry>,
        reports: Arc<dyn ReportSink>,
        ha: Recipient<Replicate>,
        role: RoleView,
    ) -> Self {
        let n = if config.arbiters == 0 {
            match std::thread::available_parallelism().map_or(1, |n| n.get()) {
                0..=2 => 0,
                cores => cores - 1,
            }
        } else {
            config.arbiters
        };
        let arbiters = (0..n).map(|_| Arbiter::new().handle()).collect();
        let waits = config.replication_waits;
        let in_flight = config.in_flight.clone();
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
            ha: HaPort::new(ha.into(), waits, in_flight),
            session_ports: None,
            role,
            restore_run: 0,
            restoring: HashMap::new(),
        }
    }

    fn session(&mut self, interaction_id: &str, ctx: &mut Context<Self>) -> Addr<SessionActor> {
        if let Some(addr) = self.sessions.get(interaction_id).filter(|a| a.connected()) {
            return addr.clone();
        }
        let (link, finished, ended) = self
            .session_ports
            .get_or_insert_with(|| {
                let me = ctx.address();
                (
                    self.link.clone(),
                    me.clone().recipient().into(),
                    me.recipient().into(),
                )
            })
            .clone();
        let id = interaction_id.to_string();
        let timeout = self.config.handling_timeout;
        let ha = self.ha.clone();
        let session = move |_: &mut Context<SessionActor>| {
            SessionActor::new(id, link, finished, ended, ha, timeout)
        };
        let addr = if self.arbiters.is_empty() {
            // No arbiters of their own: on this thread.
            SessionActor::create(session)
        } else {
            let mut h = DefaultHasher::new();
            interaction_id.hash(&mut h);
            let arbiter = &self.arbiters[(h.finish() as usize) % self.arbiters.len()];
            SessionActor::start_in_arbiter(arbiter, session)
        };
        self.sessions
            .insert(interaction_id.to_string(), addr.clone());
        addr
    }

    fn start(
        &mut self,
        request_id: u64,
        spec: BotSpec,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, EspResponse> {
        let fail = |e: EspError| -> ResponseActFuture<Self, EspResponse> {
            Box::pin(actix::fut::ready(e.into_response(request_id)))
        };
        let Some(factory) = self.plugins.get(&spec.key.bot_id).cloned() else {
            let known: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
            return fail(EspError::new(
                ErrorCode::UnknownBot,
                format!(
                    "no plugin has ChatBotID {:?} (this node has {})",
                    spec.key.bot_id,
                    known.join(", ")
                ),
            ));
        };
        if self.registry.is_running(&spec.key) {
            return fail(EspError::new(
                ErrorCode::AlreadyRunning,
                format!("bot {} is already running", spec.key),
            ));
        }
        let create = CreateBot {
            bot_name: spec.key.bot_name.clone(),
            parameters: bgs_proto::esp::unstored(&spec.parameters),
        };
        let made = crate::plugin_guard::plugin_call(|| {
            factory
                .check(&create)
                .and_then(|()| factory.create(&create))
        });
        let bot = match made {
            Ok(Ok(bot)) => bot,
            Ok(Err(e)) if e.unavailable => {
                return fail(EspError::new(ErrorCode::BotUnavailable, e.message))
            }
            Ok(Err(e)) => return fail(EspError::new(ErrorCode::BadParameter, e.message)),
            Err(panic) => {
                return fail(EspError::new(
                    ErrorCode::Internal,
                    format!("the plugin panicked: {panic}"),
                ))
            }
        };
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        let spec = Arc::new(spec);
        self.registry.insert(RunningBot {
            spec: spec.clone(),
            instance_id: instance_id.clone(),
            joined: false,
            started_ms: now_ms(),
        });
        let key = spec.key.clone();
        let session = self.session(&key.interaction_id, ctx);
        let start = StartInSession {
            spec,
            instance_id,
            bot,
            restored: None,
        };
        Box::pin(session.send(start).into_actor(self).map(move |result, act, _ctx| {
            // The session actor was stopping (its last bot had just ended): a retry gets a new one.
            let result = result.unwrap_or_else(|_| {
                Err(EspError::new(ErrorCode::Busy, "the chat's session was closing; retry the request"))
            });
            match result {
                Ok(started) => {
                    if let Some(s) = act.registry.joined(&key) {
                        metrics().bots_started.inc(&[&s.key.bot_id, &s.category, &s.function]);
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
                    act.registry.remove(&key);
                    tracing::warn!(bot = %key, code = e.code.as_str(), error = %e.message, "StartBot failed");
                    e.into_response(request_id)
                }
            }
        }))
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        metrics().actor_stopped(Kind::Supervisor);
    }

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::Supervisor);
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
        metrics().dequeued(Kind::Supervisor);
        let _span = tracing::info_span!(
            "esp",
            method = %request.method,
            interaction_id = %request.userdata.get("InteractionId").map_or("", String::as_str),
            request_id = request.request_id
        )
        .entered();
        let started = std::time::Instant::now();
        let result = self.esp(request, ctx);
        metrics().handled(Kind::Supervisor, started.elapsed());
        result
    }
}

impl Supervisor {
    /// Hands a StopBot or SendDataToBot to the session of the bot; its answer (the instance id)
    /// becomes `done(instance_id)`.
    fn to_bot_session<M>(
        &self,
        id: u64,
        key: &BotKey,
        msg: M,
        done: fn(String) -> EspResult,
    ) -> ResponseActFuture<Self, EspResponse>
    where
        M: Message<Result = Result<String, EspError>> + Send + 'static,
        SessionActor: Handler<M>,
    {
        if self.is_restoring(&key.interaction_id) {
            let e = EspError::new(
                ErrorCode::Draining,
                format!("bot {key} is being restored after a takeover; retry shortly"),
            );
            return Box::pin(actix::fut::ready(e.into_response(id)));
        }
        let Some(session) = self.sessions.get(&key.interaction_id).cloned() else {
            let e = EspError::new(ErrorCode::NoSuchInstance, format!("no running bot {key}"));
            return Box::pin(actix::fut::ready(e.into_response(id)));
        };
        Box::pin(session.send(msg).into_actor(self).map(move |r, _, _| {
            match r {
                Ok(Ok(instance_id)) => EspResponse::ok(id, done(instance_id)),
                Ok(Err(e)) => e.into_response(id),
                Err(_) => EspError::new(ErrorCode::NoSuchInstance, "the bot's session has ended")
                    .into_response(id),
            }
        }))
    }

    fn esp(
        &mut self,
        request: EspRequest,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, EspResponse> {
        let id = request.request_id;
        let ready = |r: EspResponse| -> ResponseActFuture<Self, EspResponse> {
            Box::pin(actix::fut::ready(r))
        };
        let command = match esp::parse(&request, &self.config.chat_server_name) {
            Ok(c) => c,
            Err(e) => return ready(e.into_response(id)),
        };
        if self.shutting_down {
            return ready(
                EspError::new(ErrorCode::Draining, "the node is shutting down").into_response(id),
            );
        }
        let role = self.role.get();
        if !role.primary {
            let mut e = EspError::new(
                ErrorCode::NotPrimary,
                "this node is a backup; send ESP to the primary",
            );
            e.primary = role.primary_url;
            return ready(e.into_response(id));
        }
        if role.draining {
            return ready(
                EspError::new(
                    ErrorCode::Draining,
                    "a switchover is in progress; retry shortly",
                )
                .into_response(id),
            );
        }
        if role.restoring {
            return ready(
                EspError::new(
                    ErrorCode::Draining,
                    "this node is about to restore the bots of its durable store; retry shortly",
                )
                .into_response(id),
            );
        }
        match command {
            EspCommand::Start(spec) => self.start(id, spec, ctx),
            EspCommand::Stop(key) => {
                let msg = StopInSession {
                    key: key.clone(),
                    reason: StopReason::StopRequested,
                };
                self.to_bot_session(id, &key, msg, |instance_id| EspResult::Stopped {
                    instance_id,
                })
            }
            EspCommand::SendData { key, data } => {
                let msg = DataInSession {
                    key: key.clone(),
                    data,
                };
                self.to_bot_session(id, &key, msg, |instance_id| EspResult::DataSent {
                    instance_id,
                })
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
        self.registry.finish(&msg.key, r);
        metrics()
            .bots_stopped
            .inc(&[&r.bot_id, r.end_reason.as_str(), &r.category, &r.function]);
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

impl Handler<Barrier> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Barrier, _ctx: &mut Context<Self>) {}
}

impl Handler<BecomeBackup> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: BecomeBackup, _ctx: &mut Context<Self>) {
        self.restore_run += 1;
        self.restoring.clear();
        let started = std::time::Instant::now();
        let sessions = std::mem::take(&mut self.sessions);
        self.registry.clear_running();
        // The sessions are told in slices, yielding between them: the hand-over frame this
        // demotion follows, and ESP's `not_primary` answers, share this thread.
        actix::spawn(async move {
            let n = sessions.len();
            for (i, s) in sessions.values().enumerate() {
                s.do_send(SessionControl::Abandon);
                if i % 1024 == 1023 {
                    tokio::task::yield_now().await;
                }
            }
            if n > 0 {
                crate::drop_later(sessions);
            }
            tracing::info!(
                sessions = n,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "bots dropped: this node is a backup"
            );
        });
    }
}

impl Handler<Drain> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        // The ChatLink has paused its events and ESP is refused: what is left is the work
        // already given, which ends when every guard of it is dropped (no message per bot).
        let in_flight = self.ha.in_flight().clone();
        Box::pin(async move { in_flight.idle().await })
    }
}

impl Handler<BecomePrimary> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: BecomePrimary, ctx: &mut Context<Self>) {
        // Every bot is running from now on (GetBotStatus says so, a second StartBot is refused);
        // they re-join in batches of `ha-bot-recovery-batch`, each batch after the one before,
        // so a big node does not stampede the Chat Server, and ESP is answered between batches.
        let started = std::time::Instant::now();
        self.restore_run += 1;
        self.restoring.clear();
        let total = msg.bots.len();
        self.restoring.reserve(total);
        for bot in &msg.bots {
            self.registry.insert(RunningBot {
                spec: bot.spec.clone(),
                instance_id: bot.instance_id.clone(),
                joined: true,
                started_ms: bot.started_ms,
            });
            *self
                .restoring
                .entry(crate::fingerprint(&bot.spec.key.interaction_id))
                .or_default() += 1;
        }
        tracing::info!(
            bots = total,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bots registered; restoring them in batches"
        );
        ctx.notify(RestoreNext {
            run: self.restore_run,
            rest: msg.bots.into(),
            total,
            restored: 0,
            started,
            retries: 0,
        });
    }
}

/// The next batch of bots to restore after a promotion (the Supervisor sends it to itself).
#[derive(Message)]
#[rtype(result = "()")]
struct RestoreNext {
    /// Which promotion this belongs to; a later role change ends it.
    run: u64,
    rest: std::collections::VecDeque<Arc<bgs_proto::ha::ReplicatedBot>>,
    total: usize,
    restored: usize,
    started: std::time::Instant,
    /// Rounds in which some restore found no connection to the Chat Server.
    retries: u32,
}

/// A restore whose Resume found no connection (the Chat Server is down, or the link lost it in
/// the middle) is tried again after this, up to [`RESTORE_RETRIES`] rounds: a Chat Server that
/// blinks during a take-over must not cost bots (docs/HA.md 4.6).
const RESTORE_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const RESTORE_RETRIES: u32 = 300;

impl Supervisor {
    /// The plugin instance and session of one bot to restore; None (and forgotten) when it cannot
    /// come back.
    fn prepare_restore(
        &mut self,
        bot: Arc<bgs_proto::ha::ReplicatedBot>,
        ctx: &mut Context<Self>,
    ) -> Option<(Addr<SessionActor>, RestoreInSession)> {
        let key = bot.spec.key.clone();
        // A bot that cannot come back is dropped from the registry and the replicated state.
        let forget = |why: String| {
            tracing::error!(bot = %key, reason = %why, "cannot restore a bot");
            self.registry.remove(&key);
            self.ha.tell(HaOp::Removed {
                instance_id: bot.instance_id.clone(),
            });
        };
        let Some(factory) = self.plugins.get(&key.bot_id).cloned() else {
            forget("its plugin is not on this node".into());
            return None;
        };
        let create = CreateBot {
            bot_name: key.bot_name.clone(),
            parameters: bgs_proto::esp::unstored(&bot.spec.parameters),
        };
        let instance = match crate::plugin_guard::plugin_call(|| factory.create(&create)) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                forget(format!("its plugin refused: {e}"));
                return None;
            }
            Err(panic) => {
                forget(format!("its plugin panicked: {panic}"));
                return None;
            }
        };
        let session = self.session(&key.interaction_id, ctx);
        Some((
            session,
            RestoreInSession {
                // Copied here, batch by batch, not all at the promotion (the store shares it).
                replica: Arc::unwrap_or_clone(bot),
                bot: instance,
            },
        ))
    }

    /// This interaction has a bot still waiting for its restore.
    fn is_restoring(&self, interaction_id: &str) -> bool {
        self.restoring
            .contains_key(&crate::fingerprint(interaction_id))
    }
}

impl Handler<RestoreNext> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, mut msg: RestoreNext, ctx: &mut Context<Self>) -> Self::Result {
        if msg.run != self.restore_run || self.shutting_down {
            // Demoted, promoted again, or stopping meanwhile: this restore is over.
            return Box::pin(actix::fut::ready(()));
        }
        let mut batch = Vec::new();
        while batch.len() < self.config.recovery_batch.max(1) {
            let Some(bot) = msg.rest.pop_front() else {
                break;
            };
            let interaction = crate::fingerprint(&bot.spec.key.interaction_id);
            if let Some(n) = self.restoring.get_mut(&interaction) {
                *n -= 1;
                if *n == 0 {
                    self.restoring.remove(&interaction);
                }
            }
            // Kept (shared) so that a restore that found no connection can be tried again.
            let again = bot.clone();
            batch.extend(self.prepare_restore(bot, ctx).map(|b| (b, again)));
        }
        let registry = self.registry.clone();
        let ha = self.ha.clone();
        let give_up = msg.retries >= RESTORE_RETRIES;
        Box::pin(
            async move {
                let results =
                    futures_util::future::join_all(batch.into_iter().map(|((s, r), again)| {
                        let key = r.replica.spec.key.clone();
                        let instance_id = r.replica.instance_id.clone();
                        async move { (key, instance_id, s.send(r).await, again) }
                    }))
                    .await;
                let mut restored = 0;
                let mut retry = Vec::new();
                for (key, instance_id, r, again) in results {
                    let error = match r {
                        Ok(Ok(_)) => {
                            restored += 1;
                            continue;
                        }
                        // No connection: the bot is still there at the Chat Server.
                        Ok(Err(e)) if e.code == ErrorCode::ChatServerUnavailable && !give_up => {
                            retry.push(again);
                            continue;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    // Gone for good: out of the registry and out of the replicated state.
                    tracing::warn!(bot = %key, %error, "bot not restored");
                    registry.remove(&key);
                    ha.tell(HaOp::Removed { instance_id });
                }
                (restored, retry)
            }
            .into_actor(self)
            .map(move |(restored, retry), act, ctx| {
                msg.restored += restored;
                if !retry.is_empty() {
                    tracing::info!(
                        bots = retry.len(),
                        round = msg.retries + 1,
                        "restore found no Chat Server connection; trying again"
                    );
                    for bot in retry {
                        *act.restoring
                            .entry(crate::fingerprint(&bot.spec.key.interaction_id))
                            .or_default() += 1;
                        msg.rest.push_back(bot);
                    }
                    msg.retries += 1;
                    ctx.notify_later(msg, RESTORE_RETRY_EVERY);
                } else if msg.rest.is_empty() {
                    tracing::info!(
                        restored = msg.restored,
                        total = msg.total,
                        elapsed_ms = msg.started.elapsed().as_millis() as u64,
                        "bots restored"
                    );
                } else {
                    ctx.notify(msg);
                }
            }),
        )
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        // Every session at once; done when the last has stopped its bots.
        let stops: Vec<_> = self
            .sessions
            .values()
            .map(|s| s.send(SessionControl::StopAll(StopReason::Shutdown)))
            .collect();
        Box::pin(async move {
            futures_util::future::join_all(stops).await;
        })
    }
}

/// The Supervisor in process: ESP in, a stand-in ChatLink (through `ChatPort`) that answers the
/// join as the real one does, probes for what goes to the HA coordinator and the report sink.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::bot::{Bot, BotContext, BotError, BotInput, CreateBot};
    use crate::report::BotReport;
    use crate::role::Role;
    use crate::testing::FakeChat;
    use bgs_proto::chat::ChatRequest;
    use bgs_proto::esp::{EspRequest, EspResult, EspStatus, ESP_SERVICE};
    use futures_util::future::BoxFuture;
    use std::time::Duration;
    use tokio::sync::mpsc;

    struct HaProbe(mpsc::UnboundedSender<HaOp>);

    impl Actor for HaProbe {
        type Context = Context<Self>;
    }

    impl Handler<Replicate> for HaProbe {
        type Result = ();
        fn handle(&mut self, msg: Replicate, _ctx: &mut Context<Self>) {
            let _ = self.0.send(msg.0);
        }
    }

    struct Reports(std::sync::Mutex<Vec<BotReport>>);

    impl ReportSink for Reports {
        fn write(&self, report: &BotReport) {
            self.0.lock().unwrap().push(report.clone());
        }
    }

    struct Quiet;

    impl Bot for Quiet {
        fn handle<'a>(
            &'a mut self,
            _ctx: &'a mut BotContext,
            _input: BotInput,
        ) -> BoxFuture<'a, Result<(), BotError>> {
            Box::pin(async { Ok(()) })
        }
    }

    struct QuietFactory;

    impl BotFactory for QuietFactory {
        fn bot_id(&self) -> &str {
            "quiet"
        }
        fn create(&self, _request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
            Ok(Box::new(Quiet))
        }
    }

    fn esp(method: &str, interaction: &str) -> Esp {
        Esp(EspRequest {
            request_id: 1,
            service: ESP_SERVICE.into(),
            method: method.into(),
            parameters: [
                ("ChatBotID".to_string(), "quiet".to_string()),
                ("_umsChannel".to_string(), "channel-chatbot".to_string()),
            ]
            .into(),
            userdata: [("InteractionId".to_string(), interaction.to_string())].into(),
        })
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    #[actix::test]
    async fn esp_starts_finds_and_stops_a_bot_through_the_supervisor_in_process() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (ops_tx, mut ops) = mpsc::unbounded_channel();
        let (follower_tx, _followers) = mpsc::unbounded_channel();
        let chat = FakeChat {
            seen: seen_tx,
            follower: follower_tx,
        }
        .start();
        let ha = HaProbe(ops_tx).start();
        let reports = Arc::new(Reports(Default::default()));
        let role = RoleView::default();
        let supervisor = Supervisor::new(
            SupervisorConfig {
                node_id: "a".into(),
                chat_server_name: String::new(),
                handling_timeout: Duration::from_secs(5),
                finished_retention: Duration::from_secs(60),
                arbiters: 1,
                recovery_batch: 10,
                replication_waits: false,
                in_flight: Default::default(),
            },
            vec![Arc::new(QuietFactory)],
            ChatPort::new(
                chat.clone().recipient(),
                chat.clone().recipient(),
                chat.recipient(),
            ),
            Arc::new(Registry::default()),
            reports.clone(),
            ha.recipient(),
            role.clone(),
        )
        .start();

        // A backup answers not_primary, and starts nothing.
        let answer = supervisor.send(esp("StartBot", "chat-1")).await.unwrap();
        assert_eq!(answer.code.as_deref(), Some("not_primary"));
        role.set(Role {
            primary: true,
            draining: false,
            restoring: false,
            primary_url: None,
        });

        let answer = supervisor.send(esp("StartBot", "chat-1")).await.unwrap();
        assert_eq!(answer.status, EspStatus::Ok, "{answer:?}");
        let Some(EspResult::Started {
            instance_id,
            participant_id,
        }) = answer.result
        else {
            panic!("started: {answer:?}");
        };
        assert_eq!(participant_id, "bot-1");
        assert!(matches!(next(&mut seen).await, ChatRequest::Join(_)));
        // The stand-in joins the bot at seq 3: the replica carries that join.
        match next(&mut ops).await {
            HaOp::Started(b) => assert_eq!(
                (b.instance_id.as_str(), b.joined_seq),
                (instance_id.as_str(), 3)
            ),
            other => panic!("the start is replicated first, not {other:?}"),
        }

        // The same bot again is refused; its status is running.
        let again = supervisor.send(esp("StartBot", "chat-1")).await.unwrap();
        assert_eq!(again.code.as_deref(), Some("already_running"));
        let status = supervisor
            .send(esp("GetBotStatus", "chat-1"))
            .await
            .unwrap();
        assert_eq!(status.status, EspStatus::Ok, "{status:?}");

        // StopBot: the bot leaves, is removed from the replica and reported once.
        let stopped = supervisor.send(esp("StopBot", "chat-1")).await.unwrap();
        assert_eq!(stopped.status, EspStatus::Ok, "{stopped:?}");
        loop {
            if let ChatRequest::Leave(l) = next(&mut seen).await {
                assert_eq!(l.participant_id, "bot-1");
                break;
            }
        }
        loop {
            if let HaOp::Removed { instance_id: gone } = next(&mut ops).await {
                assert_eq!(gone, instance_id);
                break;
            }
        }
        supervisor.send(Barrier).await.unwrap();
        let written = reports.0.lock().unwrap().clone();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].end_reason, StopReason::StopRequested);
    }
}
