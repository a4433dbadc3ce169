//! Durability: every change journaled (group-committed by the journal writer) before it is
//! visible, and the journal compacted while the hub runs.

use super::*;

impl Hub {
    /// Journals what a change produced (or, without a data dir, publishes it at once).
    /// Called with the session locked, so the journal sees each session's events in order.
    pub(super) fn persist(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        records: Vec<JournalRecord>,
    ) -> Result<Wait> {
        let last = st.last_seq();
        self.arm(session, st);
        match &self.journal {
            None => {
                st.visible_seq = last;
                session.signal(last);
                Ok(Wait::Nothing)
            }
            Some(j) => Ok(Wait::Journal(
                j.append(&records, Some((session.clone(), last)))?,
            )),
        }
    }

    pub(super) fn event_records(
        session_id: &str,
        events: Vec<crate::session::StoredEvent>,
    ) -> Vec<JournalRecord> {
        events
            .into_iter()
            .map(|stored| JournalRecord::Event {
                session_id: session_id.to_string(),
                stored,
            })
            .collect()
    }

    /// Rewrites the journal with only what is kept (open sessions, recently closed ones,
    /// epochs) once it has grown past `--journal-compact-bytes` and twice its last compacted
    /// size. Changes wait meanwhile (the gate); the writer swaps the file in its own thread.
    pub fn maybe_compact(&self) {
        let Some(j) = &self.journal else { return };
        if !j.wants_compaction(self.config.journal_compact_bytes) {
            return;
        }
        let size = j.size();
        let records = {
            let _all = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut records: Vec<JournalRecord> = self
                .epochs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(cluster_id, epoch)| JournalRecord::Epoch {
                    cluster_id: cluster_id.clone(),
                    epoch: *epoch,
                })
                .collect();
            let sessions: Vec<Arc<Session>> =
                self.sessions.iter().map(|e| e.value().clone()).collect();
            for session in sessions {
                records.extend(session_records(&session.lock()));
            }
            // Queued under the gate: exactly the state after every change journaled before.
            let n = records.len();
            if let Err(e) = j.rewrite(records) {
                tracing::error!(error = %e, "cannot compact the journal");
                return;
            }
            n
        };
        tracing::info!(from_bytes = size, records, "journal compaction queued");
    }
}

/// A session as journal records: its creation and every event with owners and client keys.
pub(super) fn session_records(st: &SessionState) -> Vec<JournalRecord> {
    let mut out = vec![JournalRecord::SessionCreated {
        session_id: st.id.clone(),
        created_ms: st.created_ms,
        // The userdata a session started with: the replayed events change it again.
        userdata: st.initial_userdata.clone(),
    }];
    out.extend(
        st.stored_events()
            .into_iter()
            .map(|stored| JournalRecord::Event {
                session_id: st.id.clone(),
                stored,
            }),
    );
    out
}
