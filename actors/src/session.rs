//! SessionActor: one per chat session (interaction) with bots on this node. Joins bots to the
//! session, holds each bot's view of who is present, applies the end conditions of SPEC section 3,
//! and relays each bot's events to its BotActor. `slot.rs` is one bot as the session keeps it;
//! `end.rs` the end conditions, a pure function.

mod end;
mod slot;

use std::time::Duration;

use end::{end_reason, EndOptions};
use slot::{JoinKind, Joining, PendingStart, Slot, Slots, StartReply};

use actix::prelude::*;
use bgs_proto::chat::{
    AfterAction, ChatErrorCode, ChatEvent, ChatRequest, ChatResponse, JoinRequest, ParticipantType,
    Style,
};
use bgs_proto::esp::KeyValues;
use tokio::sync::oneshot;

use crate::bot::{Bot, BotPhase, StopReason};
use crate::bot_actor::{BotActor, BotControl, BotNotice, BotSetup, Deliver};
use crate::chat_link::{
    ChatCall, ChatCallError, ChatPort, CountedFeed, Feed, Follow, ParticipantJoined, Unfollow,
};
use crate::esp::{BotKey, BotSpec, ErrorCode, EspError};
use crate::messages::{HaPort, Shared, Work};
use crate::metrics::{metrics, Kind};
use crate::now_ms;
use crate::report::BotReport;
use bgs_proto::chat::{LeaveRequest, ResumeRequest};
use bgs_proto::ha::{HaOp, ReplicatedBot};

/// Inputs a SessionActor may have queued before it must shed load.
pub(crate) const SESSION_MAILBOX: usize = 256;

/// Start a bot in this session.
#[derive(Message)]
#[rtype(result = "Result<Started, EspError>")]
pub struct StartInSession {
    pub spec: std::sync::Arc<BotSpec>,
    pub instance_id: String,
    pub bot: Box<dyn Bot>,
    pub restored: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub instance_id: String,
    pub participant_id: String,
}

/// Stop one bot (StopBot); answers once it has left and is disposed of.
#[derive(Message)]
#[rtype(result = "Result<String, EspError>")]
pub(crate) struct StopInSession {
    pub key: BotKey,
    pub reason: StopReason,
}

/// Deliver ESP data to one bot.
#[derive(Message)]
#[rtype(result = "Result<String, EspError>")]
pub(crate) struct DataInSession {
    pub key: BotKey,
    pub data: KeyValues,
}

/// Bring back a bot replicated from the old primary: resume its participant, replay what it
/// missed after its checkpoint, start it with its saved context.
#[derive(Message)]
#[rtype(result = "Result<Started, EspError>")]
pub(crate) struct RestoreInSession {
    pub replica: ReplicatedBot,
    pub bot: Box<dyn Bot>,
}

/// What the Supervisor tells a session beside its bots' requests: one control message.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) enum SessionControl {
    /// Stop every bot (shutdown); answered when all are done.
    StopAll(StopReason),
    /// Drop every bot at once: no leave, no report (the bots go on at the new primary).
    Abandon,
}

/// Told to the Supervisor when a bot has finished.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BotFinished {
    pub key: BotKey,
    pub report: BotReport,
}

/// Told to the Supervisor when the session actor stops (no bots left).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SessionEnded {
    pub interaction_id: String,
}

pub struct SessionActor {
    interaction_id: String,
    link: ChatPort,
    finished: Shared<BotFinished>,
    ended: Shared<SessionEnded>,
    ha: HaPort,
    handling_timeout: Duration,
    bots: Slots,
    /// Bots whose join (or resume) is under way, by the token its `Feed::Joined` carries back;
    /// each counts as work in flight until its bot has started (a new bot: until it joined,
    /// since its start waits for its join event, which a draining link holds back).
    joins: Vec<(u64, Joining, StartReply, Work)>,
    next_token: u64,
    /// Dropped by a demotion: it ends silently (the Supervisor has forgotten it already).
    abandoned: bool,
}

