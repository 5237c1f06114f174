//! The two ends of a KV transfer connection: [`serve`] on a prefill instance, [`fetch_prefix`]
//! on a decode instance (the exchange is in `wire`'s doc).

use super::shared::{SharedOffer, SharedRegion};
use super::wire::{
    block_frame_head, checksum, hex, plan_hex, Control, Message, WireError, CHECKSUM_BYTES,
    KIND_BLOCK, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use super::TransferPath;
use super::{random_bytes, BlockSlots, InstanceState, KvPrefix, ReceivedBlocks, Role};
use crate::cuda::ipc::{DeviceLink, DeviceRegion};
use crate::sampler::SamplingParams;
use crate::scheduler::{BlocksRead, CachedPrefix, Event, RequestParams, Scheduler};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::bytes::{Buf, Bytes};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// What the two ends must share besides the weights in service (which the scheduler reports,
/// [`CachedPrefix::weights`]): the same plan, KV blocks of the same size.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub plan: [u8; 32],
    pub block_size: usize,
    /// Bytes of one block, all layers.
    pub block_bytes: usize,
}

/// How long each side waits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For a connection, and for each frame once the blocks flow.
    pub io: Duration,
    /// For the prefill instance to run the prompt (it may queue behind others).
    pub prefill: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            io: Duration::from_secs(30),
            prefill: Duration::from_secs(600),
        }
    }
}

/// A secret both ends of a transfer hold (`fdrt serve --kv-transfer-key-file`): each proves it
/// to the other on the connection's nonces, so only instances given the key take or send
/// blocks. The file's bytes, trimmed of surrounding white space, go through blake3's key
/// derivation.
#[derive(Clone)]
pub struct TransferKey([u8; 32]);

impl TransferKey {
    /// The least a key file must hold, after trimming.
    pub const MIN_SECRET_BYTES: usize = 16;

    pub fn from_secret(secret: &[u8]) -> Result<TransferKey, String> {
        let secret = secret.trim_ascii();
        if secret.len() < Self::MIN_SECRET_BYTES {
            return Err(format!(
                "a KV transfer key needs at least {} bytes; this one has {}",
                Self::MIN_SECRET_BYTES,
                secret.len()
            ));
        }
        Ok(TransferKey(blake3::derive_key(
            "fdrt 2026 KV transfer key",
            secret,
        )))
    }

    /// The proof that the side in `role` holds the key, for the nonces of this connection.
    fn prove(&self, role: Role, to_nonce: &str, from_nonce: &str) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(&[role as u8]);
        hasher.update(to_nonce.as_bytes());
        hasher.update(from_nonce.as_bytes());
        hasher.finalize()
    }
}

impl std::fmt::Debug for TransferKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransferKey(..)")
    }
}

/// How one instance's transfers run.
#[derive(Clone, Debug)]
pub struct Options {
    pub timeouts: Timeouts,
    /// A decode instance offers a shared-memory region for the blocks (taken only on one host),
    /// and a GPU instance a device region too.
    pub shared_memory: bool,
    pub key: Option<TransferKey>,
    /// A GPU instance's device, for the device regions.
    pub device: Option<DeviceLink>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeouts: Timeouts::default(),
            shared_memory: true,
            key: None,
            device: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("KV transfer: cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("KV transfer: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("KV transfer: the two instances differ: {0}")]
    Mismatch(String),
    #[error("KV transfer: the peer refused: {0}")]
    Peer(String),
    #[error("KV transfer: {0}")]
    Protocol(String),
    #[error("KV transfer: no answer within {0:?}")]
    Timeout(Duration),
}

type Connection = Framed<TcpStream, LengthDelimitedCodec>;

fn connection(stream: TcpStream) -> Connection {
    // Blocks go out as they are read; no point holding small control frames back.
    let _ = stream.set_nodelay(true);
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec();
    Framed::new(stream, codec)
}

