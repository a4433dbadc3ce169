//! The HA link between the two nodes of a pair: handshake, heartbeats, and the replication
//! stream of bot starts, context saves and removals (docs/HA.md).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::bot::BotKey;
use crate::bot::BotSpec;
#[cfg(test)]
use crate::chat::Visibility;

/// Version of the HA link protocol, declared in [`HaFrame::Hello`]. 2: a replicated bot carries
/// its [`BotSpec`] whole. 3: [`HaOp::Checkpoint`], a completed turn that saved nothing.
pub const HA_PROTOCOL_VERSION: u16 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaRole {
    Primary,
    Backup,
}

impl HaRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HaRole::Primary => "primary",
            HaRole::Backup => "backup",
        }
    }
}

/// Everything needed to bring a bot back on the other node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedBot {
    pub instance_id: String,
    /// What the bot was started with (its StartBot); one copy shared by the session, the bot,
    /// the registry and the replicated state (the same bytes on the wire as a plain `BotSpec`).
    pub spec: Arc<BotSpec>,
    /// The participant the bot joined as, and the sequence number of its join.
    pub participant_id: String,
    pub joined_seq: u64,
    pub started_ms: u64,
    /// The last saved context and the last event sequence it covers. Shared bytes: the save,
    /// the primary's store, the outbox and the frame hold one copy (the same bytes on the wire
    /// as a `Vec<u8>`).
    pub context: Option<bytes::Bytes>,
    pub checkpoint_seq: u64,
}

/// One replicated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaOp {
    Started(Box<ReplicatedBot>),
    Saved {
        instance_id: String,
        context: bytes::Bytes,
        checkpoint_seq: u64,
    },
    Removed {
        instance_id: String,
    },
    /// The bot has handled every event up to `checkpoint_seq` without saving a new context:
    /// a take-over gives it only what comes after (its state lives elsewhere, or did not change).
    Checkpoint {
        instance_id: String,
        checkpoint_seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaFrame {
    /// Sent by the accepting node first: a nonce the dialer proves its secret with.
    Challenge {
        nonce: [u8; 32],
    },
    /// The dialer's handshake; `proof` = HMAC-SHA256(secret, nonce ‖ cluster_id ‖ node_id).
    Hello {
        version: u16,
        cluster_id: String,
        node_id: String,
        role: HaRole,
        epoch: u64,
        proof: Vec<u8>,
        /// Where this node answers HTTP (for `not_primary` answers).
        http: String,
    },
    /// The accepting node's answer: its role and epoch, and the id of this run of the process
    /// (a backup notices a primary that restarted without its state).
    Welcome {
        node_id: String,
        role: HaRole,
        epoch: u64,
        http: String,
        run_id: String,
    },
    /// The handshake failed; the link closes.
    Refused {
        reason: String,
    },
    Heartbeat {
        epoch: u64,
    },
    /// The primary's whole state, in one or more frames (`first` replaces the backup's state,
    /// `last` completes it); ops after `upto_op` follow.
    Snapshot {
        epoch: u64,
        upto_op: u64,
        bots: Vec<ReplicatedBot>,
        first: bool,
        last: bool,
    },
    /// Ops numbered from `first_op`, in order.
    Ops {
        epoch: u64,
        first_op: u64,
        ops: Vec<HaOp>,
    },
    /// The backup has applied every op up to `upto_op`.
    Ack {
        upto_op: u64,
    },
    /// Switchover: the primary has stopped, everything up to `upto_op` is acknowledged; the
    /// backup takes over as primary with `epoch`.
    HandOver {
        epoch: u64,
        upto_op: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn frames_round_trip() {
        let bot = ReplicatedBot {
            instance_id: "b".into(),
            spec: Arc::new(BotSpec {
                key: BotKey {
                    interaction_id: "i".into(),
                    bot_id: "echo".into(),
                    bot_name: String::new(),
                },
                nickname: "Echo".into(),
                visibility: Visibility::Int,
                stop_on_agent_arrival: true,
                stop_on_customer_left: false,
                holdup: false,
                category: "c".into(),
                function: "f".into(),
                parameters: Default::default(),
                userdata: [("InteractionId".to_string(), "i".to_string())]
                    .into_iter()
                    .collect(),
            }),
            participant_id: "p".into(),
            joined_seq: 2,
            started_ms: 1,
            context: Some(bytes::Bytes::from_static(b"3")),
            checkpoint_seq: 9,
        };
        for f in [
            HaFrame::Snapshot {
                epoch: 2,
                upto_op: 7,
                bots: vec![bot.clone()],
                first: true,
                last: true,
            },
            HaFrame::Ops {
                epoch: 2,
                first_op: 8,
                ops: vec![
                    HaOp::Started(Box::new(bot)),
                    HaOp::Checkpoint {
                        instance_id: "b".into(),
                        checkpoint_seq: 10,
                    },
                    HaOp::Removed {
                        instance_id: "b".into(),
                    },
                ],
            },
            HaFrame::Challenge { nonce: [7; 32] },
        ] {
            assert_eq!(decode::<HaFrame>(&encode(&f).unwrap()).unwrap(), f);
        }
    }

    /// A saved context is carried as shared bytes, with the same bytes on the wire as the
    /// `Vec<u8>` it was before: no HA protocol change.
    #[test]
    fn shared_context_bytes_encode_as_a_byte_vector_did() {
        for context in [&b""[..], b"3", &[0u8, 255, 7, 128][..], &[42u8; 300][..]] {
            assert_eq!(
                encode(&bytes::Bytes::copy_from_slice(context)).unwrap(),
                encode(&context.to_vec()).unwrap()
            );
        }
    }
}
