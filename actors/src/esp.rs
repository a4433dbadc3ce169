//! ESP requests checked and turned into typed commands, and the stable error codes.
//!
//! Pure functions: the Supervisor calls [`parse`] before anything else, so every transport (HTTP,
//! TCP) gets the same validation and the same answers. docs/ESP.md is the reference.

use std::fmt;

use bgs_proto::chat::Visibility;
use bgs_proto::esp::{EspRequest, EspResponse, KeyValues, ESP_SERVICE};

/// A negative ESP answer: a stable code, the HTTP status that goes with it, a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspError {
    pub code: ErrorCode,
    pub status: u16,
    pub message: String,
    /// For `not_primary`: where the primary is.
    pub primary: Option<String>,
}

impl fmt::Display for EspError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for EspError {}

impl EspError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EspError {
            code,
            status: code.status(),
            message: message.into(),
            primary: None,
        }
    }

    pub fn into_response(self, request_id: u64) -> EspResponse {
        let mut r = EspResponse::error(request_id, self.code.as_str(), self.message);
        r.primary = self.primary;
        r
    }
}

macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:literal, $meaning:literal;)*) => {
        /// Every ESP error code: its wire string, its HTTP status and its meaning, in one table
        /// (docs/ESP.md section 11 documents it), so a code that is not in it cannot compile.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The stable string on the wire (`bad_parameter`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The HTTP status that goes with it.
            pub fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                }
            }

            pub fn meaning(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $meaning,)*
                }
            }
        }
    };
}

error_codes! {
    BadRequest = "bad_request", 400, "the request is not a valid ESP request (body, JSON, frame)";
    UnknownService = "unknown_service", 400, "service is not ChatBotPlatform";
    UnknownMethod = "unknown_method", 400, "method is not StartBot, StopBot, SendDataToBot or GetBotStatus";
    MissingParameter = "missing_parameter", 400, "a required parameter is absent or empty";
    UnknownParameter = "unknown_parameter", 400, "a parameter the method does not take";
    BadChannel = "bad_channel", 400, "_umsChannel is not channel-chatbot";
    MissingInteraction = "missing_interaction", 400, "userdata carries no InteractionId";
    NameTooLong = "name_too_long", 400, "ChatBotID and ChatBotName together have 49 characters or more";
    LabelTooLong = "label_too_long", 400, "ChatBotCategory or ChatBotFunction has more than 50 characters";
    BadBoolean = "bad_boolean", 400, "a boolean parameter is not true or false";
    BadVisibility = "bad_visibility", 400, "Visibility is not ALL, INT or VIP";
    BadParameter = "bad_parameter", 400, "the plugin refused a parameter (for example an unknown ChatBotName)";
    UnknownChatServer = "unknown_chat_server", 400, "userdata ChatServer names a Chat Server this node does not know";
    Unauthorized = "unauthorized", 401, "a token is configured and the request lacks it";
    UnknownBot = "unknown_bot", 404, "no plugin has this ChatBotID";
    NoSuchInstance = "no_such_instance", 404, "no running bot instance matches";
    NoSuchSession = "no_such_session", 404, "the Chat Server has no open session for the interaction";
    AlreadyRunning = "already_running", 409, "the same (interaction, ChatBotID, ChatBotName) is already running";
    Busy = "busy", 503, "the node is overloaded; retry later";
    Capacity = "capacity", 503, "the node holds as many framed ESP connections as node.esp-max-connections allows; reuse a connection or retry later";
    BotUnavailable = "bot_unavailable", 503, "the plugin cannot take a bot now (its process is given up, or it runs max_instances bots)";
    ChatServerUnavailable = "chat_server_unavailable", 503, "the Chat Server cannot be reached";
    NotPrimary = "not_primary", 503, "this node is a backup; the answer names the primary";
    Draining = "draining", 503, "a switchover is in progress; retry shortly";
    Timeout = "timeout", 504, "the request was not processed within esp-proc-timeout";
    Internal = "internal", 500, "an internal error; the log has details";
}

