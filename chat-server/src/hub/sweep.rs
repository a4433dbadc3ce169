//! The sweeper (idle control, detach grace, forgetting old closed sessions) and shutdown.

use super::*;

/// A session the sweeper must look at when `at` comes. Ordered by time only.
pub(crate) struct Alarm {
    at: Instant,
    session: Arc<Session>,
}

impl PartialEq for Alarm {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Alarm {}

impl PartialOrd for Alarm {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Alarm {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Hub {
    /// When `st` next needs the sweeper: its idle deadline, a detached participant's end of grace,
    /// or, once closed, the end of its retention. None: nothing will come due by itself.
    fn due(&self, st: &SessionState, now: Instant) -> Option<Instant> {
        if let Some(closed) = st.closed_at_ms() {
            let left = (closed + self.config.closed_retention * 1000).saturating_sub(now_ms());
            // The sweep forgets a session strictly after its retention: one ms past it.
            return now.checked_add(Duration::from_millis(left + 1));
        }
        let grace = Duration::from_secs(self.config.detach_grace);
        let idle = self
            .config
            .idle()
            .and_then(|d| st.last_activity.checked_add(d));
        st.participants()
            .filter(|p| p.present && p.attached.is_none())
            .filter_map(|p| p.detached_since.and_then(|d| d.checked_add(grace)))
            .chain(idle)
            .min()
    }

    /// Makes sure the sweeper looks at `session` when something of it comes due. Called after
    /// every change (a session changes under its lock only). Takes the alarms' lock only when the
    /// new due time is earlier than the armed one, so a post that only moves the idle deadline
    /// later costs a few comparisons.
    pub(super) fn arm(&self, session: &Arc<Session>, st: &mut SessionState) {
        let Some(at) = self.due(st, Instant::now()) else {
            return;
        };
        if st.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        st.armed = Some(at);
        self.alarms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::cmp::Reverse(Alarm {
                at,
                session: session.clone(),
            }));
    }

    /// Idle control, detach grace and forgetting old closed sessions. Called periodically; looks
    /// only at the sessions whose alarm has come (a quiet session once per idle period).
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let due: Vec<Alarm> = {
            let mut alarms = self.alarms.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            while alarms.peek().is_some_and(|a| a.0.at <= now) {
                if let Some(std::cmp::Reverse(a)) = alarms.pop() {
                    due.push(a);
                }
            }
            due
        };
        if due.is_empty() {
            return;
        }
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        for alarm in due {
            self.sweep_one(&alarm, now);
        }
    }

    fn sweep_one(&self, alarm: &Alarm, now: Instant) {
        let session = &alarm.session;
        let ts = now_ms();
        let grace = Duration::from_secs(self.config.detach_grace);
        let mut st = session.lock();
        if st.armed != Some(alarm.at) {
            // Superseded by an earlier alarm, which has looked at the session already.
            return;
        }
        st.armed = None;
        if let Some(closed) = st.closed_at_ms() {
            if ts.saturating_sub(closed) > self.config.closed_retention * 1000 {
                drop(st);
                // Only this session: a new one may have been opened under the same id since.
                if self
                    .sessions
                    .remove_if(&session.id, |_, s| Arc::ptr_eq(s, session))
                    .is_some()
                {
                    tracing::debug!(session_id = %session.id, "closed session forgotten");
                }
            } else {
                self.arm(session, &mut st);
            }
            return;
        }
        let expired: Vec<String> = st
            .participants()
            .filter(|p| {
                p.present
                    && p.attached.is_none()
                    && p.detached_since
                        .is_some_and(|d| now.duration_since(d) >= grace)
            })
            .map(|p| p.info.id.clone())
            .collect();
        let mut events = Vec::new();
        for pid in expired {
            match st.leave(&pid, AfterAction::KeepAlive, Reason::Disconnected, ts, now) {
                Ok(e) => {
                    tracing::info!(session_id = %session.id, participant_id = %pid, "detached participant left after the grace period");
                    events.extend(e);
                }
                Err(_) => break,
            }
        }
        if let Some(idle) = self.config.idle() {
            if now.duration_since(st.last_activity) >= idle {
                if let Some(e) = st.close(Reason::Idle, ts, now) {
                    tracing::info!(session_id = %session.id, "session closed by idle control");
                    events.push(e);
                }
            }
        }
        if events.is_empty() {
            self.arm(session, &mut st);
            return;
        }
        let records = Self::event_records(&session.id, events);
        // Persisting arms the session again.
        if let Err(e) = self.persist(session, &mut st, records) {
            tracing::error!(session_id = %session.id, error = %e, "cannot journal");
            self.arm(session, &mut st);
        }
    }

    /// Says goodbye to every TCP client and waits until the journal has everything queued.
    pub fn shutdown(&self) {
        for c in self.connections.iter() {
            let _ =
                c.tx.try_send(ServerFrame::Goodbye(bgs_proto::chat::ChatError::new(
                    ChatErrorCode::ShuttingDown,
                    "the chat server is shutting down",
                )));
        }
        if let Some(j) = &self.journal {
            j.close();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;
    use crate::config::Config;

    fn hub(args: &[&str]) -> Arc<Hub> {
        let args = std::iter::once("bgs-chat-server").chain(args.iter().copied());
        Hub::open(Config::try_parse_from(args).unwrap()).unwrap()
    }

    fn open_sessions(hub: &Hub, n: usize) {
        for i in 0..n {
            hub.create_session(Some(format!("s{i}")), "C".into(), Userdata::default())
                .unwrap();
        }
    }

    fn alarms(hub: &Hub) -> usize {
        hub.alarms.lock().unwrap().len()
    }

    #[tokio::test]
    async fn the_sweeper_looks_only_at_sessions_that_come_due() {
        let hub = hub(&["--idle-timeout", "60"]);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        open_sessions(&hub, 100);
        assert_eq!(alarms(&hub), 100, "one idle alarm per open session");

        // Activity in s0 at 30 s moves its deadline later without a second alarm.
        let s0 = hub.session("s0").unwrap();
        s0.lock().last_activity = at(30);
        hub.sweep_at(at(30));
        assert_eq!(hub.stats().sessions_closed, 0);
        assert_eq!(alarms(&hub), 100);

        hub.sweep_at(at(61));
        let stats = hub.stats();
        assert_eq!((stats.sessions_open, stats.sessions_closed), (1, 99));
        assert!(!s0.lock().is_closed(), "s0 was active 31 s ago");
        // s0 re-armed for its new deadline; the 99 closed ones for the end of their retention.
        assert_eq!(alarms(&hub), 100);

        hub.sweep_at(at(91));
        assert!(s0.lock().is_closed(), "s0 quiet for 60 s");
    }

    #[tokio::test]
    async fn quiet_sessions_without_idle_control_cost_the_sweeper_nothing() {
        let hub = hub(&["--idle-timeout", "0"]);
        open_sessions(&hub, 100);
        assert_eq!(alarms(&hub), 0);
        hub.sweep_at(Instant::now() + Duration::from_secs(3600));
        assert_eq!(hub.stats().sessions_open, 100);
    }
}
