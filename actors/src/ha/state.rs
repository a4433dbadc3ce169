//! The HA protocol as a pure state machine: [`HaState::step`] takes the time and one [`Input`]
//! (a peer frame, a timer tick, a local bot change, an operator command) and returns the
//! [`Effect`]s to carry out (send a frame, close the link, dial, change role, respawn bots,
//! write the state file). No actix, no tokio, no sockets, no clock: the HaCoordinator actor
//! feeds it and carries its effects out, and the simulation (`actors/src/sim/`) steps two of
//! them, with the ChatLink's state machine and a model of the Chat Server, over an in-memory
//! network that delays, duplicates, resets and partitions (docs/RELIABILITY.md 6). With a
//! durable store it also keeps what the store has not had yet (`take_unwritten`).
//!
//! Connections are numbered by the caller (`conn`); frames and closes of a connection that is
//! not the current link are ignored.

use std::collections::{BTreeMap, VecDeque};

use bgs_proto::ha::{HaFrame, HaOp, HaRole, ReplicatedBot, HA_PROTOCOL_VERSION};
use std::sync::Arc;

/// The replicated bots by instance id, each shared with a promotion's restore.
pub type Store = BTreeMap<String, Arc<ReplicatedBot>>;

use super::follower::Follower;
use super::handshake::{proof, verify, Handshakes};
use super::log::PrimaryLog;
use super::state_file::SavedRole;
use super::{HaStatus, RoleChange, SwitchoverError, SwitchoverReport};

/// Ops per Ops frame (a group commit); more wait for the next frame.
pub(crate) const OPS_PER_FRAME: usize = 2048;
/// About this many bytes of bots per snapshot frame (frames are at most 16 MiB).
pub(crate) const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;
/// How long a switchover waits for the backup to acknowledge everything.
pub(crate) const SWITCHOVER_WAIT_MS: u64 = 30_000;
const RECENT_CHANGES: usize = 10;
/// Accepted connections that may be handshaking at once; a new one evicts the oldest.
pub(crate) const MAX_HANDSHAKES: usize = 4;
/// The least time an accepted connection has to send its Hello (else `failover-after`).
const HANDSHAKE_MIN_MS: u64 = 2000;

/// The time of a step: a monotonic clock for durations and the wall clock for what operators
/// read (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// What the state machine is told.
#[derive(Debug, Clone)]
pub enum Input {
    /// The heartbeat timer (every `heartbeat` of the configuration).
    Tick,
    /// The Supervisor and the ChatLink are there to be driven.
    Attached,
    /// The dial asked for by [`Effect::Dial`] ended: a connection, or none.
    Dialed(Option<u64>),
    /// The listener accepted a connection; `nonce` is fresh randomness for its challenge.
    Accepted {
        conn: u64,
        nonce: [u8; 32],
    },
    Frame {
        conn: u64,
        frame: HaFrame,
    },
    /// The connection ended (its peer closed it, or it broke).
    Closed {
        conn: u64,
    },
    /// A frame could not be queued on the connection (it is congested).
    SendFailed {
        conn: u64,
    },
    /// A bot change to replicate; `waiter` is told (in sync mode) once the backup has it.
    Replicate {
        op: HaOp,
        waiter: Option<u64>,
    },
    /// The batch of changes since the last flush goes out (after [`Effect::ScheduleFlush`]).
    Flush,
    /// The Chat Server fenced this node: a newer epoch of the cluster is connected.
    Fenced,
    /// An operator asks for a switchover.
    Switchover,
    /// The ChatLink paused its events and the Supervisor drained every bot (after
    /// [`Effect::Drain`]).
    Drained,
    /// The state file was written (or not).
    StateWritten {
        saved: SavedRole,
        error: Option<String>,
    },
}

/// What the caller carries out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Send {
        conn: u64,
        frame: HaFrame,
    },
    /// Close the connection (frames already sent on it still go out).
    Close {
        conn: u64,
    },
    /// Dial the peer; answer with [`Input::Dialed`].
    Dial,
    /// Send [`Input::Flush`] soon (after the changes already queued).
    ScheduleFlush,
    /// Chat link: connect as the primary with this epoch.
    Activate {
        epoch: u64,
    },
    /// Chat link: disconnect (this node is no longer the primary).
    Deactivate,
    /// Chat link: route events again (an abandoned switchover).
    ResumeEvents,
    /// Pause the chat link's events, then drain the Supervisor; answer with [`Input::Drained`].
    Drain,
    /// The Supervisor's view of the role.
    SetRole(crate::role::Role),
    BecomePrimary {
        bots: Vec<Arc<ReplicatedBot>>,
    },
    BecomeBackup,
    /// These waiters' changes are done with: acknowledged by the backup (`acked`), or no longer
    /// waited for (no backup, not the primary).
    Release {
        waiters: Vec<u64>,
        acked: bool,
    },
    /// The answer to [`Input::Switchover`].
    SwitchoverDone(Result<SwitchoverReport, SwitchoverError>),
    /// Write the state file; answer with [`Input::StateWritten`].
    WriteState(SavedRole),
    /// The replicated bots this node no longer holds (demoted): freed off the HA thread, which
    /// must send the hand-over first (100 000 bots take tens of ms to free).
    Discard(Arc<Store>),
    /// A role change to primary: `manual` (a hand-over) or `failover`.
    Switched {
        kind: &'static str,
    },
}

/// The settings the state machine needs (from `HaSettings`).
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub cluster_id: String,
    /// The configured role (the first role of a node without a state file).
    pub role: HaRole,
    pub has_peer: bool,
    pub peer: Option<String>,
    pub secret: String,
    pub failover_after_ms: u64,
    pub sync: bool,
    pub http_url: String,
    pub peer_http: Option<String>,
    /// Whether a state file is configured (without one, the role is kept in memory only).
    pub state_file: bool,
    /// A durable store is configured (`[store] kind` other than `memory`): the primary keeps
    /// track of what changed for it.
    pub durable: bool,
}

/// The numbers the HA metrics show, read after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HaGauges {
    pub primary: bool,
    pub epoch: u64,
    pub peer_connected: bool,
    pub replication_pending: u64,
    pub replication_lag_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Dialer: waiting for the Challenge.
    AwaitChallenge,
    /// Dialer: sent Hello, waiting for Welcome.
    AwaitWelcome,
    Up,
}

