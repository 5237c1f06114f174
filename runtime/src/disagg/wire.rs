//! The KV transfer protocol between a decode instance and a prefill instance, over one TCP
//! connection per request.
//!
//! Framing is tokio-util's length-delimited codec (a 4-byte big-endian length, then the frame);
//! every frame is `[kind][body][xxh3-128(kind, body)]`, so a frame damaged anywhere on its way is
//! refused whole instead of seating wrong keys and values (the checksum detects damage; it does
//! not authenticate: the handshake does that, below). Control messages carry JSON bodies
//! (small, and readable in a capture); a block frame carries the block's bytes raw, in
//! [`crate::kv_cache::KvPool::read_block`]'s form, behind its index, and is written to the socket
//! in three pieces ([`block_frame_head`], the bytes, [`checksum`]) so a block is never copied
//! into a frame.
//!
//! The exchange, decode instance (D) to prefill instance (P):
//! 1. both send [`Control::Hello`]: protocol version, plan identity, weights in service, block
//!    size and bytes per block must agree, or the side that sees the difference sends
//!    [`Control::Error`] and closes; each hello carries a fresh random nonce;
//! 2. D sends [`Control::Auth`], then P, once it has checked D's: with a shared transfer key, a
//!    keyed hash of the peer's nonce and its own (and its role, so a proof cannot be sent back);
//!    without a key, empty. A side with a key refuses a peer whose proof is missing or wrong,
//!    and one without a key refuses a peer that has one (the two are configured differently).
//!    The key authenticates the connection's two ends, not each frame: on a network path that
//!    is not trusted, carry the connection over TLS or a VPN;
//! 3. D sends [`Control::Prefill`]: the prompt's leading full blocks' tokens, how many of those
//!    blocks it already holds in its prefix cache (P skips them), and, on one host, a shared
//!    memory region to put the blocks in (`super::shared`) and, from a GPU instance, a device
//!    region too (`crate::cuda::ipc`);
//! 4. P answers [`Control::Mapped`] if it opened one of them (the device region first, when it
//!    is a GPU instance that can reach it); then it prefills the tokens (from
//!    its own prefix cache where it can) and hands over each block as soon as it is computed,
//!    while the later chunks of the prompt are still being computed: as a [`Message::Block`]
//!    frame each, or, into the region, a [`Control::Written`] for each batch; then
//!    [`Control::Done`] with the index after the last block; or an error at any point.

use super::shared::SharedOffer;
use crate::cuda::ipc::DeviceOffer;
use serde::{Deserialize, Serialize};
use tokio_util::bytes::Bytes;

/// Changes whenever a message's form does.
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest frame either side accepts: a block of a large model's KV (an 8B-shaped plan's
/// 64-position block is 16.8 MB in f32) with room to spare.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

pub const CHECKSUM_BYTES: usize = 16;
const KIND_CONTROL: u8 = 1;
/// The kind byte of a block frame (a decode instance reads block frames by hand, into kept
/// memory: `super::transfer`).
pub(crate) const KIND_BLOCK: u8 = 2;

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
        /// 16 random bytes, hex: what the peer's [`Control::Auth`] proves its key on.
        nonce: String,
    },
    /// Hex of the keyed hash proving the transfer key (`super::transfer::TransferKey`), empty
    /// without one.
    Auth {
        proof: String,
    },
    Prefill {
        tokens: Vec<u32>,
        skip_blocks: u32,
        /// A shared-memory region for the blocks, when the decode instance could make one.
        #[serde(default)]
        shared: Option<SharedOffer>,
        /// A device region for the blocks, when the decode instance is a GPU instance that
        /// could make one.
        #[serde(default)]
        device: Option<DeviceOffer>,
    },
    /// The prefill instance opened an offered region (the device region when `device`): the
    /// blocks come through it.
    Mapped {
        #[serde(default)]
        device: bool,
    },
    /// The region holds the blocks before block `end` (counted from the prefix's first block).
    Written {
        end: u32,
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
        bytes: Bytes,
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
        let sum = checksum(&[&frame]);
        frame.extend_from_slice(&sum);
        frame
    }

    /// Checks and reads a frame (a block's bytes stay in the frame's buffer).
    pub fn decode(frame: Bytes) -> Result<Message, WireError> {
        let Some(body_len) = frame.len().checked_sub(CHECKSUM_BYTES).filter(|&n| n > 0) else {
            return Err(WireError::Short(frame.len()));
        };
        let (content, sum) = frame.split_at(body_len);
        if checksum(&[content])[..] != sum[..] {
            return Err(WireError::Checksum);
        }
        match content[0] {
            KIND_CONTROL => serde_json::from_slice(&content[1..])
                .map(Message::Control)
                .map_err(|e| WireError::Malformed(e.to_string())),
            KIND_BLOCK => {
                let index = content
                    .get(1..5)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        WireError::Malformed("a block frame without its index".into())
                    })?;
                Ok(Message::Block {
                    index: u32::from_le_bytes(index),
                    bytes: frame.slice(5..body_len),
                })
            }
            other => Err(WireError::Kind(other)),
        }
    }
}

