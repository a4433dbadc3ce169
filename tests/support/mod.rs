//! Test support for the gateway: the real `bgs` and `bgs-chat-server` binaries on free ports.

#![allow(dead_code)]

pub mod browser;
#[path = "../../chat-server/tests/support/mod.rs"]
mod chat;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)]
pub use chat::{http, http_with, try_http, Server as ChatServer, TempDir};
use serde_json::{json, Value};

pub struct Gateway {
    child: Option<Child>,
    pub http: SocketAddr,
    pub esp: SocketAddr,
    /// The HA listener, for a node of a pair.
    pub ha: Option<SocketAddr>,
    pub dir: TempDir,
}

impl Gateway {
    /// Starts `bgs serve` against a Chat Server at `chat_tcp`; `extra` is appended to the config.
    pub fn start(chat_tcp: SocketAddr, extra: &str) -> Gateway {
        Self::start_with_open_files(chat_tcp, extra, None)
    }

    /// [`Gateway::start`] under `ulimit -n open_files` when given.
    pub fn start_with_open_files(
        chat_tcp: SocketAddr,
        extra: &str,
        open_files: Option<u64>,
    ) -> Gateway {
        let dir = TempDir::new("gateway");
        let config = format!(
            r#"
[node]
http-listen = "127.0.0.1:0"
esp-listen = "127.0.0.1:0"
[chat-server]
address = "{chat_tcp}"
[channel-chatbot]
ha-chat-reconnecting-delay = 0.1
ha-chat-reconnecting-attempts = 100
[settings]
esp-proc-timeout = 10
[reporting]
file = "{reports}"
[plugins.faulty]
enabled = true
"#,
            reports = dir.path().join("reports.jsonl").display()
        );
        // `extra` overrides keys of the base configuration, section by section.
        let mut base: toml::Table = toml::from_str(&config).expect("base config");
        let extra: toml::Table = toml::from_str(extra).expect("extra config");
        for (section, value) in extra {
            match (base.get_mut(&section), value) {
                (Some(toml::Value::Table(b)), toml::Value::Table(e)) => b.extend(e),
                (_, v) => {
                    base.insert(section, v);
                }
            }
        }
        let config = toml::to_string(&base).expect("config");
        let path = dir.path().join("bgs.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("bgs.log")).expect("log file");
        let mut command = match open_files {
            None => Command::new(env!("CARGO_BIN_EXE_bgs")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                    env!("CARGO_BIN_EXE_bgs"),
                ]);
                c
            }
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("BGS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start bgs");
        let line = chat::listening_line(&mut child);
        let addr =
            |key: &str| chat::address(&line, key).unwrap_or_else(|| panic!("no {key} in {line:?}"));
        let ha = chat::address(&line, "ha=");
        Gateway {
            http: addr("http="),
            esp: addr("esp="),
            ha,
            child: Some(child),
            dir,
        }
    }

    pub fn reports_path(&self) -> PathBuf {
        self.dir.path().join("reports.jsonl")
    }

    /// Sends an ESP request over HTTP: (HTTP status, answer).
    pub async fn esp(
        &self,
        method: &str,
        interaction: &str,
        params: &[(&str, &str)],
    ) -> (u16, Value) {
        self.esp_with(method, interaction, params, None).await
    }

    /// [`Gateway::esp`] with a bearer token.
    pub async fn esp_with(
        &self,
        method: &str,
        interaction: &str,
        params: &[(&str, &str)],
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut parameters: serde_json::Map<String, Value> = params
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        parameters
            .entry("_umsChannel")
            .or_insert(json!("channel-chatbot"));
        let body = json!({
            "service": "ChatBotPlatform", "method": method,
            "parameters": parameters, "userdata": {"InteractionId": interaction}
        });
        http_with(self.http, "POST", "/esp", Some(body), token).await
    }

    /// StartBot that must succeed; returns the answer's result.
    pub async fn start_bot(&self, interaction: &str, params: &[(&str, &str)]) -> Value {
        let (status, answer) = self.esp("StartBot", interaction, params).await;
        assert_eq!(status, 200, "StartBot failed: {answer}");
        answer["result"].clone()
    }

