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
mod handshake;
pub mod state;
mod state_file;

pub use coordinator::HaCoordinator;
pub use handshake::{nonce, proof, verify};
pub use state_file::{read_state, write_state, SavedRole};

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

/// Why a switchover was refused or given up (the node then stays what it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SwitchoverError {
    #[error("this node is not the primary")]
    NotPrimary,
    #[error("a switchover is already in progress")]
    InProgress,
    #[error("no backup is connected")]
    NoBackup,
    #[error("the node is still starting")]
    Starting,
    #[error("this node stopped being the primary during the switchover")]
    Demoted,
    #[error("the backup went away during the switchover")]
    BackupGone,
    #[error("the backup did not acknowledge every change within 30 s")]
    NotAcknowledged,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SwitchoverReport {
    pub new_epoch: u64,
    pub bots: usize,
    /// From the start of draining until the hand-over was sent (the backup then takes ESP).
    pub drain_ms: u64,
}

#[derive(Message)]
#[rtype(result = "HaStatus")]
pub struct GetHaStatus;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HaStatus {
    pub node_id: String,
    pub cluster_id: String,
    pub role: HaRole,
    pub epoch: u64,
    pub draining: bool,
    pub peer: Option<String>,
    pub peer_connected: bool,
    /// Backup: has the primary's state (snapshot applied, following the stream).
    pub in_sync: bool,
    pub replication_pending: u64,
    pub replication_lag_seconds: f64,
    pub primary_http: Option<String>,
    pub replicated_bots: usize,
    pub switchovers_manual: u64,
    pub switchovers_failover: u64,
    /// The peer's HTTP base URL (configured, or learned in the handshake).
    pub peer_http: Option<String>,
    /// The last role changes of this node, newest last.
    pub recent: Vec<RoleChange>,
}

/// One role change of this node, for operators.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoleChange {
    pub at_ms: u64,
    /// `failover`, `switchover` (handed over or taken over), `fenced`.
    pub kind: String,
    pub role: HaRole,
    pub epoch: u64,
}

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
}
