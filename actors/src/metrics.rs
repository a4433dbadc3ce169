//! Metrics measured where the work happens, kept in a `prometheus-client` registry and rendered
//! in the Prometheus text format by `src` (`GET /metrics`).
//!
//! One process-wide set ([`metrics()`]). Label values are low cardinality by construction (actor
//! kinds, ESP methods and codes, plugin ids and configured endpoint names, reasons, categories,
//! event kinds): never interaction or instance ids. docs/OPERATIONS.md section 8 lists them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
pub(crate) const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A label set: names and values, in the order they are rendered.
type Labels = Vec<(String, String)>;

/// `prometheus-client` writes label values as they are: quotes, backslashes and newlines are
/// escaped here (a workflow's ChatBotFunction may hold any of them).
fn labels(names: &[&str], values: &[&str]) -> Labels {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.to_string(), escape(v)))
        .collect()
}

fn escape(v: &str) -> String {
    if !v.contains(['\\', '"', '\n']) {
        return v.to_string();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A counter family whose label names are fixed; `inc` takes the values in that order.
#[derive(Clone)]
pub struct Counters {
    names: &'static [&'static str],
    family: Family<Labels, Counter>,
}

impl Counters {
    fn new(names: &'static [&'static str]) -> Self {
        Counters {
            names,
            family: Family::default(),
        }
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    pub fn add(&self, values: &[&str], n: u64) {
        self.family
            .get_or_create(&labels(self.names, values))
            .inc_by(n);
    }
}

/// A counter family whose label values are all known when the code is written (directions,
/// kinds, ports, reasons): an increment finds its series by reference, with no allocation, where
/// [`Counters`] builds a label set of strings for each.
#[derive(Clone)]
pub struct StaticCounters<const N: usize> {
    names: [&'static str; N],
    family: Family<[(&'static str, &'static str); N], Counter>,
}

impl<const N: usize> StaticCounters<N> {
    /// A family registered as `name` with its `help`.
    fn registered(
        registry: &mut Registry,
        name: &str,
        help: &str,
        names: [&'static str; N],
    ) -> Self {
        let family = Family::default();
        registry.register(name, help, family.clone());
        StaticCounters { names, family }
    }

    pub fn inc(&self, values: [&'static str; N]) {
        self.add(values, 1);
    }

    pub fn add(&self, values: [&'static str; N], n: u64) {
        let labels: [(&'static str, &'static str); N] =
            std::array::from_fn(|i| (self.names[i], values[i]));
        self.family.get_or_create(&labels).inc_by(n);
    }
}

/// A histogram family with one label (`method`).
#[derive(Clone)]
pub struct Histograms {
    name: &'static str,
    family: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Histograms {
    fn new(name: &'static str) -> Self {
        Histograms {
            name,
            family: Family::new_with_constructor(histogram),
        }
    }

    pub fn observe(&self, label: &str, d: Duration) {
        self.family
            .get_or_create(&labels(&[self.name], &[label]))
            .observe(d.as_secs_f64());
    }
}

/// Counts that are approximate (an actor can be counted out without having been counted in,
/// for example a message dropped with its stopped actor): encoded at each scrape, never below 0.
#[derive(Debug, Default)]
struct ActorCounts {
    alive: [AtomicI64; 5],
    backlog: [AtomicI64; 5],
}

impl Collector for ActorCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, values) in [
            ("bgs_actors", "Actors alive, by kind", &self.alive),
            (
                "bgs_actor_mailbox_backlog",
                "Messages sent to actors of a kind and not yet handled",
                &self.backlog,
            ),
        ] {
            let gauge = ConstGauge::new(0i64);
            let mut metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            for k in Kind::ALL {
                let v = values[k.index()].load(Ordering::Relaxed).max(0);
                let kind = labels(&["kind"], &[k.as_str()]);
                ConstGauge::new(v).encode(metric.encode_family(&kind)?)?;
            }
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    actor_counts: Arc<ActorCounts>,
    handled: [Counter; 5],
    failures: [Counter; 5],
    handler_seconds: [Histogram; 5],
    /// method, result
    pub esp_requests: Counters,
    /// by method
    pub esp_seconds: Histograms,
    /// plugin, category, function
    pub bots_started: Counters,
    /// plugin, reason, category, function
    pub bots_stopped: Counters,
    /// direction, kind
    pub chat_events: StaticCounters<2>,
    /// kind (manual, failover)
    pub switchovers: StaticCounters<1>,
    /// plugin, endpoint, result (ok, retry, failed): calls of connector plugins to external bots
    pub external_requests: Counters,
    /// plugin, outcome (restarted, given_up): exits of process plugins
    pub plugin_exits: Counters,
    /// port (esp, http, ha), reason (unauthorized, capacity, handshake, bf_capability)
    pub refused: StaticCounters<2>,
    /// limit (posts_per_input, events_per_minute, text_split, text_cut, rich_items)
    pub bot_limits: StaticCounters<1>,
    /// plugin: set from the node's registry of bots at each scrape
    bots_active: Family<Labels, Gauge>,
    pub chat_reconnects: Counter,
    pub chat_connected: Gauge,
    pub ha_role_primary: Gauge,
    pub ha_epoch: Gauge,
    pub ha_peer_connected: Gauge,
    pub ha_pending: Gauge,
    pub ha_lag_seconds: Gauge<f64, AtomicU64>,
    /// result (ok, failed): batches written to the durable store
    store_writes: StaticCounters<1>,
    store_bots_written: Counter,
    store_pending: Gauge,
    store_lag_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let by_kind = |name: &str, help: &str, registry: &mut Registry| -> [Counter; 5] {
            let family = Family::<Labels, Counter>::default();
            registry.register(name, help, family.clone());
            Kind::ALL.map(|k| {
                family
                    .get_or_create(&labels(&["kind"], &[k.as_str()]))
                    .clone()
            })
        };
        let actor_counts = Arc::new(ActorCounts::default());
        registry.register_collector(Box::new(actor_counts.clone()));
        let handled = by_kind(
            "bgs_actor_messages",
            "Messages handled, by actor kind",
            &mut registry,
        );
        let seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register(
            "bgs_actor_handler_seconds",
            "Time to handle one message (for bots: the plugin call and its actions)",
            seconds.clone(),
        );
        let handler_seconds = Kind::ALL.map(|k| {
            seconds
                .get_or_create(&labels(&["kind"], &[k.as_str()]))
                .clone()
        });
        let failures = by_kind(
            "bgs_actor_failures",
            "Actor failures (a bot's error, panic or overrun), by kind",
            &mut registry,
        );
        let mut counters = |name: &str, help: &str, names: &'static [&'static str]| {
            let c = Counters::new(names);
            registry.register(name, help, c.family.clone());
            c
        };
        let esp_requests = counters(
            "bgs_esp_requests",
            "ESP requests by method and result (ok or the error code)",
            &["method", "result"],
        );
        let esp_seconds = Histograms::new("method");
        let bots_started = counters(
            "bgs_bots_started",
            "Bots started, by plugin, category and function",
            &["plugin", "category", "function"],
        );
        let bots_stopped = counters(
            "bgs_bots_stopped",
            "Bots stopped, by plugin, reason, category and function",
            &["plugin", "reason", "category", "function"],
        );
        let external_requests = counters(
            "bgs_external_requests",
            "Attempts of connector plugins to reach their external bots, by plugin, endpoint and result (ok; retry: failed, tried again; failed: failed, given up)",
            &["plugin", "endpoint", "result"],
        );
        let plugin_exits = counters(
            "bgs_plugin_process_exits",
            "Exits of process plugins, by plugin and outcome (restarted, given_up)",
            &["plugin", "outcome"],
        );
        let chat_events = StaticCounters::registered(
            &mut registry,
            "bgs_chat_events",
            "Chat events received (in) and posted (out), by kind",
            ["direction", "kind"],
        );
        let switchovers = StaticCounters::registered(
            &mut registry,
            "bgs_ha_switchovers",
            "Role changes to primary on this node, by kind (manual, failover)",
            ["kind"],
        );
        let refused = StaticCounters::registered(&mut registry, "bgs_connections_refused", "Connections and requests refused before any work, by port (esp: framed ESP, http, ha) and reason (unauthorized, capacity, handshake, bf_capability)", ["port", "reason"]);
        let bot_limits = StaticCounters::registered(&mut registry, "bgs_bot_limits", "Times a bot's output was held to a limit, by limit (posts_per_input: posts left out; events_per_minute: bot stopped; text_split, text_cut: a long post split or cut; rich_items: buttons or cards left out)", ["limit"]);
        registry.register(
            "bgs_esp_request_seconds",
            "ESP request latency by method",
            esp_seconds.family.clone(),
        );
        let bots_active = Family::<Labels, Gauge>::default();
        registry.register(
            "bgs_bots_active",
            "Bots running on this node, by plugin",
            bots_active.clone(),
        );
        let chat_reconnects = Counter::default();
        registry.register(
            "bgs_chat_reconnects",
            "Reconnections to the Chat Server",
            chat_reconnects.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let chat_connected = gauge(
            "bgs_chat_connected",
            "1 while this node's Chat Server connection is up",
        );
        let ha_role_primary = gauge("bgs_ha_role", "1 on the primary, 0 on a backup");
        let ha_epoch = gauge("bgs_ha_epoch", "The node's epoch");
        let ha_peer_connected = gauge(
            "bgs_ha_peer_connected",
            "1 when the HA link to the peer is up",
        );
        let ha_pending = gauge(
            "bgs_ha_replication_pending",
            "Changes sent to the backup and not yet acknowledged",
        );
        let ha_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "bgs_ha_replication_lag_seconds",
            "Age of the oldest change the backup has not acknowledged",
            ha_lag_seconds.clone(),
        );
        let store_writes = StaticCounters::registered(
            &mut registry,
            "bgs_store_writes",
            "Batches written to the durable store, by result (ok, failed)",
            ["result"],
        );
        let store_bots_written = Counter::default();
        registry.register(
            "bgs_store_bots_written",
            "Bots written to the durable store (a batch writes each changed bot once)",
            store_bots_written.clone(),
        );
        let store_pending = Gauge::default();
        registry.register(
            "bgs_store_pending",
            "Bots changed and not yet written to the durable store",
            store_pending.clone(),
        );
        let store_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "bgs_store_lag_seconds",
            "Age of the oldest change not yet written to the durable store",
            store_lag_seconds.clone(),
        );
        Metrics {
            store_writes,
            store_bots_written,
            store_pending,
            store_lag_seconds,
            registry,
            actor_counts,
            handled,
            failures,
            handler_seconds,
            esp_requests,
            esp_seconds,
            bots_started,
            bots_stopped,
            chat_events,
            switchovers,
            external_requests,
            plugin_exits,
            refused,
            bot_limits,
            bots_active,
            chat_reconnects,
            chat_connected,
            ha_role_primary,
            ha_epoch,
            ha_peer_connected,
            ha_pending,
            ha_lag_seconds,
        }
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide set.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    pub fn actor_started(&self, k: Kind) {
        self.actor_counts.alive[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn actor_stopped(&self, k: Kind) {
        self.actor_counts.alive[k.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn queued(&self, k: Kind) {
        self.actor_counts.backlog[k.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dequeued(&self, k: Kind) {
        self.actor_counts.backlog[k.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn handled(&self, k: Kind, took: Duration) {
        self.handled[k.index()].inc();
        self.handler_seconds[k.index()].observe(took.as_secs_f64());
    }

    pub fn failed(&self, k: Kind) {
        self.failures[k.index()].inc();
    }

    /// One batch of `bots` written to the durable store (or not).
    pub fn store_write(&self, ok: bool, bots: usize) {
        self.store_writes.inc([if ok { "ok" } else { "failed" }]);
        if ok {
            self.store_bots_written.inc_by(bots as u64);
        }
    }

    /// What the durable store has not had yet.
    pub fn store_pending(&self, pending: usize, lag_seconds: f64) {
        self.store_pending.set(pending as i64);
        self.store_lag_seconds.set(lag_seconds);
    }

    /// The Prometheus text exposition (format 0.0.4). `bots_active` comes from the node's
    /// registry of bots.
    pub fn render(&self, bots_active: &BTreeMap<String, u64>) -> String {
        self.bots_active.clear();
        for (plugin, n) in bots_active {
            self.bots_active
                .get_or_create(&labels(&["plugin"], &[plugin]))
                .set(*n as i64);
        }
        let mut open_metrics = String::new();
        if prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry).is_err() {
            tracing::error!("cannot encode the metrics");
        }
        prometheus_text(&open_metrics)
    }
}

/// The OpenMetrics text `prometheus-client` writes, as the Prometheus text format 0.0.4 that
/// every scraper and `promtool check metrics` read: a counter family is named with its `_total`
/// suffix, as its samples are, and there is no `# EOF`.
fn prometheus_text(open_metrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in open_metrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(open_metrics.len() + counters.len() * 12);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_prometheus_text_format() {
        let m = Metrics::default();
        m.actor_started(Kind::Bot);
        m.dequeued(Kind::Session); // approximate counts never show below 0
        m.handled(Kind::Bot, Duration::from_millis(3));
        m.esp_requests.inc(&["StartBot", "ok"]);
        m.esp_seconds.observe("StartBot", Duration::from_millis(2));
        m.bots_stopped
            .inc(&["echo", "stop_requested", "", "faq \"x\""]);
        m.ha_lag_seconds.set(0.25);
        let text = m.render(&[("echo".to_string(), 1)].into());
        for line in [
            "bgs_actors{kind=\"bot\"} 1",
            "bgs_actor_mailbox_backlog{kind=\"session\"} 0",
            "bgs_actor_handler_seconds_bucket{le=\"0.005\",kind=\"bot\"} 1",
            "bgs_actor_handler_seconds_count{kind=\"bot\"} 1",
            "# TYPE bgs_esp_requests_total counter",
            "bgs_esp_requests_total{method=\"StartBot\",result=\"ok\"} 1",
            "bgs_bots_active{plugin=\"echo\"} 1",
            "bgs_ha_replication_lag_seconds 0.25",
            "# TYPE bgs_ha_role gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.contains("function=\"faq \\\"x\\\"\""), "{text}");
        assert!(!text.contains("# EOF"));
        // A plugin with no bot left has no series.
        let text = m.render(&BTreeMap::new());
        assert!(!text.contains("bgs_bots_active{"), "{text}");
    }
}
