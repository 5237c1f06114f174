//! How a matmul weight `[N, K]` is laid out in memory: row-major as in the checkpoint, or in the
//! panel layout the matmul micro-kernel reads directly, which the compiler writes ahead of time so
//! the runtime never repacks.
//!
//! Panel layout with panel width P: the N rows are cut into `ceil(N / P)` panels of P rows (the
//! last one padded with zero rows); inside a panel the values are k-major, so panel `p` holds,
//! for `k` in `0..K`, the P values `w[p*P + j, k]` for `j` in `0..P`. A panel is one contiguous
//! stream of `K * P` elements: a single-token matmul reads it front to back, and the micro-kernel
//! loads P output columns of one `k` with P / LANES vector loads.
//!
//! P is the micro-kernel's column width for the target ISA (`PackedLayout::for_isa`). The kernel
//! reads any supported width on any ISA, so a layout is only ever a performance choice.

use crate::KernelError;
use ir_types::CpuIsa;

/// The storage order of a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `w[n, k]` at `n * K + k`: what checkpoints hold and what the embedding gather reads
    /// fastest.
    RowMajor,
    /// Panels of P rows, k-major inside a panel (see the module documentation).
    Panels(PackedLayout),
}

/// A panel width the matmul kernels support. Construct it with [`PackedLayout::for_isa`] or
/// [`PackedLayout::new`], which rejects widths the kernels cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackedLayout {
    panel: usize,
}

/// Panel widths are whole numbers of 8-lane vectors (the narrowest vector any ISA path uses),
/// up to two AVX-512 vectors' worth of spare room.
const PANEL_QUANTUM: usize = 8;
const MAX_PANEL: usize = 64;

impl PackedLayout {
    /// The layout the matmul micro-kernel of `isa` reads with no waste: 16 columns (two AVX2
    /// vectors) for AVX2, 32 (two AVX-512 vectors) for AVX-512, 8 (one 8-lane array) for the
    /// portable path.
    pub const fn for_isa(isa: CpuIsa) -> PackedLayout {
        let panel = match isa {
            CpuIsa::Portable => 8,
            CpuIsa::Avx2 => 16,
            CpuIsa::Avx512 => 32,
        };
        PackedLayout { panel }
    }

    /// The layout of quantized weights in CUDA plans: panels of 8 rows, which the CUDA kernels
    /// read (`kernels/cuda/quant.cu`) and the portable CPU path reads too.
    pub const CUDA_QUANT: PackedLayout = PackedLayout { panel: 8 };

    /// A layout of `panel` columns: a positive multiple of 8, at most 64.
    pub fn new(panel: usize) -> Result<PackedLayout, KernelError> {
        if panel == 0 || !panel.is_multiple_of(PANEL_QUANTUM) || panel > MAX_PANEL {
            return Err(KernelError::shape(
                "packed layout",
                format!(
                    "panel width {panel} is not a multiple of {PANEL_QUANTUM} in 8..={MAX_PANEL}"
                ),
            ));
        }
        Ok(PackedLayout { panel })
    }

    /// Rows per panel (P).
    pub fn panel(self) -> usize {
        self.panel
    }

    /// Elements of an `[n, k]` matrix in this layout: `ceil(n / P) * P * k`. Saturates rather
    /// than wrapping, so an absurd shape can never match a real buffer's length.
    pub fn packed_len(self, n: usize, k: usize) -> usize {
        n.div_ceil(self.panel)
            .saturating_mul(self.panel)
            .saturating_mul(k)
    }

    /// Index of `w[row, col]` of an `[N, k]` matrix in this layout.
    pub fn index(self, k: usize, row: usize, col: usize) -> usize {
        let p = self.panel;
        (row / p) * p * k + col * p + row % p
    }

