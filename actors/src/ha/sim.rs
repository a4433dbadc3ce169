//! Deterministic simulation of an HA pair: two [`HaState`]s and a model of the Chat Server's
//! fencing, stepped over an in-memory network that delays, duplicates, reorders, resets and
//! partitions, with crashes, restarts (from the state file) and switchovers, all driven by one
//! seeded RNG: a seed replays its run exactly.
//!
//! After every run it checks what must hold:
//! - an epoch is activated at the Chat Server by one node only (never two nodes acting as
//!   primary for the same epoch);
//! - every context save the backup acknowledged (sync mode) is in the new primary's bots when
//!   it takes over after the primary crashed (a single failure loses nothing acknowledged);
//! - once the faults stop, the pair converges: one primary, one backup in sync holding the
//!   primary's bots.
//!
//! `BGS_SIM_SEEDS=N` runs N seeds (default 10 000, what CI runs), from `BGS_SIM_FIRST` (default
//! 0); `BGS_SIM_SEED=S` replays one. The long mode: `BGS_SIM_SEEDS=1000000 cargo test --release
//! -p bgs-actors seeded`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

use bgs_proto::bot::{BotKey, BotSpec};
use bgs_proto::ha::{HaFrame, HaOp, HaRole, ReplicatedBot};

use super::state::{Config, Effect, HaState, Input, Time};
use super::state_file::SavedRole;

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const TICK_MS: u64 = 100;
const FAILOVER_MS: u64 = 1000;
/// Simulated time with faults; then the network heals and the pair must settle.
const CHAOS_MS: u64 = 12_000;

struct Node {
    name: &'static str,
    state: Option<HaState>,
    /// The state file.
    saved: Option<SavedRole>,
    incarnation: u64,
    /// Active at the Chat Server with this epoch (its chat link is connected as the primary).
    active: Option<u64>,
    next_tick: u64,
}

