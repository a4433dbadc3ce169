//! End-to-end tests of bots that live outside the gateway: a webhook bot served by a local HTTP
//! server, a process plugin (the repository's `py-echo`), and a bot written with the real Bot
//! Framework SDK. Real `bgs` and `bgs-chat-server` processes; a customer over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    child_pid, dead_port, kill9_pid, messages, repo_plugins, Answer, ChatServer, Customer, Gateway,
    MockHttp, TempDir,
};

/// A webhook that answers `wh: <message>`, `menu` with buttons, `agent` with a hand-off, and
/// fails the first attempt of any message that starts with `flaky` (after reading it: a retry
/// must not put a second answer in the chat).
async fn webhook() -> MockHttp {
    MockHttp::start(|req, earlier| {
        let text = req.body["message"].as_str().unwrap_or_default().to_string();
        if text.starts_with("flaky") && earlier == 0 {
            return Answer {
                status: 503,
                body: json!({"error": "try again"}),
                delay: Duration::ZERO,
                location: None,
            };
        }
        match text.as_str() {
            "menu" => Answer::ok(json!([
                {"text": "What about?", "buttons": [
                    {"title": "Billing", "payload": "/billing"},
                    {"title": "Delivery", "payload": "/delivery"}
                ]}
            ])),
            "agent" => Answer::ok(json!([
                {"recipient_id": req.body["sender"], "text": "Transferring you."},
                {"custom": {"handoff": true, "summary": "asked for a person", "userdata": {"RouteTo": "support"}}}
            ])),
            _ => Answer::ok(json!([{"recipient_id": req.body["sender"], "text": format!("wh: {text}")}])),
        }
    })
    .await
}