impl ErrorCode {
    /// The code a wire string names, if any.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HTTP status that goes with a wire error code (500 for an unknown one).
pub fn status_of(code: &str) -> u16 {
    ErrorCode::parse(code).map_or(500, ErrorCode::status)
}

pub use bgs_proto::bot::{BotKey, BotSpec};

#[derive(Debug, Clone, PartialEq)]
pub enum EspCommand {
    Start(BotSpec),
    Stop(BotKey),
    SendData {
        key: BotKey,
        data: KeyValues,
    },
    Status {
        interaction_id: String,
        bot_id: Option<String>,
        bot_name: Option<String>,
    },
}

impl EspCommand {
    pub fn method(&self) -> &'static str {
        match self {
            EspCommand::Start(_) => "StartBot",
            EspCommand::Stop(_) => "StopBot",
            EspCommand::SendData { .. } => "SendDataToBot",
            EspCommand::Status { .. } => "GetBotStatus",
        }
    }
}

pub(crate) const CHANNEL: &str = "channel-chatbot";
const START_KEYS: &[&str] = &[
    "ChatBotID",
    "ChatBotName",
    "_umsChannel",
    "Nickname",
    "Visibility",
    "StopBotOnAgentArrival",
    "StopBotOnCustomerLeft",
    "ChatBotHoldup",
    "ChatBotCategory",
    "ChatBotFunction",
];

fn required<'a>(p: &'a KeyValues, key: &str) -> Result<&'a str, EspError> {
    match p.get(key).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(EspError::new(
            ErrorCode::MissingParameter,
            format!("parameter {key} is required"),
        )),
    }
}

fn boolean(p: &KeyValues, key: &str) -> Result<bool, EspError> {
    match p.get(key) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(EspError::new(
            ErrorCode::BadBoolean,
            format!("parameter {key} must be true or false, not {v:?}"),
        )),
    }
}

fn label(p: &KeyValues, key: &str) -> Result<String, EspError> {
    let v = p.get(key).cloned().unwrap_or_default();
    let n = v.chars().count();
    if n > 50 {
        return Err(EspError::new(
            ErrorCode::LabelTooLong,
            format!("parameter {key} has {n} characters; at most 50 are allowed"),
        ));
    }
    Ok(v)
}

fn interaction(userdata: &KeyValues) -> Result<String, EspError> {
    match userdata.get("InteractionId") {
        Some(v) if !v.is_empty() => Ok(v.clone()),
        _ => Err(EspError::new(
            ErrorCode::MissingInteraction,
            "userdata must carry the interaction id under InteractionId",
        )),
    }
}

/// The bot a StopBot/SendDataToBot/StartBot names; checks the combined length rule.
fn bot_key(p: &KeyValues, interaction_id: String) -> Result<BotKey, EspError> {
    let bot_id = required(p, "ChatBotID")?.to_string();
    let bot_name = p.get("ChatBotName").cloned().unwrap_or_default();
    let n = bot_id.chars().count() + bot_name.chars().count();
    if n >= 49 {
        return Err(EspError::new(
            ErrorCode::NameTooLong,
            format!(
                "ChatBotID and ChatBotName have {n} characters together; fewer than 49 are allowed"
            ),
        ));
    }
    Ok(BotKey {
        interaction_id,
        bot_id,
        bot_name,
    })
}

