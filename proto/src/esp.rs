//! ESP: the control requests a workflow sends to the gateway (service `ChatBotPlatform`).
//!
//! The same types travel as bincode frames over TCP (pipelined, matched by `request_id`) and as
//! JSON over HTTP (`POST /esp`; there `request_id` is optional). docs/ESP.md documents methods,
//! parameters and error codes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the framed ESP protocol, declared in [`EspHello`].
/// 2: bot statuses carry `handoff`.
pub const ESP_PROTOCOL_VERSION: u16 = 2;
/// The ESP service name of the gateway.
pub const ESP_SERVICE: &str = "ChatBotPlatform";

/// Key-value lists, as in a workflow: string keys to string values.
pub type KeyValues = BTreeMap<String, String>;

/// The same list kept for the life of a bot (a [`crate::bot::BotSpec`]'s parameters and
/// userdata): a sorted vector, 48 bytes a key instead of a B-tree leaf of 544 bytes for the one
/// key a StartBot usually carries. Same bytes on the wire as [`KeyValues`] (a map).
/// A field of this type deserializes with [`de_stored`] (litemap's own reader trusts the length).
pub type StoredKeyValues = litemap::LiteMap<String, String>;

/// The stored copy of a list (it is sorted already: one pass, no moves).
pub fn stored(kv: &KeyValues) -> StoredKeyValues {
    kv.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A stored list back as a [`KeyValues`] (for a plugin's start, a status).
pub fn unstored(kv: &StoredKeyValues) -> KeyValues {
    kv.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Reads a [`StoredKeyValues`] without trusting the length the bytes declare: litemap's own
/// `Deserialize` reserves the declared count up front, so a replication frame that claims four
/// billion pairs aborted the process (found by the ha_frames fuzz target). Here the reservation is
/// capped and the vector grows only as real pairs arrive; a later duplicate key wins, as in a map.
pub fn de_stored<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoredKeyValues, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = StoredKeyValues;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of strings to strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kv = StoredKeyValues::with_capacity(map.size_hint().unwrap_or(0).min(16));
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if let Some((k, v)) = kv.try_append(k, v) {
                    kv.insert(k, v);
                }
            }
            Ok(kv)
        }
    }
    d.deserialize_map(Pairs)
}

/// First frame of a framed ESP connection; answered by an [`EspResponse`] with request id 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspHello {
    pub version: u16,
    pub client_name: String,
    /// The node's `auth.token`, when it has one.
    pub token: Option<String>,
}

/// What an ESP client sends over TCP: one Hello, then requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EspClientFrame {
    Hello(EspHello),
    Request(EspRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspRequest {
    #[serde(default)]
    pub request_id: u64,
    pub service: String,
    pub method: String,
    #[serde(default)]
    pub parameters: KeyValues,
    #[serde(default)]
    pub userdata: KeyValues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EspStatus {
    Ok,
    Error,
}

/// One bot instance as GetBotStatus reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotStatus {
    pub instance_id: String,
    pub interaction_id: String,
    pub bot_id: String,
    pub bot_name: String,
    /// `starting`, `running` or `finished`.
    pub state: String,
    /// Why it finished (docs/ESP.md lists the reasons); `None` while it runs.
    pub reason: Option<String>,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub nickname: String,
    pub visibility: String,
    pub category: String,
    pub function: String,
    pub holdup: bool,
    /// The hand-off the bot ended with, if it handed the customer over to a person.
    #[serde(default)]
    pub handoff: Option<Handoff>,
}

/// "Hand me to a human": what a bot leaves with when a person should take over. The gateway
/// writes it into the interaction's userdata (docs/PLUGINS.md lists the keys), leaves the chat
/// (reason `bot_left`) and puts it in the bot's report and GetBotStatus (`handoff`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// Why, in a word: `requested` (the customer asked), `turn_limit`, `bot_unavailable` (the
    /// external bot could not be reached), or the bot's own word.
    pub reason: String,
    /// What the bot learnt, for the agent who takes over (may be empty).
    pub summary: String,
    /// Extra userdata for the workflow (for example `RouteTo = "billing"`).
    pub userdata: KeyValues,
    /// For a bot that gives up because it failed (its endpoint is dead): the error, reported as
    /// the bot's `error`.
    pub error: Option<String>,
}

/// What a successful method returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EspResult {
    /// Hello accepted.
    Welcome {
        node_id: String,
    },
    Started {
        instance_id: String,
        participant_id: String,
    },
    Stopped {
        instance_id: String,
    },
    DataSent {
        instance_id: String,
    },
    Status {
        bots: Vec<BotStatus>,
    },
}

/// The answer to one ESP request: a result on success; a stable `code`, a human `message` and,
/// for `not_primary`, the `primary` to ask instead, on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspResponse {
    pub request_id: u64,
    pub status: EspStatus,
    pub result: Option<EspResult>,
    /// Userdata keys the request changed.
    pub userdata: KeyValues,
    pub code: Option<String>,
    pub message: Option<String>,
    pub primary: Option<String>,
}

impl EspResponse {
    pub fn ok(request_id: u64, result: EspResult) -> Self {
        Self {
            request_id,
            status: EspStatus::Ok,
            result: Some(result),
            userdata: KeyValues::new(),
            code: None,
            message: None,
            primary: None,
        }
    }

    pub fn error(request_id: u64, code: &str, message: impl Into<String>) -> Self {
        Self {
            request_id,
            status: EspStatus::Error,
            result: None,
            userdata: KeyValues::new(),
            code: Some(code.to_string()),
            message: Some(message.into()),
            primary: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn request_json_form_matches_the_contract() {
        let json = r#"{"service":"ChatBotPlatform","method":"StartBot",
            "parameters":{"ChatBotID":"echo","_umsChannel":"channel-chatbot"},
            "userdata":{"InteractionId":"i-1"}}"#;
        let request: EspRequest = serde_json::from_str(json).unwrap();
        assert_eq!(request.request_id, 0);
        assert_eq!(request.parameters["ChatBotID"], "echo");
        let framed = EspClientFrame::Request(request);
        let back: EspClientFrame = decode(&encode(&framed).unwrap()).unwrap();
        assert_eq!(back, framed);
    }

    #[test]
    fn response_round_trips() {
        let ok = EspResponse::ok(
            9,
            EspResult::Started {
                instance_id: "b-1".into(),
                participant_id: "p-1".into(),
            },
        );
        assert_eq!(decode::<EspResponse>(&encode(&ok).unwrap()).unwrap(), ok);
        let err = EspResponse::error(10, "already_running", "bot echo already runs");
        assert_eq!(decode::<EspResponse>(&encode(&err).unwrap()).unwrap(), err);
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["status"], "error");
        assert_eq!(json["code"], "already_running");
    }
}