fn chat_error(e: ChatCallError) -> EspError {
    match e {
        ChatCallError::Refused(e) => match e.code {
            ChatErrorCode::UnknownSession | ChatErrorCode::SessionClosed => EspError::new(
                ErrorCode::NoSuchSession,
                format!(
                    "the chat server has no open session for this interaction ({})",
                    e.message
                ),
            ),
            ChatErrorCode::LimitExceeded => EspError::new(ErrorCode::Busy, e.message),
            ChatErrorCode::Fenced => EspError::new(ErrorCode::ChatServerUnavailable, e.message),
            _ => EspError::new(
                ErrorCode::Internal,
                format!("the chat server refused the join: {e}"),
            ),
        },
        ChatCallError::Unavailable(m) => EspError::new(ErrorCode::ChatServerUnavailable, m),
    }
}

impl SessionActor {
    pub fn new(
        interaction_id: String,
        link: ChatPort,
        finished: Shared<BotFinished>,
        ended: Shared<SessionEnded>,
        ha: HaPort,
        handling_timeout: Duration,
    ) -> Self {
        Self {
            interaction_id,
            link,
            finished,
            ended,
            ha,
            handling_timeout,
            bots: Slots::default(),
            joins: Vec::new(),
            next_token: 1,
            abandoned: false,
        }
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("session", interaction_id = %self.interaction_id, session_id = %self.interaction_id)
    }

    fn pid_of(&self, key: &BotKey) -> Option<String> {
        self.bots
            .iter()
            .find(|(_, s)| s.spec.key == *key && !s.phase.is_stopping())
            .map(|(pid, _)| pid.clone())
    }

    fn on_events(&mut self, pid: &str, events: Vec<ChatEvent>, ctx: &mut Context<Self>) {
        let Some(slot) = self.bots.get_mut(pid) else {
            return;
        };
        let mut live = Vec::new();
        for e in events {
            if !slot.deliver_after.is_new(e.seq) {
                slot.roster.apply(&e);
                if e.seq < slot.joined_seq {
                    if let Some(p) = slot.pending.as_mut() {
                        p.history.push(e);
                    }
                }
            } else {
                live.push(e);
            }
        }
        let joined_seen = slot.roster.has(pid) || !live.is_empty();
        if joined_seen {
            if let Some(p) = slot.pending.take() {
                self.start_bot(pid, *p, ctx);
            }
        }
        for e in live {
            self.on_live_event(pid, e, ctx);
        }
    }

    fn start_bot(&mut self, pid: &str, p: PendingStart, ctx: &mut Context<Self>) {
        let Some(slot) = self.bots.get_mut(pid) else {
            return;
        };
        // A new bot: its start is replicated before it can save anything, and its StartBot is
        // answered once the backup has it (sync mode), so a StartBot answered ok survives the
        // primary's crash.
        let replicated = p.new.then(|| {
            let replica = replica_of(&slot.spec, &slot.instance_id, pid, slot.joined_seq);
            self.ha.replicate(HaOp::Started(Box::new(replica)))
        });
        let setup = BotSetup {
            spec: slot.spec.clone(),
            instance_id: slot.instance_id.clone(),
            participant_id: pid.to_string(),
            joined_seq: slot.joined_seq,
            bot: p.bot,
            history: p.history,
            restored: p.restored,
            link: self.link.clone(),
            notices: ctx.address().recipient(),
            ha: self.ha.clone(),
            handling_timeout: self.handling_timeout,
            started_ms: p.started_ms.unwrap_or_else(now_ms),
            checkpoint: slot.deliver_after.seq(),
            done: slot.done.clone(),
            work: self.ha.work(),
        };
        slot.addr = Some(BotActor::new(setup).start());
        if slot.phase == BotPhase::Starting {
            slot.phase = BotPhase::Running;
        }
        tracing::info!(
            interaction_id = %self.interaction_id,
            bot_id = %slot.spec.key.bot_id,
            bot_instance = %slot.instance_id,
            participant_id = %pid,
            "bot started"
        );
        let started = Started {
            instance_id: slot.instance_id.clone(),
            participant_id: pid.to_string(),
        };
        let reply = p.reply;
        match replicated {
            Some(replicated) => {
                actix::spawn(async move {
                    let _ = replicated.await;
                    let _ = reply.send(Ok(started));
                });
            }
            None => {
                let _ = reply.send(Ok(started));
            }
        }
    }

