//! Per-bot-session report records as JSON lines in a file, written by a thread of its own so an
//! actor never waits for the disk.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use bgs_actors::report::{BotReport, ReportSink};

/// Records queued for the writer before new ones are dropped (and logged).
const QUEUE: usize = 4096;

pub struct FileReports {
    tx: SyncSender<BotReport>,
}

impl FileReports {
    pub fn open(path: &Path) -> std::io::Result<FileReports> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = sync_channel::<BotReport>(QUEUE);
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new().name("reports".into()).spawn(move || {
            let mut out = BufWriter::new(file);
            while let Ok(report) = rx.recv() {
                let mut batch = vec![report];
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                }
                let mut result = Ok(());
                for r in &batch {
                    result = result.and_then(|()| {
                        serde_json::to_writer(&mut out, r).map_err(std::io::Error::other)?;
                        out.write_all(b"\n")
                    });
                }
                if let Err(e) = result.and_then(|()| out.flush()) {
                    tracing::error!(path = %path.display(), error = %e, "cannot write bot reports");
                }
            }
        })?;
        Ok(FileReports { tx })
    }
}

impl ReportSink for FileReports {
    fn write(&self, report: &BotReport) {
        match self.tx.try_send(report.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) => {
                tracing::error!(bot_instance = %r.instance_id, "report queue full; record dropped")
            }
            Err(TrySendError::Disconnected(_)) => {}
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
