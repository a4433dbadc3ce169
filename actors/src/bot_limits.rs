//! What every bot is held to, whatever its kind (built in, webhook, Bot Framework, process): how
//! many posts one input may make, how many chat events a minute it may cause, and how a post
//! too large for the chat is cut to fit. Pure functions and a small state; the BotActor carries
//! the effects out (docs/PLUGINS.md section 9, docs/CONFIG.md `[bots]`).

use std::sync::OnceLock;
use std::time::Instant;

use bgs_proto::chat::{RichContent, MAX_RICH_ITEMS};

/// Longest text of one post (bytes): the reference Chat Server's default `--max-text`. A longer
/// text is split into parts of at most this size.
pub const MAX_POST: usize = 16 * 1024;
/// Most parts one post is split into; what is beyond them is cut, with [`CUT_MARKER`].
pub(crate) const MAX_PARTS: usize = 4;
/// Ends the last part of a post that was cut.
pub(crate) const CUT_MARKER: &str = " [… message cut]";
/// The notice the customer gets when posts of one input were not shown.
pub(crate) const POSTS_CUT_NOTICE: &str = "(Some of the assistant's messages were not shown.)";
/// The notice the customer gets when a bot is stopped for posting too much.
pub const STOPPED_NOTICE: &str =
    "Sorry, our assistant ran into a problem. Let me find a person who can help you.";

/// The hand-off of a bot stopped for posting too much (`error` says how): reason `bot_limit`,
/// given with [`STOPPED_NOTICE`] to the customer. Logged and counted here
/// (`bgs_bot_limits_total{limit="events_per_minute"}`), whatever noticed it.
pub fn limit_handoff(error: String) -> crate::bot::Handoff {
    tracing::warn!(%error, "bot stopped: it posts too much");
    crate::metrics::metrics()
        .bot_limits
        .inc(["events_per_minute"]);
    crate::bot::Handoff {
        reason: "bot_limit".into(),
        summary: String::new(),
        userdata: Default::default(),
        error: Some(error),
    }
}

/// The node's limits (`[bots] max-posts-per-input`, `max-events-per-minute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BotLimits {
    /// Messages and notices one input may post (typing indications are not counted); beyond
    /// it they are not posted, and the customer gets [`POSTS_CUT_NOTICE`] once.
    pub posts_per_input: usize,
    /// Chat events (posts of every kind, userdata changes) one bot may cause in a minute, with
    /// bursts up to the same number; beyond it the bot is stopped with a hand-off.
    pub events_per_minute: u32,
}

impl Default for BotLimits {
    fn default() -> Self {
        BotLimits {
            posts_per_input: 20,
            events_per_minute: 120,
        }
    }
}

static LIMITS: OnceLock<BotLimits> = OnceLock::new();

/// Sets the node's limits, once, at start-up (later calls are ignored).
pub fn set_limits(limits: BotLimits) {
    let _ = LIMITS.set(limits);
}

/// The node's limits (the defaults until [`set_limits`]).
pub fn limits() -> BotLimits {
    LIMITS.get().copied().unwrap_or_default()
}

/// A bot's allowance of chat events: a bucket of `per_minute` tokens, refilled every second.
/// Eight bytes: every bot has one.
#[derive(Debug, Default)]
pub(crate) struct Allowance {
    used: f32,
    /// When it was last taken from, in seconds of [`clock`].
    last: u32,
}

/// Seconds since the first call in this process (a bot's allowance keeps four bytes of time).
pub fn clock(now: Instant) -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| now);
    now.saturating_duration_since(start).as_secs() as u32
}

impl Allowance {
    /// Takes one event's token at `now` (seconds of [`clock`]); false when the bucket is empty.
    pub(crate) fn take(&mut self, per_minute: u32, now: u32) -> bool {
        let capacity = per_minute.max(1) as f32;
        let refill = now.saturating_sub(self.last) as f32 * capacity / 60.0;
        self.used = (self.used - refill).max(0.0);
        self.last = now;
        if self.used + 1.0 > capacity {
            return false;
        }
        self.used += 1.0;
        true
    }
}

/// What [`fit_post`] had to change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fitted {
    /// The text was split into more than one part.
    pub split: bool,
    /// Text beyond [`MAX_PARTS`] parts was cut.
    pub cut: bool,
    /// Buttons or cards beyond [`MAX_RICH_ITEMS`], or rich content too large, were left out
    /// (the text fallback still lists every choice).
    pub rich_trimmed: bool,
}

/// Fits one post to the chat: the text in parts of at most `max` bytes (split at a line break or
/// a space where there is one, always at a character boundary), at most [`MAX_PARTS`] of them,
/// the last one ending in [`CUT_MARKER`] when text was left out; rich content with at most
/// [`MAX_RICH_ITEMS`] items and `max` bytes of text, attached to the last part.
pub(crate) fn fit_post(
    text: String,
    rich: Option<RichContent>,
    max: usize,
) -> (Vec<(String, Option<RichContent>)>, Fitted) {
    let mut fitted = Fitted::default();
    let rich = rich.and_then(|r| {
        let r = trim_rich(r, &mut fitted);
        if r.text_len() > max {
            fitted.rich_trimmed = true;
            None
        } else {
            Some(r)
        }
    });
    let max = max.max(CUT_MARKER.len() + 4);
    let mut parts = Vec::new();
    let mut rest = text.as_str();
    while rest.len() > max {
        if parts.len() + 1 == MAX_PARTS {
            let end = floor_char(rest, max - CUT_MARKER.len());
            parts.push(format!("{}{CUT_MARKER}", &rest[..end]));
            fitted.cut = true;
            rest = "";
            break;
        }
        let hard = floor_char(rest, max);
        let end = rest[..hard]
            .rfind('\n')
            .or_else(|| rest[..hard].rfind(' '))
            .filter(|&i| i > max / 2)
            .map(|i| i + 1)
            .unwrap_or(hard);
        parts.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_string());
    }
    fitted.split = parts.len() > 1;
    let last = parts.len() - 1;
    let out = parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, if i == last { rich.clone() } else { None }))
        .collect();
    (out, fitted)
}

