//! The `botframework` plugin: the gateway acts as a Bot Framework channel for bots built with
//! Microsoft's Bot Framework SDK. StartBot `ChatBotName` picks the bot from
//! `[plugins.botframework.bots.<name>]`. docs/PLUGINS.md section "botframework" is the guide.
//!
//! The gateway POSTs activities to the bot's messaging endpoint: `conversationUpdate` (members
//! added) on a first start, `message` for each customer message, `endOfConversation` on stop.
//! Each carries a `serviceUrl` that points at the connector routes this node hosts
//! ([`Connector`]; `POST /bf/{capability}/v3/conversations/{id}/activities[/{activityId}]`),
//! where the bot sends its replies. The conversation id is the bot instance id, so after a
//! switchover the conversation goes on with the same id on the new primary. The capability is
//! an HMAC of the conversation id that only the bot's endpoint is given: a stranger who knows the
//! conversation id cannot post into the chat.
//!
//! A turn is one POST: replies that reach the connector while it runs are the turn's actions,
//! carried out when the bot's answer (HTTP 200/201/202) comes. Replies that come later, or
//! proactive messages, wake the bot ([`BotInput::Wake`]) and are carried out then.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgs_actors::bot::{
    Bot, BotContext, BotError, BotFactory, BotInput, BotWaker, CreateBot, Handoff,
};
use bgs_proto::chat::{EventKind, ParticipantType};
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;

use super::bf_auth;
use super::cards;
use super::connector::{self, Choices, RetryPolicy};
use crate::config::BotFrameworkBot;

/// Replies waiting for one conversation; beyond it the connector answers 429.
const CONVERSATION_QUEUE: usize = 256;
/// Bytes of replies (request bodies) waiting for one conversation; beyond it 429.
pub const CONVERSATION_BYTES: usize = 2 << 20;
/// Bytes of replies waiting for all the conversations of a node; beyond it 429.
pub const NODE_BYTES: usize = 64 << 20;

/// A reply waiting for its bot, and the bytes it holds of its conversation's and the node's
/// allowance, given back when it is dropped (handled, or its bot gone).
struct Pending {
    activity: Value,
    _held: Held,
}

struct Held {
    bytes: usize,
    conversation: Arc<AtomicUsize>,
    node: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conversation.fetch_sub(self.bytes, Ordering::SeqCst);
        self.node.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// One conversation the connector routes replies to.
struct Conversation {
    replies: mpsc::Sender<Pending>,
    /// Bytes of its replies waiting.
    held: Arc<AtomicUsize>,
    waker: BotWaker,
    /// A turn is running: its replies are collected when it ends, no wake needed.
    in_turn: Arc<AtomicBool>,
    /// With an app id: the bot's tokens are checked against it.
    tokens: Option<Arc<bf_auth::TokenCheck>>,
}

/// Why the connector did not take an activity.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectorError {
    /// The capability in the route is not this conversation's.
    Forbidden,
    /// The bot has an app id and the request's token is missing or not valid (why).
    Unauthorized(String),
    UnknownConversation,
    Busy,
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The connector side of the channel: the routes a bot posts its replies to. Shared by the
/// plugin (which registers conversations) and the HTTP server (which delivers to them).
pub struct Connector {
    conversations: DashMap<String, Conversation>,
    /// Keys the conversations' capabilities.
    key: [u8; 32],
    /// Bytes of replies waiting, all conversations together.
    held: Arc<AtomicUsize>,
}

impl Default for Connector {
    /// A connector with a key of its own (a single node).
    fn default() -> Self {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Connector {
            conversations: DashMap::new(),
            key,
            held: Arc::default(),
        }
    }
}

impl Connector {
    /// A connector whose capabilities both nodes of a pair give alike (derived from the HA
    /// secret), so a bot behind one address for both nodes reaches whichever is primary; with
    /// no secret, a key of this process's own.
    pub fn new(secret: Option<&str>) -> Self {
        use hmac::Mac;
        let Some(secret) = secret.filter(|s| !s.is_empty()) else {
            return Connector::default();
        };
        let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
            Ok(mac) => mac,
            Err(_) => return Connector::default(),
        };
        mac.update(b"bgs botframework connector capability v1");
        Connector {
            conversations: DashMap::new(),
            key: mac.finalize().into_bytes().into(),
            held: Arc::default(),
        }
    }