#[derive(Debug, Clone)]
struct Link {
    conn: u64,
    stage: Stage,
    last_seen: u64,
    peer_node: Option<String>,
    /// Backup: the snapshot of this connection has been applied. A primary sends one snapshot
    /// per connection: another one is a stale or repeated frame, and must not roll the store
    /// back past what was acknowledged since. Primary: the backup has acknowledged it, so it
    /// holds this node's state (an empty store acknowledged at op 0 included).
    snapshot_applied: bool,
}

#[derive(Debug, Clone, Copy)]
enum SwitchoverPhase {
    /// Waiting for the chat link's pause and the Supervisor's drain.
    Draining,
    /// Waiting for the backup to acknowledge every op up to `last`.
    Waiting { last: u64, deadline: u64 },
}

#[derive(Debug, Clone, Copy)]
struct SwitchoverRun {
    started: u64,
    phase: SwitchoverPhase,
}

/// One node's HA state.
#[derive(Debug)]
pub struct HaState {
    c: Config,
    role: HaRole,
    epoch: u64,
    draining: bool,
    attached: bool,
    /// Holds a primary's state (a snapshot since the last start or demotion): only then may
    /// silence make this node promote itself. A backup that never reached a primary (wrong
    /// secret, no route) never takes over by itself.
    synced_once: bool,
    /// This node handed over in a switchover and keeps what it handed over (every op of it
    /// acknowledged) until it holds the new primary's state: if the hand-over was lost (the
    /// backup died under it, or the link broke), it takes the role back rather than leave the
    /// pair with no primary.
    handed_over: bool,
    /// Since the hand-over: dials that found no node, or a node that refused us as not primary.
    unreachable: u32,
    link: Option<Link>,
    /// Accepted connections that were sent a Challenge and have not answered it.
    handshakes: Handshakes,
    dialing: bool,
    /// The replicated bots: the primary's, or the backup's copy.
    store: Store,
    /// Primary: the changes sent to the backup, and its acknowledgements.
    log: PrimaryLog,
    /// Primary with a durable store: what it has not written yet.
    unwritten: Unwritten,
    /// A primary of a pair that started with bots from its durable store: it restores them
    /// only once no backup holds newer ones (HA.md 10): when its backup has taken its
    /// snapshot, or when no backup has linked for `failover-after-ms` since the start. A backup
    /// that holds bots takes over instead (a restarted primary), and this node steps down
    /// without handing its older copy anything.
    restore_after: Option<u64>,
    switchover: Option<SwitchoverRun>,
    link_lost_at: u64,
    /// Backup: the primary it follows.
    follower: Follower,
    primary_http: Option<String>,
    switchovers_manual: u64,
    switchovers_failover: u64,
    peer_http: Option<String>,
    recent: VecDeque<RoleChange>,
    saved: Option<SavedRole>,
    state_write_failed: Option<SavedRole>,
    /// This run of the process (told to backups in Welcome).
    run_id: String,
    out: Vec<Effect>,
}

impl HaState {
    /// A node starting in `role` at `epoch` (from its state file, or the configuration).
    pub fn new(c: Config, role: HaRole, epoch: u64, run_id: String, now: Time) -> Self {
        HaState {
            primary_http: if role == HaRole::Backup {
                c.peer_http.clone()
            } else {
                None
            },
            c,
            role,
            epoch,
            draining: false,
            attached: false,
            synced_once: false,
            handed_over: false,
            unreachable: 0,
            link: None,
            handshakes: Handshakes::new(MAX_HANDSHAKES),
            dialing: false,
            store: BTreeMap::new(),
            log: PrimaryLog::new(),
            unwritten: Unwritten::default(),
            restore_after: None,
            switchover: None,
            link_lost_at: now.mono_ms,
            follower: Follower::new(now.mono_ms),
            switchovers_manual: 0,
            switchovers_failover: 0,
            peer_http: None,
            recent: VecDeque::new(),
            saved: None,
            state_write_failed: None,
            run_id,
            out: Vec::new(),
        }
    }

    pub fn role(&self) -> HaRole {
        self.role
    }

