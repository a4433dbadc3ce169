//! HaCoordinator: one per node. Holds the node's role and epoch, runs the HA link to the peer
//! (handshake with a shared secret, heartbeats), replicates every bot start, context save and
//! removal to the backup (batched, acknowledged; a late backup gets a snapshot first), promotes
//! the backup when the primary falls silent, and runs planned switchovers. docs/HA.md.
//!
//! The socket lives in `src` (an [`HaDialer`] and the listener that sends [`Accepted`]).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bgs_proto::ha::{HaFrame, HaOp, HaRole, ReplicatedBot, HA_PROTOCOL_VERSION};
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::messages::{
    Activate, BecomeBackup, BecomePrimary, ChatFenced, Deactivate, Drain, PauseEvents, Replicate,
    ResumeEvents, SetRole,
};
use crate::metrics::{metrics, Kind};

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
    pub set_role: Recipient<SetRole>,
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
    #[error("the hand-over could not be sent; this node stays primary")]
    HandOverNotSent,
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

const RECENT_CHANGES: usize = 10;

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

/// The role and epoch a node had when it stopped (the `ha.state-file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRole {
    pub role: HaRole,
    pub epoch: u64,
}

/// Reads a state file; `Ok(None)` when it does not exist yet.
pub fn read_state(path: &std::path::Path) -> io::Result<Option<SavedRole>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_state(path: &std::path::Path, saved: SavedRole) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(
        serde_json::to_string(&saved)
            .map_err(io::Error::other)?
            .as_bytes(),
    )?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[derive(PartialEq)]
enum LinkStage {
    /// Dialer: waiting for the Challenge.
    AwaitChallenge,
    /// Acceptor: sent a Challenge, waiting for Hello.
    AwaitHello([u8; 32]),
    /// Dialer: sent Hello, waiting for Welcome.
    AwaitWelcome,
    Up,
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<HaFrame>,
    stage: LinkStage,
    last_seen: Instant,
    peer_node: Option<String>,
}

pub struct HaCoordinator {
    s: HaSettings,
    role: HaRole,
    epoch: u64,
    draining: bool,
    /// Holds a primary's state (a snapshot since the last start or demotion): only then may
    /// silence make this node promote itself. A backup that never reached a primary (wrong
    /// secret, no route) never takes over by itself.
    synced_once: bool,
    /// Primary: the op number the last snapshot covered (the backup is in sync once it acks it).
    snapshot_upto: u64,
    /// What the coordinator drives, once attached.
    peers: Option<Attach>,
    generation: u64,
    link: Option<Link>,
    dialer: Arc<dyn HaDialer>,
    dialing: bool,
    // Primary side.
    store: BTreeMap<String, ReplicatedBot>,
    next_op: u64,
    unacked: VecDeque<(u64, HaOp, Instant)>,
    outbox: Vec<HaOp>,
    flush_scheduled: bool,
    acked: u64,
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    /// A switchover waiting for the backup to acknowledge up to this op. Unlike `waiters` it
    /// survives a link that drops and comes back (the snapshot then covers everything).
    switchover_wait: Option<(u64, oneshot::Sender<()>)>,
    link_lost_at: Instant,
    // Backup side.
    applied: u64,
    in_sync: bool,
    last_primary: Instant,
    primary_http: Option<String>,
    switchovers_manual: u64,
    switchovers_failover: u64,
    peer_http: Option<String>,
    recent: VecDeque<RoleChange>,
    saved: Option<SavedRole>,
    state_write_failed: Option<SavedRole>,
    /// This run of the process (told to backups in Welcome).
    run_id: String,
    /// Backup: the run of the primary whose state it holds, and of the one it is linking to.
    synced_run: Option<String>,
    pending_run: Option<String>,
    /// Backup: snapshot chunks received so far.
    staging: BTreeMap<String, ReplicatedBot>,
}

type HmacSha256 = Hmac<Sha256>;

