#![allow(clippy::unwrap_used, clippy::expect_used)]

//! End-to-end tests of the reference Chat Server: the real binary, real sockets.

mod support;

use std::time::Duration;

use bgs_chat_server::client::{ChatClient, ClientError};
use bgs_proto::chat::{
    AfterAction, ChatErrorCode, ChatEvent, ChatRequest, ClientFrame, ClientRole, EventKind, Hello,
    JoinRequest, ParticipantType, Reason, ServerFrame, Style, Visibility, CHAT_PROTOCOL_VERSION,
};
use bgs_proto::codec::{encode_frame, FrameCodec};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{Server, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn gateway(epoch: u64) -> ClientRole {
    ClientRole::Gateway {
        cluster_id: "bgs".into(),
        epoch,
        node_id: format!("node-{epoch}"),
    }
}

fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn is_message(text: &'static str) -> impl Fn(&ChatEvent) -> bool {
    move |e| e.kind == EventKind::Message && e.text.as_deref() == Some(text)
}

#[tokio::test]
async fn customer_and_agent_chat_with_visibility() {
    let server = Server::start(&[]);
    let (sid, customer) = server.create_session("chat-1").await;

    let mut agent = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();
    let (agent_id, _) = agent
        .join(
            &sid,
            "Agent Smith",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    // The agent first receives the history: the customer's join and its own.
    let history = agent
        .events_until(&sid, &agent_id, |e| e.participant_id == agent_id)
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].participant_type, ParticipantType::Customer);

    // A coaching (INT) bot and a monitoring (VIP) supervisor join too.
    let (_, bot_join) = agent
        .join(
            &sid,
            "Helper",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::Int,
            u64::MAX,
        )
        .await
        .unwrap();
    let (status, sup) = server
        .post(
            &format!("/sessions/{sid}/participants"),
            json!({"nickname": "Sup", "type": "supervisor", "visibility": "VIP"}),
        )
        .await;
    assert_eq!(status, 200, "{sup}");
    let sup_id = sup["participant_id"].as_str().unwrap().to_string();

    // The customer writes over HTTP; the agent gets it over TCP.
    let (status, posted) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "hello, I need help"}),
        )
        .await;
    assert_eq!(status, 200, "{posted}");
    agent
        .events_until(&sid, &agent_id, is_message("hello, I need help"))
        .await
        .unwrap();

    // The agent answers for everyone, then whispers (INT) to colleagues.
    agent
        .post(
            &sid,
            &agent_id,
            "whisper: VIP customer",
            Visibility::Int,
            None,
        )
        .await
        .unwrap();
    agent
        .post(&sid, &agent_id, "how can I help?", Visibility::All, None)
        .await
        .unwrap();

    let seen = server
        .events_until(&sid, &customer, 0, |e| e["text"] == "how can I help?")
        .await;
    assert_eq!(texts(&seen), vec!["hello, I need help", "how can I help?"]);
    // The customer saw its own join and the agent's, nothing of the INT bot or VIP supervisor.
    let joins: Vec<u64> = seen
        .iter()
        .filter(|e| e["kind"] == "joined")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(joins, vec![1, 2]);
    assert!(!seen.iter().any(|e| e["seq"] == bot_join));
    assert!(seen.iter().all(|e| e["visibility"] == "ALL"));
    // Absent fields are left out of event objects.
    assert!(seen[0].get("text").is_none(), "{}", seen[0]);

    // The supervisor sees everything, including the whisper and the INT bot.
    let sup_seen = server
        .events_until(&sid, &sup_id, 0, |e| e["text"] == "how can I help?")
        .await;
    assert!(sup_seen
        .iter()
        .any(|e| e["text"] == "whisper: VIP customer"));
    assert!(sup_seen.iter().any(|e| e["seq"] == bot_join));

    // The transcript has every event, unfiltered, and the userdata.
    let (status, transcript) = server.get(&format!("/sessions/{sid}/transcript")).await;
    assert_eq!(status, 200);
    assert_eq!(transcript["closed"], false);
    assert_eq!(transcript["userdata"]["lang"], "en");
    assert_eq!(transcript["events"].as_array().unwrap().len(), 7);

    // Userdata: read, update (an event the customer does not see), remove a key with null.
    let (status, ud) = server
        .patch(
            &format!("/sessions/{sid}/userdata"),
            json!({"topic": "billing", "lang": null}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ud, json!({"topic": "billing"}));
    let update = agent
        .events_until(&sid, &agent_id, |e| e.kind == EventKind::Userdata)
        .await
        .unwrap();
    assert_eq!(update.last().unwrap().visibility, Visibility::Int);
    let (_, ud) = server.get(&format!("/sessions/{sid}/userdata")).await;
    assert_eq!(ud, json!({"topic": "billing"}));

    // A WebSocket delivers the same event objects live.
    let url = format!(
        "ws://{}/sessions/{sid}/ws?participant_id={customer}&since=7",
        server.http
    );
    let ws_task = tokio::task::spawn_blocking(move || {
        let (mut ws, _) = tungstenite::connect(url).expect("websocket");
        loop {
            let msg = ws.read().expect("ws message");
            if let tungstenite::Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).expect("json event");
                if v["kind"] == "message" {
                    return v;
                }
            }
        }
    });
    // Wait until the socket is subscribed: post after a stats round trip would race, so post
    // repeatedly is not an option (keys!); instead the WebSocket starts at since=7 and replays.
    agent
        .post(
            &sid,
            &agent_id,
            "live over websocket",
            Visibility::All,
            None,
        )
        .await
        .unwrap();
    let ws_event = tokio::time::timeout(Duration::from_secs(10), ws_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ws_event["text"], "live over websocket");
    assert_eq!(ws_event["nickname"], "Agent Smith");

    // Errors: unknown session, unknown participant, bad enum value, missing field.
    let (status, err) = server.get("/sessions/nope/transcript").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("unknown_session"))
    );
    let (status, err) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": "ghost", "text": "x"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("unknown_participant"))
    );
    let (status, err) = server
        .post(
            &format!("/sessions/{sid}/participants"),
            json!({"nickname": "x", "type": "robot"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{err}"
    );
    let (status, _) = server
        .post(
            "/sessions",
            json!({"interaction_id": "chat-1", "nickname": "again"}),
        )
        .await;
    assert_eq!(status, 409);
    // HTTP may not speak for a TCP participant.
    let (status, err) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": agent_id, "text": "x"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("not_allowed"))
    );
}

