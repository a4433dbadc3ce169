//! Test support: start the real `bgs-chat-server` binary on free ports, talk HTTP to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Server {
    child: Child,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
}

/// The Chat Server binary of this package, or `bgs chat-server` when this file is used by the
/// gateway's tests (which only have the `bgs` binary).
fn server_command() -> Command {
    match (
        option_env!("CARGO_BIN_EXE_bgs-chat-server"),
        option_env!("CARGO_BIN_EXE_bgs"),
    ) {
        (Some(server), _) => Command::new(server),
        (None, Some(bgs)) => {
            let mut c = Command::new(bgs);
            c.arg("chat-server");
            c
        }
        (None, None) => panic!("no Chat Server binary to test"),
    }
}

impl Server {
    /// Starts the server with `--http-listen/--tcp-listen 127.0.0.1:0` and `args`; waits for the
    /// line that names the bound ports.
    pub fn start(args: &[&str]) -> Server {
        Self::start_at("127.0.0.1:0", "127.0.0.1:0", args)
    }

    /// Starts the server on given addresses (to restart it where its clients expect it).
    pub fn start_at(http: &str, tcp: &str, args: &[&str]) -> Server {
        let mut child = server_command()
            .args(["--http-listen", http, "--tcp-listen", tcp])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("BGS_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bgs-chat-server");
        let line = listening_line(&mut child);
        let addr =
            |key: &str| address(&line, key).unwrap_or_else(|| panic!("no {key} in {line:?}"));
        Server {
            http: addr("http="),
            tcp: addr("tcp="),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory of the server process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http(self.http, "GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        http(self.http, "POST", path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        http(self.http, "PATCH", path, Some(body)).await
    }

    /// Creates a session as a customer: (session id, customer participant id).
    pub async fn create_session(&self, interaction_id: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/sessions",
                serde_json::json!({"interaction_id": interaction_id, "nickname": "Customer", "userdata": {"lang": "en"}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["session_id"].as_str().expect("session_id").to_string(),
            body["participant_id"]
                .as_str()
                .expect("participant_id")
                .to_string(),
        )
    }

    /// Long-polls the events a participant may see after `since` until `until` holds for one.
    pub async fn events_until(
        &self,
        session: &str,
        participant: &str,
        mut since: u64,
        until: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; got {out:?}"
            );
            let (status, body) = self
                .get(&format!("/sessions/{session}/events?participant_id={participant}&since={since}&wait_ms=5000"))
                .await;
            assert_eq!(status, 200, "{body}");
            since = body["last_seq"].as_u64().expect("last_seq");
            for e in body["events"].as_array().expect("events") {
                out.push(e.clone());
                if until(e) {
                    return out;
                }
            }
        }
    }
}

/// Waits (30 s at most) for the line a server prints once its listeners are bound.
pub fn listening_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the server printed its listening line")
}

/// The address after `key` (`http=`, `tcp=`, `esp=`, `ha=`) in a listening line.
pub fn address(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|a| a.parse().ok())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client (one request per connection), enough for JSON APIs.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http_with(addr, method, path, body, None).await
}

/// [`http`] with `Authorization: Bearer <token>` when a token is given.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    try_http(addr, method, path, body, token)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`http_with`] that reports a refused connection, a reset or a timeout (10 s) instead of
/// panicking: for a server that may be down.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Result<(u16, Value), String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no HTTP answer within 30 s".to_string())??;
    parse_response(&raw)
}

/// An HTTP/1.1 answer read to its end: (status, JSON body, or the body as a string).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Value), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let value = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(payload).unwrap_or_else(|_| Value::String(payload.to_string()))
    };
    Ok((status, value))
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "bgs-test-{name}-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
