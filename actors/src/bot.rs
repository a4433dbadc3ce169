//! The bot API: what a plugin implements and what a bot can do. docs/PLUGINS.md is the guide.
//!
//! A plugin is a [`BotFactory`] with a fixed bot id (the `ChatBotID` of StartBot). It creates one
//! [`Bot`] per StartBot. The gateway calls the bot's [`Bot::handle`] with one [`BotInput`] at a
//! time, in order: `Start`, then the chat events it may see and the data sent by ESP, then `Stop`.
//! While handling, the bot acts through its [`BotContext`]: post, notice, typing, userdata, leave,
//! save its context. The gateway carries the actions out when the handler returns, in order.
//!
//! A handler may do async work (call a web service); it may not take longer than the configured
//! handling time. A handler that returns an error, panics or overruns stops the bot with reason
//! `error`; the node and the session go on.

use std::fmt;
use std::sync::Arc;

use bgs_proto::bot::BotSpec;
use bgs_proto::chat::{ChatEvent, RichContent, UserdataChanges, Visibility};
use bgs_proto::esp::KeyValues;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::delivery::InputLabel;

/// Why a bot stopped. The string forms are stable: reports, GetBotStatus and metrics use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// StopBot received.
    StopRequested,
    /// Every participant but bots, system and external users has left.
    ParticipantsLeft,
    /// The bot asked to leave.
    BotLeft,
    /// An agent joined after the bot, and StopBotOnAgentArrival was true.
    AgentArrived,
    /// The customer left after the bot joined, and StopBotOnCustomerLeft was true.
    CustomerLeft,
    /// The Chat Server removed the bot (for example after a detach grace period).
    RemovedByChatServer,
    /// The chat session closed (a force-close, no agents left, idle control...).
    SessionClosed,
    /// The gateway lost its Chat Server connection and could not get it back.
    ChatServerLost,
    /// The gateway shut down.
    Shutdown,
    /// The bot failed: an error, a panic, a handler that overran, or a backlog it could not keep up with.
    Error,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopRequested => "stop_requested",
            StopReason::ParticipantsLeft => "participants_left",
            StopReason::BotLeft => "bot_left",
            StopReason::AgentArrived => "agent_arrived",
            StopReason::CustomerLeft => "customer_left",
            StopReason::RemovedByChatServer => "removed_by_chat_server",
            StopReason::SessionClosed => "session_closed",
            StopReason::ChatServerLost => "chat_server_lost",
            StopReason::Shutdown => "shutdown",
            StopReason::Error => "error",
        }
    }

    /// Whether the gateway sends a leave (keep-alive) for the bot when it stops for this reason.
    pub fn sends_leave(self) -> bool {
        matches!(
            self,
            StopReason::StopRequested
                | StopReason::ParticipantsLeft
                | StopReason::BotLeft
                | StopReason::AgentArrived
                | StopReason::CustomerLeft
                | StopReason::Error
        )
    }

    /// Abnormal ends (reported as such).
    pub fn is_abnormal(self) -> bool {
        matches!(self, StopReason::ChatServerLost | StopReason::Error)
    }

    /// Who ended the bot session, for reports.
    pub fn ended_by(self) -> EndedBy {
        match self {
            StopReason::StopRequested => EndedBy::Workflow,
            StopReason::BotLeft | StopReason::Error => EndedBy::Bot,
            StopReason::CustomerLeft | StopReason::ParticipantsLeft => EndedBy::Customer,
            StopReason::AgentArrived => EndedBy::Agent,
            _ => EndedBy::System,
        }
    }
}

/// Who ended a bot session (`ended_by` in reports): `workflow`, `bot`, `customer`, `agent`,
/// `system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    Workflow,
    Bot,
    Customer,
    Agent,
    System,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a bot is in its life, as its BotActor and its SessionActor each see it. The one thing
/// they share besides messages is the `done` flag (an `AtomicBool`): set as soon as either
/// decides the bot takes no more inputs, so that inputs already queued are skipped at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BotPhase {
    /// Joining the chat (the session waits for the bot's own `joined` event).
    Starting,
    /// Taking inputs.
    Running,
    /// The bot failed or asked to leave: it takes no more inputs; its stop is on the way.
    Halted,
    /// Being stopped with this reason (or, with `None`, dropped without a stop: it moves to the
    /// other node of the pair).
    Stopping(Option<StopReason>),
}

