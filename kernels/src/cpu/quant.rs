//! Quantized weights: their packed layout, the packer, and the matmul and embedding kernels that
//! read them. Shapes: a weight is `[N, K]`, activations `[T, K]`, outputs `[T, N]`.
//!
//! A quantized weight is integer (8, 4 or 2 bits) or FP8 e4m3 codes with a scale per group of
//! `G` consecutive k of one row (`G = K` is one scale per row), plus a minimum per group when
//! asymmetric. The value of element `[n, k]`, with `g = k / G`:
//! - symmetric integer, b bits: `w = (code - 2^(b-1)) * scale[n, g]` (GGUF Q8_0 and Q4_0);
//! - asymmetric integer: `w = code * scale[n, g] + min[n, g]` (GGUF Q4_1);
//! - FP8: `w = e4m3(code) * scale[n, g]`.
//!
//! Scales and minimums are f16, so the product `q * scale` is exact in f32 (at most 8 + 11
//! significant bits) and a weight is rounded at most once, by the add of the minimum: every
//! path (kernel, embedding, reference, GGUF's own dequantization) gets the same f32 value.
//!
//! Layout (what the compiler writes and the kernels stream, never repacked): the matmul's panels
//! of P rows (see [`PackedLayout`]). Codes: panel after panel; inside a panel, for each k in
//! order, the P codes of its rows packed into `P * b / 8` bytes, where with `c = 8 / b` codes per
//! byte, bits `[s*b, (s+1)*b)` of byte `j` hold row `s * (P / c) + j` (so unpacking slot s of
//! consecutive bytes gives consecutive rows). Scales: for each panel, for each group, the P
//! scales of its rows; minimums likewise. Rows past N (the last panel's padding) have zero codes
//! and zero scales.
//!
//! The matmul never forms dequantized weights. Within a group of G k, a weight is
//! `code * scale + offset` with one scale and one offset for the group (the offset is the
//! minimum, `-2^(b-1) * scale` when symmetric, 0 for FP8), so a group's contribution to an
//! output is `scale * sum(code * x) + offset * sum(x)`: the kernels unpack codes to f32 in
//! registers and run one FMA chain per group and output, then fold it in with the group's scale
//! and the group's activation sum (computed once per token row). Register tiles hold up to 6
//! token rows (prefill) or four panels of one row (decode, for independent FMA chains). Every
//! output sums the same terms in the same order for any T, tile or thread split, so the kernel
//! is batch invariant like the dense panel path.
//!
//! Activation quantization (the A8 and FP8 schemes) happens per token row at run time: the row
//! is divided by `max|x| / 127` (or `/ 448`) and rounded to the int8 (or e4m3) grid; the matmul
//! then runs on those rounded values and multiplies each output row by its scale. The products of
//! integer or e4m3 values with the weights are what an integer or FP8 kernel forms; this CPU path
//! accumulates them in f32 (see `docs/QUANTIZATION.md`).
//!
//! The integer path: integer codes whose groups are whole blocks of 32 k (every format the
//! compiler writes for the usual shapes) run on 16-bit integer activations instead. Each token
//! row is rounded per block of 32 k to int16 with its own scale `max|x| / 32767` (A16: a relative
//! error of at most 2^-16 of the block's largest value, finer than an f16 or bf16 activation), or
//! to the row's int8 grid (A8). Codes and activations are then multiplied in pairs of k and summed
//! in i32 (`vpmaddwd`: 16 products per instruction on AVX2 where the f32 path needs a conversion
//! and an FMA per 8), exactly; each block's i32 sum is scaled by the block's activation scale into
//! the group's f32 sum, which is folded in with the group's weight scale and offset as above.
//! Every output row still sums the same terms in the same order for any T, tile or thread split.

use super::matmul::{for_each_task, Args};
use super::pool::{self, SharedSlice};
use super::simd::{load_n, run_simd, store_n, Simd, SimdTask, CODE_E4M3};
use super::{check_rows, runnable_isa, PackedLayout, SharedMut};
use crate::KernelError;
use half::f16;
use ir_types::{ActQuant, CodeFormat, CpuIsa};
use std::cell::RefCell;

/// How a quantized weight's codes and scales are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantFormat {
    pub codes: CodeFormat,
    /// K elements per scale; equal to K for one scale per row.
    pub group: usize,
    /// Whether each group has a minimum (integer codes only).
    pub asymmetric: bool,
}

impl QuantFormat {
    /// Checks the format on a `[rows, cols]` weight: a code width the kernels read, a positive
    /// group that divides `cols`, minimums only with integer codes.
    pub fn check(&self, cols: usize) -> Result<(), String> {
        match self.codes {
            CodeFormat::Int(8 | 4 | 2) | CodeFormat::Fp8E4M3 => {}
            CodeFormat::Int(b) => return Err(format!("{b}-bit codes are not supported")),
        }
        if self.asymmetric && self.codes == CodeFormat::Fp8E4M3 {
            return Err("fp8 codes are symmetric".into());
        }
        if self.group == 0 || !cols.is_multiple_of(self.group) {
            return Err(format!(
                "group size {} does not divide the {cols} columns",
                self.group
            ));
        }
        Ok(())
    }

    /// Groups per row of a `[_, cols]` weight.
    pub fn groups(&self, cols: usize) -> usize {
        cols / self.group.max(1)
    }

    /// The offset subtracted from a symmetric integer code.
    fn offset(&self) -> f32 {
        match (self.codes, self.asymmetric) {
            (CodeFormat::Int(b), false) => (1u32 << (b - 1)) as f32,
            _ => 0.0,
        }
    }

    /// The weight value of `code` with this group's `scale` and `min` (see the module doc).
    #[inline(always)]
    pub fn value(&self, code: u8, scale: f32, min: f32) -> f32 {
        match self.codes {
            CodeFormat::Fp8E4M3 => e4m3_to_f32(code) * scale,
            CodeFormat::Int(_) if self.asymmetric => code as f32 * scale + min,
            CodeFormat::Int(_) => (code as f32 - self.offset()) * scale,
        }
    }
}

/// Sizes of the three parts of a packed quantized weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSizes {
    pub code_bytes: usize,
    /// f16 values each, of scales and (when asymmetric, else 0) of minimums.
    pub scales: usize,
    pub mins: usize,
}

/// Bytes and value counts of an `[n, k]` weight of `format` in panels of `layout`.
pub fn quant_sizes(format: &QuantFormat, layout: PackedLayout, n: usize, k: usize) -> QuantSizes {
    let rows = n.div_ceil(layout.panel()).saturating_mul(layout.panel());
    let scales = rows.saturating_mul(format.groups(k));
    QuantSizes {
        code_bytes: rows.saturating_mul(k) / 8 * format.codes.bits() as usize,
        scales,
        mins: if format.asymmetric { scales } else { 0 },
    }
}

/// Where the parts of a quantized weight stored as one byte buffer start: packed codes at 0, f16
/// scales at `scales_offset`, f16 minimums at `mins_offset`, each at a multiple of 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantBytes {
    pub scales_offset: usize,
    pub mins_offset: usize,
    pub len: usize,
}

impl QuantBytes {
    pub fn of(format: &QuantFormat, layout: PackedLayout, n: usize, k: usize) -> QuantBytes {
        const ALIGN: usize = 64;
        let sizes = quant_sizes(format, layout, n, k);
        let scales_offset = sizes.code_bytes.next_multiple_of(ALIGN);
        let mins_offset = (scales_offset + 2 * sizes.scales).next_multiple_of(ALIGN);
        QuantBytes {
            scales_offset,
            mins_offset,
            len: mins_offset + 2 * sizes.mins,
        }
    }