async fn send(
    conn: &mut Connection,
    message: &Message,
    wait: Duration,
) -> Result<(), TransferError> {
    let frame = Bytes::from(message.encode());
    tokio::time::timeout(wait, conn.send(frame))
        .await
        .map_err(|_| TransferError::Timeout(wait))??;
    Ok(())
}

/// Sends block `index` as a block frame written straight from `bytes` (see `wire`).
async fn send_block(
    conn: &mut Connection,
    index: u32,
    bytes: &[u8],
    wait: Duration,
) -> Result<(), TransferError> {
    let head = block_frame_head(index, bytes.len());
    let sum = checksum(&[&head[4..], bytes]);
    let mut pieces = Buf::chain(Buf::chain(&head[..], bytes), &sum[..]);
    // The codec's write buffer is empty: every `send` above flushes it.
    tokio::time::timeout(wait, conn.get_mut().write_all_buf(&mut pieces))
        .await
        .map_err(|_| TransferError::Timeout(wait))??;
    Ok(())
}

async fn receive(conn: &mut Connection, wait: Duration) -> Result<Message, TransferError> {
    match tokio::time::timeout(wait, conn.next()).await {
        Err(_) => Err(TransferError::Timeout(wait)),
        Ok(None) => Err(TransferError::Protocol(
            "the peer closed the connection".into(),
        )),
        Ok(Some(frame)) => Ok(Message::decode(frame?.freeze())?),
    }
}

fn hello(me: &Identity, weights: &str, nonce: &str) -> Message {
    Message::Control(Control::Hello {
        version: PROTOCOL_VERSION,
        plan: plan_hex(&me.plan),
        weights: weights.to_string(),
        block_size: me.block_size as u32,
        block_bytes: me.block_bytes as u64,
        nonce: nonce.to_string(),
    })
}

/// Checks the peer's hello against this instance; returns the peer's nonce.
fn check_hello(me: &Identity, my_weights: &str, message: Message) -> Result<String, TransferError> {
    match message {
        Message::Control(Control::Hello {
            version,
            plan,
            weights,
            block_size,
            block_bytes,
            nonce,
        }) => {
            let mine = plan_hex(&me.plan);
            let name = |w: &str| match w {
                "" => "the plan's own weights".to_string(),
                w => format!("weight snapshot {w}"),
            };
            if version != PROTOCOL_VERSION {
                Err(format!(
                    "protocol version {version} against this instance's {PROTOCOL_VERSION}"
                ))
            } else if plan != mine {
                Err(format!("plan {plan} against this instance's {mine}"))
            } else if weights != my_weights {
                Err(format!(
                    "{} against this instance's {}",
                    name(&weights),
                    name(my_weights)
                ))
            } else if block_size as usize != me.block_size {
                Err(format!(
                    "--block-size {block_size} against this instance's {}",
                    me.block_size
                ))
            } else if block_bytes != me.block_bytes as u64 {
                Err(format!(
                    "{block_bytes} bytes per KV block against this instance's {}",
                    me.block_bytes
                ))
            } else {
                Ok(nonce)
            }
            .map_err(TransferError::Mismatch)
        }
        other => Err(unexpected("a hello", other)),
    }
}

