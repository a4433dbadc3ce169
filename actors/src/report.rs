//! The per-bot-session report record and the registry of bot instances a node knows.

use std::collections::VecDeque;

use bgs_proto::esp::BotStatus;
use dashmap::DashMap;
use serde::Serialize;

use crate::esp::BotKey;

/// One record per bot session, written when the bot ends (JSON lines; docs/ESP.md lists fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BotReport {
    pub instance_id: String,
    pub interaction_id: String,
    pub bot_id: String,
    pub bot_name: String,
    pub category: String,
    pub function: String,
    pub nickname: String,
    pub visibility: String,
    pub holdup: bool,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub duration_ms: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub ended_by: String,
    pub end_reason: String,
    pub abnormal: bool,
    pub error: Option<String>,
    /// The hand-off the bot ended with (`null` unless it handed the customer over).
    pub handoff: Option<bgs_proto::esp::Handoff>,
}

/// Where report records go (a JSON-lines file in `bgs serve`; a vector in tests).
pub trait ReportSink: Send + Sync + 'static {
    fn write(&self, report: &BotReport);
    /// Waits until every record written so far is stored (at shutdown).
    fn flush(&self) {}
}

/// Finished instances kept per interaction for GetBotStatus.
pub const FINISHED_PER_INTERACTION: usize = 32;

/// The bot instances of this node: running ones by key, recently finished ones by interaction.
/// Shared (not behind a mailbox) so status pages read it without disturbing the Supervisor.
#[derive(Default)]
pub struct Registry {
    pub running: DashMap<BotKey, BotStatus>,
    pub finished: DashMap<String, VecDeque<BotStatus>>,
}

impl Registry {
    /// Every instance of an interaction, running first, optionally filtered by id and name.
    pub fn status(
        &self,
        interaction_id: &str,
        bot_id: Option<&str>,
        bot_name: Option<&str>,
    ) -> Vec<BotStatus> {
        let matches = |s: &BotStatus| {
            bot_id.is_none_or(|id| s.bot_id == id) && bot_name.is_none_or(|n| s.bot_name == n)
        };
        let mut out: Vec<BotStatus> = self
            .running
            .iter()
            .filter(|e| e.key().interaction_id == interaction_id && matches(e.value()))
            .map(|e| e.value().clone())
            .collect();
        out.sort_by_key(|s| s.started_ms);
        if let Some(done) = self.finished.get(interaction_id) {
            out.extend(done.iter().rev().filter(|s| matches(s)).cloned());
        }
        out
    }

    pub fn finish(&self, key: &BotKey, report: &BotReport) {
        if let Some((_, mut status)) = self.running.remove(key) {
            status.state = "finished".into();
            status.reason = Some(report.end_reason.clone());
            status.ended_ms = Some(report.ended_ms);
            status.handoff = report.handoff.clone();
            let mut list = self.finished.entry(key.interaction_id.clone()).or_default();
            list.push_back(status);
            while list.len() > FINISHED_PER_INTERACTION {
                list.pop_front();
            }
        }
    }

    /// Forgets finished instances that ended before `before_ms`.
    pub fn expire(&self, before_ms: u64) {
        self.finished.retain(|_, list| {
            list.retain(|s| s.ended_ms.unwrap_or(u64::MAX) >= before_ms);
            !list.is_empty()
        });
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }
}
