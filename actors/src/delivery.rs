//! What makes delivery exactly once, named: a [`Cursor`] over a chat feed's event numbers (what
//! is at or before it was handled, so a replay overlap is dropped), an [`InputLabel`] for each
//! input a bot is given, and a [`PostKey`], the client key of each post made for an input (the
//! Chat Server keeps the first post of a key, so an input replayed after a take-over or a
//! reconnect cannot post twice).
//!
//! The labels and keys are a contract between the nodes of a pair (an old primary's post and a
//! new primary's replay of the same input must carry the same key, across versions too) and
//! with external bots, which get `{instance}:{label}` as the idempotency key of an input: their
//! text forms never change.

use std::fmt;

use bgs_proto::chat::ChatEvent;

/// How far a feed was handled: the number of the last event taken. Chat events are numbered
/// from 1 in each session; a cursor at 0 takes everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cursor(u64);

impl Cursor {
    /// A cursor past every event up to `seq` (a join, a checkpoint, a resume's since).
    pub(crate) const fn at(seq: u64) -> Self {
        Cursor(seq)
    }

    pub(crate) const fn seq(self) -> u64 {
        self.0
    }

    /// An event the cursor has not passed yet.
    pub(crate) const fn is_new(self, seq: u64) -> bool {
        seq > self.0
    }

    /// Takes the event `seq` if it is new: true, and the cursor moves past it; false for a replay.
    pub(crate) fn take(&mut self, seq: u64) -> bool {
        let new = self.is_new(seq);
        if new {
            self.0 = seq;
        }
        new
    }

    /// Keeps the new events of a batch (in order), and moves past the whole batch.
    pub(crate) fn take_new(&mut self, mut events: Vec<ChatEvent>) -> Vec<ChatEvent> {
        let last = events.last().map_or(0, |e| e.seq);
        let from = self.0;
        events.retain(|e| e.seq > from);
        self.0 = self.0.max(last);
        events
    }
}

/// Names one input of one bot instance, the same on every node that gives the bot that input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputLabel {
    /// The bot's start, after its join event (`{joined}s`).
    Start { joined_seq: u64 },
    /// A chat event (`{seq}`): replayed after a take-over with the same label.
    Event { seq: u64 },
    /// ESP data, the `n`th of this incarnation of the bot after event `after`
    /// (`{after}d{incarnation:08x}-{n}`): data is not replayed after a take-over, so a new
    /// incarnation makes new labels.
    Data {
        after: u64,
        incarnation: u32,
        n: u64,
    },
    /// A wake-up the bot asked for (`{after}w{incarnation:08x}-{n}`), as data.
    Wake {
        after: u64,
        incarnation: u32,
        n: u64,
    },
    /// The bot's stop (`stop`): once per instance.
    Stop,
}

impl fmt::Display for InputLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InputLabel::Start { joined_seq } => write!(f, "{joined_seq}s"),
            InputLabel::Event { seq } => write!(f, "{seq}"),
            InputLabel::Data {
                after,
                incarnation,
                n,
            } => write!(f, "{after}d{incarnation:08x}-{n}"),
            InputLabel::Wake {
                after,
                incarnation,
                n,
            } => write!(f, "{after}w{incarnation:08x}-{n}"),
            InputLabel::Stop => f.write_str("stop"),
        }
    }
}

impl InputLabel {
    /// The input's id as bots see it (`BotContext::input_id`): `{instance}:{label}`.
    pub fn input_id(self, instance_id: &str) -> String {
        format!("{instance_id}:{self}")
    }
}

/// Which post of an input a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostSlot {
    /// The `index`th action of the input, its `part`th part when it was split to fit
    /// (`{index}`, then `{index}.{part}`).
    Action { index: usize, part: usize },
    /// The notice that the input's posts were cut at the limit (`cut`).
    Cut,
    /// The notice that the bot was stopped at its rate limit (`limit`).
    Limit,
}