/// Proof that a dialer knows the shared secret: HMAC-SHA256 over the nonce, cluster and node.
pub fn proof(secret: &str, nonce: &[u8; 32], cluster_id: &str, node_id: &str) -> Vec<u8> {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return Vec::new(), // HMAC takes keys of any length; not reached
    };
    mac.update(nonce);
    mac.update(cluster_id.as_bytes());
    mac.update(&[0]);
    mac.update(node_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn verify(secret: &str, nonce: &[u8; 32], cluster_id: &str, node_id: &str, given: &[u8]) -> bool {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return false,
    };
    mac.update(nonce);
    mac.update(cluster_id.as_bytes());
    mac.update(&[0]);
    mac.update(node_id.as_bytes());
    mac.verify_slice(given).is_ok()
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    n[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    n
}

/// Ops per Ops frame (a group commit); more wait for the next frame.
const OPS_PER_FRAME: usize = 2048;
/// About this many bytes of bots per snapshot frame (frames are at most 16 MiB).
const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;

impl HaCoordinator {
    pub fn new(s: HaSettings, epoch: u64, dialer: Arc<dyn HaDialer>) -> Self {
        Self {
            role: s.role,
            primary_http: if s.role == HaRole::Backup {
                s.peer_http.clone()
            } else {
                None
            },
            s,
            epoch,
            draining: false,
            synced_once: false,
            snapshot_upto: 0,
            peers: None,
            generation: 0,
            link: None,
            dialer,
            dialing: false,
            store: BTreeMap::new(),
            next_op: 1,
            unacked: VecDeque::new(),
            outbox: Vec::new(),
            flush_scheduled: false,
            acked: 0,
            waiters: BTreeMap::new(),
            switchover_wait: None,
            link_lost_at: Instant::now(),
            applied: 0,
            in_sync: false,
            last_primary: Instant::now(),
            switchovers_manual: 0,
            switchovers_failover: 0,
            peer_http: None,
            recent: VecDeque::new(),
            saved: None,
            state_write_failed: None,
            run_id: uuid::Uuid::new_v4().simple().to_string(),
            synced_run: None,
            pending_run: None,
            staging: BTreeMap::new(),
        }
    }

    fn send(&mut self, frame: HaFrame) -> bool {
        match &self.link {
            Some(l) => l.tx.try_send(frame).is_ok(),
            None => false,
        }
    }

    fn link_up(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.stage == LinkStage::Up)
    }

    fn drop_link(&mut self, why: &str) {
        if let Some(l) = self.link.take() {
            tracing::warn!(peer = ?l.peer_node, reason = why, "HA link closed");
            self.link_lost_at = Instant::now();
        }
        // Unacknowledged ops are covered by the snapshot the backup gets when it comes back.
        self.unacked.clear();
        self.generation += 1;
        // Nobody can acknowledge now: sync-mode saves go on without the backup (it gets a
        // snapshot when it comes back).
        self.release_waiters(u64::MAX);
    }

    fn release_waiters(&mut self, upto: u64) {
        let later = self.waiters.split_off(&(upto.saturating_add(1)));
        for (_, ws) in std::mem::replace(&mut self.waiters, later) {
            for w in ws {
                let _ = w.send(());
            }
        }
    }

    fn install(&mut self, conn: HaConnection, stage: LinkStage, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        self.link = Some(Link {
            generation,
            tx: conn.outbound,
            stage,
            last_seen: Instant::now(),
            peer_node: None,
        });
        ctx.add_stream(LinkStream {
            generation,
            inner: conn.inbound,
            ended: false,
        });
    }

    fn dial(&mut self, ctx: &mut Context<Self>) {
        let Some(peer) = self.s.peer.clone() else {
            return;
        };
        if self.dialing || self.link.is_some() || self.role != HaRole::Backup {
            return;
        }
        self.dialing = true;
        let fut = self.dialer.dial(&peer);
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            act.dialing = false;
            match result {
                Ok(conn) if act.link.is_none() && act.role == HaRole::Backup => {
                    act.install(conn, LinkStage::AwaitChallenge, ctx);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "cannot reach the HA peer"),
            }
        }));
    }

    fn on_frame(&mut self, frame: HaFrame, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        link.last_seen = Instant::now();
        let stage = std::mem::replace(&mut link.stage, LinkStage::Up);
        match (stage, frame) {
            (LinkStage::AwaitChallenge, HaFrame::Challenge { nonce }) => {
                let hello = HaFrame::Hello {
                    version: HA_PROTOCOL_VERSION,
                    cluster_id: self.s.cluster_id.clone(),
                    node_id: self.s.node_id.clone(),
                    role: self.role,
                    epoch: self.epoch,
                    proof: proof(&self.s.secret, &nonce, &self.s.cluster_id, &self.s.node_id),
                    http: self.s.http_url.clone(),
                };
                self.set_stage(LinkStage::AwaitWelcome);
                self.send(hello);
            }
            (
                LinkStage::AwaitHello(nonce),
                HaFrame::Hello {
                    version,
                    cluster_id,
                    node_id,
                    role,
                    proof,
                    http,
                    ..
                },
            ) => {
                let refuse = if version != HA_PROTOCOL_VERSION {
                    Some(format!("HA protocol version {version} is not supported (this node speaks {HA_PROTOCOL_VERSION})"))
                } else if cluster_id != self.s.cluster_id {
                    Some(format!(
                        "cluster {cluster_id:?} is not this node's cluster {:?}",
                        self.s.cluster_id
                    ))
                } else if !verify(&self.s.secret, &nonce, &cluster_id, &node_id, &proof) {
                    Some("wrong secret".to_string())
                } else if self.role != HaRole::Primary {
                    Some("this node is not the primary".to_string())
                } else if role == HaRole::Primary {
                    Some(
                        "two primaries: the Chat Server's fencing decides; not linking".to_string(),
                    )
                } else {
                    None
                };
                if let Some(reason) = refuse {
                    tracing::error!(peer = %node_id, %reason, "HA peer refused");
                    self.send(HaFrame::Refused { reason });
                    self.drop_link("peer refused");
                    return;
                }
                // The dialer is a backup (a primary was refused above). Its epoch may be higher
                // than ours (it was primary once): no reason to step down — the Chat Server's
                // fencing decides who may post — so it is accepted; it promotes above its own
                // epoch if it must.
                if let Some(l) = self.link.as_mut() {
                    l.peer_node = Some(node_id.clone());
                }
                self.peer_http = Some(http);
                tracing::info!(peer = %node_id, "HA backup connected; sending a snapshot");
                self.send(HaFrame::Welcome {
                    node_id: self.s.node_id.clone(),
                    role: self.role,
                    epoch: self.epoch,
                    http: self.s.http_url.clone(),
                    run_id: self.run_id.clone(),
                });
                self.send_snapshot();
            }
            (
                LinkStage::AwaitWelcome,
                HaFrame::Welcome {
                    node_id,
                    role,
                    epoch,
                    http,
                    run_id,
                },
            ) => {
                if role != HaRole::Primary || self.role != HaRole::Backup {
                    self.drop_link("the peer is not primary (or this node is not a backup)");
                    return;
                }
                // A primary that restarted at the same epoch has lost every bot (its state is in
                // memory) and would replace ours with nothing. We hold the bots: take over, and
                // the Chat Server fences it.
                let restarted = self.synced_run.as_ref().is_some_and(|r| *r != run_id);
                if restarted && epoch <= self.epoch && !self.store.is_empty() {
                    tracing::warn!(peer = %node_id, bots = self.store.len(), "the primary restarted without its state; taking over");
                    self.drop_link("the primary restarted without its state");
                    self.switchovers_failover += 1;
                    metrics().switchovers.inc(&["failover"]);
                    let epoch = self.epoch + 1;
                    self.promote(epoch, ctx);
                    self.remember("failover");
                    return;
                }
                self.pending_run = Some(run_id);
                tracing::info!(peer = %node_id, epoch, "connected to the HA primary");
                if let Some(l) = self.link.as_mut() {
                    l.peer_node = Some(node_id);
                }
                self.epoch = self.epoch.max(epoch);
                self.peer_http = Some(http.clone());
                self.primary_http = Some(http);
                self.last_primary = Instant::now();
                self.in_sync = false;
                self.refresh_supervisor();
            }
            (_, HaFrame::Refused { reason }) => {
                tracing::error!(%reason, "the HA peer refused this node");
                self.drop_link("refused by peer");
            }
            (LinkStage::Up, frame) => self.on_stream(frame, ctx),
            (_, other) => {
                tracing::warn!(frame = ?std::mem::discriminant(&other), "unexpected HA frame during the handshake");
                self.drop_link("handshake violated");
            }
        }
    }

    fn set_stage(&mut self, stage: LinkStage) {
        if let Some(l) = self.link.as_mut() {
            l.stage = stage;
        }
    }

    /// Sends the whole state in frames of at most about [`SNAPSHOT_CHUNK_BYTES`].
    fn send_snapshot(&mut self) {
        self.snapshot_upto = self.next_op - 1;
        self.acked = 0;
        // Ops already queued are covered by the snapshot.
        self.outbox.clear();
        self.unacked.clear();
        let mut chunks: Vec<Vec<ReplicatedBot>> = vec![Vec::new()];
        let mut size = 0;
        for bot in self.store.values() {
            let kv = |m: &std::collections::BTreeMap<String, String>| -> usize {
                m.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
            };
            let bytes = 512
                + bot.context.as_ref().map_or(0, Vec::len)
                + kv(&bot.spec.parameters)
                + kv(&bot.spec.userdata);
            if size + bytes > SNAPSHOT_CHUNK_BYTES && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += bytes;
            if let Some(c) = chunks.last_mut() {
                c.push(bot.clone());
            }
        }
        let n = chunks.len();
        for (i, bots) in chunks.into_iter().enumerate() {
            let frame = HaFrame::Snapshot {
                epoch: self.epoch,
                upto_op: self.snapshot_upto,
                bots,
                first: i == 0,
                last: i + 1 == n,
            };
            if !self.send(frame) {
                self.drop_link("HA link congested during a snapshot");
                return;
            }
        }
    }

    fn on_stream(&mut self, frame: HaFrame, ctx: &mut Context<Self>) {
        match frame {
            HaFrame::Heartbeat { epoch } => {
                if self.role == HaRole::Backup {
                    self.last_primary = Instant::now();
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
                self.last_primary = Instant::now();
                self.epoch = self.epoch.max(epoch);
                // Chunks go to a staging copy: the state held so far stays whole until the
                // last chunk arrives (a snapshot cut in the middle changes nothing).
                if first {
                    self.staging.clear();
                }
                self.staging
                    .extend(bots.into_iter().map(|b| (b.instance_id.clone(), b)));
                if !last {
                    self.send(HaFrame::Heartbeat { epoch: self.epoch });
                    return;
                }
                self.store = std::mem::take(&mut self.staging);
                self.synced_run = self.pending_run.clone();
                self.applied = upto_op;
                self.in_sync = true;
                self.synced_once = true;
                tracing::info!(bots = self.store.len(), upto_op, "HA snapshot applied");
                self.send(HaFrame::Ack { upto_op });
            }
            HaFrame::Ops {
                epoch,
                first_op,
                ops,
            } if self.role == HaRole::Backup => {
                self.last_primary = Instant::now();
                self.epoch = self.epoch.max(epoch);
                if !self.in_sync || first_op != self.applied + 1 {
                    tracing::warn!(
                        first_op,
                        applied = self.applied,
                        "HA stream gap; reconnecting for a snapshot"
                    );
                    self.drop_link("stream gap");
                    return;
                }
                for op in ops {
                    apply(&mut self.store, op);
                    self.applied += 1;
                }
                self.send(HaFrame::Ack {
                    upto_op: self.applied,
                });
            }
            HaFrame::HandOver { epoch, upto_op } if self.role == HaRole::Backup => {
                if upto_op != self.applied {
                    tracing::warn!(
                        upto_op,
                        applied = self.applied,
                        "hand-over with a gap; taking over anyway"
                    );
                }
                tracing::info!(epoch, "switchover: taking over as primary");
                self.switchovers_manual += 1;
                metrics().switchovers.inc(&["manual"]);
                self.drop_link("hand-over");
                // Never below an epoch this node has seen (the Chat Server would refuse it).
                let epoch = epoch.max(self.epoch + 1);
                self.promote(epoch, ctx);
                self.remember("switchover");
            }
            HaFrame::Ack { upto_op } if self.role == HaRole::Primary => {
                self.acked = self.acked.max(upto_op);
                if self
                    .switchover_wait
                    .as_ref()
                    .is_some_and(|(last, _)| self.acked >= *last)
                {
                    if let Some((_, tx)) = self.switchover_wait.take() {
                        let _ = tx.send(());
                    }
                }
                while self
                    .unacked
                    .front()
                    .is_some_and(|(id, _, _)| *id <= upto_op)
                {
                    self.unacked.pop_front();
                }
                self.release_waiters(upto_op);
            }
            other => {
                tracing::debug!(frame = ?std::mem::discriminant(&other), role = ?self.role, "HA frame ignored");
            }
        }
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    /// Sends queued ops as few frames as possible (everything that arrived since the last flush).
    fn flush(&mut self) {
        self.flush_scheduled = false;
        if self.outbox.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.outbox);
        if !self.link_up() || self.role != HaRole::Primary {
            return;
        }
        let mut first = self.next_op - ops.len() as u64;
        for chunk in ops.chunks(OPS_PER_FRAME) {
            let frame = HaFrame::Ops {
                epoch: self.epoch,
                first_op: first,
                ops: chunk.to_vec(),
            };
            first += chunk.len() as u64;
            if !self.send(frame) {
                self.drop_link("HA link congested");
                return;
            }
        }
    }

    fn refresh_supervisor(&self) {
        if let Some(p) = &self.peers {
            let primary = match self.role {
                HaRole::Primary => None,
                // The configured address first: the one learned in the handshake is the
                // peer's bound address, which may be 0.0.0.0.
                HaRole::Backup => self
                    .s
                    .peer_http
                    .clone()
                    .or_else(|| self.primary_http.clone()),
            };
            p.set_role.do_send(SetRole {
                primary: self.role == HaRole::Primary,
                draining: self.draining,
                primary_url: primary,
            });
        }
    }

    /// Becomes primary with `epoch`: respawns every replicated bot, fences the old primary.
    fn promote(&mut self, epoch: u64, _ctx: &mut Context<Self>) {
        // A link still handshaking with the old primary must not complete as primary-primary.
        if self.link.is_some() {
            self.drop_link("promoted");
        }
        self.role = HaRole::Primary;
        self.epoch = epoch;
        self.draining = false;
        self.in_sync = false;
        self.next_op = self.applied + 1;
        self.acked = self.applied;
        self.unacked.clear();
        self.primary_http = None;
        let bots: Vec<ReplicatedBot> = self.store.values().cloned().collect();
        tracing::warn!(epoch, bots = bots.len(), node = %self.s.node_id, "this node is now the primary");
        if let Some(p) = &self.peers {
            p.activate.do_send(Activate { epoch });
        }
        self.save_state();
        self.publish_metrics();
        self.refresh_supervisor();
        if let Some(p) = &self.peers {
            p.become_primary.do_send(BecomePrimary { bots });
        }
    }

    /// Becomes backup: drops every bot without a leave (they go on at the primary).
    fn demote(&mut self, fenced: bool, _ctx: &mut Context<Self>) {
        if self.role == HaRole::Backup {
            return;
        }
        tracing::warn!(epoch = self.epoch, fenced, node = %self.s.node_id, "this node is now a backup");
        self.role = HaRole::Backup;
        self.draining = false;
        // Another node is (or is becoming) the primary: do not fail over to ourselves before we
        // hold its state.
        self.synced_once = false;
        self.in_sync = false;
        self.store.clear();
        self.outbox.clear();
        self.unacked.clear();
        self.applied = 0;
        self.release_waiters(u64::MAX);
        self.last_primary = Instant::now();
        if let Some(p) = &self.peers {
            p.deactivate.do_send(Deactivate);
        }
        self.save_state();
        self.publish_metrics();
        if let Some(p) = &self.peers {
            p.become_backup.do_send(BecomeBackup);
        }
        self.refresh_supervisor();
    }

    fn remember(&mut self, kind: &str) {
        self.recent.push_back(RoleChange {
            at_ms: crate::now_ms(),
            kind: kind.to_string(),
            role: self.role,
            epoch: self.epoch,
        });
        while self.recent.len() > RECENT_CHANGES {
            self.recent.pop_front();
        }
    }

    /// Keeps the role and epoch for the next start (a small file, written rarely).
    fn save_state(&mut self) {
        let saved = SavedRole {
            role: self.role,
            epoch: self.epoch,
        };
        if self.saved == Some(saved) {
            return;
        }
        if let Some(path) = &self.s.state_file {
            if let Err(e) = write_state(path, saved) {
                // Retried every tick; said once per failing state.
                if self.state_write_failed != Some(saved) {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the HA state file");
                    self.state_write_failed = Some(saved);
                }
                return;
            }
        }
        self.state_write_failed = None;
        self.saved = Some(saved);
    }

    fn publish_metrics(&self) {
        let m = metrics();
        m.ha_role_primary
            .set(i64::from(self.role == HaRole::Primary));
        m.ha_epoch.set(self.epoch as i64);
        m.ha_peer_connected.set(i64::from(self.link_up()));
        m.ha_pending.set(self.unacked.len() as i64);
        let lag = self.unacked.front().map_or(0.0, |(_, _, at)| {
            Instant::now().duration_since(*at).as_secs_f64()
        });
        m.ha_lag_seconds.set(lag);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.publish_metrics();
        self.save_state();
        let now = Instant::now();
        // A switchover whose backup has been gone for a whole failover period gives up.
        let gone =
            self.link.is_none() && now.duration_since(self.link_lost_at) > self.s.failover_after;
        if gone {
            if let Some((_, tx)) = self.switchover_wait.take() {
                let _ = tx.send(());
            }
        }
        if let Some(l) = &self.link {
            if now.duration_since(l.last_seen) > self.s.failover_after {
                self.drop_link("peer silent");
            }
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
                    self.dial(ctx);
                }
                let silent = now.duration_since(self.last_primary) > self.s.failover_after;
                if silent && !self.link_up() && self.synced_once && self.s.peer.is_some() {
                    tracing::warn!(
                        silence_ms = now.duration_since(self.last_primary).as_millis() as u64,
                        "the primary is silent; failing over"
                    );
                    self.switchovers_failover += 1;
                    metrics().switchovers.inc(&["failover"]);
                    let epoch = self.epoch + 1;
                    self.promote(epoch, ctx);
                    self.remember("failover");
                }
                if self.link_up() && self.in_sync {
                    let upto_op = self.applied;
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

fn apply(store: &mut BTreeMap<String, ReplicatedBot>, op: HaOp) {
    match op {
        HaOp::Started(bot) => {
            store.insert(bot.instance_id.clone(), *bot);
        }
        HaOp::Saved {
            instance_id,
            context,
            checkpoint_seq,
        } => {
            if let Some(b) = store.get_mut(&instance_id) {
                b.context = Some(context);
                b.checkpoint_seq = checkpoint_seq;
            }
        }
        HaOp::Removed { instance_id } => {
            store.remove(&instance_id);
        }
    }
}

impl Actor for HaCoordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::HaCoordinator);
        self.publish_metrics();
        ctx.set_mailbox_capacity(4096);
        let every = self.s.heartbeat;
        ctx.run_interval(every, |act, ctx| act.tick(ctx));
        if self.role == HaRole::Backup {
            self.dial(ctx);
        }
    }
}

