//! The node's role as every part of the node sees it: one view, written by the HaCoordinator
//! (from its state machine's `SetRole`) and read by the Supervisor to answer ESP. The ChatLink's
//! connection follows the role through `Activate` and `Deactivate` (it is behaviour, not a copy).

use std::sync::{Arc, RwLock};

/// What ESP answers depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub primary: bool,
    /// A switchover is draining the node.
    pub draining: bool,
    /// A primary that waits to restore the bots of its durable store (HA.md 10): ESP is asked
    /// to retry, so that no bot starts twice in a chat.
    pub restoring: bool,
    /// Where the primary answers, for `not_primary` answers (on a backup).
    pub primary_url: Option<String>,
}

/// The one shared view of the node's role (a backup until the HaCoordinator says otherwise).
#[derive(Debug, Clone, Default)]
pub struct RoleView(Arc<RwLock<Role>>);

impl RoleView {
    pub fn get(&self) -> Role {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, role: Role) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = role;
    }
}
