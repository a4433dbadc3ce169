//! bgs actors: the Supervisor (ESP intake), one SessionActor per chat session, one BotActor per
//! bot instance, a ChatLink per Chat Server connection, and the bot API plugins implement.
//!
//! This crate knows actors and typed messages; sockets and framing live in `src` (see
//! [`chat_link::ChatConnector`]). docs/ARCHITECTURE.md draws the map.

pub mod bot;
pub mod bot_actor;
pub mod chat_link;
pub mod esp;
pub mod ha;
pub mod metrics;
pub mod report;
pub mod session;
pub mod supervisor;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
