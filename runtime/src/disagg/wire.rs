//! The KV transfer protocol between a decode instance and a prefill instance, over one TCP
//! connection per request.
//!
//! Framing is tokio-util's length-delimited codec (a 4-byte big-endian length, then the frame);
//! every frame is `[kind][body][blake3(kind, body)]`, so a frame damaged anywhere on its way is
//! refused whole instead of seating wrong keys and values. Control messages carry JSON bodies
//! (small, and readable in a capture); a block frame carries the block's bytes raw, in
//! [`crate::kv_cache::KvPool::read_block`]'s form, behind its index.
//!
//! The exchange, decode instance (D) to prefill instance (P):
//! 1. both send [`Message::Hello`]: protocol version, plan identity, block size and bytes per
//!    block must agree, or the side that sees the difference sends [`Message::Error`] and closes;
//! 2. D sends [`Message::Prefill`]: the prompt's leading full blocks' tokens, and how many of
//!    those blocks it already holds in its prefix cache (P skips them);
//! 3. P prefills the tokens (from its own prefix cache where it can) and sends each block as
//!    soon as it is computed, one [`Message::Block`] each, in order, while the later chunks of
//!    the prompt are still being computed; then [`Control::Done`] with the index after the
//!    last block sent; or an error at any point.

use serde::{Deserialize, Serialize};

/// Changes whenever a message's form does.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts: a block of a large model's KV (an 8B-shaped plan's
/// 64-position block is 16.8 MB in f32) with room to spare.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

const CHECKSUM_BYTES: usize = 32;
const KIND_CONTROL: u8 = 1;
const KIND_BLOCK: u8 = 2;

/// A control message (JSON body).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    Hello {
        version: u32,
        /// The plan's identity (`LoadedPlan::identity`), hex.
        plan: String,
        /// The weight snapshot in service, empty for the plan's own weights.
        weights: String,
        block_size: u32,
        block_bytes: u64,
    },
    Prefill {
        tokens: Vec<u32>,
        skip_blocks: u32,
    },
    /// The blocks sent end before block `end` (fewer than asked for when the prefill
    /// instance's cache dropped some: the decode instance computes the rest).
    Done {
        end: u32,
    },
    Error {
        message: String,
    },
}

/// One frame's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Control(Control),
    /// Block `index` of the prefix (counted from the prefix's first block).
    Block {
        index: u32,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("a KV transfer frame of {0} bytes is too short to hold its checksum")]
    Short(usize),
    #[error("a KV transfer frame failed its checksum: damaged in transit")]
    Checksum,
    #[error("a KV transfer frame has unknown kind {0}")]
    Kind(u8),
    #[error("a KV transfer message is malformed: {0}")]
    Malformed(String),
}

impl Message {
    /// The frame, checksum included (the codec adds the length).
    pub fn encode(&self) -> Vec<u8> {
        let mut frame = match self {
            Message::Control(control) => {
                let mut frame = vec![KIND_CONTROL];
                // Serializing these plain structs cannot fail.
                frame.extend(serde_json::to_vec(control).unwrap_or_default());
                frame
            }
            Message::Block { index, bytes } => {
                let mut frame = Vec::with_capacity(5 + bytes.len() + CHECKSUM_BYTES);
                frame.push(KIND_BLOCK);
                frame.extend(index.to_le_bytes());
                frame.extend_from_slice(bytes);
                frame
            }
        };
        let checksum = blake3::hash(&frame);
        frame.extend_from_slice(checksum.as_bytes());
        frame
    }

    /// Checks and reads a frame.
    pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
        let Some(body_len) = frame.len().checked_sub(CHECKSUM_BYTES).filter(|&n| n > 0) else {
            return Err(WireError::Short(frame.len()));
        };
        let (content, checksum) = frame.split_at(body_len);
        // blake3::Hash compares in constant time; the length is fixed above.
        if blake3::hash(content)
            != blake3::Hash::from_slice(checksum).map_err(|_| WireError::Checksum)?
        {
            return Err(WireError::Checksum);
        }
        let (&kind, body) = content.split_first().ok_or(WireError::Short(frame.len()))?;
        match kind {
            KIND_CONTROL => serde_json::from_slice(body)
                .map(Message::Control)
                .map_err(|e| WireError::Malformed(e.to_string())),
            KIND_BLOCK => {
                let (index, bytes) = body.split_first_chunk::<4>().ok_or_else(|| {
                    WireError::Malformed("a block frame without its index".into())
                })?;
                Ok(Message::Block {
                    index: u32::from_le_bytes(*index),
                    bytes: bytes.to_vec(),
                })
            }
            other => Err(WireError::Kind(other)),
        }
    }
}

/// The plan identity as the hello message spells it.
pub fn plan_hex(identity: &[u8; 32]) -> String {
    identity.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages() -> Vec<Message> {
        vec![
            Message::Control(Control::Hello {
                version: PROTOCOL_VERSION,
                plan: plan_hex(&[0xab; 32]),
                weights: "step-7".into(),
                block_size: 64,
                block_bytes: 1 << 20,
            }),
            Message::Control(Control::Prefill {
                tokens: vec![1, 2, 3],
                skip_blocks: 1,
            }),
            Message::Control(Control::Done { end: 3 }),
            Message::Control(Control::Error {
                message: "no".into(),
            }),
            Message::Block {
                index: 7,
                bytes: (0..=255).collect(),
            },
            Message::Block {
                index: 0,
                bytes: vec![],
            },
        ]
    }

    #[test]
    fn every_message_survives_its_frame() {
        for message in messages() {
            assert_eq!(Message::decode(&message.encode()), Ok(message));
        }
    }

    #[test]
    fn a_frame_changed_anywhere_is_refused() {
        for message in messages() {
            let frame = message.encode();
            for at in 0..frame.len() {
                let mut damaged = frame.clone();
                damaged[at] ^= 0x10;
                assert_eq!(
                    Message::decode(&damaged),
                    Err(WireError::Checksum),
                    "byte {at} of {message:?}"
                );
            }
            assert!(Message::decode(&frame[..frame.len() - 1]).is_err());
        }
        assert_eq!(Message::decode(&[]), Err(WireError::Short(0)));
        assert_eq!(Message::decode(&[0; 32]), Err(WireError::Short(32)));
    }

    #[test]
    fn checksummed_nonsense_is_refused_by_kind_and_form() {
        let frame = |content: &[u8]| {
            let mut f = content.to_vec();
            f.extend_from_slice(blake3::hash(content).as_bytes());
            f
        };
        assert_eq!(Message::decode(&frame(&[9, 1, 2])), Err(WireError::Kind(9)));
        assert!(matches!(
            Message::decode(&frame(&[KIND_CONTROL, b'{'])),
            Err(WireError::Malformed(_))
        ));
        let mut unknown_field = vec![KIND_CONTROL];
        unknown_field.extend(br#"{"type":"prefill","tokens":[1],"skip_blocks":0,"x":1}"#);
        assert!(matches!(
            Message::decode(&frame(&unknown_field)),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(&frame(&[KIND_BLOCK, 1, 2])),
            Err(WireError::Malformed(_))
        ));
    }
}
