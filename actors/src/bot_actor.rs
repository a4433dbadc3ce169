//! BotActor: one per bot instance. Calls the plugin one input at a time, in order, and carries
//! out what the bot asked for (posts with client keys, userdata, context saves) before it takes
//! the next input. A handler's error, panic or overrun stops the bot with reason `error`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::chat::{
    AfterAction, ChatEvent, ChatRequest, EventKind, LeaveRequest, PostKind, PostRequest,
    RichContent, UserdataChanges,
};
use bgs_proto::esp::{unstored, KeyValues};
use futures_util::FutureExt;

use crate::bot::{
    Bot, BotAction, BotContext, BotInput, BotPhase, BotStart, BotWaker, Handoff, StopReason,
};
use crate::chat_link::{ChatCall, ChatCallError, ChatCallLater, ChatPort};
use crate::delivery::{Cursor, InputLabel, PostKey, PostSlot};
use crate::esp::BotSpec;
use crate::messages::{HaPort, Work};
use crate::metrics::{metrics, Kind};
use crate::now_ms;
use crate::report::BotReport;
use bgs_proto::ha::HaOp;
use tracing::Instrument;

/// Most inputs waiting for one bot; beyond it the bot is stopped (it cannot keep up).
pub(crate) const BOT_MAILBOX: usize = 1024;

/// Everything a BotActor starts with.
pub struct BotSetup {
    /// Its session is the chat of `spec.key.interaction_id`.
    pub spec: Arc<BotSpec>,
    pub instance_id: String,
    pub participant_id: String,
    pub joined_seq: u64,
    pub bot: Box<dyn Bot>,
    pub history: Vec<ChatEvent>,
    pub restored: Option<Vec<u8>>,
    pub link: ChatPort,
    pub notices: Recipient<BotNotice>,
    pub ha: HaPort,
    pub handling_timeout: Duration,
    pub started_ms: u64,
    /// The last event already handled (its join, or for a restored bot its checkpoint).
    pub checkpoint: u64,
    /// Set by the session when the bot is being stopped or dropped, and by the bot when it halts:
    /// inputs still queued are then skipped at once, not handed to the plugin.
    pub done: Arc<std::sync::atomic::AtomicBool>,
    /// The start counted as work in flight, until the bot's first input is done.
    pub work: Work,
}

/// What a SessionActor tells its bot beside inputs: one control message, two ways to end.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) enum BotControl {
    /// Stop: runs the bot's stop handler, writes the waiting-mode outcome, leaves if the reason
    /// says so, then reports `BotNotice::Finished`; the stop counts as work in flight until
    /// then.
    Stop(StopReason, Work),
    /// Stop at once: no stop handler, no leave, no report (the bot goes on at the new primary).
    Abandon,
}

/// An input for the bot, counted as work in flight (`InFlight`) until the bot has done it.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Deliver {
    Event(ChatEvent, Work),
    Data(KeyValues, Work),
    /// The bot's [`BotWaker`] was called.
    Wake(Work),
}

/// What a bot tells its SessionActor.
#[derive(Message, Debug)]
#[rtype(result = "()")]
///
/// Each carries work in flight (`InFlight`): what the session does about it (a stop, the
/// `Removed` change) is done before a switchover's drain can end.
pub enum BotNotice {
    WantsToLeave {
        participant_id: String,
        work: Work,
    },
    Failed {
        participant_id: String,
        error: String,
        work: Work,
    },
    Finished {
        participant_id: String,
        report: Box<BotReport>,
        work: Work,
    },
}

pub struct BotActor {
    /// Its ids and the Chat Server link, made once and shared with each input's actions.
    outbox: Arc<Outbox>,
    /// Its session (weak: the session owns the bot and stops itself; a strong sender is about
    /// 100 bytes more a bot).
    notices: actix::WeakRecipient<BotNotice>,
    ha: HaPort,
    handling_timeout: Duration,
    /// Makes data labels of this incarnation unique (data is not replayed after a switchover).
    incarnation: u32,
    bot: Option<Box<dyn Bot>>,
    /// What its first input gives the plugin, with the start's work in flight (boxed: it is
    /// gone once the bot has started).
    start: Option<Box<(BotStart, Work)>>,
    joined_seq: u64,
    /// The last chat event handled: a replay overlap is dropped.
    cursor: Cursor,
    /// The checkpoint the backup has been told of (its start, a save or a completed turn).
    replicated_seq: u64,
    data_count: u64,
    sent: u64,
    received: u64,
    started_ms: u64,
    error: Option<String>,
    /// The hand-off the bot ended with.
    handoff: Option<Box<Handoff>>,
    wake_count: u64,
    /// Running, halted (failed or leaving: no more inputs), or stopping.
    phase: BotPhase,
    /// Shared with the session: set when either decides the bot takes no more inputs.
    done: Arc<std::sync::atomic::AtomicBool>,
}

/// Why an action of a bot was not carried out.
#[derive(Debug)]
enum ActionError {
    /// The Chat Server refused it: the bot's answer is lost, so the bot stops (reason error).
    Refused(String),
    /// It could not reach the Chat Server: the stop (if any) comes from elsewhere.
    Unavailable(String),
}