    /// The buffer of `packed` in this layout (what the compiler writes).
    pub fn write(&self, packed: &PackedQuant) -> Vec<u8> {
        let mut bytes = vec![0u8; self.len];
        bytes[..packed.codes.len()].copy_from_slice(&packed.codes);
        for (i, s) in packed.scales.iter().enumerate() {
            bytes[self.scales_offset + 2 * i..][..2].copy_from_slice(&s.to_le_bytes());
        }
        for (i, m) in packed.mins.iter().enumerate() {
            bytes[self.mins_offset + 2 * i..][..2].copy_from_slice(&m.to_le_bytes());
        }
        bytes
    }
}

/// A quantized `[rows, cols]` weight in the panel layout (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct QuantWeight<'a> {
    pub format: QuantFormat,
    pub layout: PackedLayout,
    pub rows: usize,
    pub cols: usize,
    pub codes: &'a [u8],
    pub scales: &'a [f16],
    /// Empty when symmetric.
    pub mins: &'a [f16],
}

impl<'a> QuantWeight<'a> {
    /// The weight stored in `bytes` as [`QuantBytes`] lays it out (little-endian f16), checked
    /// for size and alignment.
    pub fn from_bytes(
        format: QuantFormat,
        layout: PackedLayout,
        rows: usize,
        cols: usize,
        bytes: &'a [u8],
    ) -> Result<QuantWeight<'a>, KernelError> {
        const NAME: &str = "quantized weight";
        format
            .check(cols)
            .map_err(|m| KernelError::shape(NAME, m))?;
        let parts = QuantBytes::of(&format, layout, rows, cols);
        let sizes = quant_sizes(&format, layout, rows, cols);
        if bytes.len() != parts.len {
            return Err(KernelError::shape(
                NAME,
                format!("{} bytes, {rows} x {cols} needs {}", bytes.len(), parts.len),
            ));
        }
        let halves = |offset: usize, n: usize| -> Result<&'a [f16], KernelError> {
            let part = &bytes[offset..offset + 2 * n];
            if !cfg!(target_endian = "little") || part.as_ptr().align_offset(2) != 0 {
                return Err(KernelError::shape(NAME, "scales are misaligned"));
            }
            // SAFETY: `part` holds 2n initialized bytes at 2-byte alignment, and f16 is a
            // plain 16-bit value stored little-endian, this machine's order (checked above).
            Ok(unsafe { std::slice::from_raw_parts(part.as_ptr() as *const f16, n) })
        };
        Ok(QuantWeight {
            format,
            layout,
            rows,
            cols,
            codes: &bytes[..sizes.code_bytes],
            scales: halves(parts.scales_offset, sizes.scales)?,
            mins: halves(parts.mins_offset, sizes.mins)?,
        })
    }

    pub fn check(&self, kernel: &'static str) -> Result<(), KernelError> {
        self.format
            .check(self.cols)
            .map_err(|m| KernelError::shape(kernel, m))?;
        // A power-of-two panel splits into vectors whose rows read uniform runs of bytes.
        if !self.layout.panel().is_power_of_two() {
            return Err(KernelError::shape(
                kernel,
                format!(
                    "quantized weights need a panel of 8, 16, 32 or 64 rows, not {}",
                    self.layout.panel()
                ),
            ));
        }
        let want = quant_sizes(&self.format, self.layout, self.rows, self.cols);
        if self.codes.len() != want.code_bytes
            || self.scales.len() != want.scales
            || self.mins.len() != want.mins
        {
            return Err(KernelError::shape(
                kernel,
                format!(
                    "quantized weight has {} code bytes, {} scales, {} minimums; {} x {} needs {}, {}, {}",
                    self.codes.len(),
                    self.scales.len(),
                    self.mins.len(),
                    self.rows,
                    self.cols,
                    want.code_bytes,
                    want.scales,
                    want.mins
                ),
            ));
        }
        Ok(())
    }

    /// Rows `row0..row0 + rows` as a weight of their own, when both are whole panels (a panel's
    /// codes, scales and minimums are contiguous runs of each part): one expert of stacked
    /// experts. None when they are not, or lie past the weight.
    pub fn panel_rows(&self, row0: usize, rows: usize) -> Option<QuantWeight<'a>> {
        let p = self.layout.panel();
        let end = row0.checked_add(rows)?;
        if !row0.is_multiple_of(p) || !rows.is_multiple_of(p) || end > self.rows {
            return None;
        }
        let before = quant_sizes(&self.format, self.layout, row0, self.cols);
        let part = quant_sizes(&self.format, self.layout, rows, self.cols);
        let slice = |all: &'a [f16], start: usize, len: usize| all.get(start..start + len);
        Some(QuantWeight {
            rows,
            codes: self
                .codes
                .get(before.code_bytes..before.code_bytes + part.code_bytes)?,
            scales: slice(self.scales, before.scales, part.scales)?,
            mins: slice(self.mins, before.mins, part.mins)?,
            ..*self
        })
    }

    /// The code of element `[row, col]`.
    fn code(&self, row: usize, col: usize) -> u8 {
        let p = self.layout.panel();
        let bits = self.format.codes.bits() as usize;
        let per_byte = 8 / bits;
        let bytes_per_k = p / per_byte;
        let (panel, j) = (row / p, row % p);
        let at = (panel * self.cols + col) * bytes_per_k + j % bytes_per_k;
        let slot = j / bytes_per_k;
        (self.codes[at] >> (slot * bits)) & (((1u32 << bits) - 1) as u8)
    }

    /// Element `[row, col]` as f32, exactly the value the kernels compute with.
    pub fn get_f32(&self, row: usize, col: usize) -> f32 {
        let p = self.layout.panel();
        let groups = self.format.groups(self.cols);
        let s = ((row / p) * groups + col / self.format.group) * p + row % p;
        let min = self.mins.get(s).map_or(0.0, |m| m.to_f32());
        self.format
            .value(self.code(row, col), self.scales[s].to_f32(), min)
    }
}

/// A quantized matrix before packing: one code per element and one scale (and minimum) per
/// group, row-major: what a quantizer produces and what GGUF blocks hold.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`, each below `2^bits`.
    pub codes: Vec<u8>,
    /// `[rows, cols / group]`.
    pub scales: Vec<f16>,
    /// `[rows, cols / group]` when asymmetric, else empty.
    pub mins: Vec<f16>,
}

/// A packed quantized weight's three parts, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedQuant {
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
    pub mins: Vec<f16>,
}

impl QuantMatrix {
    /// The matrix in `layout`'s panels (see the module documentation).
    pub fn pack(&self, layout: PackedLayout) -> Result<PackedQuant, KernelError> {
        const NAME: &str = "quant pack";
        let (n, k) = (self.rows, self.cols);
        self.format
            .check(k)
            .map_err(|m| KernelError::shape(NAME, m))?;
        let groups = self.format.groups(k);
        let bits = self.format.codes.bits() as usize;
        if self.codes.len() != n * k
            || self.scales.len() != n * groups
            || self.mins.len()
                != if self.format.asymmetric {
                    n * groups
                } else {
                    0
                }
            || self.codes.iter().any(|&c| (c as u32) >> bits != 0)
        {
            return Err(KernelError::shape(
                NAME,
                format!(
                    "codes, scales or minimums do not fit a {n} x {k} matrix of {bits}-bit codes"
                ),
            ));
        }
        let p = layout.panel();
        let sizes = quant_sizes(&self.format, layout, n, k);
        let per_byte = 8 / bits;
        let bytes_per_k = p / per_byte;
        let mut codes = vec![0u8; sizes.code_bytes];
        let mut scales = vec![f16::ZERO; sizes.scales];
        let mut mins = vec![f16::ZERO; sizes.mins];
        for row in 0..n {
            let (panel, j) = (row / p, row % p);
            let (byte, slot) = (j % bytes_per_k, j / bytes_per_k);
            for col in 0..k {
                let at = (panel * k + col) * bytes_per_k + byte;
                codes[at] |= self.codes[row * k + col] << (slot * bits);
            }
            for g in 0..groups {
                let s = (panel * groups + g) * p + j;
                scales[s] = self.scales[row * groups + g];
                if self.format.asymmetric {
                    mins[s] = self.mins[row * groups + g];
                }
            }
        }
        Ok(PackedQuant {
            codes,
            scales,
            mins,
        })
    }

