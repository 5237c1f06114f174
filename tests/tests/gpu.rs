//! GPU tests: they run whenever a CUDA device is present and print `SKIPPED` when none is (CI has
//! no GPU; these are run on an H100 before a GPU change lands). Each compiles a tiny golden model
//! for the device's architecture, loads the plan's module through the driver and checks kernels
//! against float64 references computed here on the same random inputs.

mod common;

use compiler::passes::quantize_weights::{GroupSize, QuantOptions};
use compiler::CompileOptions;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;
use ir::{CudaArch, DType, Target};
use runtime::cuda::{device_arch, device_present, GpuEngine, GpuModule};
use runtime::{EngineOptions, LoadedPlan, Logits, RuntimeError, SeqChunk};
use std::path::PathBuf;

/// Says why a test did not run, on the real stderr: the test harness captures `eprintln!` of
/// passing tests, and a skip must be seen.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {why}; the GPU tests did not run"
    );
}

/// The device's architecture, or `None` (with the reason printed) when the tests cannot run.
fn device() -> Option<CudaArch> {
    if !device_present() {
        skipped("no CUDA device here");
        return None;
    }
    if !compiler::codegen::cuda::available_for_test("GPU tests") {
        return None;
    }
    match device_arch(0) {
        Ok((_, Some(arch))) => Some(arch),
        Ok((name, None)) => {
            skipped(&format!("{name} is not a target fdc builds for"));
            None
        }
        Err(e) => panic!("a CUDA device is present but cannot be opened: {e}"),
    }
}

/// Options for one sequence of `max_context` positions in passes of up to `max_batch_tokens`.
fn solo(max_context: usize, max_batch_tokens: usize) -> EngineOptions {
    EngineOptions {
        max_context,
        max_batch_tokens,
        ..EngineOptions::default()
    }
}

fn tiny_plan(arch: CudaArch) -> PathBuf {
    cuda_plan("llama", arch, DType::BF16)
}

fn cuda_plan(model: &str, arch: CudaArch, dtype: DType) -> PathBuf {
    compiled_tiny(model, Target::Cuda(arch), dtype, ir::QuantScheme::None)
}

/// A tiny golden model compiled for `target` with `dtype` weights quantized by `scheme`.
fn compiled_tiny(model: &str, target: Target, dtype: DType, scheme: ir::QuantScheme) -> PathBuf {
    compiled_tiny_with(model, target, dtype, &scheme_only(scheme))
}

/// `scheme` with its default groups and symmetry.
fn scheme_only(scheme: ir::QuantScheme) -> QuantOptions {
    QuantOptions {
        scheme,
        ..Default::default()
    }
}

/// W4A16 in symmetric groups of 64 with `--quant-tiles`: what fits the tile layout of the
/// tensor-core matmul (`kernels::cuda::tiles_fit`), which fdc then gives every matmul weight
/// of a CUDA plan.
fn w4a16_tiles() -> QuantOptions {
    QuantOptions {
        scheme: ir::QuantScheme::W4A16,
        group: Some(GroupSize::Elements(64)),
        asymmetric: Some(false),
        tiles: true,
        ..Default::default()
    }
}

/// A tiny golden model compiled for `target` with `dtype` weights quantized as `quant` says.
fn compiled_tiny_with(model: &str, target: Target, dtype: DType, quant: &QuantOptions) -> PathBuf {
    let scheme = quant.scheme;
    let shape = match (quant.group, quant.asymmetric) {
        (None, None) => String::new(),
        (group, asymmetric) => format!("-{group:?}-{asymmetric:?}").replace(['(', ')', ' '], ""),
    };
    let out = common::scratch_path(&format!(
        "tiny-{model}-{scheme}{shape}-{dtype}-{}.fdp",
        target.name()
    ));
    let options = CompileOptions {
        target,
        weight_dtype: dtype,
        quant: quant.clone(),
        progress: false,
    };
    compiler::compile(&common::golden(&format!("tiny/{model}")), &out, &options)
        .unwrap_or_else(|e| panic!("compiling {model} {scheme} {dtype} for {target}: {e}"));
    out
}

fn module(arch: CudaArch) -> GpuModule {
    let plan = LoadedPlan::load(&tiny_plan(arch)).expect("loading the plan");
    GpuModule::open(&plan, 0).expect("opening the module")
}

use common::random::uniform as random;

/// `x @ w^T + bias` in float64: `x` is `[T, k]` row-major, `w(c, i)` the weight of output `c` at
/// `i`, one output per bias entry.
fn matmul_reference(
    x: &[f32],
    k: usize,
    bias: &[f32],
    w: impl Fn(usize, usize) -> f32,
) -> Vec<f64> {
    let n = bias.len();
    let mut out = vec![0f64; x.len() / k * n];
    for (r, row) in x.chunks(k).enumerate() {
        for c in 0..n {
            let dot: f64 = row
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f64 * w(c, i) as f64)
                .sum();
            out[r * n + c] = dot + bias[c] as f64;
        }
    }
    out
}

/// ||got - want|| / ||want||.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

#[test]
fn a_plan_for_another_gpu_is_refused_naming_both() {
    let Some(arch) = device() else { return };
    let other = CudaArch::ALL
        .into_iter()
        .find(|&a| a != arch)
        .expect("three archs");
    let plan = LoadedPlan::load(&tiny_plan(other)).expect("loading the plan");
    match GpuModule::open(&plan, 0) {
        Err(e @ RuntimeError::WrongGpu { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&Target::Cuda(other).name()), "{message}");
            assert!(message.contains(&Target::Cuda(arch).name()), "{message}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a plan for {other:?} opened on {arch:?}"),
    }
}

#[test]
fn matmul_bf16_matches_a_float64_reference() {
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    // The kernel for several tokens, and the one for a single token.
    for (t, function) in [(5usize, "matmul_bf16"), (1, "matmul_bf16_one")] {
        let (k, n) = (300usize, 70usize);
        let x = random(t * k, 1);
        let w: Vec<bf16> = random(n * k, 2).into_iter().map(bf16::from_f32).collect();
        let bias = random(n, 3);
        let s = &gpu.stream;
        let x_d = s.clone_htod(&x).unwrap();
        let w_d = s
            .clone_htod(&w.iter().map(|v| v.to_bits()).collect::<Vec<u16>>())
            .unwrap();
        let b_d = s.clone_htod(&bias).unwrap();
        // Poisoned output: every element must be written.
        let mut out_d = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
        let f = gpu.function(function).expect(function);
        let (ki, ni, ti) = (k as i32, n as i32, t as i32);
        let mut launch = s.launch_builder(f);
        launch
            .arg(&x_d)
            .arg(&ki)
            .arg(&w_d)
            .arg(&ki)
            .arg(&ni)
            .arg(&b_d)
            .arg(&ti)
            .arg(&mut out_d)
            .arg(&ni);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, t.div_ceil(4) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.expect("launch");
        let got = s.clone_dtoh(&out_d).unwrap();
        let want = matmul_reference(&x, k, &bias, |c, i| w[c * k + i].to_f32());
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "{function}: relative error {err}");
    }
}

#[test]
fn paged_attention_matches_a_float64_reference() {
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    // 7 tokens in 3 chunks of at least one position: the keys span all three chunks, and the
    // first queries leave chunks empty.
    check_paged_attention(&gpu, 7, 3, 1, false, Attend::Split);
    // 45 tokens in 2 chunks of at least 16: chunks longer than the 16 keys a block takes at a
    // time, and a last round where only some lane groups hold a key.
    check_paged_attention(&gpu, 45, 2, 16, false, Attend::Split);
    // RoPE fused: q and k arrive unrotated and the kernels rotate them with the tables.
    check_paged_attention(&gpu, 7, 3, 1, true, Attend::Split);
    check_paged_attention(&gpu, 45, 2, 16, true, Attend::Split);
    // The tiled prefill kernel: tiles of 8 tokens, the last partial, keys in tiles of 32 (45
    // positions: a partial key tile), with and without RoPE.
    check_paged_attention(&gpu, 45, 1, 1, false, Attend::Tiled);
    check_paged_attention(&gpu, 45, 1, 1, true, Attend::Tiled);
    check_paged_attention(&gpu, 3, 1, 1, true, Attend::Tiled);
    // The one-launch decode kernel (sm90: clusters), the last token of the sequence appended
    // and attended at once: its chunks merged in a cluster of 3 (the new key in the last
    // chunk), of 8 with chunks left empty, of 16 (the largest), and one chunk alone.
    if arch == CudaArch::Sm90 {
        for rope in [false, true] {
            check_paged_attention(&gpu, 7, 3, 1, rope, Attend::Decode);
            check_paged_attention(&gpu, 45, 8, 16, rope, Attend::Decode);
            check_paged_attention(&gpu, 45, 16, 1, rope, Attend::Decode);
            check_paged_attention(&gpu, 45, 1, 16, rope, Attend::Decode);
        }
    }
}

/// Which attention kernels `check_paged_attention` runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attend {
    /// The append, then the split kernel and its merge: every token of the pass.
    Split,
    /// The append, then the tiled prefill kernel: every token.
    Tiled,
    /// The append of all but the last token, then the one-launch decode kernel for the last
    /// (its append, its chunks, their merge in a cluster): the last token only.
    Decode,
}

