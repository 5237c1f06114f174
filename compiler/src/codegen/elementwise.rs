//! `elementwise` writes the cranelift IR of the generated kernels: RMS norm (plain and per-group),
//! residual add fused with RMS norm, SwiGLU's `silu(g) * u`, and rotate-half RoPE.
//!
//! Every function is a loop over its `rows` argument around code whose trip counts are constants
//! of the spec. A contiguous run of columns (a [`Emitter::span`]) is walked as f32x4 vectors,
//! unrolled [`UNROLL`] times inside a counted loop when it is long, straight-line when short, and
//! finished by straight-line scalar code for the last `len % 4` elements. Reductions keep one
//! vector accumulator per unrolled slot so consecutive FMAs do not wait on each other.
//!
//! Nothing here calls out: square roots are instructions and `exp` is built from arithmetic and
//! integer bit manipulation, so the finished code needs no loader.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    AbiParam, Endianness, Function, InstBuilder, MemFlagsData, Signature, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetIsa};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

use super::KernelSpec;

/// f32 lanes in one vector.
const LANES: usize = 4;
/// Bytes of one f32.
const F32_BYTES: usize = 4;
/// Bytes of one f32x4.
const VECTOR_BYTES: usize = LANES * F32_BYTES;
/// Vectors per trip of a column loop. Four independent accumulators cover the latency of a
/// vector FMA on current x86 cores.
const UNROLL: usize = 4;
/// Spans of at most this many vectors are emitted without a loop: for a head of 64 or a small
/// row the loop overhead would cost more than the extra code.
const STRAIGHT_LINE_MAX_VECTORS: usize = 16;

/// Lane order for bitcasts between vector types (only the lane type changes, never the bytes).
const LANE_ORDER: MemFlagsData = MemFlagsData::new().with_endianness(Endianness::Little);

