//! The reference Chat Server of bgs: hosts chat sessions that customers (HTTP/JSON, WebSocket),
//! agent tools and bot gateways (TCP frames) join. docs/CHAT.md is its protocol.
//!
//! - [`session`]: one session's state (pure, replayable).
//! - [`hub`]: all sessions and connections, fencing, durability, idle and grace sweeps.
//! - [`journal`]: the append-only journal behind `--data-dir`.
//! - [`tcp`], [`http`]: the transports. [`client`]: a TCP client for tools and tests.

pub mod auth;
pub mod check;
pub mod client;
pub mod config;
pub mod error;
pub mod http;
pub mod hub;
pub mod journal;
pub mod session;
pub mod tcp;
pub mod tls;

use std::io::Write;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{ChatServerError, Result};
use hub::Hub;

/// How often idle control, detach grace and retention are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// Runs the server until `shutdown` is cancelled. Prints one line to stdout once both listeners
/// are bound: `bgs-chat-server listening http=ADDR tcp=ADDR` (tools and tests read the ports).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let print = tokio::spawn(async move {
        if let Ok((http_addr, tcp_addr)) = rx.await {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "bgs-chat-server listening http={http_addr} tcp={tcp_addr}"
            );
            let _ = out.flush();
        }
    });
    let result = run_ready(config, shutdown, tx).await;
    let _ = print.await;
    result
}

/// Runs the server until `shutdown`; `ready` receives the bound (HTTP, TCP) addresses once both
/// listeners are up (for embedding the server, as `bgs demo` does).
pub async fn run_ready(
    config: Config,
    shutdown: CancellationToken,
    ready: tokio::sync::oneshot::Sender<(std::net::SocketAddr, std::net::SocketAddr)>,
) -> Result<()> {
    let hub = Hub::open(config.clone())?;
    let tcp = tokio::net::TcpListener::bind(config.tcp_listen).await?;
    let http_listener = std::net::TcpListener::bind(config.http_listen)?;
    let (http_addr, tcp_addr) = (http_listener.local_addr()?, tcp.local_addr()?);
    let app_hub = hub.clone();
    let tls = config.tls()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_hub.clone()))
            .configure(http::configure)
    })
    .workers(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(4),
    )
    .client_request_timeout(Duration::from_secs(config.http_read_timeout))
    .keep_alive(http::KEEP_ALIVE)
    .tls_handshake_timeout(http::TLS_HANDSHAKE_TIMEOUT)
    .max_connection_rate(config.max_connections.max(256))
    .disable_signals()
    .shutdown_timeout(2);
    let server = match &tls {
        Some(tls) => server.listen_rustls_0_23(http_listener, (**tls).clone())?,
        None => server.listen(http_listener)?,
    }
    .run();
    let http_handle = server.handle();
    let http_task = tokio::spawn(server);

    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let tcp_task = tokio::spawn(tcp::serve(tcp, hub.clone(), shutdown.clone(), acceptor));
    let sweep_hub = hub.clone();
    let sweep_stop = shutdown.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep_stop.cancelled() => return,
                _ = tick.tick() => {
                    sweep_hub.sweep();
                    sweep_hub.maybe_compact();
                }
            }
        }
    });

    tracing::info!(%http_addr, %tcp_addr, data_dir = ?config.data_dir, "bgs-chat-server started");
    let _ = ready.send((http_addr, tcp_addr));

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    http_handle.stop(true).await;
    let _ = http_task.await;
    let _ = tcp_task.await;
    let _ = sweeper.await;
    hub.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr, human-readable or JSON; `RUST_LOG` filters (default `info`).
pub fn init_tracing(json: bool) {
    // An empty RUST_LOG would silence everything: it counts as unset.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The `bgs-chat-server` command: parse options, run until SIGINT/SIGTERM.
pub fn main() -> std::process::ExitCode {
    main_from(std::env::args_os())
}

/// The command with the given arguments (the first is the program name), as `bgs chat-server`
/// runs it.
pub fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let config = match <crate::Config as clap::Parser>::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    crate::init_tracing(config.log_json);
    if let Err(e) = config.validate() {
        eprintln!("bgs-chat-server: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bgs-chat-server: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
        });
        crate::run(config, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "bgs-chat-server failed");
            eprintln!("bgs-chat-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::{BTreeMap, BTreeSet};

    /// The modules of the Chat Server import each other without a circle (a module and its
    /// folder count as one): `session` and `check` are leaves the hub, the journal and the
    /// credentials stand on.
    #[test]
    fn the_modules_import_each_other_without_a_circle() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![];
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let module = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                for sub in std::fs::read_dir(&path).unwrap() {
                    files.push((module.clone(), sub.unwrap().path()));
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push((module, path));
            }
        }
        let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, path) in files {
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = imports.entry(module.clone()).or_default();
            for part in text.split("crate::").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if name != module && modules.contains(&name) {
                    uses.insert(name);
                }
            }
        }
        fn visit(
            m: &str,
            imports: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if done.contains(m) {
                return;
            }
            if let Some(i) = path.iter().position(|p| p == m) {
                panic!("import circle: {} -> {m}", path[i..].join(" -> "));
            }
            path.push(m.to_string());
            for next in imports.get(m).into_iter().flatten() {
                visit(next, imports, path, done);
            }
            path.pop();
            done.insert(m.to_string());
        }
        let mut done = BTreeSet::new();
        for m in imports.keys() {
            visit(m, &imports, &mut Vec::new(), &mut done);
        }
    }
}
