//! High availability: the HaCoordinator (one per node) holds the node's role and epoch, runs
//! the HA link to the peer (handshake with a shared secret, heartbeats), replicates every bot
//! start, context save and removal to the backup (batched, acknowledged; a late backup gets a
//! snapshot first), promotes the backup when the primary falls silent, and runs planned
//! switchovers. docs/HA.md.
//!
//! - `state.rs`: the protocol as a pure state machine (`HaState::step(time, input) -> effects`);
//! - `coordinator.rs`: the actor that feeds it and carries its effects out;
//! - `handshake.rs`: the HMAC proof; `state_file.rs`: `ha.state-file`;
//! - the seeded simulation of the pair is in `actors/src/sim` (tests), with the ChatLinks, the bots
//!   and a Chat Server model around these state machines.
//!
//! The socket lives in `src` (an [`HaDialer`] and the listener that sends [`Accepted`]).

use std::io;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::ha::{HaFrame, HaRole};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::messages::{
    Activate, BecomeBackup, BecomePrimary, Deactivate, Drain, PauseEvents, ResumeEvents,
};

mod coordinator;
mod follower;
mod handshake;
mod log;
pub mod state;
mod state_file;
mod status;

pub use coordinator::HaCoordinator;
pub use handshake::{nonce, proof, verify};
pub use state_file::{read_state, write_state, SavedRole};
pub use status::{HaStatus, RoleChange, SwitchoverError, SwitchoverReport};

/// A link to the peer as typed frames.
pub struct HaConnection {
    pub outbound: mpsc::Sender<HaFrame>,
    pub inbound: mpsc::Receiver<HaFrame>,
}

/// How the coordinator reaches its peer (TCP and the proto codec, provided by `src`).
pub trait HaDialer: Send + Sync + 'static {
    fn dial(&self, address: &str) -> BoxFuture<'static, io::Result<HaConnection>>;
}

/// A connection the node's HA listener accepted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Accepted(pub HaConnection);

/// Tells the coordinator what to drive (the Supervisor and the ChatLink are created after it):
/// their messages, as Recipients.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Attach {
    /// The node's role, for the Supervisor's ESP answers.
    pub role: crate::role::RoleView,
    pub become_primary: Recipient<BecomePrimary>,
    pub become_backup: Recipient<BecomeBackup>,
    pub drain: Recipient<Drain>,
    pub activate: Recipient<Activate>,
    pub deactivate: Recipient<Deactivate>,
    pub pause: Recipient<PauseEvents>,
    pub resume: Recipient<ResumeEvents>,
}

/// Planned switchover (this node must be the primary with a backup in sync).
#[derive(Message)]
#[rtype(result = "Result<SwitchoverReport, SwitchoverError>")]
pub struct Switchover;

#[derive(Message)]
#[rtype(result = "HaStatus")]
pub struct GetHaStatus;

/// What a coordinator is configured with.
pub struct HaSettings {
    pub node_id: String,
    pub cluster_id: String,
    pub role: HaRole,
    pub peer: Option<String>,
    pub secret: String,
    pub heartbeat: Duration,
    pub failover_after: Duration,
    /// Sync mode: a bot's save counts when the backup has it.
    pub sync: bool,
    /// This node's HTTP base URL, given to the peer for `not_primary` answers.
    pub http_url: String,
    /// The peer's HTTP base URL when known from configuration.
    pub peer_http: Option<String>,
    /// Where the role and epoch are kept across restarts (`ha.state-file`); `None`: memory only.
    pub state_file: Option<std::path::PathBuf>,
    /// Where bots outlive the process (`[store]`); `None`: memory only.
    pub store: Option<StoreSettings>,
}

/// The durable store a coordinator writes behind to.
pub struct StoreSettings {
    pub store: std::sync::Arc<dyn crate::store::DurableStore>,
    /// The longest a change waits before it is written (`[store] max-lag-ms`).
    pub max_lag: Duration,
    /// What the store held at start (a node starting as primary restores it).
    pub stored: crate::store::Stored,
}

/// The record the HA link carries for an echo bot `id` in `chat-ID`, at `checkpoint`.
#[cfg(test)]
pub(crate) fn replica(id: &str, checkpoint: u64) -> bgs_proto::ha::ReplicatedBot {
    bgs_proto::ha::ReplicatedBot {
        instance_id: id.into(),
        spec: std::sync::Arc::new(bgs_proto::bot::BotSpec::new(
            bgs_proto::bot::BotKey {
                interaction_id: format!("chat-{id}"),
                bot_id: "echo".into(),
                bot_name: String::new(),
            },
            "Bot",
        )),
        participant_id: "p".into(),
        joined_seq: 1,
        started_ms: 0,
        context: None,
        checkpoint_seq: checkpoint,
    }
}
