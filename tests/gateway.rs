//! End-to-end tests of a gateway node: the real `bgs` and `bgs-chat-server` processes, real
//! sockets, a customer over HTTP and workflows over ESP (HTTP and TCP).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bgs_chat_server::client::ChatClient;
use bgs_proto::chat::{ClientRole, EventKind, ParticipantType, ServerFrame, Style, Visibility};
use bgs_proto::codec::FrameCodec;
use bgs_proto::esp::{
    EspClientFrame, EspHello, EspRequest, EspResponse, EspResult, EspStatus, ESP_PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{http, messages, ChatServer, Customer, Gateway, TempDir};

fn esp_request(id: u64, method: &str, interaction: &str, params: &[(&str, &str)]) -> EspRequest {
    let mut parameters: std::collections::BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    parameters.insert("_umsChannel".into(), "channel-chatbot".into());
    EspRequest {
        request_id: id,
        service: "ChatBotPlatform".into(),
        method: method.into(),
        parameters,
        userdata: [("InteractionId".to_string(), interaction.to_string())].into(),
    }
}

type EspFramed =
    tokio_util::codec::Framed<tokio::net::TcpStream, FrameCodec<EspResponse, EspClientFrame>>;

/// A framed ESP connection that has said Hello (with `token`), and the node's answer to it
/// (within 10 s).
async fn esp_hello(esp: std::net::SocketAddr, token: Option<&str>) -> (EspFramed, EspResponse) {
    let stream = tokio::net::TcpStream::connect(esp).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(
        stream,
        FrameCodec::<EspResponse, EspClientFrame>::default(),
    );
    framed
        .send(EspClientFrame::Hello(EspHello {
            version: ESP_PROTOCOL_VERSION,
            client_name: "test".into(),
            token: token.map(str::to_string),
        }))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), framed.next())
        .await
        .expect("every Hello is answered")
        .unwrap()
        .unwrap();
    (framed, answer)
}

async fn esp_tcp(gw: &Gateway) -> EspFramed {
    let (framed, welcome) = esp_hello(gw.esp, None).await;
    assert_eq!(welcome.status, EspStatus::Ok, "{welcome:?}");
    framed
}

#[tokio::test]
async fn echo_bot_lifecycle_over_http_and_tcp_esp() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");

    // StartBot over HTTP; the echo bot answers and counts.
    let mut ann = Customer::open(&chat, "echo-http").await;
    let started = gw
        .start_bot("echo-http", &[("ChatBotID", "echo"), ("Nickname", "Echo")])
        .await;
    let instance = started["BotInstanceId"].as_str().unwrap().to_string();
    ann.say("hello").await;
    assert_eq!(ann.next_reply().await, "1: hello");
    ann.say("again").await;
    assert_eq!(ann.next_reply().await, "2: again");

    // The same bot twice: 409.
    let (status, dup) = gw
        .esp("StartBot", "echo-http", &[("ChatBotID", "echo")])
        .await;
    assert_eq!(
        (status, dup["code"].as_str()),
        (409, Some("already_running"))
    );
    // The same plugin under another name is another instance.
    let (status, other) = gw
        .esp(
            "StartBot",
            "echo-http",
            &[("ChatBotID", "echo"), ("ChatBotName", "second")],
        )
        .await;
    assert_eq!(status, 200, "{other}");
    let (status, _) = gw
        .esp(
            "StopBot",
            "echo-http",
            &[("ChatBotID", "echo"), ("ChatBotName", "second")],
        )
        .await;
    assert_eq!(status, 200);

    // Data sent by ESP reaches the running bot, in order with its chat events.
    let (status, sent) = gw
        .esp(
            "SendDataToBot",
            "echo-http",
            &[("ChatBotID", "echo"), ("Topic", "billing")],
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(
        ann.next_reply().await,
        "data: InteractionId=echo-http, Topic=billing"
    );

    let (_, st) = gw.esp("GetBotStatus", "echo-http", &[]).await;
    let bots = st["result"]["bots"].as_array().unwrap();
    assert!(
        bots.iter()
            .any(|b| b["instance_id"] == instance.as_str() && b["state"] == "running"),
        "{st}"
    );

    // StopBot: the bot leaves, the chat goes on.
    let (status, stopped) = gw
        .esp("StopBot", "echo-http", &[("ChatBotID", "echo")])
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["result"]["BotInstanceId"], instance.as_str());
    let report = gw.report_of(&instance).await;
    assert_eq!(report["end_reason"], "stop_requested");
    assert_eq!(report["ended_by"], "workflow");
    assert_eq!(report["abnormal"], false);
    assert_eq!(report["messages_received"], 2);
    assert_eq!(report["messages_sent"], 3);
    let t = ann.transcript().await;
    assert_eq!(t["closed"], false, "the chat goes on");
    let (status, gone) = gw
        .esp("StopBot", "echo-http", &[("ChatBotID", "echo")])
        .await;
    assert_eq!(
        (status, gone["code"].as_str()),
        (404, Some("no_such_instance"))
    );

    // GetBotStatus shows the finished instance and why it finished.
    let (_, st) = gw
        .esp("GetBotStatus", "echo-http", &[("ChatBotID", "echo")])
        .await;
    let mine = st["result"]["bots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["instance_id"] == instance.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        (mine["state"].as_str(), mine["reason"].as_str()),
        (Some("finished"), Some("stop_requested"))
    );

    // The chat is handed back to a bot: a new instance starts counting afresh.
    gw.start_bot("echo-http", &[("ChatBotID", "echo")]).await;
    ann.say("back").await;
    assert_eq!(ann.next_reply().await, "1: back");

    // StartBot over framed TCP, pipelined with a status request.
    let mut bob = Customer::open(&chat, "echo-tcp").await;
    let mut esp = esp_tcp(&gw).await;
    esp.send(EspClientFrame::Request(esp_request(
        7,
        "StartBot",
        "echo-tcp",
        &[("ChatBotID", "echo")],
    )))
    .await
    .unwrap();
    esp.send(EspClientFrame::Request(esp_request(
        8,
        "StartBot",
        "nowhere",
        &[("ChatBotID", "nobot")],
    )))
    .await
    .unwrap();
    let mut answers = [
        esp.next().await.unwrap().unwrap(),
        esp.next().await.unwrap().unwrap(),
    ];
    answers.sort_by_key(|a| a.request_id);
    assert!(
        matches!(answers[0].result, Some(EspResult::Started { .. })),
        "{:?}",
        answers[0]
    );
    assert_eq!(answers[1].code.as_deref(), Some("unknown_bot"));
    bob.say("over tcp").await;
    assert_eq!(bob.next_reply().await, "1: over tcp");
}

