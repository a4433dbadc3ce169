//! The HaCoordinator actor: feeds the HA state machine ([`HaState`]) its inputs (frames of the
//! peer, the heartbeat timer, bots' changes, operator commands) and carries its effects out
//! (frames to the link, dials, the ChatLink's and the Supervisor's role, waiters, the state
//! file). It decides nothing itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use bgs_proto::ha::HaFrame;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::state::{Config, Effect, HaState, Input, Time};
use super::{
    nonce, write_state, Accepted, Attach, GetHaStatus, HaDialer, HaSettings, Switchover,
    SwitchoverError, SwitchoverReport,
};
use crate::messages::{
    Activate, BecomeBackup, BecomePrimary, ChatFenced, Deactivate, Drain, PauseEvents, Replicate,
    ResumeEvents,
};
use crate::metrics::{metrics, Kind};

type SwitchoverReply = oneshot::Sender<Result<SwitchoverReport, SwitchoverError>>;

pub struct HaCoordinator {
    s: HaSettings,
    state: HaState,
    /// When the actor started: the state machine's monotonic clock counts from it.
    origin: Instant,
    dialer: Arc<dyn HaDialer>,
    /// Outbound frames of each open connection, by the number the state machine knows it by.
    links: HashMap<u64, mpsc::Sender<HaFrame>>,
    next_conn: u64,
    peers: Option<Attach>,
    waiters: HashMap<u64, oneshot::Sender<()>>,
    next_waiter: u64,
    /// The switchover under way, waiting for its answer.
    switchover: Option<SwitchoverReply>,
    /// The durable store written behind to, when one is configured.
    durable: Option<Durable>,
}

/// The write-behind to the durable store: one batch in flight at a time.
struct Durable {
    store: Arc<dyn crate::store::DurableStore>,
    writing: bool,
    /// Writes fail: the node goes on from memory, and says so once.
    degraded: bool,
}

impl HaCoordinator {
    pub fn new(s: HaSettings, epoch: u64, dialer: Arc<dyn HaDialer>) -> Self {
        let origin = Instant::now();
        let config = Config {
            node_id: s.node_id.clone(),
            cluster_id: s.cluster_id.clone(),
            role: s.role,
            has_peer: s.peer.is_some(),
            peer: s.peer.clone(),
            secret: s.secret.clone(),
            failover_after_ms: s.failover_after.as_millis() as u64,
            sync: s.sync,
            http_url: s.http_url.clone(),
            peer_http: s.peer_http.clone(),
            state_file: s.state_file.is_some(),
            durable: s.store.is_some(),
        };
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let mut state = HaState::new(config, s.role, epoch, run_id, Time::default());
        let mut s = s;
        let durable = s.store.as_mut().map(|store| {
            state.seed(std::mem::take(&mut store.stored));
            Durable {
                store: store.store.clone(),
                writing: false,
                degraded: false,
            }
        });
        HaCoordinator {
            s,
            state,
            origin,
            dialer,
            links: HashMap::new(),
            next_conn: 1,
            peers: None,
            waiters: HashMap::new(),
            next_waiter: 1,
            switchover: None,
            durable,
        }
    }

    fn now(&self) -> Time {
        Time {
            mono_ms: self.origin.elapsed().as_millis() as u64,
            wall_ms: crate::now_ms(),
        }
    }

    /// Steps the state machine and carries out what it says, and what that leads to.
    fn step(&mut self, input: Input, ctx: &mut Context<Self>) {
        self.step_answering(input, None, ctx);
    }

