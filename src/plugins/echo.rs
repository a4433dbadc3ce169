//! The echo bot: answers each customer message `text` with `"{n}: {text}"`, n counting the
//! messages this instance has answered. The count is its saved context, so after a switchover it
//! goes on where it was. Data sent by ESP is answered with `data: k=v, ...`.

use bgs_actors::bot::{Bot, BotContext, BotError, BotFactory, BotInput, CreateBot};
use bgs_proto::chat::{EventKind, ParticipantType};
use futures_util::future::BoxFuture;

pub struct EchoFactory;

impl BotFactory for EchoFactory {
    fn bot_id(&self) -> &str {
        "echo"
    }

    fn create(&self, _request: &CreateBot) -> Result<Box<dyn Bot>, BotError> {
        Ok(Box::new(EchoBot { count: 0 }))
    }
}

pub struct EchoBot {
    count: u64,
}

impl Bot for EchoBot {
    fn handle<'a>(
        &'a mut self,
        ctx: &'a mut BotContext,
        input: BotInput,
    ) -> BoxFuture<'a, Result<(), BotError>> {
        Box::pin(async move {
            match input {
                BotInput::Start(start) => {
                    if let Some(bytes) = start.restored {
                        let text = String::from_utf8(bytes)
                            .map_err(|_| BotError::new("saved context is not text"))?;
                        self.count = text
                            .parse()
                            .map_err(|_| BotError::new("saved context is not a count"))?;
                    }
                }
                BotInput::Event(e)
                    if e.kind == EventKind::Message
                        && e.participant_type == ParticipantType::Customer =>
                {
                    self.count += 1;
                    ctx.say(format!("{}: {}", self.count, e.text.unwrap_or_default()));
                    ctx.save_context(self.count.to_string().into_bytes());
                }
                BotInput::Data(data) => {
                    let pairs: Vec<String> = data.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    ctx.say(format!("data: {}", pairs.join(", ")));
                }
                _ => {}
            }
            Ok(())
        })
    }
}
