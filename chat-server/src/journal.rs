//! Durability: an append-only journal with group commit.
//!
//! Every accepted event is appended here before anyone sees it or is told it was accepted. One
//! writer thread takes every record queued since its last write, writes them in one `write`,
//! calls `fdatasync` once, and only then publishes the events to readers and acknowledges the
//! requests (group commit: under load many events share one sync). A process killed with -9 loses
//! only events nobody was told about; their clients retry with the same client key.
//!
//! File format (`journal.bin` in the data dir): the magic `BGSJ1\n`, then records, each a `u32`
//! big-endian payload length, a `u32` big-endian CRC-32 of the payload, and the payload (a
//! [`JournalRecord`] through the one codec of bgs-proto). A torn or corrupt tail (a crash in the
//! middle of a write) is cut off at start-up. At start-up the journal is also compacted: it is
//! rewritten with only what the server still keeps (open sessions, recently closed ones, epochs).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use bgs_proto::chat::Userdata;
use bgs_proto::codec;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{ChatServerError, Result};
use crate::hub::Session;
use crate::session::StoredEvent;

const MAGIC: &[u8] = b"BGSJ1\n";
const FILE: &str = "journal.bin";
/// The most records one group commit takes.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JournalRecord {
    SessionCreated {
        session_id: String,
        created_ms: u64,
        userdata: Userdata,
    },
    Event {
        session_id: String,
        stored: StoredEvent,
    },
    Epoch {
        cluster_id: String,
        epoch: u64,
    },
}

struct Entry {
    bytes: Vec<u8>,
    stop: bool,
    publish: Option<(Arc<Session>, u64)>,
    done: Option<oneshot::Sender<()>>,
}

/// The append side of the journal. Dropping it lets the writer finish what is queued and stop.
pub struct Journal {
    /// Held for the life of the journal: one server per data dir.
    _lock: File,
    tx: std_mpsc::Sender<Entry>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

fn frame(record: &JournalRecord) -> Result<Vec<u8>> {
    let payload = codec::encode(record).map_err(|e| ChatServerError::Journal(e.to_string()))?;
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads every intact record of the journal in `dir`; a torn or corrupt tail is reported and left
/// out (the rewrite that follows drops it from the file).
pub fn read(dir: &Path) -> Result<Vec<JournalRecord>> {
    let path = dir.join(FILE);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    }
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if !bytes.starts_with(MAGIC) {
        return Err(ChatServerError::Journal(format!(
            "{} is not a bgs-chat-server journal (bad magic)",
            path.display()
        )));
    }
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let parsed = (rest.len() >= 8)
            .then(|| {
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let crc = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
                let payload = rest.get(8..8 + len)?;
                (crc32fast::hash(payload) == crc).then_some(())?;
                codec::decode::<JournalRecord>(payload)
                    .ok()
                    .map(|r| (r, 8 + len))
            })
            .flatten();
        match parsed {
            Some((record, used)) => {
                records.push(record);
                at += used;
            }
            None => {
                // A torn tail (a crash mid-write) is expected; a bad record with intact data
                // after it is not, and dropping what follows would lose acknowledged events.
                let declared = (rest.len() >= 4)
                    .then(|| u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize);
                if declared.is_some_and(|len| 8 + len < rest.len()) {
                    return Err(ChatServerError::Journal(format!(
                        "{} has a corrupt record at byte {at} followed by more data; refusing to start \
                         (move the file aside to start empty, or restore a backup)",
                        path.display()
                    )));
                }
                tracing::warn!(
                    offset = at,
                    dropped_bytes = bytes.len() - at,
                    "journal ends with a torn record (a crash mid-write); it is cut off"
                );
                break;
            }
        }
    }
    Ok(records)
}

