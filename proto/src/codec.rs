//! The one codec: every frame on every bgs TCP link, and every record the Chat Server journals.
//!
//! A frame is a `u32` big-endian payload length followed by a bincode 2 payload (standard
//! configuration: little-endian varints). The payload length may not exceed the configured maximum
//! (default [`DEFAULT_MAX_FRAME`], at most [`MAX_FRAME_LIMIT`]). Decoding never panics and never
//! allocates more than the frame it was given allows: malformed, truncated, oversized or trailing
//! bytes are an error value.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// Default maximum payload length of a frame: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// The largest maximum a configuration may choose: 16 MiB. Also the allocation limit of every
/// decode, so a length field inside a payload can never make the decoder reserve more.
pub const MAX_FRAME_LIMIT: usize = 16 << 20;
/// Largest frame accepted before a peer has authenticated (its Hello): 16 KiB. A stranger can make
/// a connection hold no more than this until the handshake completes or its deadline passes.
pub const PRE_AUTH_MAX_FRAME: usize = 16 << 10;
const LEN_PREFIX: usize = 4;
/// The most a partial frame makes the buffer grow by ahead of the bytes (64 KiB).
const RESERVE_STEP: usize = 64 << 10;

/// Why bytes could not become a value (or a value could not become bytes).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LIMIT>()
}

