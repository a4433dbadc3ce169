//! Failover and switchover times of a real pair: `cargo bench --bench failover`.
//!
//! Starts a Chat Server and two `bgs serve` processes, starts N echo bots (N from
//! `BGS_BENCH_BOTS`, default `1000,10000`; `BGS_BENCH_BATCH` sets `ha-bot-recovery-batch`), then
//! measures:
//! - a manual switchover: how long the primary drained, the ESP pause as a client sees it (a
//!   prober asks each node every 5 ms: from the old primary's last ok answer to the new one's
//!   first), and the time until every bot had re-joined on the new primary;
//! - a failover after kill -9: time to detect (the backup reports itself primary), time until
//!   every bot had re-joined, and time until a sample of customers who wrote during the gap were
//!   answered.
//!
//! Figures are printed; nothing is asserted (timing goals live here, not in tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bgs_proto::codec::FrameCodec;
use bgs_proto::esp::{
    EspClientFrame, EspHello, EspRequest, EspResponse, EspStatus, ESP_PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{pair_config, ChatServer, Customer, Gateway, LinkProxy};

const SAMPLE: usize = 100;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn wait(what: &str, g: &Gateway, ok: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    loop {
        let s = g.status().await;
        if ok(&s) {
            return start.elapsed();
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rejoined(n: usize) -> impl Fn(&Value) -> bool {
    move |s: &Value| {
        s["role"] == "primary"
            && s["bots"]["echo"] == n
            && s["chat_servers"][0]["participants"].as_u64() == Some(n as u64)
            && s["chat_servers"][0]["connected"] == true
    }
}

async fn start_bots(g: &Gateway, n: usize) {
    let stream = tokio::net::TcpStream::connect(g.esp).await.unwrap();
    let mut esp = tokio_util::codec::Framed::new(
        stream,
        FrameCodec::<EspResponse, EspClientFrame>::default(),
    );
    esp.send(EspClientFrame::Hello(EspHello {
        version: ESP_PROTOCOL_VERSION,
        client_name: "bench".into(),
        token: None,
    }))
    .await
    .unwrap();
    esp.next().await.unwrap().unwrap();
    let window = 512;
    let (mut sent, mut done) = (0, 0);
    while done < n {
        while sent < n && sent - done < window {
            let request = EspRequest {
                request_id: sent as u64 + 1,
                service: "ChatBotPlatform".into(),
                method: "StartBot".into(),
                parameters: [("ChatBotID", "echo"), ("_umsChannel", "channel-chatbot")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                userdata: [("InteractionId".to_string(), format!("bench-{sent}"))].into(),
            };
            esp.feed(EspClientFrame::Request(request)).await.unwrap();
            sent += 1;
        }
        esp.flush().await.unwrap();
        let a = esp.next().await.unwrap().unwrap();
        assert_eq!(a.status, EspStatus::Ok, "{a:?}");
        done += 1;
    }
}

/// Asks each node for a bot's status every 5 ms, each node on its own task (a slow answer of
/// one does not hold up the other), and keeps the times of the ok answers.
fn esp_prober(
    nodes: [std::net::SocketAddr; 2],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<[Vec<Instant>; 2]> {
    let ask = |node: std::net::SocketAddr, stop: Arc<AtomicBool>| {
        tokio::spawn(async move {
            let mut oks = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"service": "ChatBotPlatform", "method": "GetBotStatus",
                    "parameters": {"_umsChannel": "channel-chatbot"}, "userdata": {"InteractionId": "bench-0"}});
                let (status, _) = support::http(node, "POST", "/esp", Some(body)).await;
                if status == 200 {
                    oks.push(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            oks
        })
    };
    let (a, b) = (ask(nodes[0], stop.clone()), ask(nodes[1], stop));
    tokio::spawn(async move { [a.await.unwrap(), b.await.unwrap()] })
}

/// The ESP pause as a client that asks both nodes sees it: from the old primary's last ok
/// answer to the new primary's first one after it.
fn esp_pause(oks: &[Vec<Instant>; 2], old: usize) -> Duration {
    let last_old = oks[old]
        .iter()
        .max()
        .copied()
        .expect("the old primary answered");
    let first_new = oks[1 - old]
        .iter()
        .filter(|t| **t > last_old)
        .min()
        .copied()
        .expect("the new primary answered");
    first_new - last_old
}

/// A node of the pair with the default failover-after-ms (1000 ms; the tests use more).
/// `BGS_BENCH_BATCH` sets `ha-bot-recovery-batch` (default 200).
fn bench_config(id: &str, role: &str, peer: std::net::SocketAddr) -> String {
    let mut config = pair_config(id, role, peer, "bench")
        .replace("failover-after-ms = 2000", "failover-after-ms = 1000");
    if let Ok(batch) = std::env::var("BGS_BENCH_BATCH") {
        config.push_str(&format!(
            "[channel-chatbot]\nha-bot-recovery-batch = {batch}\n"
        ));
    }
    config
}

/// The node's log lines about the switchover and the restore.
fn print_log(name: &str, g: &Gateway) {
    for line in g.log().lines().filter(|l| {
        [
            "switchover",
            "restored",
            "registered",
            "drained",
            "hand",
            "now the",
            "now a",
            "dropped",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        println!("  {name}: {line}");
    }
}

async fn run(n: usize) {
    println!("== {n} bots");
    let max = (n * 2 + 100).to_string();
    let chat = ChatServer::start(&["--max-sessions", &max, "--max-connections", "256"]);
    let (to_a, to_b) = (LinkProxy::start().await, LinkProxy::start().await);
    let a = Gateway::start(chat.tcp, &bench_config("bgs-a", "primary", to_b.addr));
    to_a.set_target(a.ha.unwrap());
    let mut b = Gateway::start(chat.tcp, &bench_config("bgs-b", "backup", to_a.addr));
    to_b.set_target(b.ha.unwrap());
    wait("a primary", &a, |s| s["role"] == "primary").await;

    let t = Instant::now();
    let ids: Vec<String> = futures_util::stream::iter(0..n)
        .map(|i| {
            let chat = &chat;
            async move {
                let (status, v) = chat
                    .post(
                        "/sessions",
                        json!({"interaction_id": format!("bench-{i}"), "nickname": "C"}),
                    )
                    .await;
                assert_eq!(status, 201);
                v["participant_id"].as_str().unwrap().to_string()
            }
        })
        .buffered(32)
        .collect()
        .await;
    println!("sessions created: {}", ms(t.elapsed()));
    let t = Instant::now();
    start_bots(&a, n).await;
    println!(
        "StartBot x{n} (one pipelined ESP connection): {}",
        ms(t.elapsed())
    );
    let t = Instant::now();
    wait("b in sync", &b, |s| {
        s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == n
    })
    .await;
    println!("backup in sync: {}", ms(t.elapsed()));

    // Manual switchover a -> b.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = esp_prober([a.http, b.http], stop.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let (status, report) = support::http(a.http, "POST", "/admin/switchover", None).await;
    assert_eq!(status, 200, "{report}");
    let handed = t.elapsed();
    wait("b rejoined", &b, rejoined(n)).await;
    let all = t.elapsed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    let oks = prober.await.unwrap();
    println!(
        "switchover: drain {} ms, hand-over answered {}, every bot re-joined {}, ESP pause (the old primary's last ok to the new one's first) {}",
        report["drain_ms"],
        ms(handed),
        ms(all),
        ms(esp_pause(&oks, 0))
    );
    print_log("a", &a);
    print_log("b", &b);
    wait("a in sync", &a, |s| {
        s["role"] == "backup" && s["ha"]["in_sync"] == true && s["ha"]["replicated_bots"] == n
    })
    .await;

    // Failover: kill -9 the primary (b) while a sample of customers write.
    let sample_n = SAMPLE.min(n);
    let sample: Vec<Customer> = ids
        .iter()
        .take(sample_n)
        .enumerate()
        .map(|(i, id)| Customer {
            chat: &chat,
            session: format!("bench-{i}"),
            id: id.clone(),
            since: 0,
        })
        .collect();
    b.kill9();
    let t = Instant::now();
    for c in &sample {
        c.say("during the gap").await;
    }
    wait("a primary", &a, |s| s["role"] == "primary").await;
    let detected = t.elapsed();
    wait("a rejoined", &a, rejoined(n)).await;
    let all_back = t.elapsed();
    print_log("a", &a);
    for mut c in sample {
        assert_eq!(c.next_reply().await, "1: during the gap");
    }
    println!(
        "failover (failover-after-ms 1000): primary after {}, every bot re-joined after {}, {sample_n} customers who wrote in the gap answered after {}",
        ms(detected),
        ms(all_back),
        ms(t.elapsed())
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BGS_BENCH_BOTS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run small.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for n in if quick { vec![50] } else { sizes } {
            run(n).await;
        }
    });
}
