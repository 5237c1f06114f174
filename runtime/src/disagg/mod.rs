//! Prefill/decode disaggregation: a decode instance (`fdrt serve --role decode`) has the KV
//! blocks of a long prompt computed by a prefill instance (`--role prefill`) and continues the
//! request itself.
//!
//! The blocks travel through the prefix cache on both sides, so nothing else in the scheduler
//! learns about instances: the prefill instance runs the prompt's leading full blocks as an
//! ordinary request, which leaves them in its prefix cache, and reads them from there
//! ([`crate::scheduler::Scheduler::read_cached_blocks`]); the decode instance writes them into
//! its own prefix cache ([`crate::scheduler::Scheduler::write_cached_blocks`]) and then submits
//! the request as usual, which is admitted with them as a cache hit and computes only the rest
//! (less than a block, and the last prompt token, whose logits give the first token). So the
//! decode instance samples every token itself, with the request's own sampler: outputs are
//! exactly those of one mixed instance, greedy or seeded. Blocks the decode instance already
//! holds are not sent, and any failure of a transfer leaves the decode instance computing the
//! prompt itself: slower, never different.
//!
//! `wire` is the protocol, `transfer` the two ends of a connection.

pub mod transfer;
pub mod wire;

/// A prompt prefix's KV blocks as they travel between instances.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPrefix {
    /// The prefix's tokens: a whole number of blocks.
    pub tokens: Vec<u32>,
    /// The index of the first block carried (the blocks before it were not asked for).
    pub first_block: usize,
    /// Blocks `first_block ..` in `KvPool::read_block`'s form.
    pub blocks: Vec<Vec<u8>>,
}

/// The role of an instance (`fdrt serve --role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Prefills and decodes its own requests (the default).
    Mixed,
    /// Also serves KV transfers to decode instances (`--kv-transfer-port`).
    Prefill,
    /// Also takes a request's prompt blocks from the prefill instance the router names.
    Decode,
}