/// Steps 1 and 2 of the exchange (`wire`'s doc): hellos both ways, then proofs of the key: the
/// decode side (which connects) proves first, and the prefill side proves only once it has
/// checked that proof, so connecting to a prefill instance never earns its proof (which a relay
/// could show a decode instance). `role` is this side's. A mismatch is told to the peer before
/// the error returns.
async fn handshake(
    conn: &mut Connection,
    me: &Identity,
    weights: &str,
    role: Role,
    options: &Options,
) -> Result<(), TransferError> {
    let io = options.timeouts.io;
    let nonce = random_bytes::<16>()
        .map(|b| hex(&b))
        .ok_or_else(|| TransferError::Protocol("no randomness for a nonce".into()))?;
    send(conn, &hello(me, weights, &nonce), io).await?;
    let checked = async {
        let peer_nonce = check_hello(me, weights, receive(conn, io).await?)?;
        let proof = options.key.as_ref().map_or(String::new(), |key| {
            key.prove(role, &peer_nonce, &nonce).to_hex().to_string()
        });
        let mine = Message::Control(Control::Auth { proof });
        let peer = if role == Role::Decode {
            Role::Prefill
        } else {
            Role::Decode
        };
        if role == Role::Decode {
            send(conn, &mine, io).await?;
        }
        match receive(conn, io).await? {
            Message::Control(Control::Auth { proof }) => {
                check_proof(options.key.as_ref(), peer, &nonce, &peer_nonce, &proof)?
            }
            other => return Err(unexpected("a key proof", other)),
        }
        if role != Role::Decode {
            send(conn, &mine, io).await?;
        }
        Ok(())
    }
    .await;
    if let Err(TransferError::Mismatch(message)) = &checked {
        let refusal = Message::Control(Control::Error {
            message: message.clone(),
        });
        let _ = send(conn, &refusal, io).await;
    }
    checked
}

fn check_proof(
    key: Option<&TransferKey>,
    peer: Role,
    my_nonce: &str,
    peer_nonce: &str,
    proof: &str,
) -> Result<(), TransferError> {
    let (me, them) = match peer {
        Role::Decode => ("prefill", "decode"),
        _ => ("decode", "prefill"),
    };
    let refused = |why: String| Err(TransferError::Mismatch(why));
    match key {
        None if proof.is_empty() => Ok(()),
        None => refused(format!("the {them} instance holds a KV transfer key and this {me} instance has none; give both the same --kv-transfer-key-file")),
        Some(_) if proof.is_empty() => refused(format!("this {me} instance requires a KV transfer key and the {them} instance has none; give both the same --kv-transfer-key-file")),
        Some(key) => {
            // blake3::Hash compares in constant time.
            let expected = key.prove(peer, my_nonce, peer_nonce);
            match blake3::Hash::from_hex(proof) {
                Ok(given) if given == expected => Ok(()),
                _ => refused(format!(
                    "the {them} instance's KV transfer key is not this {me} instance's"
                )),
            }
        }
    }
}

/// The error for a message that is not the one expected (a peer's error message says why).
fn unexpected(wanted: &str, got: Message) -> TransferError {
    match got {
        Message::Control(Control::Error { message }) => TransferError::Peer(message),
        Message::Control(other) => {
            TransferError::Protocol(format!("expected {wanted}, got {other:?}"))
        }
        Message::Block { index, .. } => {
            TransferError::Protocol(format!("expected {wanted}, got block {index}"))
        }
    }
}