/// `e^x` is computed for `x` clamped here: `e^88` is still finite in f32, and at `-88` the
/// result is below the smallest normal f32, where flushing to (almost) zero is harmless.
const EXP_MIN_ARG: f32 = -88.0;
const EXP_MAX_ARG: f32 = 88.0;
/// Adding `1.5 * 2^23` rounds an f32 of magnitude below `2^22` to an integer held in the low
/// mantissa bits (round to nearest even, one instruction).
const ROUNDING_MAGIC: f32 = 12_582_912.0;
/// `ln 2` split so that `n * LN2_HI` is exact for the `|n| <= 127` that occur (Cody and Waite).
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r = sum r^k / k!` for `|r| <= ln(2)/2`; degree 7 leaves a truncation error below `1e-8`.
const EXP_TAYLOR_DEGREE: u32 = 7;

/// Builds the whole function for `spec` (the caller has validated it).
pub(super) fn build_function(spec: &KernelSpec, isa: &dyn TargetIsa) -> Function {
    let params: &[Type] = match spec {
        KernelSpec::RmsNorm { .. } => &[I64, I64, I64, I64, I64, I64, I64, I64, F32],
        KernelSpec::AddRmsNorm { .. } => {
            &[I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, I64, F32]
        }
        KernelSpec::SiluMul { .. } => &[I64, I64, I64, I64, I64, I64],
        KernelSpec::Rope { .. } => &[I64, I64, I64, I64, I64, I64, I64, I64, I64, I64],
    };
    let mut signature = Signature::new(CallConv::SystemV);
    signature
        .params
        .extend(params.iter().map(|&ty| AbiParam::new(ty)));
    let mut function = Function::with_name_signature(UserFuncName::user(0, 0), signature);
    let mut builder_context = FunctionBuilderContext::new();
    let mut builder = FunctionBuilder::new(&mut function, &mut builder_context);
    let entry = builder.create_block();
    builder.append_block_params_for_function_params(entry);
    builder.switch_to_block(entry);
    let args = builder.block_params(entry).to_vec();
    let mut emitter = Emitter {
        b: builder,
        // Callers guarantee every access is in bounds. Nothing is promised about alignment.
        flags: MemFlagsData::new().with_notrap(),
    };
    match *spec {
        KernelSpec::RmsNorm { cols, group, eps } => emitter.rms_norm(&args, cols, group, eps),
        KernelSpec::AddRmsNorm { cols, eps } => emitter.add_rms_norm(&args, cols, eps),
        KernelSpec::SiluMul { cols } => emitter.silu_mul(&args, cols),
        KernelSpec::Rope { n_heads, head_dim } => emitter.rope(&args, n_heads, head_dim),
    }
    let mut builder = emitter.b;
    builder.ins().return_(&[]);
    builder.seal_all_blocks();
    builder.finalize(isa.frontend_config());
    function
}

/// Byte offset of element `elements` as a load/store immediate. Spec validation bounds rows to
/// far less than `i32::MAX` bytes.
fn byte_offset(elements: usize) -> i32 {
    i32::try_from(elements * F32_BYTES).unwrap_or(i32::MAX)
}

/// One step of a [`Emitter::span`]: an f32x4 or a single f32 at byte address
/// `base + offset + imm` for whichever row pointer `base` the body works on.
#[derive(Clone, Copy)]
struct Piece {
    /// `F32X4` or `F32`.
    ty: Type,
    offset: Value,
    imm: i32,
    /// Which of the `UNROLL` accumulators a vector piece adds into.
    slot: usize,
}

impl Piece {
    /// The same kind of piece, `elements` further along the row.
    fn shifted(self, elements: usize) -> Piece {
        Piece {
            imm: self.imm + byte_offset(elements),
            ..self
        }
    }
}

/// Running sums of squares: one f32x4 per unrolled slot and one f32 for the scalar tail.
struct Sums {
    vectors: [Variable; UNROLL],
    scalar: Variable,
}

/// The function being built and the memory flags every load and store carries.
struct Emitter<'a> {
    b: FunctionBuilder<'a>,
    flags: MemFlagsData,
}

impl Emitter<'_> {
    // ---- kernels ------------------------------------------------------------------------------

    /// Arguments as in `RmsNormFn`: x, x_stride, w, out, out_stride, rows, (cols, group, eps).
    fn rms_norm(&mut self, args: &[Value], cols: usize, group: usize, eps: f32) {
        let (x, w, out, rows) = (args[0], args[2], args[3], args[5]);
        let x_step = self.row_step(args[1]);
        let out_step = self.row_step(args[4]);
        self.row_loop(rows, &[(x, x_step), (out, out_step)], |e, row| {
            let (x_row, out_row) = (row[0], row[1]);
            e.counted_loop(cols / group, group * F32_BYTES, |e, group_offset| {
                let x_group = e.b.ins().iadd(x_row, group_offset);
                let out_group = e.b.ins().iadd(out_row, group_offset);
                let sums = e.zeroed_sums();
                e.span(group, |e, piece| {
                    let v = e.load(piece, x_group);
                    e.accumulate_square(&sums, piece, v);
                });
                let inv_rms = e.inverse_rms(&sums, group, eps);
                e.scale_by_weight(x_group, out_group, w, group, inv_rms);
            });
        });
    }

    /// Arguments as in `AddRmsNormFn`: x, x_stride, d, d_stride, w, sum_out, sum_stride,
    /// normed_out, normed_stride, rows, (cols, eps).
    fn add_rms_norm(&mut self, args: &[Value], cols: usize, eps: f32) {
        let (x, d, w, sum, normed, rows) = (args[0], args[2], args[4], args[5], args[7], args[9]);
        let x_step = self.row_step(args[1]);
        let d_step = self.row_step(args[3]);
        let sum_step = self.row_step(args[6]);
        let normed_step = self.row_step(args[8]);
        let cursors = [
            (x, x_step),
            (d, d_step),
            (sum, sum_step),
            (normed, normed_step),
        ];
        self.row_loop(rows, &cursors, |e, row| {
            let (x_row, d_row, sum_row, normed_row) = (row[0], row[1], row[2], row[3]);
            let sums = e.zeroed_sums();
            // Pass 1 writes the residual sum and squares it; pass 2 reads it back from the row
            // just written, which is still in L1.
            e.span(cols, |e, piece| {
                let a = e.load(piece, x_row);
                let b = e.load(piece, d_row);
                let s = e.b.ins().fadd(a, b);
                e.store(piece, sum_row, s);
                e.accumulate_square(&sums, piece, s);
            });
            let inv_rms = e.inverse_rms(&sums, cols, eps);
            e.scale_by_weight(sum_row, normed_row, w, cols, inv_rms);
        });
    }

    /// Arguments as in `SiluMulFn`: gu, gu_stride, out, out_stride, rows, (cols).
    fn silu_mul(&mut self, args: &[Value], cols: usize) {
        let (gu, out, rows) = (args[0], args[2], args[4]);
        let gu_step = self.row_step(args[1]);
        let out_step = self.row_step(args[3]);
        self.row_loop(rows, &[(gu, gu_step), (out, out_step)], |e, row| {
            let (gu_row, out_row) = (row[0], row[1]);
            e.span(cols, |e, piece| {
                let g = e.load(piece, gu_row);
                let u = e.load(piece.shifted(cols), gu_row);
                let y = e.silu_times(g, u, piece.ty);
                e.store(piece, out_row, y);
            });
        });
    }

    /// Arguments as in `RopeFn`: x, x_stride, out, out_stride, rows, (n_heads, head_dim),
    /// positions, cos, sin.
    fn rope(&mut self, args: &[Value], n_heads: usize, head_dim: usize) {
        let (x, out, rows, positions, cos, sin) =
            (args[0], args[2], args[4], args[7], args[8], args[9]);
        let x_step = self.row_step(args[1]);
        let out_step = self.row_step(args[3]);
        let position_step = self.b.ins().iconst(I64, std::mem::size_of::<u32>() as i64);
        let half = head_dim / 2;
        let cursors = [(x, x_step), (out, out_step), (positions, position_step)];
        self.row_loop(rows, &cursors, |e, row| {
            let (x_row, out_row, position_ptr) = (row[0], row[1], row[2]);
            let position = e.b.ins().uload32(e.flags, position_ptr, 0);
            let table_offset = e.b.ins().imul_imm_u(position, (half * F32_BYTES) as i64);
            let cos_row = e.b.ins().iadd(cos, table_offset);
            let sin_row = e.b.ins().iadd(sin, table_offset);
            e.counted_loop(n_heads, head_dim * F32_BYTES, |e, head_offset| {
                let x_head = e.b.ins().iadd(x_row, head_offset);
                let out_head = e.b.ins().iadd(out_row, head_offset);
                e.span(half, |e, piece| {
                    let first = e.load(piece, x_head);
                    let second = e.load(piece.shifted(half), x_head);
                    let c = e.load(piece, cos_row);
                    let s = e.load(piece, sin_row);
                    let first_c = e.b.ins().fmul(first, c);
                    let second_s = e.b.ins().fmul(second, s);
                    let second_c = e.b.ins().fmul(second, c);
                    let first_s = e.b.ins().fmul(first, s);
                    let out_first = e.b.ins().fsub(first_c, second_s);
                    let out_second = e.b.ins().fadd(second_c, first_s);
                    e.store(piece, out_head, out_first);
                    e.store(piece.shifted(half), out_head, out_second);
                });
            });
        });
    }

    // ---- building blocks ----------------------------------------------------------------------

    /// `dst = src * inv_rms * w` over `len` elements.
    fn scale_by_weight(&mut self, src: Value, dst: Value, w: Value, len: usize, inv_rms: Value) {
        let inv_rms_vector = self.b.ins().splat(F32X4, inv_rms);
        self.span(len, |e, piece| {
            let factor = if piece.ty == F32X4 {
                inv_rms_vector
            } else {
                inv_rms
            };
            let v = e.load(piece, src);
            let weight = e.load(piece, w);
            let normalized = e.b.ins().fmul(v, factor);
            let y = e.b.ins().fmul(normalized, weight);
            e.store(piece, dst, y);
        });
    }

    /// `1 / sqrt(sum / len + eps)` from the accumulators of a sum of squares.
    fn inverse_rms(&mut self, sums: &Sums, len: usize, eps: f32) -> Value {
        let partial: Vec<Value> = sums.vectors.iter().map(|&v| self.b.use_var(v)).collect();
        let pair_a = self.b.ins().fadd(partial[0], partial[1]);
        let pair_b = self.b.ins().fadd(partial[2], partial[3]);
        let lanes = self.b.ins().fadd(pair_a, pair_b);
        let lane_sum = self.horizontal_sum(lanes);
        let tail = self.b.use_var(sums.scalar);
        let total = self.b.ins().fadd(lane_sum, tail);
        let count = self.b.ins().f32const(len as f32);
        let mean = self.b.ins().fdiv(total, count);
        let eps = self.b.ins().f32const(eps);
        let variance = self.b.ins().fadd(mean, eps);
        let rms = self.b.ins().sqrt(variance);
        let one = self.b.ins().f32const(1.0);
        self.b.ins().fdiv(one, rms)
    }

    /// `g * u * sigmoid(g)`, written as `g * u / (1 + e^-g)` so that it stays accurate where
    /// `sigmoid(g)` itself would be subnormal.
    fn silu_times(&mut self, g: Value, u: Value, ty: Type) -> Value {
        let e = self.exp_of_negated(g, ty);
        let one = self.float_constant(ty, 1.0);
        let denominator = self.b.ins().fadd(one, e);
        let product = self.b.ins().fmul(g, u);
        self.b.ins().fdiv(product, denominator)
    }

    /// `e^-x` for f32 or f32x4 `x`, relative error a few f32 ulps for `-x` in `[-87, 88]`.
    ///
    /// `-x = n ln2 + r` with integer `n` and `|r| <= ln(2)/2`; `e^r` by its Taylor polynomial;
    /// `2^n` applied by adding `n` to the exponent field of `e^r`. The clamp keeps `n` in
    /// `[-127, 127]` and, at `n = -127`, `r >= 0`, so the exponent field never wraps. Working on
    /// `x` rather than `-x` (the reduction yields `-r`, the polynomial takes alternating signs)
    /// saves a negation per vector.
    fn exp_of_negated(&mut self, x: Value, ty: Type) -> Value {
        let int_ty = if ty == F32X4 { I32X4 } else { I32 };
        let x = self.clamp(x, -EXP_MAX_ARG, -EXP_MIN_ARG, ty);
        let magic = self.float_constant(ty, ROUNDING_MAGIC);
        let minus_log2_e = self.float_constant(ty, -std::f32::consts::LOG2_E);
        let shifted = self.b.ins().fma(x, minus_log2_e, magic);
        let n = self.b.ins().fsub(shifted, magic);
        let ln2_hi = self.float_constant(ty, LN2_HI);
        let ln2_lo = self.float_constant(ty, LN2_LO);
        // minus_r = x + n ln2 = -(-x - n ln2)
        let minus_r = self.b.ins().fma(n, ln2_hi, x);
        let minus_r = self.b.ins().fma(n, ln2_lo, minus_r);
        // e^r = sum r^k / k! = sum (-1)^k (-r)^k / k!
        let coefficients: Vec<f32> = (0..=EXP_TAYLOR_DEGREE)
            .map(|k| {
                let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
                sign * inverse_factorial(k)
            })
            .collect();
        let poly = self.polynomial(minus_r, &coefficients, ty);
        // The low bits of `shifted` hold n in two's complement; shifted into the exponent field,
        // the magic's own bits fall off the top.
        let shifted_bits = self.b.ins().bitcast(int_ty, LANE_ORDER, shifted);
        let exponent_add = self.b.ins().ishl_imm_u(shifted_bits, 23);
        let poly_bits = self.b.ins().bitcast(int_ty, LANE_ORDER, poly);
        let result_bits = self.b.ins().iadd(poly_bits, exponent_add);
        self.b.ins().bitcast(ty, LANE_ORDER, result_bits)
    }

    /// `sum coefficients[k] * r^k` by Estrin's scheme: pairs `c0 + c1 r`, then pairs of pairs
    /// with `r^2`, `r^4`, ... The dependency chain is logarithmic in the degree instead of
    /// linear as with Horner's rule, which matters when the polynomial is the latency-critical
    /// part of the loop.
    fn polynomial(&mut self, r: Value, coefficients: &[f32], ty: Type) -> Value {
        let mut terms: Vec<Value> = coefficients
            .chunks(2)
            .map(|pair| {
                let low = self.float_constant(ty, pair[0]);
                match pair.get(1) {
                    Some(&high) => {
                        let high = self.float_constant(ty, high);
                        self.b.ins().fma(high, r, low)
                    }
                    None => low,
                }
            })
            .collect();
        let mut power = self.b.ins().fmul(r, r);
        while terms.len() > 1 {
            terms = terms
                .chunks(2)
                .map(|pair| match pair {
                    [low, high] => self.b.ins().fma(*high, power, *low),
                    _ => pair[0],
                })
                .collect();
            if terms.len() > 1 {
                power = self.b.ins().fmul(power, power);
            }
        }
        terms[0]
    }

    /// `min(max(x, lo), hi)` in the forms the x64 backend turns into single min/max instructions
    /// (a NaN `x` comes out as a bound, which the callers tolerate: their result stays NaN).
    fn clamp(&mut self, x: Value, lo: f32, hi: f32, ty: Type) -> Value {
        let lo = self.float_constant(ty, lo);
        let hi = self.float_constant(ty, hi);
        let below_hi = self.b.ins().fcmp(FloatCC::LessThan, x, hi);
        let x = self.select_float(below_hi, x, hi, ty);
        let above_lo = self.b.ins().fcmp(FloatCC::LessThan, lo, x);
        self.select_float(above_lo, x, lo, ty)
    }

    fn select_float(&mut self, condition: Value, a: Value, b: Value, ty: Type) -> Value {
        if ty == F32X4 {
            let mask = self.b.ins().bitcast(F32X4, LANE_ORDER, condition);
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(condition, a, b)
        }
    }

    fn horizontal_sum(&mut self, v: Value) -> Value {
        let lanes: Vec<Value> = (0..LANES as u8)
            .map(|lane| self.b.ins().extractlane(v, lane))
            .collect();
        let low = self.b.ins().fadd(lanes[0], lanes[1]);
        let high = self.b.ins().fadd(lanes[2], lanes[3]);
        self.b.ins().fadd(low, high)
    }

    /// One zeroed f32x4 accumulator per unrolled slot plus one f32 for the scalar tail.
    fn zeroed_sums(&mut self) -> Sums {
        let zero_vector = self.float_constant(F32X4, 0.0);
        let vectors = std::array::from_fn(|_| {
            let var = self.b.declare_var(F32X4);
            self.b.def_var(var, zero_vector);
            var
        });
        let zero = self.b.ins().f32const(0.0);
        let scalar = self.b.declare_var(F32);
        self.b.def_var(scalar, zero);
        Sums { vectors, scalar }
    }

    /// Adds `v * v` into the accumulator for `piece`.
    fn accumulate_square(&mut self, sums: &Sums, piece: Piece, v: Value) {
        let acc = if piece.ty == F32X4 {
            sums.vectors[piece.slot]
        } else {
            sums.scalar
        };
        let sum = self.b.use_var(acc);
        let sum = self.b.ins().fma(v, v, sum);
        self.b.def_var(acc, sum);
    }

    // ---- control flow -------------------------------------------------------------------------

    /// `for row in 0..rows`, with `cursors` (pointer, byte step) advanced after each row; `body`
    /// gets the current pointers. Zero rows run nothing.
    fn row_loop(
        &mut self,
        rows: Value,
        cursors: &[(Value, Value)],
        mut body: impl FnMut(&mut Self, &[Value]),
    ) {
        let pointer_vars: Vec<Variable> = cursors
            .iter()
            .map(|&(start, _)| {
                let var = self.b.declare_var(I64);
                self.b.def_var(var, start);
                var
            })
            .collect();
        let rows_left = self.b.declare_var(I64);
        self.b.def_var(rows_left, rows);
        let row_block = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(rows, row_block, &[], done, &[]);

        self.b.switch_to_block(row_block);
        let pointers: Vec<Value> = pointer_vars.iter().map(|&v| self.b.use_var(v)).collect();
        let left = self.b.use_var(rows_left);
        body(self, &pointers);
        for ((&var, &pointer), &(_, step)) in pointer_vars.iter().zip(&pointers).zip(cursors) {
            let next = self.b.ins().iadd(pointer, step);
            self.b.def_var(var, next);
        }
        let left = self.b.ins().iadd_imm_s(left, -1);
        self.b.def_var(rows_left, left);
        self.b.ins().brif(left, row_block, &[], done, &[]);

        self.b.switch_to_block(done);
    }

    /// Runs `body` with byte offsets `0, step, 2*step, ...` (`trips` of them, at least one) in a
    /// loop, or once with offset 0 and no loop when `trips == 1`.
    fn counted_loop(&mut self, trips: usize, step: usize, mut body: impl FnMut(&mut Self, Value)) {
        if trips <= 1 {
            let zero = self.b.ins().iconst(I64, 0);
            body(self, zero);
            return;
        }
        let offset_var = self.b.declare_var(I64);
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(offset_var, zero);
        let trip_block = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().jump(trip_block, &[]);

        self.b.switch_to_block(trip_block);
        let offset = self.b.use_var(offset_var);
        body(self, offset);
        let next = self.b.ins().iadd_imm_s(offset, step as i64);
        self.b.def_var(offset_var, next);
        let end = (trips * step) as i64;
        let more = self.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, next, end);
        self.b.ins().brif(more, trip_block, &[], done, &[]);

        self.b.switch_to_block(done);
    }

    /// Visits elements `0..len` of a contiguous run, handing `body` one [`Piece`] per f32x4 and
    /// then one per element of the last `len % 4`.
    fn span(&mut self, len: usize, mut body: impl FnMut(&mut Self, Piece)) {
        let vectors = len / LANES;
        let looped_vectors = if vectors > STRAIGHT_LINE_MAX_VECTORS {
            vectors / UNROLL * UNROLL
        } else {
            0
        };
        if looped_vectors > 0 {
            self.counted_loop(
                looped_vectors / UNROLL,
                UNROLL * VECTOR_BYTES,
                |e, offset| {
                    for slot in 0..UNROLL {
                        let imm = byte_offset(slot * LANES);
                        body(
                            e,
                            Piece {
                                ty: F32X4,
                                offset,
                                imm,
                                slot,
                            },
                        );
                    }
                },
            );
        }
        let offset = self.b.ins().iconst(I64, 0);
        for index in looped_vectors..vectors {
            let imm = byte_offset(index * LANES);
            body(
                self,
                Piece {
                    ty: F32X4,
                    offset,
                    imm,
                    slot: index % UNROLL,
                },
            );
        }
        for element in vectors * LANES..len {
            let imm = byte_offset(element);
            body(
                self,
                Piece {
                    ty: F32,
                    offset,
                    imm,
                    slot: 0,
                },
            );
        }
    }

    // ---- memory and constants -----------------------------------------------------------------

    /// Bytes from one row to the next, from a stride in f32 elements.
    fn row_step(&mut self, stride: Value) -> Value {
        self.b.ins().ishl_imm_u(stride, 2)
    }

    fn load(&mut self, piece: Piece, base: Value) -> Value {
        let address = self.b.ins().iadd(base, piece.offset);
        self.b.ins().load(piece.ty, self.flags, address, piece.imm)
    }

    fn store(&mut self, piece: Piece, base: Value, value: Value) {
        let address = self.b.ins().iadd(base, piece.offset);
        self.b.ins().store(self.flags, value, address, piece.imm);
    }

    /// An f32 constant, splatted when `ty` is a vector type.
    fn float_constant(&mut self, ty: Type, value: f32) -> Value {
        let scalar = self.b.ins().f32const(value);
        if ty == F32X4 {
            self.b.ins().splat(F32X4, scalar)
        } else {
            scalar
        }
    }
}

/// `1 / k!` rounded to f32.
fn inverse_factorial(k: u32) -> f32 {
    let factorial: f64 = (1..=k).map(f64::from).product();
    (1.0 / factorial) as f32
}
