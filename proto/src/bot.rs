//! One bot record: what identifies a bot instance ([`BotKey`]) and what it was started with
//! ([`BotSpec`]). ESP intake makes the spec, replication carries it (`ha::ReplicatedBot`), and
//! status and reports are made from it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::chat::Visibility;
use crate::esp::StoredKeyValues;

/// Identifies a bot instance: one per (interaction, ChatBotID, ChatBotName).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BotKey {
    pub interaction_id: String,
    pub bot_id: String,
    pub bot_name: String,
}

impl fmt::Display for BotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bot_name.is_empty() {
            write!(f, "{} in {}", self.bot_id, self.interaction_id)
        } else {
            write!(
                f,
                "{}/{} in {}",
                self.bot_id, self.bot_name, self.interaction_id
            )
        }
    }
}

/// A checked StartBot: everything a bot was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotSpec {
    pub key: BotKey,
    pub nickname: String,
    pub visibility: Visibility,
    pub stop_on_agent_arrival: bool,
    pub stop_on_customer_left: bool,
    pub holdup: bool,
    pub category: String,
    pub function: String,
    /// Every other parameter: the bot's start parameters.
    #[serde(deserialize_with = "crate::esp::de_stored")]
    pub parameters: StoredKeyValues,
    #[serde(deserialize_with = "crate::esp::de_stored")]
    pub userdata: StoredKeyValues,
}

impl BotSpec {
    /// A spec with every StartBot option at its default: visible to all, no stop conditions, not
    /// held up, no category or function, no parameters or userdata.
    pub fn new(key: BotKey, nickname: impl Into<String>) -> BotSpec {
        BotSpec {
            key,
            nickname: nickname.into(),
            visibility: Visibility::All,
            stop_on_agent_arrival: false,
            stop_on_customer_left: false,
            holdup: false,
            category: String::new(),
            function: String::new(),
            parameters: StoredKeyValues::new(),
            userdata: StoredKeyValues::new(),
        }
    }
}

impl crate::esp::BotStatus {
    /// The status of a bot started with `spec`, in `state` (`starting` or `running`).
    pub fn of(spec: &BotSpec, instance_id: &str, state: &str, started_ms: u64) -> Self {
        crate::esp::BotStatus {
            instance_id: instance_id.to_string(),
            interaction_id: spec.key.interaction_id.clone(),
            bot_id: spec.key.bot_id.clone(),
            bot_name: spec.key.bot_name.clone(),
            state: state.to_string(),
            reason: None,
            started_ms,
            ended_ms: None,
            nickname: spec.nickname.clone(),
            visibility: spec.visibility.to_string(),
            category: spec.category.clone(),
            function: spec.function.clone(),
            holdup: spec.holdup,
            handoff: None,
        }
    }
}