/// The decode side: asks the prefill instance at `addr` for the KV blocks of `tokens` (a whole
/// number of blocks) past the `held` ones this instance's cache has, and returns those it sends.
pub async fn fetch_prefix(
    addr: &str,
    me: &Identity,
    tokens: Vec<u32>,
    held: CachedPrefix,
    options: &Options,
) -> Result<KvPrefix, TransferError> {
    let timeouts = options.timeouts;
    let skip_blocks = held.blocks;
    let stream = tokio::time::timeout(timeouts.io, TcpStream::connect(addr))
        .await
        .map_err(|_| TransferError::Timeout(timeouts.io))?
        .map_err(|source| TransferError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    // One host: the connection's two ends have the same address (loopback, or the host's own).
    let same_host = matches!(
        (stream.local_addr(), stream.peer_addr()),
        (Ok(local), Ok(peer)) if local.ip() == peer.ip()
    );
    let mut conn = connection(stream);
    // The weights the blocks must have been computed with: those of this instance's cache
    // when it counted its blocks (the seating checks their generation again).
    handshake(&mut conn, me, &held.weights, Role::Decode, options).await?;
    let total = tokens.len() / me.block_size.max(1);
    let wanted = total.saturating_sub(skip_blocks);
    // A kept region for the blocks: on this host the prefill instance writes into it; from
    // another host the socket's block frames are read into it (its pages are touched already,
    // where a fresh buffer per frame costs a page fault every 4 KB).
    let mut region = None;
    if wanted > 0 {
        // Reserving a new region's pages takes a while: off the async workers.
        let block_bytes = me.block_bytes;
        region = tokio::task::spawn_blocking(move || SharedRegion::create(wanted, block_bytes))
            .await
            .ok()
            .flatten();
    }
    let offered = options.shared_memory && same_host;
    // A GPU instance on one host offers device memory too: a GPU prefill instance copies the
    // blocks into it device to device.
    let mut device_region = None;
    if let Some(link) = options.device.clone().filter(|_| offered && wanted > 0) {
        let block_bytes = me.block_bytes;
        let made =
            tokio::task::spawn_blocking(move || DeviceRegion::create(&link, wanted, block_bytes));
        device_region = match made.await {
            Ok(Ok(region)) => Some(region),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "KV transfer: no device region");
                None
            }
            Err(_) => None,
        };
    }
    let request = Control::Prefill {
        tokens: tokens.clone(),
        skip_blocks: skip_blocks as u32,
        shared: region
            .as_ref()
            .filter(|_| offered)
            .and_then(SharedRegion::offer),
        device: device_region.as_ref().and_then(DeviceRegion::offer),
    };
    send(&mut conn, &Message::Control(request), timeouts.io).await?;
    // Blocks arrive as the prefill instance computes them: each may take a prompt chunk's time.
    let mut frames = Vec::new(); // without a region
    let mut received = 0; // in the region, either way
    let mut mapped = false;
    let mut on_device = false;
    loop {
        let due = skip_blocks + frames.len() + received;
        let incoming = match &mut region {
            Some(region) if !mapped && due < total => {
                receive_block_into(&mut conn, region, due - skip_blocks, timeouts).await?
            }
            _ => Incoming::Message(receive(&mut conn, timeouts.prefill).await?),
        };
        let message = match incoming {
            Incoming::Block { index } if index as usize == due => {
                received += 1;
                continue;
            }
            Incoming::Block { index } => {
                return Err(TransferError::Protocol(format!(
                    "block {index} where block {due} (of {total}) was due"
                )))
            }
            Incoming::Message(message) => message,
        };
        match message {
            Message::Block { index, bytes }
                if region.is_none()
                    && index as usize == due
                    && due < total
                    && bytes.len() == me.block_bytes =>
            {
                frames.push(bytes)
            }
            Message::Block { index, bytes } => {
                return Err(TransferError::Protocol(format!(
                    "block {index} of {} bytes where block {due} of {} (of {total}) was due",
                    bytes.len(),
                    me.block_bytes
                )))
            }
            Message::Control(Control::Mapped { device: false })
                if offered && region.is_some() && due == skip_blocks && !mapped =>
            {
                mapped = true
            }
            Message::Control(Control::Mapped { device: true })
                if device_region.is_some() && due == skip_blocks && !mapped =>
            {
                mapped = true;
                on_device = true;
            }
            Message::Control(Control::Written { end })
                if mapped && end as usize > due && end as usize <= total =>
            {
                received = end as usize - skip_blocks
            }
            Message::Control(Control::Written { end }) => {
                return Err(TransferError::Protocol(format!(
                    "blocks before {end} written to shared memory after block {due} (of {total}){}",
                    if mapped {
                        ""
                    } else {
                        ", but the region was not taken"
                    }
                )))
            }
            Message::Control(Control::Done { end }) if end as usize == due => break,
            Message::Control(Control::Done { end }) => {
                return Err(TransferError::Protocol(format!(
                    "the transfer ended at block {end} after block {due} had come"
                )))
            }
            other => return Err(unexpected("a block", other)),
        }
    }
    // The prefill instance wrote its last block before its `Done` (or never took the region):
    // the regions can serve the next transfer once these blocks are seated.
    for r in region.iter_mut() {
        r.keep();
    }
    for r in device_region.iter_mut() {
        r.keep();
    }
    let (blocks, path) = match (region, device_region) {
        (_, Some(region)) if on_device => (
            ReceivedBlocks::Device {
                region,
                count: received,
            },
            TransferPath::Device,
        ),
        (Some(region), _) => (
            ReceivedBlocks::Region {
                region,
                count: received,
            },
            if mapped {
                TransferPath::SharedMemory
            } else {
                TransferPath::Socket
            },
        ),
        (None, _) => (ReceivedBlocks::Frames(frames), TransferPath::Socket),
    };
    Ok(KvPrefix {
        tokens,
        first_block: skip_blocks,
        blocks,
        path,
        weights_generation: held.weights_generation,
    })
}