    /// Element `[row, col]` as f32 (see [`QuantFormat::value`]).
    pub fn get_f32(&self, row: usize, col: usize) -> f32 {
        let g = row * self.format.groups(self.cols) + col / self.format.group;
        let min = self.mins.get(g).map_or(0.0, |m| m.to_f32());
        self.format.value(
            self.codes[row * self.cols + col],
            self.scales[g].to_f32(),
            min,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// FP8 e4m3

/// The e4m3 value of `code`: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
/// subnormal (`m * 2^-9`). The two NaN codes (0x7f, 0xff) give NaN.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[code as usize]
}

static E4M3_TABLE: [f32; 256] = {
    let mut table = [0f32; 256];
    let mut c = 0;
    while c < 256 {
        let (e, m) = ((c >> 3) & 15, c & 7);
        let magnitude = if c & 0x7f == 0x7f {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0
        } else {
            // (8 + m) * 2^(e - 10), built from powers of two exactly.
            let mut v = (8 + m) as f32;
            let mut i = 0;
            while i < 10 {
                v /= 2.0;
                i += 1;
            }
            let mut i = 0;
            while i < e {
                v *= 2.0;
                i += 1;
            }
            v
        };
        table[c] = if c & 0x80 != 0 { -magnitude } else { magnitude };
        c += 1;
    }
    table
};

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `v` rounded to the nearest e4m3 value (ties to even), saturating at +-448.
#[inline(always)]
pub fn round_to_e4m3(v: f32) -> f32 {
    let a = v.abs();
    let r = if a >= E4M3_MAX {
        E4M3_MAX
    } else if a < 1.0 / 64.0 {
        // Subnormal range: a fixed quantum of 2^-9.
        (a * 512.0).round_ties_even() / 512.0
    } else {
        // Normal range: keep 3 of f32's 23 mantissa bits, rounding to nearest even.
        let b = a.to_bits();
        f32::from_bits((b + 0x7_ffff + ((b >> 20) & 1)) & !0xf_ffff)
    };
    if v.is_nan() {
        v
    } else {
        r.copysign(v)
    }
}

/// The e4m3 code of an e4m3 value `v` (as returned by [`round_to_e4m3`]).
pub fn e4m3_code(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    let magnitude = if a < 1.0 / 64.0 {
        (a * 512.0) as u8
    } else {
        let b = a.to_bits();
        let e = ((b >> 23) as i32 - 127 + 7) as u8;
        (e << 3) | ((b >> 20) & 7) as u8
    };
    sign | magnitude
}

// ---------------------------------------------------------------------------------------------
// Activation quantization

/// Quantizes the K values of one token row into `q` (values on the int8 or e4m3 grid, as f32) and
/// returns the row's scale: `x ~ q * scale`. An all-zero row has scale 0 and zero values.
#[inline(always)]
pub fn quantize_activation_row(act: ActQuant, x: &[f32], q: &mut [f32]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (limit, round): (f32, fn(f32) -> f32) = match act {
        ActQuant::None => {
            q.copy_from_slice(x);
            return 1.0;
        }
        ActQuant::Int8PerToken => (127.0, f32::round),
        ActQuant::Fp8PerToken => (E4M3_MAX, round_to_e4m3),
    };
    let scale = amax / limit;
    if scale == 0.0 {
        q.fill(0.0);
        return 0.0;
    }
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round(v / scale).clamp(-limit, limit);
    }
    scale
}

// ---------------------------------------------------------------------------------------------
// Matmul

/// Per-call activation buffers, kept per thread so that a decode step allocates nothing.
#[derive(Default)]
struct ActBuffers {
    /// f32 activations the kernel reads when they are not the caller's: the A8 and FP8 rows on
    /// their grid (f32 path), or the int16 rows times their block scales (the integer math on a
    /// panel the integer kernel does not read).
    xf: Vec<f32>,
    /// Per token row scale of the f32 path's A8 and FP8 rows.
    row_scales: Vec<f32>,
    /// `[T, groups]` sums of each group's activations (integer codes only).
    sums: Vec<f32>,
    /// `[T, K]` activations rounded to int16 (integer path).
    xi: Vec<i16>,
    /// `[T, K / ACT_BLOCK]` scales of `xi`'s blocks.
    block_scales: Vec<f32>,
}

thread_local! {
    static ACTS: RefCell<ActBuffers> = RefCell::new(ActBuffers::default());
}

/// K per activation scale on the integer path: 32 products of a 16-bit activation and an 8-bit
/// code sum to at most 2^28, far from i32's limit.
const ACT_BLOCK: usize = 32;
/// The int16 grid of A16 activations on the integer path.
const ACT_I16_LIMIT: f32 = 32767.0;

/// Whether `matmul_quant` takes the integer path for this weight format and activation scheme.
fn takes_integer_path(format: &QuantFormat, act: ActQuant, k: usize) -> bool {
    matches!(format.codes, CodeFormat::Int(_))
        && matches!(act, ActQuant::None | ActQuant::Int8PerToken)
        && k.is_multiple_of(ACT_BLOCK)
        && format.group.is_multiple_of(ACT_BLOCK)
}

/// The ISA whose integer kernel reads panels of `panel` rows (two row vectors), if any.
fn integer_kernel_isa(isa: CpuIsa, panel: usize) -> Option<CpuIsa> {
    match (isa, panel) {
        (CpuIsa::Avx512, 32) => Some(CpuIsa::Avx512),
        (CpuIsa::Avx512 | CpuIsa::Avx2, 16) => Some(CpuIsa::Avx2),
        (CpuIsa::Portable, 16) => Some(CpuIsa::Portable),
        _ => None,
    }
}

/// Rounds one token row for the integer path: `x[k] ~ q[k] * scales[k / ACT_BLOCK]`. A16 takes
/// each block's own int16 grid; A8 the row's int8 grid (every block gets the row's scale). A
/// block holding a non-finite value gets a NaN scale, so that its outputs are NaN as in f32.
pub fn quantize_row_i16(act: ActQuant, x: &[f32], q: &mut [i16], scales: &mut [f32]) {
    let row_scale = match act {
        ActQuant::Int8PerToken => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            Some(amax / 127.0)
        }
        _ => None,
    };
    for ((x, q), scale) in x
        .chunks(ACT_BLOCK)
        .zip(q.chunks_mut(ACT_BLOCK))
        .zip(scales.iter_mut())
    {
        let (s, limit) = match row_scale {
            Some(s) => (s, 127.0),
            None => (
                x.iter().fold(0f32, |m, v| m.max(v.abs())) / ACT_I16_LIMIT,
                ACT_I16_LIMIT,
            ),
        };
        *scale = if x.iter().all(|v| v.is_finite()) {
            s
        } else {
            f32::NAN
        };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = if s > 0.0 {
                (v / s).round().clamp(-limit, limit) as i16
            } else {
                0
            };
        }
    }
}

/// How far ahead of each unit's codes the kernel prefetches: about 300 cycles of decode at
/// 8 bytes per k of a 16-row 4-bit panel, which covers a memory access.
const PREFETCH_AHEAD: usize = 1024;
/// Most token rows one register tile holds (prefill).
const MAX_TILE_ROWS: usize = 6;
/// Token rows per task when panels alone give too few tasks: 48 rows of K = 1536 in f32 are
/// 288 KB, within a core's L2.
const T_BLOCK: usize = 48;