async fn closed_reason(server: &Server, sid: &str) -> Option<String> {
    let (_, t) = server.get(&format!("/sessions/{sid}/transcript")).await;
    t["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "closed")
        .map(|e| e["reason"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn after_actions_do_what_the_docs_say() {
    let server = Server::start(&[]);
    let mut tcp = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();

    // keep-alive: the customer leaves, the agent stays, the chat goes on; when the last
    // participant leaves the session closes (no-participants).
    let (sid, customer) = server.create_session("keep").await;
    let (agent, _) = tcp
        .join(
            &sid,
            "A",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    let (status, _) = server
        .post(
            &format!("/sessions/{sid}/leave"),
            json!({"participant_id": customer}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(closed_reason(&server, &sid).await, None);
    tcp.post(&sid, &agent, "still here", Visibility::All, None)
        .await
        .unwrap();
    tcp.leave(&sid, &agent, AfterAction::KeepAlive)
        .await
        .unwrap();
    assert_eq!(
        closed_reason(&server, &sid).await.as_deref(),
        Some("no-participants")
    );

    // close-if-no-agents: a bot is not an agent, so the customer leaving closes the chat...
    let (sid, customer) = server.create_session("cina").await;
    tcp.join(
        &sid,
        "Bot",
        ParticipantType::Agent,
        Style::Bot,
        Visibility::All,
        0,
    )
    .await
    .unwrap();
    let (status, _) = server
        .post(
            &format!("/sessions/{sid}/leave"),
            json!({"participant_id": customer, "after_action": "close-if-no-agents"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        closed_reason(&server, &sid).await.as_deref(),
        Some("no-agents")
    );
    // ...and a closed session refuses posts.
    let (status, err) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "x"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("session_closed")),
        "{err}"
    );

    // ...while a human agent keeps it open.
    let (sid, customer) = server.create_session("cina-agent").await;
    tcp.join(
        &sid,
        "Human",
        ParticipantType::Agent,
        Style::Regular,
        Visibility::All,
        0,
    )
    .await
    .unwrap();
    server
        .post(
            &format!("/sessions/{sid}/leave"),
            json!({"participant_id": customer, "after_action": "close-if-no-agents"}),
        )
        .await;
    assert_eq!(closed_reason(&server, &sid).await, None);

    // force-close: closes at once, whoever remains; everyone's feed ends with `closed`.
    let (sid, customer) = server.create_session("force").await;
    let (agent, _) = tcp
        .join(
            &sid,
            "A",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    let (status, _) = server
        .post(
            &format!("/sessions/{sid}/leave"),
            json!({"participant_id": customer, "after_action": "force-close"}),
        )
        .await;
    assert_eq!(status, 200);
    let events = tcp
        .events_until(&sid, &agent, |e| e.kind == EventKind::Closed)
        .await
        .unwrap();
    assert_eq!(events.last().unwrap().reason, Some(Reason::ForceClose));
    let err = tcp
        .post(&sid, &agent, "too late", Visibility::All, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ref e) if e.code == ChatErrorCode::SessionClosed),
        "{err}"
    );
}

#[tokio::test]
async fn idle_control_closes_a_quiet_session() {
    let server = Server::start(&["--idle-timeout", "1"]);
    let (sid, customer) = server.create_session("idle").await;
    let events = server
        .events_until(&sid, &customer, 0, |e| e["kind"] == "closed")
        .await;
    let closed = events.last().unwrap();
    assert_eq!(closed["reason"], "idle");
    assert_eq!(closed["participant_type"], "system");
    let (_, t) = server.get(&format!("/sessions/{sid}/transcript")).await;
    assert_eq!(t["closed"], true);
}

/// A gateway that reconnects twice quickly can have a resume of the connection it replaced read
/// after the new connection's (two sockets, no order between them). The older one must not take
/// the participant back: that connection is about to close, and the participant would be left
/// detached while the gateway follows it on the new one (found by the gateway's simulation).
#[tokio::test]
async fn a_resume_from_a_replaced_connection_does_not_take_the_participant_back() {
    let server = Server::start(&[]);
    let (sid, customer) = server.create_session("stale-resume").await;
    let mut first = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let (bot, _) = first
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    // The old connection stays open (its close is still on its way); the new one resumes.
    let mut newer = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    newer.resume(&sid, &bot, 0).await.unwrap();
    // The old connection's resume, read late, is refused; the newer one keeps the participant.
    let stale = first.resume(&sid, &bot, 0).await;
    assert!(
        matches!(&stale, Err(e) if e.to_string().contains("newer connection")),
        "{stale:?}"
    );
    drop(first);
    let (status, v) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "still heard"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    newer
        .events_until(&sid, &bot, is_message("still heard"))
        .await
        .unwrap();
}

#[tokio::test]
async fn rejoin_with_since_seq_gets_exactly_what_was_missed() {
    let server = Server::start(&[]);
    let (sid, customer) = server.create_session("rejoin").await;
    let say = |text: String| {
        let path = format!("/sessions/{sid}/messages");
        let body = json!({"participant_id": customer, "text": text});
        let server = &server;
        async move {
            let (status, v) = server.post(&path, body).await;
            assert_eq!(status, 200, "{v}");
            v["seq"].as_u64().unwrap()
        }
    };

    let mut gw = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let (bot, _) = gw
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    say("one".into()).await;
    let seen = gw
        .events_until(&sid, &bot, is_message("one"))
        .await
        .unwrap();
    let checkpoint = seen.last().unwrap().seq;
    drop(gw); // the connection drops: the bot is detached, not gone

    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(say(format!("missed {i}")).await);
    }
    let mut gw = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let last = gw.resume(&sid, &bot, checkpoint).await.unwrap();
    assert_eq!(last, *missed.last().unwrap());
    let replay = gw
        .events_until(&sid, &bot, is_message("missed 4"))
        .await
        .unwrap();
    let seqs: Vec<u64> = replay.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, missed, "exactly the missed events, in order");
    // Then live events, no duplicate of the replay.
    let live = say("live".into()).await;
    let next = gw.events_until(&sid, &bot, |_| true).await.unwrap();
    assert_eq!(next[0].seq, live);

    // The customer never saw the bot leave or come back.
    let (_, t) = server.get(&format!("/sessions/{sid}/transcript")).await;
    let kinds: Vec<&str> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "joined").count(), 2);
    assert!(!kinds.contains(&"left"));

    // A new participant joining with since_seq gets only what follows that number.
    let mut agent = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();
    let (aid, _) = agent
        .join(
            &sid,
            "Late",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            live - 1,
        )
        .await
        .unwrap();
    let got = agent
        .events_until(&sid, &aid, |e| e.participant_id == aid)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![live, live + 1]
    );

    // A detached participant leaves after the grace period; see `detach_grace_expires`.
}

#[tokio::test]
async fn detached_participant_leaves_after_the_grace_period() {
    let server = Server::start(&["--detach-grace", "1"]);
    let (sid, customer) = server.create_session("grace").await;
    let mut gw = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let (bot, _) = gw
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    drop(gw);
    let events = server
        .events_until(&sid, &customer, 0, |e| e["kind"] == "left")
        .await;
    let left = events.last().unwrap();
    assert_eq!(left["participant_id"], bot.as_str());
    assert_eq!(left["reason"], "disconnected");
    assert_eq!(left["after_action"], "keep-alive");
}

#[tokio::test]
async fn a_repeated_client_key_shows_once() {
    let server = Server::start(&[]);
    let (sid, customer) = server.create_session("keys").await;
    let body = json!({"participant_id": customer, "text": "pay my bill", "key": "k-1"});
    let (_, first) = server
        .post(&format!("/sessions/{sid}/messages"), body.clone())
        .await;
    let (_, second) = server
        .post(&format!("/sessions/{sid}/messages"), body)
        .await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["seq"], second["seq"]);

    let mut gw = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let (bot, _) = gw
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    let a = gw
        .post(&sid, &bot, "answer", Visibility::All, Some("bot-1-2-0"))
        .await
        .unwrap();
    let b = gw
        .post(&sid, &bot, "answer", Visibility::All, Some("bot-1-2-0"))
        .await
        .unwrap();
    assert_eq!((a.0, a.1, b.0, b.1), (a.0, false, a.0, true));

    let (_, t) = server.get(&format!("/sessions/{sid}/transcript")).await;
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec!["pay my bill", "answer"]
    );
}

