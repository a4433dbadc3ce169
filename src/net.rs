//! Sockets: the TCP connection to the Chat Server (for the ChatLink actor) and the framed ESP
//! listener. One tokio task per direction owns each socket half and its codec.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgs_actors::chat_link::{ChatConnection, ChatConnector};
use bgs_actors::esp::{ErrorCode, EspError};
use bgs_chat_server::tls::{self, BoxIo};
use bgs_proto::chat::{ChatRequest, ServerFrame, SharedClientFrame};
use bgs_proto::codec::{CodecError, FrameCodec, DEFAULT_MAX_FRAME, PRE_AUTH_MAX_FRAME};
use bgs_proto::esp::{EspClientFrame, EspResponse, EspResult, ESP_PROTOCOL_VERSION};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{rustls, TlsAcceptor};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::intake::Intake;
use actix::Addr;
use bgs_actors::ha::{Accepted, HaConnection, HaCoordinator, HaDialer};
use bgs_actors::metrics::metrics;
use bgs_proto::ha::HaFrame;

/// Frames buffered each way on the HA link (a snapshot is a few frames of about 4 MiB).
const HA_BUFFER: usize = 4096;

/// Reads HA frames of at most [`PRE_AUTH_MAX_FRAME`] until the handshake is done: `authenticated`
/// is set when this node sends a Welcome (it verified the dialer's proof) or reads one (the node
/// it dialed accepted its proof). Each decode reads the flag, so a frame that follows the
/// Welcome on the wire is already decoded with the full limit.
struct HaDecoder {
    codec: FrameCodec<HaFrame, HaFrame>,
    authenticated: Arc<AtomicBool>,
}

impl HaDecoder {
    fn new(authenticated: Arc<AtomicBool>) -> Self {
        Self {
            codec: FrameCodec::new(PRE_AUTH_MAX_FRAME),
            authenticated,
        }
    }
}

impl Decoder for HaDecoder {
    type Item = HaFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<HaFrame>, CodecError> {
        let authenticated = self.authenticated.load(Ordering::SeqCst);
        self.codec.set_max_frame(if authenticated {
            bgs_proto::MAX_FRAME_LIMIT
        } else {
            PRE_AUTH_MAX_FRAME
        });
        let frame = self.codec.decode(src)?;
        if matches!(frame, Some(HaFrame::Welcome { .. })) {
            self.authenticated.store(true, Ordering::SeqCst);
        }
        Ok(frame)
    }
}

/// The socket of an HA connection as typed channels. When the coordinator drops the outbound
/// sender (it closed the connection) the writer ends, and the reader with it: the socket is
/// closed whole, even if the peer never sends again (a silent stranger holds nothing).
fn ha_connection(stream: BoxIo) -> HaConnection {
    let (rd, wr) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<HaFrame>(HA_BUFFER);
    let (in_tx, in_rx) = mpsc::channel::<HaFrame>(HA_BUFFER);
    let closed = CancellationToken::new();
    let writer_closed = closed.clone();
    let authenticated = Arc::new(AtomicBool::new(false));
    let writer_authenticated = authenticated.clone();
    tokio::spawn(async move {
        let mut sink = FramedWrite::new(
            wr,
            FrameCodec::<HaFrame, HaFrame>::new(bgs_proto::MAX_FRAME_LIMIT),
        );
        while let Some(f) = out_rx.recv().await {
            if matches!(f, HaFrame::Welcome { .. }) {
                // Before the Welcome is on the wire: the dialer's next frames may be large.
                writer_authenticated.store(true, Ordering::SeqCst);
            }
            if let Err(e) = sink.send(f).await {
                tracing::warn!(error = %e, "HA link write failed; closing the link");
                break;
            }
        }
        writer_closed.cancel();
    });
    tokio::spawn(async move {
        let mut frames = FramedRead::new(rd, HaDecoder::new(authenticated));
        loop {
            let frame = tokio::select! {
                _ = closed.cancelled() => break,
                f = frames.next() => f,
            };
            match frame {
                Some(Ok(f)) => {
                    if in_tx.send(f).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
    });
    HaConnection {
        outbound: out_tx,
        inbound: in_rx,
    }
}

/// A TCP connection to `address`, given up after [`CONNECT_TIMEOUT`].
async fn connect(address: &str) -> io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {address} timed out"),
            )
        })?
}

