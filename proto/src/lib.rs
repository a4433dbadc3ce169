//! Wire types of bgs and the one codec that turns them into bytes.
//!
//! This crate knows bytes and types only: no actors, no sockets. Every other crate encodes and
//! decodes through [`codec`], so the wire format (bincode 2, length-prefixed frames) is chosen in
//! exactly one place.
//!
//! - [`chat`]: the chat protocol between a gateway (or an agent tool) and the Chat Server.
//! - [`esp`]: ESP requests and responses (the workflow's control channel to the gateway).
//! - [`ha`]: the HA link between the two nodes of a pair.
//! - [`codec`]: `u32` big-endian length prefix + bincode payload, with a maximum frame size.
//!
//! Every type here also has a JSON form through serde (the HTTP transports use it).

pub mod bot;
pub mod chat;
pub mod codec;
pub mod esp;
pub mod ha;
#[cfg(test)]
mod proptests;

pub use codec::{CodecError, FrameCodec, DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT};
