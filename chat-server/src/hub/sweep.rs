//! The sweeper (idle control, detach grace, forgetting old closed sessions) and shutdown.

use super::*;

impl Hub {
    /// Idle control, detach grace and forgetting old closed sessions. Called periodically.
    pub fn sweep(&self) {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let ts = now_ms();
        let grace = Duration::from_secs(self.config.detach_grace);
        let idle = self.config.idle();
        let retention_ms = self.config.closed_retention * 1000;
        let sessions: Vec<Arc<Session>> = self.sessions.iter().map(|e| e.value().clone()).collect();
        let mut forget = Vec::new();
        for session in sessions {
            let mut st = session.lock();
            if let Some(closed) = st.closed_at_ms() {
                if ts.saturating_sub(closed) > retention_ms {
                    forget.push(session.id.clone());
                }
                continue;
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
            if let Some(idle) = idle {
                if now.duration_since(st.last_activity) >= idle {
                    if let Some(e) = st.close(Reason::Idle, ts, now) {
                        tracing::info!(session_id = %session.id, "session closed by idle control");
                        events.push(e);
                    }
                }
            }
            if !events.is_empty() {
                let records = Self::event_records(&session.id, events);
                if let Err(e) = self.persist(&session, &mut st, records) {
                    tracing::error!(session_id = %session.id, error = %e, "cannot journal");
                }
            }
        }
        for id in forget {
            self.sessions.remove(&id);
            tracing::debug!(session_id = %id, "closed session forgotten");
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