impl ActionError {
    fn context(self, what: &str) -> ActionError {
        match self {
            ActionError::Refused(e) => {
                ActionError::Refused(format!("the chat server refused {what}: {e}"))
            }
            ActionError::Unavailable(e) => {
                ActionError::Unavailable(format!("{what} could not be sent: {e}"))
            }
        }
    }
}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionError::Refused(e) | ActionError::Unavailable(e) => f.write_str(e),
        }
    }
}

#[derive(Default)]
struct Outcome {
    sent: u64,
    leave: bool,
    /// An action the Chat Server refused (the rest were not carried out).
    failed: Option<String>,
    /// An action that could not reach the Chat Server (this node is no longer the primary, or
    /// the Chat Server is gone): not the bot's fault, but nothing is saved past this input.
    unavailable: bool,
    saved: Option<Vec<u8>>,
    handoff: Option<Handoff>,
}

/// How long a stopping bot waits for its waiting-mode outcome to be written.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::bot_limits::MAX_POST;
use crate::bot_limits::{
    fit_post, limit_handoff, limits, Allowance, POSTS_CUT_NOTICE, STOPPED_NOTICE,
};
use crate::plugin_guard::{panic_message, plugin_call, PluginCode};
/// Largest context a bot may save (bytes); a larger save is refused and logged, and the last
/// accepted one stays (the HA link carries contexts in frames of at most 16 MiB).
pub(crate) const MAX_CONTEXT: usize = 1 << 20;

/// Runs one handler: returns the bot (unless it panicked or overran), its error, its actions.
async fn call(
    mut bot: Box<dyn Bot>,
    mut ctx: BotContext,
    input: BotInput,
    timeout: Duration,
) -> (Option<Box<dyn Bot>>, Option<String>, Vec<BotAction>) {
    let result = match plugin_call(|| bot.handle(&mut ctx, input)) {
        Ok(future) => {
            tokio::time::timeout(timeout, AssertUnwindSafe(PluginCode(future)).catch_unwind()).await
        }
        Err(panic) => return (None, Some(format!("bot panicked: {panic}")), Vec::new()),
    };
    let actions = ctx.take_actions();
    match result {
        Ok(Ok(Ok(()))) => (Some(bot), None, actions),
        Ok(Ok(Err(e))) => (Some(bot), Some(format!("bot error: {e}")), Vec::new()),
        Ok(Err(panic)) => (
            None,
            Some(format!("bot panicked: {}", panic_message(&*panic))),
            Vec::new(),
        ),
        Err(_) => (
            None,
            Some(format!(
                "bot handler took longer than {} ms",
                timeout.as_millis()
            )),
            Vec::new(),
        ),
    }
}

/// The range of events a bot was in: its join and the last event it has handled.
#[derive(Debug, Clone, Copy)]
struct Seen {
    joined_seq: u64,
    last_seq: u64,
}

impl Seen {
    /// What a hand-off writes as `ChatBotTranscript`: the Chat Server session and the range of
    /// its events the bot was in (`{session}:{joined seq}-{last seq}`).
    fn transcript(self, session_id: &str) -> String {
        format!("{session_id}:{}-{}", self.joined_seq, self.last_seq)
    }
}

/// Where a bot's posts and userdata go, and how their client keys are made.
struct Outbox {
    link: ChatPort,
    /// What the bot was started with; its interaction is the chat session it posts to.
    spec: Arc<BotSpec>,
    participant_id: String,
    instance_id: Arc<str>,
    /// The chat events it may still cause this minute (`[bots] max-events-per-minute`).
    allowance: std::sync::Mutex<Allowance>,
}

impl Outcome {
    fn fail(&mut self, e: ActionError) {
        match e {
            ActionError::Refused(m) => self.failed = Some(m),
            ActionError::Unavailable(m) => {
                tracing::info!(reason = %m, "bot action not carried out; its input will be replayed");
                self.unavailable = true;
            }
        }
    }
}

impl Outbox {
    /// The client key of one post made for the input `label`.
    fn key(&self, label: InputLabel, slot: PostSlot) -> String {
        PostKey {
            instance_id: &self.instance_id,
            label,
            slot,
        }
        .to_string()
    }

    async fn post(
        &self,
        kind: PostKind,
        text: String,
        rich: Option<RichContent>,
        visibility: bgs_proto::chat::Visibility,
        key: String,
    ) -> Result<(), ActionError> {
        let request = ChatRequest::Post(PostRequest {
            session_id: self.spec.key.interaction_id.clone(),
            participant_id: self.participant_id.clone(),
            kind,
            text,
            visibility,
            key: Some(key),
            rich,
        });
        let kind_label = match kind {
            PostKind::Message => "message",
            PostKind::Notice => "notice",
            PostKind::Typing => "typing",
        };
        metrics().chat_events.inc(["out", kind_label]);
        self.call(request).await.map_err(|e| e.context("a post"))
    }

    async fn userdata(&self, changes: UserdataChanges) -> Result<(), ActionError> {
        let request = ChatRequest::UpdateUserdata {
            session_id: self.spec.key.interaction_id.clone(),
            participant_id: self.participant_id.clone(),
            changes,
        };
        self.call(request)
            .await
            .map_err(|e| e.context("a userdata change"))
    }