/// What [`receive_block_into`] read.
enum Incoming {
    /// A block frame, its bytes checked and in the region's slot.
    Block {
        index: u32,
    },
    Message(Message),
}

/// The next frame, a block frame read straight into `slot` of `region` (checksum checked);
/// any other frame, or a block frame of another size, read and decoded whole.
async fn receive_block_into(
    conn: &mut Connection,
    region: &mut SharedRegion,
    slot: usize,
    timeouts: Timeouts,
) -> Result<Incoming, TransferError> {
    let mut length = [0u8; 4];
    // The first bytes may wait for a prompt chunk's computation; the rest follow at once.
    read_exact(conn, &mut length, timeouts.prefill).await?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(TransferError::Protocol(format!(
            "a frame of {length} bytes (at most {MAX_FRAME_BYTES})"
        )));
    }
    let block_bytes = region.block(slot).len();
    if length == 5 + block_bytes + CHECKSUM_BYTES {
        let mut head = [0u8; 5];
        read_exact(conn, &mut head, timeouts.io).await?;
        if head[0] == KIND_BLOCK {
            let bytes = region.block_mut(slot);
            read_exact(conn, bytes, timeouts.io).await?;
            let mut sum = [0u8; CHECKSUM_BYTES];
            read_exact(conn, &mut sum, timeouts.io).await?;
            if checksum(&[&head, region.block(slot)]) != sum {
                return Err(WireError::Checksum.into());
            }
            let index = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
            return Ok(Incoming::Block { index });
        }
        let mut frame = head.to_vec();
        frame.resize(length, 0);
        read_exact(conn, &mut frame[5..], timeouts.io).await?;
        return Ok(Incoming::Message(Message::decode(frame.into())?));
    }
    let mut frame = vec![0u8; length];
    read_exact(conn, &mut frame, timeouts.io).await?;
    Ok(Incoming::Message(Message::decode(frame.into())?))
}

/// Fills `dst` from the connection: what its codec has read ahead first, then the socket (the
/// codec reads the next frame from where this leaves off).
async fn read_exact(
    conn: &mut Connection,
    dst: &mut [u8],
    wait: Duration,
) -> Result<(), TransferError> {
    let ahead = conn.read_buffer_mut();
    let n = ahead.len().min(dst.len());
    dst[..n].copy_from_slice(&ahead[..n]);
    ahead.advance(n);
    if n < dst.len() {
        let rest = &mut dst[n..];
        tokio::time::timeout(wait, conn.get_mut().read_exact(rest))
            .await
            .map_err(|_| TransferError::Timeout(wait))?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    TransferError::Protocol("the peer closed the connection".into())
                }
                _ => TransferError::Io(e),
            })?;
    }
    Ok(())
}