#[tokio::test]
async fn visibility_and_the_scripted_bot_hand_off() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");

    // An INT bot: the customer never sees it; agents do.
    let ann = Customer::open(&chat, "coach").await;
    let bot = gw
        .start_bot("coach", &[("ChatBotID", "echo"), ("Visibility", "INT")])
        .await;
    ann.say("secret question").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = ann.transcript().await;
        if messages(&t).contains(&"1: secret question".to_string()) {
            let answer = t["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["text"] == "1: secret question")
                .cloned()
                .unwrap();
            assert_eq!(answer["visibility"], "INT");
            assert_eq!(answer["style"], "bot");
            assert_eq!(answer["participant_type"], "agent");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no INT answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = ann.visible().await;
    assert!(
        !seen
            .iter()
            .any(|e| e["participant_id"] == bot["ParticipantId"]),
        "the customer saw the INT bot: {seen:?}"
    );

    // The scripted demo bot: greeting, an FAQ answer, a fallback, then a hand-off in waiting mode.
    let mut carl = Customer::open(&chat, "faq").await;
    let started = gw
        .start_bot(
            "faq",
            &[
                ("ChatBotID", "scripted"),
                ("ChatBotName", "demo"),
                ("ChatBotHoldup", "true"),
                ("Nickname", "Assistant"),
            ],
        )
        .await;
    assert!(carl
        .next_reply()
        .await
        .starts_with("Hello, I am the demo assistant"));
    carl.say("When are you open?").await;
    assert_eq!(
        carl.next_reply().await,
        "We are open from 8:00 to 20:00, Monday to Saturday."
    );
    carl.say("blah").await;
    assert!(carl
        .next_reply()
        .await
        .starts_with("Sorry, I did not get that"));
    carl.say("I want a human please").await;
    assert_eq!(
        carl.next_reply().await,
        "I am transferring you to an agent now."
    );
    let report = gw
        .report_of(started["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(report["end_reason"], "bot_left");
    assert_eq!(report["holdup"], true);
    let (_, ud) = chat.get("/sessions/faq/userdata").await;
    assert_eq!(ud["RouteTo"], "support");
    assert_eq!(ud["ChatBotHandoff"], "true");
    assert_eq!(ud["ChatBotResult"], "bot_left");
    assert_eq!(ud["ChatBotInstanceId"], started["BotInstanceId"]);
    let t = carl.transcript().await;
    assert_eq!(t["closed"], false, "the customer waits for an agent");
    let left = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "left" && e["participant_id"] == started["ParticipantId"]);
    assert!(left, "the bot left the chat");
    // An unknown script is refused before anything joins.
    let (status, e) = gw
        .esp(
            "StartBot",
            "faq",
            &[("ChatBotID", "scripted"), ("ChatBotName", "nope")],
        )
        .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("bad_parameter")),
        "{e}"
    );
}

#[tokio::test]
async fn every_end_condition_removes_the_bot_with_its_reason() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "[bots]\nhandling-timeout-ms = 500\n");

    // An agent arrives and StopBotOnAgentArrival=true.
    let ann = Customer::open(&chat, "agent-arrives").await;
    let b = gw
        .start_bot(
            "agent-arrives",
            &[("ChatBotID", "echo"), ("StopBotOnAgentArrival", "true")],
        )
        .await;
    // Another bot joining is not an agent arriving.
    gw.start_bot(
        "agent-arrives",
        &[("ChatBotID", "echo"), ("ChatBotName", "other")],
    )
    .await;
    chat.post(
        "/sessions/agent-arrives/participants",
        json!({"nickname": "Agent", "type": "agent"}),
    )
    .await;
    let r = gw.report_of(b["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(
        (r["end_reason"].as_str(), r["ended_by"].as_str()),
        (Some("agent_arrived"), Some("agent"))
    );
    let _ = ann;

    // The customer leaves and StopBotOnCustomerLeft=true.
    let ann = Customer::open(&chat, "customer-leaves").await;
    chat.post(
        "/sessions/customer-leaves/participants",
        json!({"nickname": "Agent", "type": "agent"}),
    )
    .await;
    let b = gw
        .start_bot(
            "customer-leaves",
            &[("ChatBotID", "echo"), ("StopBotOnCustomerLeft", "true")],
        )
        .await;
    ann.leave("keep-alive").await;
    assert_eq!(
        gw.report_of(b["BotInstanceId"].as_str().unwrap()).await["end_reason"],
        "customer_left"
    );

    // Everyone but bots has left.
    let ann = Customer::open(&chat, "all-left").await;
    let b = gw.start_bot("all-left", &[("ChatBotID", "echo")]).await;
    ann.leave("keep-alive").await;
    assert_eq!(
        gw.report_of(b["BotInstanceId"].as_str().unwrap()).await["end_reason"],
        "participants_left"
    );

    // The session closes (force-close): the bot is disposed of, no leave is sent.
    let ann = Customer::open(&chat, "closed").await;
    let b = gw.start_bot("closed", &[("ChatBotID", "echo")]).await;
    ann.leave("force-close").await;
    assert_eq!(
        gw.report_of(b["BotInstanceId"].as_str().unwrap()).await["end_reason"],
        "session_closed"
    );
    let t = ann.transcript().await;
    let bot_left = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "left" && e["participant_id"] == b["ParticipantId"]);
    assert!(!bot_left, "no leave after the session closed");

    // A panicking bot is stopped (error); another bot in the same node and session keeps answering.
    let mut ann = Customer::open(&chat, "faults").await;
    let faulty = gw.start_bot("faults", &[("ChatBotID", "faulty")]).await;
    gw.start_bot("faults", &[("ChatBotID", "echo")]).await;
    ann.say("panic").await;
    let r = gw
        .report_of(faulty["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(
        (r["end_reason"].as_str(), r["abnormal"].as_bool()),
        (Some("error"), Some(true))
    );
    assert!(r["error"].as_str().unwrap().contains("panicked"), "{r}");
    assert_eq!(ann.next_reply().await, "1: panic");
    ann.say("still there?").await;
    assert_eq!(ann.next_reply().await, "2: still there?");
    // An error and a stall (longer than bots.handling-timeout-ms) end the same way.
    for (word, expect) in [
        ("error", "asked to fail"),
        ("stall", "took longer than 500 ms"),
    ] {
        let name = format!("f-{word}");
        let f = gw
            .start_bot("faults", &[("ChatBotID", "faulty"), ("ChatBotName", &name)])
            .await;
        ann.say(word).await;
        let r = gw.report_of(f["BotInstanceId"].as_str().unwrap()).await;
        assert_eq!(r["end_reason"], "error");
        assert!(r["error"].as_str().unwrap().contains(expect), "{r}");
    }
}