impl BotPhase {
    /// Whether the bot still takes inputs.
    pub(crate) fn takes_inputs(self) -> bool {
        self == BotPhase::Running
    }

    pub(crate) fn is_stopping(self) -> bool {
        matches!(self, BotPhase::Stopping(_))
    }
}

/// What a bot is started with.
#[derive(Debug, Clone)]
pub struct BotStart {
    /// Every StartBot parameter that is not one of the gateway's own.
    pub parameters: KeyValues,
    /// The StartBot request's userdata.
    pub userdata: KeyValues,
    /// Events of the session before the bot joined that the bot may see (the customer's first
    /// message, for example).
    pub history: Vec<ChatEvent>,
    /// The context the bot saved before a switchover; `None` on a first start.
    pub restored: Option<Vec<u8>>,
    /// Wakes the bot with [`BotInput::Wake`]: for connector bots whose external side speaks
    /// without being asked (a proactive message, a late reply). Keep it; waking is cheap.
    pub waker: BotWaker,
}

/// A handle that queues a [`BotInput::Wake`] for one bot (in order with its other inputs).
/// Waking a bot that has stopped does nothing.
#[derive(Clone)]
pub struct BotWaker(std::sync::Arc<dyn Fn() + Send + Sync>);

impl BotWaker {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Self {
        BotWaker(std::sync::Arc::new(wake))
    }

    /// A waker that does nothing (tests, bots that never wake).
    pub fn none() -> Self {
        BotWaker::new(|| {})
    }

    pub fn wake(&self) {
        (self.0)()
    }
}

impl fmt::Debug for BotWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BotWaker")
    }
}

pub use bgs_proto::esp::Handoff;

/// One thing for a bot to handle.
#[derive(Debug, Clone)]
pub enum BotInput {
    Start(BotStart),
    /// A chat event the bot may see, after its own join.
    Event(ChatEvent),
    /// Data sent by SendDataToBot (its parameters and userdata, merged; parameters win).
    Data(KeyValues),
    /// The last input: the bot is being stopped.
    Stop(StopReason),
    /// The bot's [`BotWaker`] was called: it may act on what its external side sent meanwhile.
    Wake,
}

/// What a bot asked for while handling one input, carried out in order afterwards.
#[derive(Debug, Clone, PartialEq)]
pub enum BotAction {
    Post {
        kind: bgs_proto::chat::PostKind,
        text: String,
        visibility: Visibility,
        rich: Option<RichContent>,
    },
    Userdata(UserdataChanges),
    Leave,
    SaveContext(Vec<u8>),
    Handoff(Handoff),
}

/// Who the bot is, and the outbox of its current handler. It borrows the bot's one shared
/// spec: giving a bot an input copies no id.
#[derive(Debug)]
pub struct BotContext {
    spec: Arc<BotSpec>,
    instance_id: Arc<str>,
    label: Option<InputLabel>,
    actions: Vec<BotAction>,
}

impl BotContext {
    pub fn new(spec: Arc<BotSpec>, instance_id: Arc<str>) -> Self {
        Self {
            spec,
            instance_id,
            label: None,
            actions: Vec::new(),
        }
    }

