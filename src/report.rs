//! Per-bot-session report records as JSON lines in a file, written by a thread of its own so an
//! actor never waits for the disk.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use bgs_actors::report::{BotReport, ReportSink};

/// Records queued for the writer before new ones are dropped (and logged).
const QUEUE: usize = 4096;

enum Item {
    Report(Box<BotReport>),
    Flush(std::sync::mpsc::Sender<()>),
}

pub struct FileReports {
    tx: SyncSender<Item>,
}

impl FileReports {
    pub fn open(path: &Path) -> std::io::Result<FileReports> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = sync_channel::<Item>(QUEUE);
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new().name("reports".into()).spawn(move || {
            let mut out = BufWriter::new(file);
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                }
                let mut result = Ok(());
                let mut flushed = Vec::new();
                for item in batch {
                    match item {
                        Item::Report(r) => {
                            result = result.and_then(|()| {
                                serde_json::to_writer(&mut out, &r).map_err(std::io::Error::other)?;
                                out.write_all(b"\n")
                            })
                        }
                        Item::Flush(done) => flushed.push(done),
                    }
                }
                if let Err(e) = result.and_then(|()| out.flush()) {
                    tracing::error!(path = %path.display(), error = %e, "cannot write bot reports");
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
        })?;
        Ok(FileReports { tx })
    }
}

impl ReportSink for FileReports {
    fn write(&self, report: &BotReport) {
        match self.tx.try_send(Item::Report(Box::new(report.clone()))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::error!(bot_instance = %report.instance_id, "report queue full; record dropped")
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Item::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// Reports to the log only (no `reporting.file`).
pub struct LogReports;

impl ReportSink for LogReports {
    fn write(&self, report: &BotReport) {
        if let Ok(line) = serde_json::to_string(report) {
            tracing::info!(target: "bgs::report", report = %line, "bot session report");
        }
    }
}
