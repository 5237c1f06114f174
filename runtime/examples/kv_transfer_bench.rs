//! KV transfer throughput between a prefill and a decode instance on one machine, next to the
//! loopback TCP bandwidth (and, for a CUDA plan, the device's copy bandwidth) measured in the
//! same run.
//!
//! ```text
//! cargo run --release -p runtime --example kv_transfer_bench -- PLAN [PROMPT_TOKENS] [REPEATS]
//! ```
//!
//! The prefill instance (scheduler and transfer server) runs in a child process, as a deployed
//! one does (device memory is only exported to another process), and runs 3 x REPEATS prompts
//! first, so their blocks are in its prefix cache; then a decode instance in this process
//! takes each prompt's blocks and seats them in its own cache, REPEATS prompts per path: over
//! the socket, through host shared memory, and for a CUDA plan through device memory (the
//! prefill instance sends blocks it holds without computing anything). Timed: connection,
//! handshake, transfer and seating, best of REPEATS per path. Loopback: the same bytes through
//! one TCP connection in 8 MiB writes.

use runtime::batch_engine::BatchEngine;
use runtime::cuda::ipc::DeviceLink;
use runtime::disagg::transfer::{self, Identity, Options};
use runtime::disagg::{InstanceState, Role, TransferPath};
use runtime::scheduler::{Event, Scheduler, SchedulerConfig};
use runtime::{Engine, EngineOptions, LoadedPlan};
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BLOCK_SIZE: usize = 64;
/// What the prefill process prints before its transfer address.
const ADDRESS: &str = "prefill instance at ";

struct Bench {
    plan: String,
    prompt_tokens: usize,
    repeats: usize,
    blocks: usize,
}

impl Bench {
    /// Prompt `p`: distinct tokens, a whole number of blocks.
    fn prompt(&self, p: usize, vocab: u32) -> Vec<u32> {
        (0..(self.blocks * BLOCK_SIZE) as u32)
            .map(|i| 1000 + (i * 7919 + p as u32 * 104729) % (vocab - 1000))
            .collect()
    }