    /// One event after the bot's join: relay it, then apply the end conditions.
    fn on_live_event(&mut self, pid: &str, e: ChatEvent, ctx: &mut Context<Self>) {
        let Some(slot) = self.bots.get_mut(pid) else {
            return;
        };
        if slot.phase.is_stopping() {
            return;
        }
        slot.roster.apply(&e);
        let options = EndOptions {
            stop_on_agent_arrival: slot.spec.stop_on_agent_arrival,
            stop_on_customer_left: slot.spec.stop_on_customer_left,
        };
        let stop = end_reason(pid, options, &slot.roster, &e);
        if let Some(addr) = &slot.addr {
            let sent = addr.try_send(Deliver::Event(e, self.ha.work()));
            if sent.is_ok() {
                metrics().queued(Kind::Bot);
            }
            if let Err(SendError::Full(_)) = sent {
                tracing::warn!(bot_instance = %slot.instance_id, "bot cannot keep up with its chat; stopping it");
                self.stop(pid, StopReason::Error, None, ctx);
                return;
            }
        }
        if let Some(reason) = stop {
            // The event that ends the bot is queued just above: let the bot see it first.
            if let Some(slot) = self.bots.get_mut(pid) {
                slot.deliver_ending = true;
            }
            self.stop(pid, reason, None, ctx);
        }
    }

    fn stop(
        &mut self,
        pid: &str,
        reason: StopReason,
        done: Option<oneshot::Sender<()>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(slot) = self.bots.get_mut(pid) else {
            if let Some(d) = done {
                let _ = d.send(());
            }
            return;
        };
        slot.waiters.extend(done);
        if slot.phase.is_stopping() {
            return;
        }
        slot.phase = BotPhase::Stopping(Some(reason));
        // Inputs still queued are skipped (a StopBot does not wait behind them), except for an
        // end condition: its ending event was queued last and is delivered before the stop.
        if !slot.deliver_ending {
            slot.done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::info!(
            interaction_id = %self.interaction_id,
            bot_instance = %slot.instance_id,
            reason = reason.as_str(),
            "stopping bot"
        );
        match &slot.addr {
            Some(addr) => addr.do_send(BotControl::Stop(reason, self.ha.work())),
            None => {
                // Still waiting for its join event: it never started. Leave if it should, stop
                // following it, and answer the StartBot that is waiting.
                if let Some(p) = slot.pending.take() {
                    let _ = p.reply.send(Err(EspError::new(
                        ErrorCode::NoSuchSession,
                        format!("the bot was stopped while joining ({reason})"),
                    )));
                }
                if reason.sends_leave() {
                    self.link.call.do_send(ChatCall {
                        request: ChatRequest::Leave(LeaveRequest {
                            session_id: self.interaction_id.clone(),
                            participant_id: pid.to_string(),
                            after_action: AfterAction::KeepAlive,
                        }),
                        follow: None,
                    });
                }
                self.link.unfollow.do_send(Unfollow {
                    session_id: self.interaction_id.clone(),
                    participant_id: pid.to_string(),
                });
                if let Some(slot) = self.bots.remove(pid) {
                    for w in slot.waiters {
                        let _ = w.send(());
                    }
                }
                self.maybe_end(ctx);
            }
        }
    }

    fn maybe_end(&mut self, ctx: &mut Context<Self>) {
        if self.bots.is_empty() && self.joins.is_empty() {
            ctx.stop();
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::Session);
        ctx.set_mailbox_capacity(SESSION_MAILBOX);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        metrics().actor_stopped(Kind::Session);
        if !self.abandoned {
            self.ended.do_send(SessionEnded {
                interaction_id: self.interaction_id.clone(),
            });
        }
    }
}

impl Handler<StartInSession> for SessionActor {
    type Result = ResponseActFuture<Self, Result<Started, EspError>>;