fn no_other_parameters(p: &KeyValues, allowed: &[&str]) -> Result<(), EspError> {
    match p.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(EspError::new(
            ErrorCode::UnknownParameter,
            format!(
                "parameter {k} is not taken by this method (it takes {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// Checks an ESP request and turns it into a command. `chat_server`: the name of the Chat Server
/// this node is attached to (userdata `ChatServer` may name it; nothing else).
pub fn parse(request: &EspRequest, chat_server: &str) -> Result<EspCommand, EspError> {
    if request.service != ESP_SERVICE {
        return Err(EspError::new(
            ErrorCode::UnknownService,
            format!("service must be {ESP_SERVICE}, not {:?}", request.service),
        ));
    }
    let p = &request.parameters;
    match p.get("_umsChannel").map(String::as_str) {
        Some(CHANNEL) => {}
        None | Some("") => {
            return Err(EspError::new(
                ErrorCode::MissingParameter,
                "parameter _umsChannel is required",
            ))
        }
        Some(other) => {
            return Err(EspError::new(
                ErrorCode::BadChannel,
                format!("_umsChannel must be {CHANNEL}, not {other:?}"),
            ))
        }
    }
    if let Some(cs) = request.userdata.get("ChatServer") {
        if cs != chat_server {
            return Err(EspError::new(
                ErrorCode::UnknownChatServer,
                format!("this node serves Chat Server {chat_server:?}, not {cs:?}"),
            ));
        }
    }
    match request.method.as_str() {
        "StartBot" => {
            let key = bot_key(p, interaction(&request.userdata)?)?;
            let visibility = match p.get("Visibility").map(String::as_str) {
                None | Some("") => Visibility::All,
                Some(v) => v
                    .parse()
                    .map_err(|e: String| EspError::new(ErrorCode::BadVisibility, e))?,
            };
            // The nickname is Nickname, else ChatBotName, else ChatBotID: a refusal names the
            // parameter it came from.
            let (nickname, from) = match p.get("Nickname") {
                Some(n) if !n.is_empty() => (n.clone(), "Nickname"),
                _ if !key.bot_name.is_empty() => (key.bot_name.clone(), "ChatBotName"),
                _ => (key.bot_id.clone(), "ChatBotID"),
            };
            if nickname.len() > 128 {
                let message = if from == "Nickname" {
                    "Nickname is longer than 128 bytes".to_string()
                } else {
                    format!(
                        "{from} is longer than 128 bytes, the most a nickname may have (it is the \
                         nickname when Nickname is not given); give a shorter Nickname"
                    )
                };
                return Err(EspError::new(ErrorCode::BadParameter, message));
            }
            let parameters = p
                .iter()
                .filter(|(k, _)| !START_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(EspCommand::Start(BotSpec {
                stop_on_agent_arrival: boolean(p, "StopBotOnAgentArrival")?,
                stop_on_customer_left: boolean(p, "StopBotOnCustomerLeft")?,
                holdup: boolean(p, "ChatBotHoldup")?,
                category: label(p, "ChatBotCategory")?,
                function: label(p, "ChatBotFunction")?,
                key,
                nickname,
                visibility,
                parameters,
                userdata: bgs_proto::esp::stored(&request.userdata),
            }))
        }
        "StopBot" => {
            no_other_parameters(p, &["ChatBotID", "ChatBotName", "_umsChannel"])?;
            Ok(EspCommand::Stop(bot_key(
                p,
                interaction(&request.userdata)?,
            )?))
        }
        "SendDataToBot" => {
            let key = bot_key(p, interaction(&request.userdata)?)?;
            let mut data: KeyValues = request.userdata.clone();
            for (k, v) in p {
                if !["ChatBotID", "ChatBotName", "_umsChannel"].contains(&k.as_str()) {
                    data.insert(k.clone(), v.clone());
                }
            }
            Ok(EspCommand::SendData { key, data })
        }
        "GetBotStatus" => {
            no_other_parameters(p, &["ChatBotID", "ChatBotName", "_umsChannel"])?;
            Ok(EspCommand::Status {
                interaction_id: interaction(&request.userdata)?,
                bot_id: p.get("ChatBotID").filter(|v| !v.is_empty()).cloned(),
                bot_name: p.get("ChatBotName").cloned(),
            })
        }
        other => Err(EspError::new(
            ErrorCode::UnknownMethod,
            format!(
                "method {other:?} is not one of StartBot, StopBot, SendDataToBot, GetBotStatus"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, params: &[(&str, &str)]) -> EspRequest {
        EspRequest {
            request_id: 1,
            service: ESP_SERVICE.into(),
            method: method.into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            userdata: [("InteractionId".to_string(), "i-1".to_string())].into(),
        }
    }

    fn code(method: &str, params: &[(&str, &str)]) -> &'static str {
        parse(&request(method, params), "default")
            .unwrap_err()
            .code
            .as_str()
    }

    const OK: &[(&str, &str)] = &[("ChatBotID", "echo"), ("_umsChannel", "channel-chatbot")];

    #[test]
    fn start_bot_defaults_and_start_parameters() {
        let mut params = OK.to_vec();
        params.push(("Greeting", "hi"));
        params.push(("StopBotOnAgentArrival", "TRUE"));
        let EspCommand::Start(s) = parse(&request("StartBot", &params), "default").unwrap() else {
            panic!()
        };
        assert_eq!(s.nickname, "echo");
        assert_eq!(s.visibility, Visibility::All);
        assert!(s.stop_on_agent_arrival && !s.stop_on_customer_left && !s.holdup);
        assert_eq!(
            s.parameters,
            [("Greeting".to_string(), "hi".to_string())]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn a_long_default_nickname_names_the_parameter_it_came_from() {
        // 40 characters of 4 bytes: under the 49-character rule, over 128 bytes.
        let name = "\u{1F600}".repeat(40);
        let p = [
            ("ChatBotID", "echo"),
            ("_umsChannel", "channel-chatbot"),
            ("ChatBotName", name.as_str()),
        ];
        let e = parse(&request("StartBot", &p), "default").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadParameter);
        assert!(
            e.message
                .starts_with("ChatBotName is longer than 128 bytes"),
            "{}",
            e.message
        );
        let long = "n".repeat(129);
        let mut p = p.to_vec();
        p.push(("Nickname", long.as_str()));
        let e = parse(&request("StartBot", &p), "default").unwrap_err();
        assert_eq!(e.message, "Nickname is longer than 128 bytes");
        p.pop();
        p.push(("Nickname", "Bot"));
        assert!(parse(&request("StartBot", &p), "default").is_ok());
    }

    #[test]
    fn every_rule_has_its_code() {
        assert_eq!(
            code("StartBot", &[("_umsChannel", "channel-chatbot")]),
            "missing_parameter"
        );
        assert_eq!(
            code("StartBot", &[("ChatBotID", "echo")]),
            "missing_parameter"
        );
        assert_eq!(
            code(
                "StartBot",
                &[("ChatBotID", "echo"), ("_umsChannel", "chat")]
            ),
            "bad_channel"
        );
        let id48 = "x".repeat(44);
        let mut p = OK.to_vec();
        p[0] = ("ChatBotID", &id48);
        p.push(("ChatBotName", "abcd"));
        assert!(
            parse(&request("StartBot", &p), "default").is_ok(),
            "48 characters are fine"
        );
        p[2] = ("ChatBotName", "abcde");
        assert_eq!(code("StartBot", &p), "name_too_long");
        let l50 = "c".repeat(50);
        let l51 = "c".repeat(51);
        let mut p = OK.to_vec();
        p.push(("ChatBotCategory", &l50));
        assert!(parse(&request("StartBot", &p), "default").is_ok());
        p.push(("ChatBotFunction", &l51));
        assert_eq!(code("StartBot", &p), "label_too_long");
        let mut p = OK.to_vec();
        p.push(("ChatBotHoldup", "yes"));
        assert_eq!(code("StartBot", &p), "bad_boolean");
        let mut p = OK.to_vec();
        p.push(("Visibility", "all"));
        assert_eq!(code("StartBot", &p), "bad_visibility");
        let mut p = OK.to_vec();
        p.push(("Extra", "x"));
        assert_eq!(code("StopBot", &p), "unknown_parameter");
        assert_eq!(code("Launch", OK), "unknown_method");
        let mut r = request("StartBot", OK);
        r.userdata.clear();
        assert_eq!(
            parse(&r, "default").unwrap_err().code,
            ErrorCode::MissingInteraction
        );
        r.service = "Chat".into();
        assert_eq!(
            parse(&r, "default").unwrap_err().code,
            ErrorCode::UnknownService
        );
        let mut r = request("StartBot", OK);
        r.userdata.insert("ChatServer".into(), "other".into());
        assert_eq!(
            parse(&r, "default").unwrap_err().code,
            ErrorCode::UnknownChatServer
        );
    }

    #[test]
    fn every_code_has_one_string_and_a_status() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert_eq!(ErrorCode::parse(code.as_str()), Some(*code));
            assert_eq!(EspError::new(*code, "x").status, code.status());
            assert_eq!(status_of(code.as_str()), code.status());
        }
        assert_eq!(status_of("no_such_code"), 500);
        assert_eq!(ErrorCode::BotUnavailable.status(), 503);
    }
}
