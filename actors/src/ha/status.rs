//! What the HA state machine reports: its status, its role changes, a switchover's outcome.

use bgs_proto::ha::HaRole;

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

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HaStatus {
    /// The durable store, when one is configured.
    pub store: Option<crate::store::StoreStatus>,
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
