//! Prefill/decode disaggregation below the HTTP layer: a decode instance takes a prompt's KV
//! blocks from a prefill instance over the transfer protocol (loopback TCP) and continues the
//! request with exactly the tokens one mixed instance gives, greedy and seeded; blocks it holds
//! already are not sent; instances that differ, and damaged or broken transfers, end in errors
//! (never a hang), and the prefill instance serves on.

mod common;

use common::*;
use runtime::disagg::transfer::{self, Identity, Options, Timeouts, TransferError, TransferKey};
use runtime::disagg::wire::{Control, Message, WireError};
use runtime::disagg::{InstanceState, ReceivedBlocks, Role, TransferPath};
use runtime::sampler::SamplingParams;
use runtime::scheduler::CachedPrefix;
use runtime::scheduler::{Event, RequestParams, Scheduler, SchedulerConfig};
use std::sync::Arc;
use std::time::Duration;

const BLOCK: usize = 16;

/// A decode instance that holds none of the prefix, before any weight update.
fn nothing_held() -> CachedPrefix {
    CachedPrefix {
        blocks: 0,
        weights_generation: 0,
        weights: String::new(),
    }
}

/// A scheduler over the tiny llama with blocks of `block_size`, and what a transfer peer must
/// share with it.
fn instance(block_size: usize) -> (Scheduler, Identity) {
    let engine = tiny_llama_engine(block_size);
    let identity = Identity {
        plan: engine.plan().identity(),
        block_size,
        block_bytes: engine.kv_pool().bytes_per_block(),
    };
    // What `fdrt serve` announces (from the manifest) is what the pool reads and writes.
    assert_eq!(
        engine.plan().manifest.kv.bytes_per_token as usize * block_size,
        identity.block_bytes
    );
    let config = SchedulerConfig {
        max_num_seqs: 4,
        max_waiting: 16,
        prefix_caching: true,
        speculative: None,
    };
    (Scheduler::start(Box::new(engine), config), identity)
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 37 + i * 11) % 290)
        .collect()
}

fn sampled(max_tokens: usize, seed: u64) -> RequestParams {
    RequestParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: Some(seed),
            ..SamplingParams::greedy()
        },
        ..greedy_request(max_tokens)
    }
}

fn tokens_of(s: &Scheduler, prompt: &[u32], params: &RequestParams) -> Vec<u32> {
    let (tokens, last) = collect_stream(s.submit(prompt.to_vec(), params.clone()).expect("submit"));
    assert!(matches!(last, Event::Done { .. }), "{last:?}");
    tokens
}

/// A prefill instance serving transfers on a loopback port.
fn prefill_instance(rt: &tokio::runtime::Runtime) -> (Scheduler, Identity, String) {
    prefill_instance_with(rt, Options::default())
}