/// Dials the HA peer over TCP.
/// With `tls` (the node has `tls.cert-file`), the link is TLS and the peer's certificate must
/// be signed by `tls.ca-file` for the host of `ha.peer`.
pub struct TcpHaDialer {
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl HaDialer for TcpHaDialer {
    fn dial(&self, address: &str) -> BoxFuture<'static, io::Result<HaConnection>> {
        let address = address.to_string();
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = connect(&address).await?;
            let _ = stream.set_nodelay(true);
            Ok(ha_connection(
                tls::connect(stream, &address, tls.as_ref()).await?,
            ))
        })
    }
}

/// TLS handshakes the HA listener runs at once; a new connection beyond them ends the oldest
/// handshake, so strangers who stall handshakes cannot keep the peer out: the peer's own
/// handshake takes milliseconds, and it dials again at its next heartbeat.
const HA_TLS_HANDSHAKES: usize = 8;

/// The TLS handshakes under way on the HA listener, oldest first.
#[derive(Default)]
struct HandshakeSlots {
    next: u64,
    running: std::collections::VecDeque<(u64, tokio::task::AbortHandle)>,
}

impl HandshakeSlots {
    /// Makes room for one more: ends the oldest handshake when all slots are taken (true).
    fn make_room(&mut self) -> bool {
        if self.running.len() < HA_TLS_HANDSHAKES {
            return false;
        }
        match self.running.pop_front() {
            Some((_, oldest)) => {
                oldest.abort();
                true
            }
            None => false,
        }
    }

    fn done(&mut self, id: u64) {
        self.running.retain(|(i, _)| *i != id);
    }
}

