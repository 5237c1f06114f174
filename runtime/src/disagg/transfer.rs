//! The two ends of a KV transfer connection: [`serve`] on a prefill instance, [`fetch_prefix`]
//! on a decode instance (the exchange is in `wire`'s doc).

use super::wire::{plan_hex, Control, Message, WireError, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use super::{InstanceState, KvPrefix, Role};
use crate::sampler::SamplingParams;
use crate::scheduler::{CachedPrefix, Event, RequestParams, Scheduler};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
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
    let frame = tokio_util::bytes::Bytes::from(message.encode());
    tokio::time::timeout(wait, conn.send(frame))
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
        Ok(Some(frame)) => Ok(Message::decode(&frame?)?),
    }
}

fn hello(me: &Identity, weights: &str) -> Message {
    Message::Control(Control::Hello {
        version: PROTOCOL_VERSION,
        plan: plan_hex(&me.plan),
        weights: weights.to_string(),
        block_size: me.block_size as u32,
        block_bytes: me.block_bytes as u64,
    })
}

fn check_hello(me: &Identity, my_weights: &str, message: Message) -> Result<(), TransferError> {
    match message {
        Message::Control(Control::Hello {
            version,
            plan,
            weights,
            block_size,
            block_bytes,
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
                Ok(())
            }
            .map_err(TransferError::Mismatch)
        }
        other => Err(unexpected("a hello", other)),
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
    timeouts: Timeouts,
) -> Result<KvPrefix, TransferError> {
    let skip_blocks = held.blocks;
    let stream = tokio::time::timeout(timeouts.io, TcpStream::connect(addr))
        .await
        .map_err(|_| TransferError::Timeout(timeouts.io))?
        .map_err(|source| TransferError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let mut conn = connection(stream);
    // The weights the blocks must have been computed with: those of this instance's cache
    // when it counted its blocks (the seating checks their generation again).
    send(&mut conn, &hello(me, &held.weights), timeouts.io).await?;
    check_hello(me, &held.weights, receive(&mut conn, timeouts.io).await?)?;
    let total = tokens.len() / me.block_size.max(1);
    let request = Control::Prefill {
        tokens: tokens.clone(),
        skip_blocks: skip_blocks as u32,
    };
    send(&mut conn, &Message::Control(request), timeouts.io).await?;
    // Blocks arrive as the prefill instance computes them: each may take a prompt chunk's time.
    let mut blocks = Vec::new();
    loop {
        let due = skip_blocks + blocks.len();
        match receive(&mut conn, timeouts.prefill).await? {
            Message::Block { index, bytes }
                if index as usize == due && due < total && bytes.len() == me.block_bytes =>
            {
                blocks.push(bytes)
            }
            Message::Block { index, bytes } => {
                return Err(TransferError::Protocol(format!(
                    "block {index} of {} bytes where block {due} of {} (of {total}) was due",
                    bytes.len(),
                    me.block_bytes
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
    Ok(KvPrefix {
        tokens,
        first_block: skip_blocks,
        blocks,
        weights_generation: held.weights_generation,
    })
}

/// The prefill side: answers every connection on `listener` until the task is dropped, while
/// `instance` is a prefill instance (others are refused, so a role switch stops new transfers).
pub async fn serve(
    listener: TcpListener,
    scheduler: Scheduler,
    instance: Arc<InstanceState>,
    timeouts: Timeouts,
) {
    // Beyond this many at once, connections wait in the listen backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS));
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
        let (scheduler, instance) = (scheduler.clone(), instance.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _active = instance.transfer_started();
            let start = Instant::now();
            match answer(stream, &scheduler, &instance, timeouts).await {
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
    timeouts: Timeouts,
) -> Result<usize, TransferError> {
    let me = &instance.identity();
    let mut conn = connection(stream);
    // A decode instance needs only small messages: a large frame is refused before it is read.
    conn.codec_mut().set_max_frame_length(MAX_REQUEST_BYTES);
    // The weights in service now: the blocks sent must be of these (checked at every read).
    let weights = scheduler
        .cached_blocks(vec![])
        .await
        .map_err(|e| TransferError::Peer(e.to_string()))?;
    send(&mut conn, &hello(me, &weights.weights), timeouts.io).await?;
    let refuse = |message: String| Message::Control(Control::Error { message });
    if let Err(e) = check_hello(me, &weights.weights, receive(&mut conn, timeouts.io).await?) {
        let _ = send(&mut conn, &refuse(e.to_string()), timeouts.io).await;
        return Err(e);
    }
    let role = instance.role().current;
    if role != Role::Prefill {
        let message = format!("this instance is a {role:?} instance now, not a prefill instance");
        let _ = send(&mut conn, &refuse(message.clone()), timeouts.io).await;
        return Err(TransferError::Peer(message));
    }
    let (tokens, skip) = match receive(&mut conn, timeouts.io).await? {
        Message::Control(Control::Prefill {
            tokens,
            skip_blocks,
        }) => (tokens, skip_blocks as usize),
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
    let mut sent = skip;
    let total = tokens.len() / me.block_size;
    conn.codec_mut().set_max_frame_length(MAX_FRAME_BYTES);
    let generation = weights.weights_generation;
    let streamed = stream_blocks(
        &mut conn, scheduler, &tokens, total, generation, &mut sent, timeouts,
    );
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
    let end = Control::Done { end: sent as u32 };
    send(&mut conn, &Message::Control(end), timeouts.io).await?;
    Ok(sent - skip)
}

enum Failure {
    /// The prefill could not run: the decode instance is told why.
    Refused(String),
    /// The connection failed.
    Transfer(TransferError),
}

/// Runs `tokens` through the model as a request of one token, which leaves their full blocks
/// in the prefix cache, and sends each block from `*sent` on as soon as the cache holds it:
/// between two steps of a chunked prefill, the blocks of the chunks done so far go out while
/// the next chunk computes.
async fn stream_blocks(
    conn: &mut Connection,
    scheduler: &Scheduler,
    tokens: &[u32],
    total_blocks: usize,
    generation: u64,
    sent: &mut usize,
    timeouts: Timeouts,
) -> Result<(), Failure> {
    let changed =
        || Failure::Refused("the prefill instance's weights changed during the transfer".into());
    let params = prefill_request();
    // Submitted only when the cache lacks a block: blocks this instance holds already go out
    // without any computation.
    let mut request = None;
    let mut finished = false;
    loop {
        // The blocks past those sent that the cache holds now, in one call to the engine
        // thread, which answers between steps: this paces itself by the prefill's chunks.
        let (blocks, read_under) = scheduler
            .read_cached_blocks(tokens.to_vec(), *sent)
            .await
            .map_err(Failure::Refused)?;
        if read_under != generation {
            return Err(changed());
        }
        for bytes in blocks {
            let index = *sent as u32;
            send(conn, &Message::Block { index, bytes }, timeouts.io)
                .await
                .map_err(Failure::Transfer)?;
            *sent += 1;
        }
        // Every block sent, or the prefill done (a block the cache dropped meanwhile is the
        // decode instance's to compute).
        if *sent >= total_blocks || finished {
            return Ok(());
        }
        let stream = match &mut request {
            Some(stream) => stream,
            None => request.insert(
                scheduler
                    .submit(tokens.to_vec(), params.clone())
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

/// Transfers a prefill instance serves at once.
const MAX_TRANSFERS: usize = 64;

/// The largest message a prefill instance reads: a prefill request of about a million tokens.
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// How often a prefill instance looks for newly computed blocks while nothing else happens
/// (a request waiting in its queue, say).
const PROGRESS_POLL: Duration = Duration::from_millis(2);