/// `t` tokens of one sequence attended in one pass, split into `chunks` chunks of at least
/// `min_chunk` positions, against a float64 reference; with `rope`, q and k are rotated by the
/// kernels (rotate-half, random angles per position and pair) and by the reference. With
/// `Attend::Decode`, the last token's output and its cache rows are checked.
fn check_paged_attention(
    gpu: &GpuModule,
    t: usize,
    chunks: usize,
    min_chunk: i32,
    rope: bool,
    kernels: Attend,
) {
    let tiled = kernels == Attend::Tiled;
    // The tiny llama's shapes: 4 heads sharing 2 kv heads of 16, in blocks of 4 positions, the
    // sequence's blocks out of order in a pool with one spare block.
    let (heads, kv_heads, d, block_size) = (4usize, 2usize, 16usize, 4usize);
    let used = t.div_ceil(block_size);
    let pool_blocks = used + 1;
    // The sequence's blocks in descending order, pool block 0 unused.
    let blocks: Vec<u32> = (0..used).map(|i| (pool_blocks - 1 - i) as u32).collect();
    let positions: Vec<u32> = (0..t as u32).collect();
    let q = random(t * heads * d, 4);
    let k = random(t * kv_heads * d, 5);
    let v = random(t * kv_heads * d, 6);
    let scale = 1.0 / (d as f32).sqrt();
    // RoPE tables, [position, d / 2], and the rotated q and k the reference attends with.
    let angles: Vec<f32> = random(t * d / 2, 12).iter().map(|a| a * 3.0).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    let rotate = |x: &[f32], heads: usize| -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        if rope {
            for r in 0..t {
                for h in 0..heads {
                    let at = (r * heads + h) * d;
                    for i in 0..d / 2 {
                        let (c, s) = (cos[r * d / 2 + i] as f64, sin[r * d / 2 + i] as f64);
                        let (lo, hi) = (x[at + i] as f64, x[at + d / 2 + i] as f64);
                        out[at + i] = lo * c - hi * s;
                        out[at + d / 2 + i] = hi * c + lo * s;
                    }
                }
            }
        }
        out
    };
    let (q_ref, k_ref) = (rotate(&q, heads), rotate(&k, kv_heads));
    let (cos_d, sin_d) = (device_table(gpu, &cos), device_table(gpu, &sin));
    let table = |t: &cudarc::driver::CudaSlice<f32>| -> u64 {
        if rope {
            cudarc::driver::DevicePtr::device_ptr(t, &gpu.stream).0
        } else {
            0
        }
    };
    let (cos_p, sin_p, table_stride) = (table(&cos_d), table(&sin_d), (d / 2) as i32);
    let s = &gpu.stream;
    let pool = pool_blocks * block_size * kv_heads * d;
    let (q_d, k_d, v_d) = (
        s.clone_htod(&q).unwrap(),
        s.clone_htod(&k).unwrap(),
        s.clone_htod(&v).unwrap(),
    );
    // One sequence: every token's table starts at offset 0.
    let (pos_d, blocks_d, offsets_d) = (
        s.clone_htod(&positions).unwrap(),
        s.clone_htod(&blocks).unwrap(),
        s.clone_htod(&vec![0u32; t]).unwrap(),
    );
    let mut k_cache = s.alloc_zeros::<f32>(pool).unwrap();
    let mut v_cache = s.alloc_zeros::<f32>(pool).unwrap();
    let mut out_d = s.clone_htod(&vec![f32::NAN; t * heads * d]).unwrap();
    let (kv_cols, q_cols) = ((kv_heads * d) as i32, (heads * d) as i32);
    let (bs, h_i, kv_i) = (block_size as i32, heads as i32, kv_heads as i32);
    let append = gpu.function("kv_append_f32").expect("kv_append_f32");
    let mut launch = s.launch_builder(append);
    launch
        .arg(&k_d)
        .arg(&kv_cols)
        .arg(&v_d)
        .arg(&kv_cols)
        .arg(&pos_d)
        .arg(&blocks_d)
        .arg(&offsets_d)
        .arg(&bs)
        .arg(&kv_i)
        .arg(&cos_p)
        .arg(&sin_p)
        .arg(&table_stride)
        .arg(&mut k_cache)
        .arg(&mut v_cache);
    // The decode kernel appends the last token itself.
    let appended = if kernels == Attend::Decode { t - 1 } else { t };
    let config = LaunchConfig {
        grid_dim: (kv_heads as u32, appended as u32, 1),
        block_dim: (d as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }.expect("kv_append launch");
    // The arguments both attention kernels start with: the queries and the cache.
    macro_rules! with_queries {
        ($launch:expr) => {
            $launch
                .arg(&q_d)
                .arg(&q_cols)
                .arg(&pos_d)
                .arg(&blocks_d)
                .arg(&offsets_d)
                .arg(&bs)
                .arg(&h_i)
                .arg(&kv_i)
                .arg(&scale)
                .arg(&k_cache)
                .arg(&v_cache)
                .arg(&cos_p)
                .arg(&sin_p)
                .arg(&table_stride)
        };
    }
    if kernels == Attend::Decode {
        launch_decode_attention(
            gpu,
            DecodeAttention {
                q: offset_ptr(gpu, &q_d, (t - 1) * heads * d),
                positions: offset_ptr(gpu, &pos_d, t - 1),
                tables: offset_ptr(gpu, &blocks_d, 0),
                offsets: offset_ptr(gpu, &offsets_d, 0),
                k: offset_ptr(gpu, &k_d, (t - 1) * kv_heads * d),
                v: offset_ptr(gpu, &v_d, (t - 1) * kv_heads * d),
                k_cache: offset_ptr(gpu, &k_cache, 0),
                v_cache: offset_ptr(gpu, &v_cache, 0),
                cos: cos_p,
                sin: sin_p,
                out: offset_ptr(gpu, &out_d, (t - 1) * heads * d),
                shape: [q_cols, bs, h_i, kv_i, table_stride, min_chunk, kv_cols],
                scale,
                chunks: chunks as u32,
            },
        );
        // The appended rows: K rotated, V as given, at the last position's slot.
        let (kc, vc) = (
            s.clone_dtoh(&k_cache).unwrap(),
            s.clone_dtoh(&v_cache).unwrap(),
        );
        let p = t - 1;
        let slot = blocks[p / block_size] as usize * block_size + p % block_size;
        for g in 0..kv_heads {
            for i in 0..d {
                let at = (slot * kv_heads + g) * d + i;
                let want_k = k_ref[(p * kv_heads + g) * d + i];
                assert!(
                    (kc[at] as f64 - want_k).abs() <= 1e-5 * want_k.abs().max(1.0),
                    "appended K, kv head {g} element {i}: {} against {want_k}",
                    kc[at]
                );
                assert_eq!(vc[at], v[(p * kv_heads + g) * d + i], "appended V");
            }
        }
    } else if tiled {
        // Tiles of 16 query rows over the 2 query heads of a kv head: 8 tokens each.
        let tile_tokens = 16 / (heads / kv_heads);
        let tiles: Vec<u32> = (0..t)
            .step_by(tile_tokens)
            .flat_map(|first| [first as u32, tile_tokens.min(t - first) as u32])
            .collect();
        let tiles_d = s.clone_htod(&tiles).unwrap();
        let prefill = gpu
            .module
            .load_function("attention_prefill_f32")
            .expect("attention_prefill_f32");
        let mut launch = s.launch_builder(&prefill);
        with_queries!(launch)
            .arg(&tiles_d)
            .arg(&mut out_d)
            .arg(&q_cols);
        let config = LaunchConfig {
            grid_dim: ((tiles.len() / 2) as u32, kv_heads as u32, 1),
            block_dim: (runtime::cuda::PREFILL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.expect("prefill attention launch");
    } else {
        let max_chunks = chunks;
        let mut partial = s
            .alloc_zeros::<f32>(t * heads * max_chunks * (d + 2))
            .unwrap();
        let attend = gpu
            .function("attention_partial_f32")
            .expect("attention_partial_f32");
        let mut launch = s.launch_builder(attend);
        with_queries!(launch).arg(&min_chunk).arg(&mut partial);
        let config = LaunchConfig {
            grid_dim: (heads as u32, t as u32, max_chunks as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.expect("attention launch");
        let merge = gpu
            .function("attention_merge_f32")
            .expect("attention_merge_f32");
        let mut launch = s.launch_builder(merge);
        let chunks_i = max_chunks as i32;
        launch
            .arg(&partial)
            .arg(&h_i)
            .arg(&chunks_i)
            .arg(&mut out_d)
            .arg(&q_cols);
        let config = LaunchConfig {
            grid_dim: (heads as u32, t as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.expect("merge launch");
    }
    let mut got = s.clone_dtoh(&out_d).unwrap();
    let mut want = vec![0f64; t * heads * d];
    for r in 0..t {
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let scores: Vec<f64> = (0..=r)
                .map(|p| {
                    (0..d)
                        .map(|i| q_ref[(r * heads + h) * d + i] * k_ref[(p * kv_heads + g) * d + i])
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                want[(r * heads + h) * d + i] = (0..=r)
                    .map(|p| e[p] / sum * v[(p * kv_heads + g) * d + i] as f64)
                    .sum();
            }
        }
    }
    if kernels == Attend::Decode {
        // Only the last token was attended (the other rows stay NaN).
        let last = (t - 1) * heads * d;
        got.drain(..last);
        want.drain(..last);
    }
    let err = relative_error(&got, &want);
    assert!(
        err < 1e-5,
        "{t} tokens in {chunks} chunks, rope {rope}, {kernels:?}: relative error {err}"
    );
}

/// The device address `at` elements into `slice`.
fn offset_ptr<T>(gpu: &GpuModule, slice: &cudarc::driver::CudaSlice<T>, at: usize) -> u64 {
    cudarc::driver::DevicePtr::device_ptr(slice, &gpu.stream).0
        + (at * std::mem::size_of::<T>()) as u64
}

/// The arguments of `attention_decode_f32` (device addresses, then
/// `[q_stride, block_size, heads, kv_heads, table_stride, min_chunk, kv_stride]`).
struct DecodeAttention {
    q: u64,
    positions: u64,
    tables: u64,
    offsets: u64,
    k: u64,
    v: u64,
    k_cache: u64,
    v_cache: u64,
    cos: u64,
    sin: u64,
    out: u64,
    shape: [i32; 7],
    scale: f32,
    chunks: u32,
}

/// Launches `attention_decode_f32` for one query, its `chunks` chunks in one cluster, and
/// waits for it. cudarc's launch builder sets no cluster, hence the driver call.
fn launch_decode_attention(gpu: &GpuModule, a: DecodeAttention) {
    use cudarc::driver::sys;
    let f = gpu
        .module
        .load_function("attention_decode_f32")
        .expect("attention_decode_f32");
    if a.chunks > 8 {
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        )
        .expect("clusters of more than 8 blocks");
    }
    let [q_stride, block_size, heads, kv_heads, table_stride, min_chunk, kv_stride] = a.shape;
    let mut params: Vec<*mut std::ffi::c_void> = vec![];
    let (p, i, fl) = (
        |v: &u64| v as *const u64 as *mut std::ffi::c_void,
        |v: &i32| v as *const i32 as *mut std::ffi::c_void,
        |v: &f32| v as *const f32 as *mut std::ffi::c_void,
    );
    params.extend([
        p(&a.q),
        i(&q_stride),
        p(&a.positions),
        p(&a.tables),
        p(&a.offsets),
    ]);
    params.extend([i(&block_size), i(&heads), i(&kv_heads), fl(&a.scale)]);
    params.extend([
        p(&a.k_cache),
        p(&a.v_cache),
        p(&a.cos),
        p(&a.sin),
        i(&table_stride),
    ]);
    params.extend([
        i(&min_chunk),
        p(&a.k),
        i(&kv_stride),
        p(&a.v),
        i(&kv_stride),
    ]);
    let out_stride = q_stride;
    params.extend([p(&a.out), i(&out_stride)]);
    // SAFETY: the parameters point at live values of the kernel's argument types, in order;
    // the addresses are allocations of the caller sized for one query of `heads` heads.
    unsafe {
        let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attribute.value.clusterDim.x = 1;
        attribute.value.clusterDim.y = 1;
        attribute.value.clusterDim.z = a.chunks;
        let config = sys::CUlaunchConfig {
            gridDimX: heads as u32,
            gridDimY: 1,
            gridDimZ: a.chunks,
            blockDimX: 128,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: gpu.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        gpu.stream
            .context()
            .bind_to_thread()
            .expect("binding the context");
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .expect("decode attention launch");
    }
    gpu.stream.synchronize().expect("decode attention ran");
}

/// A table on the device.
fn device_table(gpu: &GpuModule, values: &[f32]) -> cudarc::driver::CudaSlice<f32> {
    gpu.stream.clone_htod(values).expect("uploading a table")
}

/// A dense tiny golden, f32 weights, run whole on the GPU: logits at every position within 1e-3
/// of the largest golden logit (the CPU tests' bound), and HF's greedy continuation (EOS
/// suppressed) reproduced one decode step at a time.
fn golden_on_the_gpu(model: &str) {
    let Some(arch) = device() else { return };
    let dir = common::golden(&format!("tiny/{model}"));
    let plan = LoadedPlan::load(&cuda_plan(model, arch, DType::F32)).expect("loading");
    let mut engine = GpuEngine::new(plan, 0, solo(1024, 64)).expect("uploading the plan");
    let golden_logits = common::read_tensor(&dir.join("golden.safetensors"), "logits");
    let json = common::read_json(&dir.join("golden.json"));
    let vocab = golden_logits.shape[1];
    let logits = engine
        .forward(&common::ids(&json["input_ids"]), true)
        .expect("forward");
    common::check_logits(model, &logits, &golden_logits.data, vocab, 1e-3);

    let prompt = common::ids(&json["prompt_ids"]);
    let greedy = common::ids(&json["greedy_ids"]);
    let eos = engine.plan().manifest.model.eos_token_ids.clone();
    engine.reset();
    let mut tokens = prompt.clone();
    let mut next = engine.forward(&prompt, false).expect("prefill");
    for _ in prompt.len()..greedy.len() {
        for &e in &eos {
            if let Some(l) = next.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = common::argmax(&next);
        tokens.push(token);
        next = engine.forward(&[token], false).expect("decode");
    }
    assert_eq!(
        tokens, greedy,
        "{model}: greedy continuation differs from HF"
    );
}

#[test]
fn golden_llama_on_the_gpu() {
    golden_on_the_gpu("llama");
}

#[test]
fn golden_llama3_rope_scaling_on_the_gpu() {
    golden_on_the_gpu("llama3_rope");
}

#[test]
fn golden_qwen2_biases_and_tied_embeddings_on_the_gpu() {
    golden_on_the_gpu("qwen2");
}

#[test]
fn golden_qwen2_yarn_on_the_gpu() {
    golden_on_the_gpu("qwen2_yarn");
}

#[test]
fn golden_qwen3_qk_norm_on_the_gpu() {
    golden_on_the_gpu("qwen3");
}

#[test]
fn golden_qwen3_moe_experts_on_the_gpu() {
    golden_on_the_gpu("qwen3_moe");
}

#[test]
fn golden_mixtral_experts_on_the_gpu() {
    golden_on_the_gpu("mixtral");
}

#[test]
fn golden_ernie4_5_moe_shared_experts_biased_routing_on_the_gpu() {
    golden_on_the_gpu("ernie4_5_moe");
}

#[test]
fn golden_deepseek_v3_latent_attention_grouped_routing_on_the_gpu() {
    golden_on_the_gpu("deepseek_v3");
}

#[test]
fn golden_deepseek_v3_yarn_on_the_gpu() {
    golden_on_the_gpu("deepseek_v3_yarn");
}

/// A mixture of experts and latent attention with several sequences sharing passes through
/// scattered block tables (prompt chunks, then decode passes of two sequences, captured and
/// replayed): the GPU engine against the CPU engine running the same passes, within 1e-3 of the
/// largest logit; f32 weights, and bf16 ones (the experts' bf16 kernels) in passes short enough
/// to stay off the GEMMs, whose bf16-rounded activations the CPU does not share.
#[test]
fn experts_and_latent_attention_in_shared_passes_match_the_cpu() {
    let Some(arch) = device() else { return };
    let options = EngineOptions {
        max_context: 256,
        max_batch_tokens: 128,
        max_num_seqs: 2,
        block_size: 16,
        kv_blocks: Some(32),
    };
    for model in ["deepseek_v3", "qwen3_moe"] {
        for (dtype, prompt) in [(DType::F32, 37), (DType::BF16, 7)] {
            let cpu_plan = compiled_tiny(
                model,
                Target::parse("cpu").expect("cpu"),
                dtype,
                ir::QuantScheme::None,
            );
            let mut cpu = common::engine_with(&cpu_plan, options.clone());
            let plan = LoadedPlan::load(&cuda_plan(model, arch, dtype)).expect("loading");
            let mut gpu = GpuEngine::new(plan, 0, options.clone()).expect("uploading the plan");
            let tables: Vec<Vec<u32>> = (0..2u32)
                .map(|i| (0..16).map(|b| b * 2 + i).collect())
                .collect();
            let (a, b) = (tokens(prompt, 5), tokens(prompt / 2 + 1, 6));
            let passes: Vec<Vec<(usize, Vec<u32>, Logits)>> = vec![
                vec![(0, a.clone(), Logits::All), (1, b.clone(), Logits::Last)],
                vec![(0, a.clone(), Logits::All)],
                vec![(1, vec![9], Logits::Last), (0, vec![8], Logits::Last)],
                vec![(0, vec![10], Logits::Last), (1, vec![11], Logits::Last)],
                vec![(1, vec![12], Logits::Last), (0, vec![13], Logits::Last)],
            ];
            let label = format!("{model} {dtype}");
            compare_passes(&label, &mut cpu, &mut gpu, &tables, &passes);
        }
    }
}

/// The grouping of a pass's rows by expert at its extreme: the tiny DeepSeek-V3 with selection
/// biases that make every token pick experts 3 and 2 (one expert's rows span many tiles and end
/// in a one-row tile, six experts receive none), plain and with W4A16 experts: the GPU's prompt pass (grouped) and a
/// decode step (per-row kernels) against the CPU engine's, within 1e-3 of the largest logit.
#[test]
fn every_token_picking_the_same_experts_matches_the_cpu() {
    let Some(arch) = device() else { return };
    let dir = common::scratch_path("deepseek_v3-popular-experts");
    common::synthetic::rewritten_copy(
        &common::golden("tiny/deepseek_v3"),
        &dir,
        |name, original, out| {
            out.copy_from_slice(original);
            if name.ends_with("e_score_correction_bias") {
                out[3] = 100.0;
                out[2] = 50.0;
            }
        },
    );
    let json = common::read_json(&common::golden("tiny/deepseek_v3").join("golden.json"));
    let ids = common::ids(&json["input_ids"]);
    let mut prompt: Vec<u32> = ids.iter().chain(&ids).chain(&ids).copied().collect();
    // 4n + 1 rows per expert: full tiles and a one-row tile.
    prompt.truncate((prompt.len() - 1) / 4 * 4 + 1);
    for scheme in [ir::QuantScheme::None, ir::QuantScheme::W4A16] {
        let compile = |target: Target| {
            let out = common::scratch_path(&format!(
                "deepseek_v3-popular-{scheme}-{}.fdp",
                target.name()
            ));
            let mut options = CompileOptions {
                target,
                weight_dtype: DType::F32,
                quant: Default::default(),
                progress: false,
            };
            options.quant.scheme = scheme;
            compiler::compile(&dir, &out, &options).expect("compiling");
            LoadedPlan::load(&out).expect("loading")
        };
        let mut cpu =
            runtime::Engine::new(compile(Target::parse("cpu").expect("cpu")), solo(1024, 128))
                .expect("CPU engine");
        let mut gpu =
            GpuEngine::new(compile(Target::Cuda(arch)), 0, solo(1024, 128)).expect("uploading");
        let vocab = gpu.plan().manifest.model.vocab_size as usize;
        let label = format!("popular experts {scheme}");
        let want = cpu.prefill(&prompt, true).expect("CPU prefill");
        let got = gpu.forward(&prompt, true).expect("GPU prefill");
        common::check_logits(&label, &got, &want, vocab, 1e-3);
        let want = cpu.forward_last(&[7]).expect("CPU decode").to_vec();
        let got = gpu.forward(&[7], false).expect("GPU decode");
        common::check_logits(&format!("{label} decode"), &got, &want, vocab, 1e-3);
    }
}

/// SmolLM2-135M (its GGUF, f32 weights) on the GPU against the float64 reference, as the CPU
/// test checks it: prompt logits within 1e-3, teacher-forced greedy tokens equal.
#[test]
fn smollm2_matches_the_float64_reference_on_the_gpu() {
    let Some(arch) = device() else { return };
    let out = common::scratch_path(&format!("smollm2-{}.fdp", arch.name()));
    let options = CompileOptions {
        target: Target::Cuda(arch),
        weight_dtype: DType::F32,
        quant: Default::default(),
        progress: false,
    };
    compiler::compile(&common::smollm2_gguf(), &out, &options).expect("compiling SmolLM2");
    let plan = LoadedPlan::load(&out).expect("loading");
    let vocab = plan.manifest.model.vocab_size as usize;
    let mut engine = GpuEngine::new(plan, 0, solo(2048, 1024)).expect("uploading the plan");
    common::check_smollm2("f32 on the GPU", vocab, 1e-3, 1e-3, |sequence| {
        engine.reset();
        engine.forward(sequence, true).expect("forward")
    });
}

/// The quantized matmuls (8, 4 and 2-bit codes, symmetric and asymmetric, one scale per 32 k
/// and per row) against a float64 reference of the weights the CPU kernels read
/// (`QuantWeight::get_f32`), for a decode step and a 5-token pass, with a partial last panel;
/// and the GEMM of many tokens over the same weights formed whole in f32.
#[test]
fn quantized_matmuls_match_a_float64_reference() {
    use ir::{ActQuant, CodeFormat};
    use kernels::cpu::quant::{quantize_activation_row, QuantBytes, QuantFormat, QuantWeight};
    use kernels::cpu::PackedLayout;
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    let s = &gpu.stream;
    let (k, n) = (256usize, 44usize);
    let gemm = runtime::cuda::Gemm::new(&gpu, 70, k, n * k).expect("cuBLAS");
    let layout = PackedLayout::CUDA_QUANT;
    let values = random(n * k, 7);
    let bias = random(n, 8);
    let b_d = s.clone_htod(&bias).unwrap();
    let address =
        |d: &cudarc::driver::CudaSlice<f32>| cudarc::driver::DevicePtr::device_ptr(d, s).0;
    let function = |name: &str| gpu.module.load_function(name).expect(name);
    // Every code format with the activations its schemes take: A16 (as they are), A8 (the int8
    // grid of W8A8 and W4A8) and the e4m3 grid of FP8.
    let cases = [
        (CodeFormat::Int(8), "matmul_q8", ActQuant::None),
        (CodeFormat::Int(4), "matmul_q4", ActQuant::None),
        (CodeFormat::Int(2), "matmul_q2", ActQuant::None),
        (CodeFormat::Int(8), "matmul_q8", ActQuant::Int8PerToken),
        (CodeFormat::Int(4), "matmul_q4", ActQuant::Int8PerToken),
        (CodeFormat::Fp8E4M3, "matmul_e4m3", ActQuant::Fp8PerToken),
    ];
    // The activations a matmul reads: x itself, or its rows on their grid (quantized on the
    // device, which must give the CPU's grid values and scales bit for bit) and their scales.
    let activations = |x: &[f32], t: usize, act: ActQuant| {
        let x_d = s.clone_htod(x).unwrap();
        if act == ActQuant::None {
            return (x_d, None, x.to_vec(), vec![1f32; t]);
        }
        let q_d = s.clone_htod(&vec![f32::NAN; t * k]).unwrap();
        let scales_d = s.clone_htod(&vec![f32::NAN; t]).unwrap();
        let quantize = function(if act == ActQuant::Int8PerToken {
            "quantize_rows_i8_f32"
        } else {
            "quantize_rows_e4m3_f32"
        });
        let ki = k as i32;
        let mut launch = s.launch_builder(&quantize);
        launch.arg(&x_d).arg(&ki).arg(&ki).arg(&q_d).arg(&scales_d);
        let config = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.expect("quantize launch");
        let (got_q, got_scales) = (
            s.clone_dtoh(&q_d).unwrap(),
            s.clone_dtoh(&scales_d).unwrap(),
        );
        let mut want_q = vec![0f32; t * k];
        for (r, q) in want_q.chunks_mut(k).enumerate() {
            let scale = quantize_activation_row(act, &x[r * k..][..k], q);
            assert_eq!(
                got_scales[r].to_bits(),
                scale.to_bits(),
                "{act:?} row {r} scale"
            );
        }
        let same = got_q
            .iter()
            .zip(&want_q)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{act:?}: the device's grid values differ from the CPU's"
        );
        (q_d, Some(scales_d), want_q, got_scales)
    };
    // `scale[t] * (q @ w^T)[t] + bias` in float64.
    let reference = |q: &[f32], scales: &[f32], weight: &QuantWeight| -> Vec<f64> {
        let zero = vec![0f32; n];
        let mut want = matmul_reference(q, k, &zero, |c, i| weight.get_f32(c, i));
        for (r, row) in want.chunks_mut(n).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = *v * scales[r] as f64 + bias[c] as f64;
            }
        }
        want
    };
    for (codes, name, act) in cases {
        for asymmetric in [false, true] {
            if asymmetric && codes == CodeFormat::Fp8E4M3 {
                continue;
            }
            for group in [32, k] {
                let case = format!("{name} {act:?} asymmetric {asymmetric} group {group}");
                let format = QuantFormat {
                    codes,
                    group,
                    asymmetric,
                };
                let matrix = compiler::quantize::quantize(
                    &values,
                    n,
                    k,
                    format,
                    compiler::quantize::Method::RoundToNearest,
                );
                let packed = matrix.pack(layout).expect("packs");
                let parts = QuantBytes::of(&format, layout, n, k);
                let bytes = parts.write(&packed);
                let weight = QuantWeight::from_bytes(format, layout, n, k, &bytes).expect("view");
                let w_d = s.clone_htod(&bytes).unwrap();
                let base = cudarc::driver::DevicePtr::device_ptr(&w_d, s).0;
                let scales = base + parts.scales_offset as u64;
                let mins = if asymmetric {
                    base + parts.mins_offset as u64
                } else {
                    0
                };
                // The kernel for several tokens (also given one), and the single-token one.
                let one = format!("{name}_one");
                for (t, kernel) in [(1usize, name), (1, one.as_str()), (5, name)] {
                    let x = random(t * k, 9 + t as u64);
                    let (x_d, row_scales_d, q, row_scales) = activations(&x, t, act);
                    let row_scales_p = row_scales_d.as_ref().map_or(0, address);
                    let mut out_d = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
                    let geometry = (
                        runtime::cuda::QUANT_MATMUL_ROWS,
                        runtime::cuda::QUANT_MATMUL_THREADS,
                    );
                    let (pointers, sizes) = ([scales, mins, row_scales_p], [k, n, group, t]);
                    launch_quant_matmul(
                        s,
                        &function(kernel),
                        &x_d,
                        &w_d,
                        &b_d,
                        &mut out_d,
                        pointers,
                        sizes,
                        geometry,
                    );
                    let got = s.clone_dtoh(&out_d).unwrap();
                    let err = relative_error(&got, &reference(&q, &row_scales, &weight));
                    assert!(err < 1e-5, "{case} {kernel} t {t}: relative error {err}");
                }
                // The GEMM of many tokens: the weight formed whole and exactly, in f32; for
                // quantized activations the rows' scales and the bias come after
                // (`scale_rows_f32`, as the engine runs it).
                let t = 70usize;
                let x = random(t * k, 30);
                let (x_d, row_scales_d, q, row_scales) = activations(&x, t, act);
                let out_d = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
                let args = f32_gemm_args(
                    address(&x_d),
                    base,
                    address(&out_d),
                    [k, n, t],
                    if row_scales_d.is_some() {
                        0
                    } else {
                        address(&b_d)
                    },
                );
                let quant = runtime::cuda::QuantArgs {
                    codes,
                    act,
                    group: group as i32,
                    scales,
                    mins,
                    tiles: false,
                };
                assert!(gemm.dequantizes(&quant), "{case}");
                gemm.run_quantized(s, &args, &quant)
                    .expect("quantized GEMM");
                if let Some(row_scales_d) = &row_scales_d {
                    let f = function("scale_rows_f32");
                    let (ni, out, rs, b) =
                        (n as i32, args.out, address(row_scales_d), address(&b_d));
                    let mut launch = s.launch_builder(&f);
                    launch.arg(&out).arg(&ni).arg(&ni).arg(&rs).arg(&b);
                    let config = LaunchConfig {
                        grid_dim: ((n as u32).div_ceil(256), t as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { launch.launch(config) }.expect("epilogue launch");
                }
                let got = s.clone_dtoh(&out_d).unwrap();
                let err = relative_error(&got, &reference(&q, &row_scales, &weight));
                assert!(err < 1e-5, "GEMM {case}: relative error {err}");
            }
        }
    }
}

/// A GEMM over f32 activations at `x` ([t, k], packed), a weight at `w` and an output at
/// `out` ([t, n], packed), `bias` 0 for none.
fn f32_gemm_args(
    x: u64,
    w: u64,
    out: u64,
    [k, n, t]: [usize; 3],
    bias: u64,
) -> runtime::cuda::GemmArgs {
    runtime::cuda::GemmArgs {
        x,
        x_stride: k as i32,
        w,
        dtype: DType::F32,
        k: k as i32,
        n: n as i32,
        t: t as i32,
        out,
        out_stride: n as i32,
        bias,
    }
}

/// Launches a quantized row matmul (`matmul_q*`, its `_one` form, the tile kernels) in the
/// module's argument order: `pointers` are the scales, minimums and rows' activation scales
/// (0 for none), `sizes` k, n, the group and the tokens t, `geometry` the output rows and
/// threads per block.
#[allow(clippy::too_many_arguments)]
fn launch_quant_matmul(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    f: &cudarc::driver::CudaFunction,
    x: &cudarc::driver::CudaSlice<f32>,
    w: &cudarc::driver::CudaSlice<u8>,
    bias: &cudarc::driver::CudaSlice<f32>,
    out: &mut cudarc::driver::CudaSlice<f32>,
    [scales, mins, row_scales]: [u64; 3],
    [k, n, group, t]: [usize; 4],
    (rows, threads): (u32, u32),
) {
    let (ki, ni, gi, ti) = (k as i32, n as i32, group as i32, t as i32);
    let mut launch = s.launch_builder(f);
    launch
        .arg(x)
        .arg(&ki)
        .arg(w)
        .arg(&ki)
        .arg(&ni)
        .arg(&gi)
        .arg(&scales)
        .arg(&mins)
        .arg(&row_scales)
        .arg(bias)
        .arg(&ti)
        .arg(out)
        .arg(&ni);
    let config = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(rows), t.div_ceil(4) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments are the kernels' own (kernels/cuda/quant.cu), the buffers sized
    // for an [n, k] weight and t rows.
    unsafe { launch.launch(config) }.expect("launch");
}

/// The tensor-core W4A16 matmuls over the tile layout (`matmul_q4t`, `matmul_q4t_one`; the
/// codes moved from panels by `tiles_from_panels`, as fdc writes them) against a float64
/// reference of the same weights: K of 4 chunks (fewer than the warps) and of 17 (several
/// rounds, an odd last chunk), a scale per 64 k and per row, one token and 5 (a partial second
/// block of tokens); and the GEMM over the tiles formed whole (`dequantize_q4t_f32`).
#[test]
fn tiled_w4a16_matmuls_match_a_float64_reference() {
    use ir::{ActQuant, CodeFormat};
    use kernels::cpu::quant::{QuantBytes, QuantFormat, QuantWeight};
    use kernels::cpu::PackedLayout;
    use kernels::cuda::{
        QUANT_TILE_ROWS, QUANT_TILE_THREADS, QUANT_TILE_THREADS_ONE, TILE_MATMUL_FUNCTIONS,
    };
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    let s = &gpu.stream;
    let n = 48usize;
    let layout = PackedLayout::CUDA_QUANT;
    let gemm = runtime::cuda::Gemm::new(&gpu, 70, 1088, n * 1088).expect("cuBLAS");
    let bias = random(n, 8);
    let b_d = s.clone_htod(&bias).unwrap();
    let address =
        |d: &cudarc::driver::CudaSlice<f32>| cudarc::driver::DevicePtr::device_ptr(d, s).0;
    let function = |name: &str| gpu.module.load_function(name).expect(name);
    for k in [256usize, 1088] {
        let values = random(n * k, 7 + k as u64);
        for group in [64, k] {
            let case = format!("tiles k {k} group {group}");
            let format = QuantFormat {
                codes: CodeFormat::Int(4),
                group,
                asymmetric: false,
            };
            assert!(kernels::cuda::tiles_fit(
                ir::QuantScheme::W4A16,
                &format,
                n,
                k
            ));
            let matrix = compiler::quantize::quantize(
                &values,
                n,
                k,
                format,
                compiler::quantize::Method::RoundToNearest,
            );
            let parts = QuantBytes::of(&format, layout, n, k);
            let panels = parts.write(&matrix.pack(layout).expect("packs"));
            let weight = QuantWeight::from_bytes(format, layout, n, k, &panels).expect("view");
            let reference = |x: &[f32]| matmul_reference(x, k, &bias, |c, i| weight.get_f32(c, i));
            let want_all: Vec<Vec<f64>> = [1usize, 5]
                .iter()
                .map(|&t| reference(&random(t * k, 9 + t as u64)))
                .collect();
            let codes = n * k / 2;
            let mut bytes = panels.clone();
            bytes[..codes].copy_from_slice(&kernels::cuda::tiles_from_panels(
                &panels[..codes],
                n,
                k,
            ));
            let w_d = s.clone_htod(&bytes).unwrap();
            let base = cudarc::driver::DevicePtr::device_ptr(&w_d, s).0;
            let scales = base + parts.scales_offset as u64;
            let [several, one] = TILE_MATMUL_FUNCTIONS;
            for (t, kernel) in [(1usize, one), (1, several), (5, several)] {
                let x = random(t * k, 9 + t as u64);
                let want = &want_all[usize::from(t == 5)];
                let x_d = s.clone_htod(&x).unwrap();
                let mut out_d = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
                let threads = if kernel == one {
                    QUANT_TILE_THREADS_ONE
                } else {
                    QUANT_TILE_THREADS
                };
                let (pointers, sizes) = ([scales, 0, 0], [k, n, group, t]);
                let geometry = (QUANT_TILE_ROWS, threads);
                launch_quant_matmul(
                    s,
                    &function(kernel),
                    &x_d,
                    &w_d,
                    &b_d,
                    &mut out_d,
                    pointers,
                    sizes,
                    geometry,
                );
                let got = s.clone_dtoh(&out_d).unwrap();
                let err = relative_error(&got, want);
                assert!(err < 1e-5, "{case} {kernel} t {t}: relative error {err}");
            }
            let t = 70usize;
            let x = random(t * k, 30);
            let x_d = s.clone_htod(&x).unwrap();
            let out_d = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
            let args = f32_gemm_args(
                address(&x_d),
                base,
                address(&out_d),
                [k, n, t],
                address(&b_d),
            );
            let quant = runtime::cuda::QuantArgs {
                codes: CodeFormat::Int(4),
                act: ActQuant::None,
                group: group as i32,
                scales,
                mins: 0,
                tiles: true,
            };
            assert!(gemm.dequantizes(&quant), "{case}");
            gemm.run_quantized(s, &args, &quant).expect("tiled GEMM");
            let got = s.clone_dtoh(&out_d).unwrap();
            let err = relative_error(&got, &reference(&x));
            assert!(err < 1e-5, "GEMM {case}: relative error {err}");
        }
    }
}

/// A tiny golden compiled with a quantized scheme for the GPU and for the CPU from the same
/// checkpoint: the same codes, so the GPU's logits must match the CPU engine's (which computes
/// with 16-bit integer activations where the GPU keeps f32) within 1e-3 of the largest logit,
/// for the golden prompt, a decode step, and a prompt long enough for the quantized GEMM.
fn quantized_golden_on_the_gpu(model: &str, scheme: ir::QuantScheme) {
    quantized_golden_on_the_gpu_with(model, &scheme_only(scheme));
}

fn quantized_golden_on_the_gpu_with(model: &str, quant: &QuantOptions) {
    let scheme = quant.scheme;
    let Some(arch) = device() else { return };
    if scheme == ir::QuantScheme::Fp8 && arch == CudaArch::Sm80 {
        return skipped("FP8 runs on sm89 and sm90; this device is sm80");
    }
    let dir = common::golden(&format!("tiny/{model}"));
    let compile = |target: Target| {
        LoadedPlan::load(&compiled_tiny_with(model, target, DType::F32, quant)).expect("loading")
    };
    let json = common::read_json(&dir.join("golden.json"));
    let ids = common::ids(&json["input_ids"]);
    let mut cpu = runtime::Engine::new(
        compile(Target::parse("cpu").expect("the host target")),
        Default::default(),
    )
    .expect("CPU engine");
    let want = cpu.prefill(&ids, true).expect("CPU prefill");
    let mut gpu =
        GpuEngine::new(compile(Target::Cuda(arch)), 0, solo(1024, 128)).expect("uploading");
    let got = gpu.forward(&ids, true).expect("GPU forward");
    let vocab = gpu.plan().manifest.model.vocab_size as usize;
    common::check_logits(&format!("{model} {scheme}"), &got, &want, vocab, 1e-3);
    // A pass of 3 tokens (a mixture's quantized experts then run per row, under
    // `MOE_QUANT_GROUP_FROM` rows per expert), and a decode step after the prompt.
    cpu.reset();
    let want_short = cpu.prefill(&ids[..3], true).expect("CPU prefill");
    gpu.reset();
    let got_short = gpu.forward(&ids[..3], true).expect("GPU forward");
    let label = format!("{model} {scheme} 3 tokens");
    common::check_logits(&label, &got_short, &want_short, vocab, 1e-3);
    gpu.reset();
    let _ = gpu.forward(&ids[..ids.len() - 1], false).expect("prefill");
    let last = gpu.forward(&ids[ids.len() - 1..], false).expect("decode");
    let want_last = &want[(ids.len() - 1) * vocab..];
    let label = format!("{model} {scheme} decode");
    common::check_logits(&label, &last, want_last, vocab, 1e-3);
    // A prompt of GEMM_MIN_TOKENS_QUANTIZED tokens or more: the quantized matmuls take the GEMM.
    let long: Vec<u32> = ids.iter().chain(&ids).copied().collect();
    assert!(long.len() >= kernels::cuda::GEMM_MIN_TOKENS_QUANTIZED as usize);
    cpu.reset();
    let want_long = cpu.prefill(&long, true).expect("CPU prefill");
    gpu.reset();
    let got_long = gpu.forward(&long, true).expect("GPU forward");
    let label = format!("{model} {scheme} GEMM");
    if scheme.act_quant() != ir::ActQuant::Fp8PerToken {
        common::check_logits(&label, &got_long, &want_long, vocab, 1e-3);
        return;
    }
    // FP8 activations keep 3 mantissa bits: where the GPU's and the CPU's sums differ in their
    // last bit (another order), a value near the middle of two e4m3 neighbours rounds to the
    // other one, 1/16 of it away, and through the KV cache every later token carries that. So
    // the two FP8 engines are each held to the unquantized model instead: the GPU's logits may
    // stray from it by at most half as much again as the CPU's do.
    let mut plain = runtime::Engine::new(
        LoadedPlan::load(&common::compiled(&dir, DType::F32)).expect("loading"),
        Default::default(),
    )
    .expect("CPU engine");
    let exact = plain.prefill(&long, true).expect("unquantized prefill");
    let mean_error = |got: &[f32]| {
        let rows = got.chunks(vocab).zip(exact.chunks(vocab));
        let sum: f64 = rows
            .map(|(g, w)| {
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                diff as f64 / scale
            })
            .sum();
        sum / (got.len() / vocab) as f64
    };
    let (gpu_error, cpu_error) = (mean_error(&got_long), mean_error(&want_long));
    println!("{label}: mean relative distance to the unquantized model: GPU {gpu_error:.3e}, CPU {cpu_error:.3e}");
    assert!(
        gpu_error <= 1.5 * cpu_error,
        "{label}: the GPU's FP8 logits are {gpu_error:.3e} from the unquantized model's, the CPU's {cpu_error:.3e}"
    );
}

#[test]
fn golden_llama_w4a16_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("llama", ir::QuantScheme::W4A16);
}

/// Every matmul weight in the tile layout: the tensor-core kernels for one token (the decode
/// step) and several (the 3-token pass), the tiles formed whole for the GEMM (the long prompt).
#[test]
fn golden_llama_w4a16_tiles_on_the_gpu_matches_the_cpu() {
    let Some(arch) = device() else { return };
    let plan = compiled_tiny_with("llama", Target::Cuda(arch), DType::F32, &w4a16_tiles());
    let manifest = LoadedPlan::load(&plan).expect("loading").manifest;
    let tiled = manifest
        .weights
        .iter()
        .filter(|w| w.layout == artifacts::schema::WeightLayout::QuantTiles)
        .count();
    // q, k, v (or their fusion), o, gate and up (or gate_up), down in each of two layers.
    assert!(tiled >= 8, "{tiled} weights in tiles");
    quantized_golden_on_the_gpu_with("llama", &w4a16_tiles());
}

#[test]
fn golden_qwen2_tied_w8a16_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("qwen2", ir::QuantScheme::W8A16);
}

#[test]
fn golden_qwen3_w2a16_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("qwen3", ir::QuantScheme::W2A16);
}

#[test]
fn golden_llama_w8a8_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("llama", ir::QuantScheme::W8A8);
}

#[test]
fn golden_qwen2_tied_w4a8_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("qwen2", ir::QuantScheme::W4A8);
}

#[test]
fn golden_qwen3_fp8_on_the_gpu_matches_the_cpu() {
    quantized_golden_on_the_gpu("qwen3", ir::QuantScheme::Fp8);
}

/// Mixture-of-experts goldens with their stacked experts quantized (`moe.cu`'s quantized
/// experts; every other matmul quantized too): the GPU against the CPU engine as above.
#[test]
fn golden_qwen3_moe_w4a16_experts_on_the_gpu_match_the_cpu() {
    quantized_golden_on_the_gpu("qwen3_moe", ir::QuantScheme::W4A16);
}

#[test]
fn golden_deepseek_v3_w8a8_experts_on_the_gpu_match_the_cpu() {
    quantized_golden_on_the_gpu("deepseek_v3", ir::QuantScheme::W8A8);
}

#[test]
fn golden_mixtral_w2a16_experts_on_the_gpu_match_the_cpu() {
    quantized_golden_on_the_gpu("mixtral", ir::QuantScheme::W2A16);
}

#[test]
fn golden_ernie4_5_moe_fp8_experts_on_the_gpu_match_the_cpu() {
    quantized_golden_on_the_gpu("ernie4_5_moe", ir::QuantScheme::Fp8);
}

/// Decode steps (passes of one token) with the plan's norms folded into their matmuls give the
/// logits of the same steps run unfolded (each norm its own launch), and the CPU engine's:
/// plain and A16-quantized weights, with and without biases, a tied head.
#[test]
fn decode_folds_give_the_logits_of_unfolded_steps() {
    // Also: decode attention in one launch gives the logits of its three kernels.
    let Some(arch) = device() else { return };
    for (model, quant, dtype) in [
        ("llama", scheme_only(ir::QuantScheme::None), DType::F32),
        ("llama", scheme_only(ir::QuantScheme::None), DType::BF16),
        ("llama", scheme_only(ir::QuantScheme::W4A16), DType::F32),
        ("llama", w4a16_tiles(), DType::F32),
        ("qwen2", scheme_only(ir::QuantScheme::W8A16), DType::F32),
        ("qwen3", scheme_only(ir::QuantScheme::W2A16), DType::F32),
    ] {
        let label = format!("{model} {:?} {dtype}", quant.scheme);
        // Compiled once, loaded by each engine.
        let gpu_plan = compiled_tiny_with(model, Target::Cuda(arch), dtype, &quant);
        let engine = || {
            GpuEngine::new(
                LoadedPlan::load(&gpu_plan).expect("loading"),
                0,
                solo(256, 64),
            )
        };
        let mut folded = engine().expect("uploading");
        let mut unfolded = engine().expect("uploading");
        assert!(folded.decode_folds() > 0, "{label}: nothing folded");
        unfolded.unfold_decode_norms();
        assert_eq!(unfolded.decode_folds(), 0);
        // And attention in one launch (sm90; both engines above) against its three kernels, the
        // folds kept: each comparison differs in one thing.
        for engine in [&mut folded, &mut unfolded] {
            assert_eq!(
                engine.set_one_launch_decode_attention(true),
                arch == CudaArch::Sm90,
                "{label}: one-launch decode attention on {arch:?}"
            );
        }
        let mut split = engine().expect("uploading");
        assert!(!split.set_one_launch_decode_attention(false));
        let cpu_plan = compiled_tiny_with(
            model,
            Target::parse("cpu").expect("the host"),
            dtype,
            &quant,
        );
        let mut cpu = runtime::Engine::new(
            LoadedPlan::load(&cpu_plan).expect("loading"),
            Default::default(),
        )
        .expect("CPU engine");
        let vocab = folded.plan().manifest.model.vocab_size as usize;
        let ids = tokens(24, 7);
        let (prompt, decode) = ids.split_at(8);
        let want = cpu.prefill(&ids, true).expect("CPU prefill");
        folded.forward(prompt, false).expect("prefill");
        unfolded.forward(prompt, false).expect("prefill");
        split.forward(prompt, false).expect("prefill");
        for (i, &token) in decode.iter().enumerate() {
            let got = folded.forward(&[token], false).expect("folded decode");
            let plain = unfolded.forward(&[token], false).expect("unfolded decode");
            let three = split
                .forward(&[token], false)
                .expect("split-attention decode");
            let step = format!("{label} step {i}");
            common::check_logits(
                &format!("{step} one-launch vs split attention"),
                &got,
                &three,
                vocab,
                1e-5,
            );
            // Another order of the same sums: the last bits only.
            common::check_logits(
                &format!("{step} folded vs unfolded"),
                &got,
                &plain,
                vocab,
                1e-5,
            );
            let row = &want[(prompt.len() + i) * vocab..][..vocab];
            common::check_logits(&format!("{step} vs the CPU"), &got, row, vocab, 1e-3);
        }
    }
}

/// A fixed, varied token sequence inside the tiny vocabulary.
fn tokens(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + seed * 104_729 + 3) % 317 + 3)
        .collect()
}

