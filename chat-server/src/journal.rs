//! Durability: an append-only journal with group commit.
//!
//! Every accepted event is appended here before anyone sees it or is told it was accepted. One
//! writer thread takes every record queued since its last write, writes them in one `write`,
//! calls `fdatasync` once, and only then publishes the events to readers and acknowledges the
//! requests (group commit: under load many events share one sync). A process killed with -9 loses
//! only events nobody was told about; their clients retry with the same client key.
//!
//! File format (`journal.bin` in the data dir): the magic `BGSJ2\n`, then records, each a `u32`
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
use crate::session::{Session, StoredEvent};

const MAGIC: &[u8] = b"BGSJ2\n";
/// The format before events carried rich content: refused with a clear message.
const OLD_MAGIC: &[u8] = b"BGSJ1\n";
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
    /// Replace the whole file with these records (compaction while running); entries queued
    /// before this one are written to the old file first, later ones to the new file.
    rewrite: Option<Vec<JournalRecord>>,
    publish: Option<(Arc<Session>, u64)>,
    done: Option<oneshot::Sender<()>>,
}

/// The append side of the journal. Dropping it lets the writer finish what is queued and stop.
pub struct Journal {
    /// Held for the life of the journal: one server per data dir.
    _lock: File,
    /// Bytes in the journal file now, and right after the last rewrite (kept by the writer).
    size: Arc<Sizes>,
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
    if bytes.starts_with(OLD_MAGIC) {
        return Err(ChatServerError::Journal(format!(
            "{} was written by an older bgs-chat-server (journal format 1); this one writes format 2 \
             (events with rich content): move the file away to start with an empty journal",
            path.display()
        )));
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

impl Journal {
    /// Replaces the journal in `dir` with `records` (atomically: write, fsync, rename, fsync the
    /// directory) and starts the writer that appends to it.
    pub fn create(dir: &Path, records: &[JournalRecord]) -> Result<Journal> {
        fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let content = encode_all(records)?;
        let path = dir.join(FILE);
        let file = replace_file(&path, &content)?;
        let initial = (MAGIC.len() + content.len()) as u64;
        let size = Arc::new(Sizes {
            now: initial.into(),
            compacted: initial.into(),
            rewrite_pending: false.into(),
        });
        let (tx, rx) = std_mpsc::channel();
        let writer_size = size.clone();
        let writer = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || write_loop(file, path, rx, writer_size))?;
        Ok(Journal {
            _lock: lock,
            size,
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
                rewrite: None,
                publish,
                done: Some(done),
            })
            .map_err(|_| ChatServerError::Journal("journal writer has stopped".into()))?;
        Ok(rx)
    }

    /// Whether the journal has grown past `threshold` and twice its last compacted size, with no
    /// rewrite already on its way.
    pub fn wants_compaction(&self, threshold: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.size.now.load(Relaxed);
        !self.size.rewrite_pending.load(Relaxed)
            && now >= threshold
            && now >= self.size.compacted.load(Relaxed).saturating_mul(2)
    }

    /// Bytes in the journal file now.
    pub fn size(&self) -> u64 {
        self.size.now.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the file with `records` once everything queued before is written (the caller
    /// makes sure `records` cover all of it). The writer encodes and swaps in its own thread.
    pub fn rewrite(&self, records: Vec<JournalRecord>) -> Result<()> {
        self.size
            .rewrite_pending
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Entry {
                bytes: Vec::new(),
                stop: false,
                rewrite: Some(records),
                publish: None,
                done: None,
            })
            .map_err(|_| ChatServerError::Journal("journal writer has stopped".into()))
    }

    /// Stops taking records and waits until everything queued before is durable.
    pub fn close(&self) {
        let _ = self.tx.send(Entry {
            bytes: Vec::new(),
            stop: true,
            rewrite: None,
            publish: None,
            done: None,
        });
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

fn encode_all(records: &[JournalRecord]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    for r in records {
        buf.extend_from_slice(&frame(r)?);
    }
    Ok(buf)
}

/// Writes `MAGIC + content` to a temporary file next to `path` and fsyncs it.
fn write_tmp(path: &Path, content: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(MAGIC)?;
    f.write_all(content)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Renames `tmp` over `path`, fsyncs the directory, and opens the new file for appending.
fn swap_in(tmp: &Path, path: &Path) -> std::io::Result<File> {
    fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

/// Replaces `path` with `MAGIC + content` (write, fsync, rename, fsync the directory).
fn replace_file(path: &Path, content: &[u8]) -> std::io::Result<File> {
    let tmp = write_tmp(path, content)?;
    swap_in(&tmp, path)
}

/// The journal's sizes, shared between the writer and the hub.
struct Sizes {
    now: std::sync::atomic::AtomicU64,
    compacted: std::sync::atomic::AtomicU64,
    rewrite_pending: std::sync::atomic::AtomicBool,
}

fn write_loop(mut file: File, path: PathBuf, rx: std_mpsc::Receiver<Entry>, size: Arc<Sizes>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // A rewrite ends a batch: what came before goes to the old file.
        while batch.len() < MAX_BATCH && batch.last().is_some_and(|e| e.rewrite.is_none()) {
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
        size.now
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let stop = batch.iter().any(|e| e.stop);
        let rewrite = batch.iter_mut().find_map(|e| e.rewrite.take());
        for e in batch {
            if let Some((session, seq)) = e.publish {
                session.publish(seq);
            }
            if let Some(done) = e.done {
                let _ = done.send(());
            }
        }
        if let Some(records) = rewrite {
            compact(&mut file, &path, &records, &size);
        }
        if stop {
            return;
        }
    }
}

/// Swaps in a file holding just `records` (the writer's part of a compaction).
fn compact(file: &mut File, path: &Path, records: &[JournalRecord], size: &Sizes) {
    use std::sync::atomic::Ordering::Relaxed;
    size.rewrite_pending.store(false, Relaxed);
    let content = match encode_all(records) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "journal compaction failed");
            return;
        }
    };
    let tmp = match write_tmp(path, &content) {
        Ok(tmp) => tmp,
        Err(e) => {
            // The old file is intact and still open for appending: carry on with it.
            tracing::error!(path = %path.display(), error = %e, "journal compaction failed");
            return;
        }
    };
    match swap_in(&tmp, path) {
        Ok(f) => {
            *file = f;
            let new = (MAGIC.len() + content.len()) as u64;
            size.now.store(new, Relaxed);
            size.compacted.store(new, Relaxed);
            tracing::info!(path = %path.display(), bytes = new, "journal compacted");
        }
        Err(e) => {
            // Renamed but not reopened: appending to the old inode would lose events.
            // Crash-only: the restart reads the new file.
            tracing::error!(path = %path.display(), error = %e, "journal swap failed; exiting");
            std::process::exit(74);
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
