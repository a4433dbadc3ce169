//! Built-in plugins: `echo`, `scripted` (rule-based bots from TOML scripts) and the diagnostic
//! `faulty` bot (enabled by configuration only).

pub mod echo;
pub mod faulty;
pub mod scripted;

use std::sync::Arc;

use bgs_actors::bot::BotFactory;

use crate::config::Config;

/// Every plugin this node offers, as configured.
pub fn load(config: &Config) -> Result<Vec<Arc<dyn BotFactory>>, String> {
    let mut plugins: Vec<Arc<dyn BotFactory>> = vec![
        Arc::new(echo::EchoFactory),
        Arc::new(scripted::ScriptedFactory::load(
            &config.plugins.scripted.scripts,
        )?),
    ];
    if config.plugins.faulty.enabled {
        plugins.push(Arc::new(faulty::FaultyFactory));
    }
    let mut ids = std::collections::BTreeSet::new();
    for p in &plugins {
        if !ids.insert(p.bot_id().to_string()) {
            return Err(format!("two plugins have the bot id {:?}", p.bot_id()));
        }
    }
    let connectors =
        config.plugins.webhook.endpoints.len() + config.plugins.botframework.bots.len();
    if connectors > 0 {
        tracing::warn!(
            connectors,
            "webhook and Bot Framework connector plugins are configured but not part of this release; they are ignored"
        );
    }
    Ok(plugins)
}
