//! What the connector plugins (webhook, Bot Framework) share: one HTTP client, a POST of JSON
//! with a time limit and a bounded answer, retries with back-off inside a time budget, and the
//! "give up and hand over" a dead external bot ends with.

use std::time::Duration;

use std::collections::BTreeMap;

use bgs_actors::bot::{BotContext, BotError, Handoff};
use bgs_actors::metrics::metrics;
use bgs_proto::chat::UserdataChanges;
use bgs_proto::esp::KeyValues;
use tokio::time::Instant;

/// Largest answer body read from an external bot; a larger one is an error.
pub const MAX_ANSWER: usize = 1 << 20;
/// First pause between two attempts; it doubles each time, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The HTTP client every connector bot of a node shares (one connection pool). It follows no
/// redirect: a redirect would re-send the customer's message and the configured headers to
/// an address nobody configured, and post that address's answer as the bot.
pub fn client() -> Result<reqwest::Client, String> {
    builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A client for an endpoint that opted in to redirects: it follows at most five, each to the
/// same origin (scheme, host and port) as the request it answers, never elsewhere.
pub fn client_following_same_origin() -> Result<reqwest::Client, String> {
    builder()
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same = attempt
                .previous()
                .last()
                .is_some_and(|from| from.origin() == attempt.url().origin());
            if attempt.previous().len() > 5 {
                attempt.error("more than 5 redirects")
            } else if same {
                attempt.follow()
            } else {
                attempt.stop()
            }
        }))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("bgs/", env!("CARGO_PKG_VERSION")))
}

/// Why one attempt failed, and whether another attempt may help.
#[derive(Debug)]
pub enum AttemptError {
    /// A connection error, a timeout, a 5xx or a 429: worth another attempt.
    Retry(String),
    /// A 4xx or an answer that makes no sense: another attempt would get the same.
    Fatal(String),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Retry(e) | AttemptError::Fatal(e) => f.write_str(e),
        }
    }
}