/// `out[T, N] = act(x)[T, K] @ w[N, K]^T (+ bias[N])`, where `act` quantizes each token row
/// for the A8 and FP8 schemes and is the identity for A16 (see the module documentation).
///
/// Shapes: `x` `[T, K]` f32 with row stride `x_stride`; `w` quantized `[N, K]` in panels;
/// `bias` `[N]` f32; `out` `[T, N]` f32 with row stride `out_stride`. An output row is
/// bit-identical whatever T, the other rows and the thread count are.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quant(
    isa: CpuIsa,
    act: ActQuant,
    x: &[f32],
    x_stride: usize,
    t: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "matmul_quant";
    w.check(NAME)?;
    let (n, k) = (w.rows, w.cols);
    if super::matmul::check_matmul(NAME, x, x_stride, t, n, k, bias, out, out_stride)?
        == super::matmul::Shape::Done
    {
        return Ok(());
    }
    let isa = runnable_isa(isa);
    let mut buffers = ACTS.take();
    let args = Args {
        x,
        x_stride,
        t,
        n,
        k,
        bias,
        out: SharedMut(out.as_mut_ptr()),
        out_stride,
    };
    if takes_integer_path(&w.format, act, k) {
        integer_path(isa, act, &args, w, &mut buffers);
    } else {
        float_path(isa, act, &args, w, &mut buffers);
        if act != ActQuant::None {
            // The f32 path ran on the rows' grid values: scale each output row, then add the bias.
            for (row, &s) in out
                .chunks_mut(out_stride.max(1))
                .zip(&buffers.row_scales[..t])
            {
                match bias {
                    Some(b) => {
                        for (o, &b) in row[..n].iter_mut().zip(b) {
                            *o = *o * s + b;
                        }
                    }
                    None => row[..n].iter_mut().for_each(|o| *o *= s),
                }
            }
        }
    }
    ACTS.set(buffers);
    Ok(())
}

/// The integer path (module doc): rounds the rows to int16 blocks, then runs the integer kernel,
/// or the f32 kernel on the same rounded values where no integer kernel reads the panel.
fn integer_path(isa: CpuIsa, act: ActQuant, args: &Args, w: &QuantWeight, b: &mut ActBuffers) {
    let (t, k) = (args.t, args.k);
    let blocks = k / ACT_BLOCK;
    let groups = w.format.groups(k);
    let blocks_per_group = w.format.group / ACT_BLOCK;
    b.xi.resize(t * k, 0);
    b.block_scales.resize(t * blocks, 0.0);
    b.sums.resize(t * groups, 0.0);
    let rows_per_task = (1 << 14) / k + 1;
    let (xi, block_scales, all_sums) = (
        SharedSlice::new(&mut b.xi),
        SharedSlice::new(&mut b.block_scales),
        SharedSlice::new(&mut b.sums),
    );
    pool::for_each(t.div_ceil(rows_per_task), |c| {
        let rows = c * rows_per_task..((c + 1) * rows_per_task).min(t);
        // SAFETY: task c alone touches rows c * rows_per_task.. of each buffer.
        let (q, scales, sums) = unsafe {
            (
                xi.slice(rows.start * k..rows.end * k),
                block_scales.slice(rows.start * blocks..rows.end * blocks),
                all_sums.slice(rows.start * groups..rows.end * groups),
            )
        };
        let rows = q
            .chunks_mut(k)
            .zip(scales.chunks_mut(blocks))
            .zip(sums.chunks_mut(groups));
        for (i, ((q, scales), sums)) in rows.enumerate() {
            let row = (c * rows_per_task + i) * args.x_stride;
            quantize_row_i16(act, &args.x[row..row + k], q, scales);
            // The offset's activation sums, of the rounded values: exact integer sums of
            // each block times its scale.
            for (g, sum) in sums.iter_mut().enumerate() {
                let blocks = g * blocks_per_group..(g + 1) * blocks_per_group;
                *sum = blocks.fold(0.0, |acc, blk| {
                    let block = &q[blk * ACT_BLOCK..(blk + 1) * ACT_BLOCK];
                    let ints: i32 = block.iter().map(|&v| v as i32).sum();
                    acc + ints as f32 * scales[blk]
                });
            }
        }
    });
    match integer_kernel_isa(isa, w.layout.panel()) {
        Some(isa) => {
            let acts = IntActs {
                q: &b.xi,
                scales: &b.block_scales,
            };
            run_tasks(isa, args, w, &b.sums, Some(acts));
        }
        None => {
            b.xf.resize(t * k, 0.0);
            for ((xf, q), scales) in
                b.xf.chunks_mut(k)
                    .zip(b.xi.chunks(k))
                    .zip(b.block_scales.chunks(blocks))
            {
                for ((xf, q), &s) in xf
                    .chunks_mut(ACT_BLOCK)
                    .zip(q.chunks(ACT_BLOCK))
                    .zip(scales)
                {
                    for (xf, &q) in xf.iter_mut().zip(q) {
                        *xf = q as f32 * s;
                    }
                }
            }
            let args = Args {
                x: &b.xf,
                x_stride: k,
                ..*args
            };
            run_tasks(isa, &args, w, &b.sums, None);
        }
    }
}

/// The f32 path: FP8 codes, groups that are not whole blocks, and FP8 activations. With A8 or
/// FP8 activations it leaves the outputs unscaled and without bias; `b.row_scales` holds the
/// rows' scales for the caller to apply.
fn float_path(isa: CpuIsa, act: ActQuant, args: &Args, w: &QuantWeight, b: &mut ActBuffers) {
    let (t, k) = (args.t, args.k);
    let (x, x_stride, kernel_bias) = if act == ActQuant::None {
        (args.x, args.x_stride, args.bias)
    } else {
        b.xf.resize(t * k, 0.0);
        b.row_scales.resize(t, 0.0);
        let rows_per_task = (1 << 14) / k + 1;
        let row_scales = SharedSlice::new(&mut b.row_scales);
        pool::for_each_chunk_mut(&mut b.xf, k * rows_per_task, |c, q| {
            let rows = c * rows_per_task..((c + 1) * rows_per_task).min(t);
            // SAFETY: task c alone touches these rows' scales.
            let s = unsafe { row_scales.slice(rows) };
            for (i, (q, s)) in q.chunks_mut(k).zip(s.iter_mut()).enumerate() {
                let row = (c * rows_per_task + i) * args.x_stride;
                *s = quantize_activation_row(act, &args.x[row..row + k], q);
            }
        });
        // The row scales multiply the outputs afterwards, the bias is added after that.
        (&b.xf[..], k, None)
    };
    let groups = w.format.groups(k);
    if w.format.codes != CodeFormat::Fp8E4M3 {
        // Integer codes carry an offset (the minimum, or -2^(b-1) * scale when symmetric), which
        // multiplies the sum of each group's activations: computed once per token row here.
        b.sums.resize(t * groups, 0.0);
        pool::for_each_chunk_mut(&mut b.sums, groups * 64, |c, chunk| {
            for (i, row_sums) in chunk.chunks_mut(groups).enumerate() {
                let row = &x[(c * 64 + i) * x_stride..][..k];
                for (sum, group) in row_sums.iter_mut().zip(row.chunks(w.format.group)) {
                    *sum = group.iter().fold(0.0, |acc, &v| acc + v);
                }
            }
        });
    }
    let kernel_args = Args {
        x,
        x_stride,
        bias: kernel_bias,
        ..*args
    };
    run_tasks(isa, &kernel_args, w, &b.sums, None);
}