/// The prefill side: answers every connection on `listener` until the task is dropped, while
/// `instance` is a prefill instance (others are refused, so a role switch stops new transfers).
pub async fn serve(
    listener: TcpListener,
    scheduler: Scheduler,
    instance: Arc<InstanceState>,
    options: Options,
) {
    // Beyond this many at once, connections wait in the listen backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS));
    let options = Arc::new(options);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // closed: never, the semaphore is ours
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait and go on rather than spin.
                tracing::warn!(error = %e, "KV transfer: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (scheduler, instance, options) = (scheduler.clone(), instance.clone(), options.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _active = instance.transfer_started();
            let start = Instant::now();
            match answer(stream, &scheduler, &instance, &options).await {
                Ok(blocks) => {
                    instance.counters.sent(
                        blocks,
                        blocks * instance.identity().block_bytes,
                        start.elapsed(),
                    );
                    tracing::debug!(%peer, blocks, "KV transfer sent")
                }
                Err(e) => {
                    instance.counters.send_failed();
                    tracing::warn!(%peer, error = %e, "KV transfer")
                }
            }
        });
    }
}

/// One connection of [`serve`]; returns the blocks sent.
async fn answer(
    stream: TcpStream,
    scheduler: &Scheduler,
    instance: &InstanceState,
    options: &Options,
) -> Result<usize, TransferError> {
    let timeouts = options.timeouts;
    let me = &instance.identity();
    let mut conn = connection(stream);
    // A decode instance needs only small messages: a large frame is refused before it is read.
    conn.codec_mut().set_max_frame_length(MAX_REQUEST_BYTES);
    // The weights in service now: the blocks sent must be of these (checked at every read).
    let weights = scheduler
        .cached_blocks(vec![])
        .await
        .map_err(|e| TransferError::Peer(e.to_string()))?;
    // An unauthenticated connection holds one of the transfer slots: it gets a short while.
    let handshaking = handshake(&mut conn, me, &weights.weights, Role::Prefill, options);
    tokio::time::timeout(HANDSHAKE_TIMEOUT.min(timeouts.io), handshaking)
        .await
        .map_err(|_| TransferError::Timeout(HANDSHAKE_TIMEOUT.min(timeouts.io)))??;
    let refuse = |message: String| Message::Control(Control::Error { message });
    let role = instance.role().current;
    if role != Role::Prefill {
        let message = format!("this instance is a {role:?} instance now, not a prefill instance");
        let _ = send(&mut conn, &refuse(message.clone()), timeouts.io).await;
        return Err(TransferError::Peer(message));
    }
    let (tokens, skip, offer, device_offer) = match receive(&mut conn, timeouts.io).await? {
        Message::Control(Control::Prefill {
            tokens,
            skip_blocks,
            shared,
            device,
        }) => (tokens, skip_blocks as usize, shared, device),
        other => return Err(unexpected("a prefill request", other)),
    };
    if tokens.is_empty() || !tokens.len().is_multiple_of(me.block_size) {
        let message = format!(
            "a prefix of {} tokens is not a whole number of {}-position blocks",
            tokens.len(),
            me.block_size
        );
        send(&mut conn, &refuse(message.clone()), timeouts.io).await?;
        return Err(TransferError::Peer(message));
    }
    let total = tokens.len() / me.block_size;
    let (blocks, block_bytes) = (total.saturating_sub(skip), me.block_bytes);
    // The device region first (a GPU instance that can reach it), then the host one.
    let mut region = match (device_offer, options.device.clone()) {
        (Some(offer), Some(link)) => {
            let opened = move || DeviceRegion::open(&link, &offer, blocks, block_bytes);
            match tokio::task::spawn_blocking(opened).await {
                Ok(Ok(region)) => Some(Taken::Device(region)),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "KV transfer: the device region is not reachable");
                    None
                }
                Err(_) => None,
            }
        }
        _ => None,
    };
    if region.is_none() {
        if let Some(offer) = offer {
            region = tokio::task::spawn_blocking(move || open_region(&offer, blocks, block_bytes))
                .await
                .ok()
                .flatten()
                .map(Taken::Host);
        }
    }
    if let Some(taken) = &region {
        let mapped = Control::Mapped {
            device: matches!(taken, Taken::Device(_)),
        };
        send(&mut conn, &Message::Control(mapped), timeouts.io).await?;
    }
    let mut out = Outbound {
        tokens: &tokens,
        skip,
        sent: skip,
        total,
        generation: weights.weights_generation,
        region,
        buffers: [vec![], vec![]],
        block_bytes: me.block_bytes,
        io: timeouts.io,
    };
    let streamed = stream_blocks(&mut conn, scheduler, &mut out);
    match tokio::time::timeout(timeouts.prefill, streamed).await {
        Ok(Ok(())) => {}
        Ok(Err(Failure::Refused(message))) => {
            send(&mut conn, &refuse(message.clone()), timeouts.io).await?;
            return Err(TransferError::Peer(message));
        }
        Ok(Err(Failure::Transfer(e))) => return Err(e),
        Err(_) => {
            let message = format!("the prefill took longer than {:?}", timeouts.prefill);
            send(&mut conn, &refuse(message.clone()), timeouts.io).await?;
            return Err(TransferError::Peer(message));
        }
    }
    let end = Control::Done {
        end: out.sent as u32,
    };
    send(&mut conn, &Message::Control(end), timeouts.io).await?;
    match &mut out.region {
        Some(Taken::Host(region)) => region.keep(),
        Some(Taken::Device(region)) => region.keep(),
        None => {}
    }
    Ok(out.sent - skip)
}