fn prefill_instance_with(
    rt: &tokio::runtime::Runtime,
    options: Options,
) -> (Scheduler, Identity, String) {
    let (p, identity) = instance(BLOCK);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let state = Arc::new(InstanceState::new(identity.clone(), Role::Prefill));
    rt.spawn(transfer::serve(listener, p.clone(), state, options));
    (p, identity, addr)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn a_decode_instance_continues_from_blocks_a_prefill_instance_computed() {
    continues_from_moved_blocks(false);
}

#[test]
fn blocks_moved_through_shared_memory_give_the_same_tokens() {
    continues_from_moved_blocks(true);
}

/// A decode instance takes the blocks of several prompts over the socket or through shared
/// memory (both instances are on this host) and gives a mixed instance's tokens.
fn continues_from_moved_blocks(shared_memory: bool) {
    let rt = runtime();
    let options = Options {
        shared_memory,
        ..Options::default()
    };
    let (_p, identity, addr) = prefill_instance(&rt);
    let (mixed, _) = instance(BLOCK);
    let (d, d_identity) = instance(BLOCK);
    assert_eq!(identity, d_identity);
    let long = prompt(1, 70);
    // The second shares the first's first three blocks, then differs.
    let mut sharing = long[..3 * BLOCK].to_vec();
    sharing.extend(prompt(2, 30));
    let cases = [
        (long.clone(), greedy_request(12)),
        (sharing.clone(), greedy_request(12)),
        (prompt(3, 64), sampled(16, 11)), // a whole number of blocks: the last stays behind
        (prompt(4, 49), sampled(16, 5)),
        (prompt(5, 10), greedy_request(8)), // shorter than a block: nothing to move
    ];
    let mut hits = 0;
    for (i, (prompt, params)) in cases.iter().enumerate() {
        let want = tokens_of(&mixed, prompt, params);
        // What `fdrt serve --role decode` does before it submits the request.
        let blocks = (prompt.len() - 1) / BLOCK;
        let prefix = prompt[..blocks * BLOCK].to_vec();
        let held = rt
            .block_on(d.cached_blocks(prefix.clone()))
            .expect("cached");
        if blocks > 0 {
            let fetched = rt
                .block_on(transfer::fetch_prefix(
                    &addr,
                    &d_identity,
                    prefix,
                    held.clone(),
                    &options,
                ))
                .expect("fetch");
            assert_eq!(fetched.first_block, held.blocks, "case {i}");
            let path = if shared_memory {
                TransferPath::SharedMemory
            } else {
                TransferPath::Socket
            };
            assert_eq!(fetched.path, path, "case {i}: the path the blocks took");
            // Either way they land in a kept region (over the socket, read straight into it).
            assert_eq!(
                matches!(fetched.blocks, ReceivedBlocks::Region { .. }),
                cfg!(target_os = "linux"),
                "case {i}"
            );
            assert_eq!(
                fetched.blocks.len(),
                blocks - held.blocks,
                "case {i}: only the missing blocks"
            );
            let seated = rt.block_on(d.write_cached_blocks(fetched)).expect("seat");
            assert_eq!(seated, blocks, "case {i}");
        }
        if i == 1 {
            assert_eq!(
                held.blocks, 3,
                "the shared blocks stayed in the decode instance's cache"
            );
        }
        let before = d.stats().prefix_cache_hit_tokens;
        let got = tokens_of(&d, prompt, params);
        assert_eq!(got, want, "case {i}: the decode instance's tokens");
        let hit = (d.stats().prefix_cache_hit_tokens - before) as usize;
        assert_eq!(
            hit,
            blocks * BLOCK,
            "case {i}: the moved blocks were used, not recomputed"
        );
        hits += hit;
    }
    assert!(hits > 0);
    let stats = wait_idle(&d);
    assert_eq!(stats.kv_blocks_used, 0, "every block free again");
}

#[test]
fn instances_that_differ_are_refused_and_the_prefill_instance_serves_on() {
    let rt = runtime();
    let (_p, identity, addr) = prefill_instance(&rt);
    let tokens = prompt(6, 2 * BLOCK);
    let fetch = |who: &Identity, tokens: &[u32]| {
        rt.block_on(transfer::fetch_prefix(
            &addr,
            who,
            tokens.to_vec(),
            nothing_held(),
            &Options::default(),
        ))
    };
    let mut other = identity.clone();
    other.block_size = 32;
    let err = fetch(&other, &tokens).expect_err("another block size");
    assert!(
        matches!(&err, TransferError::Mismatch(m) if m.contains("--block-size 16")),
        "{err}"
    );
    let mut other = identity.clone();
    other.plan[0] ^= 1;
    let err = fetch(&other, &tokens).expect_err("another plan");
    assert!(
        matches!(&err, TransferError::Mismatch(m) if m.contains("plan")),
        "{err}"
    );
    let other_weights = CachedPrefix {
        weights: "step-9".into(),
        ..nothing_held()
    };
    let err = rt
        .block_on(transfer::fetch_prefix(
            &addr,
            &identity,
            tokens.clone(),
            other_weights,
            &Options::default(),
        ))
        .expect_err("other weights");
    assert!(
        matches!(&err, TransferError::Mismatch(m) if m.contains("weight snapshot step-9")),
        "{err}"
    );
    // Not a whole number of blocks: the prefill instance says why.
    let err = fetch(&identity, &tokens[..20]).expect_err("a partial block");
    assert!(
        matches!(&err, TransferError::Peer(m) if m.contains("whole number")),
        "{err}"
    );
    // And it still serves a good request.
    let fetched = fetch(&identity, &tokens).expect("fetch after the refusals");
    assert_eq!(fetched.blocks.len(), 2);
    assert!((0..2).all(|i| fetched.blocks.get(i).map(<[u8]>::len) == Some(identity.block_bytes)));
}

#[test]
fn with_a_transfer_key_only_instances_holding_it_move_blocks() {
    let rt = runtime();
    let key = |secret: &str| Some(TransferKey::from_secret(secret.as_bytes()).expect("a key"));
    let keyed = |k| Options {
        key: k,
        ..Options::default()
    };
    let (_p, identity, addr) = prefill_instance_with(&rt, keyed(key("sixteen bytes or more")));
    let tokens = prompt(9, 2 * BLOCK);
    let fetch = |options: &Options| {
        rt.block_on(transfer::fetch_prefix(
            &addr,
            &identity,
            tokens.clone(),
            nothing_held(),
            options,
        ))
    };
    let refused = |options: Options, why: &str| {
        let err = fetch(&options).expect_err("refused");
        assert!(
            matches!(&err, TransferError::Mismatch(m) | TransferError::Peer(m) if m.contains(why)),
            "{err}: want {why:?}"
        );
    };
    refused(
        keyed(key("another secret, as long")),
        "the decode instance's KV transfer key is not this prefill instance's",
    );
    refused(
        Options::default(),
        "this prefill instance requires a KV transfer key and the decode instance has none",
    );
    // The same secret with white space around it (as a file written by `echo` holds it).
    let fetched = fetch(&keyed(key("  sixteen bytes or more\n"))).expect("the same key");
    assert_eq!(fetched.blocks.len(), 2);
    // A keyed decode instance and a prefill instance without the key: refused.
    let (_q, _, open_addr) = prefill_instance(&rt);
    let err = rt
        .block_on(transfer::fetch_prefix(
            &open_addr,
            &identity,
            tokens.clone(),
            nothing_held(),
            &keyed(key("sixteen bytes or more")),
        ))
        .expect_err("an unkeyed prefill instance");
    assert!(
        matches!(&err, TransferError::Peer(m) if m.contains("the decode instance holds a KV transfer key and this prefill instance has none")),
        "{err}"
    );
    assert!(TransferKey::from_secret(b"  short  ").is_err());
    // A keyed prefill instance proves its key only after the connecting side proved its own:
    // connecting earns nothing a relay could show a decode instance.
    use futures_util::{SinkExt, StreamExt};
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let mut conn =
            tokio_util::codec::Framed::new(stream, tokio_util::codec::LengthDelimitedCodec::new());
        let frame = |m: Message| tokio_util::bytes::Bytes::from(m.encode());
        let next = |frame: tokio_util::bytes::BytesMut| Message::decode(frame.freeze());
        let hello = conn.next().await.expect("its hello").expect("a frame");
        assert!(matches!(
            next(hello),
            Ok(Message::Control(Control::Hello { .. }))
        ));
        conn.send(frame(hello_of(&identity))).await.expect("hello");
        let early = tokio::time::timeout(Duration::from_millis(300), conn.next()).await;
        assert!(
            early.is_err(),
            "the prefill instance spoke before our proof: {early:?}"
        );
        let wrong = Control::Auth {
            proof: "00".repeat(32),
        };
        conn.send(frame(Message::Control(wrong)))
            .await
            .expect("proof");
        let answer = conn.next().await.expect("an answer").expect("a frame");
        assert!(
            matches!(next(answer), Ok(Message::Control(Control::Error { .. }))),
            "a wrong proof gets an error, never the prefill instance's proof"
        );
    });
}

