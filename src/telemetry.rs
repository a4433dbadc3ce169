//! Logging through `tracing` (human or JSON lines) and the panic policy.

/// Logs to stderr. `RUST_LOG` wins over `level`.
pub fn init(json: bool, level: &str) {
    // An empty RUST_LOG would silence everything: it counts as unset.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok());
    let filter = from_env
        .map(Ok)
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// A plugin's panic stops that bot only (the bot actor catches it); a panic in the gateway's own
/// code is a bug: log it and exit, so a supervisor restarts the node (and a backup takes over).
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if bgs_actors::plugin_guard::in_plugin() {
            tracing::warn!(panic = %info, "a bot plugin panicked; it is caught (the bot stops, or its StartBot is refused)");
            return;
        }
        tracing::error!(panic = %info, "bgs panicked; exiting");
        default(info);
        std::process::exit(101);
    }));
}
