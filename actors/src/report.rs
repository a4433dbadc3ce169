//! The per-bot-session report record and the registry of bot instances a node knows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use bgs_proto::esp::BotStatus;
use dashmap::DashMap;
use serde::Serialize;

use crate::esp::{BotKey, BotSpec};
use crate::fingerprint;

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
    pub visibility: bgs_proto::chat::Visibility,
    pub holdup: bool,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub duration_ms: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub ended_by: crate::bot::EndedBy,
    pub end_reason: crate::bot::StopReason,
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
pub(crate) const FINISHED_PER_INTERACTION: usize = 32;

/// A running bot as the registry keeps it: the spec it shares with its session and its bot,
/// and what a status answer needs besides.
#[derive(Debug, Clone)]
pub struct RunningBot {
    pub spec: Arc<BotSpec>,
    pub instance_id: String,
    /// Its participant has joined (status `running`; `starting` before).
    pub joined: bool,
    pub started_ms: u64,
}

impl RunningBot {
    pub fn status(&self) -> BotStatus {
        let state = if self.joined { "running" } else { "starting" };
        BotStatus::of(&self.spec, &self.instance_id, state, self.started_ms)
    }

    fn is(&self, key: &BotKey) -> bool {
        self.spec.key == *key
    }
}

/// The bot instances of this node: running ones by interaction (a status answer reads one
/// entry, whatever the number of bots), recently finished ones by interaction. Shared (not behind
/// a mailbox) so status pages read it without disturbing the Supervisor.
#[derive(Default)]
pub struct Registry {
    /// By the interaction id's fingerprint (no copy of the id: each bot's spec has it, and every
    /// lookup compares it, so two interactions that share a fingerprint share a list).
    running: DashMap<u64, Vec<RunningBot>>,
    /// Running bots by plugin, kept as they come and go: `/status` and `/metrics` read this, not
    /// every bot.
    by_plugin: Mutex<BTreeMap<String, u64>>,
    finished: DashMap<String, VecDeque<BotStatus>>,
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
            .get(&fingerprint(interaction_id))
            .map(|list| {
                list.iter()
                    .filter(|b| b.spec.key.interaction_id == interaction_id)
                    .map(RunningBot::status)
                    .filter(matches)
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|s| s.started_ms);
        if let Some(done) = self.finished.get(interaction_id) {
            out.extend(done.iter().rev().filter(|s| matches(s)).cloned());
        }
        out
    }

    pub fn is_running(&self, key: &BotKey) -> bool {
        self.running
            .get(&fingerprint(&key.interaction_id))
            .is_some_and(|list| list.iter().any(|b| b.is(key)))
    }

    /// Records a running bot (a second one of the same key replaces the first).
    pub fn insert(&self, bot: RunningBot) {
        let mut list = self
            .running
            .entry(fingerprint(&bot.spec.key.interaction_id))
            .or_insert_with(|| Vec::with_capacity(1));
        match list.iter_mut().find(|b| b.is(&bot.spec.key)) {
            Some(b) => *b = bot,
            None => {
                self.plugin_count(&bot.spec.key.bot_id, true);
                list.push(bot);
            }
        }
    }

    /// Marks the bot as joined; gives its spec (for the metric labels).
    pub fn joined(&self, key: &BotKey) -> Option<Arc<BotSpec>> {
        let mut list = self.running.get_mut(&fingerprint(&key.interaction_id))?;
        let bot = list.iter_mut().find(|b| b.is(key))?;
        bot.joined = true;
        Some(bot.spec.clone())
    }

    pub fn remove(&self, key: &BotKey) -> Option<RunningBot> {
        let mut gone = None;
        self.running
            .remove_if_mut(&fingerprint(&key.interaction_id), |_, list| {
                if let Some(i) = list.iter().position(|b| b.is(key)) {
                    gone = Some(list.swap_remove(i));
                }
                list.is_empty()
            });
        if let Some(bot) = &gone {
            self.plugin_count(&bot.spec.key.bot_id, false);
        }
        gone
    }

