//! Row gathers: `embedding` (rows of a stored table by token id, widened to f32) and
//! `gather_rows` (rows of an activation, e.g. the positions whose logits are wanted).
//! Every index is checked against the table before anything is copied.
//!
//! A table tied to the output head may be stored in the matmul's panel layout (one copy serves
//! both); its rows are then gathered with a stride of P elements. That costs one cache line per
//! element, a few microseconds per token, against the whole table stored twice.

use super::simd::{run_simd, store_n, Simd, SimdTask, WeightElem};
use super::{check_rows, runnable_isa, Weight, WeightData, WeightLayout};
use crate::KernelError;
use half::{bf16, f16};
use ir_types::CpuIsa;

/// `out[t] = table[ids[t]]` as f32.
///
/// Shapes: `table` `[V, cols]` f32/bf16/f16 in either layout, `ids` `[T]`, `out` `[T, cols]` f32
/// with row stride `out_stride`. An id `>= V` is an error and nothing is written.
pub fn embedding(
    isa: CpuIsa,
    table: &Weight,
    ids: &[u32],
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "embedding";
    table.check(NAME)?;
    check_ids(NAME, ids, table.rows)?;
    check_rows(NAME, "out", out.len(), ids.len(), table.cols, out_stride)?;
    if let WeightLayout::Panels(layout) = table.layout {
        match table.data {
            WeightData::F32(d) => {
                gather_panels(d, layout.panel(), table.cols, ids, out, out_stride)
            }
            WeightData::BF16(d) => {
                gather_panels(d, layout.panel(), table.cols, ids, out, out_stride)
            }
            WeightData::F16(d) => {
                gather_panels(d, layout.panel(), table.cols, ids, out, out_stride)
            }
        }
        return Ok(());
    }
    let isa = runnable_isa(isa);
    let (cols, out) = (
        table.cols,
        Out {
            ptr: out.as_mut_ptr(),
            stride: out_stride,
        },
    );
    match table.data {
        WeightData::F32(d) => run_simd(
            isa,
            Widen {
                table: d,
                cols,
                ids,
                out,
            },
        ),
        WeightData::BF16(d) => run_simd(
            isa,
            Widen::<bf16> {
                table: d,
                cols,
                ids,
                out,
            },
        ),
        WeightData::F16(d) => run_simd(
            isa,
            Widen::<f16> {
                table: d,
                cols,
                ids,
                out,
            },
        ),
    }
    Ok(())
}

/// Rows of a table in the panel layout: element `[id, c]` sits at
/// `(id / P) * P * cols + c * P + id % P`. The ids and `out` were checked by the caller.
fn gather_panels<E: WeightElem>(
    table: &[E],
    panel: usize,
    cols: usize,
    ids: &[u32],
    out: &mut [f32],
    out_stride: usize,
) {
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let column = &table[(id / panel) * panel * cols + id % panel..];
        let row = &mut out[t * out_stride..][..cols];
        for (c, o) in row.iter_mut().enumerate() {
            *o = column[c * panel].to_f32();
        }
    }
}

/// `out[t] = x[rows[t]]` for the first `cols` elements of each row.
///
/// Shapes: `x` `[R, cols]` f32 with row stride `x_stride` (R is however many rows `x` holds),
/// `rows` `[T]`, `out` `[T, cols]` f32.
pub fn gather_rows(
    x: &[f32],
    x_stride: usize,
    rows: &[u32],
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    const NAME: &str = "gather_rows";
    // Rows that fit entirely inside `x`.
    let available = if cols == 0 {
        usize::MAX
    } else if x.len() < cols {
        0
    } else {
        (x.len() - cols) / x_stride.max(1) + 1
    };
    check_ids(NAME, rows, available)?;
    check_rows(NAME, "out", out.len(), rows.len(), cols, out_stride)?;
    if rows.len() > 1 && x_stride < cols {
        return Err(KernelError::shape(
            NAME,
            format!("x: stride {x_stride} < {cols} columns"),
        ));
    }
    for (t, &r) in rows.iter().enumerate() {
        let src = &x[r as usize * x_stride..][..cols];
        out[t * out_stride..][..cols].copy_from_slice(src);
    }
    Ok(())
}

fn check_ids(kernel: &'static str, ids: &[u32], rows: usize) -> Result<(), KernelError> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(&index) => Err(KernelError::IndexOutOfRange {
            kernel,
            index,
            rows,
        }),
        None => Ok(()),
    }
}

#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
}

struct Widen<'a, E> {
    table: &'a [E],
    cols: usize,
    ids: &'a [u32],
    out: Out,
}

impl<E: WeightElem> SimdTask for Widen<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: `embedding` checked the ids against the table and `out` for T rows.
        unsafe {
            for (t, &id) in self.ids.iter().enumerate() {
                let src = self.table.as_ptr().add(id as usize * self.cols);
                let dst = self.out.ptr.add(t * self.out.stride);
                let mut i = 0;
                while i + S::LANES <= self.cols {
                    S::store(dst.add(i), E::load::<S>(src.add(i)));
                    i += S::LANES;
                }
                if i < self.cols {
                    let n = self.cols - i;
                    store_n::<S>(dst.add(i), E::load_part::<S>(src.add(i), n), n);
                }
            }
        }
    }
}