struct LinkStream {
    generation: u64,
    inner: mpsc::Receiver<HaFrame>,
    ended: bool,
}

struct LinkFrame {
    generation: u64,
    /// `None`: the connection ended.
    frame: Option<HaFrame>,
}

impl futures_util::Stream for LinkStream {
    type Item = LinkFrame;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<LinkFrame>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let generation = self.generation;
        match self.inner.poll_recv(cx) {
            std::task::Poll::Ready(Some(frame)) => std::task::Poll::Ready(Some(LinkFrame {
                generation,
                frame: Some(frame),
            })),
            std::task::Poll::Ready(None) => {
                self.ended = true;
                std::task::Poll::Ready(Some(LinkFrame {
                    generation,
                    frame: None,
                }))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl StreamHandler<LinkFrame> for HaCoordinator {
    fn handle(&mut self, item: LinkFrame, ctx: &mut Context<Self>) {
        if self
            .link
            .as_ref()
            .is_some_and(|l| l.generation == item.generation)
        {
            let started = std::time::Instant::now();
            match item.frame {
                Some(frame) => self.on_frame(frame, ctx),
                None => self.drop_link("connection closed"),
            }
            metrics().handled(Kind::HaCoordinator, started.elapsed());
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for HaCoordinator {
    type Result = ();
    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) {
        self.flush();
    }
}

impl Handler<Accepted> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, Accepted(conn): Accepted, ctx: &mut Context<Self>) {
        if self.link_up() {
            // One link at a time: a newer connection replaces a silent one only via the tick.
            let _ = conn.outbound.try_send(HaFrame::Refused {
                reason: "a link is already up".into(),
            });
            return;
        }
        let n = nonce();
        let challenge = HaFrame::Challenge { nonce: n };
        if conn.outbound.try_send(challenge).is_err() {
            return;
        }
        self.install(conn, LinkStage::AwaitHello(n), ctx);
    }
}

impl Handler<Replicate> for HaCoordinator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, Replicate(op): Replicate, ctx: &mut Context<Self>) -> Self::Result {
        if self.role != HaRole::Primary {
            return Box::pin(async {});
        }
        apply(&mut self.store, op.clone());
        let id = self.next_op;
        self.next_op += 1;
        if !self.link_up() {
            return Box::pin(async {});
        }
        self.unacked.push_back((id, op.clone(), Instant::now()));
        self.outbox.push(op);
        self.schedule_flush(ctx);
        if !self.s.sync {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<ChatFenced> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, _: ChatFenced, ctx: &mut Context<Self>) {
        if self.role == HaRole::Primary {
            tracing::error!(
                epoch = self.epoch,
                "the Chat Server fenced this node; becoming backup"
            );
            self.demote(true, ctx);
            self.remember("fenced");
        }
    }
}

impl Handler<Attach> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, msg: Attach, _ctx: &mut Context<Self>) {
        self.peers = Some(msg);
        self.refresh_supervisor();
        if self.role == HaRole::Primary {
            if let Some(p) = &self.peers {
                p.activate.do_send(Activate { epoch: self.epoch });
            }
        }
    }
}