/// The largest index `<= at` that is a character boundary of `s`.
fn floor_char(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Keeps the first cards and buttons up to [`MAX_RICH_ITEMS`] items (a card counts one, and one
/// for each of its buttons).
fn trim_rich(mut rich: RichContent, fitted: &mut Fitted) -> RichContent {
    if rich.items() <= MAX_RICH_ITEMS {
        return rich;
    }
    fitted.rich_trimmed = true;
    let mut room = MAX_RICH_ITEMS;
    let mut cards = Vec::new();
    for mut card in std::mem::take(&mut rich.cards) {
        if room == 0 {
            break;
        }
        room -= 1;
        card.buttons.truncate(room);
        room -= card.buttons.len();
        cards.push(card);
    }
    rich.cards = cards;
    rich.buttons.truncate(room);
    rich
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgs_proto::chat::{Button, Card};
    use std::time::Duration;

    fn button(n: usize) -> Button {
        Button {
            title: format!("b{n}"),
            payload: format!("p{n}"),
        }
    }

    #[test]
    fn a_short_post_is_left_alone() {
        let (parts, fitted) = fit_post("hello".into(), None, 16);
        assert_eq!(parts, vec![("hello".to_string(), None)]);
        assert_eq!(fitted, Fitted::default());
        let (parts, _) = fit_post(String::new(), None, 16);
        assert_eq!(parts, vec![(String::new(), None)]);
    }

    #[test]
    fn a_long_post_is_split_at_spaces_and_cut_past_the_last_part() {
        let text = "word ".repeat(10); // 50 bytes
        let (parts, fitted) = fit_post(text.clone(), None, 24);
        assert!(fitted.split && !fitted.cut);
        assert!(parts.iter().all(|(p, _)| p.len() <= 24), "{parts:?}");
        assert_eq!(
            parts.iter().map(|(p, _)| p.as_str()).collect::<String>(),
            text
        );
        assert!(parts[0].0.ends_with(' '), "split after a space: {parts:?}");

        let long = "x".repeat(200);
        let (parts, fitted) = fit_post(long, None, 24);
        assert!(fitted.cut);
        assert_eq!(parts.len(), MAX_PARTS);
        assert!(parts[MAX_PARTS - 1].0.ends_with(CUT_MARKER));
        assert!(parts.iter().all(|(p, _)| p.len() <= 24));
    }

    #[test]
    fn a_split_never_breaks_a_character() {
        let text = "é".repeat(40); // 80 bytes, 2 each
        let (parts, _) = fit_post(text, None, 25);
        for (p, _) in &parts {
            assert!(p.len() <= 25);
        }
        assert_eq!(
            parts.iter().map(|(p, _)| p.chars().count()).sum::<usize>(),
            40
        );
    }

    #[test]
    fn too_many_buttons_keep_the_first_32_on_the_last_part() {
        let rich = RichContent {
            buttons: (0..40).map(button).collect(),
            cards: Vec::new(),
        };
        let (parts, fitted) = fit_post("pick".into(), Some(rich), 16 * 1024);
        assert!(fitted.rich_trimmed);
        let rich = parts[0].1.as_ref().unwrap();
        assert_eq!(rich.buttons.len(), MAX_RICH_ITEMS);
        assert_eq!(rich.buttons[0], button(0));

        let rich = RichContent {
            buttons: vec![button(99)],
            cards: (0..3)
                .map(|_| Card {
                    title: "c".into(),
                    buttons: (0..20).map(button).collect(),
                    ..Card::default()
                })
                .collect(),
        };
        let (parts, _) = fit_post("x".repeat(300), Some(rich), 200);
        assert!(parts[0].1.is_none(), "rich content on the last part only");
        let rich = parts.last().unwrap().1.as_ref().unwrap();
        assert!(rich.items() <= MAX_RICH_ITEMS, "{}", rich.items());
        assert_eq!(rich.cards.len(), 2);
        assert!(rich.buttons.is_empty());
    }

    #[test]
    fn rich_content_larger_than_the_text_limit_is_left_out() {
        let rich = RichContent {
            buttons: vec![Button {
                title: "t".repeat(40),
                payload: String::new(),
            }],
            cards: Vec::new(),
        };
        let (parts, fitted) = fit_post("hi".into(), Some(rich), 24);
        assert!(fitted.rich_trimmed);
        assert_eq!(parts, vec![("hi".to_string(), None)]);
    }

    #[test]
    fn the_allowance_refills_over_a_minute() {
        let t0 = 1000;
        let mut a = Allowance::default();
        assert!(a.take(60, t0));
        for _ in 1..60 {
            assert!(a.take(60, t0));
        }
        assert!(!a.take(60, t0), "the bucket is empty");
        assert!(a.take(60, t0 + 1), "one a second");
        assert!(!a.take(60, t0 + 1));
        let later = t0 + 120;
        for _ in 0..60 {
            assert!(a.take(60, later));
        }
        assert!(!a.take(60, later));
        assert_eq!(std::mem::size_of::<Allowance>(), 8);
        let now = Instant::now();
        let first = clock(now);
        assert_eq!(clock(now + Duration::from_secs(5)) - first, 5);
    }
}
