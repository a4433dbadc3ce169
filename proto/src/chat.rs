//! The chat protocol: what a gateway or an agent tool exchanges with the Chat Server over TCP, and
//! the event objects every transport (TCP, HTTP, WebSocket) carries. docs/CHAT.md explains it.
//!
//! bincode encodes enums by variant index, so variants are only ever appended, never reordered.
//! The serde attributes below only rename (bincode ignores names); `skip`, `flatten`, `tag` and
//! `untagged` are not used because bincode cannot carry them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of the chat protocol, declared in [`Hello`]. The server refuses other versions.
/// 2: posts and events carry `rich` content. 3: Hello carries a `credential`.
pub const CHAT_PROTOCOL_VERSION: u16 = 3;

/// Userdata of a session: string keys to string values.
pub type Userdata = BTreeMap<String, String>;
/// A userdata change: a `None` value removes the key (JSON: `null`, as in JSON merge patch).
pub type UserdataChanges = BTreeMap<String, Option<String>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParticipantType {
    Customer,
    Agent,
    Supervisor,
    System,
    External,
}

/// How a participant presents itself. Bots join as type `agent` with style `bot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    #[default]
    Regular,
    Bot,
}

/// Who may see a participant, its joins, leaves and posts.
///
/// `All` (conference) is seen by everyone; `Int` (coaching) is never shown to customers; `Vip`
/// (monitoring) is seen only by supervisors and other `Vip` participants. The order
/// `All < Int < Vip` is "narrower": a post may narrow its participant's visibility, never widen it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum Visibility {
    #[default]
    #[serde(rename = "ALL")]
    All,
    #[serde(rename = "INT")]
    Int,
    #[serde(rename = "VIP")]
    Vip,
}

impl Visibility {
    /// The narrower of two visibilities.
    pub fn narrow(self, requested: Visibility) -> Visibility {
        self.max(requested)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::All => "ALL",
            Visibility::Int => "INT",
            Visibility::Vip => "VIP",
        }
    }
}

impl std::str::FromStr for Visibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ALL" => Ok(Visibility::All),
            "INT" => Ok(Visibility::Int),
            "VIP" => Ok(Visibility::Vip),
            other => Err(format!("visibility must be ALL, INT or VIP, not {other:?}")),
        }
    }
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a viewer (of this type and visibility) may see something of visibility `seen`.
/// A participant always sees its own events; callers check that first.
pub fn may_see(
    viewer_type: ParticipantType,
    viewer_visibility: Visibility,
    seen: Visibility,
) -> bool {
    match seen {
        Visibility::All => true,
        Visibility::Int => viewer_type != ParticipantType::Customer,
        Visibility::Vip => {
            viewer_type == ParticipantType::Supervisor || viewer_visibility == Visibility::Vip
        }
    }
}

/// What a leaving participant asks the session to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterAction {
    /// The session goes on (it closes only when no participant remains).
    #[default]
    KeepAlive,
    /// The session closes unless an agent (type `agent`, not a bot) remains.
    CloseIfNoAgents,
    /// The session closes at once.
    ForceClose,
}

impl std::str::FromStr for AfterAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep-alive" => Ok(AfterAction::KeepAlive),
            "close-if-no-agents" => Ok(AfterAction::CloseIfNoAgents),
            "force-close" => Ok(AfterAction::ForceClose),
            other => Err(format!(
                "after_action must be keep-alive, close-if-no-agents or force-close, not {other:?}"
            )),
        }
    }
}

/// Why a participant left or a session closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The participant asked to leave.
    Requested,
    /// Its connection dropped and the detach grace period ran out.
    Disconnected,
    /// Idle control: no activity for the configured idle time.
    Idle,
    /// A participant left with after-action `force-close`.
    ForceClose,
    /// A participant left with `close-if-no-agents` and no agent remained.
    NoAgents,
    /// The last participant left.
    NoParticipants,
    /// The server shut the session (administrative close).
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Joined,
    Left,
    Message,
    Notice,
    Typing,
    Userdata,
    Closed,
}