    fn handle(&mut self, msg: StartInSession, ctx: &mut Context<Self>) -> Self::Result {
        let _span = self.span().entered();
        let request = ChatRequest::Join(JoinRequest {
            session_id: self.interaction_id.clone(),
            nickname: msg.spec.nickname.clone(),
            participant_type: ParticipantType::Agent,
            style: Style::Bot,
            visibility: msg.spec.visibility,
            since_seq: 0,
        });
        let joining = Joining {
            spec: msg.spec,
            instance_id: msg.instance_id,
            bot: msg.bot,
            kind: JoinKind::New {
                restored: msg.restored,
            },
        };
        self.join(request, joining, ctx)
    }
}

impl Handler<RestoreInSession> for SessionActor {
    type Result = ResponseActFuture<Self, Result<Started, EspError>>;

    fn handle(&mut self, msg: RestoreInSession, ctx: &mut Context<Self>) -> Self::Result {
        let _span = self.span().entered();
        let r = msg.replica;
        // From the start: events up to the checkpoint rebuild who is present.
        let request = ChatRequest::Resume(ResumeRequest {
            session_id: self.interaction_id.clone(),
            participant_id: r.participant_id.clone(),
            since_seq: 0,
        });
        let joining = Joining {
            spec: r.spec,
            instance_id: r.instance_id,
            bot: msg.bot,
            kind: JoinKind::Restore {
                joined_seq: r.joined_seq,
                checkpoint_seq: r.checkpoint_seq,
                started_ms: r.started_ms,
                context: r.context.map(Vec::from),
            },
        };
        self.join(request, joining, ctx)
    }
}

impl SessionActor {
    /// Sends a join (or a resume) that the ChatLink answers on the feed with `Joined` before
    /// any event of the participant; the StartBot (or the restore) is answered once the bot
    /// has started, or with why the join failed.
    fn join(
        &mut self,
        request: ChatRequest,
        joining: Joining,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<Started, EspError>> {
        let token = self.next_token;
        self.next_token += 1;
        let (reply, started) = oneshot::channel();
        self.joins.push((token, joining, reply, self.ha.work()));
        let call = ChatCall {
            request,
            follow: Some(Follow {
                to: ctx.address().recipient(),
                token,
            }),
        };
        let joined = self
            .link
            .call
            .send(call)
            .into_actor(self)
            .map(move |result, act, ctx| {
                let error = match result {
                    // The ChatLink told `Feed::Joined` first: the bot's slot is made there.
                    Ok(Ok(ChatResponse::Joined { .. })) => return,
                    Ok(Ok(other)) => EspError::new(
                        ErrorCode::Internal,
                        format!("unexpected join answer {other:?}"),
                    ),
                    Ok(Err(e)) => chat_error(e),
                    Err(e) => EspError::new(ErrorCode::Internal, format!("chat link: {e}")),
                };
                if let Some(i) = act.joins.iter().position(|(t, ..)| *t == token) {
                    let (_, _, reply, _) = act.joins.swap_remove(i);
                    let _ = reply.send(Err(error));
                }
                act.maybe_end(ctx);
            })
            .then(move |(), _act, _ctx| {
                actix::fut::wrap_future(async move {
                    started.await.unwrap_or_else(|_| {
                        Err(EspError::new(
                            ErrorCode::Internal,
                            "the session stopped while starting the bot",
                        ))
                    })
                })
            });
        Box::pin(joined)
    }

    /// The join of `token` was accepted: the bot's slot. A new bot starts at its own join
    /// event, which follows on the feed; a restored one starts now, from its checkpoint.
    fn on_joined(&mut self, joined: ParticipantJoined, ctx: &mut Context<Self>) {
        let Some(i) = self.joins.iter().position(|(t, ..)| *t == joined.token) else {
            return;
        };
        // The join's work is held to the end: a restored bot's start counts first.
        let (_, joining, reply, _work) = self.joins.swap_remove(i);
        let pid = joined.participant_id;
        let Joining {
            spec,
            instance_id,
            bot,
            kind,
        } = joining;
        match kind {
            JoinKind::New { restored } => {
                let pending = PendingStart {
                    new: true,
                    started_ms: None,
                    history: Vec::new(),
                    bot,
                    restored,
                    reply,
                };
                let slot = Slot::new(spec, instance_id, joined.seq, joined.seq, Some(pending));
                self.bots.insert(pid, slot);
            }
            JoinKind::Restore {
                joined_seq,
                checkpoint_seq,
                started_ms,
                context,
            } => {
                let deliver_after = checkpoint_seq.max(joined_seq);
                let slot = Slot::new(spec, instance_id, joined_seq, deliver_after, None);
                self.bots.insert(pid.clone(), slot);
                let pending = PendingStart {
                    new: false,
                    started_ms: Some(started_ms),
                    history: Vec::new(),
                    bot,
                    restored: context,
                    reply,
                };
                self.start_bot(&pid, pending, ctx);
            }
        }
    }
}

impl Handler<CountedFeed> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: CountedFeed, ctx: &mut Context<Self>) {
        let _span = self.span().entered();
        metrics().dequeued(Kind::Session);
        // `msg.work` is held to the end: every input and stop this feed gives counts first.
        match msg.feed {
            Feed::Joined(joined) => self.on_joined(joined, ctx),
            Feed::Events(msg) => {
                let started = std::time::Instant::now();
                self.on_events(&msg.participant_id, msg.events, ctx);
                metrics().handled(Kind::Session, started.elapsed());
            }
            Feed::Lost(msg) => {
                let reason = if msg.removed {
                    StopReason::RemovedByChatServer
                } else {
                    StopReason::ChatServerLost
                };
                self.stop(&msg.participant_id, reason, None, ctx);
            }
        }
    }
}