#[tokio::test]
async fn a_higher_epoch_fences_a_lower_one() {
    let server = Server::start(&[]);
    let (sid, _) = server.create_session("fence").await;
    let mut old = ChatClient::connect(server.tcp, gateway(1)).await.unwrap();
    let (bot, _) = old
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    old.post(&sid, &bot, "from epoch 1", Visibility::All, None)
        .await
        .unwrap();

    let mut new = ChatClient::connect(server.tcp, gateway(2)).await.unwrap();
    // The old connection is told, then closed with a fenced goodbye: it can post nothing.
    loop {
        match old.next_frame().await.unwrap() {
            ServerFrame::Fenced { epoch, cluster_id } => {
                assert_eq!((epoch, cluster_id.as_str()), (2, "bgs"));
                break;
            }
            ServerFrame::Events { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    let err = old
        .post(&sid, &bot, "from epoch 1 again", Visibility::All, None)
        .await
        .unwrap_err();
    let fenced = |e: &ClientError| match e {
        ClientError::Refused(e) | ClientError::Closed(Some(e)) => e.code == ChatErrorCode::Fenced,
        // The socket may already be gone when the post is written.
        ClientError::Closed(None) | ClientError::Io(_) => true,
        _ => false,
    };
    assert!(fenced(&err), "{err}");

    // The new epoch resumes the bot and speaks for it.
    new.resume(&sid, &bot, 0).await.unwrap();
    new.post(&sid, &bot, "from epoch 2", Visibility::All, None)
        .await
        .unwrap();

    // A new connection at the old epoch is refused at the handshake.
    let refused = ChatClient::connect(server.tcp, gateway(1)).await;
    assert!(matches!(refused, Err(ClientError::Refused(ref e)) if e.code == ChatErrorCode::Fenced));
    // Another cluster is not affected.
    let other = ClientRole::Gateway {
        cluster_id: "other".into(),
        epoch: 1,
        node_id: "x".into(),
    };
    ChatClient::connect(server.tcp, other).await.unwrap();

    let (_, t) = server.get(&format!("/sessions/{sid}/transcript")).await;
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec!["from epoch 1", "from epoch 2"]
    );
}

/// Reads until the server closes the connection; returns the frames that decoded.
async fn read_to_close(stream: tokio::net::TcpStream) -> Vec<ServerFrame> {
    let mut reader = tokio_util::codec::FramedRead::new(
        stream,
        FrameCodec::<ServerFrame, ClientFrame>::default(),
    );
    let mut frames = Vec::new();
    let deadline = Duration::from_secs(15);
    while let Ok(Some(Ok(f))) = tokio::time::timeout(deadline, reader.next()).await {
        frames.push(f);
    }
    frames
}

fn goodbye_code(frames: &[ServerFrame]) -> Option<ChatErrorCode> {
    frames.iter().find_map(|f| match f {
        ServerFrame::Goodbye(e) => Some(e.code),
        _ => None,
    })
}

fn hello_frame() -> Vec<u8> {
    let hello = ClientFrame {
        id: 1,
        request: ChatRequest::Hello(Hello {
            version: CHAT_PROTOCOL_VERSION,
            role: ClientRole::Agent,
            client_name: "raw".into(),
            credential: Default::default(),
        }),
    };
    encode_frame(&hello, 1 << 20).unwrap()
}

#[tokio::test]
async fn garbage_oversize_and_half_frames_are_refused_and_others_go_on() {
    let server = Server::start(&[]);
    let (sid, customer) = server.create_session("garbage").await;
    let mut good = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();
    let (agent, _) = good
        .join(
            &sid,
            "A",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            0,
        )
        .await
        .unwrap();

    // Garbage instead of a Hello.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    s.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0xff])
        .await
        .unwrap();
    assert_eq!(
        goodbye_code(&read_to_close(s).await),
        Some(ChatErrorCode::MalformedFrame)
    );

    // Garbage after a good Hello.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    s.write_all(&hello_frame()).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
    assert_eq!(
        goodbye_code(&read_to_close(s).await),
        Some(ChatErrorCode::MalformedFrame)
    );

    // A frame announcing 64 MiB: refused before anything is buffered.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    s.write_all(&hello_frame()).await.unwrap();
    s.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
    assert_eq!(
        goodbye_code(&read_to_close(s).await),
        Some(ChatErrorCode::FrameTooLarge)
    );

    // Half a frame, then the client stops writing.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    let hello = hello_frame();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let frames = read_to_close(s).await;
    assert!(
        frames.iter().all(|f| matches!(f, ServerFrame::Goodbye(_))),
        "{frames:?}"
    );

    // A request before the Hello.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    s.write_all(
        &encode_frame(
            &ClientFrame {
                id: 1,
                request: ChatRequest::Ping,
            },
            1 << 20,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        goodbye_code(&read_to_close(s).await),
        Some(ChatErrorCode::HandshakeRequired)
    );

    // A wrong protocol version.
    let mut codec_stream = tokio_util::codec::Framed::new(
        tokio::net::TcpStream::connect(server.tcp).await.unwrap(),
        FrameCodec::<ServerFrame, ClientFrame>::default(),
    );
    let hello = Hello {
        version: 999,
        role: ClientRole::Agent,
        client_name: "old".into(),
        credential: Default::default(),
    };
    codec_stream
        .send(ClientFrame {
            id: 1,
            request: ChatRequest::Hello(hello),
        })
        .await
        .unwrap();
    match codec_stream.next().await.unwrap().unwrap() {
        ServerFrame::Reply { result: Err(e), .. } => {
            assert_eq!(e.code, ChatErrorCode::UnsupportedVersion)
        }
        other => panic!("unexpected {other:?}"),
    }

    // Everyone else is still served.
    server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "still there?"}),
        )
        .await;
    good.events_until(&sid, &agent, is_message("still there?"))
        .await
        .unwrap();
    good.post(&sid, &agent, "yes", Visibility::All, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn kill_9_and_restart_keeps_sessions_transcripts_and_sequence() {
    let dir = TempDir::new("kill9");
    let data = dir.path().to_str().unwrap().to_string();
    let server = Server::start(&["--data-dir", &data]);
    let (sid, customer) = server.create_session("durable").await;
    let mut gw = ChatClient::connect(server.tcp, gateway(3)).await.unwrap();
    let (bot, _) = gw
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    let (bot_seq, _) = gw
        .post(&sid, &bot, "hi, I am a bot", Visibility::All, Some("b-1"))
        .await
        .unwrap();
    server
        .patch(&format!("/sessions/{sid}/userdata"), json!({"step": "2"}))
        .await;
    let (_, last) = server
        .post(&format!("/sessions/{sid}/messages"), json!({"participant_id": customer, "text": "acknowledged before the kill", "key": "c-1"}))
        .await;
    let last = last["seq"].as_u64().unwrap();
    let (_, before) = server.get(&format!("/sessions/{sid}/transcript")).await;
    server.kill9();
    drop(gw);

    let server = Server::start(&["--data-dir", &data]);
    let (status, after) = server.get(&format!("/sessions/{sid}/transcript")).await;
    assert_eq!(status, 200);
    assert_eq!(after, before, "the transcript and userdata survive");
    assert_eq!(after["userdata"]["step"], "2");

    // The next event continues the sequence; an already accepted key is still a duplicate.
    let (_, dup) = server
        .post(&format!("/sessions/{sid}/messages"), json!({"participant_id": customer, "text": "acknowledged before the kill", "key": "c-1"}))
        .await;
    assert_eq!(
        (dup["seq"].as_u64(), dup["duplicate"].as_bool()),
        (Some(last), Some(true))
    );
    let (_, next) = server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "after restart"}),
        )
        .await;
    assert_eq!(next["seq"].as_u64(), Some(last + 1));

    // The gateway comes back: its bot was detached, it resumes from its checkpoint and gets what
    // it missed; its own earlier post is still a duplicate; the epoch is still remembered.
    assert!(
        ChatClient::connect(server.tcp, gateway(2)).await.is_err(),
        "epoch 3 was journaled"
    );
    let mut gw = ChatClient::connect(server.tcp, gateway(3)).await.unwrap();
    gw.resume(&sid, &bot, bot_seq).await.unwrap();
    let missed = gw
        .events_until(&sid, &bot, is_message("after restart"))
        .await
        .unwrap();
    assert_eq!(
        texts(
            &missed
                .iter()
                .map(|e| serde_json::to_value(e).unwrap())
                .collect::<Vec<_>>()
        ),
        vec!["acknowledged before the kill", "after restart"]
    );
    assert_eq!(
        gw.post(&sid, &bot, "hi, I am a bot", Visibility::All, Some("b-1"))
            .await
            .unwrap(),
        (bot_seq, true)
    );
}