/// What a participant posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostKind {
    #[default]
    Message,
    Notice,
    Typing,
}

impl From<PostKind> for EventKind {
    fn from(kind: PostKind) -> EventKind {
        match kind {
            PostKind::Message => EventKind::Message,
            PostKind::Notice => EventKind::Notice,
            PostKind::Typing => EventKind::Typing,
        }
    }
}

impl std::str::FromStr for PostKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "message" => Ok(PostKind::Message),
            "notice" => Ok(PostKind::Notice),
            "typing" => Ok(PostKind::Typing),
            other => Err(format!(
                "kind must be message, notice or typing, not {other:?}"
            )),
        }
    }
}

/// A participant of a session as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub id: String,
    pub nickname: String,
    pub participant_type: ParticipantType,
    pub style: Style,
    pub visibility: Visibility,
}

/// One numbered event of a session. Sequence numbers start at 1 and only grow.
///
/// `participant_*` name who caused the event (for `closed`: the system). `visibility` is the
/// event's own visibility (a post's narrowed visibility; a join's or leave's participant
/// visibility). Fields that do not apply to a kind are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEvent {
    pub seq: u64,
    /// Unix time in milliseconds when the server accepted the event.
    pub ts_ms: u64,
    pub kind: EventKind,
    pub participant_id: String,
    pub nickname: String,
    pub participant_type: ParticipantType,
    pub style: Style,
    pub visibility: Visibility,
    pub text: Option<String>,
    pub after_action: Option<AfterAction>,
    pub reason: Option<Reason>,
    pub userdata: Option<UserdataChanges>,
    /// Structured content of a message or notice (buttons, cards). `text` is its plain-text
    /// fallback, so a text-only client still shows something sensible.
    #[serde(default)]
    pub rich: Option<RichContent>,
}

impl ChatEvent {
    /// An event of `kind` by `participant_id` (also its nickname), regular style, seen by all,
    /// at time 0, with no text, reason or userdata: the start of an event a test or a bot
    /// author builds, with the fields that matter set by struct update.
    pub fn new(
        seq: u64,
        kind: EventKind,
        participant_id: impl Into<String>,
        participant_type: ParticipantType,
    ) -> Self {
        let participant_id = participant_id.into();
        ChatEvent {
            seq,
            ts_ms: 0,
            kind,
            nickname: participant_id.clone(),
            participant_id,
            participant_type,
            style: Style::Regular,
            visibility: Visibility::All,
            text: None,
            after_action: None,
            reason: None,
            userdata: None,
            rich: None,
        }
    }
}

/// Structured content a post may carry besides its text: quick-reply buttons and cards.
///
/// The post's `text` is always the plain-text fallback ([`RichContent::fallback`] writes one that
/// lists the choices). A client that renders buttons sends a button's `payload` as the
/// customer's next message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RichContent {
    #[serde(default)]
    pub buttons: Vec<Button>,
    #[serde(default)]
    pub cards: Vec<Card>,
}

/// A choice the customer can pick: `title` is shown, `payload` is sent back as a message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Button {
    pub title: String,
    #[serde(default)]
    pub payload: String,
}

/// A card (a hero card): title, optional subtitle, text and image, and its own buttons.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Card {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub subtitle: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub image_url: Option<String>,
    #[serde(default)]
    pub buttons: Vec<Button>,
}

/// Most buttons and cards one post may carry (the Chat Server refuses more).
pub const MAX_RICH_ITEMS: usize = 32;

impl RichContent {
    pub fn is_empty(&self) -> bool {
        self.buttons.is_empty() && self.cards.is_empty()
    }

    /// Every button of the content, the cards' first, in order.
    pub fn all_buttons(&self) -> impl Iterator<Item = &Button> {
        self.cards
            .iter()
            .flat_map(|c| c.buttons.iter())
            .chain(self.buttons.iter())
    }