/// The checksum of a frame's content, given in pieces.
pub fn checksum(pieces: &[&[u8]]) -> [u8; CHECKSUM_BYTES] {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for piece in pieces {
        hasher.update(piece);
    }
    hasher.digest128().to_le_bytes()
}

/// What goes on the wire before a block's `len` bytes in a block frame: the codec's length
/// field, the kind and the index. The frame's checksum is
/// `checksum(&[&head[4..], bytes])`.
pub fn block_frame_head(index: u32, len: usize) -> [u8; 9] {
    let frame_len = (1 + 4 + len + CHECKSUM_BYTES) as u32;
    let mut head = [0u8; 9];
    head[..4].copy_from_slice(&frame_len.to_be_bytes());
    head[4] = KIND_BLOCK;
    head[5..].copy_from_slice(&index.to_le_bytes());
    head
}

/// The plan identity as the hello message spells it.
pub fn plan_hex(identity: &[u8; 32]) -> String {
    hex(identity)
}

/// Bytes as lowercase hex, the way the messages spell them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes [`hex`] spelled; `None` for anything else.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
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
                nonce: "00ff".repeat(8),
            }),
            Message::Control(Control::Auth {
                proof: "ab".repeat(32),
            }),
            Message::Control(Control::Prefill {
                tokens: vec![1, 2, 3],
                skip_blocks: 1,
                shared: None,
                device: None,
            }),
            Message::Control(Control::Prefill {
                tokens: vec![4],
                skip_blocks: 0,
                shared: Some(SharedOffer {
                    pid: 7,
                    fd: 3,
                    tag: "01".repeat(16),
                    bytes: 1 << 30,
                }),
                device: Some(DeviceOffer {
                    pid: 7,
                    handle: "02".repeat(64),
                    tag: "03".repeat(16),
                    bytes: 1 << 20,
                }),
            }),
            Message::Control(Control::Mapped { device: false }),
            Message::Control(Control::Mapped { device: true }),
            Message::Control(Control::Written { end: 2 }),
            Message::Control(Control::Done { end: 3 }),
            Message::Control(Control::Error {
                message: "no".into(),
            }),
            Message::Block {
                index: 7,
                bytes: (0..=255).collect::<Vec<u8>>().into(),
            },
            Message::Block {
                index: 0,
                bytes: Bytes::new(),
            },
        ]
    }

    #[test]
    fn hex_spells_bytes_and_unhex_reads_only_that() {
        assert_eq!(unhex(&hex(&[0, 0xab, 0x7f])), Some(vec![0, 0xab, 0x7f]));
        for bad in ["abc", "+f", "zz", "0g"] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_message_survives_its_frame() {
        for message in messages() {
            assert_eq!(Message::decode(message.encode().into()), Ok(message));
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
                    Message::decode(damaged.into()),
                    Err(WireError::Checksum),
                    "byte {at} of {message:?}"
                );
            }
            assert!(Message::decode(frame[..frame.len() - 1].to_vec().into()).is_err());
        }
        let short = |n: usize| Message::decode(vec![0; n].into());
        assert_eq!(short(0), Err(WireError::Short(0)));
        assert_eq!(short(CHECKSUM_BYTES), Err(WireError::Short(CHECKSUM_BYTES)));
    }

    #[test]
    fn checksummed_nonsense_is_refused_by_kind_and_form() {
        let frame = |content: &[u8]| {
            let mut f = content.to_vec();
            f.extend_from_slice(&checksum(&[content]));
            Bytes::from(f)
        };
        assert_eq!(Message::decode(frame(&[9, 1, 2])), Err(WireError::Kind(9)));
        assert!(matches!(
            Message::decode(frame(&[KIND_CONTROL, b'{'])),
            Err(WireError::Malformed(_))
        ));
        let mut unknown_field = vec![KIND_CONTROL];
        unknown_field.extend(br#"{"type":"prefill","tokens":[1],"skip_blocks":0,"x":1}"#);
        assert!(matches!(
            Message::decode(frame(&unknown_field)),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(frame(&[KIND_BLOCK, 1, 2])),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_block_written_in_pieces_is_the_frame_the_codec_reads() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let head = block_frame_head(9, bytes.len());
        let mut wire = head.to_vec();
        wire.extend_from_slice(&bytes);
        wire.extend_from_slice(&checksum(&[&head[4..], &bytes]));
        let whole = Message::Block {
            index: 9,
            bytes: bytes.clone().into(),
        }
        .encode();
        assert_eq!(&wire[..4], &(whole.len() as u32).to_be_bytes());
        assert_eq!(&wire[4..], &whole[..]);
    }
}
