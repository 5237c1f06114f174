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
//! `wire` is the protocol, `transfer` the two ends of a connection, `shared` the same-host
//! path through shared memory (`crate::cuda::ipc` the one through device memory between GPU
//! instances), `kept` the memory both keep for the next transfer.

pub(crate) mod kept;
pub mod shared;
pub mod transfer;
pub mod wire;

use crate::batch_engine::BatchEngine;
use crate::cuda::ipc::DeviceRegion;
use crate::error::RuntimeError;
use shared::SharedRegion;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::bytes::Bytes;
use transfer::Identity;

/// A prompt prefix's KV blocks as they travel between instances.
#[derive(Debug)]
pub struct KvPrefix {
    /// The prefix's tokens: a whole number of blocks.
    pub tokens: Vec<u32>,
    /// The index of the first block carried (the blocks before it were not asked for).
    pub first_block: usize,
    /// Blocks `first_block ..` in `KvPool::read_block`'s form.
    pub blocks: ReceivedBlocks,
    /// How they came.
    pub path: TransferPath,
    /// The receiving scheduler's weights generation when it asked for them
    /// ([`crate::scheduler::CachedPrefix`]): after a live weight update in between they are
    /// not seated.
    pub weights_generation: u64,
}

/// How a transfer's blocks came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferPath {
    /// Over the connection, as block frames.
    Socket,
    /// Written by the prefill instance into host shared memory (same host).
    SharedMemory,
    /// Copied by the prefill instance into device memory (GPU instances on one host).
    Device,
}

/// The blocks a transfer brought: in a kept shared-memory region (the prefill instance wrote
/// them into it on this host, or the decode instance read the socket's block frames into it),
/// in a device region (GPU instances on one host), or, where no region could be had, in the
/// frames they came in.
#[derive(Debug)]
pub enum ReceivedBlocks {
    Frames(Vec<Bytes>),
    /// The first `count` blocks of the region.
    Region {
        region: SharedRegion,
        count: usize,
    },
    /// The first `count` blocks of the device region.
    Device {
        region: DeviceRegion,
        count: usize,
    },
}