    /// The plain-text form of `text` with this content: the text, each card's title, subtitle
    /// and text, then the choices as a numbered list ("1. Yes"). What a text-only client shows.
    pub fn fallback(&self, text: &str) -> String {
        let mut lines: Vec<String> = Vec::new();
        if !text.is_empty() {
            lines.push(text.to_string());
        }
        for card in &self.cards {
            let mut head = card.title.clone();
            if let Some(sub) = card.subtitle.as_deref().filter(|s| !s.is_empty()) {
                if head.is_empty() {
                    head = sub.to_string();
                } else {
                    head = format!("{head} ({sub})");
                }
            }
            if !head.is_empty() {
                lines.push(head);
            }
            if let Some(t) = card.text.as_deref().filter(|s| !s.is_empty()) {
                lines.push(t.to_string());
            }
            if let Some(url) = card.image_url.as_deref().filter(|s| !s.is_empty()) {
                lines.push(url.to_string());
            }
        }
        for (n, b) in self.all_buttons().enumerate() {
            // A title that already says its number ("1. Inline") is not numbered twice.
            let number = format!("{}", n + 1);
            let numbered = b
                .title
                .strip_prefix(&number)
                .is_some_and(|rest| rest.starts_with(['.', ')', ':']));
            if numbered {
                lines.push(b.title.clone());
            } else {
                lines.push(format!("{number}. {}", b.title));
            }
        }
        lines.join("\n")
    }

    /// Bytes of text the content holds (titles, payloads, texts, urls): what size limits count.
    pub fn text_len(&self) -> usize {
        let button = |b: &Button| b.title.len() + b.payload.len();
        let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        self.buttons.iter().map(button).sum::<usize>()
            + self
                .cards
                .iter()
                .map(|c| {
                    c.title.len()
                        + opt(&c.subtitle)
                        + opt(&c.text)
                        + opt(&c.image_url)
                        + c.buttons.iter().map(button).sum::<usize>()
                })
                .sum::<usize>()
    }

    /// Number of buttons and cards (limited by [`MAX_RICH_ITEMS`]).
    pub fn items(&self) -> usize {
        self.buttons.len()
            + self
                .cards
                .iter()
                .map(|c| 1 + c.buttons.len())
                .sum::<usize>()
    }
}

/// Whom a TCP connection speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRole {
    /// A gateway node of a cluster: fenced by `(cluster_id, epoch)`; its participants detach
    /// (not leave) when the connection drops, and any connection of the cluster may resume them.
    Gateway {
        cluster_id: String,
        epoch: u64,
        node_id: String,
    },
    /// An agent tool or test client: its participants detach too, resumable by agent connections.
    Agent,
}

/// The first frame of every TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub role: ClientRole,
    pub client_name: String,
    /// The token the Chat Server is configured with for this role (a gateway's cluster, or
    /// agents); empty when the server asks for none.
    pub credential: Secret,
}

/// A credential on the wire: its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself: compare it, never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `other` in time that depends on the lengths only.
    pub fn matches(&self, other: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), other.as_bytes())
    }
}