    /// The report records written so far.
    pub fn reports(&self) -> Vec<Value> {
        std::fs::read_to_string(self.reports_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the report record of a bot instance.
    pub async fn report_of(&self, instance_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self
                .reports()
                .into_iter()
                .find(|r| r["instance_id"] == instance_id)
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no report for {instance_id}: {:?}",
                self.reports()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.dir.path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Gateway {
    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bgs.log")).unwrap_or_default()
    }

    /// Waits (30 s at most) until the node's log holds `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.log().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, no chance to do anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET /status`.
    pub async fn status(&self) -> Value {
        http(self.http, "GET", "/status", None).await.1
    }

    /// Waits until `/status` satisfies `ok`.
    pub async fn wait_status(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if ok(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: status stayed {s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The configuration of one node of a pair: every port chosen by the system, the peer reached
/// through `peer` (a [`LinkProxy`], whose target is set once the peer is up).
pub fn pair_config(id: &str, role: &str, peer: SocketAddr, secret: &str) -> String {
    format!(
        r#"
[node]
id = "{id}"
role = "{role}"
[ha]
listen = "127.0.0.1:0"
peer = "{peer}"
secret = "{secret}"
heartbeat-interval-ms = 100
failover-after-ms = 2000
"#
    )
}

/// A customer of a session, over HTTP.
pub struct Customer<'a> {
    pub chat: &'a ChatServer,
    pub session: String,
    pub id: String,
    pub since: u64,
}

impl<'a> Customer<'a> {
    pub async fn open(chat: &'a ChatServer, interaction: &str) -> Customer<'a> {
        let (session, id) = chat.create_session(interaction).await;
        Customer {
            chat,
            session,
            id,
            since: 0,
        }
    }

    pub async fn say(&self, text: &str) -> u64 {
        let (status, v) = self
            .chat
            .post(
                &format!("/sessions/{}/messages", self.session),
                json!({"participant_id": self.id, "text": text}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v["seq"].as_u64().expect("seq")
    }

    /// Waits for the next message (not the customer's own) that the customer sees; returns its text.
    pub async fn next_reply(&mut self) -> String {
        let id = self.id.clone();
        let events = self
            .chat
            .events_until(&self.session, &self.id, self.since, |e| {
                e["kind"] == "message" && e["participant_id"] != id.as_str()
            })
            .await;
        let last = events.last().expect("an event");
        self.since = last["seq"].as_u64().expect("seq");
        last["text"].as_str().unwrap_or_default().to_string()
    }

    /// Waits for the next event the customer sees (not its own) that `pred` accepts.
    pub async fn next_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let id = self.id.clone();
        let events = self
            .chat
            .events_until(&self.session, &self.id, self.since, |e| {
                e["participant_id"] != id.as_str() && pred(e)
            })
            .await;
        let last = events.last().expect("an event").clone();
        self.since = last["seq"].as_u64().expect("seq");
        last
    }

    /// The interaction's userdata.
    pub async fn userdata(&self) -> Value {
        self.chat
            .get(&format!("/sessions/{}/userdata", self.session))
            .await
            .1
    }

    /// Everything the customer may see.
    pub async fn visible(&self) -> Vec<Value> {
        let (_, v) = self
            .chat
            .get(&format!(
                "/sessions/{}/events?participant_id={}&since=0",
                self.session, self.id
            ))
            .await;
        v["events"].as_array().cloned().unwrap_or_default()
    }

    pub async fn leave(&self, after_action: &str) {
        let (status, v) = self
            .chat
            .post(
                &format!("/sessions/{}/leave", self.session),
                json!({"participant_id": self.id, "after_action": after_action}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }

    pub async fn transcript(&self) -> Value {
        self.chat
            .get(&format!("/sessions/{}/transcript", self.session))
            .await
            .1
    }
}

/// Texts of the messages in a transcript.
pub fn messages(transcript: &Value) -> Vec<String> {
    transcript["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["kind"] == "message")
                .map(|e| e["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A loopback TCP proxy that can cut a link without closing it (a dead cable: both sides keep
/// their sockets, nothing gets through) and heal it (existing connections are closed, new ones
/// pass).
pub struct LinkProxy {
    pub addr: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// A proxy whose target is set later ([`LinkProxy::set_target`]); until then connections
    /// are closed at once.
    pub async fn start() -> LinkProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let target = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (cut2, conns2, target2) = (cut.clone(), conns.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let cut = cut2.clone();
                let Some(to) = *target2.lock().expect("target") else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let pump = |mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, cut: std::sync::Arc<std::sync::atomic::AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !cut.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Either direction ending ends both (dropping the halves closes the sockets).
                    tokio::select! {
                        _ = pump(ri, wo, cut.clone()) => {}
                        _ = pump(ro, wi, cut) => {}
                    }
                });
                conns2.lock().expect("conns").push(task.abort_handle());
            }
        });
        LinkProxy {
            addr,
            target,
            cut,
            conns,
            accept,
        }
    }

    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().expect("target") = Some(to);
    }

    /// Nothing gets through any more; both sides keep their connections.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes the connections that saw the cut; new connections pass.
    pub fn heal(&self) {
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.heal();
    }
}

/// One request a [`MockHttp`] received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Value,
}

/// What a [`MockHttp`] answers: after `delay`, `status` with a JSON `body`.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub delay: Duration,
    /// A `Location` header (a redirect).
    pub location: Option<String>,
}

impl Answer {
    pub fn ok(body: Value) -> Answer {
        Answer {
            status: 200,
            body,
            delay: Duration::ZERO,
            location: None,
        }
    }

    /// A redirect with `status` to `to`.
    pub fn redirect(status: u16, to: String) -> Answer {
        Answer {
            status,
            location: Some(to),
            ..Answer::ok(Value::Null)
        }
    }
}

type Responder = dyn Fn(&Seen, usize) -> Answer + Send + Sync;

/// A small HTTP/1.1 server on 127.0.0.1:0 for tests: each request is recorded and answered by
/// `respond(request, n)`, `n` counting the earlier requests with the same `Idempotency-Key`
/// (0 for the first). One request per connection (it answers `Connection: close`).
pub struct MockHttp {
    pub addr: SocketAddr,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl MockHttp {
    pub async fn start(
        respond: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static,
    ) -> MockHttp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>> = Default::default();
        let respond: std::sync::Arc<Responder> = std::sync::Arc::new(respond);
        let log = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let mut raw = Vec::new();
                    let mut buf = [0u8; 8192];
                    let (head, body_at) = loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        raw.extend_from_slice(&buf[..n]);
                        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (String::from_utf8_lossy(&raw[..i]).to_string(), i + 4);
                        }
                    };
                    let mut lines = head.split("\r\n");
                    let first = lines.next().unwrap_or_default().to_string();
                    let mut parts = first.split_whitespace();
                    let method = parts.next().unwrap_or_default().to_string();
                    let path = parts.next().unwrap_or_default().to_string();
                    let headers: std::collections::BTreeMap<String, String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while raw.len() < body_at + len {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        raw.extend_from_slice(&buf[..n]);
                    }
                    let body =
                        serde_json::from_slice(&raw[body_at..body_at + len]).unwrap_or(Value::Null);
                    let request = Seen {
                        method,
                        path,
                        headers,
                        body,
                    };
                    let answer = {
                        let mut seen = log.lock().unwrap();
                        let key = request.headers.get("idempotency-key");
                        let n = seen
                            .iter()
                            .filter(|s| key.is_some() && s.headers.get("idempotency-key") == key)
                            .count();
                        seen.push(request.clone());
                        respond(&request, n)
                    };
                    tokio::time::sleep(answer.delay).await;
                    let body = answer.body.to_string();
                    let location = answer
                        .location
                        .map(|l| format!("Location: {l}\r\n"))
                        .unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        answer.status,
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        MockHttp { addr, seen, accept }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MockHttp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A local port nothing listens on (bound, then closed).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Processes whose parent is `parent`, with their command lines (from /proc).
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((pid, cmdline));
        }
    }
    out
}

/// Waits until a child of `parent` whose command line contains `needle` runs; its pid.
pub async fn child_pid(parent: u32, needle: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((pid, _)) = children_of(parent)
            .into_iter()
            .find(|(_, c)| c.contains(needle))
        {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no child process {needle:?} of {parent}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// kill -9.
pub fn kill9_pid(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The repository's `plugins/` folder.
pub fn repo_plugins() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

/// The test's Bot Framework bot (`tests/botframework/echo_bot.py`, the real Python SDK) on a
/// free port; `None` when the SDK is not installed (CI sets `CI_REQUIRE_BOTBUILDER` and
/// installs it, so there a missing SDK fails the test).
pub struct SdkBot {
    child: Child,
    pub addr: SocketAddr,
}

impl SdkBot {
    pub fn start() -> Option<SdkBot> {
        let have = Command::new("python3")
            .args([
                "-c",
                "import botbuilder.core, botbuilder.integration.aiohttp",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            assert!(
                std::env::var_os("CI_REQUIRE_BOTBUILDER").is_none(),
                "the Bot Framework SDK is required (pip install botbuilder-core botbuilder-integration-aiohttp)"
            );
            eprintln!("skipped: the Bot Framework SDK is not installed");
            return None;
        }
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/botframework/echo_bot.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SDK bot");
        let line = chat::listening_line(&mut child);
        let addr = chat::address(&line, "http=").unwrap_or_else(|| panic!("{line:?}"));
        Some(SdkBot { child, addr })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/api/messages", self.addr)
    }
}

impl Drop for SdkBot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a certificate it signed for 127.0.0.1 and localhost, made with `openssl`
/// (PEM files in `dir`): (CA certificate, certificate, key).
pub fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca) = (dir.join("ca.key"), dir.join("ca.pem"));
    let (key, csr, cert) = (
        dir.join("key.pem"),
        dir.join("node.csr"),
        dir.join("cert.pem"),
    );
    let ext = dir.join("san.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is needed for the TLS tests");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &PathBuf| p.to_str().expect("path").to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=bgs test CA",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// An HTTP/1.1 request over TLS, trusting `ca`: (status, JSON body).
pub async fn tls_http(
    addr: SocketAddr,
    ca: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = bgs_chat_server::tls::client_config(ca)?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut s = bgs_chat_server::tls::connect(tcp, &addr.to_string(), Some(&config))
            .await
            .map_err(|e| e.to_string())?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        // A TLS peer may close without close_notify: what arrived counts.
        let _ = s.read_to_end(&mut raw).await;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no answer within 30 s".to_string())??;
    chat::parse_response(&raw)
}
