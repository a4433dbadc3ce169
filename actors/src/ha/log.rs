//! The primary's log of replicated changes: op numbers, the group commit into `Ops` frames, the
//! backup's acknowledgements, the lag, and the waiters of sync mode. Plain data that `HaState`
//! owns and drives; it decides nothing about links or roles.

use std::collections::{BTreeMap, VecDeque};

use bgs_proto::ha::{HaFrame, HaOp};

use super::state::OPS_PER_FRAME;

#[derive(Debug)]
pub(super) struct PrimaryLog {
    next_op: u64,
    /// Sent and not yet acknowledged: each op's number and when it was queued (the lag).
    unacked: VecDeque<(u64, u64)>,
    /// Queued for the next `Ops` frame.
    outbox: Vec<HaOp>,
    flush_scheduled: bool,
    acked: u64,
    /// Sync mode: who waits for which op.
    waiters: BTreeMap<u64, Vec<u64>>,
    /// The op number the last snapshot covered (the backup holds this node's state once it
    /// acknowledges it).
    snapshot_upto: u64,
}

impl PrimaryLog {
    pub(super) fn new() -> Self {
        PrimaryLog {
            next_op: 1,
            unacked: VecDeque::new(),
            outbox: Vec::new(),
            flush_scheduled: false,
            acked: 0,
            waiters: BTreeMap::new(),
            snapshot_upto: 0,
        }
    }

    /// The number of the last op made.
    pub(super) fn last_op(&self) -> u64 {
        self.next_op - 1
    }

    pub(super) fn acked(&self) -> u64 {
        self.acked
    }

    pub(super) fn snapshot_upto(&self) -> u64 {
        self.snapshot_upto
    }

    /// Ops sent and not yet acknowledged.
    pub(super) fn pending(&self) -> usize {
        self.unacked.len()
    }

    /// Age of the oldest op the backup has not acknowledged.
    pub(super) fn lag_ms(&self, now_ms: u64) -> u64 {
        self.unacked
            .front()
            .map_or(0, |(_, at)| now_ms.saturating_sub(*at))
    }

    /// Numbers an op that no backup will get (none is connected).
    pub(super) fn skip(&mut self) {
        self.next_op += 1;
    }

    /// Queues an op for the backup; its number, and whether a flush must be scheduled (the
    /// first op since the last flush).
    pub(super) fn queue(&mut self, op: HaOp, now_ms: u64) -> (u64, bool) {
        let id = self.next_op;
        self.next_op += 1;
        self.unacked.push_back((id, now_ms));
        self.outbox.push(op);
        let schedule = !self.flush_scheduled;
        self.flush_scheduled = true;
        (id, schedule)
    }

    /// `waiter` is told once op `id` is acknowledged (or given up on).
    pub(super) fn wait(&mut self, id: u64, waiter: u64) {
        self.waiters.entry(id).or_default().push(waiter);
    }