impl Handler<BotNotice> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: BotNotice, ctx: &mut Context<Self>) {
        let _span = self.span().entered();
        match msg {
            // Each notice's work is held to the end of this handler: the stop it causes (and the
            // `Removed` change) are counted before it is let go.
            BotNotice::WantsToLeave { participant_id, .. } => {
                self.stop(&participant_id, StopReason::BotLeft, None, ctx)
            }
            BotNotice::Failed { participant_id, .. } => {
                self.stop(&participant_id, StopReason::Error, None, ctx)
            }
            BotNotice::Finished {
                participant_id,
                report,
                ..
            } => {
                if let Some(slot) = self.bots.remove(&participant_id) {
                    // A node shutting down keeps its bots in the backup's copy: HA applies.
                    if report.end_reason != StopReason::Shutdown {
                        self.ha.tell(HaOp::Removed {
                            instance_id: slot.instance_id.clone(),
                        });
                    }
                    self.link.unfollow.do_send(Unfollow {
                        session_id: self.interaction_id.clone(),
                        participant_id,
                    });
                    self.finished.do_send(BotFinished {
                        key: slot.spec.key.clone(),
                        report: *report,
                    });
                    for w in slot.waiters {
                        let _ = w.send(());
                    }
                }
                self.maybe_end(ctx);
            }
        }
    }
}

impl Handler<StopInSession> for SessionActor {
    type Result = ResponseFuture<Result<String, EspError>>;

    fn handle(&mut self, msg: StopInSession, ctx: &mut Context<Self>) -> Self::Result {
        let Some(pid) = self.pid_of(&msg.key) else {
            let key = msg.key;
            return Box::pin(async move {
                Err(EspError::new(
                    ErrorCode::NoSuchInstance,
                    format!("no running bot {key}"),
                ))
            });
        };
        let instance_id = self
            .bots
            .get(&pid)
            .map(|s| s.instance_id.clone())
            .unwrap_or_default();
        let (tx, rx) = oneshot::channel();
        self.stop(&pid, msg.reason, Some(tx), ctx);
        Box::pin(async move {
            let _ = rx.await;
            Ok(instance_id)
        })
    }
}

impl Handler<DataInSession> for SessionActor {
    type Result = Result<String, EspError>;