    /// As [`Self::step`]; `asking` is a switchover request that this very input carries (it
    /// gets a refusal at once, or waits).
    fn step_answering(
        &mut self,
        input: Input,
        mut asking: Option<SwitchoverReply>,
        ctx: &mut Context<Self>,
    ) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let now = self.now();
            for effect in self.state.step(now, input) {
                self.carry_out(effect, &mut inputs, &mut asking, ctx);
            }
        }
        if let Some(reply) = asking {
            // Accepted and under way: answered when the state machine says it is done.
            self.switchover = Some(reply);
        }
        self.publish_metrics();
    }

    fn carry_out(
        &mut self,
        effect: Effect,
        inputs: &mut VecDeque<Input>,
        asking: &mut Option<SwitchoverReply>,
        ctx: &mut Context<Self>,
    ) {
        match effect {
            Effect::Send { conn, frame } => {
                if let HaFrame::Refused { reason } = &frame {
                    tracing::warn!(%reason, "HA connection refused");
                    metrics().refused.inc(["ha", "handshake"]);
                }
                let sent = self
                    .links
                    .get(&conn)
                    .is_some_and(|tx| tx.try_send(frame).is_ok());
                if !sent {
                    inputs.push_back(Input::SendFailed { conn });
                }
            }
            Effect::Close { conn } => {
                // Dropping the sender closes the connection once what is queued has gone out.
                self.links.remove(&conn);
            }
            Effect::Dial => self.dial(ctx),
            Effect::Discard(store) => crate::drop_later(store),
            Effect::ScheduleFlush => ctx.notify(Flush),
            Effect::Activate { epoch } => {
                if let Some(p) = &self.peers {
                    p.activate.do_send(Activate { epoch });
                }
            }
            Effect::Deactivate => {
                if let Some(p) = &self.peers {
                    p.deactivate.do_send(Deactivate);
                }
            }
            Effect::ResumeEvents => {
                if let Some(p) = &self.peers {
                    p.resume.do_send(ResumeEvents);
                }
            }
            Effect::Drain => {
                let Some(p) = self.peers.clone() else {
                    inputs.push_back(Input::Drained);
                    return;
                };
                let fut = async move {
                    // No more chat events in; every bot finishes what it has.
                    let started = std::time::Instant::now();
                    let _ = p.pause.send(PauseEvents).await;
                    let paused_ms = started.elapsed().as_millis() as u64;
                    let _ = p.drain.send(Drain).await;
                    tracing::info!(
                        paused_ms,
                        drained_ms = started.elapsed().as_millis() as u64,
                        "switchover: every bot drained"
                    );
                };
                // Through the mailbox, behind every change the drained bots replicated before
                // letting their tokens go (sent, not waited for, in async mode).
                ctx.spawn(
                    fut.into_actor(self)
                        .map(|(), _act, ctx| ctx.address().do_send(Drained)),
                );
            }
            Effect::SetRole(role) => {
                if let Some(p) = &self.peers {
                    p.role.set(role);
                }
            }
            Effect::BecomePrimary { bots } => {
                if let Some(p) = &self.peers {
                    p.become_primary.do_send(BecomePrimary { bots });
                }
            }
            Effect::BecomeBackup => {
                if let Some(p) = &self.peers {
                    p.become_backup.do_send(BecomeBackup);
                }
            }
            Effect::Release { waiters, .. } => {
                for w in waiters {
                    if let Some(tx) = self.waiters.remove(&w) {
                        let _ = tx.send(());
                    }
                }
            }
            Effect::SwitchoverDone(result) => {
                if let Some(reply) = asking.take().or_else(|| self.switchover.take()) {
                    let _ = reply.send(result);
                }
            }
            Effect::WriteState(saved) => {
                // Written here, in the handler, on purpose: it happens only when the role or
                // epoch changes, the file is a few dozen bytes, and two writes handed to
                // separate tasks could land out of order and leave the older role on disk.
                let error = self.s.state_file.as_ref().and_then(|path| {
                    write_state(path, saved)
                        .err()
                        .map(|e| format!("{}: {e}", path.display()))
                });
                inputs.push_back(Input::StateWritten { saved, error });
            }
            Effect::Switched { kind } => metrics().switchovers.inc([kind]),
        }
    }

    fn dial(&mut self, ctx: &mut Context<Self>) {
        let Some(peer) = self.s.peer.clone() else {
            self.step(Input::Dialed(None), ctx);
            return;
        };
        let fut = self.dialer.dial(&peer);
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            let conn = match result {
                Ok(conn) => Some(act.install(conn, ctx)),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot reach the HA peer");
                    None
                }
            };
            act.step(Input::Dialed(conn), ctx);
        }));
    }

    /// Keeps a connection's sender and follows its frames; the number it is known by.
    fn install(&mut self, conn: super::HaConnection, ctx: &mut Context<Self>) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.links.insert(id, conn.outbound);
        ctx.add_stream(crate::frames_of(id, conn.inbound));
        id
    }

    fn publish_metrics(&self) {
        let m = metrics();
        let g = self.state.gauges(self.now());
        m.ha_role_primary.set(i64::from(g.primary));
        m.ha_epoch.set(g.epoch as i64);
        m.ha_peer_connected.set(i64::from(g.peer_connected));
        m.ha_pending.set(g.replication_pending as i64);
        m.ha_lag_seconds.set(g.replication_lag_seconds);
    }
}

impl Actor for HaCoordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics().actor_started(Kind::HaCoordinator);
        ctx.set_mailbox_capacity(4096);
        let every = self.s.heartbeat;
        ctx.run_interval(every, |act, ctx| act.step(Input::Tick, ctx));
        if let Some(lag) = self.s.store.as_ref().map(|s| s.max_lag) {
            ctx.run_interval(lag, |act, ctx| act.write_behind(ctx));
        }
        let mut inputs = VecDeque::new();
        let mut none = None;
        for effect in self.state.start() {
            self.carry_out(effect, &mut inputs, &mut none, ctx);
        }
        for input in inputs {
            self.step(input, ctx);
        }
        self.publish_metrics();
    }
}