#[tokio::test]
async fn invalid_requests_get_stable_codes() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");
    let _ann = Customer::open(&chat, "v").await;
    let long44 = "x".repeat(44);
    let c51 = "c".repeat(51);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("StartBot", vec![], 400, "missing_parameter"),
        ("StartBot", vec![("ChatBotID", "nobot")], 404, "unknown_bot"),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("_umsChannel", "voice")],
            400,
            "bad_channel",
        ),
        (
            "StartBot",
            vec![("ChatBotID", &long44), ("ChatBotName", "abcde")],
            400,
            "name_too_long",
        ),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("ChatBotCategory", &c51)],
            400,
            "label_too_long",
        ),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("ChatBotFunction", &c51)],
            400,
            "label_too_long",
        ),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("ChatBotHoldup", "maybe")],
            400,
            "bad_boolean",
        ),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("StopBotOnAgentArrival", "1")],
            400,
            "bad_boolean",
        ),
        (
            "StartBot",
            vec![("ChatBotID", "echo"), ("Visibility", "PUBLIC")],
            400,
            "bad_visibility",
        ),
        (
            "StopBot",
            vec![("ChatBotID", "echo"), ("Extra", "x")],
            400,
            "unknown_parameter",
        ),
        (
            "StopBot",
            vec![("ChatBotID", "echo")],
            404,
            "no_such_instance",
        ),
        (
            "SendDataToBot",
            vec![("ChatBotID", "echo")],
            404,
            "no_such_instance",
        ),
        (
            "RestartBot",
            vec![("ChatBotID", "echo")],
            400,
            "unknown_method",
        ),
    ];
    for (method, params, status, code) in cases {
        let (got, answer) = gw.esp(method, "v", &params).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{method} {params:?}: {answer}"
        );
        assert_eq!(answer["status"], "error");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A session that does not exist on the Chat Server.
    let (status, a) = gw
        .esp("StartBot", "no-such-chat", &[("ChatBotID", "echo")])
        .await;
    assert_eq!(
        (status, a["code"].as_str()),
        (404, Some("no_such_session")),
        "{a}"
    );
    // No interaction id in userdata; a wrong service; garbage JSON.
    let body = json!({"service": "ChatBotPlatform", "method": "StartBot", "parameters": {"ChatBotID": "echo", "_umsChannel": "channel-chatbot"}});
    let (status, a) = support::http(gw.http, "POST", "/esp", Some(body)).await;
    assert_eq!(
        (status, a["code"].as_str()),
        (400, Some("missing_interaction"))
    );
    let body = json!({"service": "Chat", "method": "StartBot", "userdata": {"InteractionId": "v"}});
    let (status, a) = support::http(gw.http, "POST", "/esp", Some(body)).await;
    assert_eq!((status, a["code"].as_str()), (400, Some("unknown_service")));
    let (status, a) = support::http(gw.http, "POST", "/esp", Some(json!("not an object"))).await;
    assert_eq!((status, a["code"].as_str()), (400, Some("bad_request")));
    // 48 characters are fine; 50 characters of category are fine.
    let id44 = "e".repeat(44);
    let c50 = "c".repeat(50);
    let (status, a) = gw
        .esp(
            "StartBot",
            "v",
            &[
                ("ChatBotID", &id44),
                ("ChatBotName", "abcd"),
                ("ChatBotCategory", &c50),
            ],
        )
        .await;
    assert_eq!(
        (status, a["code"].as_str()),
        (404, Some("unknown_bot")),
        "only the unknown id is wrong: {a}"
    );
}