/// POSTs `body` as JSON and reads the answer (at most [`MAX_ANSWER`] bytes), all within
/// `timeout`. A status that is not 2xx is an error; a 5xx or 429 may be retried.
pub async fn post_json(
    request: reqwest::RequestBuilder,
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), AttemptError> {
    let attempt = async {
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| AttemptError::Retry(describe(&e)))?;
        let status = response.status();
        let response_location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(200).collect::<String>());
        let bytes = read_bounded(response).await?;
        if status.is_success() {
            Ok((status.as_u16(), bytes))
        } else if status.is_redirection() {
            let to = response_location.unwrap_or_default();
            Err(AttemptError::Fatal(format!(
                "answered HTTP {} (a redirect to {to:?}, not followed: redirects are followed only where configured, and only to the same origin)",
                status.as_u16()
            )))
        } else if status.is_server_error() || status.as_u16() == 429 {
            Err(AttemptError::Retry(format!(
                "answered HTTP {}",
                status.as_u16()
            )))
        } else {
            Err(AttemptError::Fatal(format!(
                "answered HTTP {}",
                status.as_u16()
            )))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(AttemptError::Retry(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, AttemptError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(AttemptError::Fatal(format!(
            "answer larger than {MAX_ANSWER} bytes"
        )));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| AttemptError::Retry(describe(&e)))?
    {
        if bytes.len() + chunk.len() > MAX_ANSWER {
            return Err(AttemptError::Fatal(format!(
                "answer larger than {MAX_ANSWER} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// A reqwest error in one line, with its cause (reqwest's own text hides "connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    if !last.is_empty() {
        text.push_str(": ");
        text.push_str(&last);
    }
    text
}

/// How many attempts, how long each, and the time all of them must fit in; and whom they are
/// counted for (`bgs_external_requests_total{plugin, endpoint, result}`).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub plugin: &'static str,
    pub endpoint: String,
    pub attempts: u32,
    pub per_attempt: Duration,
    /// All attempts and pauses end within this (the bot's handling time, less a margin).
    pub budget: Duration,
}

impl RetryPolicy {
    /// The budget a node's handling timeout leaves a connector: a margin of a tenth (at least
    /// 200 ms) for carrying out what the bot does when it gives up.
    pub fn budget_for(handling_timeout: Duration) -> Duration {
        let margin = (handling_timeout / 10).max(Duration::from_millis(200));
        handling_timeout.saturating_sub(margin)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts or the budget run out.
    /// Returns the last error and the number of attempts made.
    pub async fn run<T, F, Fut>(&self, mut attempt: F) -> Result<T, (String, u32)>
    where
        F: FnMut(Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, AttemptError>>,
    {
        let deadline = Instant::now() + self.budget;
        let mut backoff = FIRST_BACKOFF;
        let mut made = 0;
        let mut last = String::from("no attempt fitted in the time budget");
        let count = |result: &str| {
            metrics()
                .external_requests
                .inc(&[self.plugin, &self.endpoint, result]);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(20) {
                count("failed");
                break;
            }
            made += 1;
            match attempt(self.per_attempt.min(left)).await {
                Ok(value) => {
                    count("ok");
                    return Ok(value);
                }
                Err(AttemptError::Fatal(e)) => {
                    count("failed");
                    return Err((e, made));
                }
                Err(AttemptError::Retry(e)) => {
                    tracing::info!(attempt = made, error = %e, "external bot attempt failed");
                    last = e;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if made >= self.attempts || left < Duration::from_millis(20) {
                count("failed");
                break;
            }
            count("retry");
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Err((last, made))
    }
}

/// An `http://` or `https://` URL from the configuration; the error names `key`.
pub fn http_url(key: &str, url: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| format!("{key}: {url:?} is not an http(s) URL"))
}

/// The configured entry a StartBot's `ChatBotName` names (`what`: "webhook endpoint"), or a
/// refusal that lists the known names (`table`: where they are configured).
pub fn named<'a, T>(
    entries: &'a BTreeMap<String, T>,
    name: &str,
    what: &str,
    table: &str,
) -> Result<&'a T, BotError> {
    entries.get(name).ok_or_else(|| {
        let known: Vec<&str> = entries.keys().map(String::as_str).collect();
        BotError::new(if known.is_empty() {
            format!("no {what} is configured ([{table}.NAME])")
        } else {
            format!(
                "ChatBotName {name:?} names no {what} (known: {})",
                known.join(", ")
            )
        })
    })
}

/// Keeps a bot's copy of the interaction's userdata up to date with a `userdata` event, and
/// saves the copy: a take-over gives the bot only what comes after its last turn, so the
/// userdata it had seen must come back from its saved context ([`restored_userdata`]).
pub fn track_userdata(
    ctx: &mut BotContext,
    userdata: &mut KeyValues,
    changes: Option<UserdataChanges>,
) {
    let mut changed = false;
    for (k, v) in changes.unwrap_or_default() {
        changed |= match v {
            Some(v) => userdata.insert(k, v.clone()).as_ref() != Some(&v),
            None => userdata.remove(&k).is_some(),
        };
    }
    if changed {
        save_userdata(ctx, userdata);
    }
}

/// The choices of a bot's last message with buttons, in the order its text fallback numbers them
/// ("1. Yes"): a customer who types the number (`2`, `2.`) means that choice. Kept until the
/// customer's next message, whatever it is.
#[derive(Debug, Default)]
pub struct Choices(Vec<String>);

impl Choices {
    /// A message with these buttons was posted.
    pub fn offer(&mut self, rich: &bgs_proto::chat::RichContent) {
        if !rich.is_empty() {
            self.0 = rich.all_buttons().map(|b| b.payload.clone()).collect();
        }
    }

    /// The customer wrote `text`: the payload of the choice it numbers, if it is one of them.
    pub fn answer(&mut self, text: &str) -> Option<String> {
        let choices = std::mem::take(&mut self.0);
        let n: usize = text.trim().trim_end_matches(['.', ')']).parse().ok()?;
        choices.get(n.checked_sub(1)?).cloned()
    }
}

/// Saves a connector bot's context: the interaction's userdata as it knows it (a JSON object).
pub fn save_userdata(ctx: &mut BotContext, userdata: &KeyValues) {
    match serde_json::to_vec(&serde_json::json!({ "userdata": userdata })) {
        Ok(bytes) => ctx.save_context(bytes),
        Err(e) => tracing::warn!(error = %e, "connector context not saved"),
    }
}

/// The userdata a connector bot saved ([`save_userdata`]); `None` for a context of another
/// shape (an older release saved a marker only): the bot then keeps StartBot's userdata.
pub fn restored_userdata(restored: Option<&[u8]>) -> Option<KeyValues> {
    #[derive(serde::Deserialize)]
    struct Saved {
        userdata: KeyValues,
    }
    serde_json::from_slice::<Saved>(restored?)
        .ok()
        .map(|s| s.userdata)
}

/// The customer's message that was waiting for an answer when the bot joined: the last message
/// of the history if a customer wrote it (a workflow that starts a bot after the customer's
/// first message wants that message answered). Its sender and text.
pub fn unanswered(history: &[bgs_proto::chat::ChatEvent]) -> Option<(String, String)> {
    use bgs_proto::chat::{EventKind, ParticipantType};
    let last = history
        .iter()
        .rev()
        .find(|e| matches!(e.kind, EventKind::Message | EventKind::Notice))?;
    (last.kind == EventKind::Message && last.participant_type == ParticipantType::Customer).then(
        || {
            (
                last.participant_id.clone(),
                last.text.clone().unwrap_or_default(),
            )
        },
    )
}

/// What a connector bot does when its external bot cannot be reached: tells the customer,
/// and hands over with the configured userdata (reason `bot_unavailable`, the error reported).
pub fn give_up(
    ctx: &mut BotContext,
    notice: &str,
    userdata: &BTreeMap<String, String>,
    error: String,
) {
    tracing::warn!(%error, "external bot unavailable; handing the customer over");
    if !notice.is_empty() {
        ctx.notice(notice.to_string());
    }
    ctx.handoff(Handoff {
        reason: "bot_unavailable".into(),
        summary: String::new(),
        userdata: userdata.clone(),
        error: Some(error),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_fit_in_the_budget_and_stop_on_a_fatal_error() {
        let policy = RetryPolicy {
            plugin: "test",
            endpoint: "e".into(),
            attempts: 10,
            per_attempt: Duration::from_secs(1),
            budget: Duration::from_millis(2500),
        };
        let started = Instant::now();
        let mut tries = 0;
        let result: Result<(), _> = policy
            .run(|t| {
                tries += 1;
                async move {
                    tokio::time::sleep(t).await;
                    Err(AttemptError::Retry("slow".into()))
                }
            })
            .await;
        let (error, made) = result.unwrap_err();
        assert_eq!(error, "slow");
        assert_eq!(made, tries);
        assert!(started.elapsed() <= Duration::from_millis(2500));
        assert!(made >= 2, "made {made}");

        let mut tries = 0;
        let result: Result<(), _> = policy
            .run(|_| {
                tries += 1;
                async { Err(AttemptError::Fatal("HTTP 404".into())) }
            })
            .await;
        assert_eq!(result.unwrap_err(), ("HTTP 404".to_string(), 1));

        let mut tries = 0;
        let result = policy
            .run(|_| {
                tries += 1;
                let n = tries;
                async move {
                    if n < 3 {
                        Err(AttemptError::Retry("503".into()))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[test]
    fn only_a_customer_message_left_unanswered_is_taken_from_the_history() {
        use bgs_proto::chat::{ChatEvent, EventKind, ParticipantType};
        let event = |seq, kind, who: ParticipantType, text: &str| ChatEvent {
            text: Some(text.into()),
            ..ChatEvent::new(seq, kind, format!("p{seq}"), who)
        };
        use ParticipantType::{Agent, Customer};
        let asked = vec![
            event(1, EventKind::Joined, Customer, ""),
            event(2, EventKind::Message, Customer, "hi"),
            event(3, EventKind::Message, Agent, "hello"),
            event(4, EventKind::Message, Customer, "my bill?"),
            event(5, EventKind::Typing, Agent, ""),
        ];
        assert_eq!(unanswered(&asked), Some(("p4".into(), "my bill?".into())));
        assert_eq!(unanswered(&asked[..3]), None, "an agent answered");
        assert_eq!(unanswered(&[]), None);
    }

    #[test]
    fn budget_keeps_a_margin() {
        assert_eq!(
            RetryPolicy::budget_for(Duration::from_secs(10)),
            Duration::from_secs(9)
        );
        assert_eq!(
            RetryPolicy::budget_for(Duration::from_secs(1)),
            Duration::from_millis(800)
        );
    }
}
