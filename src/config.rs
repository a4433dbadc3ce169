//! Configuration of a gateway node: a TOML file, every key with a default, `BGS_...` environment
//! variables overriding keys, and checks whose messages name the key. docs/CONFIG.md documents
//! every key; option names of the original product are kept (`[channel-chatbot]`, `[settings]`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bgs_proto::ha::HaRole;
use serde::{Deserialize, Serialize};

/// How the primary waits for the backup (`[ha] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    /// A save goes on before the backup acknowledged it (the default).
    Async,
    /// A bot's next input waits until the backup acknowledged its save.
    Sync,
}

/// The keys whose value is one of a few words, checked before the rest so that the message
/// names the key and the choices.
const CHOICES: &[(&str, &str, &[&str])] = &[
    ("node", "role", &["primary", "backup"]),
    ("ha", "mode", &["async", "sync"]),
    ("store", "kind", &["memory", "local"]),
];

/// Where bots outlive the process (`[store] kind`; docs/HA.md 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Nothing: a node's restart loses its bots (a pair keeps them on the other node).
    Memory,
    /// An embedded database at `[store] path` on this node's disk.
    Local,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// `memory` or `local`; without it, `local` when `path` is set, else `memory`.
    pub kind: Option<StoreKind>,
    /// The database file of `local` (its directory must exist).
    pub path: Option<PathBuf>,
    /// The longest a bot's change waits before it is written.
    pub max_lag_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: None,
            path: None,
            max_lag_ms: 100,
        }
    }
}