/// The decode instance's region a prefill instance writes the blocks into.
enum Taken {
    Host(SharedRegion),
    Device(DeviceRegion),
}

/// The decode instance's region, if it is on this host; otherwise the blocks go as frames.
fn open_region(offer: &SharedOffer, blocks: usize, block_bytes: usize) -> Option<SharedRegion> {
    SharedRegion::open(offer, blocks, block_bytes)
        .map_err(|e| tracing::debug!(error = %e, "KV transfer: blocks go over the socket"))
        .ok()
}

enum Failure {
    /// The prefill could not run: the decode instance is told why.
    Refused(String),
    /// The connection failed.
    Transfer(TransferError),
}

/// A prefill instance's side of one transfer while blocks go out.
struct Outbound<'a> {
    tokens: &'a [u32],
    /// The first block asked for.
    skip: usize,
    /// The next block to hand over.
    sent: usize,
    total: usize,
    /// The weights generation every read must be of.
    generation: u64,
    /// The decode instance's region, when the blocks go through one.
    region: Option<Taken>,
    /// Two sets of block buffers when they go as frames: the engine thread fills one while the
    /// other is sent.
    buffers: [Vec<Vec<u8>>; 2],
    block_bytes: usize,
    io: Duration,
}

/// Runs `tokens` through the model as a request of one token, which leaves their full blocks
/// in the prefix cache, and hands over each block from `out.sent` on as soon as the cache
/// holds it: between two steps of a chunked prefill, the blocks of the chunks done so far go
/// out while the next chunk computes.
async fn stream_blocks(
    conn: &mut Connection,
    scheduler: &Scheduler,
    out: &mut Outbound<'_>,
) -> Result<(), Failure> {
    let params = prefill_request();
    // Submitted only when the cache lacks a block: blocks this instance holds already go out
    // without any computation.
    let mut request = None;
    let mut finished = false;
    loop {
        hand_over_cached(conn, scheduler, out).await?;
        // Every block sent, or the prefill done (a block the cache dropped meanwhile is the
        // decode instance's to compute).
        if out.sent >= out.total || finished {
            return Ok(());
        }
        let stream = match &mut request {
            Some(stream) => stream,
            None => request.insert(
                scheduler
                    .submit(out.tokens.to_vec(), params.clone())
                    .map_err(|e| Failure::Refused(e.to_string()))?,
            ),
        };
        tokio::select! {
            progress = tokio::time::timeout(PROGRESS_POLL, stream.next()) => match progress {
                Err(_) | Ok(Some(Event::Token(_))) => {}
                Ok(Some(Event::Done { .. })) => finished = true,
                Ok(Some(Event::Failed(message))) => return Err(Failure::Refused(message)),
                Ok(None) => {
                    return Err(Failure::Refused(
                        "the prefill ended without finishing".into(),
                    ))
                }
            },
            // A decode instance sends nothing after its request: anything now is its hang-up,
            // and the prefill (dropped with `request`) stops rather than computing for nobody.
            _ = conn.next() => {
                return Err(Failure::Transfer(TransferError::Protocol(
                    "the decode instance hung up before the transfer ended".into(),
                )))
            }
        }
    }
}