/// Scalar gathers.
pub mod reference {
    use super::super::Weight;

    /// Same contract as [`super::embedding`]; panics on a bad id.
    pub fn embedding(table: &Weight, ids: &[u32], out: &mut [f32], out_stride: usize) {
        for (t, &id) in ids.iter().enumerate() {
            for i in 0..table.cols {
                out[t * out_stride + i] = table.get_f32(id as usize, i);
            }
        }
    }

    /// Same contract as [`super::gather_rows`]; panics on a bad row.
    pub fn gather_rows(
        x: &[f32],
        x_stride: usize,
        rows: &[u32],
        cols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for (t, &r) in rows.iter().enumerate() {
            for i in 0..cols {
                out[t * out_stride + i] = x[r as usize * x_stride + i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{isas_to_test, max_abs_diff, Rng};
    use super::super::PackedLayout;
    use super::*;

    #[test]
    fn embedding_matches_reference_for_every_dtype() {
        let mut rng = Rng::new(12);
        for isa in isas_to_test() {
            for &(v, cols) in &[(5, 1), (50, 37), (100, 576)] {
                let f = rng.vec(v * cols, 3.0);
                let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
                let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
                let ids: Vec<u32> = (0..7).map(|_| rng.below(v) as u32).collect();
                for data in [
                    WeightData::F32(&f),
                    WeightData::BF16(&b),
                    WeightData::F16(&h),
                ] {
                    let table = Weight::row_major(data, v, cols);
                    let stride = cols + 2;
                    let mut got = vec![-1.0; ids.len() * stride];
                    let mut want = vec![-1.0; ids.len() * stride];
                    embedding(isa, &table, &ids, &mut got, stride).unwrap();
                    reference::embedding(&table, &ids, &mut want, stride);
                    println!(
                        "embedding {isa:?} {} v={v} cols={cols}: max abs diff {:.3e}",
                        data.dtype(),
                        max_abs_diff(&got, &want)
                    );
                    assert_eq!(got, want, "{isa:?}: widening is exact");
                }
                // The same table in each panel layout gives the same rows.
                let row_major = {
                    let table = Weight::row_major(WeightData::BF16(&b), v, cols);
                    let mut out = vec![-1.0; ids.len() * cols];
                    embedding(isa, &table, &ids, &mut out, cols).unwrap();
                    out
                };
                for panel in [8, 16, 32] {
                    let layout = PackedLayout::new(panel).unwrap();
                    let packed = layout.pack(&b, v, cols).unwrap();
                    let table = Weight {
                        data: WeightData::BF16(&packed),
                        rows: v,
                        cols,
                        layout: WeightLayout::Panels(layout),
                    };
                    let mut got = vec![-1.0; ids.len() * cols];
                    embedding(isa, &table, &ids, &mut got, cols).unwrap();
                    assert_eq!(got, row_major, "{isa:?} panel {panel}");
                    let mut want = vec![-1.0; ids.len() * cols];
                    reference::embedding(&table, &ids, &mut want, cols);
                    assert_eq!(want, row_major, "reference, panel {panel}");
                }
            }
        }
    }

    #[test]
    fn out_of_range_ids_are_errors_and_write_nothing() {
        let f = vec![1.0f32; 12];
        let table = Weight::row_major(WeightData::F32(&f), 3, 4);
        let mut out = vec![0.0; 8];
        let err = embedding(CpuIsa::Portable, &table, &[0, 3], &mut out, 4).unwrap_err();
        assert_eq!(
            err,
            KernelError::IndexOutOfRange {
                kernel: "embedding",
                index: 3,
                rows: 3
            }
        );
        assert!(out.iter().all(|&v| v == 0.0));
        embedding(CpuIsa::Portable, &table, &[2, 1], &mut out, 4).unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn gather_rows_copies_and_checks_rows() {
        let x: Vec<f32> = (0..30).map(|i| i as f32).collect();
        let mut out = vec![0.0; 6];
        gather_rows(&x, 10, &[2, 0], 3, &mut out, 3).unwrap();
        assert_eq!(out, [20.0, 21.0, 22.0, 0.0, 1.0, 2.0]);
        let mut want = vec![0.0; 6];
        reference::gather_rows(&x, 10, &[2, 0], 3, &mut want, 3);
        assert_eq!(out, want);
        assert!(matches!(
            gather_rows(&x, 10, &[3], 3, &mut out, 3),
            Err(KernelError::IndexOutOfRange { index: 3, .. })
        ));
        // The last row of a strided buffer may be short of a full stride.
        gather_rows(&x[..23], 10, &[2], 3, &mut out, 3).unwrap();
        assert!(gather_rows(&x[..22], 10, &[2], 3, &mut out, 3).is_err());
    }
}
