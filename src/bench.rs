//! `bgs bench`: a load generator that drives real processes over real sockets and measures what
//! a customer sees (docs/PERFORMANCE.md).
//!
//! It starts a Chat Server and a gateway node (this executable, `chat-server` and `serve`) on
//! free local ports, opens N chats, starts an echo bot in each over framed ESP, and has the
//! customers post open-loop at a given rate. Customers speak the chat protocol over a few TCP
//! connections (each customer is a participant of type customer), so the load tool itself is
//! not the bottleneck. The time from a customer's post to its bot's answer arriving in that
//! customer's feed goes into an HDR histogram.
//!
//! The floor runs in the same Chat Server: a bare tokio relay (no actors, no plugin) that joins
//! its own N chats as a bot over one gateway connection and answers every customer message
//! with the echo bot's text. Same hops: the post goes out, comes back as an event, a reply is
//! posted, the reply comes back as an event. The gateway's figures are given against it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bgs_proto::chat::{
    ChatRequest, ChatResponse, ClientFrame, ClientRole, EventKind, Hello, JoinRequest,
    ParticipantType, PostKind, PostRequest, Secret, ServerFrame, Style, Visibility,
    CHAT_PROTOCOL_VERSION,
};
use bgs_proto::codec::FrameCodec;
use bgs_proto::esp::{EspClientFrame, EspHello, EspRequest, EspStatus, ESP_PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub customers: usize,
    /// Customer posts per second, over all customers (open loop).
    pub rate: u64,
    pub duration: Duration,
    /// Load connections (each carries a share of the customers).
    pub connections: usize,
    pub json: Option<std::path::PathBuf>,
    /// Run the node with `[store] kind = "local"` and report what the store wrote.
    pub store_local: bool,
}

impl BenchConfig {
    /// The short run CI does so that the tool cannot rot (its figures mean little).
    pub fn quick() -> Self {
        Self {
            customers: 100,
            rate: 500,
            duration: Duration::from_secs(2),
            connections: 2,
            json: None,
            store_local: false,
        }
    }
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (resident KiB, CPU ticks used so far) from /proc.
    fn usage(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
        let ticks = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                n(11) + n(12)
            })
            .unwrap_or(0);
        (rss, ticks)
    }
}