/// Runs `passes` (per chunk: sequence, tokens, logits wanted) on both engines, each sequence
/// through its table of `tables` after what the passes before gave it, and checks every pass's
/// logits within 1e-3 of the largest logit. Returns the positions each sequence holds.
fn compare_passes(
    label: &str,
    cpu: &mut runtime::Engine,
    gpu: &mut GpuEngine,
    tables: &[Vec<u32>],
    passes: &[Vec<(usize, Vec<u32>, Logits)>],
) -> Vec<usize> {
    let vocab = cpu.vocab_size();
    let mut lens = vec![0usize; tables.len()];
    for (i, pass) in passes.iter().enumerate() {
        let chunks: Vec<SeqChunk> = pass
            .iter()
            .map(|(seq, ids, logits)| SeqChunk {
                blocks: &tables[*seq],
                start: lens[*seq],
                tokens: ids,
                logits: *logits,
            })
            .collect();
        let want = cpu.forward_batch(&chunks).expect("CPU pass").to_vec();
        let got = gpu.forward_batch(&chunks).expect("GPU pass").to_vec();
        common::check_logits(&format!("{label} pass {i}"), &got, &want, vocab, 1e-3);
        for (seq, ids, _) in pass {
            lens[*seq] += ids.len();
        }
    }
    lens
}

