//! TCP transport: framed bincode (bgs-proto codec) for gateways and agent tools.
//!
//! Per connection: the reader (this task) decodes frames and applies requests in order; an acker
//! task sends each reply once its change is durable, in request order, then starts the feed the
//! request asked for; a writer task owns the socket's write half; one feed task per attached
//! participant turns session events into `Events` frames. Everything between them is bounded:
//! replies in flight ([`MAX_IN_FLIGHT`]) and frames queued (`--outbound-frames`). A client that
//! does not read for `--write-timeout` is disconnected (slow reader) and may re-join with
//! since_seq; until then it costs the server at most its queued frames.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bgs_proto::chat::{
    ChatError, ChatErrorCode, ChatRequest, ChatResponse, ClientFrame, ServerFrame,
    CHAT_PROTOCOL_VERSION,
};
use bgs_proto::codec::{CodecError, FrameCodec, PRE_AUTH_MAX_FRAME};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{ChatServerError, Result};
use crate::hub::{follow, Ack, Actor, Connection, Hub};
use crate::session::Session;
use crate::tls::BoxIo;

/// Replies a connection may have waiting for durability before its reader pauses.
pub const MAX_IN_FLIGHT: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel send buffer of each connection: with the queued frames, what a stuck reader can hold.
pub const SOCKET_SEND_BUFFER: usize = 256 * 1024;

type Codec = FrameCodec<ClientFrame, ServerFrame>;

/// Accepts connections until `shutdown`; at most `--max-connections` at once. With `tls`, each
/// connection's TLS handshake runs in its own task (within `tls::HANDSHAKE_TIMEOUT`).
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let permits = Arc::new(Semaphore::new(hub.config.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SOCKET_SEND_BUFFER);
        let hub = hub.clone();
        let tls = tls.clone();
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let span = tracing::info_span!("tcp", %peer);
                tokio::spawn(
                    async move {
                        match crate::tls::accept(stream, tls.as_ref()).await {
                            Ok(io) => handle(io, hub).await,
                            Err(e) => {
                                hub.refusals.handshake.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(error = %e, "TLS handshake failed");
                            }
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                hub.refusals.capacity.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "connection refused: --max-connections reached");
                // Over TLS a plain Goodbye would be noise: the connection is just closed.
                if tls.is_none() {
                    tokio::spawn(refuse_connection(stream, hub.config.max_frame));
                }
            }
        }
    }
}

async fn refuse_connection(stream: TcpStream, max_frame: usize) {
    let mut sink = FramedWrite::new(stream, Codec::new(max_frame));
    let goodbye = ServerFrame::Goodbye(ChatError::new(
        ChatErrorCode::LimitExceeded,
        "too many connections; try again later",
    ));
    let _ = timeout(Duration::from_secs(1), sink.send(goodbye)).await;
}

/// Writes queued frames; ends on a Goodbye, a write error, or a write that blocks too long.
async fn write_loop(
    wr: WriteHalf<BoxIo>,
    mut rx: mpsc::Receiver<ServerFrame>,
    max_frame: usize,
    write_timeout: Duration,
) {
    let mut sink = FramedWrite::new(wr, Codec::new(max_frame));
    while let Some(first) = rx.recv().await {
        let mut goodbye = matches!(first, ServerFrame::Goodbye(_));
        let mut batch = vec![first];
        while !goodbye && batch.len() < 64 {
            match rx.try_recv() {
                Ok(f) => {
                    goodbye = matches!(f, ServerFrame::Goodbye(_));
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        let write = async {
            for frame in batch {
                sink.feed(frame).await?;
            }
            sink.flush().await
        };
        match timeout(write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::info!(error = %e, "write failed; closing");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    timeout_secs = write_timeout.as_secs(),
                    "slow reader: a write blocked too long; disconnecting (it may re-join with since_seq)"
                );
                return;
            }
        }
        if goodbye {
            return;
        }
    }
}

fn goodbye(code: ChatErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Goodbye(ChatError::new(code, message))
}

async fn handle(stream: BoxIo, hub: Arc<Hub>) {
    let max_frame = hub.config.max_frame;
    let (rd, wr) = tokio::io::split(stream);
    // Until the Hello is accepted a frame may be 16 KiB at most, whatever --max-frame says.
    let mut reader = FramedRead::new(rd, Codec::new(PRE_AUTH_MAX_FRAME));
    let (tx, rx) = mpsc::channel(hub.config.outbound_frames);
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        max_frame,
        Duration::from_secs(hub.config.write_timeout),
    ));

    let conn = match handshake(&mut reader, &hub, &tx).await {
        Some(conn) => {
            reader.decoder_mut().set_max_frame(max_frame);
            conn
        }
        None => {
            drop(tx);
            let _ = writer.await;
            return;
        }
    };
    let span =
        tracing::info_span!("conn", connection = conn.id, owner = ?conn.owner, epoch = conn.epoch);
    let (ack_tx, ack_rx) = mpsc::channel(MAX_IN_FLIGHT);
    let acker = tokio::spawn(ack_loop(ack_rx, conn.clone()).instrument(span.clone()));
    read_loop(&mut reader, &hub, &conn, &ack_tx)
        .instrument(span)
        .await;
    drop(ack_tx);
    let _ = acker.await;
    hub.connection_closed(&conn);
    drop(tx);
    drop(conn);
    let _ = writer.await;
}