/// Hands over every block from `out.sent` on that the cache holds now: into the region, or as
/// frames, each batch sent while the engine thread copies the next.
async fn hand_over_cached(
    conn: &mut Connection,
    scheduler: &Scheduler,
    out: &mut Outbound<'_>,
) -> Result<(), Failure> {
    let checked = |read: Result<BlocksRead, String>, generation: u64| {
        let read = read.map_err(Failure::Refused)?;
        if read.weights_generation != generation {
            return Err(Failure::Refused(
                "the prefill instance's weights changed during the transfer".into(),
            ));
        }
        Ok(read)
    };
    if let Some(region) = out.region.take() {
        let offset = out.sent - out.skip;
        let slots = match region {
            Taken::Host(region) => BlockSlots::Shared { region, offset },
            Taken::Device(region) => BlockSlots::Device { region, offset },
        };
        let read = scheduler.read_cached_blocks(out.tokens.to_vec(), out.sent, slots);
        let read = checked(read.await, out.generation)?;
        out.region = match read.slots {
            BlockSlots::Shared { region, .. } => Some(Taken::Host(region)),
            BlockSlots::Device { region, .. } => Some(Taken::Device(region)),
            BlockSlots::Buffers(_) => None,
        };
        if read.count > 0 {
            out.sent += read.count;
            let written = Control::Written {
                end: out.sent as u32,
            };
            send(conn, &Message::Control(written), out.io)
                .await
                .map_err(Failure::Transfer)?;
        }
        return Ok(());
    }
    let batch = (READ_BATCH_BYTES / out.block_bytes.max(1)).max(1);
    let fresh = |buffers: &mut Vec<Vec<u8>>| {
        let mut buffers = std::mem::take(buffers);
        buffers.resize_with(batch, || vec![0; out.block_bytes]);
        BlockSlots::Buffers(buffers)
    };
    let [mut next_buffers, mut spare] = std::mem::take(&mut out.buffers);
    let mut pending =
        scheduler.read_cached_blocks(out.tokens.to_vec(), out.sent, fresh(&mut next_buffers));
    loop {
        let read = checked(pending.await, out.generation)?;
        let BlockSlots::Buffers(filled) = read.slots else {
            return Err(Failure::Refused("KV slots came back changed".into()));
        };
        if read.count == 0 {
            out.buffers = [filled, spare];
            return Ok(());
        }
        // The next read starts now, into the other buffers, while these go out.
        let after = out.sent + read.count;
        pending = scheduler.read_cached_blocks(out.tokens.to_vec(), after, fresh(&mut spare));
        for bytes in &filled[..read.count] {
            send_block(conn, out.sent as u32, bytes, out.io)
                .await
                .map_err(Failure::Transfer)?;
            out.sent += 1;
        }
        spare = filled;
    }
}

/// What a prefill instance runs a prefix as: one greedy token, which leaves the prefix's full
/// blocks in its prefix cache.
pub fn prefill_request() -> RequestParams {
    RequestParams {
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
        logprobs: None,
        speculative: false,
    }
}

/// How long a prefill instance waits for a decode instance's hello and proof.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Transfers a prefill instance serves at once.
const MAX_TRANSFERS: usize = 64;

/// The largest message a prefill instance reads: a prefill request of about a million tokens.
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// How often a prefill instance looks for newly computed blocks while nothing else happens
/// (a request waiting in its queue, say).
const PROGRESS_POLL: Duration = Duration::from_millis(2);

/// Bytes of blocks one read from the engine copies when they go as frames (at least a block):
/// two such batches per transfer are in memory at once.
const READ_BATCH_BYTES: usize = 4 << 20;