    /// The capability of `conversation`: 128 bits of HMAC-SHA256 in hex, the path segment of
    /// its `serviceUrl` that the routes require.
    pub fn capability(&self, conversation: &str) -> String {
        use hmac::Mac;
        use std::fmt::Write;
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(conversation.as_bytes());
        let bytes = mac.finalize().into_bytes();
        bytes[..16]
            .iter()
            .fold(String::with_capacity(32), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }

    /// Checks a request for `conversation`: its `capability` (first: a wrong one learns
    /// nothing more), that the conversation is one of this node's, and, for a bot with an app
    /// id, the bearer token in `authorization`.
    pub async fn check(
        &self,
        capability: &str,
        conversation: &str,
        authorization: Option<&str>,
    ) -> Result<(), ConnectorError> {
        let want = self.capability(conversation);
        if !bgs_proto::chat::constant_time_eq(want.as_bytes(), capability.as_bytes()) {
            return Err(ConnectorError::Forbidden);
        }
        let tokens = match self.conversations.get(conversation) {
            Some(c) => c.tokens.clone(),
            None => return Err(ConnectorError::UnknownConversation),
        };
        if let Some(tokens) = tokens {
            tokens
                .check(authorization)
                .await
                .map_err(ConnectorError::Unauthorized)?;
        }
        Ok(())
    }

    /// Takes one activity a bot sent to `conversation` (`bytes`: the size of the request body),
    /// a request [`Connector::check`] has let in; answers the id given to it. A conversation
    /// holds at most [`CONVERSATION_QUEUE`] replies and [`CONVERSATION_BYTES`], the node
    /// [`NODE_BYTES`], waiting for their bots: beyond, `Busy`.
    pub fn deliver(
        &self,
        conversation: &str,
        activity: Value,
        bytes: usize,
    ) -> Result<String, ConnectorError> {
        let c = self
            .conversations
            .get(conversation)
            .ok_or(ConnectorError::UnknownConversation)?;
        let held = Held {
            bytes,
            conversation: c.held.clone(),
            node: self.held.clone(),
        };
        let in_conversation = c.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let in_node = self.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if in_conversation > CONVERSATION_BYTES || in_node > NODE_BYTES {
            return Err(ConnectorError::Busy); // `held` gives the bytes back
        }
        c.replies
            .try_send(Pending {
                activity,
                _held: held,
            })
            .map_err(|_| ConnectorError::Busy)?;
        if !c.in_turn.load(Ordering::SeqCst) {
            c.waker.wake();
        }
        Ok(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn conversations(&self) -> usize {
        self.conversations.len()
    }
}

/// Counts a request the connector routes refused (`bgs_connections_refused_total{port="http",
/// reason}`: `bf_capability`, not the conversation's serviceUrl; `bf_token`, a bot with an app id
/// sent no valid token).
pub fn refused(reason: &'static str) {
    bgs_actors::metrics::metrics().refused.inc(["http", reason]);
    tracing::debug!(reason, "Bot Framework connector request refused");
}

/// One configured bot, ready to call.
struct BotEndpoint {
    name: String,
    url: reqwest::Url,
    app_id: Option<String>,
    token: Option<TokenSource>,
    /// With an app id: what the bot's own tokens are checked against.
    tokens: Option<Arc<bf_auth::TokenCheck>>,
    policy: RetryPolicy,
    unavailable_notice: String,
    handoff_userdata: BTreeMap<String, String>,
}

pub struct BotFrameworkFactory {
    bots: BTreeMap<String, Arc<BotEndpoint>>,
    client: reqwest::Client,
    connector: Arc<Connector>,
    service_url: String,
}

impl BotFrameworkFactory {
    /// Checks every bot; errors name the key (`plugins.botframework.bots.NAME.endpoint: ...`).
    pub fn load(
        bots: &BTreeMap<String, BotFrameworkBot>,
        service_url: String,
        connector: Arc<Connector>,
        handling_timeout: Duration,
    ) -> Result<Self, String> {
        let client = connector::client()?;
        let budget = RetryPolicy::budget_for(handling_timeout);
        let mut out = BTreeMap::new();
        for (name, b) in bots {
            let key = format!("plugins.botframework.bots.{name}");
            let url = connector::http_url(&format!("{key}.endpoint"), &b.endpoint)?;
            let app_id = b.app_id.clone().filter(|s| !s.is_empty());
            let token = match (&app_id, b.app_password.as_deref().filter(|s| !s.is_empty())) {
                (Some(id), Some(secret)) => Some(TokenSource::new(
                    client.clone(),
                    b.token_url.clone().unwrap_or_else(|| {
                        format!(
                            "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                            b.tenant
                        )
                    }),
                    id.clone(),
                    secret.to_string(),
                )),
                (None, None) => None,
                _ => {
                    return Err(format!(
                    "{key}: app_id and app_password go together (both, or neither for a local bot)"
                ))
                }
            };
            if b.timeout_ms == 0 {
                return Err(format!("{key}.timeout_ms: must be at least 1"));
            }
            // A bot with an app id sends tokens with its replies: checked as a channel does.
            let issuers = b
                .token_issuers
                .clone()
                .unwrap_or_else(|| bf_auth::DEFAULT_ISSUERS.map(String::from).to_vec());
            let tokens = match (&app_id, &b.token_keys) {
                (None, _) => None,
                (Some(id), Some(path)) => {
                    let jwks = std::fs::read_to_string(path).map_err(|e| {
                        format!("{key}.token_keys: cannot read {}: {e}", path.display())
                    })?;
                    Some(Arc::new(
                        bf_auth::TokenCheck::with_keys(id, issuers, &jwks)
                            .map_err(|e| format!("{key}.token_keys: {}: {e}", path.display()))?,
                    ))
                }
                (Some(id), None) => Some(Arc::new(bf_auth::TokenCheck::with_metadata(
                    id,
                    issuers,
                    b.openid_metadata
                        .clone()
                        .unwrap_or_else(|| bf_auth::DEFAULT_METADATA.to_string()),
                    client.clone(),
                ))),
            };
            out.insert(
                name.clone(),
                Arc::new(BotEndpoint {
                    name: name.clone(),
                    url,
                    app_id,
                    token,
                    tokens,
                    // A turn is not retried: the bot may have answered part of it already.
                    policy: RetryPolicy {
                        plugin: "botframework",
                        endpoint: name.clone(),
                        attempts: 1,
                        per_attempt: Duration::from_millis(b.timeout_ms),
                        budget,
                    },
                    unavailable_notice: b.unavailable_notice.clone(),
                    handoff_userdata: b.handoff_userdata.clone(),
                }),
            );
        }
        let service_url = if service_url.ends_with('/') {
            service_url
        } else {
            format!("{service_url}/")
        };
        Ok(BotFrameworkFactory {
            bots: out,
            client,
            connector,
            service_url,
        })
    }

    fn bot(&self, name: &str) -> Result<&Arc<BotEndpoint>, BotError> {
        connector::named(
            &self.bots,
            name,
            "Bot Framework bot",
            "plugins.botframework.bots",
        )
    }
}

impl BotFactory for BotFrameworkFactory {
    fn bot_id(&self) -> &str {
        "botframework"
    }

    fn check(&self, request: &CreateBot) -> Result<(), BotError> {
        self.bot(&request.bot_name).map(|_| ())
    }

    fn create(&self, request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        Ok(Box::new(ChannelBot {
            endpoint: self.bot(&request.bot_name)?.clone(),
            client: self.client.clone(),
            connector: self.connector.clone(),
            service_url: self.service_url.clone(),
            conversation: String::new(),
            replies: None,
            in_turn: Arc::new(AtomicBool::new(false)),
            userdata: BTreeMap::new(),
            choices: Choices::default(),
            done: false,
        }))
    }
}

struct ChannelBot {
    endpoint: Arc<BotEndpoint>,
    client: reqwest::Client,
    connector: Arc<Connector>,
    service_url: String,
    conversation: String,
    replies: Option<mpsc::Receiver<Pending>>,
    in_turn: Arc<AtomicBool>,
    userdata: BTreeMap<String, String>,
    /// The choices of the bot's last message with buttons, for a number typed after them.
    choices: Choices,
    /// Left or handed over: later inputs are ignored.
    done: bool,
}

impl Drop for ChannelBot {
    fn drop(&mut self) {
        // Only this bot's registration: a newer bot of the same conversation keeps its own.
        let in_turn = self.in_turn.clone();
        self.connector
            .conversations
            .remove_if(&self.conversation, |_, c| Arc::ptr_eq(&c.in_turn, &in_turn));
    }
}

/// An activity the channel sends to a bot: the Bot Framework's Activity schema, with the fields
/// this channel fills (camelCase JSON; those it has no value for are left out).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Activity<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    local_timestamp: String,
    id: String,
    channel_id: &'static str,
    service_url: &'a str,
    conversation: ConversationAccount<'a>,
    recipient: ChannelAccount,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<ChannelAccount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    members_added: Vec<ChannelAccount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    channel_data: ChannelData<'a>,
    locale: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ChannelAccount {
    id: String,
    name: String,
    role: &'static str,
}

impl ChannelAccount {
    fn user(id: &str, name: &str) -> Self {
        ChannelAccount {
            id: id.to_string(),
            name: name.to_string(),
            role: "user",
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct ConversationAccount<'a> {
    id: &'a str,
}

/// What bgs adds for the bot: its interaction, instance and the chat's userdata.
#[derive(Debug, serde::Serialize)]
struct ChannelData<'a> {
    interaction_id: &'a str,
    instance_id: &'a str,
    userdata: &'a BTreeMap<String, String>,
}

/// What makes an activity besides its conversation: kind, time, id, sender and text.
struct ActivityParts {
    kind: &'static str,
    at: u64,
    id: String,
    from: Option<ChannelAccount>,
    text: Option<String>,
}

impl ChannelBot {
    /// An activity to the bot, stamped `at` (milliseconds since 1970, UTC).
    fn activity<'a>(&'a self, ctx: &'a BotContext, parts: ActivityParts) -> Activity<'a> {
        let timestamp = timestamp(parts.at);
        let local_timestamp = format!("{}+00:00", timestamp.trim_end_matches('Z'));
        Activity {
            kind: parts.kind,
            timestamp,
            local_timestamp,
            id: parts.id,
            channel_id: "bgs",
            service_url: &self.service_url,
            conversation: ConversationAccount {
                id: &self.conversation,
            },
            recipient: self.recipient(ctx),
            from: parts.from,
            members_added: Vec::new(),
            text: parts.text,
            code: None,
            channel_data: ChannelData {
                interaction_id: ctx.interaction_id(),
                instance_id: ctx.instance_id(),
                userdata: &self.userdata,
            },
            locale: "en-US",
        }
    }

    /// The bot itself, as its activities name it.
    fn recipient(&self, ctx: &BotContext) -> ChannelAccount {
        ChannelAccount {
            id: self
                .endpoint
                .app_id
                .clone()
                .unwrap_or_else(|| format!("bot-{}", self.endpoint.name)),
            name: ctx.nickname().to_string(),
            role: "bot",
        }
    }

    /// The bearer token for the bot's endpoint, when the bot has an app id.
    async fn token(&self) -> Result<Option<String>, String> {
        match &self.endpoint.token {
            Some(t) => t.token().await.map(Some),
            None => Ok(None),
        }
    }

    /// One turn: posts the activity made of `parts`, then takes the replies the bot sent
    /// meanwhile. `Err` when the bot could not be reached or refused the activity.
    async fn turn(&mut self, ctx: &mut BotContext, parts: ActivityParts) -> Result<(), String> {
        // Serialized once, posted as many times as the retries need.
        let activity = body(&self.activity(ctx, parts));
        self.post_turn(ctx, activity).await
    }

    /// Posts one activity (its JSON) to the bot, then takes the replies the bot sent meanwhile.
    async fn post_turn(
        &mut self,
        ctx: &mut BotContext,
        activity: bytes::Bytes,
    ) -> Result<(), String> {
        let name = self.endpoint.name.clone();
        let token = self
            .token()
            .await
            .map_err(|e| format!("Bot Framework bot {name}: no token: {e}"))?;
        let endpoint = self.endpoint.clone();
        let client = self.client.clone();
        self.in_turn.store(true, Ordering::SeqCst);
        let result = endpoint
            .policy
            .run(|timeout| {
                let mut request = client.post(endpoint.url.clone());
                if let Some(t) = &token {
                    request = request.bearer_auth(t);
                }
                let activity = activity.clone();
                async move { connector::post_json(request, activity, timeout).await }
            })
            .await;
        self.in_turn.store(false, Ordering::SeqCst);
        self.take_replies(ctx);
        result
            .map(|_| ())
            .map_err(|(error, _)| format!("Bot Framework bot {name} failed: {error}"))
    }

    /// The conversation starts: the bot and the customer are its members.
    async fn announce(
        &mut self,
        ctx: &mut BotContext,
        customer: &(String, String),
    ) -> Result<(), String> {
        let parts = ActivityParts {
            kind: "conversationUpdate",
            at: bgs_actors::now_ms(),
            id: ctx.input_id(),
            from: Some(ChannelAccount::user(&customer.0, &customer.1)),
            text: None,
        };
        let activity = Activity {
            members_added: vec![
                self.recipient(ctx),
                ChannelAccount::user(&customer.0, &customer.1),
            ],
            ..self.activity(ctx, parts)
        };
        let activity = body(&activity);
        self.post_turn(ctx, activity).await
    }

    fn take_replies(&mut self, ctx: &mut BotContext) {
        let Some(rx) = &mut self.replies else { return };
        while let Ok(pending) = rx.try_recv() {
            if self.done {
                continue;
            }
            self.done = act_on(ctx, &pending.activity, &mut self.choices);
        }
    }

    fn give_up(&mut self, ctx: &mut BotContext, error: String) {
        connector::give_up(
            ctx,
            &self.endpoint.unavailable_notice,
            &self.endpoint.handoff_userdata,
            error,
        );
        self.done = true;
    }
}

fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let s = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Maps one activity from the bot to actions; true when the bot is done (left, handed off).
/// The choices a message offers are kept in `choices`, so that a number the customer types
/// after the numbered fallback is sent as that choice.
pub(crate) fn act_on(ctx: &mut BotContext, activity: &Value, choices: &mut Choices) -> bool {
    match activity["type"].as_str().unwrap_or_default() {
        "message" => {
            let rendered = cards::render(activity);
            if !rendered.lost.is_empty() {
                tracing::warn!(
                    lost = ?rendered.lost,
                    "Bot Framework content not shown: the chat cannot show it"
                );
            }
            let mut lines: Vec<String> = activity["text"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .into_iter()
                .collect();
            lines.extend(rendered.lines);
            let text = lines.join("\n");
            let rich = rendered.rich;
            if !text.is_empty() || !rich.is_empty() {
                choices.offer(&rich);
                ctx.say_rich(text, rich);
            }
            false
        }
        "typing" => {
            ctx.typing();
            false
        }
        "event" if activity["name"] == "handoff" => {
            let v = &activity["value"];
            ctx.handoff(Handoff {
                reason: v["reason"].as_str().unwrap_or("requested").to_string(),
                summary: v["summary"].as_str().unwrap_or_default().to_string(),
                userdata: strings(&v["userdata"]),
                error: None,
            });
            true
        }
        "endOfConversation" => {
            ctx.leave();
            true
        }
        other => {
            tracing::debug!(activity = other, "Bot Framework activity ignored");
            false
        }
    }
}

impl Bot for ChannelBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            match input {
                BotInput::Start(start) => {
                    self.conversation = ctx.instance_id().to_string();
                    self.service_url = format!(
                        "{}bf/{}/",
                        self.service_url,
                        self.connector.capability(&self.conversation)
                    );
                    self.userdata = connector::restored_userdata(start.restored.as_deref())
                        .unwrap_or_else(|| start.userdata.clone());
                    let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
                    self.replies = Some(rx);
                    self.connector.conversations.insert(
                        self.conversation.clone(),
                        Conversation {
                            tokens: self.endpoint.tokens.clone(),
                            replies: tx,
                            held: Arc::default(),
                            waker: start.waker.clone(),
                            in_turn: self.in_turn.clone(),
                        },
                    );
                    // A restored bot goes on with the same conversation: nothing to announce.
                    if start.restored.is_none() {
                        let customer = start
                            .history
                            .iter()
                            .find(|e| e.participant_type == ParticipantType::Customer)
                            .map(|e| (e.participant_id.clone(), e.nickname.clone()))
                            .unwrap_or_else(|| ("customer".into(), "customer".into()));
                        if let Err(e) = self.announce(ctx, &customer).await {
                            self.give_up(ctx, e);
                        }
                        // The customer's question from before the bot joined gets its answer.
                        if let Some((sender, text)) = connector::unanswered(&start.history) {
                            if !self.done {
                                let parts = ActivityParts {
                                    kind: "message",
                                    at: bgs_actors::now_ms(),
                                    id: format!("{}:history", ctx.input_id()),
                                    from: Some(ChannelAccount::user(&sender, &customer.1)),
                                    text: Some(text),
                                };
                                if let Err(e) = self.turn(ctx, parts).await {
                                    self.give_up(ctx, e);
                                }
                            }
                        }
                    }
                    // The context is the userdata the bot knows (the conversation is the
                    // instance, so it needs no saving).
                    if start.restored.is_none() {
                        connector::save_userdata(ctx, &self.userdata);
                    }
                }
                _ if self.done => {}
                BotInput::Event(e) if e.kind == EventKind::Userdata => {
                    connector::track_userdata(ctx, &mut self.userdata, e.userdata)
                }
                BotInput::Event(e)
                    if e.kind == EventKind::Message
                        && e.participant_type == ParticipantType::Customer =>
                {
                    // A number typed after a numbered list of choices is that choice.
                    let text = e.text.unwrap_or_default();
                    let parts = ActivityParts {
                        kind: "message",
                        at: if e.ts_ms > 0 {
                            e.ts_ms
                        } else {
                            bgs_actors::now_ms()
                        },
                        id: ctx.input_id(),
                        from: Some(ChannelAccount::user(&e.participant_id, &e.nickname)),
                        text: Some(self.choices.answer(&text).unwrap_or(text)),
                    };
                    if let Err(err) = self.turn(ctx, parts).await {
                        self.give_up(ctx, err);
                    }
                }
                BotInput::Wake => self.take_replies(ctx),
                BotInput::Stop(reason) => {
                    // Best effort: the bot hears the conversation is over; its answer is not waited for long.
                    let parts = ActivityParts {
                        kind: "endOfConversation",
                        at: bgs_actors::now_ms(),
                        id: ctx.input_id(),
                        from: None,
                        text: Some(reason.as_str().to_string()),
                    };
                    let activity = Activity {
                        code: Some("completedSuccessfully"),
                        ..self.activity(ctx, parts)
                    };
                    if let Ok(token) = self.token().await {
                        let mut request = self.client.post(self.endpoint.url.clone());
                        if let Some(t) = token {
                            request = request.bearer_auth(t);
                        }
                        let _ =
                            connector::post_json(request, body(&activity), Duration::from_secs(2))
                                .await;
                    }
                }
                _ => {}
            }
            Ok(())
        })
    }
}

/// An activity's JSON (the types above always serialize).
fn body(activity: &Activity<'_>) -> bytes::Bytes {
    serde_json::to_vec(activity).unwrap_or_default().into()
}

/// An RFC 3339 UTC timestamp with milliseconds (`2026-12-07T23:10:23.123Z`), as activities carry.
fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Tokens for a bot with an app id: the OAuth client-credentials grant of Microsoft Entra ID
/// (`https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`, scope
/// `https://api.botframework.com/.default`), cached until five minutes before they expire.
struct TokenSource {
    client: reqwest::Client,
    url: String,
    app_id: String,
    secret: String,
    cached: Mutex<Option<(String, tokio::time::Instant)>>,
}

impl TokenSource {
    fn new(client: reqwest::Client, url: String, app_id: String, secret: String) -> Self {
        TokenSource {
            client,
            url,
            app_id,
            secret,
            cached: Mutex::new(None),
        }
    }

