//! KV transfer throughput between a prefill and a decode instance on one machine, next to the
//! loopback TCP bandwidth measured in the same run.
//!
//! ```text
//! cargo run --release -p runtime --example kv_transfer_bench -- PLAN [PROMPT_TOKENS] [REPEATS]
//! ```
//!
//! A prefill instance (scheduler and transfer server) runs the prompt once, so its blocks are
//! in its prefix cache; then a decode instance fetches the prompt's blocks again and again (the
//! prefill instance sends blocks it holds without computing anything): the transfer alone,
//! connection and handshake included, best of REPEATS. Loopback: the same bytes through one TCP
//! connection in 8 MiB writes.

use runtime::disagg::transfer::{self, Identity, Timeouts};
use runtime::disagg::{InstanceState, Role};
use runtime::scheduler::{CachedPrefix, Event, Scheduler, SchedulerConfig};
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
    let loaded = LoadedPlan::load(std::path::Path::new(&plan))?;
    let engine = Engine::new(
        loaded,
        EngineOptions {
            max_context: prompt_tokens + 64,
            max_batch_tokens: 512,
            max_num_seqs: 1,
            block_size,
            kv_blocks: None,
        },
    )?;
    let identity = Identity {
        plan: engine.plan().identity(),
        block_size,
        block_bytes: engine.kv_pool().bytes_per_block(),
    };
    let vocab = engine.vocab_size() as u32;
    let scheduler = Scheduler::start(
        Box::new(engine),
        SchedulerConfig {
            max_num_seqs: 1,
            max_waiting: 4,
            prefix_caching: true,
            speculative: None,
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let state = Arc::new(InstanceState::new(identity.clone(), Role::Prefill));
    rt.spawn(transfer::serve(
        listener,
        scheduler.clone(),
        state,
        Timeouts::default(),
    ));

    let blocks = prompt_tokens / block_size;
    let prompt: Vec<u32> = (0..(blocks * block_size) as u32)
        .map(|i| 1000 + (i * 7919) % (vocab - 1000))
        .collect();
    // Into the prefill instance's cache.
    let mut warm = scheduler.submit(prompt.clone(), transfer::prefill_request())?;
    while let Some(event) = warm.next_blocking() {
        if let Event::Failed(e) = event {
            anyhow::bail!("warming the prefill instance: {e}");
        }
    }
    let nothing = CachedPrefix {
        blocks: 0,
        weights_generation: 0,
        weights: String::new(),
    };
    let mut best = Duration::MAX;
    for _ in 0..repeats {
        let start = Instant::now();
        let got = rt.block_on(transfer::fetch_prefix(
            &addr,
            &identity,
            prompt.clone(),
            nothing.clone(),
            Timeouts::default(),
        ))?;
        anyhow::ensure!(
            got.blocks.len() == blocks,
            "{} of {blocks} blocks came",
            got.blocks.len()
        );
        best = best.min(start.elapsed());
    }
    let bytes = blocks * identity.block_bytes;
    let kv_rate = bytes as f64 / best.as_secs_f64();
    let loopback = rt.block_on(loopback_bandwidth(bytes.max(256 << 20)))?;
    println!(
        "KV transfer: {blocks} blocks of {:.2} MB ({prompt_tokens} tokens, {:.1} MB) in {:.1} ms: {:.2} GB/s; \
         loopback TCP {:.2} GB/s in the same run ({:.0}%)",
        identity.block_bytes as f64 / 1e6,
        bytes as f64 / 1e6,
        best.as_secs_f64() * 1e3,
        kv_rate / 1e9,
        loopback / 1e9,
        100.0 * kv_rate / loopback
    );
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
