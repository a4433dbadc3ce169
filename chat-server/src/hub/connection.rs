//! TCP connections: their attachments (which participants they speak for, with their feed
//! tasks), and detaching when a connection ends.

use super::*;

#[derive(Default)]
pub(super) struct Attachments {
    pub(super) closed: bool,
    pub(super) next_gen: u64,
    /// (session, participant) -> (feed generation, the feed task).
    pub(super) map: HashMap<(String, String), (u64, Option<AbortHandle>)>,
}

/// A TCP connection as the hub knows it.
pub struct Connection {
    pub id: u64,
    pub owner: Owner,
    pub epoch: u64,
    pub name: String,
    pub(super) fenced: AtomicBool,
    /// Frames to the client (bounded: a full queue makes feeds wait, never grow).
    pub tx: mpsc::Sender<ServerFrame>,
    /// Cancelled when the connection closes or is fenced: ends its feeds.
    pub cancel: CancellationToken,
    pub(super) attachments: Mutex<Attachments>,
}

pub(super) type Key = (String, String);

impl Connection {
    pub(super) fn attachments(&self) -> MutexGuard<'_, Attachments> {
        self.attachments.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Refuses requests of a fenced connection.
    pub fn check_live(&self) -> Result<()> {
        if self.is_fenced() {
            let cluster = match &self.owner {
                Owner::Gateway(c) => c.as_str(),
                _ => "",
            };
            return refuse(
                ChatErrorCode::Fenced,
                format!(
                    "this connection (cluster {cluster}, epoch {}) is fenced: a higher epoch of its cluster is connected",
                    self.epoch
                ),
            );
        }
        Ok(())
    }

    /// Records that this connection speaks for a participant. False once the connection is gone.
    pub(super) fn attach(&self, key: Key) -> bool {
        let mut a = self.attachments();
        if a.closed {
            return false;
        }
        a.map.entry(key).or_insert((0, None));
        true
    }

    /// Starts a new feed generation for a participant (ending the previous feed, if any).
    pub fn begin_feed(&self, key: &Key) -> Option<u64> {
        let mut a = self.attachments();
        if a.closed {
            return None;
        }
        a.next_gen += 1;
        let gen = a.next_gen;
        if let Some((_, Some(old))) = a.map.insert(key.clone(), (gen, None)) {
            old.abort();
        }
        Some(gen)
    }

    pub fn set_feed_task(&self, key: &Key, gen: u64, handle: AbortHandle) {
        let mut a = self.attachments();
        match a.map.get_mut(key) {
            Some(entry) if entry.0 == gen => entry.1 = Some(handle),
            _ => {}
        }
    }

    /// A feed ended (its participant left, or its reader is gone). The participant stays
    /// attached to this connection: when the connection closes, it is detached like the others
    /// (and leaves after the grace period). Forgetting it here left a participant attached to a
    /// dead connection for ever when its feed ended just before the connection did.
    pub fn feed_finished(&self, key: &Key, gen: u64) {
        let mut a = self.attachments();
        if let Some(entry) = a.map.get_mut(key).filter(|e| e.0 == gen) {
            entry.1 = None;
        }
    }

    /// Another connection took the participant over.
    pub(super) fn release(&self, key: &Key) {
        if let Some((_, Some(task))) = self.attachments().map.remove(key) {
            task.abort();
        }
    }

    /// Ends every feed and returns what this connection was attached to.
    pub(super) fn close_attachments(&self) -> Vec<Key> {
        let mut a = self.attachments();
        a.closed = true;
        a.map
            .drain()
            .map(|(k, (_, task))| {
                if let Some(t) = task {
                    t.abort();
                }
                k
            })
            .collect()
    }
}

impl Hub {
    /// Participants of a connection that is gone (or fenced) stay, detached, for the grace period.
    pub(super) fn detach(&self, conn: &Connection) {
        conn.cancel.cancel();
        let now = Instant::now();
        for (sid, pid) in conn.close_attachments() {
            let Ok(session) = self.session(&sid) else {
                continue;
            };
            let mut st = session.lock();
            if let Some(p) = st.participant_mut(&pid) {
                if p.attached == Some(conn.id) {
                    p.attached = None;
                    p.detached_since = Some(now);
                    tracing::info!(session_id = %sid, participant_id = %pid, "participant detached");
                }
            }
            self.arm(&session, &mut st);
        }
    }

    pub fn connection_closed(&self, conn: &Connection) {
        self.detach(conn);
        self.connections.remove(&conn.id);
        tracing::info!(connection = conn.id, "connection closed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A participant whose feed ended just before its connection closed is still detached when
    /// the connection closes (so it leaves after the grace period, instead of staying attached
    /// to a dead connection).
    #[test]
    fn a_finished_feed_keeps_its_participant_attached_until_the_connection_closes() {
        let (tx, _rx) = mpsc::channel(1);
        let conn = Connection {
            id: 1,
            owner: Owner::Agent,
            epoch: 0,
            name: "t".into(),
            fenced: AtomicBool::new(false),
            tx,
            cancel: CancellationToken::new(),
            attachments: Mutex::new(Attachments::default()),
        };
        let key: Key = ("s".into(), "p".into());
        assert!(conn.attach(key.clone()));
        let gen = conn.begin_feed(&key).unwrap();
        conn.feed_finished(&key, gen);
        assert_eq!(conn.close_attachments(), vec![key.clone()]);
        assert!(!conn.attach(key), "a closed connection takes no attachment");
    }
}