async fn handshake(
    reader: &mut FramedRead<ReadHalf<BoxIo>, Codec>,
    hub: &Arc<Hub>,
    tx: &mpsc::Sender<ServerFrame>,
) -> Option<Arc<Connection>> {
    let first = timeout(HANDSHAKE_TIMEOUT, reader.next()).await;
    let (id, hello) = match first {
        Ok(Some(Ok(ClientFrame {
            id,
            request: ChatRequest::Hello(hello),
        }))) => (id, hello),
        Ok(Some(Ok(_))) => {
            hub.refusals.handshake.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(goodbye(
                    ChatErrorCode::HandshakeRequired,
                    "the first frame must be Hello",
                ))
                .await;
            return None;
        }
        Ok(Some(Err(e))) => {
            hub.refusals.handshake.fetch_add(1, Ordering::Relaxed);
            let bye = match e {
                // A Hello of protocol 2 or older ends before the credential: say which version
                // this server speaks instead of only "malformed".
                CodecError::Malformed(m) => goodbye(
                    ChatErrorCode::MalformedFrame,
                    format!("malformed Hello (this server speaks chat protocol {CHAT_PROTOCOL_VERSION}): {m}"),
                ),
                other => codec_goodbye(&other),
            };
            let _ = tx.send(bye).await;
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            hub.refusals.handshake.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(goodbye(
                    ChatErrorCode::HandshakeRequired,
                    "no Hello within 10 s",
                ))
                .await;
            return None;
        }
    };
    let registered = match hub.hello(hello, tx.clone()) {
        Ok(ack) => ack.durable().await,
        Err(e) => Err(e),
    };
    match registered {
        Ok(conn) => {
            let welcome = ChatResponse::Welcome {
                version: CHAT_PROTOCOL_VERSION,
                server_id: hub.server_id.clone(),
                max_frame: max_frame_u32(hub.config.max_frame),
            };
            let sent = tx
                .send(ServerFrame::Reply {
                    id,
                    result: Ok(welcome),
                })
                .await;
            if sent.is_err() {
                hub.connection_closed(&conn);
                return None;
            }
            Some(conn)
        }
        Err(e) => {
            tracing::info!(error = %e, "handshake refused");
            let _ = tx
                .send(ServerFrame::Reply {
                    id,
                    result: Err(e.to_chat_error()),
                })
                .await;
            let _ = tx.send(ServerFrame::Goodbye(e.to_chat_error())).await;
            None
        }
    }
}

fn max_frame_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn codec_goodbye(e: &CodecError) -> ServerFrame {
    match e {
        CodecError::FrameTooLarge { .. } => goodbye(ChatErrorCode::FrameTooLarge, e.to_string()),
        _ => goodbye(ChatErrorCode::MalformedFrame, e.to_string()),
    }
}

/// A reply on its way: sent once durable, then (for joins and resumes) a feed starts.
struct Pending {
    id: u64,
    result: Result<Ack<ChatResponse>>,
    feed: Option<(Arc<Session>, String, u64)>,
}

async fn read_loop(
    reader: &mut FramedRead<ReadHalf<BoxIo>, Codec>,
    hub: &Arc<Hub>,
    conn: &Arc<Connection>,
    ack_tx: &mpsc::Sender<Pending>,
) {
    let read_timeout = Duration::from_secs(hub.config.read_timeout);
    loop {
        let next = tokio::select! {
            // The writer is gone (slow reader, socket error): nobody will read replies.
            _ = conn.tx.closed() => return,
            // Fenced: say so (even if the Fenced notice was lost) and close; the client learns
            // it is fenced when it reconnects.
            _ = conn.cancel.cancelled() => {
                let bye = goodbye(ChatErrorCode::Fenced, "a higher epoch of this cluster is connected");
                let _ = timeout(Duration::from_secs(1), conn.tx.send(bye)).await;
                return;
            }
            next = timeout(read_timeout, reader.next()) => next,
        };
        let frame = match next {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                tracing::info!(error = %e, "bad frame; closing");
                let _ = conn.tx.send(codec_goodbye(&e)).await;
                return;
            }
            Ok(None) => return,
            Err(_) => {
                tracing::info!("no frame within --read-timeout; closing");
                let _ = conn
                    .tx
                    .send(goodbye(
                        ChatErrorCode::BadRequest,
                        "idle connection: send Ping regularly",
                    ))
                    .await;
                return;
            }
        };
        let pending = apply(hub, conn, frame);
        if ack_tx.send(pending).await.is_err() {
            return;
        }
    }
}