    /// A switchover is under way: ESP is refused and the chat link's events are paused.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// A primary waits to restore the bots of its durable store: ESP is asked to retry.
    pub fn restoring(&self) -> bool {
        self.restore_after.is_some()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The bots this node holds (the primary's, or the backup's copy).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A node starting as primary takes the bots its durable store held (a restart of a single
    /// node, or of both): they are restored once the Supervisor is attached.
    pub fn seed(&mut self, stored: crate::store::Stored) {
        self.epoch = self.epoch.max(stored.epoch);
        if self.role == HaRole::Primary {
            self.store = stored
                .bots
                .into_iter()
                .map(|b| (b.instance_id.clone(), Arc::new(b)))
                .collect();
        }
    }

    /// Restores the bots of the durable store (see `restore_after`).
    fn restore_seeded(&mut self) {
        self.restore_after = None;
        self.refresh_supervisor();
        if self.role != HaRole::Primary || self.store.is_empty() {
            return;
        }
        let bots: Vec<Arc<ReplicatedBot>> = self.store.values().cloned().collect();
        tracing::warn!(bots = bots.len(), "restoring the bots of the durable store");
        self.out.push(Effect::BecomePrimary { bots });
    }

    /// The changes the durable store has not had, as one batch (taken: a failed write gives
    /// them back with [`HaState::unwritten_again`]). Nothing on a backup.
    pub fn take_unwritten(&mut self) -> crate::store::StoreBatch {
        if self.role != HaRole::Primary {
            return crate::store::StoreBatch::default();
        }
        self.unwritten.take(&self.store, self.epoch)
    }

    /// A batch that could not be written: its bots count as unwritten again (since `since_ms`).
    pub fn unwritten_again(&mut self, batch: &crate::store::StoreBatch, since_ms: u64) {
        if self.role == HaRole::Primary {
            self.unwritten.again(batch, since_ms);
        }
    }

    /// Bots changed and not yet in the durable store, and the age of the oldest change.
    pub fn unwritten(&self, now: Time) -> (usize, u64) {
        (
            self.unwritten.len(self.store.len()),
            self.unwritten.age_ms(now.mono_ms),
        )
    }

    /// What the node starts with: a backup dials its peer at once.
    pub fn start(&mut self) -> Vec<Effect> {
        if self.role == HaRole::Backup {
            self.dial();
        }
        std::mem::take(&mut self.out)
    }

    /// One input; the effects to carry out, in order.
    pub fn step(&mut self, now: Time, input: Input) -> Vec<Effect> {
        match input {
            Input::Tick => self.tick(now),
            Input::Attached => {
                self.attached = true;
                self.refresh_supervisor();
                if self.role == HaRole::Primary {
                    self.out.push(Effect::Activate { epoch: self.epoch });
                    // Bots found in the durable store at start (a restart) come back: at once
                    // on a single node; in a pair once no backup holds newer ones.
                    if !self.store.is_empty() {
                        if self.c.has_peer {
                            tracing::info!(
                                bots = self.store.len(),
                                "bots in the durable store: restored once the backup has this node's state, or none has linked"
                            );
                            self.restore_after = Some(now.mono_ms + self.c.failover_after_ms);
                            self.refresh_supervisor();
                        } else {
                            self.restore_seeded();
                        }
                    }
                }
            }
            Input::Dialed(conn) => {
                self.dialing = false;
                match conn {
                    Some(conn) if self.link.is_none() && self.role == HaRole::Backup => {
                        self.install(conn, Stage::AwaitChallenge, now);
                    }
                    Some(conn) => self.out.push(Effect::Close { conn }),
                    None => self.unreachable += u32::from(self.handed_over),
                }
            }
            Input::Accepted { conn, nonce } => self.accepted(conn, nonce, now),
            Input::Frame { conn, frame } => {
                if let Some(nonce) = self.handshakes.take(conn) {
                    self.on_hello(conn, nonce, frame, now);
                } else if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.on_frame(frame, now);
                }
            }
            Input::Closed { conn } => {
                self.handshakes.take(conn);
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.drop_link("connection closed", now);
                }
            }
            Input::SendFailed { conn } => {
                if self.handshakes.take(conn).is_some() {
                    self.out.push(Effect::Close { conn });
                }
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.drop_link("HA link congested", now);
                }
            }
            Input::Replicate { op, waiter } => self.replicate(op, waiter, now),
            Input::Flush => self.flush(),
            Input::Fenced => {
                if self.role == HaRole::Primary {
                    tracing::error!(
                        epoch = self.epoch,
                        "the Chat Server fenced this node; becoming backup"
                    );
                    self.demote(true, false, now);
                    self.remember("fenced", now);
                }
            }
            Input::Switchover => self.switchover(now),
            Input::Drained => self.drained(now),
            Input::StateWritten { saved, error } => match error {
                None => {
                    self.state_write_failed = None;
                    self.saved = Some(saved);
                }
                Some(e) => {
                    // Retried every tick; said once per failing state.
                    if self.state_write_failed != Some(saved) {
                        tracing::error!(error = %e, "cannot write the HA state file");
                        self.state_write_failed = Some(saved);
                    }
                }
            },
        }
        std::mem::take(&mut self.out)
    }

    /// What `/status` and the metrics show.
    pub fn status(&self, now: Time) -> HaStatus {
        HaStatus {
            store: None,
            node_id: self.c.node_id.clone(),
            cluster_id: self.c.cluster_id.clone(),
            role: self.role,
            epoch: self.epoch,
            draining: self.draining,
            peer: self.c.peer.clone(),
            peer_connected: self.link_up(),
            in_sync: match self.role {
                HaRole::Backup => self.follower.in_sync && self.link_up(),
                HaRole::Primary => self.backup_synced() && self.log.pending() == 0,
            },
            replication_pending: self.log.pending() as u64,
            replication_lag_seconds: self.lag_ms(now) as f64 / 1000.0,
            primary_http: self.primary_http.clone(),
            replicated_bots: self.store.len(),
            switchovers_manual: self.switchovers_manual,
            switchovers_failover: self.switchovers_failover,
            peer_http: self.c.peer_http.clone().or_else(|| self.peer_http.clone()),
            recent: self.recent.iter().cloned().collect(),
        }
    }

    /// The few numbers the metrics show, without the copies `status` makes.
    pub fn gauges(&self, now: Time) -> HaGauges {
        HaGauges {
            primary: self.role == HaRole::Primary,
            epoch: self.epoch,
            peer_connected: self.link_up(),
            replication_pending: self.log.pending() as u64,
            replication_lag_seconds: self.lag_ms(now) as f64 / 1000.0,
        }
    }

    /// Age of the oldest change the backup has not acknowledged.
    pub fn lag_ms(&self, now: Time) -> u64 {
        self.log.lag_ms(now.mono_ms)
    }

    fn send(&mut self, frame: HaFrame) -> bool {
        match &self.link {
            Some(l) => {
                self.out.push(Effect::Send {
                    conn: l.conn,
                    frame,
                });
                true
            }
            None => false,
        }
    }

    fn link_up(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.stage == Stage::Up)
    }

    /// Primary: the backup on the link has acknowledged this connection's snapshot (it holds
    /// this node's state, and follows the stream).
    fn backup_synced(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.stage == Stage::Up && l.snapshot_applied)
    }

    fn drop_link(&mut self, why: &str, now: Time) {
        if let Some(l) = self.link.take() {
            tracing::warn!(peer = ?l.peer_node, reason = why, "HA link closed");
            self.link_lost_at = now.mono_ms;
            self.out.push(Effect::Close { conn: l.conn });
        }
        // Unacknowledged ops are covered by the snapshot the backup gets when it comes back;
        // nobody can acknowledge now: sync-mode saves go on without the backup.
        let done = self.log.link_lost();
        self.released(done, false);
    }

    fn released(&mut self, done: Vec<u64>, acked: bool) {
        if !done.is_empty() {
            self.out.push(Effect::Release {
                waiters: done,
                acked,
            });
        }
    }

    fn install(&mut self, conn: u64, stage: Stage, now: Time) {
        if let Some(old) = self.link.take() {
            self.out.push(Effect::Close { conn: old.conn });
        }
        self.link = Some(Link {
            conn,
            stage,
            last_seen: now.mono_ms,
            peer_node: None,
            snapshot_applied: false,
        });
    }

    fn dial(&mut self) {
        if !self.c.has_peer || self.dialing || self.link.is_some() || self.role != HaRole::Backup {
            return;
        }
        self.dialing = true;
        self.out.push(Effect::Dial);
    }

    /// Refuses a connection before anything it says is acted on.
    fn refuse(&mut self, conn: u64, reason: &str) {
        self.out.push(Effect::Send {
            conn,
            frame: HaFrame::Refused {
                reason: reason.into(),
            },
        });
        self.out.push(Effect::Close { conn });
    }

    fn accepted(&mut self, conn: u64, nonce: [u8; 32], now: Time) {
        // Backups dial the primary; they never accept. An accepted connection must not keep a
        // backup from reaching its primary (which would look like silence: a forced failover).
        if self.role != HaRole::Primary {
            self.refuse(conn, "this node is a backup: backups dial the primary");
        } else if self.link_up() {
            // One link at a time: a newer connection replaces a silent one only via the tick.
            self.refuse(conn, "a link is already up");
        } else {
            // Full: the oldest handshake makes room.
            if let Some(old) = self.handshakes.admit(conn, nonce, now.mono_ms) {
                self.refuse(old, "too many handshakes in progress");
            }
            self.out.push(Effect::Send {
                conn,
                frame: HaFrame::Challenge { nonce },
            });
        }
    }

    /// The first frame of an accepted connection: a Hello that proves the secret makes it the
    /// link; anything else closes it.
    fn on_hello(&mut self, conn: u64, nonce: [u8; 32], frame: HaFrame, now: Time) {
        let HaFrame::Hello {
            version,
            cluster_id,
            node_id,
            role,
            proof,
            http,
            ..
        } = frame
        else {
            tracing::warn!(frame = ?std::mem::discriminant(&frame), "an HA connection sent something else than a Hello; closing it");
            self.out.push(Effect::Close { conn });
            return;
        };
        let refuse = if version != HA_PROTOCOL_VERSION {
            Some(format!("HA protocol version {version} is not supported (this node speaks {HA_PROTOCOL_VERSION})"))
        } else if cluster_id != self.c.cluster_id {
            Some(format!(
                "cluster {cluster_id:?} is not this node's cluster {:?}",
                self.c.cluster_id
            ))
        } else if !verify(&self.c.secret, &nonce, &cluster_id, &node_id, &proof) {
            Some("wrong secret".to_string())
        } else if self.role != HaRole::Primary {
            Some("this node is not the primary".to_string())
        } else if role == HaRole::Primary {
            Some("two primaries: the Chat Server's fencing decides; not linking".to_string())
        } else if self.link_up() {
            Some("a link is already up".to_string())
        } else {
            None
        };
        if let Some(reason) = refuse {
            tracing::error!(peer = %node_id, %reason, "HA peer refused");
            self.refuse(conn, &reason);
            return;
        }
        // The dialer is a backup (a primary was refused above). Its epoch may be higher than ours
        // (it was primary once): no reason to step down — the Chat Server's fencing decides who
        // may post — so it is accepted; it promotes above its own epoch if it must.
        self.install(conn, Stage::Up, now);
        if let Some(l) = self.link.as_mut() {
            l.peer_node = Some(node_id.clone());
        }
        self.peer_http = Some(http);
        tracing::info!(peer = %node_id, "HA backup connected; sending a snapshot");
        self.send(HaFrame::Welcome {
            node_id: self.c.node_id.clone(),
            role: self.role,
            epoch: self.epoch,
            http: self.c.http_url.clone(),
            run_id: self.run_id.clone(),
        });
        self.send_snapshot();
    }

    fn set_stage(&mut self, stage: Stage) {
        if let Some(l) = self.link.as_mut() {
            l.stage = stage;
        }
    }

    fn on_frame(&mut self, frame: HaFrame, now: Time) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        link.last_seen = now.mono_ms;
        let stage = std::mem::replace(&mut link.stage, Stage::Up);
        match (stage, frame) {
            (Stage::AwaitChallenge, HaFrame::Challenge { nonce }) => {
                let hello = HaFrame::Hello {
                    version: HA_PROTOCOL_VERSION,
                    cluster_id: self.c.cluster_id.clone(),
                    node_id: self.c.node_id.clone(),
                    role: self.role,
                    epoch: self.epoch,
                    proof: proof(&self.c.secret, &nonce, &self.c.cluster_id, &self.c.node_id),
                    http: self.c.http_url.clone(),
                };
                self.set_stage(Stage::AwaitWelcome);
                self.send(hello);
            }
            (
                Stage::AwaitWelcome,
                HaFrame::Welcome {
                    node_id,
                    role,
                    epoch,
                    http,
                    run_id,
                },
            ) => {
                if role != HaRole::Primary || self.role != HaRole::Backup {
                    self.drop_link(
                        "the peer is not primary (or this node is not a backup)",
                        now,
                    );
                    return;
                }
                // A primary that restarted at the same epoch has lost every bot (its state is in
                // memory) and would replace ours with nothing. We hold the bots: take over, and
                // the Chat Server fences it.
                // (A node that handed over holds its own state, not a snapshot of that run.)
                let restarted = !self.handed_over && self.follower.restarted(&run_id);
                if restarted && epoch <= self.epoch && !self.store.is_empty() {
                    tracing::warn!(peer = %node_id, bots = self.store.len(), "the primary restarted without its state; taking over");
                    self.drop_link("the primary restarted without its state", now);
                    self.switchovers_failover += 1;
                    self.out.push(Effect::Switched { kind: "failover" });
                    let epoch = self.epoch + 1;
                    self.promote(epoch, now);
                    self.remember("failover", now);
                    return;
                }
                self.follower.linking(run_id, now.mono_ms);
                self.unreachable = 0;
                tracing::info!(peer = %node_id, epoch, "connected to the HA primary");
                if let Some(l) = self.link.as_mut() {
                    l.peer_node = Some(node_id);
                }
                self.epoch = self.epoch.max(epoch);
                self.peer_http = Some(http.clone());
                self.primary_http = Some(http);
                self.refresh_supervisor();
            }
            (_, HaFrame::Refused { reason }) => {
                self.unreachable += u32::from(self.handed_over);
                tracing::error!(%reason, "the HA peer refused this node");
                self.drop_link("refused by peer", now);
            }
            (Stage::Up, frame) => self.on_stream(frame, now),
            (_, other) => {
                tracing::warn!(frame = ?std::mem::discriminant(&other), "unexpected HA frame during the handshake");
                self.drop_link("handshake violated", now);
            }
        }
    }

    /// Sends the whole state in frames of at most about [`SNAPSHOT_CHUNK_BYTES`].
    fn send_snapshot(&mut self) {
        // Ops already queued are covered by the snapshot.
        let upto_op = self.log.snapshot();
        let mut chunks: Vec<Vec<ReplicatedBot>> = vec![Vec::new()];
        let mut size = 0;
        for bot in self.store.values() {
            let kv = |m: &bgs_proto::esp::StoredKeyValues| -> usize {
                m.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
            };
            let bytes = 512
                + bot.context.as_ref().map_or(0, |c| c.len())
                + kv(&bot.spec.parameters)
                + kv(&bot.spec.userdata);
            if size + bytes > SNAPSHOT_CHUNK_BYTES && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += bytes;
            if let Some(c) = chunks.last_mut() {
                c.push(ReplicatedBot::clone(bot));
            }
        }
        let n = chunks.len();
        for (i, bots) in chunks.into_iter().enumerate() {
            let frame = HaFrame::Snapshot {
                epoch: self.epoch,
                upto_op,
                bots,
                first: i == 0,
                last: i + 1 == n,
            };
            self.send(frame);
        }
    }

    fn on_stream(&mut self, frame: HaFrame, now: Time) {
        match frame {
            HaFrame::Heartbeat { epoch } => {
                if self.role == HaRole::Backup {
                    self.follower.last_heard = now.mono_ms;
                    self.epoch = self.epoch.max(epoch);
                }
            }
            HaFrame::Snapshot {
                epoch,
                upto_op,
                bots,
                first,
                last,
            } if self.role == HaRole::Backup => {
                if self.link.as_ref().is_some_and(|l| l.snapshot_applied) {
                    tracing::warn!("a second HA snapshot on one connection; reconnecting");
                    self.drop_link("snapshot repeated", now);
                    return;
                }
                self.follower.last_heard = now.mono_ms;
                self.epoch = self.epoch.max(epoch);
                let Some(store) = self.follower.chunk(bots, first, last, upto_op) else {
                    self.send(HaFrame::Heartbeat { epoch: self.epoch });
                    return;
                };
                self.store = store;
                if let Some(l) = self.link.as_mut() {
                    l.snapshot_applied = true;
                }
                self.synced_once = true;
                self.handed_over = false;
                tracing::info!(bots = self.store.len(), upto_op, "HA snapshot applied");
                self.send(HaFrame::Ack { upto_op });
            }
            HaFrame::Ops {
                epoch,
                first_op,
                ops,
            } if self.role == HaRole::Backup => {
                self.follower.last_heard = now.mono_ms;
                self.epoch = self.epoch.max(epoch);
                if self
                    .follower
                    .apply_ops(&mut self.store, first_op, ops)
                    .is_err()
                {
                    tracing::warn!(
                        first_op,
                        applied = self.follower.applied,
                        "HA stream gap; reconnecting for a snapshot"
                    );
                    self.drop_link("stream gap", now);
                    return;
                }
                self.send(HaFrame::Ack {
                    upto_op: self.follower.applied,
                });
            }
            HaFrame::HandOver { epoch, upto_op } if self.role == HaRole::Backup => {
                if upto_op != self.follower.applied {
                    tracing::warn!(
                        upto_op,
                        applied = self.follower.applied,
                        "hand-over with a gap; taking over anyway"
                    );
                }
                tracing::info!(epoch, "switchover: taking over as primary");
                self.switchovers_manual += 1;
                self.out.push(Effect::Switched { kind: "manual" });
                self.drop_link("hand-over", now);
                // Never below an epoch this node has seen (the Chat Server would refuse it).
                let epoch = epoch.max(self.epoch + 1);
                self.promote(epoch, now);
                self.remember("switchover", now);
            }
            HaFrame::Ack { upto_op } if self.role == HaRole::Primary => {
                let snapshot = self.log.snapshot_upto();
                if let Some(l) = self.link.as_mut().filter(|_| upto_op >= snapshot) {
                    l.snapshot_applied = true;
                }
                let done = self.log.ack(upto_op);
                self.released(done, true);
                if let Some(SwitchoverRun {
                    phase: SwitchoverPhase::Waiting { last, .. },
                    ..
                }) = self.switchover
                {
                    if self.log.acked() >= last && self.backup_synced() {
                        self.finish_switchover(now);
                    }
                }
            }
            other => {
                tracing::debug!(frame = ?std::mem::discriminant(&other), role = ?self.role, "HA frame ignored");
            }
        }
    }

    fn replicate(&mut self, op: HaOp, waiter: Option<u64>, now: Time) {
        if self.role != HaRole::Primary {
            self.release(waiter, false);
            return;
        }
        if self.c.durable {
            self.unwritten.changed(op_instance(&op), now.mono_ms);
        }
        if !self.link_up() {
            // No backup to send it to: into the store, with no copy.
            self.log.skip();
            apply(&mut self.store, op);
            self.release(waiter, false);
            return;
        }
        apply(&mut self.store, op.clone());
        let (id, schedule) = self.log.queue(op, now.mono_ms);
        if schedule {
            self.out.push(Effect::ScheduleFlush);
        }
        match waiter {
            Some(w) if self.c.sync => self.log.wait(id, w),
            other => self.release(other, false),
        }
    }

    fn release(&mut self, waiter: Option<u64>, acked: bool) {
        if let Some(w) = waiter {
            self.out.push(Effect::Release {
                waiters: vec![w],
                acked,
            });
        }
    }

    /// Sends queued ops as few frames as possible (everything that arrived since the last flush).
    fn flush(&mut self) {
        let send = self.link_up() && self.role == HaRole::Primary;
        for frame in self.log.flush(self.epoch, send) {
            self.send(frame);
        }
    }

    fn refresh_supervisor(&mut self) {
        if !self.attached {
            return;
        }
        let primary_url = match self.role {
            HaRole::Primary => None,
            // The configured address first: the one learned in the handshake is the peer's
            // bound address, which may be 0.0.0.0.
            HaRole::Backup => self
                .c
                .peer_http
                .clone()
                .or_else(|| self.primary_http.clone()),
        };
        self.out.push(Effect::SetRole(crate::role::Role {
            primary: self.role == HaRole::Primary,
            draining: self.draining,
            restoring: self.restore_after.is_some(),
            primary_url,
        }));
    }

    /// Becomes primary with `epoch`: respawns every replicated bot, fences the old primary.
    fn promote(&mut self, epoch: u64, now: Time) {
        // A link still handshaking with the old primary must not complete as primary-primary.
        if self.link.is_some() {
            self.drop_link("promoted", now);
        }
        self.role = HaRole::Primary;
        self.epoch = epoch;
        self.draining = false;
        self.follower.in_sync = false;
        self.handed_over = false;
        self.log.restart_after(self.follower.applied);
        if self.c.durable {
            // The store gets this node's whole state once, over whatever it held.
            self.unwritten.replace(now.mono_ms);
        }
        self.primary_http = None;
        // Shared with the store, not copied: a promotion with 100 000 bots hands them over in
        // a few milliseconds (a save during the restore copies that one bot).
        let bots: Vec<Arc<ReplicatedBot>> = self.store.values().cloned().collect();
        tracing::warn!(epoch, bots = bots.len(), node = %self.c.node_id, "this node is now the primary");
        self.out.push(Effect::Activate { epoch });
        self.save_state();
        self.refresh_supervisor();
        self.out.push(Effect::BecomePrimary { bots });
    }

    /// Becomes backup: drops every bot without a leave (they go on at the primary).
    /// Becomes a backup: `fenced` (a newer epoch exists), or after this node `handed_over` in a
    /// switchover.
    fn demote(&mut self, fenced: bool, handed_over: bool, now: Time) {
        if self.role == HaRole::Backup {
            return;
        }
        tracing::warn!(epoch = self.epoch, fenced, node = %self.c.node_id, "this node is now a backup");
        self.role = HaRole::Backup;
        self.draining = false;
        for conn in self.handshakes.drain() {
            self.refuse(conn, "this node is no longer the primary");
        }
        self.handed_over = handed_over;
        self.unreachable = 0;
        if handed_over {
            // Keep what was handed over; take the role back only if the hand-over was lost.
            self.synced_once = true;
        } else {
            // Another node is the primary (it fenced us): do not fail over to ourselves before
            // we hold its state.
            self.synced_once = false;
            let store = std::mem::take(&mut self.store);
            if !store.is_empty() {
                self.out.push(Effect::Discard(Arc::new(store)));
            }
        }
        self.follower.applied = 0;
        self.follower.stop(now.mono_ms);
        // A backup writes nothing: the primary does.
        self.unwritten = Unwritten::default();
        let done = self.log.clear();
        self.released(done, false);
        self.out.push(Effect::Deactivate);
        self.save_state();
        self.out.push(Effect::BecomeBackup);
        self.refresh_supervisor();
        if self.switchover.take().is_some() {
            tracing::warn!("switchover abandoned: this node stopped being the primary");
            self.out
                .push(Effect::SwitchoverDone(Err(SwitchoverError::Demoted)));
        }
    }

    fn remember(&mut self, kind: &str, now: Time) {
        self.recent.push_back(RoleChange {
            at_ms: now.wall_ms,
            kind: kind.to_string(),
            role: self.role,
            epoch: self.epoch,
        });
        while self.recent.len() > RECENT_CHANGES {
            self.recent.pop_front();
        }
    }

    /// Keeps the role and epoch for the next start (asks for a write when they changed).
    fn save_state(&mut self) {
        if !self.c.state_file {
            return;
        }
        let saved = SavedRole {
            role: self.role,
            epoch: self.epoch,
        };
        if self.saved != Some(saved) {
            self.out.push(Effect::WriteState(saved));
        }
    }

    fn switchover(&mut self, now: Time) {
        let refused = if self.role != HaRole::Primary {
            Some(SwitchoverError::NotPrimary)
        } else if self.draining {
            Some(SwitchoverError::InProgress)
        } else if !self.link_up() {
            Some(SwitchoverError::NoBackup)
        } else if !self.attached {
            Some(SwitchoverError::Starting)
        } else {
            None
        };
        if let Some(e) = refused {
            self.out.push(Effect::SwitchoverDone(Err(e)));
            return;
        }
        self.draining = true;
        self.switchover = Some(SwitchoverRun {
            started: now.mono_ms,
            phase: SwitchoverPhase::Draining,
        });
        self.refresh_supervisor();
        tracing::info!(epoch = self.epoch, "switchover: draining");
        // No more chat events in; every bot finishes what it has; then every save is out.
        self.out.push(Effect::Drain);
    }

    fn drained(&mut self, now: Time) {
        if self.switchover.is_none() {
            return;
        }
        // Wait until the backup has acknowledged every op (and this connection's snapshot).
        self.flush();
        let last = self.log.last_op();
        if (self.log.acked() >= last && self.backup_synced()) || !self.link_up() {
            self.finish_switchover(now);
        } else if let Some(run) = self.switchover.as_mut() {
            run.phase = SwitchoverPhase::Waiting {
                last,
                deadline: now.mono_ms + SWITCHOVER_WAIT_MS,
            };
        }
    }

    fn finish_switchover(&mut self, now: Time) {
        let Some(run) = self.switchover.take() else {
            return;
        };
        if self.role != HaRole::Primary || !self.draining {
            // Fenced or demoted meanwhile: nothing to hand over.
            tracing::warn!("switchover abandoned: this node stopped being the primary");
            self.out
                .push(Effect::SwitchoverDone(Err(SwitchoverError::Demoted)));
            return;
        }
        let last = match run.phase {
            SwitchoverPhase::Waiting { last, .. } => last,
            SwitchoverPhase::Draining => self.log.last_op(),
        };
        // Everything up to the drained state is acknowledged, by a backup that applied this
        // connection's snapshot (a backup that never held this node's state would take over
        // without it, or ignore the hand-over); anything later (a bot that ended meanwhile) is
        // already on the link, ahead of the hand-over.
        let all_acked = self.log.acked() >= last && self.backup_synced();
        self.flush();
        if !self.link_up() || !all_acked {
            self.draining = false;
            self.refresh_supervisor();
            self.out.push(Effect::ResumeEvents);
            let why = if !self.link_up() {
                SwitchoverError::BackupGone
            } else {
                SwitchoverError::NotAcknowledged
            };
            tracing::warn!(reason = %why, "switchover abandoned; this node stays primary");
            self.out.push(Effect::SwitchoverDone(Err(why)));
            return;
        }
        let new_epoch = self.epoch + 1;
        let upto_op = self.log.last_op();
        let bots = self.store.len();
        self.send(HaFrame::HandOver {
            epoch: new_epoch,
            upto_op,
        });
        self.switchovers_manual += 1;
        self.primary_http = None;
        let peer_http = self.c.peer_http.clone();
        self.epoch = new_epoch;
        self.demote(false, true, now);
        self.remember("switchover", now);
        self.drop_link("hand-over sent", now);
        self.primary_http = peer_http;
        self.refresh_supervisor();
        self.out.push(Effect::SwitchoverDone(Ok(SwitchoverReport {
            new_epoch,
            bots,
            drain_ms: now.mono_ms.saturating_sub(run.started),
        })));
    }

    fn tick(&mut self, now: Time) {
        self.save_state();
        let t = now.mono_ms;
        if let Some(at) = self.restore_after {
            if self.role != HaRole::Primary {
                self.restore_after = None;
                self.refresh_supervisor();
            } else if self.backup_synced() || (t >= at && !self.link_up()) {
                self.restore_seeded();
            }
        }
        let failover_after = self.c.failover_after_ms;
        // An accepted connection that has not proved itself in time is closed.
        let deadline = failover_after.max(HANDSHAKE_MIN_MS);
        for conn in self.handshakes.late(t, deadline) {
            tracing::warn!("an HA connection sent no Hello in time; closing it");
            self.out.push(Effect::Close { conn });
        }
        if let Some(SwitchoverRun {
            phase: SwitchoverPhase::Waiting { deadline, .. },
            ..
        }) = self.switchover
        {
            // A switchover gives up after its wait, or once its backup has been gone for a
            // whole failover period.
            let gone = self.link.is_none() && t.saturating_sub(self.link_lost_at) > failover_after;
            if t >= deadline || gone {
                self.finish_switchover(now);
            }
        }
        if self
            .link
            .as_ref()
            .is_some_and(|l| t.saturating_sub(l.last_seen) > failover_after)
        {
            self.drop_link("peer silent", now);
        }
        match self.role {
            HaRole::Primary => {
                if self.link_up() {
                    let epoch = self.epoch;
                    self.send(HaFrame::Heartbeat { epoch });
                }
            }
            HaRole::Backup => {
                if self.link.is_none() {
                    self.dial();
                }
                let silent = t.saturating_sub(self.follower.last_heard) > failover_after;
                // A node that handed over takes the role back only when the peer is not there
                // to be a primary: twice no answer, or a refusal as a backup.
                let lost_hand_over = !self.handed_over || self.unreachable >= 2;
                if silent
                    && !self.link_up()
                    && self.synced_once
                    && self.c.has_peer
                    && lost_hand_over
                {
                    tracing::warn!(
                        silence_ms = t.saturating_sub(self.follower.last_heard),
                        "the primary is silent; failing over"
                    );
                    self.switchovers_failover += 1;
                    self.out.push(Effect::Switched { kind: "failover" });
                    let epoch = self.epoch + 1;
                    self.promote(epoch, now);
                    self.remember("failover", now);
                } else if self.link_up() && self.follower.in_sync {
                    let upto_op = self.follower.applied;
                    self.send(HaFrame::Ack { upto_op });
                } else if self.link_up() {
                    // Still receiving a snapshot: tell the primary we are alive.
                    let epoch = self.epoch;
                    self.send(HaFrame::Heartbeat { epoch });
                }
            }
        }
    }
}

