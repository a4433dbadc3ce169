//! The `webhook` plugin: a connector to an external bot behind an HTTP endpoint, in the shape
//! of Rasa's REST channel (the de facto standard). StartBot `ChatBotName` picks the endpoint
//! from `[plugins.webhook.endpoints.<name>]`. docs/PLUGINS.md section "webhook" is the guide.
//!
//! Each customer message is POSTed as `{"sender", "message", "metadata"}`; the answer is a JSON
//! list of `{"text"}`, `{"text", "buttons"}`, `{"image"}` or `{"custom"}` items. Attempts that
//! fail (connection, timeout, 5xx, 429) are retried with back-off inside the bot's handling time,
//! each with the same `Idempotency-Key` (the input's id), and only the answer of the attempt that
//! succeeded is posted. An endpoint that cannot be reached ends the bot with a notice to the
//! customer and a hand-off (reason `bot_unavailable`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bgs_actors::bot::{Bot, BotContext, BotError, BotFactory, BotInput, CreateBot, Handoff};
use bgs_proto::chat::{Button, Card, EventKind, ParticipantType, RichContent};
use bgs_proto::esp::KeyValues;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};

use super::connector::{self, Choices, RetryPolicy};
use crate::config::WebhookEndpoint;

/// One configured endpoint, ready to call.
struct Endpoint {
    name: String,
    url: reqwest::Url,
    /// The shared client, or one that follows same-origin redirects for this endpoint.
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    policy: RetryPolicy,
    handoff_userdata: BTreeMap<String, String>,
    unavailable_notice: String,
}

pub struct WebhookFactory {
    endpoints: BTreeMap<String, Arc<Endpoint>>,
}

impl WebhookFactory {
    /// Checks every endpoint; errors name the key (`plugins.webhook.endpoints.NAME.url: ...`).
    pub fn load(
        endpoints: &BTreeMap<String, WebhookEndpoint>,
        handling_timeout: Duration,
    ) -> Result<Self, String> {
        let budget = RetryPolicy::budget_for(handling_timeout);
        let client = connector::client()?;
        let mut out = BTreeMap::new();
        for (name, e) in endpoints {
            let key = format!("plugins.webhook.endpoints.{name}");
            let url = connector::http_url(&format!("{key}.url"), &e.url)?;
            if e.timeout_ms == 0 || e.timeout_ms > 600_000 {
                return Err(format!(
                    "{key}.timeout_ms: must be 1 to 600000, not {}",
                    e.timeout_ms
                ));
            }
            if e.retries > 10 {
                return Err(format!("{key}.retries: must be 0 to 10, not {}", e.retries));
            }
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in &e.headers {
                let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("{key}.headers: {k:?} is not a header name"))?;
                let value = reqwest::header::HeaderValue::from_str(v)
                    .map_err(|_| format!("{key}.headers.{k}: not a valid header value"))?;
                headers.insert(name, value);
            }
            if Duration::from_millis(e.timeout_ms) > budget {
                tracing::warn!(
                    endpoint = %name,
                    timeout_ms = e.timeout_ms,
                    budget_ms = budget.as_millis() as u64,
                    "webhook timeout_ms is longer than the bot's handling time allows; attempts are cut to fit"
                );
            }
            out.insert(
                name.clone(),
                Arc::new(Endpoint {
                    name: name.clone(),
                    url,
                    client: if e.follow_redirects {
                        connector::client_following_same_origin()?
                    } else {
                        client.clone()
                    },
                    headers,
                    policy: RetryPolicy {
                        plugin: "webhook",
                        endpoint: name.clone(),
                        attempts: e.retries + 1,
                        per_attempt: Duration::from_millis(e.timeout_ms),
                        budget,
                    },
                    handoff_userdata: e.handoff_userdata.clone(),
                    unavailable_notice: e.unavailable_notice.clone(),
                }),
            );
        }
        Ok(WebhookFactory { endpoints: out })
    }

    fn endpoint(&self, name: &str) -> Result<&Arc<Endpoint>, BotError> {
        connector::named(
            &self.endpoints,
            name,
            "webhook endpoint",
            "plugins.webhook.endpoints",
        )
    }
}

impl BotFactory for WebhookFactory {
    fn bot_id(&self) -> &str {
        "webhook"
    }