/// Every port of a node and of its Chat Server refuses a missing or wrong credential: ESP over
/// HTTP and TCP, the admin routes, and the Chat Server's TCP port (a node with the wrong
/// credential never connects; one with the right one serves bots).
#[tokio::test]
async fn every_port_refuses_a_missing_or_wrong_credential() {
    let dir = TempDir::new("creds");
    let file = dir.path().join("credentials");
    let chat_token = "chat-gateway-token-0123456789";
    std::fs::write(&file, format!("gateway bgs {chat_token}\n")).unwrap();
    let chat = ChatServer::start(&["--credentials", file.to_str().unwrap()]);
    let gw = Gateway::start(
        chat.tcp,
        &format!("[auth]\ntoken = \"s3cret\"\n[chat-server]\ncredential = \"{chat_token}\"\n"),
    );
    for token in [None, Some("wrong")] {
        let (status, a) = gw.esp_with("GetBotStatus", "x", &[], token).await;
        assert_eq!((status, a["code"].as_str()), (401, Some("unauthorized")));
    }
    for (method, path) in [("GET", "/admin/bots"), ("POST", "/admin/switchover")] {
        let (status, _) = http(gw.http, method, path, None).await;
        assert_eq!(status, 401, "{method} {path}");
    }
    for token in [None, Some("wrong")] {
        let (_, refused) = esp_hello(gw.esp, token).await;
        assert_eq!(refused.code.as_deref(), Some("unauthorized"), "{refused:?}");
    }
    let (mut framed, welcome) = esp_hello(gw.esp, Some("s3cret")).await;
    assert_eq!(welcome.status, EspStatus::Ok);
    framed
        .send(EspClientFrame::Request(esp_request(
            2,
            "GetBotStatus",
            "x",
            &[],
        )))
        .await
        .unwrap();
    assert_eq!(framed.next().await.unwrap().unwrap().status, EspStatus::Ok);

    // The node with the Chat Server's credential serves a bot.
    let mut customer = Customer::open(&chat, "creds-1").await;
    let (status, a) = gw
        .esp_with(
            "StartBot",
            &customer.session,
            &[("ChatBotID", "echo")],
            Some("s3cret"),
        )
        .await;
    assert_eq!(status, 200, "{a}");
    customer.say("hello").await;
    assert_eq!(customer.next_reply().await, "1: hello");

    // A node with a wrong credential is refused by the Chat Server, says why, and is not ready.
    let wrong = Gateway::start(
        chat.tcp,
        "[node]\nid = \"bgs-wrong\"\n[chat-server]\ncredential = \"not-the-token-at-all\"\n",
    );
    wrong
        .wait_log("the chat server refused this node's credential")
        .await;
    let (status, _) = http(wrong.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(
        !wrong.log().contains("not-the-token-at-all"),
        "a secret in the log"
    );
    let (_, stats) = chat.get("/stats").await;
    assert!(
        stats["refused"]["unauthorized"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

/// Framed ESP cannot be held by strangers: a Hello-less flood closes its oldest connections,
/// connections past `node.esp-max-connections` are refused `capacity`, a frame announced before
/// the Hello may be 16 KiB at most, and health and admin answer throughout.
#[tokio::test]
async fn framed_esp_connections_are_capped_and_the_node_keeps_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        "[node]\nesp-max-connections = 3\nesp-frame-timeout-ms = 300\n",
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        let (framed, answer) = esp_hello(gw.esp, None).await;
        assert_eq!(answer.status, EspStatus::Ok, "{answer:?}");
        open.push(framed);
    }
    let (_, refused) = esp_hello(gw.esp, None).await;
    assert_eq!(refused.code.as_deref(), Some("capacity"), "{refused:?}");
    assert_eq!(http(gw.http, "GET", "/healthz", None).await.0, 200);
    // The open ones still work; one closed makes room for another.
    open[0]
        .send(EspClientFrame::Request(esp_request(
            1,
            "GetBotStatus",
            "x",
            &[],
        )))
        .await
        .unwrap();
    assert_eq!(open[0].next().await.unwrap().unwrap().status, EspStatus::Ok);
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (framed, answer) = esp_hello(gw.esp, None).await;
        if answer.status == EspStatus::Ok {
            open.push(framed);
            break;
        }
        assert_eq!(answer.code.as_deref(), Some("capacity"));
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A frame begun and never finished closes its connection after esp-frame-timeout-ms.
    open[1]
        .get_mut()
        .write_all(&[0, 0, 0, 100, 1, 2])
        .await
        .unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), open[1].next())
        .await
        .expect("a stalled frame is cut off")
        .unwrap()
        .unwrap();
    assert!(
        cut.message
            .as_deref()
            .unwrap_or("")
            .contains("not complete within 300 ms"),
        "{cut:?}"
    );

    // 80 connections that never say Hello: the oldest are closed with `capacity` as more come.
    let mut silent = Vec::new();
    for _ in 0..80 {
        silent.push(tokio::net::TcpStream::connect(gw.esp).await.unwrap());
    }
    let mut first = silent.remove(0);
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut raw))
        .await
        .expect("the oldest silent connection is closed at once, not after the Hello timeout")
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).contains("waiting for their Hello"));
    assert_eq!(http(gw.http, "GET", "/healthz", None).await.0, 200);

    // A frame announcing 1 MiB before the Hello is refused from its length.
    drop(silent);
    let mut s = tokio::net::TcpStream::connect(gw.esp).await.unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("refused at once")
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).contains("exceeds the maximum of 16384"));

    let (_, metrics) = http(gw.http, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("bgs_connections_refused_total{port=\"esp\",reason=\"capacity\"}"),
        "{metrics}"
    );
}