fn apply(hub: &Hub, conn: &Arc<Connection>, frame: ClientFrame) -> Pending {
    let actor = Actor::Conn(conn);
    let mut feed = None;
    let result = match frame.request {
        ChatRequest::Hello(_) => Err(ChatServerError::refused(
            ChatErrorCode::BadRequest,
            "Hello was already received",
        )),
        ChatRequest::Ping => Ok(Ack::now(ChatResponse::Pong)),
        ChatRequest::Join(r) => hub
            .join(
                actor,
                &r.session_id,
                r.nickname,
                r.participant_type,
                r.style,
                r.visibility,
            )
            .map(|ack| {
                ack.map(|j| {
                    let reply = ChatResponse::Joined {
                        session_id: j.session.id.clone(),
                        participant_id: j.participant_id.clone(),
                        seq: j.seq,
                    };
                    // A since_seq past the join means "what follows my join": pinned to the
                    // join's number, so nothing slips by before the feed starts.
                    feed = Some((j.session, j.participant_id, r.since_seq.min(j.seq)));
                    reply
                })
            }),
        ChatRequest::Resume(r) => hub.resume(conn, &r.session_id, &r.participant_id).map(|j| {
            let reply = ChatResponse::Joined {
                session_id: j.session.id.clone(),
                participant_id: j.participant_id.clone(),
                seq: j.seq,
            };
            // A since_seq past the session's end means "from now": pinned to that number.
            feed = Some((j.session, j.participant_id, r.since_seq.min(j.seq)));
            Ack::now(reply)
        }),
        ChatRequest::Post(r) => hub
            .post(
                actor,
                &r.session_id,
                &r.participant_id,
                r.kind,
                r.text,
                r.rich,
                r.visibility,
                r.key,
            )
            .map(|ack| ack.map(|(seq, duplicate)| ChatResponse::Posted { seq, duplicate })),
        ChatRequest::Leave(r) => hub
            .leave(actor, &r.session_id, &r.participant_id, r.after_action)
            .map(|ack| ack.map(|seq| ChatResponse::Left { seq })),
        ChatRequest::GetUserdata { session_id } => conn
            .check_live()
            .and_then(|()| hub.userdata(&session_id))
            .map(|u| Ack::now(ChatResponse::Userdata(u))),
        ChatRequest::UpdateUserdata {
            session_id,
            participant_id,
            changes,
        } => {
            // A gateway may change userdata as the system (an empty participant id): it writes
            // a bot's outcome for the workflow after the bot is no longer in the chat.
            let system = participant_id.is_empty()
                && matches!(conn.owner, crate::session::Owner::Gateway(_));
            let who = (!system).then_some(participant_id.as_str());
            hub.update_userdata(actor, &session_id, who, changes)
                .map(|ack| ack.map(ChatResponse::Userdata))
        }
    };
    Pending {
        id: frame.id,
        result,
        feed,
    }
}

async fn ack_loop(mut rx: mpsc::Receiver<Pending>, conn: Arc<Connection>) {
    while let Some(p) = rx.recv().await {
        let result = match p.result {
            Ok(ack) => ack.durable().await,
            Err(e) => Err(e),
        };
        let ok = result.is_ok();
        let reply = ServerFrame::Reply {
            id: p.id,
            result: result.map_err(|e| e.to_chat_error()),
        };
        if conn.tx.send(reply).await.is_err() {
            return;
        }
        if let (true, Some((session, pid, since))) = (ok, p.feed) {
            start_feed(&conn, session, pid, since);
        }
    }
}

/// Starts (or restarts) the feed of one participant on this connection.
fn start_feed(conn: &Arc<Connection>, session: Arc<Session>, pid: String, since: u64) {
    let key = (session.id.clone(), pid.clone());
    let Some(gen) = conn.begin_feed(&key) else {
        return;
    };
    let task_conn = conn.clone();
    let task_key = key.clone();
    let span = tracing::debug_span!("feed", session_id = %session.id, participant_id = %pid);
    let task = tokio::spawn(
        async move {
            let tx = task_conn.tx.clone();
            let cancel = task_conn.cancel.clone();
            let session_id = session.id.clone();
            let participant_id = pid.clone();
            follow(
                session,
                pid,
                since,
                Some(task_conn.id),
                cancel.clone(),
                |events| {
                    let frame = ServerFrame::Events {
                        session_id: session_id.clone(),
                        participant_id: participant_id.clone(),
                        events,
                    };
                    let tx = tx.clone();
                    let cancel = cancel.clone();
                    async move {
                        tokio::select! {
                            sent = tx.send(frame) => sent.is_ok(),
                            _ = cancel.cancelled() => false,
                        }
                    }
                },
            )
            .await;
            task_conn.feed_finished(&task_key, gen);
        }
        .instrument(span),
    );
    conn.set_feed_task(&key, gen, task.abort_handle());
}