/// Encodes a value as a bincode payload (no length prefix).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a whole bincode payload (no length prefix). Bytes left over are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME_LIMIT {
        return Err(CodecError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LIMIT,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

/// Encodes a value as one complete frame (length prefix + payload).
pub fn encode_frame<T: Serialize>(value: &T, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let payload = encode(value)?;
    if payload.len() > max_frame {
        return Err(CodecError::FrameTooLarge {
            len: payload.len(),
            max: max_frame,
        });
    }
    let mut frame = Vec::with_capacity(LEN_PREFIX + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Splits one frame off the front of `buf`: `Ok(None)` while it is incomplete.
/// An announced length above `max_frame` is an error before any payload is buffered.
pub fn split_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<BytesMut>, CodecError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(CodecError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    if buf.len() < LEN_PREFIX + len {
        // Room for what may come next, not for what the peer announced: a partial frame holds
        // only the bytes that really arrived (a length field alone allocates nothing big).
        buf.reserve((LEN_PREFIX + len - buf.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    Ok(Some(buf.split_to(len)))
}

/// A `tokio_util` codec for a link that reads `In` frames and writes `Out` frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the given maximum payload length (clamped to [`MAX_FRAME_LIMIT`]).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.clamp(1, MAX_FRAME_LIMIT),
            _types: PhantomData,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the maximum payload length (clamped as in [`FrameCodec::new`]): a link starts at
    /// [`PRE_AUTH_MAX_FRAME`] and is raised once its peer has authenticated.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.clamp(1, MAX_FRAME_LIMIT);
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match split_frame(src, self.max_frame)? {
            Some(payload) => decode(&payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated(src.len())),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    /// Encodes straight into `dst` behind a length prefix that is filled in afterwards: no
    /// payload vector, no copy (a frame too large is taken back out of `dst`).
    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        let written =
            bincode::serde::encode_into_std_write(&item, &mut (&mut *dst).writer(), config());
        let len = dst.len() - start - LEN_PREFIX;
        match written {
            Ok(_) if len <= self.max_frame => {
                dst[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
                Ok(())
            }
            Ok(_) => {
                dst.truncate(start);
                Err(CodecError::FrameTooLarge {
                    len,
                    max: self.max_frame,
                })
            }
            Err(e) => {
                dst.truncate(start);
                Err(CodecError::Encode(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_announced_length_alone_allocates_little() {
        // A peer announces 16 MiB and sends 10 bytes: the buffer holds what came, plus a step.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&((MAX_FRAME_LIMIT as u32).to_be_bytes()));
        buf.extend_from_slice(&[0u8; 10]);
        assert!(split_frame(&mut buf, MAX_FRAME_LIMIT).unwrap().is_none());
        assert!(
            buf.capacity() <= 2 * RESERVE_STEP,
            "{} bytes reserved",
            buf.capacity()
        );
    }

    use super::*;
    use crate::chat::{
        ChatRequest, ClientFrame, ClientRole, Hello, PostKind, PostRequest, Visibility,
        CHAT_PROTOCOL_VERSION,
    };

    type ServerSide = FrameCodec<ClientFrame, ClientFrame>;

    fn post(text: &str) -> ClientFrame {
        ClientFrame {
            id: 7,
            request: ChatRequest::Post(PostRequest {
                session_id: "s-1".into(),
                participant_id: "p-1".into(),
                kind: PostKind::Message,
                text: text.into(),
                visibility: Visibility::Int,
                key: Some("k-1".into()),
                rich: None,
            }),
        }
    }

    /// The examples of docs/CHAT.md 6.1, byte for byte.
    #[test]
    fn the_documented_chat_frames_are_these_bytes() {
        let hello = ClientFrame {
            id: 1,
            request: ChatRequest::Hello(Hello {
                version: CHAT_PROTOCOL_VERSION,
                role: ClientRole::Agent,
                client_name: "x".into(),
                credential: Default::default(),
            }),
        };
        assert_eq!(
            encode_frame(&hello, DEFAULT_MAX_FRAME).unwrap(),
            [0, 0, 0, 7, 1, 0, 3, 1, 1, 0x78, 0]
        );
        let ping = ClientFrame {
            id: 1,
            request: ChatRequest::Ping,
        };
        assert_eq!(
            encode_frame(&ping, DEFAULT_MAX_FRAME).unwrap(),
            [0, 0, 0, 2, 1, 7]
        );
    }

    #[test]
    fn frame_round_trip() {
        let mut codec = ServerSide::default();
        let mut buf = BytesMut::new();
        let hello = ClientFrame {
            id: 1,
            request: ChatRequest::Hello(Hello {
                version: CHAT_PROTOCOL_VERSION,
                role: ClientRole::Gateway {
                    cluster_id: "bgs".into(),
                    epoch: 3,
                    node_id: "bgs-a".into(),
                },
                client_name: "test".into(),
                credential: Default::default(),
            }),
        };
        codec.encode(hello.clone(), &mut buf).unwrap();
        codec.encode(post("hello"), &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(hello));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(post("hello")));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn truncated_frame_waits_then_fails_at_eof() {
        let frame = encode_frame(&post("hello"), DEFAULT_MAX_FRAME).unwrap();
        let mut codec = ServerSide::default();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            let eof = codec.decode_eof(&mut buf);
            if cut == 0 {
                assert!(eof.unwrap().is_none());
            } else {
                assert!(matches!(eof, Err(CodecError::Truncated(n)) if n == cut));
            }
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut codec = ServerSide::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1025);
        buf.extend_from_slice(&[0u8; 10]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        // A frame too large to send leaves what was already queued as it was.
        let mut queued = BytesMut::from(&b"ab"[..]);
        let big = post(&"x".repeat(2000));
        assert!(matches!(
            codec.encode(big, &mut queued),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(&queued[..], b"ab");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut payload = encode(&post("a")).unwrap();
        payload.push(0);
        assert!(matches!(
            decode::<ClientFrame>(&payload),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn huge_inner_length_does_not_allocate_or_panic() {
        // id = 1, variant Post (index 3), then a string length claiming 2^62 bytes.
        let payload = [1u8, 3, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(decode::<ClientFrame>(&payload).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        // A small xorshift generator keeps the test deterministic without a dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode(&post("some text")).unwrap();
        for round in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Mutate a valid payload: the nastiest garbage is almost right.
                bytes = valid.clone();
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            let _ = decode::<ClientFrame>(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = ServerSide::new(64);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }

    #[test]
    fn json_form_exists() {
        let json = serde_json::to_string(&post("hi")).unwrap();
        let back: ClientFrame = serde_json::from_str(&json).unwrap();
        assert_eq!(back, post("hi"));
        assert!(json.contains("\"INT\""), "{json}");
    }
}