/// Whether two byte strings are equal, in time that depends on their lengths only: for every
/// token and secret comparison (ESP's `auth.token`, the Chat Server's credentials).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub session_id: String,
    pub nickname: String,
    pub participant_type: ParticipantType,
    pub style: Style,
    pub visibility: Visibility,
    /// Deliver every event after this number that the joiner may see (0: the whole history).
    pub since_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    pub session_id: String,
    pub participant_id: String,
    pub since_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostRequest {
    pub session_id: String,
    pub participant_id: String,
    pub kind: PostKind,
    pub text: String,
    pub visibility: Visibility,
    /// Client key: a second post with a key already accepted for this participant is dropped
    /// (answered with the first post's sequence number and `duplicate: true`).
    pub key: Option<String>,
    /// Buttons and cards; `text` is their plain-text fallback.
    #[serde(default)]
    pub rich: Option<RichContent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveRequest {
    pub session_id: String,
    pub participant_id: String,
    pub after_action: AfterAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatRequest {
    Hello(Hello),
    Join(JoinRequest),
    Resume(ResumeRequest),
    Post(PostRequest),
    Leave(LeaveRequest),
    GetUserdata {
        session_id: String,
    },
    UpdateUserdata {
        session_id: String,
        participant_id: String,
        changes: UserdataChanges,
    },
    Ping,
}

/// A client-to-server frame: a request and the client's id for it (echoed in the reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: u64,
    pub request: ChatRequest,
}

/// A [`ClientFrame`] whose request is shared: the ChatLink keeps every request it sends until it
/// is answered, to send it again after a reconnect, and sends it without a copy. The same bytes
/// on the wire as a `ClientFrame`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedClientFrame {
    pub id: u64,
    pub request: std::sync::Arc<ChatRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatResponse {
    Welcome {
        version: u16,
        server_id: String,
        max_frame: u32,
    },
    /// Join or resume accepted. `seq` is the join event's number (for a resume: the session's last
    /// number); events after `since_seq` follow in `Events` frames.
    Joined {
        session_id: String,
        participant_id: String,
        seq: u64,
    },
    Posted {
        seq: u64,
        duplicate: bool,
    },
    Left {
        seq: u64,
    },
    Userdata(Userdata),
    Pong,
}

/// A server-to-client frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    Reply {
        id: u64,
        result: Result<ChatResponse, ChatError>,
    },
    /// Events of one session for one participant of this connection, in order, no gaps among
    /// what it may see, no duplicates.
    Events {
        session_id: String,
        participant_id: String,
        events: Vec<ChatEvent>,
    },
    /// A higher epoch of this connection's cluster exists: every later request is refused.
    Fenced { cluster_id: String, epoch: u64 },
    /// An error that ends the connection (malformed frame, slow reader, shutdown).
    Goodbye(ChatError),
}

/// A stable error code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatError {
    pub code: ChatErrorCode,
    pub message: String,
}

impl ChatError {
    pub fn new(code: ChatErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ChatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ChatError {}

/// Stable error codes of the chat protocol (docs/CHAT.md lists each with its meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatErrorCode {
    BadRequest,
    UnsupportedVersion,
    HandshakeRequired,
    UnknownSession,
    UnknownParticipant,
    SessionExists,
    SessionClosed,
    NotAllowed,
    Fenced,
    LimitExceeded,
    MalformedFrame,
    FrameTooLarge,
    SlowReader,
    ShuttingDown,
    Internal,
    /// The Hello carried no credential, or a wrong one, for its role (appended in protocol 3).
    Unauthorized,
}

impl ChatErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatErrorCode::BadRequest => "bad_request",
            ChatErrorCode::UnsupportedVersion => "unsupported_version",
            ChatErrorCode::HandshakeRequired => "handshake_required",
            ChatErrorCode::UnknownSession => "unknown_session",
            ChatErrorCode::UnknownParticipant => "unknown_participant",
            ChatErrorCode::SessionExists => "session_exists",
            ChatErrorCode::SessionClosed => "session_closed",
            ChatErrorCode::NotAllowed => "not_allowed",
            ChatErrorCode::Fenced => "fenced",
            ChatErrorCode::LimitExceeded => "limit_exceeded",
            ChatErrorCode::MalformedFrame => "malformed_frame",
            ChatErrorCode::FrameTooLarge => "frame_too_large",
            ChatErrorCode::SlowReader => "slow_reader",
            ChatErrorCode::ShuttingDown => "shutting_down",
            ChatErrorCode::Internal => "internal",
            ChatErrorCode::Unauthorized => "unauthorized",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn a_shared_client_frame_is_a_client_frame_on_the_wire() {
        let request = ChatRequest::Post(PostRequest {
            session_id: "s".into(),
            participant_id: "p".into(),
            kind: PostKind::Message,
            text: "hi".into(),
            visibility: Visibility::Int,
            key: Some("k:1:0".into()),
            rich: None,
        });
        let shared = SharedClientFrame {
            id: 9,
            request: std::sync::Arc::new(request.clone()),
        };
        let bytes = encode(&shared).unwrap();
        assert_eq!(
            bytes,
            encode(&ClientFrame {
                id: 9,
                request: request.clone()
            })
            .unwrap()
        );
        let back: ClientFrame = decode(&bytes).unwrap();
        assert_eq!((back.id, back.request), (9, request));
    }