/// Silent connections on the HTTP port (more than the node's cap, and than one address may
/// hold) never keep a client that speaks out: each new connection ends the oldest silent one,
/// so /healthz and ESP are answered long before the head deadline would free anything.
#[tokio::test]
async fn silent_http_connections_cannot_keep_health_checks_and_workflows_out() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        "[node]\nhttp-max-connections = 40\nhttp-max-connections-per-client = 16\nhttp-read-timeout-ms = 60000\n",
    );
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(tokio::net::TcpStream::connect(gw.http).await.unwrap());
    }
    for _ in 0..3 {
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(20),
            http(gw.http, "GET", "/healthz", None),
        )
        .await
        .expect("answered long before the 60 s head deadline frees a slot");
        assert_eq!(status, 200);
        let (status, answer) = tokio::time::timeout(
            Duration::from_secs(20),
            http(
                gw.http,
                "POST",
                "/esp",
                Some(
                    json!({"service": "ChatBotPlatform", "method": "GetBotStatus",
                    "parameters": {"_umsChannel": "channel-chatbot"},
                    "userdata": {"InteractionId": "nope"}}),
                ),
            ),
        )
        .await
        .expect("ESP answered too");
        assert_eq!(status, 200, "{answer}");
    }
    let (_, metrics) = http(gw.http, "GET", "/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("bgs_connections_refused_total{port=\"http\",reason=\"silent\"}"),
        "{metrics}"
    );
    drop(silent);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Strangers past the Hello (a node with no token) who each send most of a 1 MiB frame and
/// stop: the node holds at most its budget of unfinished frames, not a megabyte each, and a
/// workflow's requests go on being answered.
#[tokio::test]
async fn half_sent_esp_frames_are_bounded_node_wide() {
    use tokio::io::AsyncWriteExt;
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(
        chat.tcp,
        "[node]\nesp-max-connections = 400\nesp-frame-timeout-ms = 60000\n",
    );
    let mut workflow = esp_tcp(&gw).await;
    let before = rss_kib(gw.pid());
    let body = vec![7u8; 900 << 10];
    let mut strangers = Vec::new();
    for _ in 0..150 {
        let (mut framed, answer) = esp_hello(gw.esp, None).await;
        assert_eq!(answer.status, EspStatus::Ok);
        let s = framed.get_mut();
        let _ = s.write_all(&(1u32 << 20).to_be_bytes()).await;
        // The node stops reading (and closes) a stranger past its share: the write may fail.
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&body)).await;
        strangers.push(framed);
    }
    workflow
        .send(EspClientFrame::Request(esp_request(
            1,
            "GetBotStatus",
            "x",
            &[],
        )))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), workflow.next())
        .await
        .expect("the workflow is answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, EspStatus::Ok, "{answer:?}");
    let grown = rss_kib(gw.pid()).saturating_sub(before) >> 10;
    assert!(
        grown < 72,
        "the node grew {grown} MiB for 150 half-sent frames (132 MiB sent)"
    );
    assert_eq!(http(gw.http, "GET", "/healthz", None).await.0, 200);
}