    /// A userdata change as the system (the bot is no longer a participant).
    async fn system_userdata(&self, changes: UserdataChanges) -> Result<(), ActionError> {
        let request = ChatRequest::UpdateUserdata {
            session_id: self.spec.key.interaction_id.clone(),
            participant_id: String::new(),
            changes,
        };
        self.call(request)
            .await
            .map_err(|e| e.context("a userdata change"))
    }

    /// A userdata change as the system, sent whenever the Chat Server can be reached again.
    fn system_userdata_later(&self, changes: UserdataChanges) {
        self.link
            .later
            .do_send(ChatCallLater(ChatRequest::UpdateUserdata {
                session_id: self.spec.key.interaction_id.clone(),
                participant_id: String::new(),
                changes,
            }));
    }

    async fn leave(&self) {
        let request = ChatRequest::Leave(LeaveRequest {
            session_id: self.spec.key.interaction_id.clone(),
            participant_id: self.participant_id.clone(),
            after_action: AfterAction::KeepAlive,
        });
        if let Err(e) = self.call(request).await {
            tracing::warn!(error = %e, "bot leave not accepted");
        }
    }

    async fn call(&self, request: ChatRequest) -> Result<(), ActionError> {
        match self
            .link
            .call
            .send(ChatCall {
                request,
                follow: None,
            })
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(ChatCallError::Refused(e))) => Err(ActionError::Refused(e.to_string())),
            Ok(Err(e)) => Err(ActionError::Unavailable(e.to_string())),
            Err(e) => Err(ActionError::Unavailable(e.to_string())),
        }
    }

    /// Takes one chat event from the bot's allowance; false when it has caused too many.
    fn allow(&self) -> bool {
        let per_minute = limits().events_per_minute;
        self.allowance
            .lock()
            .map(|mut a| {
                a.take(
                    per_minute,
                    crate::bot_limits::clock(std::time::Instant::now()),
                )
            })
            .unwrap_or(true)
    }

    /// Carries out a handler's actions in order. `label` makes the client keys: the same input
    /// replayed after a reconnect or a switchover produces the same keys, so nothing posts twice.
    /// `seen` gives the reference a hand-off writes (`ChatBotTranscript`). Every kind of bot is
    /// held to the same limits (`bot_limits`): a post too long is split or cut, too many buttons
    /// trimmed, posts past `posts_per_input` left out with one notice, and a bot past
    /// `events_per_minute` stopped with a notice and a hand-off.
    async fn execute(&self, actions: Vec<BotAction>, label: InputLabel, seen: Seen) -> Outcome {
        let mut outcome = Outcome::default();
        let limits = limits();
        let mut posts = 0usize;
        let mut left_out = 0usize;
        let mut over_rate = false;
        'actions: for (index, action) in actions.into_iter().enumerate() {
            match action {
                BotAction::Post {
                    kind,
                    text,
                    visibility,
                    rich,
                } => {
                    if kind != PostKind::Typing {
                        posts += 1;
                        if posts > limits.posts_per_input {
                            left_out += 1;
                            continue;
                        }
                    }
                    let (parts, fitted) = fit_post(text, rich, MAX_POST);
                    note_fitted(fitted);
                    for (part, (text, rich)) in parts.into_iter().enumerate() {
                        if !self.allow() {
                            over_rate = true;
                            break 'actions;
                        }
                        let key = self.key(label, PostSlot::Action { index, part });
                        if kind == PostKind::Message {
                            outcome.sent += 1;
                        }
                        if let Err(e) = self.post(kind, text, rich, visibility, key).await {
                            outcome.fail(e);
                            break 'actions;
                        }
                    }
                }
                BotAction::Userdata(changes) => {
                    if !self.allow() {
                        over_rate = true;
                        break;
                    }
                    if let Err(e) = self.userdata(changes).await {
                        outcome.fail(e);
                        break;
                    }
                }
                BotAction::Leave => outcome.leave = true,
                BotAction::SaveContext(bytes) if bytes.len() > MAX_CONTEXT => {
                    tracing::warn!(
                        bytes = bytes.len(),
                        max = MAX_CONTEXT,
                        "bot context too large; not saved"
                    );
                }
                BotAction::SaveContext(bytes) => outcome.saved = Some(bytes),
                BotAction::Handoff(handoff) => {
                    let transcript = seen.transcript(&self.spec.key.interaction_id);
                    if let Err(e) = self.userdata(handoff_userdata(&handoff, &transcript)).await {
                        outcome.fail(e);
                        break;
                    }
                    outcome.handoff = Some(handoff);
                    outcome.leave = true;
                }
            }
        }
        if outcome.failed.is_some() || outcome.unavailable {
            return outcome;
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                max = limits.posts_per_input,
                "bot posted more than its limit for one input; the rest were not shown"
            );
            metrics()
                .bot_limits
                .add(["posts_per_input"], left_out as u64);
            let key = self.key(label, PostSlot::Cut);
            let visibility = self.spec.visibility;
            if let Err(e) = self
                .post(
                    PostKind::Notice,
                    POSTS_CUT_NOTICE.into(),
                    None,
                    visibility,
                    key,
                )
                .await
            {
                outcome.fail(e);
                return outcome;
            }
        }
        if over_rate && outcome.handoff.is_none() {
            let handoff = limit_handoff(format!(
                "the bot caused more than {} chat events in a minute",
                limits.events_per_minute
            ));
            let key = self.key(label, PostSlot::Limit);
            let visibility = self.spec.visibility;
            let notice = self
                .post(
                    PostKind::Notice,
                    STOPPED_NOTICE.into(),
                    None,
                    visibility,
                    key,
                )
                .await;
            let transcript = seen.transcript(&self.spec.key.interaction_id);
            let written = self.userdata(handoff_userdata(&handoff, &transcript)).await;
            if let Err(e) = notice.and(written) {
                outcome.fail(e);
                return outcome;
            }
            outcome.handoff = Some(handoff);
            outcome.leave = true;
        }
        outcome
    }
}