/// Several sequences sharing passes on the GPU, each through its own block table scattered
/// over the pool (sequence i holds every third block from i): prompt chunks beside decode
/// tokens, and decode passes of 2 and 3 sequences (captured graphs, the second replayed at new
/// positions with the sequences in another order). Every pass's logits match the CPU engine's
/// for the same passes within 1e-3 of the largest logit.
#[test]
fn several_sequences_in_one_pass_match_the_cpu_engine() {
    let Some(arch) = device() else { return };
    let dir = common::golden("tiny/llama");
    let options = EngineOptions {
        max_context: 512,
        max_batch_tokens: 256,
        max_num_seqs: 3,
        block_size: 16,
        kv_blocks: Some(96),
    };
    let cpu_plan = common::compiled(&dir, DType::F32);
    let mut cpu = common::engine_with(&cpu_plan, options.clone());
    let plan = LoadedPlan::load(&cuda_plan("llama", arch, DType::F32)).expect("loading");
    let mut gpu = GpuEngine::new(plan, 0, options).expect("uploading the plan");
    assert_eq!(gpu.kv_blocks(), 96);
    let vocab = cpu.vocab_size();
    let tables: Vec<Vec<u32>> = (0..3u32)
        .map(|i| (0..32).map(|b| b * 3 + i).collect())
        .collect();
    let (a, b, c) = (tokens(40, 2), tokens(90, 3), tokens(7, 4));
    let passes: Vec<Vec<(usize, Vec<u32>, Logits)>> = vec![
        vec![(1, b.clone(), Logits::All), (0, a.clone(), Logits::Last)],
        vec![(2, c.clone(), Logits::Last), (0, vec![5], Logits::Last)],
        vec![(0, vec![6], Logits::Last), (1, vec![9], Logits::Last)],
        vec![
            (1, vec![10], Logits::Last),
            (0, vec![7], Logits::Last),
            (2, vec![11], Logits::Last),
        ],
        vec![
            (2, vec![12], Logits::Last),
            (1, vec![13], Logits::Last),
            (0, vec![14], Logits::Last),
        ],
        vec![(0, vec![15], Logits::Last), (1, vec![16], Logits::Last)],
    ];
    let lens = compare_passes("llama", &mut cpu, &mut gpu, &tables, &passes);
    // Greedy chunks: the same decode pass run twice at the same positions, once returning
    // the rows and once with the device picking from them (a graph of its own, captured with
    // the picks): the picks are the host's argmax of the rows.
    let step: Vec<(usize, Vec<u32>)> = vec![(0, vec![21]), (2, vec![22]), (1, vec![23])];
    let run = |gpu: &mut GpuEngine, logits: Logits| -> (Vec<f32>, Vec<u32>) {
        let chunks: Vec<SeqChunk> = step
            .iter()
            .map(|(seq, ids)| SeqChunk {
                blocks: &tables[*seq],
                start: lens[*seq],
                tokens: ids,
                logits,
            })
            .collect();
        let rows = gpu.forward_batch(&chunks).expect("GPU pass").to_vec();
        (rows, gpu.greedy_ids().to_vec())
    };
    let (rows, none) = run(&mut gpu, Logits::Last);
    assert!(none.is_empty());
    let (empty, picked) = run(&mut gpu, Logits::Greedy);
    assert!(empty.is_empty(), "greedy chunks return no rows");
    let want: Vec<u32> = rows.chunks(vocab).map(runtime::sampler::argmax).collect();
    assert_eq!(picked, want);
    // A pass the GPU engine must refuse as the CPU one does: a block outside the pool.
    let bad = [SeqChunk {
        blocks: &[96],
        start: 0,
        tokens: &[1],
        logits: Logits::Last,
    }];
    assert!(matches!(
        gpu.forward_batch(&bad),
        Err(RuntimeError::KvBlocks(_))
    ));
}