impl Handler<GetHaStatus> for HaCoordinator {
    type Result = MessageResult<GetHaStatus>;

    fn handle(&mut self, _: GetHaStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let lag = self.unacked.front().map_or(0.0, |(_, _, at)| {
            Instant::now().duration_since(*at).as_secs_f64()
        });
        MessageResult(HaStatus {
            node_id: self.s.node_id.clone(),
            cluster_id: self.s.cluster_id.clone(),
            role: self.role,
            epoch: self.epoch,
            draining: self.draining,
            peer: self.s.peer.clone(),
            peer_connected: self.link_up(),
            in_sync: match self.role {
                HaRole::Backup => self.in_sync && self.link_up(),
                HaRole::Primary => {
                    self.link_up() && self.acked >= self.snapshot_upto && self.unacked.is_empty()
                }
            },
            replication_pending: self.unacked.len() as u64,
            replication_lag_seconds: lag,
            primary_http: self.primary_http.clone(),
            replicated_bots: self.store.len(),
            switchovers_manual: self.switchovers_manual,
            switchovers_failover: self.switchovers_failover,
            peer_http: self.s.peer_http.clone().or_else(|| self.peer_http.clone()),
            recent: self.recent.iter().cloned().collect(),
        })
    }
}

impl Handler<Switchover> for HaCoordinator {
    type Result = ResponseActFuture<Self, Result<SwitchoverReport, SwitchoverError>>;

