//! The durable stores behind `[store] kind` (docs/HA.md 10): `local`, an embedded, crash-safe
//! database on the node's disk (redb: copy-on-write B-trees, each commit durable when it
//! returns). One table holds each running bot's replicated record, encoded by the proto codec
//! (the HA link's own format), by instance id; another the node's epoch. Every call runs on
//! tokio's blocking pool: the HaCoordinator's thread never waits on the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bgs_actors::store::{DurableStore, StoreBatch, StoreError, Stored};
use bgs_proto::ha::ReplicatedBot;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};

const BOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("bots");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EPOCH: &str = "epoch";

/// `[store] kind = "local"`.
pub struct LocalStore {
    db: Arc<Database>,
    path: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{}: {e}", path.display()))
}

impl LocalStore {
    /// Opens (or creates) the database at `path`; its directory must exist.
    pub fn open(path: &Path) -> Result<LocalStore, StoreError> {
        let db = Database::create(path).map_err(|e| err(path, e))?;
        // The tables exist from the start: a fresh store loads as empty.
        let txn = db.begin_write().map_err(|e| err(path, e))?;
        txn.open_table(BOTS).map_err(|e| err(path, e))?;
        txn.open_table(META).map_err(|e| err(path, e))?;
        txn.commit().map_err(|e| err(path, e))?;
        Ok(LocalStore {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    fn load_now(db: &Database, path: &Path) -> Result<Stored, StoreError> {
        let txn = db.begin_read().map_err(|e| err(path, e))?;
        let meta = txn.open_table(META).map_err(|e| err(path, e))?;
        let epoch = meta
            .get(EPOCH)
            .map_err(|e| err(path, e))?
            .map_or(0, |v| v.value());
        let table = txn.open_table(BOTS).map_err(|e| err(path, e))?;
        let mut bots = Vec::new();
        for row in table.iter().map_err(|e| err(path, e))? {
            let (id, bytes) = row.map_err(|e| err(path, e))?;
            match bgs_proto::codec::decode::<ReplicatedBot>(bytes.value()) {
                Ok(bot) => bots.push(bot),
                // One record a newer release wrote, or a damaged one: that bot is skipped.
                Err(e) => {
                    tracing::error!(bot = id.value(), error = %e, "cannot read a bot from the durable store; skipped")
                }
            }
        }
        Ok(Stored { epoch, bots })
    }

    fn write_now(db: &Database, path: &Path, batch: StoreBatch) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(|e| err(path, e))?;
        {
            let mut table = txn.open_table(BOTS).map_err(|e| err(path, e))?;
            if batch.replace {
                table.retain(|_, _| false).map_err(|e| err(path, e))?;
            }
            for bot in &batch.put {
                let bytes = bgs_proto::codec::encode(&**bot).map_err(|e| err(path, e))?;
                table
                    .insert(bot.instance_id.as_str(), bytes.as_slice())
                    .map_err(|e| err(path, e))?;
            }
            for id in &batch.remove {
                table.remove(id.as_str()).map_err(|e| err(path, e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| err(path, e))?;
            let before = meta
                .get(EPOCH)
                .map_err(|e| err(path, e))?
                .map_or(0, |v| v.value());
            // The epoch only grows: a store never goes back to an epoch it has seen.
            meta.insert(EPOCH, before.max(batch.epoch))
                .map_err(|e| err(path, e))?;
        }
        txn.commit().map_err(|e| err(path, e))
    }
}

impl DurableStore for LocalStore {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn load(&self) -> BoxFuture<'static, Result<Stored, StoreError>> {
        let (db, path) = (self.db.clone(), self.path.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::load_now(&db, &path))
                .await
                .map_err(|e| StoreError(e.to_string()))?
        })
    }

    fn write(&self, batch: StoreBatch) -> BoxFuture<'static, Result<(), StoreError>> {
        let (db, path) = (self.db.clone(), self.path.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::write_now(&db, &path, batch))
                .await
                .map_err(|e| StoreError(e.to_string()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgs_proto::bot::{BotKey, BotSpec};

    fn bot(id: &str, checkpoint: u64, context: &str) -> Arc<ReplicatedBot> {
        Arc::new(ReplicatedBot {
            instance_id: id.into(),
            spec: Arc::new(BotSpec::new(
                BotKey {
                    interaction_id: format!("chat-{id}"),
                    bot_id: "echo".into(),
                    bot_name: String::new(),
                },
                "Bot",
            )),
            participant_id: "p".into(),
            joined_seq: 1,
            started_ms: 5,
            context: Some(bytes::Bytes::from(context.to_string())),
            checkpoint_seq: checkpoint,
        })
    }

    #[tokio::test]
    async fn what_is_written_is_there_after_a_reopen_and_a_replace_drops_the_rest() {
        let dir = std::env::temp_dir().join(format!("bgs-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bots.redb");
        let store = LocalStore::open(&path).unwrap();
        let fresh = store.load().await.unwrap();
        assert_eq!((fresh.epoch, fresh.bots.len()), (0, 0));
        store
            .write(StoreBatch {
                epoch: 2,
                put: vec![bot("a", 3, "1"), bot("b", 4, "2")],
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .write(StoreBatch {
                epoch: 1, // an older epoch never lowers the stored one
                put: vec![bot("a", 9, "3")],
                remove: vec!["b".into()],
                replace: false,
            })
            .await
            .unwrap();
        drop(store);
        // As a restarted node finds it.
        let store = LocalStore::open(&path).unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.epoch, 2);
        let bots: Vec<(String, u64, Option<bytes::Bytes>)> = loaded
            .bots
            .into_iter()
            .map(|b| (b.instance_id, b.checkpoint_seq, b.context))
            .collect();
        assert_eq!(bots, [("a".to_string(), 9, Some(bytes::Bytes::from("3")))]);
        // A promotion writes its whole state over what was there.
        store
            .write(StoreBatch {
                epoch: 3,
                put: vec![bot("c", 1, "")],
                replace: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.epoch, 3);
        assert_eq!(loaded.bots.len(), 1);
        assert_eq!(loaded.bots[0].instance_id, "c");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