/// Activations rounded for the integer kernel: `x[t, k] ~ q[t * K + k] * scales[t * K / ACT_BLOCK
/// + k / ACT_BLOCK]`.
#[derive(Clone, Copy)]
struct IntActs<'a> {
    q: &'a [i16],
    scales: &'a [f32],
}

/// Splits the matmul into tasks (ranges of panels x blocks of token rows) run with rayon. With
/// `int`, `isa` is the one [`integer_kernel_isa`] chose for the panel.
fn run_tasks(isa: CpuIsa, args: &Args, w: &QuantWeight, sums: &[f32], int: Option<IntActs>) {
    let panel = w.layout.panel();
    // AVX-512 vectors must tile the panel; an 8-wide panel runs on AVX2.
    let isa = if isa == CpuIsa::Avx512 && !panel.is_multiple_of(16) {
        CpuIsa::Avx2
    } else {
        isa
    };
    let n_panels = args.n.div_ceil(panel);
    let threads = pool::threads();
    // About 8 tasks per thread balance uneven cores; few token rows take panels four at a time.
    let tile = n_panels.div_ceil(threads * 8).max(1);
    let tile = if args.t < 4 {
        tile.next_multiple_of(4)
    } else {
        tile
    };
    let t_blocks = if args.t <= T_BLOCK {
        1
    } else {
        args.t.div_ceil(T_BLOCK)
    };
    let t_block = args.t.div_ceil(t_blocks);
    for_each_task(n_panels, tile, args.t, t_block, |panels, rows| {
        run_simd(
            isa,
            QuantTask {
                args,
                w,
                sums,
                int,
                panels,
                rows,
            },
        )
    });
}

/// Where one vector of `S::LANES` rows of a panel finds its codes in each k's bytes.
#[derive(Clone, Copy)]
struct RowVector<S: Simd> {
    /// First byte inside the k's `bytes_per_k`.
    byte: usize,
    shifts: S::Shifts,
}

/// What the kernels need to address a quantized weight, for vectors of `S::LANES` rows.
struct Decoder<S: Simd> {
    fp8: bool,
    /// Code bits mask (integer codes).
    mask: u32,
    /// How many consecutive bytes one vector reads (see [`Simd::load_codes`]).
    run: usize,
    /// Row vectors of a panel, `P / S::LANES` of them (at most 8).
    vectors: [RowVector<S>; 8],
}

impl<S: Simd> Decoder<S> {
    /// # Safety
    /// `S` must be runnable on this CPU; the layout's panel is a power of two that `S::LANES`
    /// divides (checked by `QuantWeight::check` and `run_tasks`).
    unsafe fn new(w: &QuantWeight) -> Decoder<S> {
        let p = w.layout.panel();
        let bits = w.format.codes.bits() as usize;
        let bytes_per_k = p * bits / 8;
        let run = bytes_per_k.min(S::LANES);
        let mut vectors = [RowVector {
            byte: 0,
            shifts: S::code_shifts(|_| 0),
        }; 8];
        for (v, vector) in vectors.iter_mut().enumerate().take(p / S::LANES) {
            // Row r sits in byte r % bytes_per_k, bit slot r / bytes_per_k (module doc).
            let first = v * S::LANES;
            *vector = RowVector {
                byte: first % bytes_per_k,
                shifts: S::code_shifts(|i| ((first + i) / bytes_per_k * bits) as u32),
            };
        }
        Decoder {
            fp8: w.format.codes == CodeFormat::Fp8E4M3,
            mask: (1u32 << bits) - 1,
            run,
            vectors,
        }
    }

    /// The weights' codes as f32 for row vector `v` at `p` (the k's bytes of a panel).
    #[inline(always)]
    unsafe fn load(&self, p: *const u8, v: usize) -> S::V {
        let vector = self.vectors[v];
        if self.fp8 {
            S::load_e4m3(p.add(vector.byte))
        } else {
            S::load_codes(p.add(vector.byte), self.run, vector.shifts, self.mask)
        }
    }
}

/// One task: the output columns of a range of panels for a range of token rows.
struct QuantTask<'a> {
    args: &'a Args<'a>,
    w: &'a QuantWeight<'a>,
    /// `[T, groups]` sums of each group's activations (integer codes only).
    sums: &'a [f32],
    /// Set on the integer path (the panel is then two row vectors of `S`).
    int: Option<IntActs<'a>>,
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
}

impl SimdTask for QuantTask<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let p = self.w.layout.panel();
        let vectors_per_panel = p / S::LANES;
        // A unit is NV row vectors of one panel; a tile is MR token rows x U units. Panels of
        // two vectors (the layout the compiler writes for the ISA) take the unpacking
        // specialized per code width; other panels go through the general decoder.
        // SAFETY: `run_simd` runs this only on a CPU with `S`; the panel is a power of two
        // (`QuantWeight::check`) that S::LANES divides (`run_tasks`).
        if let Some(acts) = self.int {
            debug_assert_eq!(vectors_per_panel, 2);
            match self.w.format.codes {
                CodeFormat::Int(8) => self.units::<S, _>(IntTile::<8>(acts), 1),
                CodeFormat::Int(4) => self.units::<S, _>(IntTile::<4>(acts), 1),
                _ => self.units::<S, _>(IntTile::<2>(acts), 1),
            }
            return;
        }
        let d = unsafe { Decoder::<S>::new(self.w) };
        if vectors_per_panel == 2 && S::ISA != CpuIsa::Portable {
            match self.w.format.codes {
                CodeFormat::Int(8) => self.units::<S, _>(FloatTile::<_, 2>(PairCodes::<8>), 1),
                CodeFormat::Int(4) => self.units::<S, _>(FloatTile::<_, 2>(PairCodes::<4>), 1),
                CodeFormat::Int(2) => self.units::<S, _>(FloatTile::<_, 2>(PairCodes::<2>), 1),
                _ => self.units::<S, _>(FloatTile::<_, 2>(PairCodes::<CODE_E4M3>), 1),
            }
        } else if vectors_per_panel.is_multiple_of(2) {
            self.units::<S, _>(FloatTile::<_, 2>(&d), vectors_per_panel / 2);
        } else {
            self.units::<S, _>(FloatTile::<_, 1>(&d), vectors_per_panel);
        }
    }
}

/// How a tile reads the codes of one k for the NV row vectors of a unit.
trait UnitCodes<S: Simd, const NV: usize>: Copy {
    /// `k_bytes`: the k's bytes of the unit's panel; `first`: the unit's first row vector.
    unsafe fn load(self, k_bytes: *const u8, first: usize) -> [S::V; NV];
}

/// The two row vectors of a panel of `2 * S::LANES` rows, unpacked for one code width.
#[derive(Clone, Copy)]
struct PairCodes<const CODE: u32>;

impl<S: Simd, const CODE: u32> UnitCodes<S, 2> for PairCodes<CODE> {
    #[inline(always)]
    unsafe fn load(self, k_bytes: *const u8, _first: usize) -> [S::V; 2] {
        S::load_code_pair::<CODE>(k_bytes)
    }
}

impl<S: Simd, const NV: usize> UnitCodes<S, NV> for &Decoder<S> {
    #[inline(always)]
    unsafe fn load(self, k_bytes: *const u8, first: usize) -> [S::V; NV] {
        std::array::from_fn(|v| Decoder::load(self, k_bytes, first + v))
    }
}

/// How a register tile of MR token rows x U units is computed.
trait Tile<S: Simd>: Copy {
    /// # Safety
    /// As [`QuantTask::tile`].
    unsafe fn run<const MR: usize, const U: usize>(
        self,
        task: &QuantTask,
        units: [usize; U],
        t0: usize,
        per_panel: usize,
    );
}

/// The f32 path: units of NV row vectors whose codes `C` widens to f32.
#[derive(Clone, Copy)]
struct FloatTile<C, const NV: usize>(C);

