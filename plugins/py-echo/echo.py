#!/usr/bin/env python3
"""py-echo: the example bgs process plugin, standard library only.

The gateway starts this program once and speaks JSON lines with it over stdin and stdout, for all
of its bots at once (docs/PLUGINS.md, "Process plugins"). Each bot answers a customer message
`text` with `py: text`, and data sent with SendDataToBot with `py: seen N messages`. "menu"
gets buttons; "agent" hands the customer over to a person. Its state (the count) is saved after
each message, so a restarted plugin or the other node of a pair goes on counting.
"""

import json
import sys

bots = {}  # bot instance id -> {"count": messages answered}


def send(**msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def on_event(bot, re, event):
    if event["kind"] != "message" or event["participant_type"] != "customer":
        return  # the bot's own posts, agents, joins, userdata...
    text = event.get("text") or ""
    state = bots.setdefault(bot, {"count": 0})
    state["count"] += 1
    if text == "menu":
        send(type="post", bot=bot, re=re, text="What about?",
             rich={"buttons": [{"title": "Billing", "payload": "billing"},
                               {"title": "Delivery", "payload": "delivery"}]})
    elif text == "agent":
        send(type="post", bot=bot, re=re, text="py: handing you over")
        send(type="leave", bot=bot, re=re, handoff=True, summary="asked for a person",
             userdata={"RouteTo": "support"})
    else:
        send(type="post", bot=bot, re=re, text="py: " + text)
    send(type="save_context", bot=bot, re=re, context=json.dumps(state))


def main():
    for line in sys.stdin:
        msg = json.loads(line)
        kind, bot, re = msg["type"], msg.get("bot"), msg.get("id", 0)
        if kind == "start":
            bots[bot] = {"count": 0}
        elif kind == "restore":
            context = msg.get("context")
            bots[bot] = json.loads(context) if context else {"count": 0}
        elif kind == "event":
            on_event(bot, re, msg["event"])
        elif kind == "data":
            count = bots.get(bot, {"count": 0})["count"]
            send(type="post", bot=bot, re=re, text=f"py: seen {count} messages")
        elif kind == "stop":
            bots.pop(bot, None)
        if re:  # id 0 is a notice: nothing to answer
            send(type="done", bot=bot, re=re)


if __name__ == "__main__":
    main()