/// Logs and counts what fitting a post to the chat changed.
fn note_fitted(fitted: crate::bot_limits::Fitted) {
    if fitted.cut {
        tracing::warn!(
            max = MAX_POST,
            parts = crate::bot_limits::MAX_PARTS,
            "bot post too long; split and cut, with a marker"
        );
        metrics().bot_limits.inc(["text_cut"]);
    } else if fitted.split {
        tracing::info!(max = MAX_POST, "bot post too long; split into parts");
        metrics().bot_limits.inc(["text_split"]);
    }
    if fitted.rich_trimmed {
        tracing::warn!(
            max_items = bgs_proto::chat::MAX_RICH_ITEMS,
            "bot post has too many buttons or cards; the first kept, the text lists every choice"
        );
        metrics().bot_limits.inc(["rich_items"]);
    }
}

/// The userdata a hand-off writes: the bot's own keys, then `ChatBotHandoff`,
/// `ChatBotHandoffReason`, `ChatBotHandoffSummary` and `ChatBotTranscript`.
pub fn handoff_userdata(handoff: &Handoff, transcript: &str) -> UserdataChanges {
    let mut changes: UserdataChanges = handoff
        .userdata
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    changes.insert("ChatBotHandoff".into(), Some("true".into()));
    let reason = if handoff.reason.is_empty() {
        "requested"
    } else {
        &handoff.reason
    };
    changes.insert("ChatBotHandoffReason".into(), Some(reason.into()));
    if !handoff.summary.is_empty() {
        changes.insert(
            "ChatBotHandoffSummary".into(),
            Some(handoff.summary.clone()),
        );
    }
    changes.insert("ChatBotTranscript".into(), Some(transcript.into()));
    changes
}

impl BotActor {
    /// The chat session the bot is in (its interaction).
    fn session_id(&self) -> &str {
        &self.outbox.spec.key.interaction_id
    }

    pub fn new(setup: BotSetup) -> Self {
        let start = BotStart {
            parameters: unstored(&setup.spec.parameters),
            userdata: unstored(&setup.spec.userdata),
            history: setup.history,
            restored: setup.restored,
            waker: BotWaker::none(),
        };
        BotActor {
            outbox: Arc::new(Outbox {
                spec: setup.spec,
                instance_id: setup.instance_id.into(),
                participant_id: setup.participant_id,
                link: setup.link,
                allowance: Default::default(),
            }),
            notices: setup.notices.downgrade(),
            ha: setup.ha,
            incarnation: uuid::Uuid::new_v4().as_u128() as u32,
            handling_timeout: setup.handling_timeout,
            bot: Some(setup.bot),
            start: Some(Box::new((start, setup.work))),
            joined_seq: setup.joined_seq,
            cursor: Cursor::at(setup.checkpoint.max(setup.joined_seq)),
            replicated_seq: setup.checkpoint.max(setup.joined_seq),
            data_count: 0,
            sent: 0,
            received: 0,
            started_ms: setup.started_ms,
            error: None,
            handoff: None,
            wake_count: 0,
            phase: BotPhase::Running,
            done: setup.done.clone(),
        }
    }