/// Takes the data dir's lock file, so two servers never write one journal.
pub fn lock_dir(dir: &Path) -> Result<File> {
    fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    lock.try_lock().map_err(|_| {
        ChatServerError::Journal(format!(
            "{} is in use by another bgs-chat-server",
            dir.display()
        ))
    })?;
    Ok(lock)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Journal {
    /// Replaces the journal in `dir` with `records` (atomically: write, fsync, rename, fsync the
    /// directory) and starts the writer that appends to it.
    pub fn create(dir: &Path, records: &[JournalRecord]) -> Result<Journal> {
        fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            let mut buf = MAGIC.to_vec();
            for r in records {
                buf.extend_from_slice(&frame(r)?);
            }
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        let path = dir.join(FILE);
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        let (tx, rx) = std_mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || write_loop(file, path, rx))?;
        Ok(Journal {
            _lock: lock,
            tx,
            writer: std::sync::Mutex::new(Some(writer)),
        })
    }

    /// Queues records; after they are durable, `publish` makes the session readable up to its
    /// sequence number, and the returned receiver fires.
    pub fn append(
        &self,
        records: &[JournalRecord],
        publish: Option<(Arc<Session>, u64)>,
    ) -> Result<oneshot::Receiver<()>> {
        let mut bytes = Vec::new();
        for r in records {
            bytes.extend_from_slice(&frame(r)?);
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Entry {
                bytes,
                stop: false,
                publish,
                done: Some(done),
            })
            .map_err(|_| ChatServerError::Journal("journal writer has stopped".into()))?;
        Ok(rx)
    }

    /// Stops taking records and waits until everything queued before is durable.
    pub fn close(&self) {
        let _ = self.tx.send(Entry {
            bytes: Vec::new(),
            stop: true,
            publish: None,
            done: None,
        });
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

fn write_loop(mut file: File, path: PathBuf, rx: std_mpsc::Receiver<Entry>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|e| e.bytes.len()).sum());
        for e in &batch {
            buf.extend_from_slice(&e.bytes);
        }
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            // Nothing written after this point could be acknowledged honestly. Crash-only: the
            // restart replays the durable prefix and clients retry with their client keys.
            tracing::error!(path = %path.display(), error = %e, "journal write failed; exiting");
            std::process::exit(74);
        }
        let stop = batch.iter().any(|e| e.stop);
        for e in batch {
            if let Some((session, seq)) = e.publish {
                session.publish(seq);
            }
            if let Some(done) = e.done {
                let _ = done.send(());
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bgs-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn epoch(n: u64) -> JournalRecord {
        JournalRecord::Epoch {
            cluster_id: "c".into(),
            epoch: n,
        }
    }

    #[tokio::test]
    async fn appended_records_survive_and_a_torn_tail_is_cut() {
        let dir = temp_dir("torn");
        let journal = Journal::create(&dir, &[epoch(1)]).unwrap();
        journal
            .append(&[epoch(2), epoch(3)], None)
            .unwrap()
            .await
            .unwrap();
        // One server per data dir.
        assert!(Journal::create(&dir, &[]).is_err());
        journal.close();
        drop(journal);
        assert_eq!(read(&dir).unwrap(), vec![epoch(1), epoch(2), epoch(3)]);
        // A crash in the middle of a record: half of one more record at the end.
        let extra = frame(&epoch(4)).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(FILE))
            .unwrap();
        f.write_all(&extra[..extra.len() / 2]).unwrap();
        drop(f);
        assert_eq!(read(&dir).unwrap(), vec![epoch(1), epoch(2), epoch(3)]);
        // A flipped byte inside the last record: cut as well, earlier ones stay.
        let all = fs::read(dir.join(FILE)).unwrap();
        let mut bad = all[..all.len() - extra.len() / 2].to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        fs::write(dir.join(FILE), &bad).unwrap();
        assert_eq!(read(&dir).unwrap(), vec![epoch(1), epoch(2)]);
        // A flipped byte in the first record, with intact records after it: refuse, lose nothing.
        let mut bad = fs::read(dir.join(FILE)).unwrap();
        bad[MAGIC.len() + 8] ^= 0xff;
        fs::write(dir.join(FILE), &bad).unwrap();
        assert!(read(&dir).is_err());
        fs::write(dir.join(FILE), b"not a journal").unwrap();
        assert!(read(&dir).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