impl StoreConfig {
    /// The kind in force.
    pub fn kind(&self) -> StoreKind {
        self.kind.unwrap_or(if self.path.is_some() {
            StoreKind::Local
        } else {
            StoreKind::Memory
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS error is in the message, and not a `source` as well (it would be said twice).
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("bad value for {key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub node: NodeConfig,
    pub ha: HaConfig,
    pub chat_server: ChatServerConfig,
    pub channel_chatbot: ChannelChatbotConfig,
    pub settings: SettingsConfig,
    pub auth: AuthConfig,
    pub bots: BotsConfig,
    pub reporting: ReportingConfig,
    pub log: LogConfig,
    pub plugins: PluginsConfig,
    pub tls: TlsConfig,
    pub store: StoreConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first): with `key-file`, the HTTP, ESP and HA listeners speak
    /// TLS only, and the HA link is dialed with TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates trusted for the HA peer and (with `chat-server.tls`) the Chat Server.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    pub id: String,
    pub cluster_id: String,
    /// The role this node starts in (without a state file).
    pub role: HaRole,
    pub http_listen: SocketAddr,
    pub esp_listen: SocketAddr,
    /// Time an HTTP client has to send a request's head, and then its body (milliseconds).
    pub http_read_timeout_ms: u64,
    /// Time a framed ESP frame may take from its first byte to its last (milliseconds).
    pub esp_frame_timeout_ms: u64,
    /// Framed ESP connections past their Hello at once; one more is refused `capacity`.
    pub esp_max_connections: usize,
    /// HTTP connections at once; beyond it a new one ends the oldest that has not said anything
    /// yet (src/gate.rs), or is closed.
    pub http_max_connections: usize,
    /// HTTP connections at once from one address, the same way.
    pub http_max_connections_per_client: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HaConfig {
    pub listen: SocketAddr,
    pub peer: Option<String>,
    pub peer_http: Option<String>,
    pub secret: String,
    pub heartbeat_interval_ms: u64,
    pub failover_after_ms: u64,
    /// `async` (a bot's save counts at once) or `sync` (it counts when the backup has it).
    pub mode: HaMode,
    /// Keeps this node's role and epoch across restarts; without it a node starts in
    /// `node.role` at epoch 1 (docs/HA.md, "both nodes down").
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChatServerConfig {
    pub address: String,
    /// The name workflows may give in userdata `ChatServer`.
    pub name: String,
    /// The token the Chat Server's `--credentials` file lists for this node's cluster; sent in
    /// the Hello. Absent: a Hello with no credential (a Chat Server without `--credentials`).
    pub credential: Option<String>,
    /// Connect to the Chat Server with TLS, trusting `tls.ca-file`.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChannelChatbotConfig {
    /// Seconds between reconnect attempts after a Chat Server loss (fractions allowed).
    pub ha_chat_reconnecting_delay: f64,
    pub ha_chat_reconnecting_attempts: u32,
    pub ha_bot_recovery_batch: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SettingsConfig {
    /// Seconds an ESP request may take before it gets a negative answer (5..3600).
    pub esp_proc_timeout: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthConfig {
    /// When set, ESP and admin requests need `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BotsConfig {
    /// Longest time a bot may take to handle one input before it is stopped with reason `error`.
    pub handling_timeout_ms: u64,
    /// Seconds finished bot instances stay visible to GetBotStatus.
    pub finished_retention: u64,
    /// Threads (actix arbiters) of their own for sessions and bots; 0: automatic (none on up to 2
    /// cores: the main thread; one per core but one beyond).
    pub arbiters: usize,
    /// Messages and notices one input of a bot may post; the rest are left out with a notice.
    pub max_posts_per_input: usize,
    /// Chat events one bot may cause in a minute; beyond it the bot is stopped with a hand-off.
    pub max_events_per_minute: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReportingConfig {
    /// JSON-lines file for per-bot-session reports; absent: reports go to the log only.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    pub json: bool,
    /// A tracing filter (`info`, `bgs=debug,actix=warn`); `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginsConfig {
    /// A folder of process plugins: each subfolder with a `plugin.toml` is one plugin.
    pub dir: Option<PathBuf>,
    pub scripted: ScriptedConfig,
    pub faulty: FaultyConfig,
    pub webhook: WebhookConfig,
    pub botframework: BotFrameworkConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint name (the StartBot `ChatBotName`) to its settings.
    pub endpoints: BTreeMap<String, WebhookEndpoint>,
}

/// One external webhook bot (Rasa's REST channel shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    pub url: String,
    /// Time for one attempt, milliseconds.
    #[serde(default = "default_webhook_timeout", alias = "timeout-ms")]
    pub timeout_ms: u64,
    /// Attempts after the first one fails (a connection error, a timeout, a 5xx or a 429).
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
    /// Extra request headers (for example an `Authorization` the endpoint wants).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Follow redirects to the same origin (scheme, host, port); never to another. Default: no
    /// redirect is followed.
    #[serde(default, alias = "follow-redirects")]
    pub follow_redirects: bool,
    /// Userdata written when the bot gives up (the endpoint cannot be reached).
    #[serde(default, alias = "handoff-userdata")]
    pub handoff_userdata: BTreeMap<String, String>,
    /// Told to the customer (a notice) when the bot gives up.
    #[serde(default = "default_unavailable_notice", alias = "unavailable-notice")]
    pub unavailable_notice: String,
}

fn default_webhook_timeout() -> u64 {
    3000
}
fn default_webhook_retries() -> u32 {
    2
}
fn default_unavailable_notice() -> String {
    "Sorry, our assistant is not available right now. Let me find a person who can help you.".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotFrameworkConfig {
    /// The `serviceUrl` given to bots: this node's HTTP base as the bots reach it. Default:
    /// `http://` and `node.http-listen` (the bound address).
    #[serde(alias = "service-url")]
    pub service_url: Option<String>,
    /// Bot name (the StartBot `ChatBotName`) to its settings.
    pub bots: BTreeMap<String, BotFrameworkBot>,
}

/// One Bot Framework bot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotFrameworkBot {
    /// The bot's messaging endpoint (`http://127.0.0.1:3978/api/messages`).
    pub endpoint: String,
    /// The bot's Microsoft app id and secret; absent for a local bot with no authentication.
    #[serde(default, alias = "app-id")]
    pub app_id: Option<String>,
    #[serde(default, alias = "app-password")]
    pub app_password: Option<String>,
    /// The Entra ID tenant that issues the gateway's tokens for this bot.
    #[serde(default = "default_bf_tenant")]
    pub tenant: String,
    /// The token endpoint the gateway gets its tokens from; default Entra ID's for `tenant`.
    #[serde(default, alias = "token-url")]
    pub token_url: Option<String>,
    /// With an app id: a JWKS file with the keys the bot's tokens are signed with, instead of
    /// the OpenID metadata's.
    #[serde(default, alias = "token-keys")]
    pub token_keys: Option<PathBuf>,
    /// With an app id: the OpenID metadata whose keys sign the bot's tokens.
    #[serde(default, alias = "openid-metadata")]
    pub openid_metadata: Option<String>,
    /// With an app id: the issuers the bot's tokens may come from.
    #[serde(default, alias = "token-issuers")]
    pub token_issuers: Option<Vec<String>>,
    /// Time the bot has for one turn (its answer to one activity), milliseconds.
    #[serde(default = "default_bf_timeout", alias = "timeout-ms")]
    pub timeout_ms: u64,
    /// Told to the customer (a notice) when the bot gives up because it cannot be reached.
    #[serde(default = "default_unavailable_notice", alias = "unavailable-notice")]
    pub unavailable_notice: String,
    /// Userdata written when the bot gives up.
    #[serde(default, alias = "handoff-userdata")]
    pub handoff_userdata: BTreeMap<String, String>,
}

fn default_bf_tenant() -> String {
    "botframework.com".into()
}
fn default_bf_timeout() -> u64 {
    8000
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScriptedConfig {
    /// Script name (the StartBot `ChatBotName`) to a TOML script file. `demo` is built in.
    pub scripts: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FaultyConfig {
    /// Enables the `faulty` diagnostic bot (panics, errors or stalls on command).
    pub enabled: bool,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "bgs-a".into(),
            cluster_id: "bgs".into(),
            role: HaRole::Primary,
            http_listen: addr("127.0.0.1:7080"),
            esp_listen: addr("127.0.0.1:7010"),
            http_read_timeout_ms: 10_000,
            esp_frame_timeout_ms: 10_000,
            esp_max_connections: 1000,
            http_max_connections: 1000,
            http_max_connections_per_client: 256,
        }
    }
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            listen: addr("127.0.0.1:7090"),
            peer: None,
            peer_http: None,
            secret: "change-me".into(),
            heartbeat_interval_ms: 100,
            failover_after_ms: 1000,
            mode: HaMode::Async,
            state_file: None,
        }
    }
}

impl Default for ChatServerConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:7100".into(),
            name: "ChatServer".into(),
            credential: None,
            tls: false,
        }
    }
}

impl Default for ChannelChatbotConfig {
    fn default() -> Self {
        Self {
            ha_chat_reconnecting_delay: 10.0,
            ha_chat_reconnecting_attempts: 15,
            ha_bot_recovery_batch: 200,
        }
    }
}

impl Default for SettingsConfig {
    fn default() -> Self {
        Self {
            esp_proc_timeout: 60,
        }
    }
}

impl Default for BotsConfig {
    fn default() -> Self {
        Self {
            handling_timeout_ms: 10_000,
            finished_retention: 3600,
            arbiters: 0,
            max_posts_per_input: 20,
            max_events_per_minute: 120,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            json: false,
            level: "info".into(),
        }
    }
}

/// The environment variable that overrides `section.key`: `BGS_` + upper case, `-` and `.` as `_`.
pub fn env_name(section: &str, key: &str) -> String {
    format!("BGS_{section}_{key}")
        .to_uppercase()
        .replace(['-', '.'], "_")
}

/// A value from the environment as TOML: a number, boolean or quoted string if it parses as one,
/// else the raw text as a string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

impl Config {
    /// Reads `path` (or only defaults), applies `BGS_...` overrides from `env`, checks the result.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                path: p.to_path_buf(),
                error,
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, env)
    }

    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        // Every scalar key of the defaults can be overridden from the environment.
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut keys: Vec<(String, String)> = Vec::new();
        for (section, value) in &defaults {
            if let toml::Value::Table(t) = value {
                for key in t.keys() {
                    keys.push((section.clone(), key.clone()));
                }
            }
        }
        // Optional keys are absent from the serialized defaults; list them too.
        for (section, key) in [
            ("ha", "peer"),
            ("ha", "peer-http"),
            ("ha", "state-file"),
            ("auth", "token"),
            ("chat-server", "credential"),
            ("tls", "cert-file"),
            ("tls", "key-file"),
            ("tls", "ca-file"),
            ("reporting", "file"),
            ("plugins", "dir"),
            ("store", "kind"),
            ("store", "path"),
        ] {
            keys.push((section.into(), key.into()));
        }
        for (section, key) in keys {
            if let Some(raw) = env(&env_name(&section, &key)) {
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    let value = match key.as_str() {
                        // Addresses, ids and paths stay strings even when they look like numbers.
                        "id" | "cluster-id" | "role" | "address" | "name" | "secret" | "token"
                        | "credential" | "cert-file" | "key-file" | "ca-file" | "file" | "peer"
                        | "peer-http" | "level" | "mode" | "state-file" | "dir" | "kind"
                        | "path" => toml::Value::String(raw),
                        _ => env_value(&raw),
                    };
                    t.insert(key, value);
                }
            }
        }
        for (section, key, words) in CHOICES {
            let value = table.get(*section).and_then(|s| s.get(*key)).map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            });
            if let Some(v) = value.filter(|v| !words.contains(&v.as_str())) {
                return Err(invalid(
                    &format!("{section}.{key}"),
                    format!("must be {}, not {v:?}", words.join(" or ")),
                ));
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.kind() == StoreKind::Local && self.store.path.is_none() {
            return Err(invalid(
                "store.path",
                "kind \"local\" needs a path (the database file, in an existing directory)",
            ));
        }
        if !(1..=60_000).contains(&self.store.max_lag_ms) {
            return Err(invalid("store.max-lag-ms", "must be 1 to 60000"));
        }
        if self.node.id.is_empty() {
            return Err(invalid("node.id", "must not be empty"));
        }
        if self.node.cluster_id.is_empty() {
            return Err(invalid("node.cluster-id", "must not be empty"));
        }
        if !(100..=600_000).contains(&self.node.http_read_timeout_ms) {
            return Err(invalid(
                "node.http-read-timeout-ms",
                format!(
                    "must be 100 to 600000, not {}",
                    self.node.http_read_timeout_ms
                ),
            ));
        }
        if !(100..=600_000).contains(&self.node.esp_frame_timeout_ms) {
            return Err(invalid(
                "node.esp-frame-timeout-ms",
                format!(
                    "must be 100 to 600000, not {}",
                    self.node.esp_frame_timeout_ms
                ),
            ));
        }
        for (key, n) in [
            ("node.esp-max-connections", self.node.esp_max_connections),
            ("node.http-max-connections", self.node.http_max_connections),
            (
                "node.http-max-connections-per-client",
                self.node.http_max_connections_per_client,
            ),
        ] {
            if !(2..=1_000_000).contains(&n) {
                return Err(invalid(key, format!("must be 2 to 1000000, not {n}")));
            }
        }
        if self.node.role == HaRole::Backup && self.ha.peer.is_none() {
            return Err(invalid(
                "node.role",
                "backup needs ha.peer (the primary's HA address)",
            ));
        }
        if self.ha.peer.is_some() && self.ha.secret.is_empty() {
            return Err(invalid(
                "ha.secret",
                "must not be empty when ha.peer is set",
            ));
        }
        if !(5..=3600).contains(&self.settings.esp_proc_timeout) {
            return Err(invalid(
                "settings.esp-proc-timeout",
                format!(
                    "must be 5 to 3600 seconds, not {}",
                    self.settings.esp_proc_timeout
                ),
            ));
        }
        let delay = self.channel_chatbot.ha_chat_reconnecting_delay;
        if !(delay.is_finite() && (0.0..=86400.0).contains(&delay)) {
            return Err(invalid(
                "channel-chatbot.ha-chat-reconnecting-delay",
                format!("must be 0 to 86400 seconds, not {delay}"),
            ));
        }
        if self.channel_chatbot.ha_chat_reconnecting_attempts > 1_000_000 {
            return Err(invalid(
                "channel-chatbot.ha-chat-reconnecting-attempts",
                "must be 0 to 1000000",
            ));
        }
        if !(1..=1_000_000).contains(&self.channel_chatbot.ha_bot_recovery_batch) {
            return Err(invalid(
                "channel-chatbot.ha-bot-recovery-batch",
                "must be 1 to 1000000",
            ));
        }
        if self.chat_server.address.is_empty() {
            return Err(invalid("chat-server.address", "must not be empty"));
        }
        if self.bots.handling_timeout_ms < 10 {
            return Err(invalid("bots.handling-timeout-ms", "must be at least 10"));
        }
        if !(1..=1000).contains(&self.bots.max_posts_per_input) {
            return Err(invalid("bots.max-posts-per-input", "must be 1 to 1000"));
        }
        if !(1..=100_000).contains(&self.bots.max_events_per_minute) {
            return Err(invalid("bots.max-events-per-minute", "must be 1 to 100000"));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid(
                "log.level",
                "must not be empty (info, warn, or a tracing filter)",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", format!("not a tracing filter: {e}")));
        }
        if self.auth.token.as_deref() == Some("") {
            return Err(invalid(
                "auth.token",
                "must not be empty when set (remove the key to disable)",
            ));
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => return Err(invalid("tls.key-file", "is needed with tls.cert-file")),
            (None, Some(_)) => return Err(invalid("tls.cert-file", "is needed with tls.key-file")),
            _ => {}
        }
        if self.tls.ca_file.is_none() {
            if self.chat_server.tls {
                return Err(invalid(
                    "tls.ca-file",
                    "is needed with chat-server.tls (the CA that signed the Chat Server's certificate)",
                ));
            }
            if self.tls.cert_file.is_some() && self.ha.peer.is_some() {
                return Err(invalid(
                    "tls.ca-file",
                    "is needed with tls.cert-file in a pair (the CA that signed the peer's certificate)",
                ));
            }
        }
        if self.chat_server.credential.as_deref() == Some("") {
            return Err(invalid(
                "chat-server.credential",
                "must not be empty when set (remove the key to send none)",
            ));
        }
        if self.ha.heartbeat_interval_ms == 0
            || self.ha.failover_after_ms <= self.ha.heartbeat_interval_ms
        {
            return Err(invalid(
                "ha.failover-after-ms",
                "must be larger than ha.heartbeat-interval-ms, which must be at least 1",
            ));
        }
        Ok(())
    }

    pub fn reconnect_delay(&self) -> Duration {
        Duration::from_secs_f64(self.channel_chatbot.ha_chat_reconnecting_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_toml("", no_env).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.settings.esp_proc_timeout, 60);
        assert_eq!(c.channel_chatbot.ha_chat_reconnecting_attempts, 15);
    }

    #[test]
    fn a_log_section_without_level_still_logs() {
        let c = Config::from_toml("[log]\njson = true\n", no_env).unwrap();
        assert_eq!(c.log.level, "info");
    }

    #[test]
    fn environment_overrides_keys() {
        let env = |k: &str| match k {
            "BGS_SETTINGS_ESP_PROC_TIMEOUT" => Some("120".to_string()),
            "BGS_CHANNEL_CHATBOT_HA_CHAT_RECONNECTING_DELAY" => Some("0.5".to_string()),
            "BGS_NODE_ID" => Some("42".to_string()),
            "BGS_AUTH_TOKEN" => Some("s3cret".to_string()),
            "BGS_PLUGINS_DIR" => Some("plugins".to_string()),
            _ => None,
        };
        let c = Config::from_toml("[settings]\nesp-proc-timeout = 30\n", env).unwrap();
        assert_eq!(c.settings.esp_proc_timeout, 120);
        assert_eq!(c.channel_chatbot.ha_chat_reconnecting_delay, 0.5);
        assert_eq!(c.node.id, "42");
        assert_eq!(c.auth.token.as_deref(), Some("s3cret"));
        assert_eq!(c.plugins.dir.as_deref(), Some(Path::new("plugins")));
    }

    #[test]
    fn connector_tables_are_typed() {
        let c = Config::from_toml(
            "[plugins.webhook.endpoints.faq]\nurl = \"http://x/\"\ntimeout-ms = 500\n\
             [plugins.botframework.bots.hd]\nendpoint = \"http://y/\"\napp_id = \"a\"\n",
            no_env,
        )
        .unwrap();
        let faq = &c.plugins.webhook.endpoints["faq"];
        assert_eq!((faq.timeout_ms, faq.retries), (500, 2));
        assert_eq!(
            c.plugins.botframework.bots["hd"].app_id.as_deref(),
            Some("a")
        );
        let e = Config::from_toml("[plugins.webhook.endpoints.faq]\ntimeout_ms = 5\n", no_env)
            .unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
        let e = Config::from_toml(
            "[plugins.webhook.endpoints.faq]\nurl = \"http://x/\"\nretry = 1\n",
            no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("retry"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[settings]\nesp-proc-timeout = 2\n", no_env).unwrap_err();
        assert!(e.to_string().contains("settings.esp-proc-timeout"), "{e}");
        let e = Config::from_toml("[settings]\nesp-proc-timout = 20\n", no_env).unwrap_err();
        assert!(e.to_string().contains("esp-proc-timout"), "{e}");
        let e = Config::from_toml(
            "[channel-chatbot]\nha-chat-reconnecting-attempts = \"x\"\n",
            no_env,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("ha-chat-reconnecting-attempts"),
            "{e}"
        );
        let e = Config::from_toml("[node]\nrole = \"leader\"\n", no_env).unwrap_err();
        assert!(e.to_string().contains("node.role"), "{e}");
        assert!(e.to_string().contains("must be primary or backup"), "{e}");
        let e = Config::from_toml("[ha]\nmode = \"fast\"\n", no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad value for ha.mode: must be async or sync, not \"fast\""
        );
        let c = Config::from_toml("[ha]\nmode = \"sync\"\n", no_env).unwrap();
        assert_eq!(c.ha.mode, HaMode::Sync);
    }

    #[test]
    fn the_spec_sample_parses() {
        let sample = r#"
[node]
id = "bgs-a"
cluster-id = "bgs"
role = "primary"
http-listen = "127.0.0.1:7080"
esp-listen = "127.0.0.1:7010"
[ha]
listen = "127.0.0.1:7090"
peer = "127.0.0.1:7091"
peer-http = "http://127.0.0.1:7081"
secret = "change-me"
heartbeat-interval-ms = 100
failover-after-ms = 1000
[chat-server]
address = "127.0.0.1:7100"
[channel-chatbot]
ha-chat-reconnecting-delay = 10
ha-chat-reconnecting-attempts = 15
[settings]
esp-proc-timeout = 60
[auth]
token = "abc"
[plugins.webhook.endpoints.faq]
url = "http://127.0.0.1:5005/webhooks/rest/webhook"
[plugins.botframework.bots.helpdesk]
endpoint = "http://127.0.0.1:3978/api/messages"
"#;
        let c = Config::from_toml(sample, no_env).unwrap();
        assert_eq!(c.channel_chatbot.ha_chat_reconnecting_delay, 10.0);
        assert_eq!(c.ha.peer.as_deref(), Some("127.0.0.1:7091"));
    }
}