#[derive(Clone)]
struct Packet {
    at: u64,
    /// Insertion order: what is due at the same time is delivered in the order it was sent.
    seq: u64,
    to: usize,
    input: Input,
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Packet {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Sim {
    rng: Rng,
    now: u64,
    nodes: [Node; 2],
    sync: bool,
    /// Frames and other inputs on their way, delivered in `at` order (ties by insertion).
    queue: std::collections::BinaryHeap<Packet>,
    next_seq: u64,
    /// When each node's last frame to the other is due (a healed network keeps them in order).
    last_at: [u64; 2],
    next_work: u64,
    next_fault: u64,
    /// When a crashed node comes back.
    reboot_at: [u64; 2],
    /// Open connections: id -> (dialer, acceptor).
    conns: HashMap<u64, (usize, usize)>,
    next_conn: u64,
    /// Until then, frames between the nodes are lost silently (a dead cable).
    partitioned_until: u64,
    /// Faults on: frames are duplicated and reordered now and then.
    chaos: bool,
    /// The Chat Server: the highest epoch seen, and which node activated each epoch.
    max_epoch: u64,
    epoch_owner: BTreeMap<u64, usize>,
    /// Bots the workload made, and the next context value of each.
    next_bot: u64,
    waiters: HashMap<u64, (usize, String, u64)>,
    next_waiter: u64,
    /// Saves the backup acknowledged: bot -> (value, the backup and its incarnation).
    acked: BTreeMap<String, (u64, usize, u64)>,
    removed: BTreeMap<String, ()>,
    log: Vec<String>,
}

fn config(name: &str, role: HaRole, sync: bool) -> Config {
    Config {
        node_id: name.into(),
        cluster_id: "bgs".into(),
        role,
        has_peer: true,
        peer: Some("peer".into()),
        secret: "s3cret".into(),
        failover_after_ms: FAILOVER_MS,
        sync,
        http_url: format!("http://{name}"),
        peer_http: None,
        state_file: true,
    }
}

fn bot(id: &str) -> ReplicatedBot {
    ReplicatedBot {
        instance_id: id.into(),
        spec: std::sync::Arc::new(BotSpec::new(
            BotKey {
                interaction_id: format!("chat-{id}"),
                bot_id: "echo".into(),
                bot_name: String::new(),
            },
            "Echo",
        )),
        participant_id: format!("p-{id}"),
        joined_seq: 1,
        started_ms: 0,
        context: None,
        checkpoint_seq: 1,
    }
}

fn value(context: &Option<Vec<u8>>) -> u64 {
    context
        .as_ref()
        .and_then(|c| String::from_utf8(c.clone()).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let sync = rng.chance(500);
        let mut sim = Sim {
            rng,
            now: 0,
            nodes: [
                Node {
                    name: "a",
                    state: None,
                    saved: None,
                    incarnation: 0,
                    active: None,
                    next_tick: 0,
                },
                Node {
                    name: "b",
                    state: None,
                    saved: None,
                    incarnation: 0,
                    active: None,
                    next_tick: 0,
                },
            ],
            sync,
            queue: std::collections::BinaryHeap::new(),
            next_seq: 0,
            last_at: [0; 2],
            next_work: 0,
            next_fault: 500,
            reboot_at: [0; 2],
            conns: HashMap::new(),
            next_conn: 1,
            partitioned_until: 0,
            chaos: true,
            max_epoch: 0,
            epoch_owner: BTreeMap::new(),
            next_bot: 1,
            waiters: HashMap::new(),
            next_waiter: 1,
            acked: BTreeMap::new(),
            removed: BTreeMap::new(),
            log: Vec::new(),
        };
        sim.boot(0);
        sim.boot(1);
        sim
    }

    fn time(&self) -> Time {
        Time {
            mono_ms: self.now,
            wall_ms: self.now,
        }
    }

    /// Starts (or restarts) a node: its role and epoch from its state file, else configured.
    fn boot(&mut self, n: usize) {
        let configured = if n == 0 {
            HaRole::Primary
        } else {
            HaRole::Backup
        };
        let (role, epoch) = match self.nodes[n].saved {
            Some(s) => (s.role, s.epoch),
            None => (configured, 1),
        };
        let t = self.time();
        let node = &mut self.nodes[n];
        node.incarnation += 1;
        let run = format!("{}-{}", node.name, node.incarnation);
        let mut state = HaState::new(
            config(node.name, configured, self.sync),
            role,
            epoch,
            run,
            t,
        );
        let mut effects = state.start();
        node.state = Some(state);
        node.next_tick = t.mono_ms + TICK_MS;
        self.log
            .push(format!("{} boot {:?} e{}", self.now, role, epoch));
        effects.extend(self.feed(n, Input::Attached));
        self.carry_out(n, effects);
    }

    fn crash(&mut self, n: usize) {
        if self.nodes[n].state.take().is_none() {
            return;
        }
        self.log
            .push(format!("{} crash {}", self.now, self.nodes[n].name));
        self.nodes[n].active = None;
        // Its connections break: the other end hears of it.
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, (a, b))| *a == n || *b == n)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.reset(id);
        }
        let kept: Vec<Packet> = std::mem::take(&mut self.queue)
            .into_iter()
            .filter(|p| p.to != n)
            .collect();
        self.queue = kept.into();
        self.reboot_at[n] = self.now + 100 + self.rng.below(2000);
    }

    /// Closes a connection under both ends.
    fn reset(&mut self, id: u64) {
        if let Some((a, b)) = self.conns.remove(&id) {
            let at = self.now + 1 + self.rng.below(20);
            for to in [a, b] {
                self.push(at, to, Input::Closed { conn: id });
            }
        }
    }

    fn feed(&mut self, n: usize, input: Input) -> Vec<Effect> {
        let now = self.time();
        match self.nodes[n].state.as_mut() {
            Some(s) => s.step(now, input),
            None => Vec::new(),
        }
    }

    fn deliver(&mut self, n: usize, input: Input) {
        let effects = self.feed(n, input);
        self.carry_out(n, effects);
    }

    fn later(&mut self, n: usize, delay: u64, input: Input) {
        let at = self.now + delay;
        self.push(at, n, input);
    }

    fn push(&mut self, at: u64, to: usize, input: Input) {
        self.next_seq += 1;
        self.queue.push(Packet {
            at,
            seq: self.next_seq,
            to,
            input,
        });
    }

    fn carry_out(&mut self, n: usize, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send { conn, frame } => self.send(n, conn, frame),
                Effect::Close { conn } => {
                    if let Some((a, b)) = self.conns.remove(&conn) {
                        let other = if a == n { b } else { a };
                        let delay = 5 + self.rng.below(30);
                        self.later(other, delay, Input::Closed { conn });
                    }
                }
                Effect::Dial => {
                    let other = 1 - n;
                    let delay = 1 + self.rng.below(20);
                    let reachable =
                        self.nodes[other].state.is_some() && self.now >= self.partitioned_until;
                    if reachable {
                        let id = self.next_conn;
                        self.next_conn += 1;
                        self.conns.insert(id, (n, other));
                        let mut nonce = [0u8; 32];
                        nonce[..8].copy_from_slice(&self.rng.next().to_le_bytes());
                        self.later(other, delay, Input::Accepted { conn: id, nonce });
                        self.later(n, delay, Input::Dialed(Some(id)));
                    } else {
                        self.later(n, delay + 50, Input::Dialed(None));
                    }
                }
                Effect::ScheduleFlush => self.later(n, 0, Input::Flush),
                Effect::Activate { epoch } => self.activate(n, epoch),
                Effect::Deactivate => self.nodes[n].active = None,
                Effect::ResumeEvents
                | Effect::SetRole { .. }
                | Effect::BecomeBackup
                | Effect::Discard(_) => {}
                Effect::Drain => {
                    let delay = self.rng.below(50);
                    self.later(n, delay, Input::Drained);
                }
                Effect::BecomePrimary { bots } => self.check_takeover(n, &bots),
                Effect::Release { waiters, acked } => {
                    for w in waiters {
                        if let Some((_, bot, v)) = self.waiters.remove(&w) {
                            if acked {
                                self.log.push(format!(
                                    "{} {} acked {bot}={v}",
                                    self.now,
                                    self.nodes[1 - n].name
                                ));
                                let backup = 1 - n;
                                let inc = self.nodes[backup].incarnation;
                                let e = self.acked.entry(bot).or_insert((0, backup, inc));
                                if v >= e.0 {
                                    *e = (v, backup, inc);
                                }
                            }
                        }
                    }
                }
                Effect::SwitchoverDone(r) => self.log.push(format!(
                    "{} switchover {:?}",
                    self.now,
                    r.map(|r| r.new_epoch)
                )),
                Effect::WriteState(saved) => {
                    self.nodes[n].saved = Some(saved);
                    self.later(n, 0, Input::StateWritten { saved, error: None });
                }
                Effect::Switched { kind } => self.log.push(format!(
                    "{} {} took over ({kind})",
                    self.now, self.nodes[n].name
                )),
            }
        }
    }

    fn send(&mut self, from: usize, conn: u64, frame: HaFrame) {
        let Some(&(a, b)) = self.conns.get(&conn) else {
            return;
        };
        let to = if a == from { b } else { a };
        if self.now < self.partitioned_until {
            return; // a dead cable: lost, and nobody is told
        }
        // With faults on, a later frame may take a shorter path (reordering), and now and then
        // one arrives twice; a healed network delivers in order, as TCP does.
        let input = Input::Frame { conn, frame };
        if !self.chaos {
            let at = self.last_at[to].max(self.now + 1 + self.rng.below(5));
            self.last_at[to] = at;
            self.push(at, to, input);
            return;
        }
        let spread = if self.rng.chance(50) { 200 } else { 20 };
        let delay = 1 + self.rng.below(spread);
        if self.rng.chance(5) {
            self.later(to, delay + 3, input.clone());
        }
        self.later(to, delay, input);
    }

    fn activate(&mut self, n: usize, epoch: u64) {
        if let Some(&owner) = self.epoch_owner.get(&epoch) {
            assert_eq!(
                owner, n,
                "epoch {epoch} activated by {} after {}",
                self.nodes[n].name, self.nodes[owner].name
            );
        }
        self.epoch_owner.insert(epoch, n);
        if epoch < self.max_epoch {
            // The Chat Server refuses it: fenced.
            let delay = 1 + self.rng.below(30);
            self.later(n, delay, Input::Fenced);
            return;
        }
        self.max_epoch = epoch;
        self.nodes[n].active = Some(epoch);
        let other = 1 - n;
        if self.nodes[other].active.is_some_and(|e| e < epoch) {
            self.nodes[other].active = None;
            let delay = 1 + self.rng.below(100);
            self.later(other, delay, Input::Fenced);
        }
    }

    /// A node took over: every save the backup acknowledged is in what it restores, unless
    /// that node restarted since it acknowledged (a second failure).
    fn check_takeover(&mut self, n: usize, bots: &[ReplicatedBot]) {
        let inc = self.nodes[n].incarnation;
        let held: BTreeMap<&str, u64> = bots
            .iter()
            .map(|b| (b.instance_id.as_str(), value(&b.context)))
            .collect();
        for (bot, (v, backup, at)) in &self.acked {
            if *backup != n || *at != inc || self.removed.contains_key(bot) {
                continue;
            }
            let has = held.get(bot.as_str()).copied();
            assert!(
                has.is_some_and(|h| h >= *v),
                "{} took over without the acknowledged save {bot}={v} (has {has:?}); log (newest first) {:#?}",
                self.nodes[n].name,
                self.log.iter().rev().take(30).collect::<Vec<_>>()
            );
        }
    }

    /// The primary's bots change now and then.
    fn workload(&mut self) {
        for n in 0..2 {
            let primary = self.nodes[n]
                .state
                .as_ref()
                .is_some_and(|s| s.role() == HaRole::Primary);
            if !primary {
                continue;
            }
            let bots: Vec<String> = self.nodes[n]
                .state
                .as_ref()
                .map(|s| s.store().keys().cloned().collect())
                .unwrap_or_default();
            let roll = self.rng.below(10);
            let op = if bots.is_empty() || roll < 2 {
                let id = format!("bot{}", self.next_bot);
                self.next_bot += 1;
                HaOp::Started(Box::new(bot(&id)))
            } else if roll == 2 && bots.len() > 3 {
                let id = bots[self.rng.below(bots.len() as u64) as usize].clone();
                self.removed.insert(id.clone(), ());
                HaOp::Removed { instance_id: id }
            } else if roll == 3 {
                let id = bots[self.rng.below(bots.len() as u64) as usize].clone();
                HaOp::Checkpoint {
                    instance_id: id,
                    checkpoint_seq: self.now + 1,
                }
            } else {
                let id = bots[self.rng.below(bots.len() as u64) as usize].clone();
                let v = self.now + 1;
                HaOp::Saved {
                    instance_id: id,
                    context: v.to_string().into_bytes(),
                    checkpoint_seq: v,
                }
            };
            let waiter = if let (
                true,
                HaOp::Saved {
                    instance_id,
                    context,
                    ..
                },
            ) = (self.sync, &op)
            {
                let id = self.next_waiter;
                self.next_waiter += 1;
                self.waiters
                    .insert(id, (n, instance_id.clone(), value(&Some(context.clone()))));
                Some(id)
            } else {
                None
            };
            self.deliver(n, Input::Replicate { op, waiter });
        }
    }

    fn faults(&mut self) {
        match self.rng.below(8) {
            0 | 1 => {
                // Single failures: a node crashes only while the pair is whole and in sync
                // (two failures at once, with no node holding the bots, lose them by design:
                // docs/HA.md, "both nodes down").
                let n = self.rng.below(2) as usize;
                if self.converged() {
                    self.crash(n);
                }
            }
            2 => {
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                if let Some(id) = ids.first() {
                    self.log.push(format!("{} reset", self.now));
                    self.reset(*id);
                }
            }
            5 => {
                // A stranger connects to a node and never says anything.
                let n = self.rng.below(2) as usize;
                let id = self.next_conn;
                self.next_conn += 1;
                self.log
                    .push(format!("{} stranger on {}", self.now, self.nodes[n].name));
                self.later(
                    n,
                    1,
                    Input::Accepted {
                        conn: id,
                        nonce: [9; 32],
                    },
                );
            }
            3 => {
                self.partitioned_until = self.now + 200 + self.rng.below(3000);
                self.log.push(format!(
                    "{} partition until {}",
                    self.now, self.partitioned_until
                ));
            }
            _ => {
                for n in 0..2 {
                    if self.nodes[n]
                        .state
                        .as_ref()
                        .is_some_and(|s| s.role() == HaRole::Primary)
                    {
                        self.log.push(format!(
                            "{} switchover asked of {}",
                            self.now, self.nodes[n].name
                        ));
                        self.deliver(n, Input::Switchover);
                    }
                }
            }
        }
    }

    /// Advances to `until`, event by event: deliveries, ticks, the workload, faults, reboots.
    fn run(&mut self, until: u64, chaos: bool) {
        self.chaos = chaos;
        loop {
            let tick = self
                .nodes
                .iter()
                .filter(|n| n.state.is_some())
                .map(|n| n.next_tick)
                .min()
                .unwrap_or(u64::MAX);
            let packet = self.queue.peek().map_or(u64::MAX, |p| p.at);
            let reboot = (0..2)
                .filter(|n| self.nodes[*n].state.is_none())
                .map(|n| self.reboot_at[n])
                .min()
                .unwrap_or(u64::MAX);
            let fault = if chaos { self.next_fault } else { u64::MAX };
            let next = tick.min(packet).min(reboot).min(fault).min(self.next_work);
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            if reboot <= self.now {
                for n in 0..2 {
                    if self.nodes[n].state.is_none() && self.reboot_at[n] <= self.now {
                        self.boot(n);
                    }
                }
            } else if packet <= self.now {
                if let Some(p) = self.queue.pop() {
                    self.deliver(p.to, p.input);
                }
            } else if tick <= self.now {
                for n in 0..2 {
                    if self.nodes[n].state.is_some() && self.now >= self.nodes[n].next_tick {
                        self.nodes[n].next_tick = self.now + TICK_MS;
                        self.deliver(n, Input::Tick);
                    }
                }
            } else if self.next_work <= self.now {
                self.next_work = self.now + 5 + self.rng.below(60);
                self.workload();
            } else if chaos && self.next_fault <= self.now {
                self.next_fault = self.now + 200 + self.rng.below(1500);
                self.faults();
            }
        }
    }

    /// Once the faults stop: one primary, and a backup in sync with the primary's bots.
    fn converged(&self) -> bool {
        let (Some(a), Some(b)) = (&self.nodes[0].state, &self.nodes[1].state) else {
            return false;
        };
        let (p, k) = match (a.role(), b.role()) {
            (HaRole::Primary, HaRole::Backup) => (a, b),
            (HaRole::Backup, HaRole::Primary) => (b, a),
            _ => return false,
        };
        let t = self.time();
        k.status(t).in_sync && p.status(t).in_sync && p.store() == k.store()
    }
}