/// The bot an op is about.
fn op_instance(op: &HaOp) -> &str {
    match op {
        HaOp::Started(b) => &b.instance_id,
        HaOp::Saved { instance_id, .. }
        | HaOp::Checkpoint { instance_id, .. }
        | HaOp::Removed { instance_id } => instance_id,
    }
}

/// What the primary has not written to its durable store: the bots that changed since the last
/// batch (each written as it is when the batch is taken: the latest change wins), or its whole
/// state after a promotion. At most one entry per bot, so it is bounded by the bots there are
/// and by those that ended since.
#[derive(Debug, Default)]
struct Unwritten {
    changed: std::collections::BTreeSet<String>,
    replace: bool,
    /// When the oldest change not written was made.
    since_ms: Option<u64>,
}

impl Unwritten {
    fn changed(&mut self, instance_id: &str, now_ms: u64) {
        self.since_ms.get_or_insert(now_ms);
        if !self.replace && !self.changed.contains(instance_id) {
            self.changed.insert(instance_id.to_string());
        }
    }

    fn replace(&mut self, now_ms: u64) {
        self.replace = true;
        self.changed.clear();
        self.since_ms.get_or_insert(now_ms);
    }

    fn take(&mut self, store: &Store, epoch: u64) -> crate::store::StoreBatch {
        let mut batch = crate::store::StoreBatch {
            epoch,
            replace: self.replace,
            ..Default::default()
        };
        if self.replace {
            batch.put = store.values().cloned().collect();
        } else {
            for id in std::mem::take(&mut self.changed) {
                match store.get(&id) {
                    Some(bot) => batch.put.push(bot.clone()),
                    None => batch.remove.push(id),
                }
            }
        }
        self.replace = false;
        self.since_ms = None;
        batch
    }

