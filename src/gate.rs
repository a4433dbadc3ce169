//! The gate in front of the node's HTTP server: it takes the connections of the HTTP port (its
//! TLS too), and hands a connection to the HTTP server only once the client has said something.
//! So silent clients never hold the server's connection slots, and the gate can share the port
//! fairly: at most `per_client` connections from one address, at most `max` in all; when either
//! is reached, a new connection ends the oldest one that has not said anything yet (from that
//! address, or from any), and is refused only when every connection has spoken. A client that
//! sends its request at once (a health check, a workflow) is always served under a flood of
//! silent connections, from any address. docs/CONFIG.md `node.http-max-connections-per-client`.
//!
//! The HTTP server listens on an abstract Unix socket of this process; the gate pipes bytes both
//! ways, on a thread of its own.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgs_actors::metrics::metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How the gate shares the port.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Connections at once, in all.
    pub max: usize,
    /// Connections at once from one address.
    pub per_client: usize,
    /// Time a client has for its TLS handshake.
    pub handshake: Duration,
    /// Time a client has to send its first bytes (then the server's head deadline applies).
    pub first_bytes: Duration,
}

/// What the gate knows of one connection.
struct Entry {
    ip: IpAddr,
    /// It has sent bytes: handed to the server, never ended to make room.
    spoke: bool,
    end: CancellationToken,
}

/// Whom the gate lets in.
#[derive(Default)]
struct Admission {
    next: u64,
    /// By id, so oldest first.
    entries: BTreeMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The answer to a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Let in with this id; `evicted` silent connections were ended to make room.
    In { id: u64, evicted: usize },
    /// Every connection in the way has spoken: this one is closed.
    Full,
}

impl Admission {
    /// Admits a connection from `ip` (with the token that ends it), making room if need be.
    fn admit(&mut self, ip: IpAddr, end: CancellationToken, config: &GateConfig) -> Admit {
        let mut evicted = 0;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= config.per_client.max(1) {
            if !self.evict_oldest_silent(Some(ip)) {
                return Admit::Full;
            }
            evicted += 1;
        }
        if self.entries.len() >= config.max.max(1) {
            if !self.evict_oldest_silent(None) {
                return Admit::Full;
            }
            evicted += 1;
        }
        self.next += 1;
        let id = self.next;
        self.entries.insert(
            id,
            Entry {
                ip,
                spoke: false,
                end,
            },
        );
        *self.per_ip.entry(ip).or_default() += 1;
        Admit::In { id, evicted }
    }

    /// The connection has sent its first bytes.
    fn spoke(&mut self, id: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.spoke = true;
        }
    }

    /// The connection has ended.
    fn leave(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            self.forget_ip(e.ip);
        }
    }

    fn forget_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Ends the oldest connection (of `ip`, or of anyone) that has said nothing.
    fn evict_oldest_silent(&mut self, ip: Option<IpAddr>) -> bool {
        let Some(id) = self
            .entries
            .iter()
            .find(|(_, e)| !e.spoke && ip.is_none_or(|ip| e.ip == ip))
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some(e) = self.entries.remove(&id) {
            e.end.cancel();
            self.forget_ip(e.ip);
        }
        true
    }
}

/// The abstract Unix socket the HTTP server listens on, behind the gate.
pub fn backend() -> std::io::Result<(
    std::os::unix::net::UnixListener,
    std::os::unix::net::SocketAddr,
)> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("bgs-http-{}", uuid::Uuid::new_v4().simple());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    Ok((listener, addr))
}

/// Runs the gate on a thread of its own until the process ends.
pub fn spawn(
    listener: std::net::TcpListener,
    backend: std::os::unix::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    config: GateConfig,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("bgs-http-gate".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "the HTTP gate cannot start");
                    return;
                }
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => run(l, Arc::new(backend), tls, config).await,
                    Err(e) => tracing::error!(error = %e, "the HTTP gate cannot listen"),
                }
            });
        })?;
    Ok(())
}

async fn run(
    listener: TcpListener,
    backend: Arc<std::os::unix::net::SocketAddr>,
    tls: Option<TlsAcceptor>,
    config: GateConfig,
) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    let config = Arc::new(config);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let end = CancellationToken::new();
        let admitted = match admission.lock() {
            Ok(mut a) => a.admit(peer.ip(), end.clone(), &config),
            Err(_) => continue,
        };
        let id = match admitted {
            Admit::In { id, evicted } => {
                if evicted > 0 {
                    metrics().refused.add(["http", "silent"], evicted as u64);
                }
                id
            }
            Admit::Full => {
                metrics().refused.inc(["http", "capacity"]);
                continue;
            }
        };
        let (admission, backend, tls, config) = (
            admission.clone(),
            backend.clone(),
            tls.clone(),
            config.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = serve(stream, id, &admission, &backend, tls, &config) => {}
                _ = end.cancelled() => {}
            }
            if let Ok(mut a) = admission.lock() {
                a.leave(id);
            }
        });
    }
}