    fn check(&self, request: &CreateBot) -> Result<(), BotError> {
        self.endpoint(&request.bot_name).map(|_| ())
    }

    fn create(&self, request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        Ok(Box::new(WebhookBot {
            endpoint: self.endpoint(&request.bot_name)?.clone(),
            parameters: KeyValues::new(),
            userdata: KeyValues::new(),
            choices: Choices::default(),
            done: false,
        }))
    }
}

struct WebhookBot {
    endpoint: Arc<Endpoint>,
    parameters: KeyValues,
    /// The interaction's userdata as the bot knows it: StartBot's, then every change it sees.
    userdata: KeyValues,
    /// The buttons of its last answer, for a number the customer types after them.
    choices: Choices,
    /// Handed over: any later input is ignored.
    done: bool,
}

/// One item of a webhook's answer (unknown fields, such as Rasa's `recipient_id`, are ignored).
#[derive(Debug, Deserialize)]
struct AnswerItem {
    text: Option<String>,
    #[serde(default)]
    buttons: Vec<AnswerButton>,
    image: Option<String>,
    custom: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct AnswerButton {
    title: String,
    #[serde(default)]
    payload: Option<String>,
}

/// What a `custom` item asks for: a hand-off, with a summary and userdata for the workflow.
#[derive(Debug, Deserialize)]
struct CustomHandoff {
    #[serde(default)]
    handoff: bool,
    #[serde(default)]
    summary: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    userdata: BTreeMap<String, String>,
}

/// Turns a webhook's answer into the bot's actions, in order; the buttons offered are kept in
/// `choices` (a number the customer types next is sent as that button's payload).
pub(crate) fn act_on(
    ctx: &mut BotContext,
    bytes: &[u8],
    choices: &mut Choices,
) -> Result<bool, String> {
    let items: Vec<AnswerItem> = serde_json::from_slice(bytes)
        .map_err(|e| format!("the answer is not a JSON list of messages: {e}"))?;
    let mut handed_off = false;
    for item in items {
        let text = item.text.unwrap_or_default();
        let mut rich = RichContent {
            buttons: item
                .buttons
                .into_iter()
                .map(|b| Button {
                    payload: b.payload.unwrap_or_else(|| b.title.clone()),
                    title: b.title,
                })
                .collect(),
            cards: Vec::new(),
        };
        if let Some(url) = item.image.filter(|u| !u.is_empty()) {
            rich.cards.push(Card {
                image_url: Some(url),
                ..Card::default()
            });
        }
        if !text.is_empty() || !rich.is_empty() {
            choices.offer(&rich);
            ctx.say_rich(text, rich);
        }
        if let Some(custom) = item.custom {
            match serde_json::from_value::<CustomHandoff>(custom) {
                Ok(h) if h.handoff && !handed_off => {
                    handed_off = true;
                    ctx.handoff(Handoff {
                        reason: h.reason.unwrap_or_else(|| "requested".into()),
                        summary: h.summary,
                        userdata: h.userdata,
                        error: None,
                    });
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "custom webhook item ignored"),
            }
        }
    }
    Ok(handed_off)
}

impl WebhookBot {
    async fn ask(&mut self, ctx: &mut BotContext, sender: &str, text: &str) {
        let body = json!({
            "sender": sender,
            "message": text,
            "metadata": {
                "interaction_id": ctx.interaction_id(),
                "instance_id": ctx.instance_id(),
                "bot_name": ctx.bot_name(),
                "nickname": ctx.nickname(),
                "parameters": self.parameters,
                "userdata": self.userdata,
            }
        });
        // Serialized once, posted as many times as the retries need.
        let body = bytes::Bytes::from(body.to_string());
        let endpoint = self.endpoint.clone();
        let client = endpoint.client.clone();
        let key = ctx.input_id();
        let answer = endpoint
            .policy
            .run(|timeout| {
                let request = client
                    .post(endpoint.url.clone())
                    .headers(endpoint.headers.clone())
                    .header("Idempotency-Key", key.as_str());
                let body = body.clone();
                async move { connector::post_json(request, body, timeout).await }
            })
            .await;
        let outcome = match answer {
            Ok((_, bytes)) => act_on(ctx, &bytes, &mut self.choices),
            Err((error, attempts)) => Err(format!(
                "webhook endpoint {} failed after {attempts} attempt{}: {error}",
                endpoint.name,
                if attempts == 1 { "" } else { "s" }
            )),
        };
        match outcome {
            Ok(handed_off) => self.done = handed_off,
            Err(error) => {
                connector::give_up(
                    ctx,
                    &endpoint.unavailable_notice,
                    &endpoint.handoff_userdata,
                    error,
                );
                self.done = true;
            }
        }
    }
}

impl Bot for WebhookBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            if self.done {
                return Ok(());
            }
            match input {
                BotInput::Start(start) => {
                    self.parameters = start.parameters;
                    self.userdata = connector::restored_userdata(start.restored.as_deref())
                        .unwrap_or(start.userdata);
                    // The customer's question from before the bot joined gets its answer (a
                    // restored bot has no history).
                    if let Some((sender, text)) = connector::unanswered(&start.history) {
                        self.ask(ctx, &sender, &text).await;
                    }
                }
                BotInput::Event(e) if e.kind == EventKind::Userdata => {
                    connector::track_userdata(ctx, &mut self.userdata, e.userdata)
                }
                BotInput::Event(e)
                    if e.kind == EventKind::Message
                        && e.participant_type == ParticipantType::Customer =>
                {
                    // A number typed after a numbered list of choices is that choice.
                    let text = e.text.unwrap_or_default();
                    let text = self.choices.answer(&text).unwrap_or(text);
                    self.ask(ctx, &e.participant_id, &text).await;
                }
                _ => {}
            }
            Ok(())
        })
    }
}