    fn handle(&mut self, msg: DataInSession, _ctx: &mut Context<Self>) -> Self::Result {
        let found = self.pid_of(&msg.key).and_then(|pid| self.bots.get(&pid));
        let Some(slot) = found else {
            return Err(EspError::new(
                ErrorCode::NoSuchInstance,
                format!("no running bot {}", msg.key),
            ));
        };
        if slot.done.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EspError::new(
                ErrorCode::NoSuchInstance,
                format!("bot {} is stopping", msg.key),
            ));
        }
        let Some(addr) = &slot.addr else {
            return Err(EspError::new(
                ErrorCode::NoSuchInstance,
                format!("bot {} is still starting", msg.key),
            ));
        };
        match addr.try_send(Deliver::Data(msg.data, self.ha.work())) {
            Ok(()) => {
                metrics().queued(Kind::Bot);
                Ok(slot.instance_id.clone())
            }
            Err(SendError::Full(_)) => Err(EspError::new(
                ErrorCode::Busy,
                "the bot has too many inputs waiting",
            )),
            Err(SendError::Closed(_)) => Err(EspError::new(
                ErrorCode::NoSuchInstance,
                "the bot has stopped",
            )),
        }
    }
}

impl Handler<SessionControl> for SessionActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: SessionControl, ctx: &mut Context<Self>) -> Self::Result {
        match msg {
            SessionControl::StopAll(reason) => {
                let pids: Vec<String> = self.bots.keys().cloned().collect();
                let mut waits = Vec::new();
                for pid in pids {
                    let (tx, rx) = oneshot::channel();
                    self.stop(&pid, reason, Some(tx), ctx);
                    waits.push(rx);
                }
                return Box::pin(async move {
                    for w in waits {
                        let _ = w.await;
                    }
                });
            }
            SessionControl::Abandon => {
                // No Unfollow: the demotion deactivated the ChatLink, which forgot every route
                // (a late Unfollow could remove the route of a session restored after a quick
                // promotion).
                for (_, slot) in self.bots.drain() {
                    slot.done.store(true, std::sync::atomic::Ordering::SeqCst);
                    if let Some(addr) = slot.addr {
                        addr.do_send(BotControl::Abandon);
                    }
                }
                self.abandoned = true;
                ctx.stop();
            }
        }
        // A future of nothing: no allocation for the demotion's messages.
        Box::pin(async {})
    }
}

/// What the HA link carries for a bot.
fn replica_of(
    spec: &std::sync::Arc<BotSpec>,
    instance_id: &str,
    participant_id: &str,
    joined_seq: u64,
) -> ReplicatedBot {
    ReplicatedBot {
        instance_id: instance_id.to_string(),
        spec: spec.clone(),
        participant_id: participant_id.to_string(),
        joined_seq,
        started_ms: now_ms(),
        context: None,
        checkpoint_seq: joined_seq,
    }
}

