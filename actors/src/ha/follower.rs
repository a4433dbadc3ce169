//! A backup's side of the HA link: what it applied of the primary's stream, whether it holds
//! the primary's whole state, when it last heard from it, which run of the primary that state
//! is of, and a snapshot being received in chunks. Plain data that `HaState` owns and drives.

use std::sync::Arc;

use bgs_proto::ha::{HaOp, ReplicatedBot};

use super::state::{apply, Store};

#[derive(Debug)]
pub(super) struct Follower {
    /// The last op applied (from a snapshot or the stream).
    pub(super) applied: u64,
    /// The primary's whole snapshot is applied, and the stream follows it.
    pub(super) in_sync: bool,
    /// When the primary was last heard from (a failover counts silence from here).
    pub(super) last_heard: u64,
    /// The run of the primary whose state this node holds, and of the one it is linking to.
    synced_run: Option<String>,
    pending_run: Option<String>,
    /// Snapshot chunks received so far.
    staging: Store,
}

/// An `Ops` frame that does not follow what was applied: only a new snapshot can repair it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Gap;

impl Follower {
    pub(super) fn new(now_ms: u64) -> Self {
        Follower {
            applied: 0,
            in_sync: false,
            last_heard: now_ms,
            synced_run: None,
            pending_run: None,
            staging: Store::new(),
        }
    }

    /// A primary of run `run_id` welcomed this node; its snapshot follows.
    pub(super) fn linking(&mut self, run_id: String, now_ms: u64) {
        self.pending_run = Some(run_id);
        self.last_heard = now_ms;
        self.in_sync = false;
    }

    /// The welcoming primary is another run than the one whose state this node holds: it
    /// restarted, and lost what it had.
    pub(super) fn restarted(&self, run_id: &str) -> bool {
        self.synced_run.as_ref().is_some_and(|r| r != run_id)
    }

    /// One chunk of a snapshot; with the last one, the whole new state. Chunks go to a staging
    /// copy: the state held so far stays whole until the last chunk arrives (a snapshot cut in
    /// the middle changes nothing).
    pub(super) fn chunk(
        &mut self,
        bots: Vec<ReplicatedBot>,
        first: bool,
        last: bool,
        upto_op: u64,
    ) -> Option<Store> {
        if first {
            self.staging.clear();
        }
        self.staging.extend(
            bots.into_iter()
                .map(|b| (b.instance_id.clone(), Arc::new(b))),
        );
        if !last {
            return None;
        }
        self.synced_run = self.pending_run.clone();
        self.applied = upto_op;
        self.in_sync = true;
        Some(std::mem::take(&mut self.staging))
    }

    /// Applies the ops of an `Ops` frame starting at `first_op` to `store`.
    pub(super) fn apply_ops(
        &mut self,
        store: &mut Store,
        first_op: u64,
        ops: Vec<HaOp>,
    ) -> Result<(), Gap> {
        if !self.in_sync || first_op != self.applied + 1 {
            return Err(Gap);
        }
        for op in ops {
            apply(store, op);
            self.applied += 1;
        }
        Ok(())
    }

    /// No longer following a primary (demoted, or promoted).
    pub(super) fn stop(&mut self, now_ms: u64) {
        self.in_sync = false;
        self.last_heard = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot(id: &str) -> ReplicatedBot {
        super::super::replica(id, 1)
    }

    #[test]
    fn a_snapshot_counts_only_when_whole_and_the_stream_must_follow_it() {
        let mut f = Follower::new(0);
        f.linking("run-1".into(), 5);
        assert_eq!(f.chunk(vec![bot("a")], true, false, 9), None);
        // Cut: a new snapshot starts over; the first chunk's bot is not kept.
        assert_eq!(f.chunk(vec![bot("b")], true, false, 9), None);
        let store = f.chunk(vec![bot("c")], false, true, 9).expect("whole");
        assert_eq!(store.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(f.in_sync && f.applied == 9);
        assert!(!f.restarted("run-1"));
        assert!(f.restarted("run-2"), "another run lost the state");

        let mut store = store;
        let op = |seq| HaOp::Checkpoint {
            instance_id: "b".into(),
            checkpoint_seq: seq,
        };
        assert_eq!(f.apply_ops(&mut store, 11, vec![op(5)]), Err(Gap));
        assert_eq!(f.apply_ops(&mut store, 10, vec![op(5), op(6)]), Ok(()));
        assert_eq!((f.applied, store["b"].checkpoint_seq), (11, 6));
        f.stop(20);
        assert_eq!(
            f.apply_ops(&mut store, 12, vec![op(7)]),
            Err(Gap),
            "not following"
        );
    }
}
