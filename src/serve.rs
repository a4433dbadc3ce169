//! `bgs serve`: wires configuration, plugins, actors and listeners into a running node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::{web, App, HttpServer};
use bgs_actors::chat_link::{ChatLink, ChatLinkConfig};
use bgs_actors::ha::{read_state, Attach, GetHaStatus, HaCoordinator, HaSettings, Switchover};
use bgs_actors::report::{Registry, ReportSink};
use bgs_actors::supervisor::{Barrier, Shutdown, Supervisor, SupervisorConfig};
use bgs_proto::chat::{ClientRole, Secret};
use bgs_proto::ha::HaRole;

use crate::config::Config;

/// actix-web workers serving the node's HTTP port.
const HTTP_WORKERS: usize = 2;
use crate::http::HttpState;
use crate::intake::Intake;
use crate::net::{serve_esp, serve_ha, TcpChatConnector, TcpHaDialer};
use crate::report::{FileReports, LogReports};

/// A running node.
pub struct Node {
    pub http: SocketAddr,
    pub esp: SocketAddr,
    /// The HA listener, in a pair.
    pub ha: Option<SocketAddr>,
    supervisor: Addr<Supervisor>,
    http_server: actix_web::dev::ServerHandle,
    reports: Arc<dyn ReportSink>,
    coordinator: Addr<HaCoordinator>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Plugins(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read ha.state-file {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the durable store ([store]): {0}")]
    Store(bgs_actors::store::StoreError),
    #[error("cannot open reporting.file {path}: {source}")]
    Reports {
        path: String,
        source: std::io::Error,
    },
}

/// The node's TLS sides (docs/CONFIG.md, `[tls]`).
struct Tls {
    /// The listeners' side, from `tls.cert-file` and `tls.key-file`.
    server: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Dialing the HA peer: when the node's listeners speak TLS, so do the peer's.
    ha_client: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The Chat Server link, with `chat-server.tls`.
    chat_client: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Tls {
    fn load(config: &Config) -> Result<Tls, ServeError> {
        use bgs_chat_server::tls::{client_config, server_config};
        let t = &config.tls;
        let server = match (&t.cert_file, &t.key_file) {
            (Some(cert), Some(key)) => Some(server_config(cert, key).map_err(ServeError::Tls)?),
            _ => None,
        };
        let client = match &t.ca_file {
            Some(ca) => Some(client_config(ca).map_err(ServeError::Tls)?),
            None => None,
        };
        Ok(Tls {
            ha_client: server.as_ref().and(client.clone()),
            chat_client: config.chat_server.tls.then(|| client.clone()).flatten(),
            server,
        })
    }

    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.server.clone().map(tokio_rustls::TlsAcceptor::from)
    }
}

/// Starts a node inside the current actix System: its listeners, plugins, the HaCoordinator, the
/// ChatLink and the Supervisor, tied together, then ESP and HTTP.
pub async fn start(config: Config) -> Result<Node, ServeError> {
    let tls = Tls::load(&config)?;
    let reports = report_sink(&config)?;
    let Listeners {
        esp_listener,
        http_listener,
        esp,
        http,
    } = Listeners::bind(&config).await?;
    let (plugins, connector) = crate::plugins::load(&config, http).map_err(ServeError::Plugins)?;
    // The HA coordinator first: the chat link tells it about fencing, bots tell it their saves.
    let (coordinator, ha_addr) = start_ha(&config, &tls, http).await?;
    // Work in flight (chat feeds, bots' inputs and stops): what a switchover's drain waits for.
    let in_flight = bgs_actors::messages::InFlight::default();
    let link = start_chat_link(&config, &tls, &coordinator, &in_flight);
    let registry = Arc::new(Registry::default());
    bgs_actors::bot_limits::set_limits(bgs_actors::bot_limits::BotLimits {
        posts_per_input: config.bots.max_posts_per_input,
        events_per_minute: config.bots.max_events_per_minute,
    });
    let role_view = bgs_actors::role::RoleView::default();
    let supervisor = Supervisor::new(
        SupervisorConfig {
            node_id: config.node.id.clone(),
            chat_server_name: config.chat_server.name.clone(),
            handling_timeout: Duration::from_millis(config.bots.handling_timeout_ms),
            finished_retention: Duration::from_secs(config.bots.finished_retention),
            arbiters: config.bots.arbiters,
            recovery_batch: config.channel_chatbot.ha_bot_recovery_batch as usize,
            replication_waits: config.ha.mode == crate::config::HaMode::Sync,
            in_flight,
        },
        plugins,
        bgs_actors::chat_link::ChatPort::of(&link),
        registry.clone(),
        reports.clone(),
        coordinator.clone().recipient(),
        role_view.clone(),
    )
    .start();
    coordinator.do_send(Attach {
        role: role_view.clone(),
        become_primary: supervisor.clone().recipient(),
        become_backup: supervisor.clone().recipient(),
        drain: supervisor.clone().recipient(),
        activate: link.clone().recipient(),
        deactivate: link.clone().recipient(),
        pause: link.clone().recipient(),
        resume: link.clone().recipient(),
    });
    let intake = Arc::new(Intake {
        node_id: config.node.id.clone(),
        supervisor: supervisor.clone(),
        timeout: Duration::from_secs(config.settings.esp_proc_timeout),
        token: config.auth.token.clone(),
    });
    let caps = crate::limits::ConnectionCaps::fit(
        config.node.esp_max_connections,
        config.node.http_max_connections,
        crate::limits::open_files_limit(),
    );
    actix_rt::spawn(serve_esp(
        esp_listener,
        intake.clone(),
        caps.esp,
        Duration::from_millis(config.node.esp_frame_timeout_ms),
        tls.acceptor(),
    ));
    let state = web::Data::new(HttpState {
        intake,
        registry,
        link,
        ha: coordinator.clone(),
        cluster_id: config.node.cluster_id.clone(),
        role: config.node.role,
        started: Instant::now(),
        connector,
        read_timeout: Duration::from_millis(config.node.http_read_timeout_ms),
    });
    let http_server = start_http(&config, &tls, http_listener, http, caps.http, state)?;
    tracing::info!(node = %config.node.id, %http, %esp, chat_server = %config.chat_server.address, "bgs node started");
    Ok(Node {
        http,
        esp,
        ha: ha_addr,
        supervisor,
        http_server,
        reports,
        coordinator,
    })
}

/// Where report records go: `reporting.file`, else the log.
fn report_sink(config: &Config) -> Result<Arc<dyn ReportSink>, ServeError> {
    Ok(match &config.reporting.file {
        Some(path) => Arc::new(
            FileReports::open(path).map_err(|source| ServeError::Reports {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => Arc::new(LogReports),
    })
}

/// The ESP and HTTP ports, bound (a port 0 in the configuration becomes a free one).
struct Listeners {
    esp_listener: tokio::net::TcpListener,
    http_listener: std::net::TcpListener,
    esp: SocketAddr,
    http: SocketAddr,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, ServeError> {
        let esp_listener = tokio::net::TcpListener::bind(config.node.esp_listen)
            .await
            .map_err(|source| ServeError::Listen {
                what: "node.esp-listen",
                addr: config.node.esp_listen,
                source,
            })?;
        let http_listener =
            std::net::TcpListener::bind(config.node.http_listen).map_err(|source| {
                ServeError::Listen {
                    what: "node.http-listen",
                    addr: config.node.http_listen,
                    source,
                }
            })?;
        let esp = esp_listener
            .local_addr()
            .map_err(|source| ServeError::Listen {
                what: "node.esp-listen",
                addr: config.node.esp_listen,
                source,
            })?;
        let http = http_listener
            .local_addr()
            .map_err(|source| ServeError::Listen {
                what: "node.http-listen",
                addr: config.node.http_listen,
                source,
            })?;
        Ok(Listeners {
            esp_listener,
            http_listener,
            esp,
            http,
        })
    }
}

/// The durable store of `[store]`, and what it holds (docs/HA.md 10); `None` for `memory`.
async fn open_store(config: &Config) -> Result<Option<bgs_actors::ha::StoreSettings>, ServeError> {
    let store: Arc<dyn bgs_actors::store::DurableStore> = match config.store.kind() {
        crate::config::StoreKind::Memory => return Ok(None),
        crate::config::StoreKind::Local => {
            // `validate` made sure a local store has a path.
            let path = config.store.path.clone().unwrap_or_default();
            Arc::new(crate::store::LocalStore::open(&path).map_err(ServeError::Store)?)
        }
    };
    let stored = store.load().await.map_err(ServeError::Store)?;
    tracing::info!(
        kind = store.kind(),
        bots = stored.bots.len(),
        epoch = stored.epoch,
        "durable store opened"
    );
    Ok(Some(bgs_actors::ha::StoreSettings {
        store,
        max_lag: Duration::from_millis(config.store.max_lag_ms),
        stored,
    }))
}

/// The HaCoordinator, in the role and epoch of the state file (else configured), and its
/// listener in a pair.
async fn start_ha(
    config: &Config,
    tls: &Tls,
    http: SocketAddr,
) -> Result<(Addr<HaCoordinator>, Option<SocketAddr>), ServeError> {
    let configured = config.node.role;
    // The role and epoch this node had when it stopped win over the configured role.
    let saved = match &config.ha.state_file {
        Some(path) => read_state(path).map_err(|source| ServeError::State {
            path: path.display().to_string(),
            source,
        })?,
        None => None,
    };
    // A single node (no peer) is always primary; it keeps the epoch it had.
    let (role, epoch) = match (saved, config.ha.peer.is_some()) {
        (Some(s), true) => (s.role, s.epoch),
        (Some(s), false) => (HaRole::Primary, s.epoch),
        (None, _) => (configured, 1),
    };
    if let Some(s) = saved {
        tracing::info!(role = ?s.role, epoch = s.epoch, "role and epoch restored from ha.state-file");
    }
    let ha_listener = match &config.ha.peer {
        Some(_) => Some(
            tokio::net::TcpListener::bind(config.ha.listen)
                .await
                .map_err(|source| ServeError::Listen {
                    what: "ha.listen",
                    addr: config.ha.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let ha_addr = ha_listener.as_ref().and_then(|l| l.local_addr().ok());
    let store = open_store(config).await?;
    let coordinator = HaCoordinator::new(
        HaSettings {
            node_id: config.node.id.clone(),
            cluster_id: config.node.cluster_id.clone(),
            role,
            peer: config.ha.peer.clone(),
            secret: config.ha.secret.clone(),
            heartbeat: Duration::from_millis(config.ha.heartbeat_interval_ms),
            failover_after: Duration::from_millis(config.ha.failover_after_ms),
            sync: config.ha.mode == crate::config::HaMode::Sync,
            http_url: format!(
                "{}://{http}",
                if tls.server.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            peer_http: config.ha.peer_http.clone(),
            state_file: config.ha.state_file.clone(),
            store,
        },
        epoch,
        Arc::new(TcpHaDialer {
            tls: tls.ha_client.clone(),
        }),
    )
    .start();
    if let Some(l) = ha_listener {
        actix_rt::spawn(serve_ha(l, coordinator.clone(), tls.acceptor()));
    }
    Ok((coordinator, ha_addr))
}

/// The ChatLink to the Chat Server, fenced through the coordinator.
fn start_chat_link(
    config: &Config,
    tls: &Tls,
    coordinator: &Addr<HaCoordinator>,
    in_flight: &bgs_actors::messages::InFlight,
) -> Addr<ChatLink> {
    ChatLink::new(
        ChatLinkConfig {
            on_fenced: Some(coordinator.clone().recipient()),
            address: config.chat_server.address.clone(),
            role: ClientRole::Gateway {
                cluster_id: config.node.cluster_id.clone(),
                epoch: 1,
                node_id: config.node.id.clone(),
            },
            credential: Secret::new(config.chat_server.credential.clone().unwrap_or_default()),
            reconnect_delay: config.reconnect_delay(),
            reconnect_attempts: config.channel_chatbot.ha_chat_reconnecting_attempts,
            max_queued: 100_000,
            in_flight: in_flight.clone(),
        },
        Arc::new(TcpChatConnector {
            tls: tls.chat_client.clone(),
        }),
    )
    .start()
}

/// The HTTP server, behind the gate that takes the port.
fn start_http(
    config: &Config,
    tls: &Tls,
    http_listener: std::net::TcpListener,
    http: SocketAddr,
    max_connections: usize,
    state: web::Data<HttpState>,
) -> Result<actix_web::dev::ServerHandle, ServeError> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(crate::http::configure)
    })
    .workers(HTTP_WORKERS)
    .max_connections(max_connections.div_ceil(HTTP_WORKERS))
    .client_request_timeout(Duration::from_millis(config.node.http_read_timeout_ms))
    // An idle keep-alive connection stays longer than the head deadline (client pools expect
    // it: aiohttp's, reqwest's); nginx keeps 75 s too.
    .keep_alive(bgs_chat_server::http::KEEP_ALIVE)
    .disable_signals()
    .shutdown_timeout(2);
    // The server listens behind the gate (src/gate.rs), which takes the port, its TLS, and
    // shares it fairly between clients.
    let listen_error = |source| ServeError::Listen {
        what: "node.http-listen",
        addr: http,
        source,
    };
    let (backend, backend_addr) = crate::gate::backend().map_err(listen_error)?;
    let server = server.listen_uds(backend).map_err(listen_error)?.run();
    crate::gate::spawn(
        http_listener,
        backend_addr,
        tls.acceptor(),
        crate::gate::GateConfig {
            max: max_connections,
            per_client: config.node.http_max_connections_per_client,
            handshake: bgs_chat_server::http::TLS_HANDSHAKE_TIMEOUT,
            first_bytes: Duration::from_millis(config.node.http_read_timeout_ms),
        },
    )
    .map_err(listen_error)?;
    let http_server = server.handle();
    actix_rt::spawn(server);
    Ok(http_server)
}

impl Node {
    /// A primary with a backup in sync hands its bots over first (a planned switchover); then
    /// every bot still here stops (reason `shutdown`, no leave, kept in the backup's copy), HTTP
    /// stops, and the last reports are written.
    pub async fn shutdown(self) {
        if let Ok(st) = self.coordinator.send(GetHaStatus).await {
            if st.role == HaRole::Primary && st.peer_connected {
                tracing::info!("shutting down: handing the bots over to the backup first");
                match tokio::time::timeout(
                    Duration::from_secs(40),
                    self.coordinator.send(Switchover),
                )
                .await
                {
                    Ok(Ok(Ok(r))) => {
                        tracing::info!(new_epoch = r.new_epoch, bots = r.bots, "handed over")
                    }
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(reason = %e, "hand-over refused; stopping anyway")
                    }
                    _ => tracing::warn!("hand-over did not finish; stopping anyway"),
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.supervisor.send(Shutdown)).await;
        let _ = self.supervisor.send(Barrier).await;
        self.http_server.stop(true).await;
        // The last reports (reason shutdown) reach the file before the process ends.
        let reports = self.reports.clone();
        let _ = tokio::task::spawn_blocking(move || reports.flush()).await;
    }
}