/// Starts this executable with `args`; returns it and the addresses of its listening line.
fn spawn(
    args: &[&str],
    log: &std::path::Path,
) -> Result<(Proc, HashMap<String, SocketAddr>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let log_file = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|e| format!("cannot start {args:?}: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let proc = Proc { child };
    let addrs: HashMap<String, SocketAddr> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    if addrs.is_empty() {
        return Err(format!("{args:?} did not start; see {}", log.display()));
    }
    Ok((proc, addrs))
}

/// Waits (30 s at most) until the node's `/readyz` says it is connected to the Chat Server.
async fn wait_ready(http: &reqwest::Client, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("http://{addr}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the node did not become ready within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs `body` as JSON and returns the JSON answer.
async fn http_post(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> Result<Value, String> {
    let response = http
        .post(format!("http://{addr}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes)))
}

/// Creates `n` sessions `{prefix}-{i}` over HTTP, 16 at a time.
async fn create_sessions(
    http: &reqwest::Client,
    chat_http: SocketAddr,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut out = Vec::with_capacity(n);
    for chunk in ids.chunks(16) {
        let calls = chunk.iter().map(|id| async move {
            let body = json!({"interaction_id": id, "nickname": "Customer"});
            http_post(http, chat_http, "/sessions", &body)
                .await
                .map(|v| v["session_id"].as_str().unwrap_or_default().to_string())
        });
        for r in futures_util::future::join_all(calls).await {
            out.push(r?);
        }
    }
    Ok(out)
}

type ChatFramed = tokio_util::codec::Framed<TcpStream, FrameCodec<ServerFrame, ClientFrame>>;

async fn chat_connect(addr: SocketAddr, role: ClientRole) -> Result<ChatFramed, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut f = tokio_util::codec::Framed::new(s, FrameCodec::new(bgs_proto::DEFAULT_MAX_FRAME));
    let hello = ChatRequest::Hello(Hello {
        version: CHAT_PROTOCOL_VERSION,
        role,
        client_name: "bgs-bench".into(),
        credential: Secret::default(),
    });
    f.send(ClientFrame {
        id: 0,
        request: hello,
    })
    .await
    .map_err(|e| e.to_string())?;
    match f.next().await {
        Some(Ok(ServerFrame::Reply {
            result: Ok(ChatResponse::Welcome { .. }),
            ..
        })) => Ok(f),
        other => Err(format!("chat server refused the bench: {other:?}")),
    }
}

/// Joins each session as `participant_type` on `f` (pipelined); returns the participant ids in
/// session order.
async fn join_all(
    f: &mut ChatFramed,
    sessions: &[String],
    participant_type: ParticipantType,
    style: Style,
) -> Result<Vec<String>, String> {
    for (i, s) in sessions.iter().enumerate() {
        let join = ChatRequest::Join(JoinRequest {
            session_id: s.clone(),
            nickname: "load".into(),
            participant_type,
            style,
            visibility: Visibility::All,
            since_seq: u64::MAX,
        });
        f.feed(ClientFrame {
            id: i as u64 + 1,
            request: join,
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    f.flush().await.map_err(|e| e.to_string())?;
    let mut ids = vec![String::new(); sessions.len()];
    let mut got = 0;
    while got < sessions.len() {
        match f.next().await {
            Some(Ok(ServerFrame::Reply {
                id,
                result: Ok(ChatResponse::Joined { participant_id, .. }),
            })) => {
                ids[(id - 1) as usize] = participant_id;
                got += 1;
            }
            Some(Ok(ServerFrame::Reply { result: Err(e), .. })) => {
                return Err(format!("join refused: {e}"))
            }
            Some(Ok(_)) => {}
            other => return Err(format!("chat connection ended while joining: {other:?}")),
        }
    }
    Ok(ids)
}

/// StartBot for each interaction over one framed ESP connection, at most 256 in flight;
/// returns (per-request latencies in µs, wall time).
async fn start_bots(
    esp: SocketAddr,
    interactions: &[String],
) -> Result<(Histogram<u64>, Duration), String> {
    let s = TcpStream::connect(esp).await.map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut f = tokio_util::codec::Framed::new(
        s,
        FrameCodec::<bgs_proto::esp::EspResponse, EspClientFrame>::default(),
    );
    f.send(EspClientFrame::Hello(EspHello {
        version: ESP_PROTOCOL_VERSION,
        client_name: "bgs-bench".into(),
        token: None,
    }))
    .await
    .map_err(|e| e.to_string())?;
    f.next()
        .await
        .ok_or("no ESP welcome")?
        .map_err(|e| e.to_string())?;
    let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut sent_at = HashMap::new();
    let started = Instant::now();
    let (mut next, mut done) = (0usize, 0usize);
    while done < interactions.len() {
        while next < interactions.len() && next - done < 256 {
            let id = next as u64 + 1;
            let request = EspRequest {
                request_id: id,
                service: "ChatBotPlatform".into(),
                method: "StartBot".into(),
                parameters: [
                    ("_umsChannel".to_string(), "channel-chatbot".to_string()),
                    ("ChatBotID".to_string(), "echo".to_string()),
                ]
                .into(),
                userdata: [("InteractionId".to_string(), interactions[next].clone())].into(),
            };
            sent_at.insert(id, Instant::now());
            f.feed(EspClientFrame::Request(request))
                .await
                .map_err(|e| e.to_string())?;
            next += 1;
        }
        f.flush().await.map_err(|e| e.to_string())?;
        let answer = f
            .next()
            .await
            .ok_or("ESP connection closed")?
            .map_err(|e| e.to_string())?;
        if answer.status != EspStatus::Ok {
            return Err(format!(
                "StartBot failed: {:?} {:?}",
                answer.code, answer.message
            ));
        }
        if let Some(at) = sent_at.remove(&answer.request_id) {
            let _ = hist.record(at.elapsed().as_micros() as u64);
        }
        done += 1;
    }
    Ok((hist, started.elapsed()))
}

/// The answer text the echo bot (and the floor) gives to the n-th message `text`.
fn answer_of(text: &str) -> Option<&str> {
    text.split_once(": ").map(|(_, t)| t)
}

/// The result of one load phase.
struct Phase {
    latency: Histogram<u64>,
    sent: u64,
    answered: u64,
    took: Duration,
}

/// Customers on `conns` (each with its sessions and participant ids) post open-loop at `rate`
/// for `duration`; every post's answer is awaited up to 10 s after the end.
async fn load(
    conns: Vec<(ChatFramed, Vec<String>, Vec<String>)>,
    rate: u64,
    duration: Duration,
) -> Result<Phase, String> {
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new(3).map_err(|e| e.to_string())?,
    ));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for (f, sessions, participants) in conns {
        let customers = sessions.len();
        let (mut sink, mut stream) = f.split();
        let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        // (customer, message number, when the schedule meant it to be sent).
        let (tx, mut rx) = mpsc::channel::<(usize, u64, Instant)>(65536);
        let p = pending.clone();
        let writer = tokio::spawn(async move {
            let mut id = 1_000_000u64;
            while let Some((i, n, due)) = rx.recv().await {
                let text = format!("m{n}");
                // Latency counts from the intended send time, so a backlog in the tool or in
                // the node is measured, not hidden (no coordinated omission).
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(text.clone(), due);
                id += 1;
                let post = ChatRequest::Post(PostRequest {
                    session_id: sessions[i].clone(),
                    participant_id: participants[i].clone(),
                    kind: PostKind::Message,
                    text,
                    visibility: Visibility::All,
                    key: None,
                    rich: None,
                });
                if sink.feed(ClientFrame { id, request: post }).await.is_err() {
                    return;
                }
                if rx.is_empty() && sink.flush().await.is_err() {
                    return;
                }
            }
            let _ = sink.flush().await;
        });
        let (lat, ans) = (latency.clone(), answered.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let ServerFrame::Events { events, .. } = frame else {
                    continue;
                };
                for e in events {
                    if e.kind != EventKind::Message || e.style != Style::Bot {
                        continue;
                    }
                    let Some(t) = e.text.as_deref().and_then(answer_of) else {
                        continue;
                    };
                    let at = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
                    if let Some(at) = at {
                        let _ = lat
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(at.elapsed().as_micros() as u64);
                        ans.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        });
        senders.push((tx, writer, customers));
        readers.push(reader);
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last_progress = Instant::now();
    let mut cursors = vec![0usize; senders.len()];
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            // Round robin over connections, and over each connection's customers.
            let conn = (sent as usize) % senders.len();
            let (tx, _, customers) = &senders[conn];
            let i = cursors[conn] % customers;
            cursors[conn] += 1;
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            let _ = tx.send((i, sent, due)).await;
            sent += 1;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!(
                "  {:>5.1} s: {sent} sent, {} answered",
                started.elapsed().as_secs_f64(),
                answered.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    for (tx, writer, _) in senders {
        drop(tx);
        let _ = writer.await;
    }
    for r in readers {
        r.abort();
    }
    let latency = latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Phase {
        latency,
        sent,
        answered: answered.load(std::sync::atomic::Ordering::Relaxed),
        took,
    })
}

/// The floor: one gateway-role connection that joins every floor session as a bot and answers
/// each customer message at once, as the echo bot would (`N: text`). No actors, no plugin.
async fn floor_relay(
    chat_tcp: SocketAddr,
    sessions: Vec<String>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let role = ClientRole::Gateway {
        cluster_id: "bench-floor".into(),
        epoch: 1,
        node_id: "floor".into(),
    };
    let mut f = chat_connect(chat_tcp, role).await?;
    let bots = join_all(&mut f, &sessions, ParticipantType::Agent, Style::Bot).await?;
    let by_session: HashMap<String, (String, u64)> = sessions
        .into_iter()
        .zip(bots)
        .map(|(s, b)| (s, (b, 0)))
        .collect();
    Ok(tokio::spawn(async move {
        let mut by_session = by_session;
        let (mut sink, mut stream) = f.split();
        let mut id = 1u64 << 40;
        while let Some(Ok(frame)) = stream.next().await {
            let ServerFrame::Events {
                session_id, events, ..
            } = frame
            else {
                continue;
            };
            let Some((bot, count)) = by_session.get_mut(&session_id) else {
                continue;
            };
            for e in events {
                if e.kind != EventKind::Message || e.participant_type != ParticipantType::Customer {
                    continue;
                }
                *count += 1;
                id += 1;
                let post = ChatRequest::Post(PostRequest {
                    session_id: session_id.clone(),
                    participant_id: bot.clone(),
                    kind: PostKind::Message,
                    text: format!("{count}: {}", e.text.unwrap_or_default()),
                    visibility: Visibility::All,
                    key: None,
                    rich: None,
                });
                if sink.feed(ClientFrame { id, request: post }).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    }))
}

/// Splits sessions over `n` load connections, each joining its share as a customer.
async fn customers(
    chat_tcp: SocketAddr,
    sessions: &[String],
    n: usize,
) -> Result<Vec<(ChatFramed, Vec<String>, Vec<String>)>, String> {
    let mut out = Vec::new();
    let per = sessions.len().div_ceil(n.max(1)).max(1);
    for chunk in sessions.chunks(per) {
        let mut f = chat_connect(chat_tcp, ClientRole::Agent).await?;
        let ids = join_all(&mut f, chunk, ParticipantType::Customer, Style::Regular).await?;
        out.push((f, chunk.to_vec(), ids));
    }
    Ok(out)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> Value {
    json!({
        "p50_ms": ms(h, 0.5), "p90_ms": ms(h, 0.9), "p99_ms": ms(h, 0.99),
        "p999_ms": ms(h, 0.999), "max_ms": h.max() as f64 / 1000.0, "count": h.len(),
    })
}

/// Runs the whole benchmark; prints a table, writes `--json`, and returns the JSON figures.
/// The processes are stopped and their folder removed however it ends.
pub async fn run(config: &BenchConfig) -> Result<Value, String> {
    let dir = std::env::temp_dir().join(format!("bgs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = measure(config, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let result = result?;
    if let Some(path) = &config.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&result).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(result)
}

async fn measure(config: &BenchConfig, dir: &std::path::Path) -> Result<Value, String> {
    let n = config.customers;
    let max_sessions = (2 * n + 16).to_string();
    let (chat, chat_addrs) = spawn(
        &[
            "chat-server",
            "--http-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "0",
            "--max-sessions",
            &max_sessions,
            "--max-connections",
            "4096",
        ],
        &dir.join("chat-server.log"),
    )?;
    let (chat_http, chat_tcp) = (chat_addrs["http"], chat_addrs["tcp"]);
    let gw_config = dir.join("bgs.toml");
    let store = if config.store_local {
        format!(
            "[store]\nkind = \"local\"\npath = \"{}\"\n",
            dir.join("bots.redb").display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &gw_config,
        format!(
            "[node]\nhttp-listen = \"127.0.0.1:0\"\nesp-listen = \"127.0.0.1:0\"\n[chat-server]\naddress = \"{chat_tcp}\"\n[log]\nlevel = \"warn\"\n{store}"
        ),
    )
    .map_err(|e| e.to_string())?;
    let (gateway, gw_addrs) = spawn(
        &["serve", "--config", gw_config.to_str().unwrap_or_default()],
        &dir.join("bgs.log"),
    )?;
    let esp = gw_addrs["esp"];
    let http = crate::plugins::connector::client()?;
    wait_ready(&http, gw_addrs["http"]).await?;

    eprintln!(
        "bgs bench: {n} customers, {} posts/s for {:?}",
        config.rate, config.duration
    );
    let gw_sessions = create_sessions(&http, chat_http, "bench-g", n).await?;
    let interactions: Vec<String> = (0..n).map(|i| format!("bench-g-{i}")).collect();
    let gw_customers = customers(chat_tcp, &gw_sessions, config.connections).await?;
    let (rss_before, _) = gateway.usage();
    eprintln!("  {n} customers joined; starting {n} bots");
    // A StartBot is answered once its bot has joined: the bots are all there after the last.
    let (startbot, startbot_took) = start_bots(esp, &interactions).await?;
    let (rss_bots, _) = gateway.usage();
    let startbot_per_s = n as f64 / startbot_took.as_secs_f64();
    eprintln!("  {n} StartBot in {startbot_took:?} ({startbot_per_s:.0}/s)");

    let bytes_per_bot = rss_bots.saturating_sub(rss_before) * 1024 / n.max(1) as u64;
    if config.rate == 0 {
        // Idle bots only: what they cost and how fast they start (docs/PERFORMANCE.md).
        let (chat_rss, _) = chat.usage();
        let result = json!({
            "customers": n, "rate": 0,
            "bytes_per_bot": bytes_per_bot,
            "startbot_per_s": startbot_per_s,
            "startbot": summary(&startbot),
            "gateway_rss_kib": rss_bots,
            "gateway_rss_before_kib": rss_before,
            "chat_server_rss_kib": chat_rss,
        });
        println!(
            "{n} idle bots: {bytes_per_bot} bytes each; StartBot {startbot_per_s:.0}/s (p50 {:.2} ms, p99 {:.2} ms); gateway {rss_bots} KiB, Chat Server {chat_rss} KiB",
            ms(&startbot, 0.5),
            ms(&startbot, 0.99)
        );
        return Ok(result);
    }
    let (_, gw_ticks0) = gateway.usage();
    let (_, chat_ticks0) = chat.usage();
    let written0 = store_written(&http, gw_addrs["http"]).await;
    let gw_phase = load(gw_customers, config.rate, config.duration).await?;
    let written1 = store_written(&http, gw_addrs["http"]).await;
    let store_status = http_get(&http, gw_addrs["http"], "/status")
        .await
        .map(|s| s["store"].clone())
        .unwrap_or(Value::Null);
    let (gw_rss, gw_ticks1) = gateway.usage();
    let (chat_rss, chat_ticks1) = chat.usage();
    let cpu =
        |t0: u64, t1: u64, took: Duration| (t1 - t0) as f64 / 100.0 / took.as_secs_f64() * 100.0;

    eprintln!("bgs bench: the floor (a bare relay, same Chat Server)");
    let floor_sessions = create_sessions(&http, chat_http, "bench-f", n).await?;
    let relay = floor_relay(chat_tcp, floor_sessions.clone()).await?;
    let floor_customers = customers(chat_tcp, &floor_sessions, config.connections).await?;
    let floor_phase = load(floor_customers, config.rate, config.duration).await?;
    relay.abort();

    let gw = summary(&gw_phase.latency);
    let floor = summary(&floor_phase.latency);
    let ratio = |q: f64| ms(&gw_phase.latency, q) / ms(&floor_phase.latency, q).max(0.001);
    let result = json!({
        "customers": n,
        "rate": config.rate,
        "duration_s": config.duration.as_secs_f64(),
        "gateway": gw,
        "floor": floor,
        "ratio_p50": ratio(0.5),
        "ratio_p99": ratio(0.99),
        "bytes_per_bot": bytes_per_bot,
        "startbot_per_s": startbot_per_s,
        "startbot": summary(&startbot),
        "messages_per_s": gw_phase.answered as f64 / gw_phase.took.as_secs_f64(),
        "sent": gw_phase.sent,
        "answered": gw_phase.answered,
        "errors": gw_phase.sent - gw_phase.answered + floor_phase.sent - floor_phase.answered,
        "gateway_rss_kib": gw_rss,
        "gateway_cpu_percent": cpu(gw_ticks0, gw_ticks1, gw_phase.took),
        "chat_server_rss_kib": chat_rss,
        "chat_server_cpu_percent": cpu(chat_ticks0, chat_ticks1, gw_phase.took),
        "store": if config.store_local {
            let per_s = |i: usize| (written1[i] - written0[i]) / gw_phase.took.as_secs_f64();
            json!({"batches_per_s": per_s(0), "bots_written_per_s": per_s(1), "at_end": store_status})
        } else {
            Value::Null
        },
    });
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "customer to answer", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for (name, v) in [
        ("gateway (echo bot)", &result["gateway"]),
        ("floor (bare relay)", &result["floor"]),
    ] {
        println!(
            "{name:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p90_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["p999_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "ratio p99 {:.2}; {:.0} messages/s answered ({} sent, {} errors); StartBot {:.0}/s (p99 {:.2} ms); {} bytes per idle bot; gateway {} KiB {:.0}% CPU, Chat Server {} KiB {:.0}% CPU",
        result["ratio_p99"].as_f64().unwrap_or(0.0),
        result["messages_per_s"].as_f64().unwrap_or(0.0),
        gw_phase.sent,
        result["errors"],
        startbot_per_s,
        ms(&startbot, 0.99),
        bytes_per_bot,
        gw_rss,
        result["gateway_cpu_percent"].as_f64().unwrap_or(0.0),
        chat_rss,
        result["chat_server_cpu_percent"].as_f64().unwrap_or(0.0),
    );
    if config.store_local {
        let s = &result["store"];
        println!(
            "durable store (local): {:.0} batches/s, {:.0} bots written/s; at the end of the load: {} pending, lag {:.3} s",
            s["batches_per_s"].as_f64().unwrap_or(0.0),
            s["bots_written_per_s"].as_f64().unwrap_or(0.0),
            s["at_end"]["pending"],
            s["at_end"]["lag_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(result)
}

/// The node's durable-store counters: batches written and bots written (0 without a store).
async fn store_written(http: &reqwest::Client, addr: SocketAddr) -> [f64; 2] {
    let text = match http.get(format!("http://{addr}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    [
        value("bgs_store_writes_total{result=\"ok\"}"),
        value("bgs_store_bots_written_total "),
    ]
}

/// GETs a JSON page of the node.
async fn http_get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> Result<Value, String> {
    let body = http
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .bytes()
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