/// A hello as an instance of `identity` serving the plan's own weights says it.
fn hello_of(identity: &Identity) -> Message {
    Message::Control(Control::Hello {
        version: runtime::disagg::wire::PROTOCOL_VERSION,
        plan: runtime::disagg::wire::plan_hex(&identity.plan),
        weights: String::new(),
        block_size: identity.block_size as u32,
        block_bytes: identity.block_bytes as u64,
        nonce: "00".repeat(16),
    })
}

/// A peer that says hello as a prefill instance would, then sends `frames` (already encoded)
/// and hangs up, or stays silent when `frames` is empty.
fn fake_prefill_instance(
    rt: &tokio::runtime::Runtime,
    identity: &Identity,
    frames: Vec<Vec<u8>>,
) -> String {
    use futures_util::{SinkExt, StreamExt};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let hello = hello_of(identity);
    let no_key = Message::Control(Control::Auth {
        proof: String::new(),
    });
    rt.spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn =
            tokio_util::codec::Framed::new(stream, tokio_util::codec::LengthDelimitedCodec::new());
        conn.send(tokio_util::bytes::Bytes::from(hello.encode()))
            .await
            .expect("hello");
        let _ = conn.next().await; // their hello
        conn.send(tokio_util::bytes::Bytes::from(no_key.encode()))
            .await
            .expect("auth");
        let _ = conn.next().await; // their proof
        let _ = conn.next().await; // their request
        let silent = frames.is_empty();
        for frame in frames {
            conn.send(tokio_util::bytes::Bytes::from(frame))
                .await
                .expect("frame");
        }
        if silent {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    addr
}

#[test]
fn damaged_or_broken_transfers_end_in_errors_not_hangs() {
    let rt = runtime();
    let (_, identity) = instance(BLOCK);
    let tokens = prompt(7, 2 * BLOCK);
    let fetch = |addr: &str, io: Duration| {
        rt.block_on(transfer::fetch_prefix(
            addr,
            &identity,
            tokens.clone(),
            nothing_held(),
            &Options {
                timeouts: Timeouts { io, prefill: io },
                shared_memory: false,
                ..Options::default()
            },
        ))
    };
    let done = |end: u32| Message::Control(Control::Done { end }).encode();
    let block = |index: u32, len: usize| {
        Message::Block {
            index,
            bytes: vec![7; len].into(),
        }
        .encode()
    };
    let good = identity.block_bytes;
    // A block damaged on the way.
    let mut damaged = block(0, good);
    damaged[100] ^= 1;
    let addr = fake_prefill_instance(&rt, &identity, vec![damaged]);
    let err = fetch(&addr, Duration::from_secs(10)).expect_err("damaged");
    assert!(
        matches!(err, TransferError::Wire(WireError::Checksum)),
        "{err}"
    );
    // A block of the wrong size, one out of order, one past the prefix, an end that does not
    // match the blocks sent; blocks said to be in shared memory that was never offered (this
    // fetch offers none), a region taken that was not offered.
    let control = |c: Control| Message::Control(c).encode();
    for frames in [
        vec![block(0, 8)],
        vec![block(1, good)],
        vec![block(0, good), block(1, good), block(2, good)],
        vec![block(0, good), done(2)],
        vec![control(Control::Written { end: 1 }), done(1)],
        vec![control(Control::Mapped { device: false }), done(0)],
    ] {
        let addr = fake_prefill_instance(&rt, &identity, frames);
        assert!(matches!(
            fetch(&addr, Duration::from_secs(10)),
            Err(TransferError::Protocol(_))
        ));
    }
    // A peer that hangs up halfway.
    let addr = fake_prefill_instance(&rt, &identity, vec![block(0, good)]);
    assert!(matches!(
        fetch(&addr, Duration::from_secs(10)),
        Err(TransferError::Protocol(_))
    ));
    // Fewer blocks than asked for, properly ended, are a result (the rest is computed).
    let addr = fake_prefill_instance(&rt, &identity, vec![block(0, good), done(1)]);
    let fetched = fetch(&addr, Duration::from_secs(10)).expect("a short transfer");
    assert_eq!(fetched.blocks.len(), 1);
    // A peer that goes silent: the deadline ends it.
    let addr = fake_prefill_instance(&rt, &identity, vec![]);
    let start = std::time::Instant::now();
    assert!(matches!(
        fetch(&addr, Duration::from_millis(300)),
        Err(TransferError::Timeout(_))
    ));
    assert!(start.elapsed() < Duration::from_secs(5));
    // Nobody listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").to_string()
    };
    assert!(matches!(
        fetch(&closed, Duration::from_secs(5)),
        Err(TransferError::Connect { .. })
    ));
}

#[test]
fn blocks_asked_for_before_a_weight_update_are_not_seated_after_it() {
    let rt = runtime();
    let (_p, identity, addr) = prefill_instance(&rt);
    let (d, _) = instance(BLOCK);
    let tokens = prompt(8, 3 * BLOCK);
    let mut fetched = rt
        .block_on(transfer::fetch_prefix(
            &addr,
            &identity,
            tokens.clone(),
            nothing_held(),
            &Options::default(),
        ))
        .expect("fetch");
    assert_eq!(fetched.blocks.len(), 3);
    // As if the decode instance's weights had changed while the blocks travelled.
    fetched.weights_generation += 1;
    let seated = rt.block_on(d.write_cached_blocks(fetched)).expect("seat");
    assert_eq!(seated, 0, "blocks of other weights are not seated");
    let held = rt.block_on(d.cached_blocks(tokens)).expect("cached");
    assert_eq!(held.blocks, 0);
}