/// The scheduler stepping the GPU engine: eight requests of mixed lengths (one longer than the
/// token budget, so chunked) served together give the greedy tokens each gets alone on the GPU.
#[test]
fn the_scheduler_on_the_gpu_batches_requests_as_they_run_alone() {
    use runtime::generate::{generate, GenerateOptions};
    use runtime::sampler::SamplingParams;
    use runtime::scheduler::{Event, RequestParams, Scheduler, SchedulerConfig};
    let Some(arch) = device() else { return };
    let path = cuda_plan("llama", arch, DType::F32);
    let load = || LoadedPlan::load(&path).expect("loading");
    let options = EngineOptions {
        max_context: 256,
        max_batch_tokens: 64,
        max_num_seqs: 8,
        block_size: 16,
        kv_blocks: None,
    };
    let engine = GpuEngine::new(load(), 0, options).expect("uploading the plan");
    let scheduler = Scheduler::start(
        Box::new(engine),
        SchedulerConfig {
            max_num_seqs: 8,
            max_waiting: 16,
            prefix_caching: true,
            speculative: None,
        },
    );
    let prompts: Vec<Vec<u32>> = [3usize, 7, 12, 90, 1, 20, 5, 40]
        .iter()
        .enumerate()
        .map(|(i, &len)| tokens(len, i as u32 + 10))
        .collect();
    let params = RequestParams {
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
        logprobs: None,
        speculative: true,
    };
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| scheduler.submit(p.clone(), params.clone()).expect("submit"))
        .collect();
    let mut alone = GpuEngine::new(load(), 0, solo(256, 64)).expect("uploading the plan");
    let generate_options = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
    };
    for (p, mut stream) in prompts.iter().zip(streams) {
        let mut got = vec![];
        loop {
            match stream
                .next_blocking()
                .expect("a stream ends with Done or Failed")
            {
                Event::Token(t) => got.push(t.id),
                Event::Done { .. } => break,
                other => panic!("prompt of {} tokens: {other:?}", p.len()),
            }
        }
        alone.reset();
        let want = generate(&mut alone, p, &generate_options, |_| {})
            .expect("generate")
            .tokens;
        assert_eq!(
            got,
            want,
            "prompt of {} tokens: batched differs from alone",
            p.len()
        );
    }
}