    fn again(&mut self, batch: &crate::store::StoreBatch, since_ms: u64) {
        self.since_ms = Some(self.since_ms.map_or(since_ms, |s| s.min(since_ms)));
        if batch.replace {
            self.replace = true;
            self.changed.clear();
        } else if !self.replace {
            for bot in &batch.put {
                self.changed.insert(bot.instance_id.clone());
            }
            self.changed.extend(batch.remove.iter().cloned());
        }
    }

    fn len(&self, bots: usize) -> usize {
        if self.replace {
            bots
        } else {
            self.changed.len()
        }
    }

    fn age_ms(&self, now_ms: u64) -> u64 {
        self.since_ms.map_or(0, |s| now_ms.saturating_sub(s))
    }
}

pub(super) fn apply(store: &mut Store, op: HaOp) {
    match op {
        HaOp::Started(bot) => {
            store.insert(bot.instance_id.clone(), Arc::new(*bot));
        }
        HaOp::Saved {
            instance_id,
            context,
            checkpoint_seq,
        } => {
            if let Some(b) = store.get_mut(&instance_id) {
                let b = Arc::make_mut(b);
                b.context = Some(context);
                b.checkpoint_seq = checkpoint_seq;
            }
        }
        HaOp::Checkpoint {
            instance_id,
            checkpoint_seq,
        } => {
            if let Some(b) = store
                .get_mut(&instance_id)
                .filter(|b| b.checkpoint_seq < checkpoint_seq)
            {
                Arc::make_mut(b).checkpoint_seq = checkpoint_seq;
            }
        }
        HaOp::Removed { instance_id } => {
            store.remove(&instance_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(role: HaRole) -> HaState {
        let c = Config {
            node_id: "n".into(),
            cluster_id: "bgs".into(),
            role,
            has_peer: true,
            peer: Some("peer".into()),
            secret: "s".into(),
            failover_after_ms: 1000,
            sync: false,
            http_url: "http://n".into(),
            peer_http: None,
            state_file: false,
            durable: false,
        };
        HaState::new(c, role, 1, "run".into(), Time::default())
    }

    fn at(ms: u64) -> Time {
        Time {
            mono_ms: ms,
            wall_ms: ms,
        }
    }

    use super::super::replica;

    #[test]
    fn the_durable_store_gets_each_changed_bot_once_and_a_failed_batch_again() {
        let mut c = node(HaRole::Primary).c;
        c.durable = true;
        c.has_peer = false;
        let mut p = HaState::new(c, HaRole::Primary, 3, "run".into(), Time::default());
        p.step(at(0), Input::Attached);
        let op = |op| Input::Replicate { op, waiter: None };
        p.step(at(10), op(HaOp::Started(Box::new(replica("a", 1)))));
        p.step(at(20), op(HaOp::Started(Box::new(replica("b", 1)))));
        p.step(
            at(30),
            op(HaOp::Checkpoint {
                instance_id: "a".into(),
                checkpoint_seq: 5,
            }),
        );
        assert_eq!(
            p.unwritten(at(110)),
            (2, 100),
            "two bots, the oldest change 100 ms ago"
        );
        let batch = p.take_unwritten();
        let put: Vec<(&str, u64)> = batch
            .put
            .iter()
            .map(|b| (b.instance_id.as_str(), b.checkpoint_seq))
            .collect();
        assert_eq!(put, [("a", 5), ("b", 1)], "each bot once, as it is now");
        assert_eq!((batch.epoch, batch.replace), (3, false));
        assert_eq!(p.unwritten(at(120)), (0, 0));
        // The write failed: the bots count again, from when they first changed.
        p.unwritten_again(&batch, 10);
        p.step(
            at(130),
            op(HaOp::Removed {
                instance_id: "b".into(),
            }),
        );
        assert_eq!(p.unwritten(at(140)), (2, 130));
        let batch = p.take_unwritten();
        assert_eq!(batch.put.len(), 1);
        assert_eq!(batch.remove, ["b"]);
    }

    #[test]
    fn a_primary_restores_what_its_durable_store_held_and_a_backup_ignores_it() {
        let stored = || crate::store::Stored {
            epoch: 7,
            bots: vec![replica("a", 4)],
        };
        let restores = |out: &[Effect]| {
            out.iter().any(|e| {
                matches!(e, Effect::BecomePrimary { bots } if bots.len() == 1 && bots[0].checkpoint_seq == 4)
            })
        };
        // A single node restores at once.
        let mut single = node(HaRole::Primary);
        single.c.has_peer = false;
        single.seed(stored());
        assert_eq!(single.epoch(), 7, "an epoch is never taken twice");
        assert!(restores(&single.step(at(0), Input::Attached)));
        // A node of a pair waits: a backup may hold newer bots (and take over). With no backup
        // for failover-after-ms, it restores its own.
        let mut p = node(HaRole::Primary);
        p.seed(stored());
        assert!(!restores(&p.step(at(0), Input::Attached)));
        assert!(!restores(&p.step(at(500), Input::Tick)));
        assert!(restores(&p.step(at(1000), Input::Tick)));
        assert!(!restores(&p.step(at(1100), Input::Tick)), "once");
        let mut b = node(HaRole::Backup);
        b.seed(stored());
        assert!(b.store().is_empty(), "a backup takes its primary's state");
        assert_eq!(b.epoch(), 7);
    }

    #[test]
    fn a_backup_refuses_what_it_is_offered_and_keeps_dialing_its_primary() {
        let mut b = node(HaRole::Backup);
        assert_eq!(b.start(), vec![Effect::Dial]);
        let out = b.step(
            at(1),
            Input::Accepted {
                conn: 7,
                nonce: [1; 32],
            },
        );
        assert!(matches!(
            out[0],
            Effect::Send {
                conn: 7,
                frame: HaFrame::Refused { .. }
            }
        ));
        assert_eq!(out[1], Effect::Close { conn: 7 });
        // Its own dial is not displaced.
        let out = b.step(at(2), Input::Dialed(Some(8)));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_primary_acts_on_nothing_but_a_valid_hello_and_closes_the_silent() {
        let mut a = node(HaRole::Primary);
        for conn in 1..=(MAX_HANDSHAKES as u64 + 1) {
            a.step(
                at(conn),
                Input::Accepted {
                    conn,
                    nonce: [conn as u8; 32],
                },
            );
        }
        // The first was evicted by the last; the rest wait.
        assert_eq!(a.handshakes.len(), MAX_HANDSHAKES);
        assert!(!a.handshakes.has(1));
        // Anything but a Hello closes it; a Hello with a wrong proof is refused.
        let out = a.step(
            at(10),
            Input::Frame {
                conn: 2,
                frame: HaFrame::Heartbeat { epoch: 9 },
            },
        );
        assert_eq!(out, vec![Effect::Close { conn: 2 }]);
        let hello = HaFrame::Hello {
            version: HA_PROTOCOL_VERSION,
            cluster_id: "bgs".into(),
            node_id: "x".into(),
            role: HaRole::Backup,
            epoch: 1,
            proof: vec![0; 32],
            http: String::new(),
        };
        let out = a.step(
            at(11),
            Input::Frame {
                conn: 3,
                frame: hello,
            },
        );
        assert!(
            matches!(&out[0], Effect::Send { conn: 3, frame: HaFrame::Refused { reason } } if reason == "wrong secret")
        );
        assert!(!a.link_up());
        // The silent ones are closed when their time runs out.
        let out = a.step(at(HANDSHAKE_MIN_MS + 100), Input::Tick);
        let closed: Vec<u64> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Close { conn } => Some(*conn),
                _ => None,
            })
            .collect();
        assert_eq!(closed, vec![4, 5]);
        assert_eq!(a.handshakes.len(), 0);
    }
}