impl StreamHandler<(u64, Option<HaFrame>)> for HaCoordinator {
    fn handle(&mut self, (conn, frame): (u64, Option<HaFrame>), ctx: &mut Context<Self>) {
        let started = std::time::Instant::now();
        let input = match frame {
            Some(frame) => Input::Frame { conn, frame },
            None => {
                self.links.remove(&conn);
                Input::Closed { conn }
            }
        };
        self.step(input, ctx);
        metrics().handled(Kind::HaCoordinator, started.elapsed());
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

/// The switchover's drain is done (queued behind the bots' last changes).
#[derive(Message)]
#[rtype(result = "()")]
struct Drained;

impl Handler<Drained> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, _: Drained, ctx: &mut Context<Self>) {
        self.step(Input::Drained, ctx);
    }
}

impl Handler<Flush> for HaCoordinator {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.step(Input::Flush, ctx);
    }
}

impl Handler<Accepted> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, Accepted(conn): Accepted, ctx: &mut Context<Self>) {
        let conn = self.install(conn, ctx);
        self.step(
            Input::Accepted {
                conn,
                nonce: nonce(),
            },
            ctx,
        );
    }
}

impl Handler<Replicate> for HaCoordinator {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, Replicate(op): Replicate, ctx: &mut Context<Self>) -> Self::Result {
        if !self.s.sync {
            self.step(Input::Replicate { op, waiter: None }, ctx);
            return Box::pin(async {});
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(id, tx);
        self.step(
            Input::Replicate {
                op,
                waiter: Some(id),
            },
            ctx,
        );
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<ChatFenced> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, _: ChatFenced, ctx: &mut Context<Self>) {
        self.step(Input::Fenced, ctx);
    }
}

impl Handler<Attach> for HaCoordinator {
    type Result = ();

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) {
        self.peers = Some(msg);
        self.step(Input::Attached, ctx);
    }
}

impl Handler<GetHaStatus> for HaCoordinator {
    type Result = MessageResult<GetHaStatus>;

    fn handle(&mut self, _: GetHaStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let mut status = self.state.status(now);
        status.store = self.durable.as_ref().map(|d| {
            let (pending, lag_ms) = self.state.unwritten(now);
            crate::store::StoreStatus {
                kind: d.store.kind(),
                state: if d.degraded { "degraded" } else { "ok" },
                pending,
                lag_seconds: lag_ms as f64 / 1000.0,
            }
        });
        MessageResult(status)
    }
}

impl HaCoordinator {
    /// Writes what changed since the last batch (every `max-lag-ms`, one batch at a time). A
    /// failed write keeps its bots unwritten and is tried again at the next turn; the node goes
    /// on from memory meanwhile.
    fn write_behind(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        let (pending, lag_ms) = self.state.unwritten(now);
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        metrics().store_pending(pending, lag_ms as f64 / 1000.0);
        if d.writing {
            return;
        }
        let batch = self.state.take_unwritten();
        if batch.is_empty() {
            return;
        }
        d.writing = true;
        let since = now.mono_ms.saturating_sub(lag_ms);
        // Kept (shared records, the removed ids) so that a failed write can count them again.
        let write = d.store.write(batch.clone());
        ctx.spawn(write.into_actor(self).map(move |result, act, _ctx| {
            let Some(d) = act.durable.as_mut() else {
                return;
            };
            d.writing = false;
            match result {
                Ok(()) => {
                    metrics().store_write(true, batch.len());
                    if d.degraded {
                        d.degraded = false;
                        tracing::warn!(store = d.store.kind(), "durable store writes work again");
                    }
                }
                Err(e) => {
                    metrics().store_write(false, batch.len());
                    act.state.unwritten_again(&batch, since);
                    let Some(d) = act.durable.as_mut() else {
                        return;
                    };
                    if !d.degraded {
                        d.degraded = true;
                        tracing::error!(store = d.store.kind(), error = %e, "durable store write failed; going on from memory, trying again");
                    }
                }
            }
        }));
    }
}

impl Handler<Switchover> for HaCoordinator {
    type Result = ResponseFuture<Result<SwitchoverReport, SwitchoverError>>;

    fn handle(&mut self, _: Switchover, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.switchover.is_some() {
            let _ = tx.send(Err(SwitchoverError::InProgress));
        } else {
            self.step_answering(Input::Switchover, Some(tx), ctx);
        }
        Box::pin(async move { rx.await.unwrap_or(Err(SwitchoverError::Demoted)) })
    }
}
