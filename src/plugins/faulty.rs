//! The `faulty` diagnostic bot, for trials of failure handling (enable with
//! `[plugins.faulty] enabled = true`). It answers `ok: {text}` to customer messages, except:
//! `panic` makes it panic, `error` makes it return an error, `stall` makes it wait longer than any
//! handling timeout. Each of these stops it with reason `error`; the session goes on.

use std::time::Duration;

use bgs_actors::bot::{Bot, BotContext, BotError, BotFactory, BotInput, CreateBot};
use bgs_proto::chat::{EventKind, ParticipantType};
use futures_util::future::BoxFuture;

pub struct FaultyFactory;

impl BotFactory for FaultyFactory {
    fn bot_id(&self) -> &str {
        "faulty"
    }

    fn create(&self, _request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        Ok(Box::new(FaultyBot))
    }
}

struct FaultyBot;

impl Bot for FaultyBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            if let BotInput::Event(e) = input {
                if e.kind == EventKind::Message && e.participant_type == ParticipantType::Customer {
                    let text = e.text.unwrap_or_default();
                    match text.as_str() {
                        "panic" => panic!("the faulty bot was asked to panic"),
                        "error" => return Err(BotError::new("the faulty bot was asked to fail")),
                        "stall" => tokio::time::sleep(Duration::from_secs(3600)).await,
                        _ => ctx.say(format!("ok: {text}")),
                    }
                }
            }
            Ok(())
        })
    }
}