/// Assert helpers for the answer mapping.
#[cfg(test)]
mod tests {
    use super::*;
    use bgs_actors::bot::BotAction;

    fn ctx() -> BotContext {
        let key = bgs_proto::bot::BotKey {
            interaction_id: "s".into(),
            bot_id: "webhook".into(),
            bot_name: "faq".into(),
        };
        BotContext::new(
            std::sync::Arc::new(bgs_proto::bot::BotSpec::new(key, "faq")),
            "i".into(),
        )
    }

    #[test]
    fn answers_become_posts_buttons_and_a_handoff() {
        let mut c = ctx();
        let answer = br#"[
            {"recipient_id": "c1", "text": "Hello"},
            {"text": "Pick one", "buttons": [{"title": "Billing", "payload": "/billing"}, {"title": "Other"}]},
            {"image": "https://example.com/a.png"},
            {"custom": {"handoff": true, "summary": "wants a refund", "userdata": {"RouteTo": "billing"}}}
        ]"#;
        assert_eq!(act_on(&mut c, answer, &mut Choices::default()), Ok(true));
        let actions = c.take_actions();
        assert_eq!(actions.len(), 4);
        match &actions[0] {
            BotAction::Post { text, rich, .. } => {
                assert_eq!(text, "Hello");
                assert!(rich.is_none());
            }
            other => panic!("{other:?}"),
        }
        match &actions[1] {
            BotAction::Post { text, rich, .. } => {
                assert_eq!(text, "Pick one\n1. Billing\n2. Other");
                let rich = rich.as_ref().unwrap();
                assert_eq!(rich.buttons[1].payload, "Other");
            }
            other => panic!("{other:?}"),
        }
        match &actions[3] {
            BotAction::Handoff(h) => {
                assert_eq!(h.summary, "wants a refund");
                assert_eq!(h.reason, "requested");
                assert_eq!(h.userdata["RouteTo"], "billing");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_garbage_answer_is_an_error() {
        let mut c = ctx();
        assert!(act_on(&mut c, b"<html>", &mut Choices::default()).is_err());
        assert!(act_on(
            &mut c,
            br#"{"text": "not a list"}"#,
            &mut Choices::default()
        )
        .is_err());
        assert_eq!(act_on(&mut c, b"[]", &mut Choices::default()), Ok(false));
    }

    #[test]
    fn endpoints_are_checked_at_load() {
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "faq".to_string(),
            WebhookEndpoint {
                url: "ftp://x".into(),
                timeout_ms: 1000,
                retries: 1,
                headers: BTreeMap::new(),
                follow_redirects: false,
                handoff_userdata: BTreeMap::new(),
                unavailable_notice: String::new(),
            },
        );
        let e = WebhookFactory::load(&endpoints, Duration::from_secs(10))
            .err()
            .unwrap();
        assert!(e.starts_with("plugins.webhook.endpoints.faq.url:"), "{e}");
    }
}
