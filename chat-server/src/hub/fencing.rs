//! Fencing: a gateway connection's Hello declares its cluster and epoch; the hub keeps the
//! highest epoch seen per cluster (journaled), refuses a lower one, and fences (detaches) the
//! older connections of the cluster when a higher one registers. A fenced connection is refused
//! in one place afterwards (`Connection::check_live`, through `Hub::session_for`).

use super::connection::Attachments;
use super::*;

impl Hub {
    /// With `--credentials`, transcripts and userdata over HTTP need an agent token: they show
    /// every participant's id, and an HTTP participant's id is all it takes to post as it.
    pub fn authorize_http(&self, bearer: Option<&str>) -> Result<()> {
        match &self.credentials {
            Some(creds) => creds.check_bearer(bearer).inspect_err(|_| {
                self.refusals.unauthorized.fetch_add(1, Ordering::Relaxed);
            }),
            None => Ok(()),
        }
    }

    /// Registers a TCP connection after its Hello; a gateway's epoch may fence older connections
    /// of its cluster, or be fenced itself.
    pub fn hello(
        &self,
        hello: Hello,
        tx: mpsc::Sender<ServerFrame>,
    ) -> Result<Ack<Arc<Connection>>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if hello.version != CHAT_PROTOCOL_VERSION {
            return refuse(
                ChatErrorCode::UnsupportedVersion,
                format!(
                    "chat protocol version {} is not supported (this server speaks {CHAT_PROTOCOL_VERSION})",
                    hello.version
                ),
            );
        }
        check_len("client_name", &hello.client_name, 0, MAX_ID)?;
        let (owner, epoch) = match &hello.role {
            ClientRole::Gateway {
                cluster_id,
                epoch,
                node_id,
            } => {
                check_id("cluster_id", cluster_id)?;
                check_len("node_id", node_id, 0, MAX_ID)?;
                (Owner::Gateway(cluster_id.clone()), *epoch)
            }
            ClientRole::Agent => (Owner::Agent, 0),
        };
        // Nothing a stranger says is acted on: no epoch, fence or connection before this.
        if let Some(creds) = &self.credentials {
            if let Err(e) = creds.check(&hello.role, &hello.credential) {
                self.refusals.unauthorized.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(owner = ?owner, client_name = %hello.client_name, "connection refused: unauthorized");
                return Err(e);
            }
        }
        let conn = Arc::new(Connection {
            id: self.next_conn.fetch_add(1, Ordering::SeqCst),
            owner: owner.clone(),
            epoch,
            name: hello.client_name,
            fenced: AtomicBool::new(false),
            tx,
            cancel: CancellationToken::new(),
            attachments: Mutex::new(Attachments::default()),
        });
        let Owner::Gateway(cluster) = &owner else {
            self.connections.insert(conn.id, conn.clone());
            return Ok(Ack::now(conn));
        };
        let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        let highest = epochs.get(cluster).copied().unwrap_or(0);
        if epoch < highest {
            tracing::warn!(cluster_id = %cluster, epoch, highest, "fenced connection refused");
            return refuse(
                ChatErrorCode::Fenced,
                format!("cluster {cluster} epoch {epoch} is fenced: epoch {highest} has been seen"),
            );
        }
        self.connections.insert(conn.id, conn.clone());
        let mut wait = Wait::Nothing;
        if epoch > highest {
            epochs.insert(cluster.clone(), epoch);
            if let Some(j) = &self.journal {
                let record = JournalRecord::Epoch {
                    cluster_id: cluster.clone(),
                    epoch,
                };
                wait = Wait::Journal(j.append(&[record], None)?);
            }
            let older: Vec<Arc<Connection>> = self
                .connections
                .iter()
                .filter(|c| c.owner == owner && c.epoch < epoch)
                .map(|c| c.value().clone())
                .collect();
            for old in older {
                tracing::warn!(cluster_id = %cluster, old_epoch = old.epoch, epoch, connection = old.id, "connection fenced");
                old.fenced.store(true, Ordering::SeqCst);
                let _ = old.tx.try_send(ServerFrame::Fenced {
                    cluster_id: cluster.clone(),
                    epoch,
                });
                self.detach(&old);
            }
        }
        drop(epochs);
        tracing::info!(connection = conn.id, owner = ?conn.owner, epoch, name = %conn.name, "connection registered");
        Ok(Ack { value: conn, wait })
    }
}