impl<S: Simd, C: UnitCodes<S, NV>, const NV: usize> Tile<S> for FloatTile<C, NV> {
    #[inline(always)]
    unsafe fn run<const MR: usize, const U: usize>(
        self,
        task: &QuantTask,
        units: [usize; U],
        t0: usize,
        per_panel: usize,
    ) {
        task.tile::<S, MR, U, NV, C>(self.0, units, t0, per_panel)
    }
}

/// The integer path: whole panels of two row vectors, `CODE`-bit codes, int16 activations.
#[derive(Clone, Copy)]
struct IntTile<'a, const CODE: u32>(IntActs<'a>);

impl<S: Simd, const CODE: u32> Tile<S> for IntTile<'_, CODE> {
    #[inline(always)]
    unsafe fn run<const MR: usize, const U: usize>(
        self,
        task: &QuantTask,
        units: [usize; U],
        t0: usize,
        _per_panel: usize,
    ) {
        task.int_tile::<S, MR, U, CODE>(self.0, units, t0)
    }
}

impl QuantTask<'_> {
    #[inline(always)]
    fn units<S: Simd, T: Tile<S>>(&self, tile: T, per_panel: usize) {
        let units = self.panels.start * per_panel..self.panels.end * per_panel;
        let mut t0 = self.rows.start;
        while t0 < self.rows.end {
            let mr = (self.rows.end - t0).min(MAX_TILE_ROWS);
            // Independent FMA chains hide the FMA latency: few token rows take more units.
            // SAFETY: as in `run`; `check_matmul` validated x, out and bias.
            unsafe {
                match mr {
                    1 => self.tiles::<S, 1, 4, T>(tile, units.clone(), t0, per_panel),
                    2 => self.tiles::<S, 2, 2, T>(tile, units.clone(), t0, per_panel),
                    3 => self.tiles::<S, 3, 2, T>(tile, units.clone(), t0, per_panel),
                    4 => self.tiles::<S, 4, 1, T>(tile, units.clone(), t0, per_panel),
                    5 => self.tiles::<S, 5, 1, T>(tile, units.clone(), t0, per_panel),
                    _ => self.tiles::<S, 6, 1, T>(tile, units.clone(), t0, per_panel),
                }
            }
            t0 += mr;
        }
    }

    /// Runs `units` for token rows `t0..t0 + MR`, U units at a time. A last group of fewer
    /// than U units repeats its last unit (computed twice, stored once) rather than needing a
    /// narrower tile.
    #[inline(always)]
    unsafe fn tiles<S: Simd, const MR: usize, const U: usize, T: Tile<S>>(
        &self,
        tile: T,
        units: std::ops::Range<usize>,
        t0: usize,
        per_panel: usize,
    ) {
        let mut u = units.start;
        while u < units.end {
            let last = units.end - 1;
            let group: [usize; U] = std::array::from_fn(|i| (u + i).min(last));
            tile.run::<MR, U>(self, group, t0, per_panel);
            u += U;
        }
    }

    /// The register tile: MR token rows x U units of NV row vectors. For each group, each
    /// output sums `code * x` over the group's k in order (one FMA chain from zero), then adds
    /// `scale * that` and `offset * (sum of the group's x)` to its total, groups in order; the
    /// bias comes last. Every output row is computed the same way whatever MR, U and the task
    /// split are, which is what makes the kernel batch invariant.
    #[inline(always)]
    // Indices over the tile's constant dimensions are the point: they unroll into registers.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<S: Simd, const MR: usize, const U: usize, const NV: usize, C>(
        &self,
        codes: C,
        units: [usize; U],
        t0: usize,
        per_panel: usize,
    ) where
        C: UnitCodes<S, NV>,
    {
        let a = self.args;
        let w = self.w;
        let (p, k, group) = (w.layout.panel(), a.k, w.format.group);
        let groups = k / group;
        let bytes_per_k = p * w.format.codes.bits() as usize / 8;
        let k_per_line = (64 / bytes_per_k).max(1);
        // Per unit: its panel and its first row vector within the panel.
        let panel: [usize; U] = std::array::from_fn(|i| units[i] / per_panel);
        let first: [usize; U] = std::array::from_fn(|i| (units[i] % per_panel) * NV);
        let mut at: [*const u8; U] =
            std::array::from_fn(|i| w.codes.as_ptr().add(panel[i] * k * bytes_per_k));
        let x = a.x.as_ptr().add(t0 * a.x_stride);
        let mut total = [[[S::zero(); NV]; U]; MR];
        for g in 0..groups {
            let mut sum = [[[S::zero(); NV]; U]; MR];
            for kk in g * group..(g + 1) * group {
                // Each unit is a short stream of its own: prefetch one cache line per unit
                // ahead of it, once per line, since the hardware ramps up too slowly on them.
                if kk & (k_per_line - 1) == 0 {
                    for &stream in &at {
                        S::prefetch(stream.wrapping_add(PREFETCH_AHEAD));
                    }
                }
                let c: [[S::V; NV]; U] = std::array::from_fn(|i| codes.load(at[i], first[i]));
                for i in 0..U {
                    at[i] = at[i].add(bytes_per_k);
                }
                for m in 0..MR {
                    let xv = S::splat(*x.add(m * a.x_stride + kk));
                    for i in 0..U {
                        for v in 0..NV {
                            sum[m][i][v] = S::mul_add(c[i][v], xv, sum[m][i][v]);
                        }
                    }
                }
            }
            self.fold_group::<S, MR, U, NV>(g, panel, first, &sum, &mut total, t0);
        }
        self.store_tile::<S, MR, U, NV>(units, panel, first, &total, t0);
    }

    /// The integer register tile: MR token rows x U panels of two row vectors. For each block
    /// of ACT_BLOCK k, each output sums `code * q` over the block in pairs of k, in i32 (exact),
    /// then adds that times the block's activation scale to the group's f32 sum, blocks in
    /// order; groups are folded in as by [`Self::tile`]. Batch invariant for the same reasons.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn int_tile<S: Simd, const MR: usize, const U: usize, const CODE: u32>(
        &self,
        acts: IntActs,
        units: [usize; U],
        t0: usize,
    ) {
        let a = self.args;
        let w = self.w;
        let (p, k, group) = (w.layout.panel(), a.k, w.format.group);
        let (groups, blocks) = (k / group, k / ACT_BLOCK);
        let bytes_per_k = p * CODE as usize / 8;
        // Two k per step: a line holds at least two k of any panel.
        let k_per_line = (64 / bytes_per_k).max(2);
        let first = [0; U];
        let mut at: [*const u8; U] =
            std::array::from_fn(|i| w.codes.as_ptr().add(units[i] * k * bytes_per_k));
        let q = acts.q.as_ptr().add(t0 * k);
        let mut total = [[[S::zero(); 2]; U]; MR];
        for g in 0..groups {
            let mut sum = [[[S::zero(); 2]; U]; MR];
            for b in g * group / ACT_BLOCK..(g + 1) * group / ACT_BLOCK {
                let mut isum = [[[S::zero_i(); 2]; U]; MR];
                for kk in (b * ACT_BLOCK..(b + 1) * ACT_BLOCK).step_by(2) {
                    if kk & (k_per_line - 1) == 0 {
                        for &stream in &at {
                            S::prefetch(stream.wrapping_add(PREFETCH_AHEAD));
                        }
                    }
                    // A loop, not `array::from_fn`: its closure is a function without the
                    // caller's target features, which kept the 2-bit unpacking's intrinsics
                    // from being inlined (measured: W2A16 decode 12x slower than W4A16).
                    let mut c = [[S::zero_i(); 2]; U];
                    for i in 0..U {
                        c[i] = S::load_code_pairs_i16::<CODE>(at[i]);
                    }
                    for i in 0..U {
                        at[i] = at[i].add(2 * bytes_per_k);
                    }
                    for m in 0..MR {
                        let xp = S::splat_pair(q.add(m * k + kk));
                        for i in 0..U {
                            for v in 0..2 {
                                isum[m][i][v] = S::dot_pairs(isum[m][i][v], c[i][v], xp);
                            }
                        }
                    }
                }
                for m in 0..MR {
                    let scale = S::splat(*acts.scales.get_unchecked((t0 + m) * blocks + b));
                    for i in 0..U {
                        for v in 0..2 {
                            let block = S::i32_to_f32(isum[m][i][v]);
                            sum[m][i][v] = S::mul_add(block, scale, sum[m][i][v]);
                        }
                    }
                }
            }
            self.fold_group::<S, MR, U, 2>(g, units, first, &sum, &mut total, t0);
        }
        self.store_tile::<S, MR, U, 2>(units, units, first, &total, t0);
    }

    /// Adds group `g`'s sums into the totals: `scale * sum + offset * (the group's x sum)`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn fold_group<S: Simd, const MR: usize, const U: usize, const NV: usize>(
        &self,
        g: usize,
        panel: [usize; U],
        first: [usize; U],
        sum: &[[[S::V; NV]; U]; MR],
        total: &mut [[[S::V; NV]; U]; MR],
        t0: usize,
    ) {
        let w = self.w;
        let (p, groups) = (w.layout.panel(), self.args.k / w.format.group);
        let fp8 = w.format.codes == CodeFormat::Fp8E4M3;
        let offset = w.format.offset();
        let scales = w.scales.as_ptr() as *const u16;
        let mins = w.mins.as_ptr() as *const u16;
        for i in 0..U {
            let base = (panel[i] * groups + g) * p;
            for v in 0..NV {
                let row = (first[i] + v) * S::LANES;
                let scale = S::load_f16(scales.add(base + row));
                for m in 0..MR {
                    total[m][i][v] = S::mul_add(scale, sum[m][i][v], total[m][i][v]);
                }
                if fp8 {
                    continue;
                }
                let min = if w.format.asymmetric {
                    S::load_f16(mins.add(base + row))
                } else {
                    S::mul(scale, S::splat(-offset))
                };
                for m in 0..MR {
                    let s = S::splat(*self.sums.get_unchecked((t0 + m) * groups + g));
                    total[m][i][v] = S::mul_add(min, s, total[m][i][v]);
                }
            }
        }
    }

    /// Stores the tile's totals (plus the bias) into the output rows, each unit once.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn store_tile<S: Simd, const MR: usize, const U: usize, const NV: usize>(
        &self,
        units: [usize; U],
        panel: [usize; U],
        first: [usize; U],
        total: &[[[S::V; NV]; U]; MR],
        t0: usize,
    ) {
        let a = self.args;
        let p = self.w.layout.panel();
        let lanes = S::LANES;
        for m in 0..MR {
            let out = a.out.0.add((t0 + m) * a.out_stride);
            for i in 0..U {
                if i > 0 && units[i] == units[i - 1] {
                    continue;
                }
                for v in 0..NV {
                    let col = panel[i] * p + (first[i] + v) * lanes;
                    if col >= a.n {
                        continue;
                    }
                    let mut value = total[m][i][v];
                    let width = (a.n - col).min(lanes);
                    if let Some(bias) = a.bias {
                        value = S::add(value, load_n::<S>(bias.as_ptr().add(col), width));
                    }
                    store_n::<S>(out.add(col), value, width);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding

/// `out[T, K] = table[ids[T]]` from a quantized `[V, K]` table, rows dequantized exactly as the
/// matmul reads them.
pub fn embedding_quant(
    ids: &[u32],
    w: &QuantWeight,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "embedding_quant";
    w.check(NAME)?;
    check_rows(NAME, "out", out.len(), ids.len(), w.cols, out_stride)?;
    for (i, &id) in ids.iter().enumerate() {
        if id as usize >= w.rows {
            return Err(KernelError::IndexOutOfRange {
                kernel: NAME,
                index: id,
                rows: w.rows,
            });
        }
        let row = &mut out[i * out_stride..][..w.cols];
        for (col, o) in row.iter_mut().enumerate() {
            *o = w.get_f32(id as usize, col);
        }
    }
    Ok(())
}

/// Plain scalar versions: the weights dequantized one element at a time, activations quantized
/// with f32 division and rounding as the format defines, sums in f64.
pub mod reference {
    use super::*;

    /// Row-major `[N, K]` f32 weights of `w`.
    pub fn dequantize(w: &QuantWeight) -> Vec<f32> {
        let mut out = Vec::with_capacity(w.rows * w.cols);
        for n in 0..w.rows {
            for k in 0..w.cols {
                out.push(w.get_f32(n, k));
            }
        }
        out
    }

    /// [`super::matmul_quant`] in f64 (see the module doc of `reference` above).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_quant(
        act: ActQuant,
        x: &[f32],
        x_stride: usize,
        t: usize,
        w: &QuantWeight,
        bias: Option<&[f32]>,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (n, k) = (w.rows, w.cols);
        let wf = dequantize(w);
        if takes_integer_path(&w.format, act, k) {
            // Activations as the integer path rounds them: int16 per block of ACT_BLOCK k with
            // the block's own scale (A16), or the row's int8 grid (A8).
            for ti in 0..t {
                let row = &x[ti * x_stride..][..k];
                let amax = |v: &[f32]| v.iter().fold(0f32, |m, v| m.max(v.abs()));
                let row_scale = amax(row) / 127.0;
                let mut xr = Vec::with_capacity(k);
                for block in row.chunks(ACT_BLOCK) {
                    let (scale, limit) = match act {
                        ActQuant::Int8PerToken => (row_scale, 127.0),
                        _ => (amax(block) / 32767.0, 32767.0),
                    };
                    xr.extend(block.iter().map(|&v| {
                        let q = if scale > 0.0 {
                            (v / scale).round().clamp(-limit, limit)
                        } else {
                            0.0
                        };
                        q as f64 * scale as f64
                    }));
                }
                for ni in 0..n {
                    let dot: f64 = (0..k).map(|ki| wf[ni * k + ki] as f64 * xr[ki]).sum();
                    let b = bias.map_or(0.0, |b| b[ni] as f64);
                    out[ti * out_stride + ni] = (dot + b) as f32;
                }
            }
            return;
        }
        for ti in 0..t {
            let row = &x[ti * x_stride..][..k];
            let (limit, round): (f32, fn(f32) -> f32) = match act {
                ActQuant::None => (0.0, |v| v),
                ActQuant::Int8PerToken => (127.0, f32::round),
                ActQuant::Fp8PerToken => (E4M3_MAX, round_to_e4m3),
            };
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if limit == 0.0 { 1.0 } else { amax / limit };
            let q: Vec<f64> = row
                .iter()
                .map(|&v| match act {
                    ActQuant::None => v as f64,
                    _ if scale == 0.0 => 0.0,
                    _ => round(v / scale).clamp(-limit, limit) as f64,
                })
                .collect();
            for ni in 0..n {
                let dot: f64 = (0..k).map(|ki| wf[ni * k + ki] as f64 * q[ki]).sum();
                let b = bias.map_or(0.0, |b| b[ni] as f64);
                out[ti * out_stride + ni] = (dot * scale as f64 + b) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{
        isas_to_test, on_threads, random_quant_matrix as random_matrix, Rng,
    };

    fn formats() -> Vec<QuantFormat> {
        let mut all = vec![];
        for codes in [
            CodeFormat::Int(8),
            CodeFormat::Int(4),
            CodeFormat::Int(2),
            CodeFormat::Fp8E4M3,
        ] {
            for group in [16, 32, 64, 128, 192] {
                for asymmetric in [false, true] {
                    if asymmetric && codes == CodeFormat::Fp8E4M3 {
                        continue;
                    }
                    all.push(QuantFormat {
                        codes,
                        group,
                        asymmetric,
                    });
                }
            }
        }
        all
    }

    fn weight<'a>(
        m: &QuantMatrix,
        packed: &'a PackedQuant,
        layout: PackedLayout,
    ) -> QuantWeight<'a> {
        QuantWeight {
            format: m.format,
            layout,
            rows: m.rows,
            cols: m.cols,
            codes: &packed.codes,
            scales: &packed.scales,
            mins: &packed.mins,
        }
    }

    #[test]
    fn packing_keeps_every_value() {
        let mut rng = Rng::new(1);
        for format in formats() {
            let m = random_matrix(&mut rng, format, 37, 384);
            for panel in [8, 16, 32] {
                let layout = PackedLayout::new(panel).unwrap();
                let packed = m.pack(layout).unwrap();
                let w = weight(&m, &packed, layout);
                w.check("test").unwrap();
                for row in 0..m.rows {
                    for col in 0..m.cols {
                        assert_eq!(
                            w.get_f32(row, col).to_bits(),
                            m.get_f32(row, col).to_bits(),
                            "{format:?} panel {panel} [{row}, {col}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn e4m3_rounding_matches_the_nearest_table_value() {
        let finite: Vec<f32> = (0..=255u8)
            .map(e4m3_to_f32)
            .filter(|v| v.is_finite())
            .collect();
        assert_eq!(finite.len(), 254);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        let mut rng = Rng::new(3);
        for i in 0..20000 {
            let v = rng.unit() * [500.0, 10.0, 0.1, 0.01][i % 4];
            let r = round_to_e4m3(v);
            let best = finite
                .iter()
                .map(|&f| (f - v).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((r - v).abs() <= best, "{v}: {r}, nearest is {best} away");
            assert_eq!(e4m3_to_f32(e4m3_code(r)), r, "{v}");
        }
        // Ties go to the even mantissa: 1.0625 lies between 1.0 and 1.125.
        assert_eq!(round_to_e4m3(1.0625), 1.0);
        assert_eq!(round_to_e4m3(1.1875), 1.25);
        assert_eq!(round_to_e4m3(-1000.0), -448.0);
    }

    #[test]
    fn matmul_matches_the_f64_reference_for_every_format() {
        let mut rng = Rng::new(7);
        for isa in isas_to_test() {
            // The ISA's own panel, and the others a plan for another CPU could carry (each
            // splits into row vectors and code runs differently).
            for panel in [8, 16, 32, 64] {
                let layout = PackedLayout::new(panel).unwrap();
                for format in formats() {
                    let (n, k) = (45, 384);
                    let m = random_matrix(&mut rng, format, n, k);
                    let packed = m.pack(layout).unwrap();
                    let w = weight(&m, &packed, layout);
                    for act in [
                        ActQuant::None,
                        ActQuant::Int8PerToken,
                        ActQuant::Fp8PerToken,
                    ] {
                        for t in [1, 3, 7, 40] {
                            let x = rng.vec(t * (k + 3), 1.0);
                            let bias = rng.vec(n, 0.5);
                            let mut got = vec![0.0; t * (n + 1)];
                            let mut want = vec![0.0; t * (n + 1)];
                            matmul_quant(isa, act, &x, k + 3, t, &w, Some(&bias), &mut got, n + 1)
                                .unwrap();
                            reference::matmul_quant(
                                act,
                                &x,
                                k + 3,
                                t,
                                &w,
                                Some(&bias),
                                &mut want,
                                n + 1,
                            );
                            // Each output sums k products in f32: allow k roundings of the
                            // magnitudes summed, relative to their size.
                            for ti in 0..t {
                                for ni in 0..n {
                                    let (g, r) = (got[ti * (n + 1) + ni], want[ti * (n + 1) + ni]);
                                    let tol = 1e-5 * (1.0 + r.abs()) * (k as f32).sqrt();
                                    assert!(
                                    (g - r).abs() <= tol,
                                    "{isa:?} P={panel} {format:?} {act:?} t={t} [{ti}, {ni}]: {g} vs {r}"
                                );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch_or_the_threads() {
        let mut rng = Rng::new(11);
        let (n, k) = (300, 576);
        // The integer path (4-bit codes, A16 and A8) and the f32 path (FP8 codes and activations).
        let int4 = QuantFormat {
            codes: CodeFormat::Int(4),
            group: 32,
            asymmetric: true,
        };
        let fp8 = QuantFormat {
            codes: CodeFormat::Fp8E4M3,
            group: k,
            asymmetric: false,
        };
        let cases = [
            (int4, ActQuant::None),
            (int4, ActQuant::Int8PerToken),
            (fp8, ActQuant::Fp8PerToken),
        ];
        for (format, act) in cases {
            let m = random_matrix(&mut rng, format, n, k);
            for isa in isas_to_test() {
                let layout = PackedLayout::for_isa(isa);
                let packed = m.pack(layout).unwrap();
                let w = weight(&m, &packed, layout);
                let x = rng.vec(200 * k, 1.0);
                {
                    let mut all = vec![0.0; 200 * n];
                    on_threads(3, || {
                        matmul_quant(isa, act, &x, k, 200, &w, None, &mut all, n)
                    })
                    .unwrap();
                    for (start, t) in [(0, 1), (5, 2), (17, 6), (100, 9)] {
                        let mut part = vec![0.0; t * n];
                        on_threads(1, || {
                            matmul_quant(isa, act, &x[start * k..], k, t, &w, None, &mut part, n)
                        })
                        .unwrap();
                        assert_eq!(
                            part,
                            all[start * n..(start + t) * n],
                            "{isa:?} {act:?} {start}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn embedding_reads_rows_as_the_matmul_does() {
        let mut rng = Rng::new(5);
        let format = QuantFormat {
            codes: CodeFormat::Int(8),
            group: 32,
            asymmetric: false,
        };
        let m = random_matrix(&mut rng, format, 50, 64);
        let layout = PackedLayout::new(16).unwrap();
        let packed = m.pack(layout).unwrap();
        let w = weight(&m, &packed, layout);
        let mut out = vec![0.0; 2 * 64];
        embedding_quant(&[3, 49], &w, &mut out, 64).unwrap();
        let dense = reference::dequantize(&w);
        assert_eq!(&out[..64], &dense[3 * 64..4 * 64]);
        assert_eq!(&out[64..], &dense[49 * 64..50 * 64]);
        assert!(embedding_quant(&[50], &w, &mut out, 64).is_err());
    }

    #[test]
    fn rejects_bad_groups_and_sizes() {
        let format = QuantFormat {
            codes: CodeFormat::Int(4),
            group: 48,
            asymmetric: false,
        };
        assert!(format.check(64).unwrap_err().contains("does not divide"));
        let fp8_asym = QuantFormat {
            codes: CodeFormat::Fp8E4M3,
            group: 32,
            asymmetric: true,
        };
        assert!(fp8_asym.check(64).is_err());
        let ok = QuantFormat {
            group: 32,
            ..format
        };
        let w = QuantWeight {
            format: ok,
            layout: PackedLayout::new(8).unwrap(),
            rows: 8,
            cols: 64,
            codes: &[0; 10],
            scales: &[],
            mins: &[],
        };
        let mut out = vec![0.0; 64];
        assert!(matmul_quant(
            CpuIsa::Portable,
            ActQuant::None,
            &[0.0; 64],
            64,
            1,
            &w,
            None,
            &mut out,
            8
        )
        .is_err());
    }
}
