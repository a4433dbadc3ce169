//! Stand-ins the actors' in-process tests share.

use actix::prelude::*;
use bgs_proto::chat::{
    AfterAction, ChatEvent, ChatRequest, ChatResponse, EventKind, ParticipantType, Style,
};
use tokio::sync::mpsc;

use crate::chat_link::{
    ChatCall, ChatCallError, ChatCallLater, CountedFeed, Feed, Follow, Follower, ParticipantEvents,
    ParticipantJoined, Unfollow,
};

/// Answers a Join with participant `bot-1` at seq 3: tells the follower it joined and
/// replays events 1 to 3 to it; answers posts, leaves and userdata; reports every request.
pub(crate) struct FakeChat {
    pub(crate) seen: mpsc::UnboundedSender<ChatRequest>,
    pub(crate) follower: mpsc::UnboundedSender<Follower>,
}

impl Actor for FakeChat {
    type Context = Context<Self>;
}

impl Handler<ChatCall> for FakeChat {
    type Result = Result<ChatResponse, ChatCallError>;

    fn handle(&mut self, msg: ChatCall, _ctx: &mut Context<Self>) -> Self::Result {
        let answer = match &msg.request {
            ChatRequest::Join(j) => {
                if let Some(Follow { to: f, token }) = msg.follow.clone() {
                    // As the ChatLink does: the join first, then the replay.
                    f.do_send(CountedFeed::from(Feed::Joined(ParticipantJoined {
                        token,
                        session_id: j.session_id.clone(),
                        participant_id: "bot-1".into(),
                        seq: 3,
                    })));
                    f.do_send(CountedFeed::from(Feed::Events(ParticipantEvents {
                        session_id: j.session_id.clone(),
                        participant_id: "bot-1".into(),
                        events: vec![
                            event(1, EventKind::Joined, "ann", ParticipantType::Customer, ""),
                            event(
                                2,
                                EventKind::Message,
                                "ann",
                                ParticipantType::Customer,
                                "hi",
                            ),
                            event(3, EventKind::Joined, "bot-1", ParticipantType::Agent, ""),
                        ],
                    })));
                    let _ = self.follower.send(f);
                }
                ChatResponse::Joined {
                    session_id: j.session_id.clone(),
                    participant_id: "bot-1".into(),
                    seq: 3,
                }
            }
            ChatRequest::Post(_) => ChatResponse::Posted {
                seq: 50,
                duplicate: false,
            },
            ChatRequest::Leave(_) => ChatResponse::Left { seq: 51 },
            _ => ChatResponse::Userdata(Default::default()),
        };
        let _ = self.seen.send(msg.request);
        Ok(answer)
    }
}

impl Handler<ChatCallLater> for FakeChat {
    type Result = ();
    fn handle(&mut self, _: ChatCallLater, _ctx: &mut Context<Self>) {}
}

impl Handler<Unfollow> for FakeChat {
    type Result = ();
    fn handle(&mut self, _: Unfollow, _ctx: &mut Context<Self>) {}
}

/// A chat event as the Chat Server sends it (bots post in bot style; a leave keeps the chat).
pub(crate) fn event(
    seq: u64,
    kind: EventKind,
    who: &str,
    t: ParticipantType,
    text: &str,
) -> ChatEvent {
    ChatEvent {
        style: if who.starts_with("bot") {
            Style::Bot
        } else {
            Style::Regular
        },
        text: (!text.is_empty()).then(|| text.to_string()),
        after_action: (kind == EventKind::Left).then_some(AfterAction::KeepAlive),
        ..ChatEvent::new(seq, kind, who, t)
    }
}