#[tokio::test]
async fn stuck_readers_cannot_grow_the_server_memory() {
    let server = Server::start(&["--write-timeout", "1", "--outbound-frames", "4"]);
    let (sid, _) = server.create_session("stuck").await;
    // Twenty agents join and then never read again; their receive buffers are tiny.
    let mut stuck = Vec::new();
    for i in 0..20 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.tcp).await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(
            stream,
            FrameCodec::<ServerFrame, ClientFrame>::default(),
        );
        framed
            .send(ClientFrame {
                id: 1,
                request: ChatRequest::Hello(Hello {
                    version: CHAT_PROTOCOL_VERSION,
                    role: ClientRole::Agent,
                    client_name: format!("stuck-{i}"),
                    credential: Default::default(),
                }),
            })
            .await
            .unwrap();
        let join = JoinRequest {
            session_id: sid.clone(),
            nickname: format!("Stuck {i}"),
            participant_type: ParticipantType::Agent,
            style: Style::Regular,
            visibility: Visibility::All,
            since_seq: 0,
        };
        framed
            .send(ClientFrame {
                id: 2,
                request: ChatRequest::Join(join),
            })
            .await
            .unwrap();
        stuck.push(framed.into_inner());
    }
    let rss_before = server.rss_kib();

    // A busy agent posts 4 MiB of text; a healthy reader follows all of it.
    let mut writer = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();
    let (wid, _) = writer
        .join(
            &sid,
            "Writer",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            u64::MAX,
        )
        .await
        .unwrap();
    let mut reader = ChatClient::connect(server.tcp, ClientRole::Agent)
        .await
        .unwrap();
    let (rid, _) = reader
        .join(
            &sid,
            "Reader",
            ParticipantType::Agent,
            Style::Regular,
            Visibility::All,
            u64::MAX,
        )
        .await
        .unwrap();
    let text = "x".repeat(2048);
    let total_posts = 2048;
    let feed_sid = sid.clone();
    let read_all = tokio::spawn(async move {
        let events = reader
            .events_until(&feed_sid, &rid, is_message("the end"))
            .await
            .unwrap();
        events
            .iter()
            .filter(|e| e.kind == EventKind::Message)
            .count()
    });
    for _ in 0..total_posts {
        writer
            .post(&sid, &wid, &text, Visibility::All, None)
            .await
            .unwrap();
    }
    writer
        .post(&sid, &wid, "the end", Visibility::All, None)
        .await
        .unwrap();
    let healthy = tokio::time::timeout(Duration::from_secs(30), read_all)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(healthy, total_posts + 1, "a healthy reader gets everything");
    let rss_after = server.rss_kib();
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    // 20 unbounded queues would hold 20 x 4 MiB; the transcript itself is 4 MiB.
    assert!(grown_mib < 48, "server RSS grew by {grown_mib} MiB");

    // Each stuck reader is disconnected as a slow reader (only the writer stays connected)...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, stats) = server.get("/stats").await;
        if stats["connections"].as_u64() == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck readers still connected: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...after receiving a bounded part of the 4 MiB.
    for s in stuck {
        let mut s = s;
        let mut received = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => received += n,
                Err(_) => {
                    panic!("the server kept a stuck reader connected ({received} bytes received)")
                }
            }
        }
        assert!(
            received < 3 << 20,
            "a stuck reader received {received} bytes"
        );
    }
}

