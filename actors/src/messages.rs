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
    /// Shared with the HA store (a save during the restore copies that one bot).
    pub bots: Vec<std::sync::Arc<ReplicatedBot>>,
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

/// Where sessions and bots replicate their changes, whether a change waits for the backup
/// (`ha.mode = "sync"`), and the node's count of work in flight (what a switchover waits for). In async mode a change is sent and nothing comes back: no reply crosses
/// from the HA coordinator's thread to the bot's for each message.
#[derive(Clone)]
pub struct HaPort {
    to: Shared<Replicate>,
    waits: bool,
    in_flight: InFlight,
}

impl HaPort {
    pub fn new(to: Shared<Replicate>, waits: bool, in_flight: InFlight) -> Self {
        HaPort {
            to,
            waits,
            in_flight,
        }
    }

    /// Counts one piece of work for the switchover's drain (see [`InFlight`]).
    pub fn work(&self) -> Work {
        self.in_flight.enter()
    }

    /// The node's count of work in flight.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
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
        HaPort::new(r.into(), true, InFlight::default())
    }
}

/// The work this node has been given and not finished: chat feeds on their way to sessions,
/// inputs and stops on their way to bots or running in them. Every message that gives work
/// carries a [`Work`] guard, and whoever does the work holds it until the work is done (a bot:
/// until its posts are sent and its save is replicated). A switchover's drain waits for the
/// count to reach zero ([`InFlight::idle`]) after the ChatLink paused its events and ESP stopped
/// taking requests: no message per session or bot at drain time, a few nanoseconds per input
/// (docs/PERFORMANCE.md 5.12). A message that is never delivered (its actor is gone) drops its
/// guard with it, so nothing is counted forever.
#[derive(Clone, Default)]
pub struct InFlight(std::sync::Arc<InFlightCount>);

#[derive(Default)]
pub struct InFlightCount {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One piece of work counted by [`InFlight`]; dropping it ends it.
#[must_use = "work ends when its guard is dropped"]
pub struct Work(Option<std::sync::Arc<InFlightCount>>);

impl InFlight {
    /// Counts one more piece of work until the guard is dropped.
    pub fn enter(&self) -> Work {
        self.0
            .count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Work(Some(self.0.clone()))
    }

    /// How much work is in flight now.
    pub fn count(&self) -> usize {
        self.0.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when no work is in flight (at once if none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a guard dropped in between still wakes this.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Work {
    /// Work that nobody counts (tests that give a bot an input by hand).
    pub fn uncounted() -> Work {
        Work(None)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if c.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                c.idle.notify_waiters();
            }
        }
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Work")
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[tokio::test]
    async fn idle_waits_for_the_last_piece_of_work() {
        let in_flight = InFlight::default();
        in_flight.idle().await; // nothing in flight: at once
        let work: Vec<_> = (0..3).map(|_| in_flight.enter()).collect();
        assert_eq!(in_flight.count(), 3);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        let mut work = work.into_iter();
        drop(work.next());
        drop(work.next());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one piece of work is left");
        drop(work);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("idle once the last guard is dropped")
            .unwrap();
        assert_eq!(in_flight.count(), 0);
    }

    #[test]
    fn uncounted_work_counts_nothing() {
        let in_flight = InFlight::default();
        drop(super::Work::uncounted());
        assert_eq!(in_flight.count(), 0);
    }
}