/// Issue 11's case: with a small open-files limit, a crowd of idle framed-ESP clients used to
/// take every descriptor and the node stopped answering /healthz. The caps are fitted to the
/// limit, so the crowd is refused `capacity` and health, admin and ESP over HTTP still answer.
#[tokio::test]
async fn idle_esp_clients_cannot_take_every_file_descriptor() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start_with_open_files(chat.tcp, "", Some(400));
    let mut crowd = Vec::new();
    let mut refused = 0;
    for _ in 0..450 {
        let (framed, answer) = esp_hello(gw.esp, None).await;
        match answer {
            a if a.status == EspStatus::Ok => crowd.push(framed),
            a if a.code.as_deref() == Some("capacity") => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(
        refused > 300,
        "only {refused} refused, {} admitted",
        crowd.len()
    );
    assert!(!crowd.is_empty());
    assert_eq!(http(gw.http, "GET", "/healthz", None).await.0, 200);
    let (status, a) = gw.esp("GetBotStatus", "x", &[]).await;
    assert_eq!(status, 200, "{a}");
    assert!(gw.log().contains("do not fit the open-files limit"));
}

#[tokio::test]
async fn chat_server_kill_9_and_restart_mid_chat() {
    let dir = TempDir::new("chat-data");
    let data = dir.path().to_str().unwrap().to_string();
    let chat = ChatServer::start(&["--data-dir", &data]);
    let (http, tcp) = (chat.http.to_string(), chat.tcp.to_string());
    let gw = Gateway::start(chat.tcp, "");
    let mut ann = Customer::open(&chat, "restart").await;
    let (customer, session) = (ann.id.clone(), ann.session.clone());
    let bot = gw.start_bot("restart", &[("ChatBotID", "echo")]).await;
    ann.say("one").await;
    assert_eq!(ann.next_reply().await, "1: one");
    let since = ann.since;
    drop(ann);
    chat.kill9();

    // The Chat Server comes back where it was; the customer writes while the gateway is away.
    let chat = ChatServer::start_at(&http, &tcp, &["--data-dir", &data]);
    let mut ann = Customer {
        chat: &chat,
        session,
        id: customer,
        since,
    };
    ann.say("two").await;
    assert_eq!(
        ann.next_reply().await,
        "2: two",
        "the bot answers what it missed"
    );
    ann.say("three").await;
    assert_eq!(ann.next_reply().await, "3: three");
    let t = ann.transcript().await;
    assert_eq!(
        messages(&t).iter().filter(|m| *m == "2: two").count(),
        1,
        "answered once: {t}"
    );
    let (_, st) = gw.esp("GetBotStatus", "restart", &[]).await;
    assert_eq!(st["result"]["bots"][0]["instance_id"], bot["BotInstanceId"]);
    assert_eq!(st["result"]["bots"][0]["state"], "running");

    // A Chat Server that lost its data (no data dir): the bot is gone there, so it ends.
    drop(chat);
    let chat = ChatServer::start_at(&http, &tcp, &[]);
    let r = gw.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(r["end_reason"], "removed_by_chat_server");
    drop(chat);
}

#[tokio::test]
async fn losing_the_chat_server_for_good_and_shutting_down() {
    let chat = ChatServer::start(&[]);
    let mut gw = Gateway::start(
        chat.tcp,
        "[channel-chatbot]\nha-chat-reconnecting-attempts = 3\n",
    );
    let _ann = Customer::open(&chat, "lost").await;
    let bot = gw.start_bot("lost", &[("ChatBotID", "echo")]).await;
    chat.kill9();
    let r = gw.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(
        (r["end_reason"].as_str(), r["abnormal"].as_bool()),
        (Some("chat_server_lost"), Some(true))
    );

    // The Chat Server returns: new bots work again; SIGTERM stops them with reason shutdown.
    let chat = ChatServer::start(&[]);
    let mut gw2 = Gateway::start(chat.tcp, "");
    let _bob = Customer::open(&chat, "shutdown").await;
    let bot = gw2.start_bot("shutdown", &[("ChatBotID", "echo")]).await;
    let status = gw2.terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let r = gw2.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(r["end_reason"], "shutdown");
    let _ = gw.terminate();
}

#[tokio::test]
async fn a_thousand_concurrent_bot_sessions_on_one_node() {
    const N: usize = 1000;
    let chat = ChatServer::start(&["--max-connections", "64"]);
    let gw = Gateway::start(chat.tcp, "");
    let mut customers = Vec::new();
    for i in 0..N {
        let (status, v) = chat
            .post(
                "/sessions",
                json!({"interaction_id": format!("load-{i}"), "nickname": "C"}),
            )
            .await;
        assert_eq!(status, 201);
        customers.push(v["participant_id"].as_str().unwrap().to_string());
    }
    // Start every bot over one pipelined ESP connection.
    let mut esp = esp_tcp(&gw).await;
    for i in 0..N {
        let req = esp_request(
            i as u64 + 1,
            "StartBot",
            &format!("load-{i}"),
            &[("ChatBotID", "echo")],
        );
        esp.feed(EspClientFrame::Request(req)).await.unwrap();
    }
    esp.flush().await.unwrap();
    for _ in 0..N {
        let a = tokio::time::timeout(Duration::from_secs(60), esp.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(a.status, EspStatus::Ok, "{a:?}");
    }
    // A supervisor watches every session over one connection while each customer writes once.
    let mut watcher = ChatClient::connect(chat.tcp, ClientRole::Agent)
        .await
        .unwrap();
    for i in 0..N {
        watcher
            .join(
                &format!("load-{i}"),
                "Watcher",
                ParticipantType::Supervisor,
                Style::Regular,
                Visibility::Vip,
                u64::MAX,
            )
            .await
            .unwrap();
    }
    let posts = futures_util::stream::iter(customers.iter().enumerate())
        .map(|(i, c)| {
            let chat = &chat;
            async move {
                let (status, _) = chat
                    .post(
                        &format!("/sessions/load-{i}/messages"),
                        json!({"participant_id": c, "text": "ping"}),
                    )
                    .await;
                assert_eq!(status, 200);
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>();
    posts.await;
    let mut answered = std::collections::HashSet::new();
    while answered.len() < N {
        match tokio::time::timeout(Duration::from_secs(60), watcher.next_frame())
            .await
            .unwrap()
            .unwrap()
        {
            ServerFrame::Events {
                session_id, events, ..
            } => {
                if events
                    .iter()
                    .any(|e| e.kind == EventKind::Message && e.text.as_deref() == Some("1: ping"))
                {
                    answered.insert(session_id);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (_, status) = support::http(gw.http, "GET", "/status", None).await;
    assert_eq!(status["bots"]["echo"], N);
    assert!(gw.reports().iter().all(|r| r["abnormal"] == false));
}

#[tokio::test]
async fn metrics_move_with_traffic_and_pass_promtool() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");
    let scrape = || async {
        let (status, body) = support::http(gw.http, "GET", "/metrics", None).await;
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_string()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    let before = scrape().await;
    let mut ann = Customer::open(&chat, "metrics").await;
    gw.start_bot(
        "metrics",
        &[
            ("ChatBotID", "echo"),
            ("ChatBotCategory", "Dialog"),
            ("ChatBotFunction", "Echo"),
        ],
    )
    .await;
    gw.esp("StartBot", "metrics", &[("ChatBotID", "echo")])
        .await; // 409
    ann.say("hello").await;
    assert_eq!(ann.next_reply().await, "1: hello");
    // The reply can reach the customer a moment before the handler's time is recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let during = loop {
        let text = scrape().await;
        if value(&text, "bgs_actor_handler_seconds_count{kind=\"bot\"}") >= 2.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bot's handler time was not counted: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(value(&during, "bgs_bots_active{plugin=\"echo\"}"), 1.0);
    assert_eq!(
        value(
            &during,
            "bgs_esp_requests_total{method=\"StartBot\",result=\"ok\"}"
        ) - value(
            &before,
            "bgs_esp_requests_total{method=\"StartBot\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &during,
            "bgs_esp_requests_total{method=\"StartBot\",result=\"already_running\"}"
        ),
        1.0
    );
    assert!(
        value(
            &during,
            "bgs_chat_events_total{direction=\"in\",kind=\"message\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &during,
            "bgs_chat_events_total{direction=\"out\",kind=\"message\"}"
        ) >= 1.0
    );
    assert_eq!(value(&during, "bgs_actors{kind=\"bot\"}"), 1.0);
    assert_eq!(value(&during, "bgs_ha_role"), 1.0);
    gw.esp("StopBot", "metrics", &[("ChatBotID", "echo")]).await;
    let after = scrape().await;
    assert_eq!(value(&after, "bgs_bots_active{plugin=\"echo\"}"), 0.0);
    assert_eq!(
        value(&after, "bgs_bots_stopped_total{plugin=\"echo\",reason=\"stop_requested\",category=\"Dialog\",function=\"Echo\"}"),
        1.0
    );
    assert_eq!(value(&after, "bgs_actors{kind=\"bot\"}"), 0.0);

    // promtool (Debian's prometheus package; .ci/run installs it) must accept the exposition.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(after.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("CI_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is required: {e}")
        }
        Err(e) => eprintln!("promtool not installed ({e}); skipping its check"),
    }
}

#[test]
fn bgs_demo_once_runs_to_the_switchover() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args(["demo", "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("We are open from 8:00 to 20:00"),
        "{stdout}"
    );
    assert!(stdout.contains("Switchover"), "{stdout}");
    assert!(
        stdout.contains("Delivery takes two to three working days"),
        "{stdout}"
    );
}

#[test]
fn the_deploy_kit_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for (file, role) in [
        ("bgs-primary.toml", "primary"),
        ("bgs-backup.toml", "backup"),
    ] {
        let config = bgs::config::Config::load(Some(&root.join(file)), |_| None)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(config.node.role.as_str(), role);
        assert!(config.ha.peer.is_some(), "{file} is a node of a pair");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/bgs-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    assert!(
        exprs.iter().any(|e| e.contains("bgs_ha_role"))
            && exprs.iter().any(|e| e.contains("bgs_esp_requests_total"))
    );
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root.join("prometheus/bgs-alerts.yml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if std::env::var_os("CI_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is required: {e}")
        }
        Err(e) => eprintln!("promtool not installed ({e}); skipping the rules check"),
    }
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(root.join("prometheus/prometheus.yml"))
        .output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let statuses: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let body = (method == "post").then(|| {
                if path == "/esp" {
                    json!({"service": "ChatBotPlatform", "method": "GetBotStatus", "parameters": {"_umsChannel": "channel-chatbot"}, "userdata": {"InteractionId": "x"}})
                } else {
                    json!({})
                }
            });
            let (status, answer) = support::http(gw.http, &method.to_uppercase(), path, body).await;
            assert!(
                statuses.contains(&status),
                "{} {path} answered {status} (documented {statuses:?}): {answer}",
                method.to_uppercase()
            );
            assert_ne!(
                answer["code"], "not_found",
                "{path} is documented but not served"
            );
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    // Every route the node serves is documented (the list in src/http.rs).
    for route in bgs::http::ROUTES {
        assert!(
            documented.contains(&route.to_string()),
            "{route} is served but not in docs/openapi.json"
        );
    }
    assert_eq!(documented.len(), bgs::http::ROUTES.len());
}

#[tokio::test]
async fn a_request_not_processed_within_esp_proc_timeout_gets_a_negative_answer() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "[settings]\nesp-proc-timeout = 5\n");
    let _ann = Customer::open(&chat, "slow").await;
    gw.wait_status("connected", |s| s["chat_servers"][0]["connected"] == true)
        .await;
    // The Chat Server goes away: the join waits for the reconnection that does not come.
    chat.kill9();
    let started = std::time::Instant::now();
    let (status, answer) = gw.esp("StartBot", "slow", &[("ChatBotID", "echo")]).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (504, Some("timeout")),
        "{answer}"
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .contains("esp-proc-timeout"));
}

#[tokio::test]
async fn a_waiting_workflow_learns_the_outcome_even_when_the_chat_server_removed_the_bot() {
    let dir = TempDir::new("holdup-data");
    let data = dir.path().to_str().unwrap().to_string();
    let chat = ChatServer::start(&["--data-dir", &data, "--detach-grace", "1"]);
    let (http, tcp) = (chat.http.to_string(), chat.tcp.to_string());
    // The gateway comes back later than the Chat Server's grace period.
    let gw = Gateway::start(
        chat.tcp,
        "[channel-chatbot]\nha-chat-reconnecting-delay = 2.5\n",
    );
    let _ann = Customer::open(&chat, "held").await;
    let bot = gw
        .start_bot("held", &[("ChatBotID", "echo"), ("ChatBotHoldup", "true")])
        .await;
    chat.kill9();
    let chat = ChatServer::start_at(&http, &tcp, &["--data-dir", &data, "--detach-grace", "1"]);
    let r = gw.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(r["end_reason"], "removed_by_chat_server");
    let ud = wait_outcome(&chat, "held", "removed_by_chat_server").await;
    assert_eq!(ud["ChatBotInstanceId"], bot["BotInstanceId"]);
}

#[tokio::test]
async fn a_waiting_workflow_learns_the_outcome_when_the_session_closes_or_the_node_stops() {
    let chat = ChatServer::start(&[]);
    let mut gw = Gateway::start(chat.tcp, "");
    // The session closes under the bot: the outcome is written as the system, after the close.
    let ann = Customer::open(&chat, "held-close").await;
    let closed = gw
        .start_bot(
            "held-close",
            &[("ChatBotID", "echo"), ("ChatBotHoldup", "true")],
        )
        .await;
    ann.leave("force-close").await;
    let r = gw
        .report_of(closed["BotInstanceId"].as_str().unwrap())
        .await;
    assert_eq!(r["end_reason"], "session_closed");
    let ud = ann.userdata().await;
    assert_eq!(ud["ChatBotResult"], "session_closed", "{ud}");
    assert_eq!(ud["ChatBotInstanceId"], closed["BotInstanceId"]);
    assert_eq!(ann.transcript().await["closed"], true);

    // A single node stops (no backup to hand over to): the waiting workflow is told `shutdown`.
    let bob = Customer::open(&chat, "held-stop").await;
    let stopped = gw
        .start_bot(
            "held-stop",
            &[("ChatBotID", "echo"), ("ChatBotHoldup", "true")],
        )
        .await;
    assert!(gw.terminate().success());
    let ud = bob.userdata().await;
    assert_eq!(ud["ChatBotResult"], "shutdown", "{ud}");
    assert_eq!(ud["ChatBotInstanceId"], stopped["BotInstanceId"]);
    assert!(ud["ChatBotEndedAt"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
}

#[tokio::test]
async fn the_outcome_of_a_bot_lost_with_its_chat_server_is_written_when_it_is_back() {
    let dir = TempDir::new("lost-data");
    let data = dir.path().to_str().unwrap().to_string();
    let chat = ChatServer::start(&["--data-dir", &data]);
    let (http, tcp) = (chat.http.to_string(), chat.tcp.to_string());
    let gw = Gateway::start(
        chat.tcp,
        "[channel-chatbot]\nha-chat-reconnecting-delay = 0.2\nha-chat-reconnecting-attempts = 2\n",
    );
    let _ann = Customer::open(&chat, "held-lost").await;
    let bot = gw
        .start_bot(
            "held-lost",
            &[("ChatBotID", "echo"), ("ChatBotHoldup", "true")],
        )
        .await;
    chat.kill9();
    let r = gw.report_of(bot["BotInstanceId"].as_str().unwrap()).await;
    assert_eq!(r["end_reason"], "chat_server_lost");
    // The link keeps trying after its attempts ran out; the outcome goes out when it is back.
    let chat = ChatServer::start_at(&http, &tcp, &["--data-dir", &data]);
    let ud = wait_outcome(&chat, "held-lost", "chat_server_lost").await;
    assert_eq!(ud["ChatBotInstanceId"], bot["BotInstanceId"]);
}

/// Waits until the session's userdata say `ChatBotResult = reason`; the userdata then.
async fn wait_outcome(chat: &ChatServer, session: &str, reason: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, ud) = chat.get(&format!("/sessions/{session}/userdata")).await;
        if ud["ChatBotResult"] == reason {
            return ud;
        }
        assert!(tokio::time::Instant::now() < deadline, "no outcome in {ud}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_an_unknown_path_404_and_logs_to_a_file_have_no_colour() {
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "");
    let (status, body) = support::http(gw.http, "GET", "/esp", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("POST"), "{body}");
    let (status, body) = support::http(
        gw.http,
        "GET",
        "/bf/c/v3/conversations/x/activities/y",
        None,
    )
    .await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = support::http(gw.http, "GET", "/nope", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    // The node's stderr is a file here, not a terminal: no colour codes in it.
    let log = gw.log();
    assert!(log.contains("bgs node started"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    // A missing configuration file: the path and the OS error, said once.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args(["serve", "--config", "/nonexistent/bgs.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/bgs.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[tokio::test]
async fn a_request_body_sent_a_byte_at_a_time_is_refused_when_its_time_runs_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "[node]\nhttp-read-timeout-ms = 300\n");
    let mut slow = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    slow.write_all(
        b"POST /esp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    // One more byte now and then, never the whole body: the node answers 408 and closes.
    let drip = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b" ").await.is_err() {
                return;
            }
        }
    };
    let mut answer = Vec::new();
    tokio::select! {
        _ = drip => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("the slow request is still open"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 300 ms"), "{text}");
    // The node still answers others.
    let (status, _) = support::http(gw.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

/// schemathesis (from PyPI) against docs/openapi.json and a running node with a token, for a
/// bounded time: no 5xx, answers that match the document (status, content type, schema,
/// headers), `Allow` on 405, and a 401 whenever the token is left out. Skipped when schemathesis
/// is not installed, unless CI_REQUIRE_SCHEMATHESIS is set (CI installs it).
#[tokio::test]
async fn schemathesis_finds_nothing_against_the_openapi_document() {
    let have = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("CI_REQUIRE_SCHEMATHESIS").is_none(),
            "schemathesis is required (pip install schemathesis)"
        );
        eprintln!("skipped: schemathesis is not installed");
        return;
    }
    let chat = ChatServer::start(&[]);
    let gw = Gateway::start(chat.tcp, "[auth]\ntoken = \"schemathesis-token\"\n");
    let secs = std::env::var("BGS_SCHEMATHESIS_SECS").unwrap_or_else(|_| "30".into());
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let mut child = tokio::process::Command::new("schemathesis")
        .args(["run", schema, "--url", &format!("http://{}", gw.http)])
        .args(["--checks", "all"])
        // The document cannot say which parameters each ESP method needs (ESP.md 3 does): a
        // schema-valid body may still be refused 400, as documented.
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-time", &secs, "--seed", "1"])
        .args(["-H", "Authorization: Bearer schemathesis-token"])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let read = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut out, &mut s).await;
        s
    });
    let limit = Duration::from_secs(secs.parse::<u64>().unwrap_or(30) + 120);
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .expect("schemathesis ends within its time budget")
        .unwrap();
    let output = read.await.unwrap();
    assert!(status.success(), "schemathesis found problems:\n{output}");
    assert_eq!(http(gw.http, "GET", "/healthz", None).await.0, 200);
}

/// `bgs bench --quick` runs end to end (a Chat Server, a node, echo bots and the floor relay)
/// and writes the figures docs/PERFORMANCE.md names; every post is answered. No timing is
/// asserted: the figures of a loaded CI machine mean nothing.
#[test]
fn bgs_bench_quick_runs_and_writes_its_json() {
    let dir = TempDir::new("bench");
    let json = dir.path().join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs"))
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "ratio_p99",
        "bytes_per_bot",
        "startbot_per_s",
        "messages_per_s",
    ] {
        assert!(v[key].is_number(), "{key} in {v}");
    }
    for key in ["gateway", "floor"] {
        assert!(v[key]["p99_ms"].is_number(), "{key}.p99_ms in {v}");
    }
    assert_eq!(v["errors"], 0, "every post answered: {v}");
    assert_eq!(v["answered"], v["sent"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("floor (bare relay)"));
}