    #[test]
    fn visibility_rules() {
        use ParticipantType::*;
        use Visibility::*;
        assert!(may_see(Customer, All, All));
        assert!(!may_see(Customer, All, Int));
        assert!(!may_see(Customer, All, Vip));
        assert!(may_see(Agent, All, Int));
        assert!(!may_see(Agent, Int, Vip));
        assert!(may_see(Agent, Vip, Vip));
        assert!(may_see(Supervisor, All, Vip));
        assert_eq!(All.narrow(Int), Int);
        assert_eq!(Int.narrow(All), Int);
        assert_eq!(Vip.narrow(All), Vip);
    }

    #[test]
    fn event_round_trips_in_both_forms() {
        let event = ChatEvent {
            seq: 42,
            ts_ms: 1_700_000_000_000,
            kind: EventKind::Userdata,
            participant_id: "p".into(),
            nickname: "Bot".into(),
            participant_type: ParticipantType::Agent,
            style: Style::Bot,
            visibility: Visibility::Int,
            text: None,
            after_action: None,
            reason: Some(Reason::NoAgents),
            userdata: Some([("k".to_string(), None)].into()),
            rich: Some(RichContent {
                buttons: vec![Button {
                    title: "Yes".into(),
                    payload: "yes".into(),
                }],
                cards: vec![],
            }),
        };
        let frame = ServerFrame::Events {
            session_id: "s".into(),
            participant_id: "p".into(),
            events: vec![event.clone()],
        };
        assert_eq!(
            decode::<ServerFrame>(&encode(&frame).unwrap()).unwrap(),
            frame
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "userdata");
        assert_eq!(json["style"], "bot");
        assert_eq!(json["reason"], "no-agents");
        assert_eq!(json["participant_type"], "agent");
        let back: ChatEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        let err = ServerFrame::Reply {
            id: 1,
            result: Err(ChatError::new(ChatErrorCode::Fenced, "epoch 1 < 2")),
        };
        assert_eq!(decode::<ServerFrame>(&encode(&err).unwrap()).unwrap(), err);
    }

    #[test]
    fn rich_content_has_a_plain_text_fallback() {
        let rich = RichContent {
            buttons: vec![
                Button {
                    title: "Billing".into(),
                    payload: "/billing".into(),
                },
                Button {
                    title: "Delivery".into(),
                    payload: "/delivery".into(),
                },
            ],
            cards: vec![Card {
                title: "Premium plan".into(),
                subtitle: Some("25 EUR".into()),
                text: Some("Everything included.".into()),
                image_url: None,
                buttons: vec![Button {
                    title: "Buy".into(),
                    payload: "buy premium".into(),
                }],
            }],
        };
        assert_eq!(
            rich.fallback("Pick one:"),
            "Pick one:\nPremium plan (25 EUR)\nEverything included.\n1. Buy\n2. Billing\n3. Delivery"
        );
        assert_eq!(rich.items(), 4);
        // Titles that say their number already are not numbered twice.
        let said = RichContent {
            buttons: ["1. Inline", "2) Internet", "12 monkeys"]
                .map(|t| Button {
                    title: t.into(),
                    payload: t.into(),
                })
                .to_vec(),
            cards: Vec::new(),
        };
        assert_eq!(said.fallback(""), "1. Inline\n2) Internet\n3. 12 monkeys");
        // JSON may leave out what it does not use.
        let parsed: RichContent = serde_json::from_str(r#"{"buttons":[{"title":"Yes"}]}"#).unwrap();
        assert_eq!(parsed.buttons[0].payload, "");
        assert!(parsed.cards.is_empty());
    }

    #[test]
    fn codes_serialize_as_their_names() {
        for code in [
            ChatErrorCode::BadRequest,
            ChatErrorCode::Fenced,
            ChatErrorCode::SlowReader,
            ChatErrorCode::UnknownParticipant,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
        }
    }
}