    async fn token(&self) -> Result<String, String> {
        if let Ok(cached) = self.cached.lock() {
            if let Some((t, until)) = cached.as_ref() {
                if tokio::time::Instant::now() < *until {
                    return Ok(t.clone());
                }
            }
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.app_id.as_str()),
            ("client_secret", self.secret.as_str()),
            ("scope", "https://api.botframework.com/.default"),
        ];
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            self.client
                .post(&self.url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
                .send(),
        )
        .await
        .map_err(|_| "the token service did not answer in time".to_string())?
        .map_err(|e| format!("cannot reach the token service: {e}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("cannot read the token service's answer: {e}"))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the token service's answer is not JSON: {e}"))?;
        let token = value["access_token"]
            .as_str()
            .filter(|_| status.is_success())
            .ok_or_else(|| {
                format!(
                    "the token service refused app {} (HTTP {}): {}",
                    self.app_id,
                    status.as_u16(),
                    value["error"].as_str().unwrap_or("no reason")
                )
            })?
            .to_string();
        let life = value["expires_in"]
            .as_u64()
            .unwrap_or(3600)
            .saturating_sub(300);
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((
                token.clone(),
                tokio::time::Instant::now() + Duration::from_secs(life),
            ));
        }
        Ok(token)
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgs_actors::bot::BotAction;
    use serde_json::json;

    #[test]
    fn an_activity_is_the_bot_framework_schema_in_camel_case() {
        let userdata = BTreeMap::from([("Queue".to_string(), "sales".to_string())]);
        let activity = Activity {
            kind: "message",
            timestamp: timestamp(1_796_000_000_123),
            local_timestamp: "2026-11-30T00:53:20.123+00:00".into(),
            id: "inst:7".into(),
            channel_id: "bgs",
            service_url: "http://gw/bf/x/",
            conversation: ConversationAccount { id: "inst" },
            recipient: ChannelAccount {
                id: "bot-a".into(),
                name: "Bot".into(),
                role: "bot",
            },
            from: Some(ChannelAccount::user("c1", "Ann")),
            members_added: Vec::new(),
            text: Some("hi".into()),
            code: None,
            channel_data: ChannelData {
                interaction_id: "chat-1",
                instance_id: "inst",
                userdata: &userdata,
            },
            locale: "en-US",
        };
        let v: Value = serde_json::from_slice(&body(&activity)).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "message",
                "timestamp": "2026-11-30T00:53:20.123Z",
                "localTimestamp": "2026-11-30T00:53:20.123+00:00",
                "id": "inst:7",
                "channelId": "bgs",
                "serviceUrl": "http://gw/bf/x/",
                "conversation": {"id": "inst"},
                "recipient": {"id": "bot-a", "name": "Bot", "role": "bot"},
                "from": {"id": "c1", "name": "Ann", "role": "user"},
                "text": "hi",
                "channelData": {"interaction_id": "chat-1", "instance_id": "inst", "userdata": {"Queue": "sales"}},
                "locale": "en-US"
            })
        );
    }

    fn ctx() -> BotContext {
        let key = bgs_proto::bot::BotKey {
            interaction_id: "s".into(),
            bot_id: "botframework".into(),
            bot_name: "helpdesk".into(),
        };
        BotContext::new(
            std::sync::Arc::new(bgs_proto::bot::BotSpec::new(key, "Helpdesk")),
            "i".into(),
        )
    }

    #[test]
    fn activities_become_posts_cards_typing_and_handoffs() {
        let mut c = ctx();
        let mut choices = Choices::default();
        let done = act_on(
            &mut c,
            &json!({"type": "message", "text": "pick", "suggestedActions": {"actions": [
                {"type": "imBack", "title": "Yes", "value": "yes"}]}}),
            &mut choices,
        );
        assert!(!done);
        act_on(
            &mut c,
            &json!({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.hero",
                "content": {"title": "Plan", "subtitle": "25 EUR", "images": [{"url": "https://x/y.png"}],
                "buttons": [{"type": "imBack", "title": "Buy", "value": "buy"}]}}]}),
            &mut choices,
        );
        // The customer types the number of the last list's choice: the bot is sent its value.
        let mut again = Choices::default();
        again.offer(&bgs_proto::chat::RichContent {
            buttons: vec![
                bgs_proto::chat::Button {
                    title: "Red".into(),
                    payload: "red".into(),
                },
                bgs_proto::chat::Button {
                    title: "Yellow".into(),
                    payload: "yellow".into(),
                },
            ],
            cards: Vec::new(),
        });
        assert_eq!(choices.answer(" 1. "), Some("buy".into()));
        assert_eq!(choices.answer("1"), None, "only right after the list");
        assert_eq!(again.answer("3"), None);
        again.offer(&bgs_proto::chat::RichContent {
            buttons: vec![bgs_proto::chat::Button {
                title: "Red".into(),
                payload: "red".into(),
            }],
            cards: Vec::new(),
        });
        assert_eq!(again.answer("0"), None);
        act_on(&mut c, &json!({"type": "typing"}), &mut Choices::default());
        assert!(act_on(
            &mut c,
            &json!({"type": "event", "name": "handoff", "value": {"summary": "s", "userdata": {"Queue": "x", "Tries": 2}}}),
            &mut Choices::default()
        ));
        let actions = c.take_actions();
        assert_eq!(actions.len(), 4);
        match &actions[0] {
            BotAction::Post { text, .. } => assert_eq!(text, "pick\n1. Yes"),
            other => panic!("{other:?}"),
        }
        match &actions[1] {
            BotAction::Post { text, rich, .. } => {
                assert_eq!(text, "Plan (25 EUR)\nhttps://x/y.png\n1. Buy");
                assert_eq!(rich.as_ref().unwrap().cards[0].buttons[0].payload, "buy");
            }
            other => panic!("{other:?}"),
        }
        match &actions[3] {
            BotAction::Handoff(h) => {
                assert_eq!(h.userdata["Tries"], "2");
                assert_eq!(h.reason, "requested");
            }
            other => panic!("{other:?}"),
        }
        let mut c = ctx();
        assert!(act_on(
            &mut c,
            &json!({"type": "endOfConversation"}),
            &mut Choices::default()
        ));
        assert_eq!(c.take_actions(), vec![BotAction::Leave]);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(1_796_685_023_123), "2026-12-07T23:10:23.123Z");
    }

    #[tokio::test]
    async fn the_connector_routes_by_conversation_and_is_bounded() {
        let connector = Connector::default();
        let cap = |c: &str| connector.capability(c);
        let message = || json!({"type": "message"});
        assert_eq!(
            connector.check(&cap("nope"), "nope", None).await,
            Err(ConnectorError::UnknownConversation)
        );
        assert_eq!(
            connector.deliver("nope", json!({}), 2),
            Err(ConnectorError::UnknownConversation)
        );
        let (tx, mut rx) = mpsc::channel(3);
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        connector.conversations.insert(
            "c".into(),
            Conversation {
                replies: tx,
                held: Arc::default(),
                waker: BotWaker::new(move || {
                    w.fetch_add(1, Ordering::SeqCst);
                }),
                in_turn: Arc::new(AtomicBool::new(false)),
                tokens: None,
            },
        );
        // Without the conversation's capability nothing is taken, whatever else is right.
        for wrong in [
            "",
            "00",
            &cap("d"),
            &cap("c")[..31],
            &cap("c").to_uppercase(),
        ] {
            assert_eq!(
                connector.check(wrong, "c", None).await,
                Err(ConnectorError::Forbidden),
                "{wrong:?}"
            );
        }
        assert_eq!(connector.check(&cap("c"), "c", None).await, Ok(()));
        // Bounded in bytes: a reply past the conversation's allowance is refused, and the
        // bytes come back when the replies are taken.
        assert!(connector.deliver("c", message(), 10).is_ok());
        assert_eq!(
            connector.deliver("c", message(), CONVERSATION_BYTES),
            Err(ConnectorError::Busy)
        );
        assert!(connector
            .deliver("c", message(), CONVERSATION_BYTES - 10)
            .is_ok());
        assert_eq!(connector.held.load(Ordering::SeqCst), CONVERSATION_BYTES);
        while rx.try_recv().is_ok() {}
        assert_eq!(connector.held.load(Ordering::SeqCst), 0);
        // Bounded in count.
        for _ in 0..3 {
            assert!(connector.deliver("c", message(), 10).is_ok());
        }
        assert_eq!(
            connector.deliver("c", message(), 10),
            Err(ConnectorError::Busy)
        );
        assert_eq!(connector.held.load(Ordering::SeqCst), 30);
        assert_eq!(
            woken.load(Ordering::SeqCst),
            5,
            "outside a turn, replies wake the bot"
        );
        drop(rx);
        assert_eq!(
            connector.deliver("c", message(), 10),
            Err(ConnectorError::Busy)
        );
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn capabilities_are_per_conversation_and_alike_on_both_nodes_of_a_pair() {
        let a = Connector::new(Some("s3cret"));
        let b = Connector::new(Some("s3cret"));
        let other = Connector::new(Some("another"));
        let alone = Connector::new(None);
        assert_eq!(a.capability("conv"), b.capability("conv"));
        assert_eq!(a.capability("conv").len(), 32);
        assert_ne!(a.capability("conv"), a.capability("conv2"));
        assert_ne!(a.capability("conv"), other.capability("conv"));
        assert_ne!(
            alone.capability("conv"),
            Connector::new(None).capability("conv")
        );
    }
}
