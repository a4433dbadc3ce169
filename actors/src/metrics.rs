//! Metrics measured where the work happens, rendered in the Prometheus text format by `src`.
//!
//! One process-wide registry ([`metrics()`]): counters and gauges are atomics or small maps
//! behind a mutex keyed by label values; histograms have fixed buckets. Label values are low
//! cardinality by construction (actor kinds, ESP methods and codes, plugin ids, reasons,
//! categories, event kinds): never interaction or instance ids.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Actor kinds, the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Supervisor,
    Session,
    Bot,
    ChatLink,
    HaCoordinator,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Supervisor,
        Kind::Session,
        Kind::Bot,
        Kind::ChatLink,
        Kind::HaCoordinator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Supervisor => "supervisor",
            Kind::Session => "session",
            Kind::Bot => "bot",
            Kind::ChatLink => "chat_link",
            Kind::HaCoordinator => "ha_coordinator",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Bucket upper bounds in seconds for handler and request times.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
        } else {
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}"
            );
        }
    }
}

/// A counter family keyed by label values.
#[derive(Default)]
pub struct Counters(Mutex<BTreeMap<Vec<String>, u64>>);

impl Counters {
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[&str], n: u64) {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(key).or_default() += n;
    }

    fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[derive(Default)]
pub struct Histograms(Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>);

impl Histograms {
    pub fn observe(&self, label: &str, d: Duration) {
        let h = {
            let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(label.to_string()).or_default().clone()
        };
        h.observe(d);
    }
}