impl ReceivedBlocks {
    pub fn len(&self) -> usize {
        match self {
            ReceivedBlocks::Frames(frames) => frames.len(),
            ReceivedBlocks::Region { count, .. } | ReceivedBlocks::Device { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i` of those that came, when they are in host memory.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        match self {
            ReceivedBlocks::Frames(frames) => frames.get(i).map(|b| &b[..]),
            ReceivedBlocks::Region { region, count } => (i < *count).then(|| region.block(i)),
            ReceivedBlocks::Device { .. } => None,
        }
    }

    /// Seats block `i` of those that came as KV block `block` of `engine`'s pool.
    pub(crate) fn seat(
        &self,
        i: usize,
        engine: &mut dyn BatchEngine,
        block: u32,
    ) -> Result<(), RuntimeError> {
        match self {
            ReceivedBlocks::Device { region, count } if i < *count => {
                engine.write_kv_block_from_device(block, region, i)
            }
            ReceivedBlocks::Device { count, .. } => Err(RuntimeError::KvBlocks(format!(
                "block {i} of {count} received"
            ))),
            _ => match self.get(i) {
                Some(bytes) => engine.write_kv_block(block, bytes),
                None => Err(RuntimeError::KvBlocks(format!(
                    "block {i} of {} received",
                    self.len()
                ))),
            },
        }
    }
}

/// Where a prefill instance's engine thread copies the blocks it reads for a transfer: buffers
/// kept from one read to the next (each a block long), or the decode instance's shared-memory
/// or device region from its block `offset` on.
#[derive(Debug)]
pub enum BlockSlots {
    Buffers(Vec<Vec<u8>>),
    Shared { region: SharedRegion, offset: usize },
    Device { region: DeviceRegion, offset: usize },
}

impl BlockSlots {
    /// How many blocks one read may copy.
    pub fn capacity(&self) -> usize {
        match self {
            BlockSlots::Buffers(buffers) => buffers.len(),
            BlockSlots::Shared { region, offset } => region.blocks().saturating_sub(*offset),
            BlockSlots::Device { region, offset } => region.blocks().saturating_sub(*offset),
        }
    }

    /// Copies KV block `block` of `engine`'s pool into the read's `i`th slot
    /// (`i < capacity()`).
    pub(crate) fn fill(
        &mut self,
        i: usize,
        engine: &dyn BatchEngine,
        block: u32,
    ) -> Result<(), RuntimeError> {
        match self {
            BlockSlots::Buffers(buffers) => engine.read_kv_block(block, &mut buffers[i]),
            BlockSlots::Shared { region, offset } => {
                engine.read_kv_block(block, region.block_mut(*offset + i))
            }
            BlockSlots::Device { region, offset } => {
                engine.read_kv_block_to_device(block, region, *offset + i)
            }
        }
    }
}

/// `N` bytes from the operating system's generator; `None` when it fails (a transfer that
/// needs them does not happen).
pub(crate) fn random_bytes<const N: usize>() -> Option<[u8; N]> {
    use rand::TryRngCore;
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).ok()?;
    Some(bytes)
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

/// An instance's role, and the role it moves to once its work in flight drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleStatus {
    pub current: Role,
    pub pending: Option<Role>,
}

/// What an instance's HTTP side and its transfer server share: who it is (plan, block size),
/// its role, and the transfers' counters.
#[derive(Debug)]
pub struct InstanceState {
    identity: Identity,
    role: Mutex<RoleStatus>,
    active_transfers: AtomicUsize,
    role_switches: AtomicU64,
    pub counters: TransferCounters,
    /// Transfers a decode instance takes at once ([`MAX_PULLS`]): each holds a prompt's blocks
    /// (frames or a shared-memory region) until they are seated.
    pulls: tokio::sync::Semaphore,
}

/// Transfers a decode instance takes at once; more requests wait for one to end (its scheduler
/// would not run them sooner anyway).
pub const MAX_PULLS: usize = 8;

impl InstanceState {
    pub fn new(identity: Identity, role: Role) -> InstanceState {
        InstanceState {
            identity,
            role: Mutex::new(RoleStatus {
                current: role,
                pending: None,
            }),
            active_transfers: AtomicUsize::new(0),
            role_switches: AtomicU64::new(0),
            counters: TransferCounters::default(),
            pulls: tokio::sync::Semaphore::new(MAX_PULLS),
        }
    }

    pub fn identity(&self) -> Identity {
        self.identity.clone()
    }

    pub fn role(&self) -> RoleStatus {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `role` once the instance's work in flight drains (asking for the current role
    /// cancels a pending switch). Returns the status after.
    pub fn request_role(&self, role: Role) -> RoleStatus {
        let mut status = self.role.lock().unwrap_or_else(|e| e.into_inner());
        status.pending = (role != status.current).then_some(role);
        *status
    }

    /// Takes the pending role, if any; returns the new one.
    pub fn finish_switch(&self) -> Option<Role> {
        let mut status = self.role.lock().unwrap_or_else(|e| e.into_inner());
        let role = status.pending.take()?;
        status.current = role;
        self.role_switches.fetch_add(1, Ordering::Relaxed);
        Some(role)
    }

    pub fn role_switches(&self) -> u64 {
        self.role_switches.load(Ordering::Relaxed)
    }

    /// Counts a transfer in flight until the guard is dropped.
    pub fn transfer_started(&self) -> ActiveTransfer<'_> {
        self.active_transfers.fetch_add(1, Ordering::SeqCst);
        ActiveTransfer(self)
    }

    /// Waits for one of the [`MAX_PULLS`] transfers a decode instance takes at once.
    pub async fn pull_started(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.pulls.acquire().await.ok()
    }

    pub fn active_transfers(&self) -> usize {
        self.active_transfers.load(Ordering::SeqCst)
    }
}

/// A transfer in flight ([`InstanceState::transfer_started`]).
pub struct ActiveTransfer<'a>(&'a InstanceState);

impl Drop for ActiveTransfer<'_> {
    fn drop(&mut self) {
        self.0.active_transfers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// KV transfers as one instance saw them (`/metrics`): sent as a prefill instance, received as
/// a decode instance.
#[derive(Debug, Default)]
pub struct TransferCounters {
    pub sent_blocks: AtomicU64,
    pub sent_bytes: AtomicU64,
    sent_micros: AtomicU64,
    pub send_failures: AtomicU64,
    pub received_blocks: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Of the blocks received, those that came through shared memory (same host).
    pub received_shared_blocks: AtomicU64,
    /// Of the blocks received, those that came through device memory (GPU instances, same
    /// host).
    pub received_device_blocks: AtomicU64,
    received_micros: AtomicU64,
    pub receive_failures: AtomicU64,
}

impl TransferCounters {
    /// A transfer sent `blocks` blocks (`bytes`) in `time`, from connection to end.
    pub fn sent(&self, blocks: usize, bytes: usize, time: Duration) {
        self.sent_blocks.fetch_add(blocks as u64, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.sent_micros
            .fetch_add(time.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn send_failed(&self) {
        self.send_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A transfer brought `blocks` blocks (`bytes`), taking `time` from asking to seating them.
    pub fn received(&self, blocks: usize, bytes: usize, time: Duration) {
        self.received_blocks
            .fetch_add(blocks as u64, Ordering::Relaxed);
        self.received_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.received_micros
            .fetch_add(time.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn receive_failed(&self) {
        self.receive_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent_seconds(&self) -> f64 {
        self.sent_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn received_seconds(&self) -> f64 {
        self.received_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}