fn run_seed(seed: u64) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        sim.run(CHAOS_MS, true);
        // Heal: no more faults; the pair must settle within 15 simulated seconds.
        sim.partitioned_until = 0;
        let deadline = sim.now + 15_000;
        while !sim.converged() && sim.now < deadline {
            let next = sim.now + 100;
            sim.run(next, false);
        }
        if !sim.converged() {
            let tail: Vec<&String> = sim.log.iter().rev().take(25).collect();
            let t = sim.time();
            panic!(
                "did not converge: {:?}, log (newest first) {tail:#?}",
                sim.nodes
                    .iter()
                    .map(|n| n.state.as_ref().map(|s| {
                        let st = s.status(t);
                        (
                            s.role(),
                            s.epoch(),
                            st.peer_connected,
                            st.in_sync,
                            s.store().len(),
                        )
                    }))
                    .collect::<Vec<_>>()
            );
        }
    });
    outcome.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn seeded_simulation_of_the_pair_keeps_its_invariants() {
    if let Some(seed) = std::env::var("BGS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        if let Err(e) = run_seed(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (first, seeds) = (var("BGS_SIM_FIRST", 0), var("BGS_SIM_SEEDS", 10_000));
    for seed in first..first + seeds {
        if let Err(e) = run_seed(seed) {
            panic!("seed {seed} failed (replay: BGS_SIM_SEED={seed}): {e}");
        }
    }
}