    /// The context of one input, named by its label.
    pub fn for_input(spec: Arc<BotSpec>, instance_id: Arc<str>, label: InputLabel) -> Self {
        Self {
            label: Some(label),
            ..Self::new(spec, instance_id)
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn interaction_id(&self) -> &str {
        &self.spec.key.interaction_id
    }

    pub fn bot_id(&self) -> &str {
        &self.spec.key.bot_id
    }

    pub fn bot_name(&self) -> &str {
        &self.spec.key.bot_name
    }

    pub fn nickname(&self) -> &str {
        &self.spec.nickname
    }

    pub fn visibility(&self) -> Visibility {
        self.spec.visibility
    }

    /// A stable id of the input being handled: `{instance_id}:{label}`, the prefix of its posts'
    /// client keys. The same input handled again (after a reconnect or a switchover) has the
    /// same id: connectors send it as an idempotency key. Empty outside an input.
    pub fn input_id(&self) -> String {
        self.label
            .map(|l| l.input_id(&self.instance_id))
            .unwrap_or_default()
    }

    fn post_kind(&mut self, kind: bgs_proto::chat::PostKind, text: String) {
        let visibility = self.visibility();
        self.actions.push(BotAction::Post {
            kind,
            text,
            visibility,
            rich: None,
        });
    }

    /// Posts a message with buttons or cards. The text posted is `rich.fallback(text)`: the
    /// text and the choices as a numbered list, so a text-only client shows them too.
    pub fn say_rich(&mut self, text: impl Into<String>, rich: RichContent) {
        let text = text.into();
        let (text, rich) = if rich.is_empty() {
            (text, None)
        } else {
            (rich.fallback(&text), Some(rich))
        };
        let visibility = self.visibility();
        self.actions.push(BotAction::Post {
            kind: bgs_proto::chat::PostKind::Message,
            text,
            visibility,
            rich,
        });
    }

    /// Hands the customer over to a person: writes the hand-off into userdata, then leaves
    /// (the bot gets `Stop(BotLeft)`; the report and GetBotStatus carry the hand-off).
    pub fn handoff(&mut self, handoff: Handoff) {
        self.actions.push(BotAction::Handoff(handoff));
    }

    /// Posts a message with the bot's own visibility.
    pub fn say(&mut self, text: impl Into<String>) {
        self.post_kind(bgs_proto::chat::PostKind::Message, text.into());
    }

    /// Posts a message narrowed to `visibility` (a wider one is narrowed to the bot's own).
    pub fn say_with(&mut self, text: impl Into<String>, visibility: Visibility) {
        self.actions.push(BotAction::Post {
            kind: bgs_proto::chat::PostKind::Message,
            text: text.into(),
            visibility: self.visibility().narrow(visibility),
            rich: None,
        });
    }

    pub fn notice(&mut self, text: impl Into<String>) {
        self.post_kind(bgs_proto::chat::PostKind::Notice, text.into());
    }

    pub fn typing(&mut self) {
        self.post_kind(bgs_proto::chat::PostKind::Typing, String::new());
    }

    /// Sets (Some) or removes (None) userdata keys of the interaction.
    pub fn set_userdata(&mut self, changes: UserdataChanges) {
        self.actions.push(BotAction::Userdata(changes));
    }

    /// Asks to leave the chat (keep-alive: the chat goes on). The bot then gets `Stop(BotLeft)`.
    pub fn leave(&mut self) {
        self.actions.push(BotAction::Leave);
    }

    /// Saves the bot's context: what a switchover restores (`BotStart::restored`).
    pub fn save_context(&mut self, bytes: Vec<u8>) {
        self.actions.push(BotAction::SaveContext(bytes));
    }

    /// Takes the actions recorded so far.
    pub fn take_actions(&mut self) -> Vec<BotAction> {
        std::mem::take(&mut self.actions)
    }
}

/// The error a bot handler returns; it stops the bot with reason `error`. From a factory's
/// `check` or `create` it refuses the StartBot: `bad_parameter` (400), or `bot_unavailable`
/// (503) for one made with [`BotError::unavailable`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BotError {
    pub message: String,
    /// The plugin cannot take bots now (its process is down, it is full): retry later.
    pub unavailable: bool,
}

impl BotError {
    pub fn new(message: impl Into<String>) -> Self {
        BotError {
            message: message.into(),
            unavailable: false,
        }
    }

    /// The plugin cannot take a bot now, whatever the parameters: StartBot `bot_unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        BotError {
            message: message.into(),
            unavailable: true,
        }
    }
}

/// One bot instance.
pub trait Bot: Send + 'static {
    /// Handles one input; act through `ctx`. Inputs come one at a time, in order.
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>>;
}

/// What a plugin's factory is asked to create a bot from.
#[derive(Debug, Clone)]
pub struct CreateBot {
    /// `ChatBotName`: which external bot, for connector plugins (may be empty).
    pub bot_name: String,
    pub parameters: KeyValues,
}

/// A plugin: creates one bot per StartBot.
pub trait BotFactory: Send + Sync + 'static {
    /// The fixed bot id (`ChatBotID`).
    fn bot_id(&self) -> &str;
    /// Creates a bot, or says why not (for example an unknown `ChatBotName`): StartBot answers
    /// `bad_parameter` with the message.
    fn create(&self, request: &CreateBot) -> Result<Box<dyn Bot>, BotError>;
    /// Checks a StartBot before the gateway joins the chat (cheap, no I/O). Default: accept.
    fn check(&self, _request: &CreateBot) -> Result<(), BotError> {
        Ok(())
    }
}