/// Speculative decoding on the GPU (n-gram proposals, each verified in one multi-token pass):
/// greedy outputs equal those of the same scheduler decoding one token per step, with proposals
/// made and accepted, for one request at a time and eight at once.
#[test]
fn speculative_decoding_on_the_gpu_keeps_greedy_outputs() {
    use runtime::scheduler::{Event, Scheduler, SchedulerConfig};
    use runtime::speculative::SpeculativeConfig;
    let Some(arch) = device() else { return };
    let path = cuda_plan("llama", arch, DType::F32);
    let start = |slots: usize, speculative: Option<SpeculativeConfig>| {
        let options = EngineOptions {
            max_context: 256,
            max_batch_tokens: 64,
            max_num_seqs: slots,
            block_size: 16,
            kv_blocks: None,
        };
        let loaded = LoadedPlan::load(&path).expect("loading");
        let engine = GpuEngine::new(loaded, 0, options).expect("uploading the plan");
        Scheduler::start(
            Box::new(engine),
            SchedulerConfig {
                max_num_seqs: slots,
                max_waiting: 16,
                prefix_caching: true,
                speculative,
            },
        )
    };
    // Prompts that repeat a phrase, and varied ones.
    let mut prompts: Vec<Vec<u32>> = (0..4).map(|i| tokens(6 + 5 * i, i as u32 + 30)).collect();
    for i in 0..4u32 {
        let phrase = tokens(5, 50 + i);
        prompts.push(phrase.iter().cycle().take(22).copied().collect());
    }
    let requests: Vec<_> = prompts
        .iter()
        .map(|p| (p.clone(), common::greedy_request(40)))
        .collect();
    let run = |s: &Scheduler, one_at_a_time: bool| -> Vec<Vec<u32>> {
        common::run_requests(s, &requests, one_at_a_time)
            .into_iter()
            .map(|(tokens, last)| {
                assert!(matches!(last, Event::Done { .. }), "{last:?}");
                tokens
            })
            .collect()
    };
    let plain = start(1, None);
    let want = run(&plain, true);
    let config =
        SpeculativeConfig::parse(r#"{"method": "ngram", "prompt_lookup_min": 1}"#).expect("config");
    for slots in [1, 8] {
        let s = start(slots, Some(config.clone()));
        let got = run(&s, slots == 1);
        assert_eq!(got, want, "{slots} slots: speculative output differs");
        let stats = common::wait_idle(&s);
        eprintln!("{slots} slots: {:?}", stats.speculative);
        assert!(
            stats.speculative.accepted_tokens > 0,
            "{:?}",
            stats.speculative
        );
        assert_eq!(stats.kv_blocks_used, 0);
    }
}

/// The tensor-core GEMM of prefill and large batches (cuBLAS), for f32, bf16 and f16 weights,
/// against a float64 reference of what it computes: activations rounded to the weights' type
/// (f32 kept as is), products summed exactly. Activations and outputs sit in wider rows (the
/// engine's arena views), with a bias; the output is poisoned first.
#[test]
fn gemm_matches_a_float64_reference() {
    use half::f16;
    use runtime::cuda::{Gemm, GemmArgs};
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    let (t, k, n, x_stride, out_stride) = (37usize, 320usize, 72usize, 352usize, 80usize);
    let gemm = Gemm::new(&gpu, t, k, 0).expect("cuBLAS (the GPU machine has the CUDA toolkit)");
    let x = random(t * x_stride, 21);
    let bias = random(n, 22);
    let w = random(n * k, 23);
    let s = &gpu.stream;
    let address = |d: &cudarc::driver::CudaSlice<u8>| cudarc::driver::DevicePtr::device_ptr(d, s).0;
    // Per weight type: how an activation or weight is rounded to it, and the weights' bytes.
    type Case = (DType, fn(f32) -> f32, Vec<u8>);
    let round: [Case; 3] = [
        (
            DType::F32,
            |v| v,
            w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            DType::BF16,
            |v| bf16::from_f32(v).to_f32(),
            w.iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        (
            DType::F16,
            |v| f16::from_f32(v).to_f32(),
            w.iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    ];
    let x_d = s
        .clone_htod(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
        .unwrap();
    let b_d = s
        .clone_htod(
            &bias
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
    for (dtype, to_weight_type, w_bytes) in round {
        let w_d = s.clone_htod(&w_bytes).unwrap();
        let out_d = s.clone_htod(&[0xffu8; 4].repeat(t * out_stride)).unwrap();
        let args = GemmArgs {
            x: address(&x_d),
            x_stride: x_stride as i32,
            w: address(&w_d),
            dtype,
            k: k as i32,
            n: n as i32,
            t: t as i32,
            out: address(&out_d),
            out_stride: out_stride as i32,
            bias: address(&b_d),
        };
        gemm.run(s, &args).expect("GEMM");
        let bytes = s.clone_dtoh(&out_d).unwrap();
        let out: Vec<f32> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got: Vec<f32> = out
            .chunks(out_stride)
            .flat_map(|row| row[..n].to_vec())
            .collect();
        let rounded_x: Vec<f32> = x
            .chunks(x_stride)
            .flat_map(|row| row[..k].iter().map(|&v| to_weight_type(v)))
            .collect();
        let want = matmul_reference(&rounded_x, k, &bias, |c, i| to_weight_type(w[c * k + i]));
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "{dtype}: relative error {err}");
        // The padding past each row's n outputs is untouched.
        assert!(out
            .chunks(out_stride)
            .all(|row| row[n..].iter().all(|v| v.is_nan())));
    }
}

/// The device's greedy pick (`argmax_rows_f32`) against the host's `sampler::argmax` on rows
/// made to trip it: NaNs, ties (the first position wins), a maximum in the last column,
/// all -inf, all NaN, -0.0 against 0.0, and a row of random values.
#[test]
fn the_device_argmax_picks_what_the_host_argmax_picks() {
    let Some(arch) = device() else { return };
    let gpu = module(arch);
    let cols = 3000usize;
    let mut rows: Vec<Vec<f32>> = vec![];
    let mut row = random(cols, 31);
    rows.push(row.clone());
    row[100] = 5.0;
    row[2000] = 5.0;
    row[7] = f32::NAN;
    rows.push(row.clone());
    row[cols - 1] = 6.0;
    rows.push(row.clone());
    rows.push(vec![f32::NEG_INFINITY; cols]);
    let mut nan_first = vec![f32::NEG_INFINITY; cols];
    nan_first[0] = f32::NAN;
    rows.push(nan_first);
    rows.push(vec![f32::NAN; cols]);
    let mut zeros = vec![-1.0f32; cols];
    zeros[40] = -0.0;
    zeros[41] = 0.0;
    rows.push(zeros);
    let flat: Vec<f32> = rows.concat();
    let s = &gpu.stream;
    let logits = s.clone_htod(&flat).unwrap();
    let mut ids = s.alloc_zeros::<u32>(rows.len()).unwrap();
    let argmax = gpu
        .module
        .load_function("argmax_rows_f32")
        .expect("argmax_rows_f32");
    let cols_i = cols as i32;
    let mut launch = s.launch_builder(&argmax);
    launch.arg(&logits).arg(&cols_i).arg(&mut ids);
    let config = LaunchConfig {
        grid_dim: (rows.len() as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }.expect("argmax launch");
    let got = s.clone_dtoh(&ids).unwrap();
    let want: Vec<u32> = rows.iter().map(|r| runtime::sampler::argmax(r)).collect();
    assert_eq!(got, want);
}

/// `OneSequence::append_greedy` on the GPU (what `fdrt bench` decodes with: the pick made on the
/// device, one id copied back) gives the tokens of the logits' host argmax, for a prompt longer
/// than the pass budget (two passes) and 24 decode steps.
#[test]
fn greedy_appends_pick_on_the_device_what_the_host_picks() {
    use runtime::sequence::OneSequence;
    let Some(arch) = device() else { return };
    let plan = LoadedPlan::load(&cuda_plan("llama", arch, DType::F32)).expect("loading");
    let mut engine = GpuEngine::new(plan, 0, solo(1024, 64)).expect("uploading the plan");
    let prompt = tokens(100, 5);
    let mut on_host = vec![];
    let mut logits = OneSequence::append(&mut engine, &prompt).expect("prefill");
    for _ in 0..24 {
        let next = runtime::sampler::argmax(&logits);
        on_host.push(next);
        logits = engine.forward(&[next], false).expect("decode");
    }
    engine.reset();
    let mut on_device = vec![engine.append_greedy(&prompt).expect("greedy prefill")];
    while on_device.len() < on_host.len() {
        let last = on_device[on_device.len() - 1];
        on_device.push(engine.append_greedy(&[last]).expect("greedy decode"));
    }
    assert_eq!(on_device, on_host);
}

/// Prefill/decode disaggregation on the GPU. Engine level: a block read from the GPU's KV pool
/// has the CPU pool's form (the same prompt's blocks agree within 1e-4 of their largest value,
/// f32 plans), a block written into another GPU pool reads back bit for bit, and a pass that
/// continues from moved blocks gives the logits of a pass that computed them itself (1e-4).
/// Then over the transfer protocol between two GPU schedulers, socket and shared memory: the
/// decode instance's greedy tokens are a mixed GPU instance's.
#[test]
fn kv_blocks_move_between_gpu_instances() {
    use runtime::disagg::transfer::{Identity, Options};
    use runtime::scheduler::{Scheduler, SchedulerConfig};
    let Some(arch) = device() else { return };
    let options = EngineOptions {
        max_context: 256,
        max_batch_tokens: 64,
        max_num_seqs: 4,
        block_size: 16,
        kv_blocks: Some(48),
    };
    let path = cuda_plan("llama", arch, DType::F32);
    let gpu_engine = || {
        GpuEngine::new(
            LoadedPlan::load(&path).expect("loading"),
            0,
            options.clone(),
        )
        .expect("uploading the plan")
    };
    let cpu_plan = common::compiled(&common::golden("tiny/llama"), DType::F32);
    let mut cpu = common::engine_with(&cpu_plan, options.clone());
    let (mut g1, mut g2) = (gpu_engine(), gpu_engine());
    let prompt = tokens(37, 5);
    let table: Vec<u32> = vec![3, 5, 7];
    fn pass<'a>(blocks: &'a [u32], start: usize, tokens: &'a [u32]) -> Vec<SeqChunk<'a>> {
        vec![SeqChunk {
            blocks,
            start,
            tokens,
            logits: Logits::Last,
        }]
    }
    let g1_logits = g1
        .forward_batch(&pass(&table, 0, &prompt))
        .expect("GPU pass")
        .to_vec();
    cpu.forward_batch(&pass(&table, 0, &prompt))
        .expect("CPU pass");
    let block_bytes = cpu.kv_pool().bytes_per_block();
    let read_gpu = |engine: &GpuEngine, block: u32| {
        let mut bytes = vec![0u8; block_bytes];
        engine.read_kv_block(block, &mut bytes).expect("GPU read");
        bytes
    };
    let as_f32 = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let mut moved = vec![];
    for &block in &table[..2] {
        let bytes = read_gpu(&g1, block);
        let mut want = vec![0u8; block_bytes];
        cpu.kv_pool()
            .read_block(block, &mut want)
            .expect("CPU read");
        let (got, want) = (as_f32(&bytes), as_f32(&want));
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "block {block}: GPU against CPU {worst} of {scale}"
        );
        moved.push(bytes);
    }
    // Into another pool at other blocks, and back.
    let other: Vec<u32> = vec![10, 11, 12];
    for (bytes, &block) in moved.iter().zip(&other) {
        g2.write_kv_block(block, bytes).expect("GPU write");
        assert_eq!(&read_gpu(&g2, block), bytes, "block {block} read back");
    }
    assert!(
        g2.write_kv_block(99, &moved[0]).is_err(),
        "a block past the pool"
    );
    assert!(
        g2.read_kv_block(0, &mut [0u8; 12]).is_err(),
        "a short buffer"
    );
    // The rest of the prompt on the moved blocks: the logits of g1's whole-prompt pass.
    let g2_logits = g2
        .forward_batch(&pass(&other, 32, &prompt[32..]))
        .expect("GPU pass")
        .to_vec();
    common::check_logits(
        "continued from moved blocks",
        &g2_logits,
        &g1_logits,
        cpu.vocab_size(),
        1e-4,
    );

    // Over the protocol.
    let config = SchedulerConfig {
        max_num_seqs: 4,
        max_waiting: 16,
        prefix_caching: true,
        speculative: None,
    };
    let identity = Identity {
        plan: LoadedPlan::load(&path).expect("loading").identity(),
        block_size: 16,
        block_bytes,
    };
    let prefill = Scheduler::start(Box::new(gpu_engine()), config.clone());
    let mixed = Scheduler::start(Box::new(gpu_engine()), config.clone());
    let rt = transfer_runtime();
    let addr = serve_prefill(&rt, prefill.clone(), &identity, Options::default());
    for shared_memory in [false, true] {
        let decode = Scheduler::start(Box::new(gpu_engine()), config.clone());
        for (i, len) in [70usize, 33, 100].into_iter().enumerate() {
            let prompt = tokens(len, 40 + i as u32 + 10 * shared_memory as u32);
            let options = Options {
                shared_memory,
                ..Options::default()
            };
            let what = format!("prompt of {len}, shared memory {shared_memory}");
            move_and_continue(
                &rt,
                [&mixed, &decode],
                &addr,
                &identity,
                &options,
                prompt,
                &what,
            );
        }
    }
}

/// Names the plan a child process serves as the prefill instance of
/// `kv_blocks_move_between_gpu_processes`.
const PREFILL_PLAN_VAR: &str = "FDRT_TEST_GPU_PREFILL_PLAN";
/// What the child prints before its transfer address.
const PREFILL_AT: &str = "prefill instance at ";

/// Options and scheduler settings the two-process test's instances share.
fn ipc_engine_options() -> EngineOptions {
    EngineOptions {
        max_context: 256,
        max_batch_tokens: 64,
        max_num_seqs: 4,
        block_size: 16,
        kv_blocks: Some(48),
    }
}

fn ipc_scheduler_config() -> runtime::scheduler::SchedulerConfig {
    runtime::scheduler::SchedulerConfig {
        max_num_seqs: 4,
        max_waiting: 16,
        prefix_caching: true,
        speculative: None,
    }
}

/// The prefill instance of `kv_blocks_move_between_gpu_processes`, run by that test as a child
/// process of this binary (device memory is exported to another process only): serves the KV
/// transfers of the plan it is given on a free loopback port, prints the address, and stops
/// when its standard input closes. Does nothing when run on its own.
#[test]
#[ignore = "the child process of kv_blocks_move_between_gpu_processes"]
fn gpu_prefill_instance_of_another_process() {
    use runtime::disagg::transfer::Options;
    use runtime::scheduler::Scheduler;
    let Ok(path) = std::env::var(PREFILL_PLAN_VAR) else {
        return;
    };
    let plan = LoadedPlan::load(std::path::Path::new(&path)).expect("loading");
    let identity = runtime::server::disagg::identity(&plan, 16);
    let engine = GpuEngine::new(plan, 0, ipc_engine_options()).expect("uploading the plan");
    let options = Options {
        device: Some(engine.device_link()),
        ..Options::default()
    };
    let scheduler = Scheduler::start(Box::new(engine), ipc_scheduler_config());
    let rt = transfer_runtime();
    let addr = serve_prefill(&rt, scheduler, &identity, options);
    println!("{PREFILL_AT}{addr}");
    use std::io::Read;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// GPU instances in two processes on one device: the blocks go from the prefill instance's
/// pool into the decode instance's device region and on into its pool, device to device, and
/// the decode instance's greedy answers are those of one instance that computed the prompts
/// itself. Without a device on the decode side the same transfer goes through host shared
/// memory; two instances in one process (where device memory is not exported) fall back to it
/// too.
#[test]
fn kv_blocks_move_between_gpu_processes() {
    use runtime::disagg::transfer::Options;
    use runtime::disagg::TransferPath;
    use runtime::scheduler::Scheduler;
    use std::io::BufRead;
    let Some(arch) = device() else { return };
    let path = cuda_plan("llama", arch, DType::F32);
    let mut child = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .args([
            "--exact",
            "gpu_prefill_instance_of_another_process",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(PREFILL_PLAN_VAR, &path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the prefill process");
    // Its address, or a failure after a deadline (a child that dies closes its output).
    let stdout = child.stdout.take().expect("its output");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // Anywhere in the line: the test harness prints its own "test NAME ... " first,
            // on the same line.
            if let Some((_, addr)) = line.split_once(PREFILL_AT) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let child_addr = rx.recv_timeout(std::time::Duration::from_secs(120));
    let child_addr = match child_addr {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            panic!("the prefill process did not start");
        }
    };

    let plan = LoadedPlan::load(&path).expect("loading");
    let identity = runtime::server::disagg::identity(&plan, 16);
    let gpu_engine = || {
        GpuEngine::new(
            LoadedPlan::load(&path).expect("loading"),
            0,
            ipc_engine_options(),
        )
        .expect("uploading the plan")
    };
    let mixed = Scheduler::start(Box::new(gpu_engine()), ipc_scheduler_config());
    let decode_engine = gpu_engine();
    let link = decode_engine.device_link();
    let decode = Scheduler::start(Box::new(decode_engine), ipc_scheduler_config());
    let rt = transfer_runtime();
    // A prefill instance in this process, for the fallback.
    let here_engine = gpu_engine();
    let here_options = Options {
        device: Some(here_engine.device_link()),
        ..Options::default()
    };
    let here_scheduler = Scheduler::start(Box::new(here_engine), ipc_scheduler_config());
    let here_addr = serve_prefill(&rt, here_scheduler, &identity, here_options);
    let cases = [
        (&child_addr, Some(link.clone()), TransferPath::Device),
        (&child_addr, None, TransferPath::SharedMemory),
        (&here_addr, Some(link.clone()), TransferPath::SharedMemory),
        // Twice more through device memory: kept regions on both sides serve again.
        (&child_addr, Some(link.clone()), TransferPath::Device),
        (&child_addr, Some(link), TransferPath::Device),
    ];
    for (i, (addr, device, path)) in cases.into_iter().enumerate() {
        let len = [70usize, 100, 33, 90, 50][i];
        let options = Options {
            device,
            ..Options::default()
        };
        let what = format!("case {i}: prompt of {len}, {path:?} expected");
        let took = move_and_continue(
            &rt,
            [&mixed, &decode],
            addr,
            &identity,
            &options,
            tokens(len, 70 + i as u32),
            &what,
        );
        assert_eq!(took, path, "{what}: the path the blocks took");
    }
    drop(child.stdin.take());
    let status = child.wait().expect("the prefill process");
    assert!(status.success(), "the prefill process: {status}");
}

/// Moves `prompt`'s leading full blocks from the prefill instance at `addr` into the decode
/// instance's cache (`[mixed, decode]`), and checks that it then answers greedily as the mixed
/// instance does, with the moved blocks as a cache hit. Returns the path the blocks took.
fn move_and_continue(
    rt: &tokio::runtime::Runtime,
    [mixed, decode]: [&runtime::scheduler::Scheduler; 2],
    addr: &str,
    identity: &runtime::disagg::transfer::Identity,
    options: &runtime::disagg::transfer::Options,
    prompt: Vec<u32>,
    what: &str,
) -> runtime::disagg::TransferPath {
    let request = common::greedy_request(12);
    let (want, _) = common::collect_stream(
        mixed
            .submit(prompt.clone(), request.clone())
            .expect("submit"),
    );
    let blocks = (prompt.len() - 1) / 16;
    let prefix = prompt[..blocks * 16].to_vec();
    let held = rt
        .block_on(decode.cached_blocks(prefix.clone()))
        .expect("cached");
    let fetched = rt
        .block_on(runtime::disagg::transfer::fetch_prefix(
            addr, identity, prefix, held, options,
        ))
        .unwrap_or_else(|e| panic!("{what}: fetch: {e}"));
    let path = fetched.path;
    assert_eq!(fetched.blocks.len(), blocks, "{what}");
    let seated = rt
        .block_on(decode.write_cached_blocks(fetched))
        .unwrap_or_else(|e| panic!("{what}: seat: {e}"));
    assert_eq!(seated, blocks, "{what}");
    let before = decode.stats().prefix_cache_hit_tokens;
    let (got, _) = common::collect_stream(decode.submit(prompt, request).expect("submit"));
    assert_eq!(
        (decode.stats().prefix_cache_hit_tokens - before) as usize,
        blocks * 16,
        "{what}: the moved blocks were used"
    );
    assert_eq!(got, want, "{what}");
    path
}

/// A runtime for the transfer tests' async side.
fn transfer_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Serves `scheduler`'s KV transfers as a prefill instance on a free loopback port; returns
/// the address.
fn serve_prefill(
    rt: &tokio::runtime::Runtime,
    scheduler: runtime::scheduler::Scheduler,
    identity: &runtime::disagg::transfer::Identity,
    options: runtime::disagg::transfer::Options,
) -> String {
    use runtime::disagg::{InstanceState, Role};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    rt.spawn(runtime::disagg::transfer::serve(
        listener,
        scheduler,
        std::sync::Arc::new(InstanceState::new(identity.clone(), Role::Prefill)),
        options,
    ));
    addr
}
