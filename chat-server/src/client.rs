//! A TCP client of the chat protocol for agent tools, demos and tests: one connection, requests
//! answered in order, events buffered until asked for.

use std::collections::VecDeque;
use std::time::Duration;

use bgs_proto::chat::{
    AfterAction, ChatError, ChatEvent, ChatRequest, ChatResponse, ClientFrame, ClientRole, Hello,
    JoinRequest, LeaveRequest, ParticipantType, PostKind, PostRequest, ResumeRequest, Secret,
    ServerFrame, Style, Visibility, CHAT_PROTOCOL_VERSION,
};
use bgs_proto::codec::{CodecError, FrameCodec, DEFAULT_MAX_FRAME};
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_util::codec::{FramedRead, FramedWrite};

type Codec = FrameCodec<ServerFrame, ClientFrame>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("refused: {0}")]
    Refused(ChatError),
    #[error("connection closed{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed(Option<ChatError>),
    #[error("fenced: epoch {0} of the cluster is connected")]
    Fenced(u64),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct ChatClient {
    reader: FramedRead<OwnedReadHalf, Codec>,
    writer: FramedWrite<OwnedWriteHalf, Codec>,
    next_id: u64,
    /// Frames that arrived while waiting for a reply.
    backlog: VecDeque<ServerFrame>,
    pub timeout: Duration,
}

impl ChatClient {
    /// Connects and says Hello as `role`, with no credential (a server without --credentials).
    pub async fn connect(
        addr: impl ToSocketAddrs,
        role: ClientRole,
    ) -> Result<ChatClient, ClientError> {
        Self::connect_with(addr, role, Secret::default()).await
    }

    /// Connects and says Hello as `role` with the token the server's --credentials gives it.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        role: ClientRole,
        credential: Secret,
    ) -> Result<ChatClient, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut client = ChatClient {
            reader: FramedRead::new(rd, Codec::new(DEFAULT_MAX_FRAME)),
            writer: FramedWrite::new(wr, Codec::new(DEFAULT_MAX_FRAME)),
            next_id: 1,
            backlog: VecDeque::new(),
            timeout: Duration::from_secs(10),
        };
        let hello = Hello {
            version: CHAT_PROTOCOL_VERSION,
            role,
            client_name: "bgs-chat-client".into(),
            credential,
        };
        match client.request(ChatRequest::Hello(hello)).await? {
            ChatResponse::Welcome { .. } => Ok(client),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn read(&mut self) -> Result<ServerFrame, ClientError> {
        match tokio::time::timeout(self.timeout, self.reader.next()).await {
            Err(_) => Err(ClientError::Timeout(self.timeout)),
            Ok(None) => Err(ClientError::Closed(None)),
            Ok(Some(frame)) => Ok(frame?),
        }
    }

    /// Sends a request and waits for its reply; events that arrive meanwhile are kept.
    pub async fn request(&mut self, request: ChatRequest) -> Result<ChatResponse, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(ClientFrame { id, request }).await?;
        loop {
            match self.read().await? {
                ServerFrame::Reply { id: got, result } if got == id => {
                    return result.map_err(ClientError::Refused)
                }
                ServerFrame::Goodbye(e) => return Err(ClientError::Closed(Some(e))),
                ServerFrame::Fenced { epoch, .. } => return Err(ClientError::Fenced(epoch)),
                other => self.backlog.push_back(other),
            }
        }
    }

    /// The next frame that is not a reply (events, fenced, goodbye).
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        if let Some(f) = self.backlog.pop_front() {
            return Ok(f);
        }
        self.read().await
    }

    /// Events for `participant_id` in `session_id` until `until` holds for one of them (inclusive).
    pub async fn events_until(
        &mut self,
        session_id: &str,
        participant_id: &str,
        until: impl Fn(&ChatEvent) -> bool,
    ) -> Result<Vec<ChatEvent>, ClientError> {
        let mut out = Vec::new();
        loop {
            match self.next_frame().await? {
                ServerFrame::Events {
                    session_id: s,
                    participant_id: p,
                    events,
                } if s == session_id && p == participant_id => {
                    for e in events {
                        let done = until(&e);
                        out.push(e);
                        if done {
                            return Ok(out);
                        }
                    }
                }
                ServerFrame::Goodbye(e) => return Err(ClientError::Closed(Some(e))),
                ServerFrame::Fenced { epoch, .. } => return Err(ClientError::Fenced(epoch)),
                _ => {}
            }
        }
    }

    /// Joins a session; returns the participant id and the join's sequence number.
    pub async fn join(
        &mut self,
        session_id: &str,
        nickname: &str,
        participant_type: ParticipantType,
        style: Style,
        visibility: Visibility,
        since_seq: u64,
    ) -> Result<(String, u64), ClientError> {
        let request = ChatRequest::Join(JoinRequest {
            session_id: session_id.into(),
            nickname: nickname.into(),
            participant_type,
            style,
            visibility,
            since_seq,
        });
        match self.request(request).await? {
            ChatResponse::Joined {
                participant_id,
                seq,
                ..
            } => Ok((participant_id, seq)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Resumes a participant (after a reconnect); returns the session's last sequence number.
    pub async fn resume(
        &mut self,
        session_id: &str,
        participant_id: &str,
        since_seq: u64,
    ) -> Result<u64, ClientError> {
        let request = ChatRequest::Resume(ResumeRequest {
            session_id: session_id.into(),
            participant_id: participant_id.into(),
            since_seq,
        });
        match self.request(request).await? {
            ChatResponse::Joined { seq, .. } => Ok(seq),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Posts; returns the sequence number and whether the key was a duplicate.
    pub async fn post(
        &mut self,
        session_id: &str,
        participant_id: &str,
        text: &str,
        visibility: Visibility,
        key: Option<&str>,
    ) -> Result<(u64, bool), ClientError> {
        let request = ChatRequest::Post(PostRequest {
            session_id: session_id.into(),
            participant_id: participant_id.into(),
            kind: PostKind::Message,
            text: text.into(),
            visibility,
            key: key.map(str::to_string),
            rich: None,
        });
        match self.request(request).await? {
            ChatResponse::Posted { seq, duplicate } => Ok((seq, duplicate)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn leave(
        &mut self,
        session_id: &str,
        participant_id: &str,
        after_action: AfterAction,
    ) -> Result<u64, ClientError> {
        let request = ChatRequest::Leave(LeaveRequest {
            session_id: session_id.into(),
            participant_id: participant_id.into(),
            after_action,
        });
        match self.request(request).await? {
            ChatResponse::Left { seq } => Ok(seq),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
