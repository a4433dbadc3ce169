//! `bgs serve`: wires configuration, plugins, actors and listeners into a running node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::{web, App, HttpServer};
use bgs_actors::chat_link::{ChatLink, ChatLinkConfig};
use bgs_actors::report::{Registry, ReportSink};
use bgs_actors::supervisor::{Shutdown, Supervisor, SupervisorConfig};
use bgs_proto::chat::ClientRole;

use crate::config::Config;
use crate::http::HttpState;
use crate::intake::Intake;
use crate::net::{serve_esp, TcpChatConnector};
use crate::report::{FileReports, LogReports};

/// A running node.
pub struct Node {
    pub http: SocketAddr,
    pub esp: SocketAddr,
    supervisor: Addr<Supervisor>,
    http_server: actix_web::dev::ServerHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Plugins(String),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open reporting.file {path}: {source}")]
    Reports {
        path: String,
        source: std::io::Error,
    },
}

/// Starts a node inside the current actix System.
pub async fn start(config: Config) -> Result<Node, ServeError> {
    let plugins = crate::plugins::load(&config).map_err(ServeError::Plugins)?;
    let reports: Arc<dyn ReportSink> = match &config.reporting.file {
        Some(path) => Arc::new(
            FileReports::open(path).map_err(|source| ServeError::Reports {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => Arc::new(LogReports),
    };
    let esp_listener = tokio::net::TcpListener::bind(config.node.esp_listen)
        .await
        .map_err(|source| ServeError::Listen {
            what: "node.esp-listen",
            addr: config.node.esp_listen,
            source,
        })?;
    let http_listener = std::net::TcpListener::bind(config.node.http_listen).map_err(|source| {
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

    let link = ChatLink::new(
        ChatLinkConfig {
            address: config.chat_server.address.clone(),
            role: ClientRole::Gateway {
                cluster_id: config.node.cluster_id.clone(),
                epoch: 1,
                node_id: config.node.id.clone(),
            },
            reconnect_delay: config.reconnect_delay(),
            reconnect_attempts: config.channel_chatbot.ha_chat_reconnecting_attempts,
            max_queued: 100_000,
        },
        Arc::new(TcpChatConnector),
    )
    .start();
    let registry = Arc::new(Registry::default());
    let supervisor = Supervisor::new(
        SupervisorConfig {
            node_id: config.node.id.clone(),
            chat_server_name: config.chat_server.name.clone(),
            handling_timeout: Duration::from_millis(config.bots.handling_timeout_ms),
            finished_retention: Duration::from_secs(config.bots.finished_retention),
            arbiters: config.bots.arbiters,
        },
        plugins,
        link.clone(),
        registry.clone(),
        reports,
    )
    .start();
    let intake = Arc::new(Intake {
        node_id: config.node.id.clone(),
        supervisor: supervisor.clone(),
        timeout: Duration::from_secs(config.settings.esp_proc_timeout),
        token: config.auth.token.clone(),
    });
    actix_rt::spawn(serve_esp(esp_listener, intake.clone()));
    let state = web::Data::new(HttpState {
        intake,
        registry,
        link,
        cluster_id: config.node.cluster_id.clone(),
        role: config.node.role.clone(),
        started: Instant::now(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(crate::http::configure)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(http_listener)
    .map_err(|source| ServeError::Listen {
        what: "node.http-listen",
        addr: http,
        source,
    })?
    .run();
    let http_server = server.handle();
    actix_rt::spawn(server);
    tracing::info!(node = %config.node.id, %http, %esp, chat_server = %config.chat_server.address, "bgs node started");
    Ok(Node {
        http,
        esp,
        supervisor,
        http_server,
    })
}

impl Node {
    /// Stops taking ESP, stops every bot (reason `shutdown`, no leave), stops HTTP.
    pub async fn shutdown(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.supervisor.send(Shutdown)).await;
        self.http_server.stop(true).await;
    }
}