    /// Rewrites the row-major `[n, k]` matrix `w` in this layout, padding rows with
    /// `T::default()` (zero for f32, bf16 and f16). Pure: the same input gives the same output.
    pub fn pack<T: Copy + Default>(
        self,
        w: &[T],
        n: usize,
        k: usize,
    ) -> Result<Vec<T>, KernelError> {
        if n.checked_mul(k) != Some(w.len()) {
            return Err(KernelError::shape(
                "packed layout",
                format!("{} elements cannot be a {n} x {k} matrix", w.len()),
            ));
        }
        let p = self.panel;
        let mut out = vec![T::default(); self.packed_len(n, k)];
        for (panel, dst) in out.chunks_exact_mut(p * k.max(1)).enumerate() {
            let rows = (n - panel * p).min(p);
            for j in 0..rows {
                let src = &w[(panel * p + j) * k..][..k];
                for (col, &v) in src.iter().enumerate() {
                    dst[col * p + j] = v;
                }
            }
        }
        Ok(out)
    }
}

impl WeightLayout {
    /// Elements an `[n, k]` matrix occupies in this layout.
    pub fn len(self, n: usize, k: usize) -> usize {
        match self {
            WeightLayout::RowMajor => n.saturating_mul(k),
            WeightLayout::Panels(p) => p.packed_len(n, k),
        }
    }

    /// Index of `w[row, col]` of an `[N, k]` matrix.
    pub fn index(self, k: usize, row: usize, col: usize) -> usize {
        match self {
            WeightLayout::RowMajor => row * k + col,
            WeightLayout::Panels(p) => p.index(k, row, col),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn pack_places_every_element_where_index_says_and_pads_with_zeros() {
        let (n, k) = (21, 5);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32 + 1.0).collect();
        for panel in [8, 16, 32] {
            let layout = PackedLayout::new(panel).unwrap();
            let packed = layout.pack(&w, n, k).unwrap();
            assert_eq!(packed.len(), n.div_ceil(panel) * panel * k);
            assert_eq!(packed.len(), layout.packed_len(n, k));
            for row in 0..n {
                for col in 0..k {
                    assert_eq!(packed[layout.index(k, row, col)], w[row * k + col]);
                }
            }
            // Exactly the padding rows are zero (every real value is at least 1).
            let zeros = packed.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(zeros, (n.div_ceil(panel) * panel - n) * k, "panel {panel}");
        }
    }

    #[test]
    fn a_panel_is_k_major() {
        // Panel 1 of a 8-wide layout starts with w[8..16, 0], then w[8..16, 1].
        let (n, k) = (16, 3);
        let w: Vec<u32> = (0..(n * k) as u32).collect();
        let packed = PackedLayout::new(8).unwrap().pack(&w, n, k).unwrap();
        let panel1 = &packed[8 * k..];
        let want: Vec<u32> = (8..16)
            .map(|r| r * 3)
            .chain((8..16).map(|r| r * 3 + 1))
            .collect();
        assert_eq!(&panel1[..16], &want[..]);
    }

    #[test]
    fn pack_works_for_half_types_and_empty_shapes() {
        let w: Vec<bf16> = (0..6).map(|i| bf16::from_f32(i as f32)).collect();
        let packed = PackedLayout::for_isa(CpuIsa::Avx2).pack(&w, 2, 3).unwrap();
        assert_eq!(packed.len(), 48);
        assert_eq!(packed[16].to_f32(), 1.0); // w[0, 1]
        assert_eq!(packed[17].to_f32(), 4.0); // w[1, 1]
        let h: Vec<f16> = vec![];
        assert!(PackedLayout::for_isa(CpuIsa::Avx512)
            .pack(&h, 0, 7)
            .unwrap()
            .is_empty());
        assert!(PackedLayout::for_isa(CpuIsa::Portable)
            .pack(&h, 3, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn rejects_bad_widths_and_lengths() {
        for bad in [0, 4, 12, 72] {
            assert!(PackedLayout::new(bad).is_err(), "{bad}");
        }
        for isa in [CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512] {
            let p = PackedLayout::for_isa(isa);
            assert_eq!(PackedLayout::new(p.panel()).unwrap(), p);
        }
        let layout = PackedLayout::new(8).unwrap();
        assert!(layout.pack(&[0f32; 5], 2, 3).is_err());
        assert_eq!(layout.packed_len(usize::MAX, 3), usize::MAX);
    }
}