#[tokio::test]
async fn the_journal_is_compacted_while_running() {
    let dir = TempDir::new("compact");
    let data = dir.path().to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        &data,
        "--journal-compact-bytes",
        "65536",
        "--closed-retention",
        "0",
    ];
    let server = Server::start(&args);
    let journal = dir.path().join("journal.bin");
    let size = || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    let (keeper, customer) = server.create_session("keeper").await;
    let text = "k".repeat(400);
    // Many chats come and go; once closed they are forgotten (retention 0).
    for i in 0..40 {
        let (sid, cid) = server.create_session(&format!("gone-{i}")).await;
        for _ in 0..10 {
            server
                .post(
                    &format!("/sessions/{sid}/messages"),
                    json!({"participant_id": cid, "text": text}),
                )
                .await;
        }
        server
            .post(
                &format!("/sessions/{sid}/leave"),
                json!({"participant_id": cid, "after_action": "force-close"}),
            )
            .await;
    }
    // 40 chats of 4 KB of text were journaled; they are closed and forgotten, so compactions
    // (triggered as the file passes 64 KiB and doubles) keep the file far below that.
    let written = 40 * 10 * text.len() as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while size() > written / 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the journal stayed at {} bytes",
            size()
        );
        n += 1;
        let (status, _) = server
            .post(
                &format!("/sessions/{keeper}/messages"),
                json!({"participant_id": customer, "text": format!("still here {n}")}),
            )
            .await;
        assert_eq!(status, 200);
        // A post may start a compaction, which runs beside the writes: give it up to 100 ms
        // to finish before the next post (a loaded machine would otherwise grow the kept
        // chat past the bound faster than it compacts).
        let settle = tokio::time::Instant::now() + Duration::from_millis(100);
        while size() > written / 4 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (_, before) = server.get(&format!("/sessions/{keeper}/transcript")).await;
    server.kill9();
    let server = Server::start(&args);
    let (_, after) = server.get(&format!("/sessions/{keeper}/transcript")).await;
    assert_eq!(
        after, before,
        "the open chat survives compaction and a kill -9"
    );
    let (status, _) = server.get("/sessions/gone-0/transcript").await;
    assert_eq!(status, 404);
}

