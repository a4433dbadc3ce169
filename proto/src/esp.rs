//! ESP: the control requests a workflow sends to the gateway (service `ChatBotPlatform`).
//!
//! The same types travel as bincode frames over TCP (pipelined, matched by `request_id`) and as
//! JSON over HTTP (`POST /esp`; there the `request_id` is optional and the HTTP status carries the
//! outcome class). docs/ESP.md documents methods, parameters and error codes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the framed ESP protocol, declared in [`EspHello`].
pub const ESP_PROTOCOL_VERSION: u16 = 1;
/// The ESP service name of the gateway.
pub const ESP_SERVICE: &str = "ChatBotPlatform";

/// Key-value lists, as in a workflow: string keys to string values.
pub type KeyValues = BTreeMap<String, String>;

/// First frame of a framed ESP connection, answered by an [`EspResponse`] with request id 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspHello {
    pub version: u16,
    pub client_name: String,
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

/// The answer to one ESP request. On success `result` and `userdata` (the changed keys) apply;
/// on failure `code` (stable), `message` (human) and, for `not_primary`, `primary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspResponse {
    #[serde(default)]
    pub request_id: u64,
    pub status: EspStatus,
    #[serde(default)]
    pub result: KeyValues,
    #[serde(default)]
    pub userdata: KeyValues,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub primary: Option<String>,
}

impl EspResponse {
    pub fn ok(request_id: u64, result: KeyValues) -> Self {
        Self {
            request_id,
            status: EspStatus::Ok,
            result,
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
            result: KeyValues::new(),
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
        let back: EspRequest = decode(&encode(&request).unwrap()).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn response_round_trips() {
        let result = KeyValues::from([("BotInstanceId".to_string(), "b-1".to_string())]);
        let ok = EspResponse::ok(9, result);
        assert_eq!(decode::<EspResponse>(&encode(&ok).unwrap()).unwrap(), ok);
        let err = EspResponse::error(10, "already_running", "bot echo already runs");
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["status"], "error");
        assert_eq!(json["code"], "already_running");
    }
}
