//! When a chat event ends a bot (SPEC section 3, docs/ESP.md section 12): a pure function of the
//! bot's view of who is present and the event, tested on a table of cases.

use bgs_proto::chat::{AfterAction, ChatEvent, EventKind, ParticipantType, Style};

use crate::bot::StopReason;

/// Who a bot sees in the session (from its own feed). A chat has a handful of participants, so
/// a vector searched in order (a hash map's smallest table holds four).
#[derive(Debug, Default)]
pub(super) struct Roster {
    /// Who is present, by a 64-bit fingerprint of the participant id (16 bytes a participant,
    /// no copy of the id: a session has a handful, so a collision is about 2^-60 likely).
    present: Vec<(u64, ParticipantType, Style)>,
}

use crate::fingerprint;

impl Roster {
    pub(super) fn apply(&mut self, e: &ChatEvent) {
        let id = fingerprint(&e.participant_id);
        match e.kind {
            EventKind::Joined => match self.present.iter_mut().find(|p| p.0 == id) {
                Some(p) => (p.1, p.2) = (e.participant_type, e.style),
                None => {
                    // Grown one at a time: most sessions have two participants.
                    self.present.reserve_exact(1);
                    self.present.push((id, e.participant_type, e.style));
                }
            },
            EventKind::Left => self.present.retain(|p| p.0 != id),
            EventKind::Closed => self.present = Vec::new(),
            _ => {}
        }
    }

    /// Whether the participant is present (as far as the bot has seen).
    pub(super) fn has(&self, participant_id: &str) -> bool {
        let id = fingerprint(participant_id);
        self.present.iter().any(|p| p.0 == id)
    }

    fn has_human_agent(&self) -> bool {
        self.present
            .iter()
            .any(|(_, t, s)| *t == ParticipantType::Agent && *s != Style::Bot)
    }

    /// Anyone left who is not a bot, the system or an external user?
    fn has_people(&self) -> bool {
        self.present.iter().any(|(_, t, s)| {
            *s != Style::Bot && !matches!(t, ParticipantType::System | ParticipantType::External)
        })
    }
}

/// The StartBot choices that the end conditions depend on.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EndOptions {
    pub stop_on_agent_arrival: bool,
    pub stop_on_customer_left: bool,
}

