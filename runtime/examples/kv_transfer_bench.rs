//! KV transfer throughput between a prefill and a decode instance on one machine, next to the
//! loopback TCP bandwidth measured in the same run.
//!
//! ```text
//! cargo run --release -p runtime --example kv_transfer_bench -- PLAN [PROMPT_TOKENS] [REPEATS]
//! ```
//!
//! A prefill instance (scheduler and transfer server) runs 2 x REPEATS prompts first, so their
//! blocks are in its prefix cache; then a decode instance (a second scheduler over the same
//! plan) takes each prompt's blocks and seats them in its own cache, REPEATS prompts over the
//! socket and REPEATS through shared memory (both instances are on this host; the prefill
//! instance sends blocks it holds without computing anything). Timed: connection, handshake,
//! transfer and seating, best of REPEATS per path. Loopback: the same bytes through one TCP
//! connection in 8 MiB writes.

use runtime::disagg::transfer::{self, Identity, Options};
use runtime::disagg::{InstanceState, Role};
use runtime::scheduler::{Event, Scheduler, SchedulerConfig};
use runtime::{Engine, EngineOptions, LoadedPlan};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let plan = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: kv_transfer_bench PLAN [PROMPT_TOKENS] [REPEATS]")
    })?;
    let prompt_tokens: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2048);
    let repeats: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let block_size = 64;
    let blocks = prompt_tokens / block_size;
    let prompts = 2 * repeats;
    let instance = |kv_blocks: usize| -> anyhow::Result<(Scheduler, Identity, u32)> {
        let loaded = LoadedPlan::load(std::path::Path::new(&plan))?;
        let engine = Engine::new(
            loaded,
            EngineOptions {
                max_context: prompt_tokens + 64,
                max_batch_tokens: 512,
                max_num_seqs: 1,
                block_size,
                kv_blocks: Some(kv_blocks),
            },
        )?;
        let identity = Identity {
            plan: engine.plan().identity(),
            block_size,
            block_bytes: engine.kv_pool().bytes_per_block(),
        };
        let vocab = engine.vocab_size() as u32;
        let config = SchedulerConfig {
            max_num_seqs: 1,
            max_waiting: 4,
            prefix_caching: true,
            speculative: None,
        };
        Ok((Scheduler::start(Box::new(engine), config), identity, vocab))
    };
    // The prefill instance has room for every prompt's blocks, so none is evicted before it is
    // sent; the decode instance for one prompt's, so each seating evicts the last prompt and
    // writes into pages already touched, as a serving instance's pool is (the first touch of
    // fresh pages cost more than the copy itself).
    let (prefill, identity, vocab) = instance(prompts * (blocks + 2))?;
    let (decode, _, _) = instance(blocks + 2)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let state = Arc::new(InstanceState::new(identity.clone(), Role::Prefill));
    rt.spawn(transfer::serve(
        listener,
        prefill.clone(),
        state,
        Options::default(),
    ));

    let prompt = |p: usize| -> Vec<u32> {
        (0..(blocks * block_size) as u32)
            .map(|i| 1000 + (i * 7919 + p as u32 * 104729) % (vocab - 1000))
            .collect()
    };
    // Into the prefill instance's cache.
    for p in 0..prompts {
        let mut warm = prefill.submit(prompt(p), transfer::prefill_request())?;
        while let Some(event) = warm.next_blocking() {
            if let Event::Failed(e) = event {
                anyhow::bail!("warming the prefill instance: {e}");
            }
        }
    }
    let bytes = blocks * identity.block_bytes;
    let mut rates = vec![];
    for (k, (path, shared_memory)) in [("socket", false), ("shared memory", true)]
        .into_iter()
        .enumerate()
    {
        let options = Options {
            shared_memory,
            ..Options::default()
        };
        let mut best = (Duration::MAX, Duration::ZERO);
        for r in 0..repeats {
            let tokens = prompt(k * repeats + r);
            let start = Instant::now();
            let seated = rt.block_on(async {
                let held = decode.cached_blocks(tokens.clone()).await?;
                anyhow::ensure!(held.blocks == 0, "the decode instance holds the prompt");
                let got = transfer::fetch_prefix(&addr, &identity, tokens, held, &options).await?;
                let fetched = start.elapsed();
                anyhow::ensure!(
                    got.blocks.len() == blocks,
                    "{} of {blocks} blocks came",
                    got.blocks.len()
                );
                let seated = decode
                    .write_cached_blocks(got)
                    .await
                    .map_err(anyhow::Error::msg)?;
                anyhow::Ok((seated, fetched))
            })?;
            let (seated, fetched) = seated;
            anyhow::ensure!(seated == blocks, "{seated} of {blocks} blocks seated");
            let took = start.elapsed();
            if took < best.0 {
                best = (took, took - fetched);
            }
        }
        rates.push((path, best, bytes as f64 / best.0.as_secs_f64()));
    }
    let loopback = rt.block_on(loopback_bandwidth(bytes.max(256 << 20)))?;
    for (path, (best, seating), rate) in rates {
        println!(
            "KV transfer ({path}): {blocks} blocks of {:.2} MB ({prompt_tokens} tokens, {:.1} MB) in {:.1} ms \
             (seating {:.1} ms): {:.2} GB/s; loopback TCP {:.2} GB/s in the same run ({:.0}%)",
            identity.block_bytes as f64 / 1e6,
            bytes as f64 / 1e6,
            best.as_secs_f64() * 1e3,
            seating.as_secs_f64() * 1e3,
            rate / 1e9,
            loopback / 1e9,
            100.0 * rate / loopback
        );
    }
    Ok(())
}

/// Bytes per second through one loopback TCP connection, `total` bytes in 8 MiB writes.
async fn loopback_bandwidth(total: usize) -> anyhow::Result<f64> {
    const CHUNK: usize = 8 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let writer = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let chunk = vec![7u8; CHUNK];
        for _ in 0..total.div_ceil(CHUNK) {
            stream.write_all(&chunk).await?;
        }
        anyhow::Ok(())
    });
    let (mut stream, _) = listener.accept().await?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut got = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let elapsed = start.elapsed();
    writer.await??;
    Ok(got as f64 / elapsed.as_secs_f64())
}