    /// A scheduler over the plan (on the GPU for a CUDA plan) with `kv_blocks` blocks.
    fn instance(
        &self,
        kv_blocks: usize,
    ) -> anyhow::Result<(Scheduler, Identity, u32, Option<DeviceLink>)> {
        let loaded = LoadedPlan::load(std::path::Path::new(&self.plan))?;
        let identity = runtime::server::disagg::identity(&loaded, BLOCK_SIZE);
        let vocab = loaded.manifest.model.vocab_size as u32;
        let options = EngineOptions {
            max_context: self.prompt_tokens + 64,
            max_batch_tokens: 512,
            max_num_seqs: 1,
            block_size: BLOCK_SIZE,
            kv_blocks: Some(kv_blocks),
        };
        let engine: Box<dyn BatchEngine> = match loaded.manifest.target {
            ir_types::Target::Cuda(_) => {
                Box::new(runtime::cuda::GpuEngine::new(loaded, 0, options)?)
            }
            // The CPU engine refuses a DCU plan with its error.
            ir_types::Target::Cpu(_) | ir_types::Target::Dcu(_) => {
                Box::new(Engine::new(loaded, options)?)
            }
        };
        let link = engine.device_link();
        let config = SchedulerConfig {
            max_num_seqs: 1,
            max_waiting: 4,
            prefix_caching: true,
            speculative: None,
        };
        Ok((Scheduler::start(engine, config), identity, vocab, link))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let child = args.first().is_some_and(|a| a == "--prefill");
    if child {
        args.remove(0);
    }
    let plan = args.first().cloned().ok_or_else(|| {
        anyhow::anyhow!("usage: kv_transfer_bench PLAN [PROMPT_TOKENS] [REPEATS]")
    })?;
    let prompt_tokens: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(2048);
    let repeats: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(5);
    let bench = Bench {
        plan,
        prompt_tokens,
        repeats,
        blocks: prompt_tokens / BLOCK_SIZE,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if child {
        prefill(&bench, &rt)
    } else {
        decode(&bench, &rt)
    }
}

/// The child process: a prefill instance with every prompt's blocks in its cache (room for all,
/// so none is evicted before it is sent), until its standard input closes.
fn prefill(bench: &Bench, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let prompts = 3 * bench.repeats;
    let (scheduler, identity, vocab, device) = bench.instance(prompts * (bench.blocks + 2))?;
    for p in 0..prompts {
        let mut warm = scheduler.submit(bench.prompt(p, vocab), transfer::prefill_request())?;
        while let Some(event) = warm.next_blocking() {
            if let Event::Failed(e) = event {
                anyhow::bail!("warming the prefill instance: {e}");
            }
        }
    }
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(InstanceState::new(identity, Role::Prefill));
    let options = Options {
        device,
        ..Options::default()
    };
    rt.spawn(transfer::serve(listener, scheduler, state, options));
    println!("{ADDRESS}{addr}");
    use std::io::Read;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}

fn decode(bench: &Bench, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--prefill")
        .args([
            &bench.plan,
            &bench.prompt_tokens.to_string(),
            &bench.repeats.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no child output"))?;
    let addr = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix(ADDRESS).map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("the prefill process ended before it served"))?;
    // Room for one prompt's blocks, so each seating evicts the last prompt and writes into
    // memory already touched, as a serving instance's pool is (the first touch of fresh pages
    // cost more than the copy itself).
    let (decode, identity, vocab, device) = bench.instance(bench.blocks + 2)?;
    let bytes = bench.blocks * identity.block_bytes;
    let mut paths = vec![
        (TransferPath::Socket, false, None),
        (TransferPath::SharedMemory, true, None),
    ];
    if device.is_some() {
        paths.push((TransferPath::Device, true, device.clone()));
    }
    let mut rates = vec![];
    for (k, (path, shared_memory, device)) in paths.into_iter().enumerate() {
        let options = Options {
            shared_memory,
            device,
            ..Options::default()
        };
        let mut best = (Duration::MAX, Duration::ZERO);
        for r in 0..bench.repeats {
            let tokens = bench.prompt(k * bench.repeats + r, vocab);
            let start = Instant::now();
            let (seated, fetched) = rt.block_on(async {
                let held = decode.cached_blocks(tokens.clone()).await?;
                anyhow::ensure!(held.blocks == 0, "the decode instance holds the prompt");
                let got = transfer::fetch_prefix(&addr, &identity, tokens, held, &options).await?;
                let fetched = start.elapsed();
                anyhow::ensure!(
                    got.blocks.len() == bench.blocks && got.path == path,
                    "{} of {} blocks came, by {:?} where {path:?} was asked for",
                    got.blocks.len(),
                    bench.blocks,
                    got.path
                );
                let seated = decode
                    .write_cached_blocks(got)
                    .await
                    .map_err(anyhow::Error::msg)?;
                anyhow::Ok((seated, fetched))
            })?;
            anyhow::ensure!(
                seated == bench.blocks,
                "{seated} of {} blocks seated",
                bench.blocks
            );
            let took = start.elapsed();
            if took < best.0 {
                best = (took, took - fetched);
            }
        }
        rates.push((path, best, bytes as f64 / best.0.as_secs_f64()));
    }
    drop(child.stdin.take());
    child.wait()?;
    let loopback = rt.block_on(loopback_bandwidth(bytes.max(256 << 20)))?;
    let copy = device
        .map(|_| device_copy_bandwidth(bytes.max(256 << 20)))
        .transpose()?;
    for (path, (best, seating), rate) in rates {
        println!(
            "KV transfer ({path:?}): {} blocks of {:.2} MB ({} tokens, {:.1} MB) in {:.1} ms \
             (seating {:.1} ms): {:.2} GB/s; loopback TCP {:.2} GB/s in the same run ({:.0}%){}",
            bench.blocks,
            identity.block_bytes as f64 / 1e6,
            bench.prompt_tokens,
            bytes as f64 / 1e6,
            best.as_secs_f64() * 1e3,
            seating.as_secs_f64() * 1e3,
            rate / 1e9,
            loopback / 1e9,
            100.0 * rate / loopback,
            match copy {
                Some(copy) => format!(
                    "; one device-to-device copy {:.0} GB/s ({:.0}% of it; the path copies twice)",
                    copy / 1e9,
                    100.0 * rate / copy
                ),
                None => String::new(),
            }
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

/// Bytes per second one device-to-device copy of `total` bytes moves on device 0 (each byte
/// read once and written once; best of 5).
fn device_copy_bandwidth(total: usize) -> anyhow::Result<f64> {
    let ctx = cudarc::driver::CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let from = stream.alloc_zeros::<u8>(total)?;
    let mut to = stream.alloc_zeros::<u8>(total)?;
    stream.memcpy_dtod(&from, &mut to)?;
    stream.synchronize()?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        stream.memcpy_dtod(&from, &mut to)?;
        stream.synchronize()?;
        best = best.min(start.elapsed());
    }
    Ok(total as f64 / best.as_secs_f64())
}
