//! The messages between the node's actors that no one actor owns: what the HA coordinator
//! tells the Supervisor and the ChatLink (the role itself is shared: `role::RoleView`), what sessions and bots tell the HA coordinator, what
//! the ChatLink tells the HA coordinator. Every actor imports this leaf; it imports no actor, so
//! the actors do not import each other in a circle. Actors hold `Recipient`s of these, never
//! each other's concrete types.

use actix::prelude::*;
use bgs_proto::ha::{HaOp, ReplicatedBot};

/// Replicate one change. Resolves when the backup has it (sync mode), else at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replicate(pub HaOp);

/// The Chat Server fenced this node: a newer epoch of the cluster is connected.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChatFenced;

/// Connect (or reconnect) as the primary of the cluster with this epoch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Activate {
    pub epoch: u64,
}

/// Drop the connection and every route: this node is no longer the primary.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deactivate;

/// Stop routing chat events (a switchover is draining); requests still go out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PauseEvents;

/// Route chat events again (a switchover was abandoned).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResumeEvents;

/// This node became the primary: bring every replicated bot back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BecomePrimary {
    pub bots: Vec<ReplicatedBot>,
}

/// This node became a backup: drop every bot without a leave (they go on at the primary).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BecomeBackup;

/// Switchover: let every bot finish what it has, then answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// A `Recipient` shared by many holders. Cloning a `Recipient` allocates three times (about 130
/// bytes that each clone keeps for its life); cloning this is one atomic increment. A node hands
/// the same one to each of its sessions and bots (docs/PERFORMANCE.md, the memory of a bot).
pub struct Shared<M>(std::sync::Arc<Recipient<M>>)
where
    M: Message + Send,
    M::Result: Send;

impl<M> Clone for Shared<M>
where
    M: Message + Send,
    M::Result: Send,
{
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<M> std::ops::Deref for Shared<M>
where
    M: Message + Send,
    M::Result: Send,
{
    type Target = Recipient<M>;

    fn deref(&self) -> &Recipient<M> {
        &self.0
    }
}

impl<M> From<Recipient<M>> for Shared<M>
where
    M: Message + Send,
    M::Result: Send,
{
    fn from(r: Recipient<M>) -> Self {
        Shared(std::sync::Arc::new(r))
    }
}

/// Where sessions and bots replicate their changes, and whether a change waits for the backup
/// (`ha.mode = "sync"`). In async mode a change is sent and nothing comes back: no reply crosses
/// from the HA coordinator's thread to the bot's for each message.
#[derive(Clone)]
pub struct HaPort {
    to: Shared<Replicate>,
    waits: bool,
}

impl HaPort {
    pub fn new(to: Shared<Replicate>, waits: bool) -> Self {
        HaPort { to, waits }
    }

    /// Sends the change now (changes keep their order); the future resolves once it counts:
    /// at once in async mode, when the backup has it in sync mode.
    pub fn replicate(&self, op: HaOp) -> impl std::future::Future<Output = ()> + 'static {
        let waiting = if self.waits {
            Some(self.to.send(Replicate(op)))
        } else {
            self.to.do_send(Replicate(op));
            None
        };
        async move {
            if let Some(w) = waiting {
                let _ = w.await;
            }
        }
    }

    /// Sends a change nobody waits for.
    pub fn tell(&self, op: HaOp) {
        self.to.do_send(Replicate(op));
    }
}

/// A port that waits for every change (what tests hand their probes).
impl From<Recipient<Replicate>> for HaPort {
    fn from(r: Recipient<Replicate>) -> Self {
        HaPort::new(r.into(), true)
    }
}

/// One switchover drain, carried by every message of it: each session and each bot holds a
/// clone until it has handled what it was given before, and when the last clone is dropped the
/// drain is complete. A node with 100 000 sessions drains with 100 000 plain messages and no
/// future per session (docs/PERFORMANCE.md 5.6). A message that cannot be delivered (its actor
/// is gone) drops its clone at once. It is mini-redis's shutdown idiom: a channel nobody sends
/// on, whose receiver ends when the last sender is dropped.
#[derive(Clone)]
pub(crate) struct DrainToken {
    _held: tokio::sync::mpsc::Sender<()>,
}

/// Resolves once every clone of its [`DrainToken`] has been dropped.
pub(crate) struct DrainDone(tokio::sync::mpsc::Receiver<()>);

impl DrainToken {
    pub(crate) fn new() -> (DrainToken, DrainDone) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (DrainToken { _held: tx }, DrainDone(rx))
    }
}

impl DrainDone {
    pub(crate) async fn wait(mut self) {
        // Nothing is ever sent: this returns None when the last token is gone.
        let _ = self.0.recv().await;
    }

    #[cfg(test)]
    fn is_done(&mut self) -> bool {
        matches!(
            self.0.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::DrainToken;

    #[test]
    fn a_drain_completes_when_the_last_holder_lets_go() {
        let (token, mut done) = DrainToken::new();
        let held: Vec<DrainToken> = (0..3).map(|_| token.clone()).collect();
        drop(token);
        assert!(!done.is_done(), "three holders are still busy");
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        assert!(!done.is_done(), "one holder is still busy");
        drop(held);
        assert!(done.is_done());
    }
}