    /// The ops queued since the last flush, moved into as few `Ops` frames as they fit (a group
    /// commit of at most [`OPS_PER_FRAME`] each); none when they cannot be sent (`send` false:
    /// they are covered by the snapshot the backup gets when it comes back).
    pub(super) fn flush(&mut self, epoch: u64, send: bool) -> Vec<HaFrame> {
        self.flush_scheduled = false;
        let mut ops = std::mem::take(&mut self.outbox);
        if ops.is_empty() || !send {
            return Vec::new();
        }
        let mut frames = Vec::new();
        let mut first = self.next_op - ops.len() as u64;
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(OPS_PER_FRAME));
            let chunk = std::mem::replace(&mut ops, rest);
            let n = chunk.len() as u64;
            frames.push(HaFrame::Ops {
                epoch,
                first_op: first,
                ops: chunk,
            });
            first += n;
        }
        frames
    }

    /// The backup acknowledged every op up to `upto`: the waiters it releases.
    pub(super) fn ack(&mut self, upto: u64) -> Vec<u64> {
        self.acked = self.acked.max(upto);
        while self.unacked.front().is_some_and(|(id, _)| *id <= upto) {
            self.unacked.pop_front();
        }
        self.release(upto)
    }

    /// A snapshot covers every op so far (and those queued): its op number.
    pub(super) fn snapshot(&mut self) -> u64 {
        self.snapshot_upto = self.last_op();
        self.acked = 0;
        self.outbox.clear();
        self.unacked.clear();
        self.snapshot_upto
    }

    /// The link is gone: nothing is unacknowledged any more (the snapshot the backup gets when
    /// it comes back covers it), and nobody waits (sync mode goes on without the backup).
    pub(super) fn link_lost(&mut self) -> Vec<u64> {
        self.unacked.clear();
        self.release(u64::MAX)
    }

    /// A new primary numbers its ops on from what it applied as a backup.
    pub(super) fn restart_after(&mut self, applied: u64) {
        self.next_op = applied + 1;
        self.acked = applied;
        self.unacked.clear();
    }

    /// Demoted: nothing queued, nothing waited for.
    pub(super) fn clear(&mut self) -> Vec<u64> {
        self.outbox.clear();
        self.unacked.clear();
        self.release(u64::MAX)
    }

    fn release(&mut self, upto: u64) -> Vec<u64> {
        let later = self.waiters.split_off(&(upto.saturating_add(1)));
        std::mem::replace(&mut self.waiters, later)
            .into_values()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(n: u64) -> HaOp {
        HaOp::Checkpoint {
            instance_id: format!("bot-{n}"),
            checkpoint_seq: n,
        }
    }

    fn first_ops(frames: &[HaFrame]) -> Vec<(u64, usize)> {
        frames
            .iter()
            .map(|f| match f {
                HaFrame::Ops { first_op, ops, .. } => (*first_op, ops.len()),
                other => panic!("not an Ops frame: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn ops_are_numbered_and_committed_in_groups() {
        let mut log = PrimaryLog::new();
        let (id, schedule) = log.queue(op(1), 0);
        assert_eq!((id, schedule), (1, true));
        let (id, schedule) = log.queue(op(2), 0);
        assert_eq!((id, schedule), (2, false), "one flush for the group");
        assert_eq!(first_ops(&log.flush(7, true)), [(1, 2)]);
        assert!(log.flush(7, true).is_empty(), "nothing left");
        // A group larger than a frame is cut, numbered on.
        for n in 0..OPS_PER_FRAME as u64 + 3 {
            log.queue(op(n), 0);
        }
        assert_eq!(
            first_ops(&log.flush(7, true)),
            [(3, OPS_PER_FRAME), (3 + OPS_PER_FRAME as u64, 3)]
        );
        assert_eq!(log.pending(), OPS_PER_FRAME + 5);
    }

    #[test]
    fn an_ack_releases_its_waiters_and_shortens_the_lag() {
        let mut log = PrimaryLog::new();
        for (n, at) in [(1, 100), (2, 200), (3, 300)] {
            let (id, _) = log.queue(op(n), at);
            log.wait(id, 10 + id);
        }
        assert_eq!(log.lag_ms(1000), 900);
        assert_eq!(log.ack(2), [11, 12]);
        assert_eq!((log.acked(), log.pending()), (2, 1));
        assert_eq!(log.lag_ms(1000), 700);
        assert_eq!(
            log.ack(1),
            Vec::<u64>::new(),
            "an older ack changes nothing"
        );
        assert_eq!(log.acked(), 2);
        // The link is lost: the last waiter is let go, nothing counts as unacknowledged.
        assert_eq!(log.link_lost(), [13]);
        assert_eq!((log.pending(), log.lag_ms(1000)), (0, 0));
    }

    #[test]
    fn a_snapshot_covers_what_was_queued_and_a_new_primary_numbers_on() {
        let mut log = PrimaryLog::new();
        log.queue(op(1), 0);
        log.skip(); // op 2: no backup
        assert_eq!(log.snapshot(), 2);
        assert!(
            log.flush(1, true).is_empty(),
            "the snapshot carries the queued op"
        );
        assert_eq!((log.acked(), log.pending()), (0, 0));
        // Not sent while no backup can take it.
        log.queue(op(3), 0);
        assert!(log.flush(1, false).is_empty());
        log.restart_after(40);
        let (id, _) = log.queue(op(41), 0);
        assert_eq!((id, log.acked()), (41, 40));
        log.wait(id, 5);
        assert_eq!(log.clear(), [5], "demoted: every waiter let go");
    }
}