    /// The span of everything this bot does: interaction, session and bot in every log line.
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "bot",
            interaction_id = %self.outbox.spec.key.interaction_id,
            session_id = %self.session_id(),
            bot_id = %self.outbox.spec.key.bot_id,
            bot_instance = %self.outbox.instance_id
        )
    }

    fn context(&self, label: InputLabel) -> BotContext {
        BotContext::for_input(
            self.outbox.spec.clone(),
            self.outbox.instance_id.clone(),
            label,
        )
    }

    /// The events the bot was in, for what a hand-off writes as `ChatBotTranscript`.
    fn seen(&self) -> Seen {
        Seen {
            joined_seq: self.joined_seq,
            last_seq: self.cursor.seq(),
        }
    }

    fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Runs one input exclusively: the next input waits until this one's actions are done.
    /// The input's `work` is held until then.
    fn run(&mut self, input: BotInput, label: InputLabel, work: Work, ctx: &mut Context<Self>) {
        let Some(bot) = self.bot.take() else { return };
        let bctx = self.context(label);
        let seen = self.seen();
        let timeout = self.handling_timeout;
        let outbox = self.outbox();
        let covered = self.cursor.seq();
        let advanced = covered > self.replicated_seq;
        // The bot's own post coming back: if the bot does nothing with it, a replay would do
        // nothing either (no connector sends it on), so it needs no checkpoint of its own.
        let own =
            matches!(&input, BotInput::Event(e) if e.participant_id == self.outbox.participant_id);
        let ha = self.ha.clone();
        let instance_id = self.outbox.instance_id.to_string();
        let started = std::time::Instant::now();
        let span = self.span();
        let fut = async move {
            let (bot, error, actions) = call(bot, bctx, input, timeout).await;
            let quiet = own && actions.is_empty();
            let mut outcome = outbox.execute(actions, label, seen).await;
            // Posts first, then the save: a failover before the save replays the input, and the
            // replayed posts carry the same client keys.
            // A completed turn moves the checkpoint even when the bot saved nothing: a
            // take-over gives the bot only the input in flight, never the ones it has handled
            // (an external bot keeps its own state; a replay would run its dialog again).
            let error = error.or_else(|| outcome.failed.clone());
            // The saved bytes move into the op, shared from here to the frame (no copy).
            let op = match (outcome.saved.take(), &error, outcome.unavailable) {
                (Some(bytes), None, false) => Some(HaOp::Saved {
                    instance_id,
                    context: bytes.into(),
                    checkpoint_seq: covered,
                }),
                (None, None, false) if advanced && !quiet => Some(HaOp::Checkpoint {
                    instance_id,
                    checkpoint_seq: covered,
                }),
                _ => None,
            };
            let replicated = op.is_some();
            if let Some(op) = op {
                ha.replicate(op).await;
            }
            (bot, error, outcome, replicated)
        }
        .instrument(span);
        ctx.wait(
            fut.into_actor(self)
                .map(move |(bot, error, outcome, replicated), act, _ctx| {
                    // Dropped last: the notices below carry work of their own first.
                    let _work = work;
                    metrics().handled(Kind::Bot, started.elapsed());
                    if replicated {
                        act.replicated_seq = act.replicated_seq.max(covered);
                    }
                    act.bot = bot;
                    act.sent += outcome.sent;
                    if outcome.handoff.is_some() {
                        act.handoff = outcome.handoff.map(Box::new);
                    }
                    if let Some(error) = error {
                        tracing::warn!(bot_instance = %act.outbox.instance_id, %error, "bot failed");
                        act.halt();
                        metrics().failed(Kind::Bot);
                        act.error = Some(error.clone());
                        act.notify(BotNotice::Failed {
                            participant_id: act.outbox.participant_id.clone(),
                            error,
                            work: act.ha.work(),
                        });
                    } else if outcome.leave {
                        act.halt();
                        act.notify(BotNotice::WantsToLeave {
                            participant_id: act.outbox.participant_id.clone(),
                            work: act.ha.work(),
                        });
                    }
                }),
        );
    }

    /// Tells the session (nothing to tell once it has stopped).
    fn notify(&self, notice: BotNotice) {
        if let Some(session) = self.notices.upgrade() {
            session.do_send(notice);
        }
    }

    fn report(&self, reason: StopReason, ended_ms: u64) -> BotReport {
        let spec = &self.outbox.spec;
        BotReport {
            instance_id: self.outbox.instance_id.to_string(),
            interaction_id: spec.key.interaction_id.clone(),
            bot_id: spec.key.bot_id.clone(),
            bot_name: spec.key.bot_name.clone(),
            category: spec.category.clone(),
            function: spec.function.clone(),
            nickname: spec.nickname.clone(),
            visibility: spec.visibility,
            holdup: spec.holdup,
            started_ms: self.started_ms,
            ended_ms,
            duration_ms: ended_ms.saturating_sub(self.started_ms),
            messages_sent: self.sent,
            messages_received: self.received,
            ended_by: reason.ended_by(),
            end_reason: reason,
            abnormal: reason.is_abnormal(),
            error: self
                .error
                .clone()
                .or_else(|| self.handoff.as_ref().and_then(|h| h.error.clone())),
            handoff: self.handoff.as_deref().cloned(),
        }
    }
}

impl Actor for BotActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.gone();
    }

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::Bot);
        ctx.set_mailbox_capacity(BOT_MAILBOX);
        if let Some(starting) = self.start.take() {
            let (mut start, work) = *starting;
            let me = ctx.address().downgrade();
            let in_flight = self.ha.in_flight().clone();
            start.waker = BotWaker::new(move || {
                if let Some(addr) = me.upgrade() {
                    if addr.try_send(Deliver::Wake(in_flight.enter())).is_ok() {
                        metrics().queued(Kind::Bot);
                    }
                }
            });
            let label = InputLabel::Start {
                joined_seq: self.joined_seq,
            };
            self.run(BotInput::Start(start), label, work, ctx);
        }
    }
}