#[tokio::test]
async fn webhook_bots_answer_retry_once_hand_off_and_give_up_cleanly() {
    let hook = webhook().await;
    // The slow endpoint answers after 1.5 s; another chat must not wait for it.
    let slow = MockHttp::start(|req, _| Answer {
        status: 200,
        body: json!([{"text": format!("slow: {}", req.body["message"].as_str().unwrap_or(""))}]),
        delay: Duration::from_millis(1500),
        location: None,
    })
    .await;
    // A stranger's address, and endpoints that redirect there (307 re-sends the body) and to
    // another path of their own origin: only the latter is followed, and only when opted in.
    let stranger =
        MockHttp::start(|_, _| Answer::ok(json!([{"text": "send your card number"}]))).await;
    let to_stranger = stranger.url("/steal");
    let moved = MockHttp::start(move |req, _| {
        if req.path == "/moved" {
            Answer::redirect(307, to_stranger.clone())
        } else if req.path == "/same" {
            Answer::redirect(308, "/home".into())
        } else {
            Answer::ok(
                json!([{"text": format!("here: {}", req.body["message"].as_str().unwrap_or(""))}]),
            )
        }
    })
    .await;
    let moved_home = moved.url("/home");
    let local = MockHttp::start(move |_, _| Answer::redirect(308, moved_home.clone())).await;
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        &format!(
            r#"
[plugins.webhook.endpoints.moved]
url = "{moved}"
follow_redirects = true
headers = {{ X-Api-Key = "hook-key" }}
[plugins.webhook.endpoints.same]
url = "{same}"
follow_redirects = true
[plugins.webhook.endpoints.local]
url = "{local}"
[plugins.webhook.endpoints.faq]
url = "{faq}"
timeout_ms = 2000
retries = 2
headers = {{ Authorization = "Bearer hook-secret" }}
[plugins.webhook.endpoints.slow]
url = "{slow}"
timeout_ms = 4000
[plugins.webhook.endpoints.dead]
url = "http://{dead}/webhook"
timeout_ms = 300
retries = 2
handoff_userdata = {{ RouteTo = "support", Why = "bot down" }}
"#,
            moved = moved.url("/moved"),
            local = local.url("/hook"),
            same = moved.url("/same"),
            faq = hook.url("/webhooks/rest/webhook"),
            slow = slow.url("/hook"),
            dead = dead_port(),
        ),
    );

    // A plain answer; what the endpoint was sent.
    let mut ann = Customer::open(&chat, "wh-1").await;
    let started = gw
        .start_bot("wh-1", &[("ChatBotID", "webhook"), ("ChatBotName", "faq")])
        .await;
    ann.say("hello").await;
    assert_eq!(ann.next_reply().await, "wh: hello");
    let first = hook.seen().into_iter().next().unwrap();
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/webhooks/rest/webhook");
    assert_eq!(first.body["sender"], ann.id.as_str());
    assert_eq!(first.body["metadata"]["interaction_id"], "wh-1");
    assert_eq!(first.body["metadata"]["userdata"]["InteractionId"], "wh-1");
    assert_eq!(first.headers["authorization"], "Bearer hook-secret");
    let key = first.headers["idempotency-key"].clone();
    assert!(
        key.starts_with(started["BotInstanceId"].as_str().unwrap()),
        "{key}"
    );

    // Buttons: structured content, and a text fallback that lists them.
    ann.say("menu").await;
    let menu = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(menu["text"], "What about?\n1. Billing\n2. Delivery");
    assert_eq!(menu["rich"]["buttons"][0]["payload"], "/billing");

    // A failed first attempt is retried with the same key; the chat gets one answer.
    ann.say("flaky one").await;
    assert_eq!(ann.next_reply().await, "wh: flaky one");
    let attempts: Vec<_> = hook
        .seen()
        .into_iter()
        .filter(|s| s.body["message"] == "flaky one")
        .collect();
    assert_eq!(attempts.len(), 2, "one failed attempt, one retry");
    assert_eq!(
        attempts[0].headers["idempotency-key"],
        attempts[1].headers["idempotency-key"]
    );

    // A question asked before the bot joined is answered when it joins.
    let mut eve = Customer::open(&chat, "wh-early").await;
    eve.say("early bird").await;
    gw.start_bot(
        "wh-early",
        &[("ChatBotID", "webhook"), ("ChatBotName", "faq")],
    )
    .await;
    assert_eq!(eve.next_reply().await, "wh: early bird");

    // A slow endpoint holds only its own chat.
    let mut bea = Customer::open(&chat, "wh-slow").await;
    gw.start_bot(
        "wh-slow",
        &[("ChatBotID", "webhook"), ("ChatBotName", "slow")],
    )
    .await;
    bea.say("are you there").await;
    let asked = tokio::time::Instant::now();
    ann.say("quick").await;
    assert_eq!(ann.next_reply().await, "wh: quick");
    let quick = asked.elapsed();
    assert_eq!(bea.next_reply().await, "slow: are you there");
    assert!(
        quick < asked.elapsed(),
        "the quick chat was answered first ({quick:?})"
    );

    // The endpoint asks for a hand-off: userdata, report and GetBotStatus carry it.
    ann.say("agent").await;
    assert_eq!(ann.next_reply().await, "Transferring you.");
    let report = gw
        .report_of(started["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(report["handoff"]["summary"], "asked for a person");
    assert_eq!(report["handoff"]["reason"], "requested");
    let ud = ann.userdata().await;
    assert_eq!(ud["ChatBotHandoff"], "true");
    assert_eq!(ud["ChatBotHandoffSummary"], "asked for a person");
    assert_eq!(ud["RouteTo"], "support");
    assert!(
        ud["ChatBotTranscript"]
            .as_str()
            .unwrap()
            .starts_with("wh-1:"),
        "{ud}"
    );
    let (_, st) = gw
        .esp("GetBotStatus", "wh-1", &[("ChatBotID", "webhook")])
        .await;
    assert_eq!(st["result"]["bots"][0]["handoff"]["reason"], "requested");
    let answers = messages(&ann.transcript().await)
        .into_iter()
        .filter(|m| m.starts_with("wh: flaky"))
        .count();
    assert_eq!(answers, 1, "a retried request answered once");

    // A dead endpoint: the customer is told, the bot hands over with the configured userdata,
    // and the report says why. In waiting mode the outcome is written too.
    let mut cid = Customer::open(&chat, "wh-dead").await;
    let dead = gw
        .start_bot(
            "wh-dead",
            &[
                ("ChatBotID", "webhook"),
                ("ChatBotName", "dead"),
                ("ChatBotHoldup", "true"),
            ],
        )
        .await;
    cid.say("hello?").await;
    let notice = cid.next_where(|e| e["kind"] == "notice").await;
    assert!(
        notice["text"]
            .as_str()
            .unwrap()
            .contains("not available right now"),
        "{notice}"
    );
    let report = gw.report_of(dead["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(report["handoff"]["reason"], "bot_unavailable");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("webhook endpoint dead failed after 3 attempts"),
        "{error}"
    );
    let ud = cid.userdata().await;
    assert_eq!(ud["RouteTo"], "support");
    assert_eq!(ud["Why"], "bot down");
    // Operators see the dead endpoint and the retries in the metrics.
    let (_, metrics) = support::http(gw.http, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "bgs_external_requests_total{plugin=\"webhook\",endpoint=\"dead\",result=\"failed\"} 1",
        "bgs_external_requests_total{plugin=\"webhook\",endpoint=\"dead\",result=\"retry\"} 2",
        "bgs_external_requests_total{plugin=\"webhook\",endpoint=\"faq\",result=\"retry\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert_eq!(ud["ChatBotHandoffReason"], "bot_unavailable");
    assert_eq!(ud["ChatBotResult"], "bot_left");

    // A redirect to another origin is not followed, even where redirects are allowed: the
    // stranger never sees the message or the key, and the bot gives up as on a dead endpoint.
    let mut red = Customer::open(&chat, "wh-moved").await;
    gw.start_bot(
        "wh-moved",
        &[("ChatBotID", "webhook"), ("ChatBotName", "moved")],
    )
    .await;
    red.say("my card is 4111").await;
    let notice = red.next_where(|e| e["kind"] == "notice").await;
    assert!(notice["text"].as_str().unwrap().contains("not available"));
    assert!(stranger.seen().is_empty(), "{:?}", stranger.seen());
    // With redirects off (the default), even a same-origin redirect is not followed.
    let mut loc = Customer::open(&chat, "wh-local").await;
    gw.start_bot(
        "wh-local",
        &[("ChatBotID", "webhook"), ("ChatBotName", "local")],
    )
    .await;
    loc.say("hi").await;
    loc.next_where(|e| e["kind"] == "notice").await;
    assert!(moved.seen().iter().all(|s| s.path == "/moved"));
    assert!(gw.log().contains("not followed"), "the log says why");
    // Opted in, a redirect within the same origin is followed with the message.
    let mut same = Customer::open(&chat, "wh-same").await;
    gw.start_bot(
        "wh-same",
        &[("ChatBotID", "webhook"), ("ChatBotName", "same")],
    )
    .await;
    same.say("hello").await;
    assert_eq!(same.next_reply().await, "here: hello");

    // An unknown endpoint name is refused before anything joins.
    let (status, e) = gw
        .esp(
            "StartBot",
            "wh-1",
            &[("ChatBotID", "webhook"), ("ChatBotName", "nope")],
        )
        .await;
    assert_eq!((status, e["code"].as_str()), (400, Some("bad_parameter")));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("known: dead, faq, local, moved, same, slow"),
        "{e}"
    );
}

/// Every bot is held to the same bounds, here a webhook bot: an answer of 1000 items posts the
/// first 20 and a notice; 40 buttons keep 32 and the text lists them all; a 40 KiB answer is
/// split, not dropped; and a bot that keeps posting is stopped with a notice and a hand-off
/// before it can fill the session.
#[tokio::test]
async fn a_bot_is_held_to_its_limits() {
    let hook = MockHttp::start(|req, _| {
        let text = req.body["message"].as_str().unwrap_or_default().to_string();
        match text.as_str() {
            "flood" => Answer::ok(json!((0..1000).map(|i| json!({"text": format!("spam {i}")})).collect::<Vec<_>>())),
            "buttons" => Answer::ok(json!([{"text": "pick", "buttons": (0..40).map(|i| json!({"title": format!("b{i}")})).collect::<Vec<_>>()}])),
            "long" => Answer::ok(json!([{"text": "x".repeat(40 * 1024)}])),
            _ => Answer::ok(json!((0..5).map(|i| json!({"text": format!("{text} {i}")})).collect::<Vec<_>>())),
        }
    })
    .await;
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        &format!(
            "[bots]\nmax-events-per-minute = 60\n[plugins.webhook.endpoints.faq]\nurl = \"{}\"\n",
            hook.url("/hook")
        ),
    );
    let mut ann = Customer::open(&chat, "lim-1").await;
    let started = gw
        .start_bot("lim-1", &[("ChatBotID", "webhook"), ("ChatBotName", "faq")])
        .await;
    ann.say("flood").await;
    let notice = ann.next_where(|e| e["kind"] == "notice").await;
    assert_eq!(
        notice["text"],
        "(Some of the assistant's messages were not shown.)"
    );
    let shown: Vec<String> = messages(&ann.transcript().await)
        .into_iter()
        .filter(|m| m.starts_with("spam"))
        .collect();
    assert_eq!(shown.len(), 20, "{shown:?}");
    assert_eq!(shown[19], "spam 19");

    ann.say("buttons").await;
    let menu = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(menu["rich"]["buttons"].as_array().unwrap().len(), 32);
    assert!(
        menu["text"].as_str().unwrap().ends_with("40. b39"),
        "the text lists all"
    );

    ann.say("long").await;
    let first = ann
        .next_where(|e| {
            e["kind"] == "message" && e["text"].as_str().is_some_and(|t| t.starts_with("xxx"))
        })
        .await;
    let second = ann
        .next_where(|e| {
            e["kind"] == "message" && e["text"].as_str().is_some_and(|t| t.starts_with("xxx"))
        })
        .await;
    let third = ann
        .next_where(|e| {
            e["kind"] == "message" && e["text"].as_str().is_some_and(|t| t.starts_with("xxx"))
        })
        .await;
    let total: usize = [&first, &second, &third]
        .iter()
        .map(|e| e["text"].as_str().unwrap().len())
        .sum();
    assert_eq!(total, 40 * 1024, "split into parts, nothing lost");

    // 21 + 1 + 3 events so far; five a message from here: past 60 in a minute it is stopped.
    for n in 0..8 {
        ann.say(&format!("m{n}")).await;
    }
    let notice = ann
        .next_where(|e| {
            e["kind"] == "notice"
                && e["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("ran into a problem"))
        })
        .await;
    assert_eq!(notice["participant_id"], started["ParticipantId"]);
    let report = gw
        .report_of(started["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(report["handoff"]["reason"], "bot_limit");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("more than 60 chat events"),
        "{report}"
    );
    assert_eq!(ann.userdata().await["ChatBotHandoffReason"], "bot_limit");
    let (_, metrics) = support::http(gw.http, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "bgs_bot_limits_total{limit=\"posts_per_input\"} 980",
        "bgs_bot_limits_total{limit=\"rich_items\"} 1",
        "bgs_bot_limits_total{limit=\"text_split\"} 1",
        "bgs_bot_limits_total{limit=\"events_per_minute\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

fn plugins_dir_config(dir: &std::path::Path) -> String {
    format!("[plugins]\ndir = \"{}\"\n", dir.display())
}

#[tokio::test]
async fn py_echo_process_plugin_answers_and_comes_back_after_kill9() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, &plugins_dir_config(&repo_plugins()));
    let mut ann = Customer::open(&chat, "py-1").await;
    let mut bob = Customer::open(&chat, "py-2").await;
    gw.start_bot("py-1", &[("ChatBotID", "py-echo")]).await;
    gw.start_bot("py-2", &[("ChatBotID", "py-echo")]).await;
    ann.say("hello").await;
    assert_eq!(ann.next_reply().await, "py: hello");
    bob.say("hi").await;
    assert_eq!(bob.next_reply().await, "py: hi");

    // Rich content from a plugin.
    ann.say("menu").await;
    let menu = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(menu["text"], "What about?\n1. Billing\n2. Delivery");

    // kill -9 of the plugin process mid-chat: it is restarted, its bots restored from their
    // saved context, and the next message is answered once.
    let pid = child_pid(gw.pid(), "echo.py").await;
    kill9_pid(pid);
    ann.say("after the crash").await;
    assert_eq!(ann.next_reply().await, "py: after the crash");
    let again = child_pid(gw.pid(), "echo.py").await;
    assert_ne!(again, pid, "a new plugin process");
    let (_, metrics) = support::http(gw.http, "GET", "/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("bgs_plugin_process_exits_total{plugin=\"py-echo\",outcome=\"restarted\"} 1"),
        "{metrics}"
    );
    let answers = messages(&ann.transcript().await)
        .into_iter()
        .filter(|m| m == "py: after the crash")
        .count();
    assert_eq!(answers, 1);
    // The count came back from the saved context: hello, menu, after the crash.
    let (status, _) = gw
        .esp("SendDataToBot", "py-1", &[("ChatBotID", "py-echo")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(ann.next_reply().await, "py: seen 3 messages");
    bob.say("still there?").await;
    assert_eq!(bob.next_reply().await, "py: still there?");

    // A hand-off from a plugin.
    bob.say("agent").await;
    assert_eq!(bob.next_reply().await, "py: handing you over");
    // The hand-off is written before the bot leaves.
    bob.next_where(|e| e["kind"] == "left").await;
    let ud = bob.userdata().await;
    assert_eq!(ud["ChatBotHandoff"], "true");
    assert_eq!(ud["ChatBotHandoffSummary"], "asked for a person");
    assert_eq!(ud["RouteTo"], "support");
}

/// A plugin that misbehaves on command: `garbage` writes a line that is not JSON, `flood`
/// writes 200 posts nobody asked for, `hang` never answers; anything else is echoed.
const BAD_PLUGIN: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    bot, re = m.get("bot"), m.get("id", 0)
    if m["type"] == "event" and m["event"]["kind"] == "message" and m["event"]["participant_type"] == "customer":
        text = m["event"]["text"]
        if text == "garbage":
            print("this is not json", flush=True)
            continue
        if text == "flood":
            for i in range(200):
                print(json.dumps({"type": "post", "bot": bot, "text": f"spam {i}"}), flush=True)
        elif text == "hang":
            continue
        else:
            print(json.dumps({"type": "post", "bot": bot, "re": re, "text": "bad: " + text}), flush=True)
    if re:
        print(json.dumps({"type": "done", "bot": bot, "re": re}), flush=True)
"#;

#[tokio::test]
async fn a_misbehaving_process_plugin_is_bounded_and_the_node_goes_on() {
    let dir = TempDir::new("bad-plugin");
    let folder = dir.path().join("bad");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("bad.py"), BAD_PLUGIN).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "id = \"py-bad\"\ncommand = \"python3\"\nargs = [\"-u\", \"bad.py\"]\n",
    )
    .unwrap();
    let once = dir.path().join("once");
    std::fs::create_dir_all(&once).unwrap();
    std::fs::write(once.join("once.py"), BAD_PLUGIN).unwrap();
    std::fs::write(
        once.join("plugin.toml"),
        "id = \"py-once\"\ncommand = \"python3\"\nargs = [\"-u\", \"once.py\"]\n\
         restart = \"never\"\nmax_instances = 2\n",
    )
    .unwrap();
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        &format!(
            "{}[bots]\nhandling-timeout-ms = 1500\n",
            plugins_dir_config(dir.path())
        ),
    );
    let mut calm = Customer::open(&chat, "bad-calm").await;
    gw.start_bot("bad-calm", &[("ChatBotID", "py-bad")]).await;
    calm.say("one").await;
    assert_eq!(calm.next_reply().await, "bad: one");

    // Each misbehaviour stops only the bot it hit; the plugin's other bot answers after each.
    for (n, word) in ["garbage", "flood", "hang"].into_iter().enumerate() {
        let interaction = format!("bad-{word}");
        let victim = Customer::open(&chat, &interaction).await;
        let started = gw.start_bot(&interaction, &[("ChatBotID", "py-bad")]).await;
        victim.say(word).await;
        let report = gw
            .report_of(started["BotInstanceId"].as_str().unwrap())
            .await;
        if word == "flood" {
            // Past its limits, a bot is handed to a person with a notice, as a dead one is.
            assert_eq!(report["end_reason"], "bot_left", "{report}");
            assert_eq!(report["handoff"]["reason"], "bot_limit", "{report}");
            let notice = victim.visible().await;
            assert!(
                notice.iter().any(|e| e["kind"] == "notice"
                    && e["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("ran into a problem"))),
                "{notice:?}"
            );
        } else {
            assert_eq!(report["end_reason"], "error", "{word}: {report}");
        }
        let text = format!("after {word}");
        calm.say(&text).await;
        assert_eq!(calm.next_reply().await, format!("bad: {text}"), "after {n}");
        let spam = messages(&victim.transcript().await)
            .into_iter()
            .filter(|m| m.starts_with("spam"))
            .count();
        assert!(spam <= 64, "{word}: {spam} unasked posts reached the chat");
    }
    let log = gw.log();
    assert!(log.contains("the plugin wrote garbage"), "{log}");

    // A plugin that may not be restarted: killed, its bot stops and new StartBots are refused.
    // Its max_instances bounds it meanwhile.
    for i in 1..=3 {
        Customer::open(&chat, &format!("once-{i}")).await;
    }
    let first = gw.start_bot("once-1", &[("ChatBotID", "py-once")]).await;
    gw.start_bot("once-2", &[("ChatBotID", "py-once")]).await;
    let (status, full) = gw
        .esp("StartBot", "once-3", &[("ChatBotID", "py-once")])
        .await;
    assert_eq!(
        (status, full["code"].as_str()),
        (503, Some("bot_unavailable")),
        "{full}"
    );
    kill9_pid(child_pid(gw.pid(), "once.py").await);
    let report = gw.report_of(first["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(report["end_reason"], "error");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("restart policy says no"),
        "{report}"
    );
    let (status, refused) = gw
        .esp("StartBot", "once-3", &[("ChatBotID", "py-once")])
        .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (503, Some("bot_unavailable"))
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("py-once is not running"),
        "{refused}"
    );
    let (status, _) = support::http(gw.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

/// A process plugin that probes its isolation: it tells its environment, talks without
/// answering, closes its output, and leaves a child behind.
const SLY_PLUGIN: &str = r#"
import json, os, subprocess, sys, threading, time
def say(bot, re, text):
    print(json.dumps({"type": "post", "bot": bot, "re": re, "text": text}), flush=True)
def chatter():
    while True:
        print(json.dumps({"type": "log", "message": "still here"}), flush=True)
        time.sleep(0.05)
hung = False
for line in sys.stdin:
    if hung:
        continue
    m = json.loads(line)
    bot, re = m.get("bot"), m.get("id", 0)
    if m["type"] == "event" and m["event"]["kind"] == "message" and m["event"]["participant_type"] == "customer":
        text = m["event"]["text"]
        if text == "env":
            say(bot, re, "env: " + ",".join(sorted(os.environ)))
        elif text == "chatty":
            hung = True
            threading.Thread(target=chatter, daemon=True).start()
            continue
        elif text == "close":
            os.close(1)
            time.sleep(3600)
        elif text == "fork":
            child = subprocess.Popen(["sleep", "3600"])
            say(bot, re, f"child: {child.pid}")
            print(json.dumps({"type": "done", "bot": bot, "re": re}), flush=True)
            os._exit(3)
        else:
            say(bot, re, "sly: " + text)
    if re:
        print(json.dumps({"type": "done", "bot": bot, "re": re}), flush=True)
"#;

/// A process plugin gets a clean environment (none of the node's), is judged alive by its
/// answers (not its log lines), is restarted as soon as it closes its output, and takes any
/// child it left along when it dies; a manifest whose command does not exist fails start-up.
#[tokio::test]
async fn a_process_plugin_is_isolated_and_watched() {
    let dir = TempDir::new("sly-plugin");
    let folder = dir.path().join("sly");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("sly.py"), SLY_PLUGIN).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "id = \"py-sly\"\ncommand = \"python3\"\nargs = [\"-u\", \"sly.py\"]\n\
         env = { SLY_MODE = \"test\" }\n",
    )
    .unwrap();
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        &format!(
            "{}[bots]\nhandling-timeout-ms = 1000\n",
            plugins_dir_config(dir.path())
        ),
    );
    let mut calm = Customer::open(&chat, "sly-calm").await;
    gw.start_bot("sly-calm", &[("ChatBotID", "py-sly")]).await;
    calm.say("env").await;
    let env = calm.next_reply().await;
    let keys: Vec<&str> = env.trim_start_matches("env: ").split(',').collect();
    assert!(
        keys.contains(&"SLY_MODE") && keys.contains(&"PATH"),
        "{env}"
    );
    // The node runs with RUST_LOG and cargo's CARGO_* set (and whatever the CI has): none of
    // it reaches the plugin (a pyenv shim may add its own PYENV_* on the way).
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("RUST_") || k.starts_with("CARGO")),
        "the node's environment leaked: {env}"
    );

    // Log lines are not answers: a plugin that only logs, leaving three inputs in a row
    // unanswered, is restarted.
    let started = gw.log().matches("plugin process started").count();
    for i in 0..3 {
        let id = format!("sly-chatty-{i}");
        let c = Customer::open(&chat, &id).await;
        let bot = gw.start_bot(&id, &[("ChatBotID", "py-sly")]).await;
        if i == 0 {
            c.say("chatty").await;
        }
        let report = gw.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
        assert_eq!(report["end_reason"], "error");
    }
    gw.wait_log("it stopped answering").await;
    calm.say("after chatter").await;
    assert_eq!(calm.next_reply().await, "sly: after chatter");
    assert!(gw.log().matches("plugin process started").count() > started);

    // Its output closed: restarted at once, before any bot fails for it.
    let c = Customer::open(&chat, "sly-close").await;
    let closer = gw.start_bot("sly-close", &[("ChatBotID", "py-sly")]).await;
    c.say("close").await;
    gw.wait_log("it closed its output").await;
    // Its input is given again to the new process, which closes its output again: that bot
    // fails (the process died twice on its input). Only then is the process free for the calm
    // bot, whose 1 s of handling time must not be spent on restarts (a loaded machine).
    let report = gw
        .report_of(closer["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "error");
    calm.say("after close").await;
    assert_eq!(calm.next_reply().await, "sly: after close");

    // A child it leaves behind (holding its output) dies with it.
    let mut f = Customer::open(&chat, "sly-fork").await;
    gw.start_bot("sly-fork", &[("ChatBotID", "py-sly")]).await;
    f.say("fork").await;
    let pid: u32 = f
        .next_reply()
        .await
        .trim_start_matches("child: ")
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin's child {pid} outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The plugin exits after forking and is restarted after its back-off (800 ms by now): the
    // calm bot's next input must not spend its 1 s of handling time waiting for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = gw.log();
        let after_exit = log.rfind("exit status: 3").map(|i| &log[i..]);
        if after_exit.is_some_and(|rest| rest.contains("plugin process started")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin was not restarted after its fork"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    calm.say("after fork").await;
    assert_eq!(calm.next_reply().await, "sly: after fork");

    // A manifest whose command does not exist: the node does not start, and says which.
    let broken = TempDir::new("broken-plugin");
    let nope = broken.path().join("nope");
    std::fs::create_dir_all(&nope).unwrap();
    std::fs::write(
        nope.join("plugin.toml"),
        "id = \"nope\"\ncommand = \"no-such-program-bgs\"\n",
    )
    .unwrap();
    let config = broken.path().join("bgs.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nhttp-listen = \"127.0.0.1:0\"\nesp-listen = \"127.0.0.1:0\"\n[plugins]\ndir = \"{}\"\n",
            broken.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-program-bgs") && err.contains("plugin.toml"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bot_framework_sdk_bot_talks_through_the_gateway_channel() {
    let Some(bot) = support::SdkBot::start() else {
        return;
    };
    // A second bot endpoint that only records what it is sent: the serviceUrl it is given.
    let spy = MockHttp::start(|_, _| Answer::ok(json!({}))).await;
    // A bot with an app id: its tokens are checked against a key set (made here with PyJWT,
    // which the SDK brings), and the gateway's own tokens come from a stand-in token service.
    let tokens = TempDir::new("bf-tokens");
    let made = std::process::Command::new("python3")
        .args(["-c", MAKE_TOKENS])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    let jwks = tokens.path().join("jwks.json");
    std::fs::write(&jwks, made["jwks"].to_string()).unwrap();
    let token_service = MockHttp::start(|_, _| {
        Answer::ok(json!({"access_token": "gateway-token", "expires_in": 3600}))
    })
    .await;
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        &format!(
            "[plugins.botframework.bots.helpdesk]\nendpoint = \"{}\"\n[plugins.botframework.bots.spy]\nendpoint = \"{}\"\n\
             [plugins.botframework.bots.signed]\nendpoint = \"{}\"\napp_id = \"app-123\"\napp_password = \"pw\"\n\
             token_url = \"{}\"\ntoken_keys = \"{}\"\n",
            bot.endpoint(),
            spy.url("/api/messages"),
            spy.url("/signed"),
            token_service.url("/token"),
            jwks.display()
        ),
    );
    let mut ann = Customer::open(&chat, "bf-1").await;
    let started = gw
        .start_bot(
            "bf-1",
            &[("ChatBotID", "botframework"), ("ChatBotName", "helpdesk")],
        )
        .await;
    // conversationUpdate: the bot greets the customer it was added with.
    assert_eq!(ann.next_reply().await, "bf: welcome");
    ann.say("hello").await;
    // The SDK bot sends typing, then its answer.
    let typing = ann.next_where(|e| e["kind"] == "typing").await;
    assert_eq!(typing["participant_id"], started["ParticipantId"]);
    assert_eq!(ann.next_reply().await, "bf: hello");
    // A question asked before the bot joined is answered after the greeting.
    let mut cy = Customer::open(&chat, "bf-early").await;
    cy.say("early bird").await;
    gw.start_bot(
        "bf-early",
        &[("ChatBotID", "botframework"), ("ChatBotName", "helpdesk")],
    )
    .await;
    assert_eq!(cy.next_reply().await, "bf: welcome");
    assert_eq!(cy.next_reply().await, "bf: early bird");
    ann.say("menu").await;
    let menu = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(menu["text"], "bf: pick one\n1. Billing\n2. Delivery");
    assert_eq!(menu["rich"]["buttons"][1]["payload"], "delivery");
    // A customer on a text-only client types the number of a choice: the bot gets its value.
    ann.say("2").await;
    assert_eq!(ann.next_reply().await, "bf: delivery");
    ann.say("2").await;
    assert_eq!(ann.next_reply().await, "bf: 2", "only right after the list");
    // Activities carry a timestamp and a local timestamp the SDK reads.
    ann.say("when").await;
    let when = ann.next_reply().await;
    assert!(
        when.starts_with("bf: sent at 20") && when.ends_with("True"),
        "{when}"
    );
    // openUrl is a link in the text, not a button whose click would post the URL.
    ann.say("docs").await;
    let docs = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(
        docs["text"],
        "bf: read this\nDocs: https://example.com/docs\n1. Done"
    );
    assert_eq!(docs["rich"]["buttons"].as_array().unwrap().len(), 1);
    ann.say("card").await;
    let card = ann
        .next_where(|e| e["kind"] == "message" && e["rich"].is_object())
        .await;
    assert_eq!(card["rich"]["cards"][0]["title"], "Premium plan");
    assert_eq!(
        card["text"],
        "Premium plan (25 EUR a month)\nEverything included.\n1. Buy"
    );
    // An event named handoff: the bot leaves with the hand-off in userdata and report.
    ann.say("agent").await;
    assert_eq!(ann.next_reply().await, "bf: let me find a person");
    let report = gw
        .report_of(started["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(report["handoff"]["summary"], "wants a person");
    let ud = ann.userdata().await;
    assert_eq!(ud["RouteTo"], "support");
    assert_eq!(ud["ChatBotHandoff"], "true");

    // endOfConversation from the bot: it leaves; the chat goes on.
    let mut bea = Customer::open(&chat, "bf-2").await;
    let second = gw
        .start_bot(
            "bf-2",
            &[("ChatBotID", "botframework"), ("ChatBotName", "helpdesk")],
        )
        .await;
    assert_eq!(bea.next_reply().await, "bf: welcome");
    bea.say("bye").await;
    assert_eq!(bea.next_reply().await, "bf: goodbye");
    let report = gw
        .report_of(second["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(bea.transcript().await["closed"], false);

    // Strangers: knowing a conversation id (the BotInstanceId a workflow sees) is not enough to
    // post into the chat or hand the customer off; only the bot's serviceUrl is.
    let mut dan = Customer::open(&chat, "bf-3").await;
    let third = gw
        .start_bot(
            "bf-3",
            &[("ChatBotID", "botframework"), ("ChatBotName", "spy")],
        )
        .await;
    let conv = third["BotInstanceId"].as_str().unwrap().to_string();
    let given = loop {
        if let Some(s) = spy.seen().first() {
            break s.body.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(given["conversation"]["id"], conv.as_str());
    let service = given["serviceUrl"].as_str().unwrap().to_string();
    let base = service
        .split_once(&gw.http.to_string())
        .map(|(_, path)| path.to_string())
        .unwrap();
    assert!(
        base.starts_with("/bf/") && base.len() == "/bf/".len() + 32 + 1,
        "{base}"
    );
    let other_cap = {
        // A real capability, but of another conversation (the spy's, for bf-1's instance).
        let cap = &base["/bf/".len().."/bf/".len() + 32];
        cap.chars().rev().collect::<String>()
    };
    let attack = json!({"type": "event", "name": "handoff", "value": {"summary": "x", "userdata": {"RouteTo": "attacker"}}});
    let scam = json!({"type": "message", "text": "send your card number"});
    for path in [
        format!("/v3/conversations/{conv}/activities"),
        format!("/v3/conversations/{conv}/activities/x"),
        format!("/bf//v3/conversations/{conv}/activities"),
        format!("/bf/{}/v3/conversations/{conv}/activities", "0".repeat(32)),
        format!("/bf/{other_cap}/v3/conversations/{conv}/activities"),
        format!("/v3/conversations/{conv}/attachments"),
        format!("/bf/{other_cap}/v3/conversations/{conv}/attachments"),
        format!("/bf/{}/v3/conversations/{conv}/activities", &base[4..20]),
        format!(
            "{base}v3/conversations/{}/activities",
            started["BotInstanceId"].as_str().unwrap()
        ),
    ] {
        for body in [&attack, &scam] {
            let (status, answer) = support::http(gw.http, "POST", &path, Some(body.clone())).await;
            assert!(matches!(status, 403 | 404), "{path}: {status} {answer}");
        }
    }
    // The bot itself, at its serviceUrl, is heard (a proactive message).
    let (status, _) = support::http(
        gw.http,
        "POST",
        &format!("{base}v3/conversations/{conv}/activities"),
        Some(json!({"type": "message", "text": "spy: hello"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(dan.next_reply().await, "spy: hello");
    // Revoked at the bot's end: the same serviceUrl is refused once the bot has stopped.
    let (status, _) = gw
        .esp(
            "StopBot",
            "bf-3",
            &[("ChatBotID", "botframework"), ("ChatBotName", "spy")],
        )
        .await;
    assert_eq!(status, 200);
    gw.report_of(&conv).await;
    let (status, _) = support::http(
        gw.http,
        "POST",
        &format!("{base}v3/conversations/{conv}/activities"),
        Some(json!({"type": "message", "text": "spy: still here?"})),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(messages(&dan.transcript().await), ["spy: hello"]);
    assert!(dan.userdata().await.get("RouteTo").is_none());
    // A bot with an app id: the right path is not enough, its token must be valid too.
    let mut eve = Customer::open(&chat, "bf-4").await;
    let signed = gw
        .start_bot(
            "bf-4",
            &[("ChatBotID", "botframework"), ("ChatBotName", "signed")],
        )
        .await;
    let conv = signed["BotInstanceId"].as_str().unwrap().to_string();
    let given = loop {
        if let Some(s) = spy.seen().into_iter().find(|s| s.path == "/signed") {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(given.headers["authorization"], "Bearer gateway-token");
    let base = given.body["serviceUrl"]
        .as_str()
        .unwrap()
        .split_once(&gw.http.to_string())
        .map(|(_, path)| path.to_string())
        .unwrap();
    let path = format!("{base}v3/conversations/{conv}/activities");
    for case in [
        "none", "expired", "issuer", "audience", "appid", "forged", "unsigned",
    ] {
        let (status, answer) = support::try_http(
            gw.http,
            "POST",
            &path,
            Some(json!({"type": "message", "text": format!("forged {case}")})),
            made[case].as_str(),
        )
        .await
        .unwrap();
        assert_eq!(status, 401, "{case}: {answer}");
    }
    let (status, _) = support::try_http(
        gw.http,
        "POST",
        &path,
        Some(json!({"type": "message", "text": "signed: hello"})),
        made["valid"].as_str(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(eve.next_reply().await, "signed: hello");
    assert_eq!(messages(&eve.transcript().await), ["signed: hello"]);

    let (_, metrics) = support::http(gw.http, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "bgs_connections_refused_total{port=\"http\",reason=\"bf_capability\"}",
        "bgs_connections_refused_total{port=\"http\",reason=\"bf_token\"} 7",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

/// Makes a key set and tokens for the app id `app-123` (PyJWT): a valid one, and one wrong in
/// each way a channel checks; `unsigned` is `alg: none`.
const MAKE_TOKENS: &str = r#"
import base64, json, time, jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
jwk.update({"kid": "k1", "use": "sig", "alg": "RS256"})
now = int(time.time())
def token(k=key, **changes):
    claims = {"iss": "https://api.botframework.com", "aud": "https://api.botframework.com",
              "appid": "app-123", "exp": now + 3600, "nbf": now - 10, "iat": now}
    claims.update(changes)
    return jwt.encode(claims, k, algorithm="RS256", headers={"kid": "k1"})
def b64(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
unsigned = b64({"alg": "none", "kid": "k1"}) + "." + b64({"iss": "https://api.botframework.com",
    "aud": "https://api.botframework.com", "appid": "app-123", "exp": now + 3600}) + "."
print(json.dumps({"jwks": {"keys": [jwk]}, "valid": token(), "none": None,
    "expired": token(exp=now - 3600, nbf=now - 7200), "issuer": token(iss="https://evil.example"),
    "audience": token(aud="https://other"), "appid": token(appid="someone-else"),
    "forged": token(k=other), "unsigned": unsigned}))
"#;

/// The reference Chat Server's customer page shows a bot's buttons, and a click answers with the
/// button's payload (driven in headless Chromium).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_page_shows_buttons_and_a_click_sends_the_payload() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, &plugins_dir_config(&repo_plugins()));
    let url = format!("http://{}/", chat.http);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let page = tokio::task::spawn_blocking(move || {
        let Some((_browser, mut cdp)) = support::browser::open_in_chromium(&url) else {
            return;
        };
        cdp.wait_for("String(!!document.getElementById('nick'))", "true");
        cdp.eval(
            "document.getElementById('nick').value = 'Ann'; \
             document.getElementById('start').requestSubmit(); 'ok'",
        );
        cdp.wait_for(
            "String(document.getElementById('info').textContent.startsWith('Interaction id: '))",
            "true",
        );
        let info = cdp.eval("document.getElementById('info').textContent");
        let interaction = info
            .as_str()
            .unwrap()
            .trim_start_matches("Interaction id: ");
        tx.send(interaction.to_string()).unwrap();
        go_rx.recv().unwrap();
        cdp.eval(
            "document.getElementById('text').value = 'menu'; \
             document.getElementById('send').requestSubmit(); 'ok'",
        );
        cdp.wait_for(
            "String(document.querySelectorAll('button.choice').length)",
            "2",
        );
        // The fallback's numbered lines are not shown twice next to the buttons.
        cdp.wait_for(
            "String(document.getElementById('log').textContent.includes('1. Billing'))",
            "false",
        );
        cdp.eval("document.querySelector('button.choice').click(); 'ok'");
        cdp.wait_for(
            "String(document.getElementById('log').textContent.includes('py: billing'))",
            "true",
        );
        tx.send("done".into()).unwrap();
    });
    let Ok(interaction) = tokio::task::spawn_blocking(move || rx.recv().map(|i| (i, rx)))
        .await
        .unwrap()
    else {
        page.await.unwrap();
        return; // no Chromium here
    };
    let (interaction, rx) = interaction;
    gw.start_bot(&interaction, &[("ChatBotID", "py-echo")])
        .await;
    go_tx.send(()).unwrap();
    page.await.unwrap();
    assert_eq!(rx.recv().unwrap(), "done");
}
