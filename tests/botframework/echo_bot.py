"""A Bot Framework bot written with the real SDK (botbuilder-core, botbuilder-integration-aiohttp),
for the gateway's tests and as the example of docs/PLUGINS.md. Usage: echo_bot.py [PORT]
(default 3978; 0 picks a free port). It prints `listening http=127.0.0.1:PORT` once it listens.

It answers a message `text` with `bf: text`; `menu` with suggested actions; `card` with a hero
card; `agent` with an event named `handoff`; `bye` with endOfConversation; `count` with `bf: seen
N messages`, N counted in the SDK's conversation state (so a message handed to it twice shows);
`when` with the activity's timestamp (as the state-management sample uses it); `docs` with an
openUrl action beside an imBack one. A
new conversation (conversationUpdate with the customer added) is greeted with `bf: welcome`.
"""

import asyncio
import sys

from aiohttp import web
from botbuilder.core import (
    ActivityHandler,
    CardFactory,
    ConversationState,
    MemoryStorage,
    MessageFactory,
    TurnContext,
)
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import (
    ActionTypes,
    Activity,
    ActivityTypes,
    CardAction,
    HeroCard,
    SuggestedActions,
)


class Config:
    PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 3978
    APP_ID = ""  # no app id: local development, no authentication
    APP_PASSWORD = ""
    APP_TYPE = "MultiTenant"
    APP_TENANTID = ""


class EchoBot(ActivityHandler):
    def __init__(self, state: ConversationState):
        self.state = state
        self.seen = state.create_property("seen")

    async def on_turn(self, turn_context: TurnContext):
        await super().on_turn(turn_context)
        await self.state.save_changes(turn_context)

    async def on_members_added_activity(self, members, turn_context: TurnContext):
        for member in members:
            if member.id != turn_context.activity.recipient.id:
                await turn_context.send_activity("bf: welcome")

    async def on_message_activity(self, turn_context: TurnContext):
        text = turn_context.activity.text or ""
        seen = (await self.seen.get(turn_context)) or 0
        seen += 1
        await self.seen.set(turn_context, seen)
        if text == "count":
            await turn_context.send_activity(f"bf: seen {seen} messages")
        elif text == "when":
            stamp = turn_context.activity.timestamp
            local = turn_context.activity.local_timestamp
            await turn_context.send_activity(f"bf: sent at {stamp.year} {local.tzinfo is not None}")
        elif text == "docs":
            reply = MessageFactory.text("bf: read this")
            reply.suggested_actions = SuggestedActions(
                actions=[
                    CardAction(type=ActionTypes.open_url, title="Docs", value="https://example.com/docs"),
                    CardAction(type=ActionTypes.im_back, title="Done", value="done"),
                ]
            )
            await turn_context.send_activity(reply)
        elif text == "menu":
            reply = MessageFactory.text("bf: pick one")
            reply.suggested_actions = SuggestedActions(
                actions=[
                    CardAction(type=ActionTypes.im_back, title="Billing", value="billing"),
                    CardAction(type=ActionTypes.im_back, title="Delivery", value="delivery"),
                ]
            )
            await turn_context.send_activity(reply)
        elif text == "card":
            card = HeroCard(
                title="Premium plan",
                subtitle="25 EUR a month",
                text="Everything included.",
                buttons=[CardAction(type=ActionTypes.im_back, title="Buy", value="buy premium")],
            )
            await turn_context.send_activity(MessageFactory.attachment(CardFactory.hero_card(card)))
        elif text == "agent":
            await turn_context.send_activity("bf: let me find a person")
            await turn_context.send_activity(
                Activity(
                    type=ActivityTypes.event,
                    name="handoff",
                    value={"summary": "wants a person", "userdata": {"RouteTo": "support"}},
                )
            )
        elif text == "bye":
            await turn_context.send_activity("bf: goodbye")
            await turn_context.send_activity(Activity(type=ActivityTypes.end_of_conversation))
        else:
            await turn_context.send_activity(
                Activity(type=ActivityTypes.typing)
            )
            await turn_context.send_activity(f"bf: {text}")


ADAPTER = CloudAdapter(ConfigurationBotFrameworkAuthentication(Config()))
BOT = EchoBot(ConversationState(MemoryStorage()))


async def messages(req: web.Request) -> web.Response:
    return await ADAPTER.process(req, BOT)


APP = web.Application()
APP.router.add_post("/api/messages", messages)


async def main():
    runner = web.AppRunner(APP)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", Config.PORT)
    await site.start()
    port = runner.addresses[0][1]
    print(f"listening http=127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