/// The registry.
#[derive(Default)]
pub struct Metrics {
    pub actors: [AtomicI64; 5],
    pub backlog: [AtomicI64; 5],
    pub handled: [AtomicU64; 5],
    pub failures: [AtomicU64; 5],
    pub handler_seconds: [Histogram; 5],
    /// method, result
    pub esp_requests: Counters,
    /// by method
    pub esp_seconds: Histograms,
    /// plugin, category, function
    pub bots_started: Counters,
    /// plugin, reason, category, function
    pub bots_stopped: Counters,
    /// direction, kind
    pub chat_events: Counters,
    pub chat_reconnects: AtomicU64,
    pub chat_connected: AtomicI64,
    pub ha_role_primary: AtomicI64,
    pub ha_epoch: AtomicI64,
    pub ha_peer_connected: AtomicI64,
    pub ha_pending: AtomicI64,
    pub ha_lag_micros: AtomicI64,
    /// kind (manual, failover)
    pub switchovers: Counters,
    /// plugin, endpoint, result (ok, retry, failed): calls of connector plugins to external bots
    pub external_requests: Counters,
    /// plugin, outcome (restarted, given_up): exits of process plugins
    pub plugin_exits: Counters,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    pub fn actor_started(&self, k: Kind) {
        self.actors[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn actor_stopped(&self, k: Kind) {
        self.actors[k.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn queued(&self, k: Kind) {
        self.backlog[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dequeued(&self, k: Kind) {
        self.backlog[k.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn handled(&self, k: Kind, took: Duration) {
        self.handled[k.index()].fetch_add(1, Ordering::Relaxed);
        self.handler_seconds[k.index()].observe(took);
    }

    pub fn failed(&self, k: Kind) {
        self.failures[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition. `bots_active` comes from the registry of the node.
    pub fn render(&self, bots_active: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP bgs_actors Actors alive, by kind.\n# TYPE bgs_actors gauge"
        );
        for k in Kind::ALL {
            let _ = writeln!(
                out,
                "bgs_actors{{kind=\"{}\"}} {}",
                k.as_str(),
                self.actors[k.index()].load(Ordering::Relaxed).max(0)
            );
        }
        let _ = writeln!(out, "# HELP bgs_actor_mailbox_backlog Messages sent to actors of a kind and not yet handled.\n# TYPE bgs_actor_mailbox_backlog gauge");
        for k in Kind::ALL {
            let _ = writeln!(
                out,
                "bgs_actor_mailbox_backlog{{kind=\"{}\"}} {}",
                k.as_str(),
                self.backlog[k.index()].load(Ordering::Relaxed).max(0)
            );
        }
        let _ = writeln!(out, "# HELP bgs_actor_messages_total Messages handled, by actor kind.\n# TYPE bgs_actor_messages_total counter");
        for k in Kind::ALL {
            let _ = writeln!(
                out,
                "bgs_actor_messages_total{{kind=\"{}\"}} {}",
                k.as_str(),
                self.handled[k.index()].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP bgs_actor_handler_seconds Time to handle one message (for bots: the plugin call and its actions).\n# TYPE bgs_actor_handler_seconds histogram");
        for k in Kind::ALL {
            self.handler_seconds[k.index()].render(
                &mut out,
                "bgs_actor_handler_seconds",
                &format!("kind=\"{}\"", k.as_str()),
            );
        }
        let _ = writeln!(out, "# HELP bgs_actor_failures_total Actor failures (a bot's error, panic or overrun), by kind.\n# TYPE bgs_actor_failures_total counter");
        for k in Kind::ALL {
            let _ = writeln!(
                out,
                "bgs_actor_failures_total{{kind=\"{}\"}} {}",
                k.as_str(),
                self.failures[k.index()].load(Ordering::Relaxed)
            );
        }
        counter_family(
            &mut out,
            "bgs_esp_requests_total",
            "ESP requests by method and result (ok or the error code).",
            &["method", "result"],
            &self.esp_requests,
        );
        let _ = writeln!(out, "# HELP bgs_esp_request_seconds ESP request latency by method.\n# TYPE bgs_esp_request_seconds histogram");
        {
            let m = self.esp_seconds.0.lock().unwrap_or_else(|p| p.into_inner());
            for (method, h) in m.iter() {
                h.render(
                    &mut out,
                    "bgs_esp_request_seconds",
                    &format!("method=\"{}\"", escape(method)),
                );
            }
        }
        let _ = writeln!(out, "# HELP bgs_bots_active Bots running on this node, by plugin.\n# TYPE bgs_bots_active gauge");
        for (plugin, n) in bots_active {
            let _ = writeln!(out, "bgs_bots_active{{plugin=\"{}\"}} {n}", escape(plugin));
        }
        counter_family(
            &mut out,
            "bgs_bots_started_total",
            "Bots started, by plugin, category and function.",
            &["plugin", "category", "function"],
            &self.bots_started,
        );
        counter_family(
            &mut out,
            "bgs_bots_stopped_total",
            "Bots stopped, by plugin, reason, category and function.",
            &["plugin", "reason", "category", "function"],
            &self.bots_stopped,
        );
        counter_family(
            &mut out,
            "bgs_chat_events_total",
            "Chat events received (in) and posted (out), by kind.",
            &["direction", "kind"],
            &self.chat_events,
        );
        let g = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        g(
            &mut out,
            "bgs_chat_reconnects_total",
            "counter",
            "Reconnections to the Chat Server.",
            self.chat_reconnects.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "bgs_chat_connected",
            "gauge",
            "1 while this node's Chat Server connection is up.",
            self.chat_connected.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "bgs_ha_role",
            "gauge",
            "1 on the primary, 0 on a backup.",
            self.ha_role_primary.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "bgs_ha_epoch",
            "gauge",
            "The node's epoch.",
            self.ha_epoch.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "bgs_ha_peer_connected",
            "gauge",
            "1 when the HA link to the peer is up.",
            self.ha_peer_connected.load(Ordering::Relaxed).to_string(),
        );
        g(
            &mut out,
            "bgs_ha_replication_lag_seconds",
            "gauge",
            "Age of the oldest change the backup has not acknowledged.",
            (self.ha_lag_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
        );
        g(
            &mut out,
            "bgs_ha_replication_pending",
            "gauge",
            "Changes sent to the backup and not yet acknowledged.",
            self.ha_pending.load(Ordering::Relaxed).to_string(),
        );
        counter_family(
            &mut out,
            "bgs_ha_switchovers_total",
            "Role changes to primary on this node, by kind (manual, failover).",
            &["kind"],
            &self.switchovers,
        );
        counter_family(
            &mut out,
            "bgs_external_requests_total",
            "Attempts of connector plugins to reach their external bots, by plugin, endpoint and result (ok; retry: failed, tried again; failed: failed, given up).",
            &["plugin", "endpoint", "result"],
            &self.external_requests,
        );
        counter_family(
            &mut out,
            "bgs_plugin_process_exits_total",
            "Exits of process plugins, by plugin and outcome (restarted, given_up).",
            &["plugin", "outcome"],
            &self.plugin_exits,
        );
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn counter_family(out: &mut String, name: &str, help: &str, labels: &[&str], c: &Counters) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (values, n) in c.snapshot() {
        let pairs: Vec<String> = labels
            .iter()
            .zip(values.iter())
            .map(|(l, v)| format!("{l}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {n}", pairs.join(","));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.actor_started(Kind::Bot);
        m.handled(Kind::Bot, Duration::from_millis(3));
        m.esp_requests.inc(&["StartBot", "ok"]);
        m.esp_seconds.observe("StartBot", Duration::from_millis(2));
        m.bots_stopped
            .inc(&["echo", "stop_requested", "", "faq \"x\""]);
        let text = m.render(&[("echo".to_string(), 1)].into());
        assert!(text.contains("bgs_actors{kind=\"bot\"} 1"));
        assert!(text.contains("bgs_actor_handler_seconds_bucket{kind=\"bot\",le=\"0.005\"} 1"));
        assert!(text.contains("bgs_actor_handler_seconds_count{kind=\"bot\"} 1"));
        assert!(text.contains("bgs_esp_requests_total{method=\"StartBot\",result=\"ok\"} 1"));
        assert!(text.contains("function=\"faq \\\"x\\\"\""));
        assert!(text.contains("bgs_bots_active{plugin=\"echo\"} 1"));
    }
}