/// The SessionActor alone, in process: a stand-in ChatLink that answers the join and feeds the
/// bot's events, and probes for what the session tells the Supervisor and the HA coordinator.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::bot::{BotContext, BotError, BotInput};
    use crate::chat_link::ParticipantEvents;
    use crate::messages::{InFlight, Replicate};
    use crate::testing::{event, FakeChat};
    use bgs_proto::chat::EventKind;
    use futures_util::future::BoxFuture;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    /// What the session tells its Supervisor and the HA coordinator.
    enum Told {
        Finished(Box<BotFinished>),
        Ended,
        Op(HaOp),
    }

    struct Probe(mpsc::UnboundedSender<Told>);

    impl Actor for Probe {
        type Context = Context<Self>;
    }

    impl Handler<BotFinished> for Probe {
        type Result = ();
        fn handle(&mut self, msg: BotFinished, _ctx: &mut Context<Self>) {
            let _ = self.0.send(Told::Finished(Box::new(msg)));
        }
    }

    impl Handler<SessionEnded> for Probe {
        type Result = ();
        fn handle(&mut self, _: SessionEnded, _ctx: &mut Context<Self>) {
            let _ = self.0.send(Told::Ended);
        }
    }

    impl Handler<Replicate> for Probe {
        type Result = ();
        fn handle(&mut self, msg: Replicate, _ctx: &mut Context<Self>) {
            let _ = self.0.send(Told::Op(msg.0));
        }
    }

    /// Says how many events of history it got, then `got: TEXT` to each customer message.
    struct TestBot;

    impl Bot for TestBot {
        fn handle<'a>(
            &'a mut self,
            ctx: &'a mut BotContext,
            input: BotInput,
        ) -> BoxFuture<'a, Result<(), BotError>> {
            Box::pin(async move {
                match input {
                    BotInput::Start(s) => ctx.say(format!("history: {}", s.history.len())),
                    BotInput::Event(e)
                        if e.kind == EventKind::Message
                            && e.participant_type == ParticipantType::Customer =>
                    {
                        ctx.say(format!("got: {}", e.text.unwrap_or_default()))
                    }
                    _ => {}
                }
                Ok(())
            })
        }
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    async fn next_post(
        rx: &mut mpsc::UnboundedReceiver<ChatRequest>,
    ) -> bgs_proto::chat::PostRequest {
        loop {
            if let ChatRequest::Post(p) = next(rx).await {
                return p;
            }
        }
    }

    /// A SessionActor of `chat-1` over the stand-in Chat Server, its Supervisor and HA
    /// coordinator a probe (`ha` makes its port of the probe): the session, then what the
    /// stand-in saw, the followers it was given, and what the probe was told.
    #[allow(clippy::type_complexity)]
    fn session_in_process(
        ha: impl FnOnce(Addr<Probe>) -> HaPort,
    ) -> (
        Addr<SessionActor>,
        mpsc::UnboundedReceiver<ChatRequest>,
        mpsc::UnboundedReceiver<crate::chat_link::Follower>,
        mpsc::UnboundedReceiver<Told>,
    ) {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (follower_tx, followers) = mpsc::unbounded_channel();
        let (told_tx, told) = mpsc::unbounded_channel();
        let fake = FakeChat {
            seen: seen_tx,
            follower: follower_tx,
        }
        .start();
        let probe = Probe(told_tx).start();
        let session = SessionActor::new(
            "chat-1".into(),
            ChatPort::new(
                fake.clone().recipient(),
                fake.clone().recipient(),
                fake.recipient(),
            ),
            probe.clone().recipient().into(),
            probe.clone().recipient().into(),
            ha(probe),
            Duration::from_secs(5),
        )
        .start();
        (session, seen, followers, told)
    }

    /// Holds each customer message until the test lets it go, then answers and saves.
    struct GatedBot {
        entered: mpsc::UnboundedSender<String>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Bot for GatedBot {
        fn handle<'a>(
            &'a mut self,
            ctx: &'a mut BotContext,
            input: BotInput,
        ) -> BoxFuture<'a, Result<(), BotError>> {
            Box::pin(async move {
                if let BotInput::Event(e) = input {
                    if e.kind == EventKind::Message
                        && e.participant_type == ParticipantType::Customer
                    {
                        let text = e.text.unwrap_or_default();
                        let _ = self.entered.send(text.clone());
                        self.gate.acquire().await.unwrap().forget();
                        ctx.say(format!("got: {text}"));
                        ctx.save_context(text.into_bytes());
                    }
                }
                Ok(())
            })
        }
    }

    /// What a switchover's drain waits for, through the real session and bot actors: a feed
    /// counts from the ChatLink's hand to the bot's last action, its post answered and its save
    /// sent to the HA coordinator.
    #[actix::test]
    async fn work_in_flight_lasts_until_the_bot_has_posted_and_saved() {
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let in_flight = InFlight::default();
        // Async mode: a save is sent, not waited for.
        let (session, mut seen, mut followers, mut told) = session_in_process(|probe| {
            HaPort::new(probe.recipient().into(), false, in_flight.clone())
        });
        let key = BotKey {
            interaction_id: "chat-1".into(),
            bot_id: "gated".into(),
            bot_name: String::new(),
        };
        session
            .send(StartInSession {
                spec: BotSpec::new(key, "Bot").into(),
                instance_id: "inst".into(),
                bot: Box::new(GatedBot {
                    entered: entered_tx,
                    gate: gate.clone(),
                }),
                restored: None,
            })
            .await
            .unwrap()
            .unwrap();
        let follower = next(&mut followers).await;
        // Started: nothing is in flight once the start has run.
        tokio::time::timeout(Duration::from_secs(5), in_flight.idle())
            .await
            .expect("idle after the start");

        // The ChatLink hands a customer message over, counted.
        follower.do_send(CountedFeed {
            feed: Feed::Events(ParticipantEvents {
                session_id: "chat-1".into(),
                participant_id: "bot-1".into(),
                events: vec![event(
                    4,
                    EventKind::Message,
                    "ann",
                    ParticipantType::Customer,
                    "hello",
                )],
            }),
            work: in_flight.enter(),
        });
        assert_eq!(next(&mut entered).await, "hello");
        assert!(in_flight.count() > 0, "the bot is handling it");
        let drained = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "a drain waits for the bot");

        gate.add_permits(1);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("the drain ends once the bot is done")
            .unwrap();
        // By then the post was made and the save sent, in that order.
        assert_eq!(next_post(&mut seen).await.text, "got: hello");
        loop {
            if let Told::Op(HaOp::Saved { context, .. }) = next(&mut told).await {
                assert_eq!(&context[..], b"hello");
                break;
            }
        }
    }

    #[actix::test]
    async fn a_bot_joins_gets_its_history_and_events_and_ends_when_the_customer_leaves() {
        let (session, mut seen, mut followers, mut told) =
            session_in_process(|probe| probe.recipient().into());
        let key = BotKey {
            interaction_id: "chat-1".into(),
            bot_id: "test".into(),
            bot_name: String::new(),
        };
        let spec = BotSpec {
            stop_on_customer_left: true,
            ..BotSpec::new(key, "Bot")
        };
        let started = session
            .send(StartInSession {
                spec: spec.into(),
                instance_id: "inst".into(),
                bot: Box::new(TestBot),
                restored: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(started.participant_id, "bot-1");
        assert!(matches!(next(&mut seen).await, ChatRequest::Join(_)));
        // The bot's start is replicated; its history is the two events before its join.
        match next(&mut told).await {
            Told::Op(HaOp::Started(b)) => assert_eq!(b.joined_seq, 3),
            _ => panic!("the start is replicated first"),
        }
        assert_eq!(next_post(&mut seen).await.text, "history: 2");

        // A live event after the join reaches the bot.
        let follower = next(&mut followers).await;
        follower.do_send(CountedFeed::from(Feed::Events(ParticipantEvents {
            session_id: "chat-1".into(),
            participant_id: "bot-1".into(),
            events: vec![event(
                4,
                EventKind::Message,
                "ann",
                ParticipantType::Customer,
                "hello",
            )],
        })));
        let post = next_post(&mut seen).await;
        assert_eq!(post.text, "got: hello");
        assert_eq!(post.key.as_deref(), Some("inst:4:0"));

        // The customer leaves with StopBotOnCustomerLeft: the bot leaves, is reported and removed.
        follower.do_send(CountedFeed::from(Feed::Events(ParticipantEvents {
            session_id: "chat-1".into(),
            participant_id: "bot-1".into(),
            events: vec![event(
                5,
                EventKind::Left,
                "ann",
                ParticipantType::Customer,
                "",
            )],
        })));
        loop {
            if let ChatRequest::Leave(l) = next(&mut seen).await {
                assert_eq!(l.participant_id, "bot-1");
                break;
            }
        }
        let mut finished = None;
        let mut removed = false;
        let mut ended = false;
        while finished.is_none() || !removed || !ended {
            match next(&mut told).await {
                Told::Finished(f) => finished = Some(f),
                Told::Op(HaOp::Removed { .. }) => removed = true,
                Told::Ended => ended = true,
                Told::Op(_) => {}
            }
        }
        let f = finished.unwrap();
        assert_eq!(f.report.end_reason, StopReason::CustomerLeft);
        assert_eq!(f.report.messages_received, 1);
        assert_eq!(f.report.messages_sent, 2);
    }
}