    fn handle(&mut self, _: Switchover, _ctx: &mut Context<Self>) -> Self::Result {
        let refuse = |e: SwitchoverError| -> Self::Result { Box::pin(actix::fut::ready(Err(e))) };
        if self.role != HaRole::Primary {
            return refuse(SwitchoverError::NotPrimary);
        }
        if self.draining {
            return refuse(SwitchoverError::InProgress);
        }
        if !self.link_up() {
            return refuse(SwitchoverError::NoBackup);
        }
        let Some(peers) = self.peers.clone() else {
            return refuse(SwitchoverError::Starting);
        };
        let started = Instant::now();
        self.draining = true;
        self.refresh_supervisor();
        tracing::info!(epoch = self.epoch, "switchover: draining");
        let fut = async move {
            // No more chat events in; every bot finishes what it has; then every save is out.
            let _ = peers.pause.send(PauseEvents).await;
            let _ = peers.drain.send(Drain).await;
        };
        Box::pin(
            fut.into_actor(self)
                .then(|(), act, _ctx| {
                    // Wait until the backup has acknowledged every op.
                    act.flush();
                    let last = act.next_op - 1;
                    let (tx, rx) = oneshot::channel();
                    if act.acked >= last || !act.link_up() {
                        let _ = tx.send(());
                    } else {
                        act.switchover_wait = Some((last, tx));
                    }
                    actix::fut::wrap_future(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
                        last
                    })
                })
                .map(move |last, act, ctx| {
                    if act.role != HaRole::Primary || !act.draining {
                        // Fenced or demoted meanwhile: nothing to hand over.
                        tracing::warn!("switchover abandoned: this node stopped being the primary");
                        return Err(SwitchoverError::Demoted);
                    }
                    // Everything up to the drained state is acknowledged; anything later (a
                    // bot that ended meanwhile) is already on the link, ahead of the hand-over.
                    let all_acked = act.acked >= last;
                    act.flush();
                    if !act.link_up() || !all_acked {
                        act.draining = false;
                        act.refresh_supervisor();
                        if let Some(p) = &act.peers {
                            p.resume.do_send(ResumeEvents);
                        }
                        let why = if !act.link_up() {
                            SwitchoverError::BackupGone
                        } else {
                            SwitchoverError::NotAcknowledged
                        };
                        tracing::warn!(
                            reason = %why,
                            "switchover abandoned; this node stays primary"
                        );
                        return Err(why);
                    }
                    let new_epoch = act.epoch + 1;
                    let upto_op = act.next_op - 1;
                    let bots = act.store.len();
                    let sent = act.send(HaFrame::HandOver {
                        epoch: new_epoch,
                        upto_op,
                    });
                    if !sent {
                        tracing::warn!("switchover abandoned: the hand-over could not be sent");
                        act.drop_link("hand-over could not be sent");
                        act.draining = false;
                        act.refresh_supervisor();
                        if let Some(p) = &act.peers {
                            p.resume.do_send(ResumeEvents);
                        }
                        return Err(SwitchoverError::HandOverNotSent);
                    }
                    act.switchovers_manual += 1;
                    act.primary_http = None;
                    let peer_http = act.s.peer_http.clone();
                    act.epoch = new_epoch;
                    act.demote(false, ctx);
                    act.remember("switchover");
                    act.drop_link("hand-over sent");
                    act.primary_http = peer_http;
                    act.refresh_supervisor();
                    Ok(SwitchoverReport {
                        new_epoch,
                        bots,
                        drain_ms: started.elapsed().as_millis() as u64,
                    })
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_need_the_secret() {
        let n = nonce();
        let p = proof("s3cret", &n, "bgs", "bgs-b");
        assert!(verify("s3cret", &n, "bgs", "bgs-b", &p));
        assert!(!verify("other", &n, "bgs", "bgs-b", &p));
        assert!(!verify("s3cret", &n, "bgs", "bgs-c", &p));
        assert!(!verify("s3cret", &nonce(), "bgs", "bgs-b", &p));
    }
}
