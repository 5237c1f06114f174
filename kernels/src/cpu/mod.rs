//! CPU kernels: f32 activations, weights in f32, bf16 or f16, every matrix row-major with an
//! explicit row stride in elements (so a kernel can read or write a column slice of a wider
//! buffer). Each kernel takes the [`CpuIsa`] whose code path it should run; an ISA this CPU lacks
//! runs the best level it has below the one asked for ([`runnable_isa`]), never a crash.
//!
//! Dimension legend for every kernel doc in this module tree: T tokens (rows), H query heads,
//! KV key/value heads, D head dim, K input features, N output features, V vocabulary rows,
//! I intermediate features, P cache positions.
//!
//! Every fast kernel has a plain scalar twin in [`reference`] (f64 accumulation where it matters);
//! tests compare the two on random inputs of odd sizes. Kernels return `Err` for any length,
//! stride or index that would reach outside a buffer. Work is split into tasks whose boundaries
//! do not depend on the number of threads, and every output element is reduced in a fixed order,
//! so results are the same on any number of threads ([`pool`] runs the parallel loops).

mod attention;
mod elementwise;
mod gather;
mod layout;
mod matmul;
mod mla;
mod moe;
mod norm;
pub mod pool;
pub mod quant;
mod rope;
mod simd;

#[cfg(test)]
pub(crate) mod test_util;

use crate::KernelError;
use ir_types::CpuIsa;
use std::sync::OnceLock;

pub use attention::{attention, KvLayerMut};
pub use elementwise::{add, mul, silu, silu_mul};
pub use gather::{embedding, gather_rows};
pub use layout::{PackedLayout, WeightLayout};
pub use matmul::{matmul, matmul_with_path, MatmulPath};
pub use mla::{mla_attention, MlaParams, RopeTables};
pub use moe::{moe, route as moe_route, Experts, MoeParams};
pub use norm::{add_rms_norm, rms_norm};
pub use quant::{embedding_quant, matmul_quant, QuantFormat, QuantMatrix, QuantWeight};
pub use rope::rope;

/// Plain scalar versions of every kernel, same arguments less the ISA: the numerical ground
/// truth for tests here and for code generated elsewhere.
pub mod reference {
    pub use super::attention::reference::attention;
    pub use super::elementwise::reference::{add, mul, silu, silu_mul};
    pub use super::gather::reference::{embedding, gather_rows};
    pub use super::matmul::reference::matmul;
    pub use super::mla::reference::mla_attention;
    pub use super::moe::reference::moe;
    pub use super::norm::reference::{add_rms_norm, rms_norm};
    pub use super::quant::reference::{dequantize as dequantize_quant, matmul_quant};
    pub use super::rope::reference::rope;
}

/// Weight elements as stored in the checkpoint; the kernels widen them to f32 as they read.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    BF16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl WeightData<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(d) => d.len(),
            WeightData::BF16(d) => d.len(),
            WeightData::F16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> ir_types::DType {
        match self {
            WeightData::F32(_) => ir_types::DType::F32,
            WeightData::BF16(_) => ir_types::DType::BF16,
            WeightData::F16(_) => ir_types::DType::F16,
        }
    }

    /// Element `i` widened to f32.
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            WeightData::F32(d) => d[i],
            WeightData::BF16(d) => d[i].to_f32(),
            WeightData::F16(d) => d[i].to_f32(),
        }
    }
}

/// A dense `[rows, cols]` weight, `[N, K]` for matmul, `[V, H*D]` for an embedding, stored in
/// `layout` order (row-major, or the matmul's panels: see [`WeightLayout`]).
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub data: WeightData<'a>,
    pub rows: usize,
    pub cols: usize,
    pub layout: WeightLayout,
}

impl<'a> Weight<'a> {
    /// A row-major weight, as checkpoints store them.
    pub fn row_major(data: WeightData<'a>, rows: usize, cols: usize) -> Weight<'a> {
        Weight {
            data,
            rows,
            cols,
            layout: WeightLayout::RowMajor,
        }
    }

    /// Element `[row, col]` widened to f32, wherever the layout keeps it; panics out of range.
    pub fn get_f32(&self, row: usize, col: usize) -> f32 {
        self.data.get_f32(self.layout.index(self.cols, row, col))
    }

    fn check(&self, kernel: &'static str) -> Result<(), KernelError> {
        let want = self.layout.len(self.rows, self.cols);
        if self.data.len() != want || self.rows.checked_mul(self.cols).is_none() {
            return Err(KernelError::shape(
                kernel,
                format!(
                    "weight has {} elements, {} x {} in {:?} needs {want}",
                    self.data.len(),
                    self.rows,
                    self.cols,
                    self.layout
                ),
            ));
        }
        Ok(())
    }
}

/// The best ISA level this CPU runs, detected once.
pub fn detected_isa() -> CpuIsa {
    static DETECTED: OnceLock<CpuIsa> = OnceLock::new();
    *DETECTED.get_or_init(CpuIsa::detect)
}

/// The ISA a kernel asked for `isa` actually runs: `isa` itself when this CPU supports it,
/// otherwise the best level below it that it does.
pub fn runnable_isa(isa: CpuIsa) -> CpuIsa {
    isa.min(detected_isa())
}

/// Checks that `len` elements hold `rows` rows of `cols` used elements `stride` apart.
fn check_rows(
    kernel: &'static str,
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    stride: usize,
) -> Result<(), KernelError> {
    if rows == 0 {
        return Ok(());
    }
    if rows > 1 && stride < cols {
        return Err(KernelError::shape(
            kernel,
            format!("{name}: stride {stride} < {cols} columns"),
        ));
    }
    let needed = (rows - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(cols))
        .ok_or_else(|| KernelError::shape(kernel, format!("{name}: size overflows")))?;
    if len < needed {
        return Err(KernelError::shape(
            kernel,
            format!(
                "{name}: {len} elements cannot hold {rows} rows of {cols} with stride {stride}"
            ),
        ));
    }
    Ok(())
}

fn check_len(kernel: &'static str, name: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len < want {
        return Err(KernelError::shape(
            kernel,
            format!("{name}: {len} elements, need {want}"),
        ));
    }
    Ok(())
}

/// A pointer tasks on several threads write through, each to its own disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user hands each task a disjoint set of elements to write.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Below this many elements a row-wise op runs on the calling thread: a rayon hop costs more.
const SERIAL_ELEMENTS: usize = 1 << 15;

/// Runs `work(row_begin, row_end)` over `t` rows, split into chunks of about `SERIAL_ELEMENTS`
/// elements run in parallel. Chunking only schedules: each row is computed the same way.
fn for_row_chunks(t: usize, cols: usize, work: impl Fn(usize, usize) + Sync) {
    let rows_per_chunk = (SERIAL_ELEMENTS / cols.max(1)).max(1);
    if t <= rows_per_chunk {
        work(0, t);
        return;
    }
    let chunks = t.div_ceil(rows_per_chunk);
    pool::for_each(chunks, |c| {
        let begin = c * rows_per_chunk;
        work(begin, (begin + rows_per_chunk).min(t));
    });
}