/// One connection: its TLS handshake and first bytes in time, then piped to the server.
async fn serve(
    stream: tokio::net::TcpStream,
    id: u64,
    admission: &Mutex<Admission>,
    backend: &std::os::unix::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    config: &GateConfig,
) {
    let Ok(mut io) =
        bgs_chat_server::tls::accept_within(stream, tls.as_ref(), config.handshake).await
    else {
        return;
    };
    // Only the first bytes are read here (a silent connection holds little); the rest is piped.
    let mut first = vec![0u8; 1024];
    let n = match tokio::time::timeout(config.first_bytes, io.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return,
    };
    first.truncate(n);
    if let Ok(mut a) = admission.lock() {
        a.spoke(id);
    }
    let backend: tokio::net::unix::SocketAddr = backend.clone().into();
    let server = match tokio::net::UnixStream::connect_addr(&backend).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "the HTTP gate cannot reach the HTTP server");
            return;
        }
    };
    let mut server = server;
    if server.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut io, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, per_client: usize) -> GateConfig {
        GateConfig {
            max,
            per_client,
            handshake: Duration::from_secs(2),
            first_bytes: Duration::from_secs(10),
        }
    }

    #[test]
    fn silent_connections_make_room_and_speakers_keep_theirs() {
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let cfg = config(4, 2);
        let mut adm = Admission::default();
        let tokens: Vec<CancellationToken> = (0..8).map(|_| CancellationToken::new()).collect();
        // Two from a: at the per-client cap; the third ends the oldest silent one.
        assert_eq!(
            adm.admit(a, tokens[0].clone(), &cfg),
            Admit::In { id: 1, evicted: 0 }
        );
        assert_eq!(
            adm.admit(a, tokens[1].clone(), &cfg),
            Admit::In { id: 2, evicted: 0 }
        );
        assert_eq!(
            adm.admit(a, tokens[2].clone(), &cfg),
            Admit::In { id: 3, evicted: 1 }
        );
        assert!(tokens[0].is_cancelled() && !tokens[1].is_cancelled());
        // Both of a have spoken: a fourth from a is refused, b still gets in.
        adm.spoke(2);
        adm.spoke(3);
        assert_eq!(adm.admit(a, tokens[3].clone(), &cfg), Admit::Full);
        assert_eq!(
            adm.admit(b, tokens[4].clone(), &cfg),
            Admit::In { id: 4, evicted: 0 }
        );
        assert_eq!(
            adm.admit(b, tokens[5].clone(), &cfg),
            Admit::In { id: 5, evicted: 0 }
        );
        // b at its cap: its oldest silent one makes room.
        assert_eq!(
            adm.admit(b, tokens[6].clone(), &cfg),
            Admit::In { id: 6, evicted: 1 }
        );
        assert!(tokens[4].is_cancelled());
        assert_eq!(adm.entries.len(), 4);
        // A connection that leaves gives its place back.
        adm.leave(2);
        adm.leave(3);
        assert_eq!(
            adm.admit(a, tokens[7].clone(), &cfg),
            Admit::In { id: 7, evicted: 0 }
        );
        assert_eq!(adm.per_ip.get(&a), Some(&1));
    }

    #[test]
    fn full_in_all_ends_the_oldest_silent_connection_of_anyone() {
        let cfg = config(3, 10);
        let mut adm = Admission::default();
        let ips: Vec<IpAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        let tokens: Vec<CancellationToken> = (0..4).map(|_| CancellationToken::new()).collect();
        for i in 0..3 {
            assert!(matches!(
                adm.admit(ips[i], tokens[i].clone(), &cfg),
                Admit::In { .. }
            ));
        }
        adm.spoke(1);
        assert_eq!(
            adm.admit(ips[3], tokens[3].clone(), &cfg),
            Admit::In { id: 4, evicted: 1 }
        );
        assert!(!tokens[0].is_cancelled(), "it spoke");
        assert!(tokens[1].is_cancelled(), "the oldest silent one");
        assert!(!adm.per_ip.contains_key(&ips[1]));
    }
}
