//! Bots kept outside the process, so that a node's restart (or the loss of both nodes) loses no
//! conversation (docs/HA.md 10): the [`DurableStore`] seam the primary writes behind to, and
//! what a node finds there at start. The backends live in the binary (`src/store.rs`: `local`,
//! an embedded database on the node's disk); this crate knows only the seam, and the
//! HaCoordinator drives it: it collects the bots that changed (the latest record of each wins),
//! writes them in one batch at most every `max-lag-ms`, one batch at a time, and keeps going
//! from memory while the store fails.

use std::sync::Arc;

use bgs_proto::ha::ReplicatedBot;
use futures_util::future::BoxFuture;

/// What a node finds in its store at start.
#[derive(Debug, Default)]
pub struct Stored {
    /// The highest epoch written (0: none).
    pub epoch: u64,
    pub bots: Vec<ReplicatedBot>,
}

/// Changes written in one transaction: each changed bot's latest record, the bots that ended,
/// and the node's epoch. `replace` says the records are every bot there is (a promotion writes
/// its whole state once, over whatever the store held).
#[derive(Debug, Default, Clone)]
pub struct StoreBatch {
    pub epoch: u64,
    pub put: Vec<Arc<ReplicatedBot>>,
    pub remove: Vec<String>,
    pub replace: bool,
}

impl StoreBatch {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty() && !self.replace
    }

    /// How many bots it writes or removes.
    pub fn len(&self) -> usize {
        self.put.len() + self.remove.len()
    }
}

/// A store that could not be read or written (its text says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where bots outlive the process. Calls may block on disk or network: a backend does its work
/// off the caller's thread (`spawn_blocking`, or async I/O).
pub trait DurableStore: Send + Sync + 'static {
    /// `local` or `etcd`, as `[store] kind` names it.
    fn kind(&self) -> &'static str;
    /// Every bot of the cluster, and the epoch.
    fn load(&self) -> BoxFuture<'static, Result<Stored, StoreError>>;
    /// Writes one batch, whole or not at all.
    fn write(&self, batch: StoreBatch) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// What `/status` shows of the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoreStatus {
    pub kind: &'static str,
    /// `ok`, or `degraded` while writes fail (the node goes on from memory).
    pub state: &'static str,
    /// Bots changed and not yet written.
    pub pending: usize,
    /// Age of the oldest change not yet written.
    pub lag_seconds: f64,
}
