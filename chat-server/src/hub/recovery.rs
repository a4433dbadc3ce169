//! Start-up: a hub with memory only, or rebuilt from the journal in `--data-dir`.

use super::*;

impl Hub {
    /// A hub with memory only, or rebuilt from the journal in `--data-dir`.
    pub fn open(config: Config) -> Result<Arc<Hub>> {
        config.validate()?;
        let credentials = match &config.credentials {
            Some(path) => Some(Credentials::load(path)?),
            None => {
                tracing::warn!("no --credentials: any client that reaches the TCP port may connect as a gateway or agent tool (docs/CHAT.md 6.2)");
                None
            }
        };
        let limits = SessionLimits {
            max_participants: config.max_participants,
            max_events: config.max_events,
        };
        let mut hub = Hub {
            server_id: new_id(),
            limits,
            sessions: DashMap::new(),
            epochs: Mutex::new(HashMap::new()),
            credentials,
            refusals: Refusals::default(),
            connections: DashMap::new(),
            next_conn: AtomicU64::new(1),
            journal: None,
            gate: std::sync::RwLock::new(()),
            alarms: Mutex::new(std::collections::BinaryHeap::new()),
            config,
        };
        if let Some(dir) = hub.config.data_dir.clone() {
            // An error names the option and the path (`--data-dir FILE: Not a directory`).
            let named = |e: ChatServerError| match e {
                ChatServerError::Io(e) => {
                    ChatServerError::Config(format!("--data-dir {}: {e}", dir.display()))
                }
                ChatServerError::Journal(e) => {
                    ChatServerError::Journal(format!("--data-dir {}: {e}", dir.display()))
                }
                other => other,
            };
            let kept = hub.replay(&dir).map_err(named)?;
            hub.journal = Some(Journal::create(&dir, &kept).map_err(named)?);
        }
        Ok(Arc::new(hub))
    }

    /// Rebuilds sessions and epochs from the journal; returns the records worth keeping.
    pub(super) fn replay(&mut self, dir: &Path) -> Result<Vec<JournalRecord>> {
        let records = journal::read(dir)?;
        let count = records.len();
        let now = Instant::now();
        let mut order: Vec<String> = Vec::new();
        let mut states: HashMap<String, SessionState> = HashMap::new();
        let mut epochs = HashMap::new();
        for record in records {
            match record {
                JournalRecord::SessionCreated {
                    session_id,
                    created_ms,
                    userdata,
                } => {
                    order.push(session_id.clone());
                    let st = SessionState::new(session_id.clone(), created_ms, userdata, now);
                    states.insert(session_id, st);
                }
                JournalRecord::Event { session_id, stored } => {
                    if let Some(st) = states.get_mut(&session_id) {
                        if stored.event.seq == st.last_seq() + 1 {
                            st.apply(stored, now);
                        } else {
                            tracing::warn!(
                                session_id,
                                seq = stored.event.seq,
                                "journal event out of order; skipped"
                            );
                        }
                    }
                }
                JournalRecord::Epoch { cluster_id, epoch } => {
                    let e = epochs.entry(cluster_id).or_insert(0);
                    *e = (*e).max(epoch);
                }
            }
        }
        let retention_ms = self.config.closed_retention * 1000;
        let wall = now_ms();
        let mut kept = Vec::new();
        for (cluster_id, epoch) in &epochs {
            kept.push(JournalRecord::Epoch {
                cluster_id: cluster_id.clone(),
                epoch: *epoch,
            });
        }
        for id in order {
            let Some(mut st) = states.remove(&id) else {
                continue;
            };
            if st
                .closed_at_ms()
                .is_some_and(|t| wall.saturating_sub(t) > retention_ms)
            {
                continue;
            }
            kept.extend(session_records(&st));
            st.visible_seq = st.last_seq();
            let session = Session::new(st);
            self.arm(&session, &mut session.lock());
            self.sessions.insert(id, session);
        }
        *self.epochs.lock().unwrap_or_else(|p| p.into_inner()) = epochs;
        tracing::info!(
            records = count,
            sessions = self.sessions.len(),
            dir = %dir.display(),
            "journal replayed"
        );
        Ok(kept)
    }
}
