//! Built-in plugins: `echo`, `scripted` (rule-based bots from TOML scripts), the diagnostic
//! `faulty` bot (enabled by configuration only), and the connectors to bots that live elsewhere:
//! `webhook` (an HTTP endpoint), `botframework` (a Bot Framework SDK bot) and process plugins from `[plugins] dir` (any language).

pub mod bf_auth;
pub mod botframework;
pub mod cards;
pub mod connector;
pub mod echo;
pub mod faulty;
pub mod process;
pub mod scripted;
pub mod webhook;

use std::sync::Arc;

use bgs_actors::bot::BotFactory;

use crate::config::Config;

/// What [`load`] gives the node: its plugins, and the Bot Framework connector.
pub type Loaded = (Vec<Arc<dyn BotFactory>>, Arc<botframework::Connector>);

/// Every plugin this node offers, as configured, and the Bot Framework connector the HTTP
/// server routes bots' replies to. `http` is the node's bound HTTP address (the default
/// Bot Framework `serviceUrl`).
pub fn load(config: &Config, http: std::net::SocketAddr) -> Result<Loaded, String> {
    let mut plugins: Vec<Arc<dyn BotFactory>> = vec![
        Arc::new(echo::EchoFactory),
        Arc::new(scripted::ScriptedFactory::load(
            &config.plugins.scripted.scripts,
        )?),
    ];
    if config.plugins.faulty.enabled {
        plugins.push(Arc::new(faulty::FaultyFactory));
    }
    let handling = std::time::Duration::from_millis(config.bots.handling_timeout_ms);
    plugins.push(Arc::new(webhook::WebhookFactory::load(
        &config.plugins.webhook.endpoints,
        handling,
    )?));
    let connector = Arc::new(botframework::Connector::new(
        config
            .ha
            .peer
            .is_some()
            .then_some(config.ha.secret.as_str()),
    ));
    let service_url = config
        .plugins
        .botframework
        .service_url
        .clone()
        .unwrap_or_else(|| {
            // The HTTP port speaks TLS only when the node has a certificate.
            let scheme = if config.tls.cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{http}/")
        });
    plugins.push(Arc::new(botframework::BotFrameworkFactory::load(
        &config.plugins.botframework.bots,
        service_url,
        connector.clone(),
        handling,
    )?));
    if let Some(dir) = &config.plugins.dir {
        for (folder, manifest) in process::discover(dir)? {
            tracing::info!(plugin = %manifest.id, folder = %folder.display(), "process plugin found");
            plugins.push(Arc::new(process::ProcessFactory::start(folder, manifest)));
        }
    }
    let mut ids = std::collections::BTreeSet::new();
    for p in &plugins {
        if !ids.insert(p.bot_id().to_string()) {
            return Err(format!("two plugins have the bot id {:?}", p.bot_id()));
        }
    }
    Ok((plugins, connector))
}