/// The client key of one post: `{instance}:{label}:{slot}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PostKey<'a> {
    pub instance_id: &'a str,
    pub label: InputLabel,
    pub slot: PostSlot,
}

impl fmt::Display for PostKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.instance_id, self.label)?;
        match self.slot {
            PostSlot::Action { index, part: 0 } => write!(f, "{index}"),
            PostSlot::Action { index, part } => write!(f, "{index}.{part}"),
            PostSlot::Cut => f.write_str("cut"),
            PostSlot::Limit => f.write_str("limit"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bgs_proto::chat::{EventKind, ParticipantType};

    fn events(seqs: &[u64]) -> Vec<ChatEvent> {
        seqs.iter()
            .map(|s| ChatEvent::new(*s, EventKind::Message, "c", ParticipantType::Customer))
            .collect()
    }

    fn seqs(events: &[ChatEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_cursor_takes_each_event_once_and_drops_a_replay_overlap() {
        let mut c = Cursor::at(3);
        assert!(!c.is_new(3) && c.is_new(4));
        assert_eq!(seqs(&c.take_new(events(&[2, 3, 4, 5]))), [4, 5]);
        assert_eq!(c.seq(), 5);
        // The same batch again (a re-sent feed) brings nothing.
        assert!(c.take_new(events(&[4, 5])).is_empty());
        assert_eq!(c.seq(), 5);
        // A batch the participant may partly not see still moves the cursor to its last.
        assert_eq!(seqs(&c.take_new(events(&[7, 9]))), [7, 9]);
        assert!(c.take_new(Vec::new()).is_empty());
        assert_eq!(c.seq(), 9);
        assert!(!c.take(9) && c.take(10) && !c.take(10));
        assert_eq!(Cursor::default().seq(), 0);
    }

    #[test]
    fn input_labels_and_post_keys_keep_their_text_forms() {
        let data = InputLabel::Data {
            after: 7,
            incarnation: 0xab,
            n: 2,
        };
        let wake = InputLabel::Wake {
            after: 7,
            incarnation: 0xab,
            n: 2,
        };
        let forms = [
            (InputLabel::Start { joined_seq: 3 }, "3s"),
            (InputLabel::Event { seq: 12 }, "12"),
            (data, "7d000000ab-2"),
            (wake, "7w000000ab-2"),
            (InputLabel::Stop, "stop"),
        ];
        for (label, text) in forms {
            assert_eq!(label.to_string(), text);
        }
        assert_eq!(InputLabel::Event { seq: 4 }.input_id("inst"), "inst:4");
        let key = |label, slot| {
            PostKey {
                instance_id: "inst",
                label,
                slot,
            }
            .to_string()
        };
        let ev = InputLabel::Event { seq: 4 };
        assert_eq!(key(ev, PostSlot::Action { index: 0, part: 0 }), "inst:4:0");
        assert_eq!(
            key(ev, PostSlot::Action { index: 2, part: 1 }),
            "inst:4:2.1"
        );
        assert_eq!(key(ev, PostSlot::Cut), "inst:4:cut");
        assert_eq!(key(InputLabel::Stop, PostSlot::Limit), "inst:stop:limit");
    }

    #[test]
    fn different_inputs_never_share_a_label() {
        let mut seen = std::collections::HashSet::new();
        for after in 0..4 {
            for n in 1..4 {
                for incarnation in [1, 2] {
                    let labels = [
                        InputLabel::Start { joined_seq: after },
                        InputLabel::Event { seq: after },
                        InputLabel::Data {
                            after,
                            incarnation,
                            n,
                        },
                        InputLabel::Wake {
                            after,
                            incarnation,
                            n,
                        },
                        InputLabel::Stop,
                    ];
                    for l in labels {
                        seen.insert((l.to_string(), l));
                    }
                }
            }
        }
        let texts: std::collections::HashSet<&String> = seen.iter().map(|(t, _)| t).collect();
        assert_eq!(texts.len(), seen.len(), "two inputs share a label");
    }
}