/// Why the event `e`, seen by the bot whose participant is `bot` after its join, ends the bot;
/// `roster` is the bot's view after the event. `None`: the bot goes on.
///
/// A leave that will close the session (`force-close`, or `close-if-no-agents` with no human
/// agent left) does not end the bot by itself: the session's `closed` event does.
pub(super) fn end_reason(
    bot: &str,
    options: EndOptions,
    roster: &Roster,
    e: &ChatEvent,
) -> Option<StopReason> {
    let human_agent = e.participant_type == ParticipantType::Agent && e.style != Style::Bot;
    let closes = e.kind == EventKind::Left
        && match e.after_action {
            Some(AfterAction::ForceClose) => true,
            Some(AfterAction::CloseIfNoAgents) => !roster.has_human_agent(),
            _ => false,
        };
    match e.kind {
        EventKind::Closed => Some(StopReason::SessionClosed),
        EventKind::Left if e.participant_id == bot => Some(StopReason::RemovedByChatServer),
        EventKind::Left if closes => None,
        EventKind::Joined if human_agent && options.stop_on_agent_arrival => {
            Some(StopReason::AgentArrived)
        }
        EventKind::Left
            if e.participant_type == ParticipantType::Customer && options.stop_on_customer_left =>
        {
            Some(StopReason::CustomerLeft)
        }
        EventKind::Left if !roster.has_people() => Some(StopReason::ParticipantsLeft),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ParticipantType::{Agent, Customer, External, Supervisor, System};

    fn event(kind: EventKind, who: &str, t: ParticipantType, style: Style) -> ChatEvent {
        ChatEvent {
            style,
            after_action: (kind == EventKind::Left).then_some(AfterAction::KeepAlive),
            ..ChatEvent::new(1, kind, who, t)
        }
    }

    fn joined(who: &str, t: ParticipantType, style: Style) -> ChatEvent {
        event(EventKind::Joined, who, t, style)
    }

    fn left(who: &str, t: ParticipantType, after: AfterAction) -> ChatEvent {
        let mut e = event(EventKind::Left, who, t, Style::Regular);
        e.after_action = Some(after);
        e
    }

    /// (case, who joined before, options, the event, the reason it should give)
    type Case = (
        &'static str,
        Vec<ChatEvent>,
        EndOptions,
        ChatEvent,
        Option<StopReason>,
    );

    #[test]
    fn the_end_conditions_on_a_table_of_cases() {
        use AfterAction::{CloseIfNoAgents, ForceClose, KeepAlive};
        use StopReason::*;
        let none = EndOptions::default();
        let both = EndOptions {
            stop_on_agent_arrival: true,
            stop_on_customer_left: true,
        };
        let closed = event(EventKind::Closed, "system", System, Style::Regular);
        let message = event(EventKind::Message, "c", Customer, Style::Regular);
        let cases: Vec<Case> = vec![
            (
                "a message ends nothing",
                vec![],
                none,
                message.clone(),
                None,
            ),
            (
                "the session closed",
                vec![],
                none,
                closed,
                Some(SessionClosed),
            ),
            (
                "the bot's own leave, not asked for",
                vec![],
                none,
                left("bot", Agent, KeepAlive),
                Some(RemovedByChatServer),
            ),
            (
                "an agent joins, with StopBotOnAgentArrival",
                vec![],
                both,
                joined("a", Agent, Style::Regular),
                Some(AgentArrived),
            ),
            (
                "an agent joins, without it",
                vec![],
                none,
                joined("a", Agent, Style::Regular),
                None,
            ),
            (
                "another bot joins: not an agent arrival",
                vec![],
                both,
                joined("b2", Agent, Style::Bot),
                None,
            ),
            (
                "a supervisor joins: not an agent arrival",
                vec![],
                both,
                joined("s", Supervisor, Style::Regular),
                None,
            ),
            (
                "the customer leaves, with StopBotOnCustomerLeft",
                vec![joined("a", Agent, Style::Regular)],
                both,
                left("c", Customer, KeepAlive),
                Some(CustomerLeft),
            ),
            (
                "the customer leaves, an agent stays, without it",
                vec![joined("a", Agent, Style::Regular)],
                none,
                left("c", Customer, KeepAlive),
                None,
            ),
            (
                "the last person leaves",
                vec![joined("x", External, Style::Regular)],
                none,
                left("c", Customer, KeepAlive),
                Some(ParticipantsLeft),
            ),
            (
                "a force-close leave waits for the closed event",
                vec![],
                both,
                left("c", Customer, ForceClose),
                None,
            ),
            (
                "close-if-no-agents with no agent: waits for closed",
                vec![],
                both,
                left("c", Customer, CloseIfNoAgents),
                None,
            ),
            (
                "close-if-no-agents with an agent: the customer left",
                vec![joined("a", Agent, Style::Regular)],
                both,
                left("c", Customer, CloseIfNoAgents),
                Some(CustomerLeft),
            ),
            (
                "an agent leaves, the customer stays",
                vec![joined("a", Agent, Style::Regular)],
                both,
                left("a", Agent, KeepAlive),
                None,
            ),
        ];
        for (case, before, options, e, want) in cases {
            let mut roster = Roster::default();
            roster.apply(&joined("c", Customer, Style::Regular));
            roster.apply(&joined("bot", Agent, Style::Bot));
            for b in &before {
                roster.apply(b);
            }
            roster.apply(&e);
            assert_eq!(end_reason("bot", options, &roster, &e), want, "{case}");
        }
    }
}