impl BotActor {
    /// The bot failed or asked to leave: no more inputs, including those already queued.
    fn halt(&mut self) {
        if self.phase == BotPhase::Running {
            self.phase = BotPhase::Halted;
        }
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn gone(&self) {
        metrics().actor_stopped(Kind::Bot);
    }
}

impl Handler<Deliver> for BotActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        metrics().dequeued(Kind::Bot);
        let done = self.done.load(std::sync::atomic::Ordering::SeqCst);
        if done || !self.phase.takes_inputs() || self.bot.is_none() {
            return;
        }
        match msg {
            Deliver::Event(event, work) => {
                if !self.cursor.take(event.seq) {
                    return; // already handled (a replay overlap)
                }
                if event.kind == EventKind::Message
                    && event.participant_id != self.outbox.participant_id
                {
                    self.received += 1;
                }
                let label = InputLabel::Event { seq: event.seq };
                self.run(BotInput::Event(event), label, work, ctx);
            }
            Deliver::Data(data, work) => {
                self.data_count += 1;
                let label = InputLabel::Data {
                    after: self.cursor.seq(),
                    incarnation: self.incarnation,
                    n: self.data_count,
                };
                self.run(BotInput::Data(data), label, work, ctx);
            }
            Deliver::Wake(work) => {
                self.wake_count += 1;
                let label = InputLabel::Wake {
                    after: self.cursor.seq(),
                    incarnation: self.incarnation,
                    n: self.wake_count,
                };
                self.run(BotInput::Wake, label, work, ctx);
            }
        }
    }
}

impl Handler<BotControl> for BotActor {
    type Result = ();

    fn handle(&mut self, msg: BotControl, ctx: &mut Context<Self>) {
        match msg {
            BotControl::Stop(reason, work) => self.stop(reason, work, ctx),
            BotControl::Abandon => {
                self.phase = BotPhase::Stopping(None);
                ctx.stop();
            }
        }
    }
}

impl BotActor {
    /// Runs the stop handler, the waiting-mode outcome and the leave, then reports.
    /// The stop's `work` is held until then.
    fn stop(&mut self, reason: StopReason, work: Work, ctx: &mut Context<Self>) {
        if self.phase.is_stopping() {
            return;
        }
        self.phase = BotPhase::Stopping(Some(reason));
        let bot = self.bot.take();
        let bctx = self.context(InputLabel::Stop);
        let seen = self.seen();
        let timeout = self.handling_timeout;
        let outbox = self.outbox();
        let holdup = self.outbox.spec.holdup;
        let instance_id = self.outbox.instance_id.clone();
        let span = self.span();
        let fut = async move {
            let mut error = None;
            let mut sent = 0;
            if let Some(bot) = bot {
                let (_, e, actions) = call(bot, bctx, BotInput::Stop(reason), timeout).await;
                error = e;
                // Posting needs the bot still in the chat: only when the gateway removes it.
                if reason.sends_leave() {
                    sent = outbox.execute(actions, InputLabel::Stop, seen).await.sent;
                }
            }
            let ended_ms = now_ms();
            // Waiting mode: the workflow learns why and when the bot finished, on every end
            // path. While the bot is still in the chat it writes as itself; otherwise (removed,
            // session closed, shutdown) the gateway writes as the system. After a lost Chat
            // Server the write waits in the chat link until the Chat Server is back.
            if holdup {
                let changes: UserdataChanges = [
                    (
                        "ChatBotResult".to_string(),
                        Some(reason.as_str().to_string()),
                    ),
                    ("ChatBotEndedAt".to_string(), Some(ended_ms.to_string())),
                    ("ChatBotInstanceId".to_string(), Some(instance_id.to_string())),
                ]
                .into();
                let write = async {
                    if reason == StopReason::ChatServerLost {
                        // Sent when the link is back (it keeps trying), not waited for.
                        outbox.system_userdata_later(changes);
                        Ok(())
                    } else if reason.sends_leave() {
                        outbox.userdata(changes).await
                    } else {
                        outbox.system_userdata(changes).await
                    }
                };
                match tokio::time::timeout(OUTCOME_TIMEOUT, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the waiting-mode outcome was not written")
                    }
                    Err(_) => tracing::warn!(
                        "the waiting-mode outcome was not written: the chat server did not answer in time"
                    ),
                }
            }
            if reason.sends_leave() {
                outbox.leave().await;
            }
            (error, sent, ended_ms)
        }
        .instrument(span);
        ctx.wait(
            fut.into_actor(self)
                .map(move |(error, sent, ended_ms), act, ctx| {
                    let _work = work;
                    act.sent += sent;
                    if act.error.is_none() {
                        act.error = error;
                    }
                    let report = act.report(reason, ended_ms);
                    act.notify(BotNotice::Finished {
                        participant_id: act.outbox.participant_id.clone(),
                        report: Box::new(report),
                        work: act.ha.work(),
                    });
                    ctx.stop();
                }),
        );
    }
}