/// Sends a raw HTTP request and returns the status (and the body text).
async fn raw_http(server: &Server, request: String) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get_with(path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n")
}

/// The attack of issue 11: a stranger who knows the cluster id, an epoch and the bot's
/// participant id can neither resume the bot's participant (and post as it) nor fence the
/// gateway; every refusal is counted, no token reaches a reply.
#[tokio::test]
async fn with_credentials_only_the_clusters_own_gateway_may_connect_fence_or_resume() {
    let dir = TempDir::new("creds");
    let file = dir.path().join("credentials");
    let (gw_token, agent_token) = ("gateway-token-0123456789", "agent-token-0123456789");
    std::fs::write(
        &file,
        format!("gateway bgs {gw_token}\nagent {agent_token}\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&[
        "--credentials",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--http-read-timeout",
        "1",
    ]);
    let (sid, customer) = server.create_session("auth").await;
    let token = |t: &str| bgs_proto::chat::Secret::new(t);
    let mut real = ChatClient::connect_with(server.tcp, gateway(1), token(gw_token))
        .await
        .unwrap();
    let (bot, _) = real
        .join(
            &sid,
            "Bot",
            ParticipantType::Agent,
            Style::Bot,
            Visibility::All,
            0,
        )
        .await
        .unwrap();
    real.post(&sid, &bot, "hello, I am the bot", Visibility::All, None)
        .await
        .unwrap();

    // Strangers: no credential, a wrong one, the agent token as a gateway, the gateway token
    // as an agent, and a cluster the file does not list.
    let other_cluster = ClientRole::Gateway {
        cluster_id: "elsewhere".into(),
        epoch: 1,
        node_id: "x".into(),
    };
    for (role, credential) in [
        (gateway(99), ""),
        (gateway(99), "gateway-token-0123456780"),
        (gateway(99), agent_token),
        (ClientRole::Agent, gw_token),
        (ClientRole::Agent, ""),
        (other_cluster, gw_token),
    ] {
        match ChatClient::connect_with(server.tcp, role.clone(), token(credential)).await {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ChatErrorCode::Unauthorized, "{role:?}: {e}");
                assert!(!e.message.contains("0123456789"), "{}", e.message);
            }
            Err(other) => panic!("{role:?}: {other}"),
            Ok(_) => panic!("{role:?} with {credential:?} was let in"),
        }
    }
    // The real gateway was not fenced: it still speaks for its bot; epoch 1 still connects.
    real.post(&sid, &bot, "still the bot", Visibility::All, None)
        .await
        .unwrap();
    ChatClient::connect_with(server.tcp, gateway(1), token(gw_token))
        .await
        .unwrap();
    // An agent tool with its token is served.
    ChatClient::connect_with(server.tcp, ClientRole::Agent, token(agent_token))
        .await
        .unwrap();

    // Before a Hello is accepted a frame may be 16 KiB at most: 1 MiB announced is refused.
    let mut s = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 1024]).await.unwrap();
    assert_eq!(
        goodbye_code(&read_to_close(s).await),
        Some(ChatErrorCode::FrameTooLarge)
    );

    // Transcripts and userdata show participant ids: they need the agent token.
    let path = format!("/sessions/{sid}/transcript");
    assert_eq!(raw_http(&server, get_with(&path, None)).await.0, 401);
    assert_eq!(
        raw_http(&server, get_with(&path, Some(gw_token))).await.0,
        401
    );
    let (status, body) = raw_http(&server, get_with(&path, Some(agent_token))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("still the bot"), "{body}");
    let path = format!("/sessions/{sid}/userdata");
    assert_eq!(raw_http(&server, get_with(&path, None)).await.0, 401);
    // The customer's own routes need no token.
    server
        .post(
            &format!("/sessions/{sid}/messages"),
            json!({"participant_id": customer, "text": "hi bot"}),
        )
        .await;
    real.events_until(&sid, &bot, is_message("hi bot"))
        .await
        .unwrap();

    // A body sent too slowly is answered 408 (--http-read-timeout 1).
    let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
    s.write_all(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("the server ends a slow body")
        .unwrap();
    let answer = String::from_utf8_lossy(&raw);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let (_, stats) = server.get("/stats").await;
    assert_eq!(stats["refused"]["unauthorized"], 6 + 3, "{stats}");
    assert!(
        stats["refused"]["handshake"].as_u64().unwrap() >= 1,
        "{stats}"
    );

    // The refused epoch 99 was never journaled: after a restart epoch 1 is still welcome.
    let (http, tcp) = (server.http.to_string(), server.tcp.to_string());
    drop(real);
    server.kill9();
    let server = Server::start_at(
        &http,
        &tcp,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    let mut again = ChatClient::connect_with(server.tcp, gateway(1), token(gw_token))
        .await
        .unwrap();
    again.resume(&sid, &bot, 0).await.unwrap();
    again
        .post(&sid, &bot, "back after a restart", Visibility::All, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_bad_credentials_file_stops_the_server_with_its_line() {
    let dir = TempDir::new("badcreds");
    let file = dir.path().join("credentials");
    std::fs::write(&file, "gateway bgs short-secret-token-1\nagent tiny\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bgs-chat-server"))
        .args(["--credentials", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2: the token is shorter than 16"),
        "{err}"
    );
    assert!(!err.contains("short-secret-token-1"), "{err}");
}

/// Protected mode: open ports beyond loopback need --credentials, or --insecure said aloud; a
/// --data-dir that is a file is refused naming the option and the path; no colour codes in a
/// log that is not a terminal.
#[tokio::test]
async fn listening_beyond_loopback_needs_credentials_and_errors_name_the_option() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bgs-chat-server"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--tcp-listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tcp-listen 0.0.0.0:0 is beyond loopback") && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a log that is not a terminal: {err}"
    );
    let dir = TempDir::new("datadir-file");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = run(&[
        "--tcp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--data-dir {}", file.display())),
        "{err}"
    );
    // --insecure: it starts (and says so); stopped at once.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bgs-chat-server"))
        .args([
            "--tcp-listen",
            "0.0.0.0:0",
            "--http-listen",
            "127.0.0.1:0",
            "--insecure",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let line = support::listening_line(&mut child);
    assert!(line.contains("tcp="), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}