/// Accepts HA links from the peer and hands them to the coordinator (after a TLS handshake in
/// its own task, with `tls`: at most [`HA_TLS_HANDSHAKES`] at once, a newcomer ending the
/// oldest).
pub async fn serve_ha(
    listener: TcpListener,
    coordinator: Addr<HaCoordinator>,
    tls: Option<TlsAcceptor>,
) {
    let slots = Arc::new(std::sync::Mutex::new(HandshakeSlots::default()));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let Some(tls) = tls.clone() else {
                    // Plain TCP: the HA state machine's own handshake slots take it from here.
                    coordinator.do_send(Accepted(ha_connection(Box::pin(stream))));
                    continue;
                };
                let Ok(mut s) = slots.lock() else { continue };
                if s.make_room() {
                    metrics().refused.inc(["ha", "capacity"]);
                    tracing::warn!(%peer, "HA TLS handshakes all under way: the oldest was ended to make room");
                }
                s.next += 1;
                let id = s.next;
                let (coordinator, slots_done) = (coordinator.clone(), slots.clone());
                let task = tokio::spawn(async move {
                    let result = tls::accept(stream, Some(&tls)).await;
                    if let Ok(mut s) = slots_done.lock() {
                        s.done(id);
                    }
                    match result {
                        Ok(io) => coordinator.do_send(Accepted(ha_connection(io))),
                        Err(e) => {
                            metrics().refused.inc(["ha", "handshake"]);
                            tracing::info!(%peer, error = %e, "HA TLS handshake failed");
                        }
                    }
                });
                s.running.push_back((id, task.abort_handle()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "HA accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The Chat Server disconnects silent clients; ping well before its read timeout.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Frames buffered from the socket to the ChatLink.
const LINK_BUFFER: usize = 1024;

/// Most frames written to the Chat Server with one flush.
const WRITE_BATCH: usize = 64;

/// Connects to the Chat Server over TCP with the proto codec.
/// With `tls` (`chat-server.tls`), the link is TLS, trusting `tls.ca-file`.
pub struct TcpChatConnector {
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ChatConnector for TcpChatConnector {
    fn connect(&self, address: &str) -> BoxFuture<'static, io::Result<ChatConnection>> {
        let address = address.to_string();
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = connect(&address).await?;
            stream.set_nodelay(true)?;
            let stream = tls::connect(stream, &address, tls.as_ref()).await?;
            let (rd, wr) = tokio::io::split(stream);
            let (out_tx, mut out_rx) = mpsc::unbounded_channel::<SharedClientFrame>();
            let (in_tx, in_rx) = mpsc::channel::<ServerFrame>(LINK_BUFFER);
            tokio::spawn(async move {
                let mut sink = FramedWrite::new(
                    wr,
                    FrameCodec::<ServerFrame, SharedClientFrame>::new(DEFAULT_MAX_FRAME),
                );
                let ping = SharedClientFrame {
                    id: 0,
                    request: Arc::new(ChatRequest::Ping),
                };
                loop {
                    let frame = match tokio::time::timeout(PING_EVERY, out_rx.recv()).await {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => ping.clone(),
                    };
                    // Whatever else is queued goes in the same write (at most 64 frames): under
                    // load one system call carries many posts, as the Chat Server's writer does.
                    let write = async {
                        sink.feed(frame).await?;
                        for _ in 1..WRITE_BATCH {
                            match out_rx.try_recv() {
                                Ok(f) => sink.feed(f).await?,
                                Err(_) => break,
                            }
                        }
                        sink.flush().await
                    };
                    if let Err(e) = write.await {
                        tracing::warn!(error = %e, "chat server write failed");
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut frames = FramedRead::new(
                    rd,
                    FrameCodec::<ServerFrame, SharedClientFrame>::new(bgs_proto::MAX_FRAME_LIMIT),
                );
                loop {
                    // We ping at least every PING_EVERY and the server answers: a connection
                    // silent for three of those is dead (a host gone, a black-holed network).
                    let frame = match tokio::time::timeout(PING_EVERY * 3, frames.next()).await {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!(
                                "the chat server has been silent for 90 s; dropping the connection"
                            );
                            break;
                        }
                    };
                    match frame {
                        Ok(f) => {
                            if in_tx.send(f).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "bad frame from the chat server; dropping the connection");
                            break;
                        }
                    }
                }
            });
            Ok(ChatConnection {
                outbound: out_tx,
                inbound: in_rx,
            })
        })
    }
}

/// Requests one ESP connection may have in flight.
const ESP_IN_FLIGHT: usize = 256;
/// ESP connections that may wait for their Hello at once; one more closes the oldest of them
/// (a real client says Hello within milliseconds, a stranger holds a slot at most until then).
pub const ESP_PENDING_MAX: usize = 64;
const ESP_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections waiting for their Hello, oldest first, each with what closes it.
#[derive(Default)]
struct Pending {
    next: u64,
    queue: VecDeque<(u64, CancellationToken)>,
}

impl Pending {
    fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection, closing the oldest one if [`ESP_PENDING_MAX`] are waiting.
    fn admit(m: &Mutex<Pending>) -> (u64, CancellationToken) {
        let mut p = Self::lock(m);
        if p.queue.len() >= ESP_PENDING_MAX {
            if let Some((_, oldest)) = p.queue.pop_front() {
                oldest.cancel();
            }
        }
        p.next += 1;
        let entry = (p.next, CancellationToken::new());
        p.queue.push_back(entry.clone());
        entry
    }

    fn leave(m: &Mutex<Pending>, id: u64) {
        Self::lock(m).queue.retain(|(i, _)| *i != id);
    }
}

/// Bytes of unfinished ESP frames all connections of a node may hold together; past it, a
/// connection holding more than [`ESP_FAIR_SHARE`] of them is closed when it reads more (a
/// workflow's requests are far smaller, so they go on).
pub const ESP_PARTIAL_BUDGET: usize = 32 << 20;
/// What one connection may always hold of an unfinished frame, whatever the others hold.
pub const ESP_FAIR_SHARE: usize = 64 << 10;

/// A reader that counts the bytes it has passed and not yet seen decoded (`held`), in its own
/// count and in the node's (`total`), and refuses to read more for a connection past its fair
/// share while the node is past [`ESP_PARTIAL_BUDGET`].
struct HeldReader<R> {
    inner: R,
    held: usize,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

impl<R> HeldReader<R> {
    /// The decoder has `buffered` bytes left after a frame: only those are still held.
    fn decoded(&mut self, buffered: usize) {
        let freed = self.held.saturating_sub(buffered);
        self.total
            .fetch_sub(freed, std::sync::atomic::Ordering::SeqCst);
        self.held -= freed;
    }
}

impl<R> Drop for HeldReader<R> {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.held, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeldReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::sync::atomic::Ordering;
        if self.held > ESP_FAIR_SHARE && self.total.load(Ordering::SeqCst) > ESP_PARTIAL_BUDGET {
            return std::task::Poll::Ready(Err(io::Error::other(format!(
                "the node holds more than {} MiB of unfinished ESP frames",
                ESP_PARTIAL_BUDGET >> 20
            ))));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.held += n;
        this.total.fetch_add(n, Ordering::SeqCst);
        polled
    }
}

/// Reads frames of an open-ended connection (a client may stay idle for ever) while bounding a
/// frame that has begun: a client sending one a byte at a time is cut off `deadline` (give or
/// take a tenth of it) after its first byte instead of holding its buffer for ever.
struct PartialFrame {
    deadline: Duration,
    since: Option<tokio::time::Instant>,
}

impl PartialFrame {
    /// The next frame (`Ok(None)` at the end of the stream), or `Err(())` when a partial frame
    /// outlived its deadline. Dropping `FramedRead::next` loses nothing: the bytes stay buffered.
    async fn next<R, D>(
        &mut self,
        frames: &mut FramedRead<R, D>,
    ) -> Result<Option<Result<D::Item, D::Error>>, ()>
    where
        R: tokio::io::AsyncRead + Unpin,
        D: Decoder,
    {
        let tick = self.deadline / 10;
        loop {
            match tokio::time::timeout(tick, frames.next()).await {
                Ok(item) => {
                    self.since = None;
                    return Ok(item);
                }
                Err(_) if frames.read_buffer().is_empty() => self.since = None,
                Err(_) => {
                    let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.deadline {
                        return Err(());
                    }
                }
            }
        }
    }
}

/// Serves framed ESP: a Hello, then pipelined requests answered (in any order) by request id.
/// At most `max_connections` past their Hello and [`ESP_PENDING_MAX`] before it.
pub async fn serve_esp(
    listener: TcpListener,
    intake: Arc<Intake>,
    max_connections: usize,
    frame_timeout: Duration,
    tls: Option<TlsAcceptor>,
) {
    let admitted = Arc::new(Semaphore::new(max_connections));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "esp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let intake = intake.clone();
        let (admitted, pending, tls) = (admitted.clone(), pending.clone(), tls.clone());
        let held = held.clone();
        tokio::spawn(async move {
            if let Err(e) =
                esp_connection(stream, tls, intake, admitted, pending, held, frame_timeout).await
            {
                tracing::info!(%peer, error = %e, "esp connection ended");
            }
        });
    }
}

async fn esp_connection(
    stream: TcpStream,
    acceptor: Option<TlsAcceptor>,
    intake: Arc<Intake>,
    admitted: Arc<Semaphore>,
    pending: Arc<Mutex<Pending>>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    frame_timeout: Duration,
) -> io::Result<()> {
    // A connection waits for its Hello in one of the 64 pending slots, its TLS handshake
    // included (within tls::HANDSHAKE_TIMEOUT).
    let (slot, evicted) = Pending::admit(&pending);
    let stream = tokio::select! {
        io = tls::accept(stream, acceptor.as_ref()) => io,
        _ = evicted.cancelled() => Err(io::Error::other("evicted during the TLS handshake")),
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            Pending::leave(&pending, slot);
            metrics().refused.inc(["esp", "handshake"]);
            return Err(e);
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    // Until the Hello is accepted a frame may be 16 KiB at most.
    let rd = HeldReader {
        inner: rd,
        held: 0,
        total: held,
    };
    let mut frames = FramedRead::new(
        rd,
        FrameCodec::<EspClientFrame, EspResponse>::new(PRE_AUTH_MAX_FRAME),
    );
    let (tx, mut rx) = mpsc::channel::<EspResponse>(ESP_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(wr, FrameCodec::<EspClientFrame, EspResponse>::default());
        while let Some(r) = rx.recv().await {
            if sink.send(r).await.is_err() {
                break;
            }
        }
    });
    let hello = tokio::select! {
        hello = tokio::time::timeout(ESP_HELLO_TIMEOUT, frames.next()) => Some(hello),
        _ = evicted.cancelled() => None,
    };
    Pending::leave(&pending, slot);
    let capacity = |why: &str| {
        metrics().refused.inc(["esp", "capacity"]);
        tracing::warn!("esp connection refused: {why}");
        Err(EspError::new(ErrorCode::Capacity, why.to_string()))
    };
    let mut permit = None;
    let answer = match hello {
        None => capacity("more than 64 connections were waiting for their Hello; this was the oldest"),
        Some(Ok(Some(Ok(EspClientFrame::Hello(h))))) if h.version != ESP_PROTOCOL_VERSION => Err(EspError::new(ErrorCode::BadRequest,
            format!("ESP protocol version {} is not supported (this node speaks {ESP_PROTOCOL_VERSION})", h.version),
        )),
        Some(Ok(Some(Ok(EspClientFrame::Hello(h))))) => match intake.authorize(h.token.as_deref(), "esp") {
            Ok(()) => match admitted.clone().try_acquire_owned() {
                Ok(p) => {
                    permit = Some(p);
                    Ok(())
                }
                Err(_) => capacity("node.esp-max-connections connections are open; reuse one or retry later"),
            },
            Err(e) => {
                tracing::warn!("esp connection refused: unauthorized");
                Err(e)
            }
        },
        Some(Ok(Some(Err(e)))) => Err(EspError::new(ErrorCode::BadRequest, format!("bad frame: {e}"))),
        _ => Err(EspError::new(ErrorCode::BadRequest, "the first frame must be an EspHello")),
    };
    let ok = answer.is_ok();
    let reply = match answer {
        Ok(()) => EspResponse::ok(
            0,
            EspResult::Welcome {
                node_id: intake.node_id.clone(),
            },
        ),
        Err(e) => e.into_response(0),
    };
    let _ = tx.send(reply).await;
    if ok {
        frames.decoder_mut().set_max_frame(DEFAULT_MAX_FRAME);
        let permits = Arc::new(Semaphore::new(ESP_IN_FLIGHT));
        let mut partial = PartialFrame {
            deadline: frame_timeout,
            since: None,
        };
        loop {
            let next = partial.next(&mut frames).await;
            let buffered = frames.read_buffer().len();
            frames.get_mut().decoded(buffered);
            let frame = match next {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(()) => {
                    let ms = frame_timeout.as_millis();
                    tracing::info!(
                        "esp connection closed: a frame was not complete within {ms} ms"
                    );
                    let message = format!("a frame was not complete within {ms} ms of its first byte (node.esp-frame-timeout-ms)");
                    let _ = tx
                        .send(EspError::new(ErrorCode::BadRequest, message).into_response(0))
                        .await;
                    break;
                }
            };
            match frame {
                Ok(EspClientFrame::Request(request)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break;
                    };
                    let intake = intake.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let response = intake.dispatch(request).await;
                        let _ = tx.send(response).await;
                        drop(permit);
                    });
                }
                Ok(EspClientFrame::Hello(_)) => {
                    let _ = tx
                        .send(
                            EspError::new(ErrorCode::BadRequest, "Hello was already received")
                                .into_response(0),
                        )
                        .await;
                }
                Err(e) => {
                    let _ = tx
                        .send(
                            EspError::new(ErrorCode::BadRequest, format!("bad frame: {e}"))
                                .into_response(0),
                        )
                        .await;
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
    drop(permit);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bgs_proto::codec::encode_frame;
    use bgs_proto::ha::HaRole;

    fn welcome() -> HaFrame {
        HaFrame::Welcome {
            node_id: "bgs-a".into(),
            role: HaRole::Primary,
            epoch: 1,
            http: String::new(),
            run_id: "r".into(),
        }
    }

    /// Before the handshake a peer's frame may be 16 KiB at most; the Welcome raises the limit
    /// for the frames after it, even when they arrive in the same read.
    #[test]
    fn ha_frames_are_small_until_a_welcome() {
        let big = (1u32 << 20).to_be_bytes();
        let mut stranger = HaDecoder::new(Arc::new(AtomicBool::new(false)));
        let mut buf = bytes::BytesMut::from(&big[..]);
        assert!(matches!(
            stranger.decode(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));

        let mut dialer = HaDecoder::new(Arc::new(AtomicBool::new(false)));
        let mut buf = bytes::BytesMut::from(&encode_frame(&welcome(), 1 << 20).unwrap()[..]);
        buf.extend_from_slice(&big);
        assert!(matches!(
            dialer.decode(&mut buf),
            Ok(Some(HaFrame::Welcome { .. }))
        ));
        assert!(
            matches!(dialer.decode(&mut buf), Ok(None)),
            "a 1 MiB frame may follow"
        );

        // The acceptor's side: its writer set the flag when it sent the Welcome.
        let mut acceptor = HaDecoder::new(Arc::new(AtomicBool::new(true)));
        let mut buf = bytes::BytesMut::from(&big[..]);
        assert!(matches!(acceptor.decode(&mut buf), Ok(None)));
    }
}