/// The BotActor alone, in process: a stand-in Chat Server link and probes for what the bot tells
/// its session and the HA coordinator.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::bot::{BotError, Handoff};
    use crate::esp::BotKey;
    use crate::messages::Replicate;
    use bgs_proto::chat::{ChatResponse, ParticipantType};
    use futures_util::future::BoxFuture;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    /// Answers every request at once and reports it.
    struct FakeChat(mpsc::UnboundedSender<ChatRequest>);

    impl Actor for FakeChat {
        type Context = Context<Self>;
    }

    impl Handler<ChatCall> for FakeChat {
        type Result = Result<bgs_proto::chat::ChatResponse, ChatCallError>;

        fn handle(&mut self, msg: ChatCall, _ctx: &mut Context<Self>) -> Self::Result {
            let answer = match &msg.request {
                ChatRequest::Post(_) => ChatResponse::Posted {
                    seq: 100,
                    duplicate: false,
                },
                ChatRequest::Leave(_) => ChatResponse::Left { seq: 101 },
                _ => ChatResponse::Userdata(Default::default()),
            };
            let _ = self.0.send(msg.request);
            Ok(answer)
        }
    }

    impl Handler<ChatCallLater> for FakeChat {
        type Result = ();

        fn handle(&mut self, msg: ChatCallLater, _ctx: &mut Context<Self>) {
            let _ = self.0.send(msg.0);
        }
    }

    impl Handler<crate::chat_link::Unfollow> for FakeChat {
        type Result = ();

        fn handle(&mut self, _: crate::chat_link::Unfollow, _ctx: &mut Context<Self>) {}
    }

    /// Forwards what it gets into a channel.
    struct Probe<M: Send>(mpsc::UnboundedSender<M>);

    impl<M: Send + 'static> Actor for Probe<M> {
        type Context = Context<Self>;
    }

    impl Handler<BotNotice> for Probe<BotNotice> {
        type Result = ();
        fn handle(&mut self, msg: BotNotice, _ctx: &mut Context<Self>) {
            let _ = self.0.send(msg);
        }
    }

    impl Handler<Replicate> for Probe<HaOp> {
        type Result = ();
        fn handle(&mut self, msg: Replicate, _ctx: &mut Context<Self>) {
            let _ = self.0.send(msg.0);
        }
    }

    /// Answers `got: TEXT` and saves how many it answered; `handoff` hands off, `boom` fails.
    struct TestBot {
        count: u32,
    }

    impl Bot for TestBot {
        fn handle<'a>(
            &'a mut self,
            ctx: &'a mut BotContext,
            input: BotInput,
        ) -> BoxFuture<'a, Result<(), BotError>> {
            Box::pin(async move {
                if let BotInput::Event(e) = input {
                    if e.participant_type != ParticipantType::Customer {
                        return Ok(());
                    }
                    match e.text.as_deref().unwrap_or_default() {
                        "boom" => return Err(BotError::new("asked to fail")),
                        "handoff" => ctx.handoff(Handoff {
                            reason: "requested".into(),
                            summary: "wants a person".into(),
                            ..Handoff::default()
                        }),
                        text => {
                            self.count += 1;
                            ctx.say(format!("got: {text}"));
                            ctx.save_context(self.count.to_string().into_bytes());
                        }
                    }
                }
                Ok(())
            })
        }
    }

    fn message(seq: u64, text: &str) -> ChatEvent {
        ChatEvent {
            nickname: "Ann".into(),
            text: Some(text.into()),
            ..ChatEvent::new(
                seq,
                EventKind::Message,
                "customer",
                ParticipantType::Customer,
            )
        }
    }

    struct Harness {
        bot: Addr<BotActor>,
        /// The session's stand-in (the bot holds it weakly).
        _session: Addr<Probe<BotNotice>>,
        chat: mpsc::UnboundedReceiver<ChatRequest>,
        notices: mpsc::UnboundedReceiver<BotNotice>,
        ops: mpsc::UnboundedReceiver<HaOp>,
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    fn start(holdup: bool) -> Harness {
        let (chat_tx, chat) = mpsc::unbounded_channel();
        let (notice_tx, notices) = mpsc::unbounded_channel();
        let (op_tx, ops) = mpsc::unbounded_channel();
        let fake = FakeChat(chat_tx).start();
        let session = Probe(notice_tx).start();
        let key = BotKey {
            interaction_id: "s".into(),
            bot_id: "test".into(),
            bot_name: String::new(),
        };
        let spec = BotSpec {
            holdup,
            ..BotSpec::new(key, "Bot")
        };
        let bot = BotActor::new(BotSetup {
            spec: spec.into(),
            instance_id: "inst".into(),
            participant_id: "bot".into(),
            joined_seq: 5,
            bot: Box::new(TestBot { count: 0 }),
            history: Vec::new(),
            restored: None,
            link: ChatPort::new(
                fake.clone().recipient(),
                fake.clone().recipient(),
                fake.recipient(),
            ),
            notices: session.clone().recipient(),
            ha: Probe(op_tx).start().recipient().into(),
            handling_timeout: Duration::from_secs(5),
            started_ms: 0,
            checkpoint: 5,
            done: Arc::new(AtomicBool::new(false)),
            work: Work::uncounted(),
        })
        .start();
        Harness {
            bot,
            _session: session,
            chat,
            notices,
            ops,
        }
    }

    #[actix::test]
    async fn posts_carry_keys_saves_follow_posts_and_a_replay_is_not_handled_twice() {
        let mut h = start(false);
        h.bot
            .do_send(Deliver::Event(message(6, "hi"), Work::uncounted()));
        let ChatRequest::Post(post) = next(&mut h.chat).await else {
            panic!("a post first")
        };
        assert_eq!(post.text, "got: hi");
        assert_eq!(post.key.as_deref(), Some("inst:6:0"));
        // The save is replicated after the post, covering the event handled.
        match next(&mut h.ops).await {
            HaOp::Saved {
                context,
                checkpoint_seq,
                ..
            } => assert_eq!((&context[..], checkpoint_seq), (&b"1"[..], 6)),
            other => panic!("{other:?}"),
        }
        // The same event again (a replay overlap) is not handled; the next one is.
        h.bot
            .do_send(Deliver::Event(message(6, "hi"), Work::uncounted()));
        h.bot
            .do_send(Deliver::Event(message(7, "again"), Work::uncounted()));
        let ChatRequest::Post(post) = next(&mut h.chat).await else {
            panic!("a post")
        };
        assert_eq!(post.text, "got: again");
        assert_eq!(post.key.as_deref(), Some("inst:7:0"));
    }

    #[actix::test]
    async fn a_turn_that_saves_nothing_still_moves_the_checkpoint() {
        let mut h = start(false);
        // Its own post coming back, handled with nothing done: no checkpoint of its own.
        let mut own = message(6, "got: earlier");
        own.participant_id = "bot".into();
        own.participant_type = ParticipantType::Agent;
        h.bot.do_send(Deliver::Event(own, Work::uncounted()));
        // An agent's message: the bot posts nothing and saves nothing, but it has handled it
        // (the checkpoint covers the bot's own post before it too).
        let mut agent = message(7, "hello");
        agent.participant_type = ParticipantType::Agent;
        h.bot.do_send(Deliver::Event(agent, Work::uncounted()));
        match next(&mut h.ops).await {
            HaOp::Checkpoint { checkpoint_seq, .. } => assert_eq!(checkpoint_seq, 7),
            other => panic!("{other:?}"),
        }
        // A turn that saves carries the checkpoint in its save; a failed turn moves nothing.
        h.bot
            .do_send(Deliver::Event(message(8, "hi"), Work::uncounted()));
        let _ = next(&mut h.chat).await;
        match next(&mut h.ops).await {
            HaOp::Saved { checkpoint_seq, .. } => assert_eq!(checkpoint_seq, 8),
            other => panic!("{other:?}"),
        }
        h.bot
            .do_send(Deliver::Event(message(9, "boom"), Work::uncounted()));
        assert!(matches!(
            next(&mut h.notices).await,
            BotNotice::Failed { .. }
        ));
        assert!(
            h.ops.try_recv().is_err(),
            "a failed turn is not checkpointed"
        );
    }

    #[actix::test]
    async fn a_handoff_writes_userdata_then_asks_to_leave_and_is_reported() {
        let mut h = start(true);
        h.bot
            .do_send(Deliver::Event(message(6, "handoff"), Work::uncounted()));
        let ChatRequest::UpdateUserdata { changes, .. } = next(&mut h.chat).await else {
            panic!("userdata first")
        };
        assert_eq!(changes["ChatBotHandoff"].as_deref(), Some("true"));
        assert_eq!(
            changes["ChatBotHandoffReason"].as_deref(),
            Some("requested")
        );
        assert_eq!(changes["ChatBotTranscript"].as_deref(), Some("s:5-6"));
        assert!(matches!(
            next(&mut h.notices).await,
            BotNotice::WantsToLeave { .. }
        ));
        // The session then stops it: waiting-mode outcome, leave, report with the hand-off.
        h.bot
            .do_send(BotControl::Stop(StopReason::BotLeft, Work::uncounted()));
        let ChatRequest::UpdateUserdata { changes, .. } = next(&mut h.chat).await else {
            panic!("the outcome")
        };
        assert_eq!(changes["ChatBotResult"].as_deref(), Some("bot_left"));
        assert!(matches!(next(&mut h.chat).await, ChatRequest::Leave(_)));
        match next(&mut h.notices).await {
            BotNotice::Finished { report, .. } => {
                assert_eq!(report.end_reason, StopReason::BotLeft);
                assert_eq!(report.handoff.unwrap().summary, "wants a person");
            }
            other => panic!("{other:?}"),
        }
    }

    #[actix::test]
    async fn a_failing_handler_posts_nothing_and_the_bot_is_reported_failed() {
        let mut h = start(false);
        h.bot
            .do_send(Deliver::Event(message(6, "boom"), Work::uncounted()));
        match next(&mut h.notices).await {
            BotNotice::Failed { error, .. } => {
                assert_eq!(error, "bot error: asked to fail")
            }
            other => panic!("{other:?}"),
        }
        // Halted: later inputs are skipped.
        h.bot
            .do_send(Deliver::Event(message(7, "hi"), Work::uncounted()));
        h.bot
            .do_send(BotControl::Stop(StopReason::Error, Work::uncounted()));
        assert!(matches!(next(&mut h.chat).await, ChatRequest::Leave(_)));
        match next(&mut h.notices).await {
            BotNotice::Finished { report, .. } => {
                assert_eq!(report.end_reason, StopReason::Error);
                assert_eq!(report.error.as_deref(), Some("bot error: asked to fail"));
                assert_eq!(report.messages_sent, 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(h.ops.try_recv().is_err(), "nothing saved");
    }
}