    fn plugin_count(&self, bot_id: &str, up: bool) {
        let mut counts = self.by_plugin.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(bot_id) {
            Some(n) if up => *n += 1,
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                counts.remove(bot_id);
            }
            None if up => {
                counts.insert(bot_id.to_string(), 1);
            }
            None => {}
        }
    }

    /// How many bots run, by plugin (only plugins with at least one).
    pub fn running_by_plugin(&self) -> BTreeMap<String, u64> {
        self.by_plugin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets every running bot (this node is no longer primary).
    pub fn clear_running(&self) {
        self.running.clear();
        self.by_plugin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Calls `f` with each running bot (`/admin/bots`: one pass over all bots).
    pub fn for_each_running(&self, mut f: impl FnMut(&RunningBot)) {
        for list in self.running.iter() {
            list.iter().for_each(&mut f);
        }
    }

    pub fn finish(&self, key: &BotKey, report: &BotReport) {
        if let Some(bot) = self.remove(key) {
            let mut status = bot.status();
            status.state = "finished".into();
            status.reason = Some(report.end_reason.as_str().to_string());
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

    /// Interactions with at least one running bot (two that share a fingerprint count once).
    pub fn interaction_count(&self) -> usize {
        self.running.len()
    }

    pub fn running_count(&self) -> usize {
        let counts = self.by_plugin.lock().unwrap_or_else(|p| p.into_inner());
        counts.values().sum::<u64>() as usize
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bot(interaction: &str, name: &str, started_ms: u64) -> RunningBot {
        RunningBot {
            spec: Arc::new(BotSpec::new(
                BotKey {
                    interaction_id: interaction.into(),
                    bot_id: "echo".into(),
                    bot_name: name.into(),
                },
                "Echo",
            )),
            instance_id: format!("{interaction}-{name}"),
            joined: false,
            started_ms,
        }
    }

    fn report(end_reason: crate::bot::StopReason) -> BotReport {
        BotReport {
            instance_id: String::new(),
            interaction_id: String::new(),
            bot_id: String::new(),
            bot_name: String::new(),
            category: String::new(),
            function: String::new(),
            nickname: String::new(),
            visibility: Default::default(),
            holdup: false,
            started_ms: 0,
            ended_ms: 9,
            duration_ms: 0,
            messages_sent: 0,
            messages_received: 0,
            ended_by: end_reason.ended_by(),
            end_reason,
            abnormal: false,
            error: None,
            handoff: None,
        }
    }

    #[test]
    fn status_counts_and_finishing_follow_each_bot_of_an_interaction() {
        let r = Registry::default();
        r.insert(bot("chat-1", "b", 2));
        r.insert(bot("chat-1", "a", 1));
        r.insert(bot("chat-2", "a", 3));
        // The same key again replaces, it does not count twice.
        r.insert(bot("chat-2", "a", 4));
        assert_eq!((r.running_count(), r.interaction_count()), (3, 2));
        assert_eq!(r.running_by_plugin(), [("echo".to_string(), 3)].into());
        let key = bot("chat-1", "a", 0).spec.key.clone();
        assert!(r.is_running(&key));
        assert_eq!(r.joined(&key).unwrap().key, key);

        let all = r.status("chat-1", None, None);
        let seen: Vec<(&str, &str)> = all
            .iter()
            .map(|s| (s.bot_name.as_str(), s.state.as_str()))
            .collect();
        assert_eq!(seen, [("a", "running"), ("b", "starting")]);
        assert_eq!(r.status("chat-1", None, Some("b")).len(), 1);
        assert_eq!(r.status("chat-3", None, None), Vec::new());

        r.finish(&key, &report(crate::bot::StopReason::StopRequested));
        assert!(!r.is_running(&key));
        assert_eq!(r.running_count(), 2);
        assert_eq!(r.running_by_plugin(), [("echo".to_string(), 2)].into());
        let after = r.status("chat-1", None, None);
        assert_eq!(after[0].bot_name, "b");
        assert_eq!(after[1].state, "finished");
        assert_eq!(after[1].reason.as_deref(), Some("stop_requested"));

        r.finish(
            &bot("chat-1", "b", 0).spec.key,
            &report(crate::bot::StopReason::CustomerLeft),
        );
        assert_eq!((r.running_count(), r.interaction_count()), (1, 1));
        assert_eq!(r.running_by_plugin(), [("echo".to_string(), 1)].into());
        r.clear_running();
        assert_eq!((r.running_count(), r.interaction_count()), (0, 0));
        assert!(r.running_by_plugin().is_empty());
    }
}
