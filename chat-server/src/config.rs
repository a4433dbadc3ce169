//! Command-line configuration of the reference Chat Server. Every option has a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bgs_proto::codec::{DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT};
use clap::Parser;

use crate::error::{ChatServerError, Result};

/// The reference Chat Server of bgs: hosts chat sessions for customers, agents and bot gateways.
///
/// Customers and scripts use HTTP/JSON (and a WebSocket for live events); gateways and agent tools
/// use TCP frames. See docs/CHAT.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "bgs-chat-server", version)]
pub struct Config {
    /// HTTP/JSON and WebSocket listen address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7180", env = "BGS_CHAT_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    /// TCP (framed bincode) listen address for gateways and agent tools.
    #[arg(long, default_value = "127.0.0.1:7100", env = "BGS_CHAT_TCP_LISTEN")]
    pub tcp_listen: SocketAddr,
    /// Close a session after this many seconds without a join, leave, message or notice (0: never).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Keep every accepted event in this directory (durable before acknowledged). Without it the
    /// server keeps memory only.
    #[arg(long, value_name = "DIR", env = "BGS_CHAT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds a participant of a dropped TCP connection stays (detached) before it leaves with
    /// reason `disconnected`.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub detach_grace: u64,
    /// With --data-dir: compact the journal while running once it is this many bytes and twice
    /// its size after the last compaction (it is also compacted at every start).
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    pub journal_compact_bytes: u64,
    /// Seconds a closed session stays readable (transcript, events) before it is forgotten.
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    pub closed_retention: u64,
    /// Maximum TCP frame payload in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Maximum number of sessions kept (open and recently closed).
    #[arg(long, default_value_t = 10_000)]
    pub max_sessions: usize,
    /// Maximum participants present in one session.
    #[arg(long, default_value_t = 32)]
    pub max_participants: usize,
    /// Maximum events of one session (its transcript); posts beyond it are refused.
    #[arg(long, default_value_t = 10_000)]
    pub max_events: usize,
    /// Maximum bytes of a message text, a nickname-free userdata value, or a client key.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_text: usize,
    /// Maximum simultaneous TCP connections; more are refused with `limit_exceeded`.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Frames queued for one TCP connection before its event feeds wait (each frame holds at most
    /// 64 KiB of events): the memory a slow reader can cost is bounded by this.
    #[arg(long, default_value_t = 16)]
    pub outbound_frames: usize,
    /// Seconds a write to a TCP client may block before the client is disconnected as a slow
    /// reader (it can re-join with since_seq).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub write_timeout: u64,
    /// Seconds a TCP client may stay silent (clients send Ping) before it is disconnected.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub read_timeout: u64,
    /// Seconds an HTTP client has to send a request's head, and then its body (408 after).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub http_read_timeout: u64,
    /// Tokens gateways and agent tools must present in their Hello: lines `gateway CLUSTER_ID
    /// TOKEN` and `agent TOKEN` (docs/CHAT.md 6.2). Without it any client may connect.
    #[arg(long, value_name = "FILE", env = "BGS_CHAT_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Listen beyond loopback without --credentials (anyone who reaches the ports may connect as
    /// a gateway or agent tool). Without it such a start is refused, as Redis's protected mode.
    #[arg(long, env = "BGS_CHAT_INSECURE")]
    pub insecure: bool,
    /// PEM certificate chain (leaf first): with --tls-key, both listeners speak TLS only.
    #[arg(
        long,
        value_name = "FILE",
        env = "BGS_CHAT_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "BGS_CHAT_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Log as JSON lines instead of human text.
    #[arg(long)]
    pub log_json: bool,
}

impl Config {
    /// Checks the options against each other; the message names the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ChatServerError::Config(m));
        if self.max_frame < 64 * 1024 || self.max_frame > MAX_FRAME_LIMIT {
            return bad(format!(
                "--max-frame must be between 65536 and {MAX_FRAME_LIMIT} bytes, not {}",
                self.max_frame
            ));
        }
        if self.max_text == 0 || self.max_text * 4 > self.max_frame {
            return bad(format!(
                "--max-text must be between 1 and a quarter of --max-frame ({}), not {}",
                self.max_frame / 4,
                self.max_text
            ));
        }
        for (name, v) in [
            ("--max-sessions", self.max_sessions),
            ("--max-participants", self.max_participants),
            ("--max-events", self.max_events),
            ("--max-connections", self.max_connections),
            ("--outbound-frames", self.outbound_frames),
            ("--write-timeout", self.write_timeout as usize),
            ("--read-timeout", self.read_timeout as usize),
            ("--http-read-timeout", self.http_read_timeout as usize),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if let Some(path) = &self.credentials {
            crate::auth::Credentials::load(path)?;
        } else if !self.insecure {
            for (name, addr) in [
                ("--tcp-listen", self.tcp_listen),
                ("--http-listen", self.http_listen),
            ] {
                if !addr.ip().is_loopback() {
                    return bad(format!(
                        "{name} {addr} is beyond loopback and there are no --credentials: anyone who reaches it could act as a gateway (fencing the pair) or an agent. Give --credentials FILE (docs/CHAT.md 6.2), or --insecure to run open anyway"
                    ));
                }
            }
        }
        self.tls()?;
        Ok(())
    }

    /// The server side of TLS from --tls-cert and --tls-key, if given.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key)
                .map(Some)
                .map_err(|e| ChatServerError::Config(format!("--tls-cert/--tls-key: {e}"))),
            _ => Ok(None),
        }
    }

    pub fn idle(&self) -> Option<Duration> {
        (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout))
    }
}
