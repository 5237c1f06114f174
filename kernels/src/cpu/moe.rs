//! Mixture of experts: `out[T, C] = sum over each token's top-k experts e of
//! w_e * (silu(x @ G_e^T) * (x @ U_e^T)) @ D_e^T`, with the experts' weights stacked:
//! `gate_up` `[E * 2I, C]` (expert e's rows `[G_e; U_e]` at `e * 2I`) and `down` `[E * C, I]`
//! (expert e's rows at `e * C`), both row-major so one expert is one contiguous slice.
//!
//! The stacked weights are plain (f32, bf16, f16) or quantized ([`Experts::Quant`]: codes in the
//! matmul's panels, each expert's rows whole panels, so an expert is a contiguous run of each
//! part and its matmul is `matmul_quant` on that slice).
//!
//! Routing, per token: scores = softmax or sigmoid of `x @ router^T` (computed in f64); the
//! `top_k` experts with the largest `score + bias` are picked (the bias only selects; ties go
//! to the lower expert index); their weights are their scores, divided by `max(sum, 1e-12)` when
//! `normalize`, times `scaling`. Group-limited routing first keeps only the experts of the best
//! groups in the running (`MoeRouting::SigmoidGrouped`).
//!
//! The fast path groups tokens by expert: for each expert that received tokens, in expert order,
//! it gathers those rows, runs the library matmul for gate-up, `silu_mul`, and the down matmul
//! over just them, and scatter-adds the weighted rows into `out`. Each output row sums its
//! experts in ascending expert order whatever the batch, so results do not depend on threads.

use super::quant::{matmul_quant, QuantWeight};
use super::{check_rows, matmul, runnable_isa, silu_mul, Weight, WeightData, WeightLayout};
use crate::KernelError;
use ir_types::{ActQuant, CpuIsa, MoeRouting};

const NAME: &str = "moe";

/// Smallest routing-weight sum a normalization divides by.
const NORM_MIN: f64 = 1e-12;

/// The routing attributes of a mixture-of-experts layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeParams {
    pub experts: usize,
    pub top_k: usize,
    pub routing: MoeRouting,
    pub normalize: bool,
    pub scaling: f32,
}

/// The picked experts of one token and their weights, best first.
pub type Route = Vec<(usize, f32)>;

/// A layer's stacked expert weights (`gate_up` `[E * 2I, C]` or `down` `[E * C, I]`).
#[derive(Clone, Copy, Debug)]
pub enum Experts<'a> {
    /// Row-major, in the checkpoint's element type.
    Plain(Weight<'a>),
    /// Quantized codes in panels, with how the matmul treats activations (as they are for the
    /// A16 schemes, rounded per token row for A8 and FP8: see `quant`).
    Quant(QuantWeight<'a>, ActQuant),
}

impl<'a> Experts<'a> {
    pub fn rows(&self) -> usize {
        match self {
            Experts::Plain(w) => w.rows,
            Experts::Quant(w, _) => w.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Experts::Plain(w) => w.cols,
            Experts::Quant(w, _) => w.cols,
        }
    }

    /// Element `[row, col]` as the kernels compute with it.
    pub fn get_f32(&self, row: usize, col: usize) -> f32 {
        match self {
            Experts::Plain(w) => w.get_f32(row, col),
            Experts::Quant(w, _) => w.get_f32(row, col),
        }
    }

    /// Bytes of one expert's `rows` rows as stored (codes, scales and minimums when quantized).
    pub fn expert_bytes(&self, rows: usize) -> usize {
        match self {
            Experts::Plain(w) => rows * w.cols * w.data.dtype().size_bytes(),
            Experts::Quant(w, _) => {
                let sizes = super::quant::quant_sizes(&w.format, w.layout, rows, w.cols);
                sizes.code_bytes + 2 * (sizes.scales + sizes.mins)
            }
        }
    }

    /// Expert `e`'s `rows` rows, a weight of their own; an error where they do not exist or (when
    /// quantized) are not whole panels.
    pub fn expert(&self, e: usize, rows: usize) -> Result<Experts<'a>, KernelError> {
        let out_of_range = e
            .checked_add(1)
            .and_then(|n| n.checked_mul(rows))
            .is_none_or(|end| end > self.rows());
        if out_of_range {
            return Err(KernelError::shape(
                NAME,
                format!("expert {e} of {rows} rows lies past {} rows", self.rows()),
            ));
        }
        match self {
            Experts::Plain(w) => Ok(Experts::Plain(expert(w, e, rows))),
            Experts::Quant(w, act) => w
                .panel_rows(e * rows, rows)
                .map(|q| Experts::Quant(q, *act))
                .ok_or_else(|| {
                    KernelError::shape(
                        NAME,
                        format!(
                            "an expert's {rows} rows are not whole panels of {}",
                            w.layout.panel()
                        ),
                    )
                }),
        }
    }

    /// `out[T, rows] = x[T, cols] @ self^T`.
    pub fn matmul(
        &self,
        isa: CpuIsa,
        x: &[f32],
        x_stride: usize,
        t: usize,
        out: &mut [f32],
        out_stride: usize,
    ) -> Result<(), KernelError> {
        match self {
            Experts::Plain(w) => matmul(isa, x, x_stride, t, w, None, out, out_stride),
            Experts::Quant(w, act) => {
                matmul_quant(isa, *act, x, x_stride, t, w, None, out, out_stride)
            }
        }
    }

    /// The stacked weight is whole and (plain) row-major, or (quantized) consistent, with each
    /// expert's `rows_per_expert` rows whole panels.
    fn check(&self, what: &str, rows_per_expert: usize) -> Result<(), KernelError> {
        match self {
            Experts::Plain(w) => {
                if w.layout != WeightLayout::RowMajor {
                    return Err(KernelError::shape(
                        NAME,
                        format!("stacked {what} must be row-major"),
                    ));
                }
                if w.rows.checked_mul(w.cols) != Some(w.data.len()) {
                    return Err(KernelError::shape(
                        NAME,
                        format!("{what} has {} elements", w.data.len()),
                    ));
                }
            }
            Experts::Quant(w, _) => {
                w.check(NAME)?;
                if !rows_per_expert.is_multiple_of(w.layout.panel()) {
                    return Err(KernelError::shape(
                        NAME,
                        format!(
                            "quantized {what}: an expert's {rows_per_expert} rows are not whole \
                             panels of {}",
                            w.layout.panel()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Sizes of the stacked weights: `(C, I)` after checking every argument.
#[allow(clippy::too_many_arguments)]
fn check(
    x_len: usize,
    x_stride: usize,
    t: usize,
    router: &Weight,
    bias: Option<&[f32]>,
    gate_up: &Experts,
    down: &Experts,
    p: &MoeParams,
    out_len: usize,
    out_stride: usize,
) -> Result<(usize, usize), KernelError> {
    let (e, c) = (p.experts, router.cols);
    let bad = |what: String| Err(KernelError::shape(NAME, what));
    if e == 0 || p.top_k == 0 || p.top_k > e {
        return bad(format!("picks {} of {e} experts", p.top_k));
    }
    if let Some(why) = p.routing.group_error(e, p.top_k) {
        return bad(why);
    }
    if router.rows != e {
        return bad(format!("router has {} rows for {e} experts", router.rows));
    }
    if bias.is_some_and(|b| b.len() != e) {
        return bad(format!("router bias is not {e} values"));
    }
    if gate_up.cols() != c || !gate_up.rows().is_multiple_of(2 * e) || gate_up.rows() == 0 {
        return bad(format!(
            "gate_up is [{}, {}], not [{e} * 2I, {c}]",
            gate_up.rows(),
            gate_up.cols()
        ));
    }
    let i = gate_up.rows() / (2 * e);
    if e.checked_mul(c) != Some(down.rows()) || down.cols() != i {
        return bad(format!(
            "down is [{}, {}], not [{e} * {c}, {i}]",
            down.rows(),
            down.cols()
        ));
    }
    gate_up.check("gate_up", 2 * i)?;
    down.check("down", c)?;
    check_rows(NAME, "x", x_len, t, c, x_stride)?;
    check_rows(NAME, "out", out_len, t, c, out_stride)?;
    Ok((c, i))
}

/// Expert `e`'s `rows` rows of a stacked row-major weight.
fn expert<'a>(w: &Weight<'a>, e: usize, rows: usize) -> Weight<'a> {
    let (start, len) = (e * rows * w.cols, rows * w.cols);
    let data = match w.data {
        WeightData::F32(d) => WeightData::F32(&d[start..start + len]),
        WeightData::BF16(d) => WeightData::BF16(&d[start..start + len]),
        WeightData::F16(d) => WeightData::F16(&d[start..start + len]),
    };
    Weight::row_major(data, rows, w.cols)
}

/// One token's route from its router logits: scores, biased selection, weights.
pub fn route(logits: &[f32], bias: Option<&[f32]>, p: &MoeParams) -> Route {
    let scores: Vec<f64> = match p.routing {
        MoeRouting::Softmax => {
            let max = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
            let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.iter().map(|v| v / sum).collect()
        }
        MoeRouting::Sigmoid | MoeRouting::SigmoidGrouped { .. } => logits
            .iter()
            .map(|&l| 1.0 / (1.0 + (-(l as f64)).exp()))
            .collect(),
    };
    let mut keys: Vec<f64> = (0..scores.len())
        .map(|e| scores[e] + bias.map_or(0.0, |b| b[e] as f64))
        .collect();
    if let MoeRouting::SigmoidGrouped { groups, top_groups } = p.routing {
        mask_groups(&mut keys, groups as usize, top_groups as usize);
    }
    let key = |e: usize| keys[e];
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable sort: equal keys keep ascending expert order. NaN sorts last.
    order.sort_by(|&a, &b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or_else(|| key(a).is_nan().cmp(&key(b).is_nan()))
    });
    order.truncate(p.top_k);
    let sum: f64 = order.iter().map(|&e| scores[e]).sum();
    let div = if p.normalize { sum.max(NORM_MIN) } else { 1.0 };
    order
        .into_iter()
        .map(|e| (e, (scores[e] / div * p.scaling as f64) as f32))
        .collect()
}

/// Group-limited selection: ranks `groups` equal groups of experts by the sum of their two best
/// keys and sets the keys of experts outside the best `top_groups` groups to 0, as DeepSeek-V3's
/// reference does (a masked expert can still win over a negative key; with sigmoid scores and
/// small biases none is negative). Ties between groups go to the lower group.
fn mask_groups(keys: &mut [f64], groups: usize, top_groups: usize) {
    if groups == 0 || !keys.len().is_multiple_of(groups) {
        return;
    }
    let size = keys.len() / groups;
    let rank: Vec<f64> = keys
        .chunks_exact(size)
        .map(|group| {
            let (mut best, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for &k in group {
                if k > best {
                    second = best;
                    best = k;
                } else if k > second {
                    second = k;
                }
            }
            best + second
        })
        .collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| {
        rank[b]
            .partial_cmp(&rank[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for &g in &order[top_groups.min(groups)..] {
        keys[g * size..][..size].fill(0.0);
    }
}

/// The fused layer, grouped by expert (see the module doc).
///
/// Shapes: `x` `[T, C]` with row stride `x_stride`; `router` `[E, C]`; `bias` `[E]`; `gate_up`
/// `[E * 2I, C]` and `down` `[E * C, I]`; `out` `[T, C]` with row stride `out_stride`.
#[allow(clippy::too_many_arguments)]
pub fn moe(
    isa: CpuIsa,
    x: &[f32],
    x_stride: usize,
    t: usize,
    router: &Weight,
    bias: Option<&[f32]>,
    gate_up: &Experts,
    down: &Experts,
    params: &MoeParams,
    out: &mut [f32],
    out_stride: usize,
) -> Result<(), KernelError> {
    let (c, i) = check(
        x.len(),
        x_stride,
        t,
        router,
        bias,
        gate_up,
        down,
        params,
        out.len(),
        out_stride,
    )?;
    if t == 0 {
        return Ok(());
    }
    let isa = runnable_isa(isa);
    let e_count = params.experts;
    let mut logits = vec![0.0f32; t * e_count];
    matmul(isa, x, x_stride, t, router, None, &mut logits, e_count)?;
    // (token, weight) per expert, tokens ascending.
    let mut groups: Vec<Vec<(usize, f32)>> = vec![vec![]; e_count];
    for (token, row) in logits.chunks_exact(e_count).enumerate() {
        for (e, w) in route(row, bias, params) {
            groups[e].push((token, w));
        }
    }
    for row in 0..t {
        out[row * out_stride..][..c].fill(0.0);
    }
    let (mut xs, mut gu, mut act, mut y) = (vec![], vec![], vec![], vec![]);
    for (e, group) in groups.iter().enumerate() {
        let n = group.len();
        if n == 0 {
            continue;
        }
        xs.resize(n * c, 0.0);
        for (j, &(token, _)) in group.iter().enumerate() {
            xs[j * c..][..c].copy_from_slice(&x[token * x_stride..][..c]);
        }
        gu.resize(n * 2 * i, 0.0);
        act.resize(n * i, 0.0);
        y.resize(n * c, 0.0);
        gate_up
            .expert(e, 2 * i)?
            .matmul(isa, &xs, c, n, &mut gu, 2 * i)?;
        silu_mul(isa, &gu, 2 * i, n, i, &mut act, i)?;
        down.expert(e, c)?.matmul(isa, &act, i, n, &mut y, c)?;
        for (j, &(token, w)) in group.iter().enumerate() {
            let o = &mut out[token * out_stride..][..c];
            for (o, v) in o.iter_mut().zip(&y[j * c..][..c]) {
                *o += w * v;
            }
        }
    }
    Ok(())
}

pub mod reference {
    use super::super::quant::quantize_activation_row;
    use super::*;

    /// `row` as a quantized expert weight `w` of the A8 and FP8 schemes reads it: rounded to
    /// f32, then to the scheme's grid (`quantize_activation_row`); unchanged for the others.
    fn on_grid(w: &Experts, row: Vec<f64>) -> Vec<f64> {
        let act = match w {
            Experts::Quant(_, act) if *act != ActQuant::None => *act,
            _ => return row,
        };
        let row: Vec<f32> = row.iter().map(|&v| v as f32).collect();
        let mut q = vec![0.0f32; row.len()];
        let scale = quantize_activation_row(act, &row, &mut q) as f64;
        q.iter().map(|&v| v as f64 * scale).collect()
    }

    /// One token at a time, every picked expert's MLP in f64 on the weights' values (quantized
    /// ones as the kernels form them), summed best expert first. A8 and FP8 experts read each
    /// row (the token's, then the act row) on the scheme's grid, as their kernels do; other
    /// activations are not rounded.
    #[allow(clippy::too_many_arguments)]
    pub fn moe(
        x: &[f32],
        x_stride: usize,
        t: usize,
        router: &Weight,
        bias: Option<&[f32]>,
        gate_up: &Experts,
        down: &Experts,
        params: &MoeParams,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (c, e_count) = (router.cols, params.experts);
        let i = gate_up.rows() / (2 * e_count);
        for token in 0..t {
            let xr = &x[token * x_stride..][..c];
            let dot = |w: &Experts, row: usize, v: &[f64]| -> f64 {
                (0..w.cols())
                    .map(|k| w.get_f32(row, k) as f64 * v[k])
                    .sum::<f64>()
            };
            let xd: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
            let router = Experts::Plain(*router);
            let logits: Vec<f32> = (0..e_count).map(|e| dot(&router, e, &xd) as f32).collect();
            let xd = on_grid(gate_up, xd);
            let mut acc = vec![0.0f64; c];
            for (e, w) in route(&logits, bias, params) {
                let h: Vec<f64> = (0..i)
                    .map(|j| {
                        let g = dot(gate_up, e * 2 * i + j, &xd);
                        let u = dot(gate_up, e * 2 * i + i + j, &xd);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                let h = on_grid(down, h);
                for (col, a) in acc.iter_mut().enumerate() {
                    *a += w as f64 * dot(down, e * c + col, &h);
                }
            }
            for (o, a) in out[token * out_stride..][..c].iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::{PackedQuant, QuantFormat};
    use super::super::test_util::{isas_to_test, max_abs_diff, random_quant_matrix, Rng};
    use super::super::PackedLayout;
    use super::*;
    use ir_types::CodeFormat;

    struct Case {
        e: usize,
        c: usize,
        i: usize,
        router: Vec<f32>,
        bias: Option<Vec<f32>>,
        gate_up: Vec<f32>,
        down: Vec<f32>,
    }

    impl Case {
        fn random(rng: &mut Rng, e: usize, c: usize, i: usize, bias: bool) -> Case {
            Case {
                e,
                c,
                i,
                router: rng.vec(e * c, 1.0),
                bias: bias.then(|| rng.vec(e, 0.3)),
                gate_up: rng.vec(e * 2 * i * c, 0.5),
                down: rng.vec(e * c * i, 0.5),
            }
        }

        /// (fused, reference) outputs with a row stride wider than C.
        fn run(&self, isa: CpuIsa, x: &[f32], t: usize, p: &MoeParams) -> (Vec<f32>, Vec<f32>) {
            let (c, stride) = (self.c, self.c + 3);
            let router = Weight::row_major(WeightData::F32(&self.router), self.e, c);
            let gate_up = Experts::Plain(Weight::row_major(
                WeightData::F32(&self.gate_up),
                self.e * 2 * self.i,
                c,
            ));
            let down = Experts::Plain(Weight::row_major(
                WeightData::F32(&self.down),
                self.e * c,
                self.i,
            ));
            let bias = self.bias.as_deref();
            let mut got = vec![7.0; t * stride];
            let mut want = vec![7.0; t * stride];
            moe(
                isa, x, c, t, &router, bias, &gate_up, &down, p, &mut got, stride,
            )
            .unwrap();
            reference::moe(
                x, c, t, &router, bias, &gate_up, &down, p, &mut want, stride,
            );
            (got, want)
        }
    }

    fn params(e: usize, top_k: usize, routing: MoeRouting, normalize: bool) -> MoeParams {
        MoeParams {
            experts: e,
            top_k,
            routing,
            normalize,
            scaling: 1.0,
        }
    }

    #[test]
    fn grouped_matches_reference_on_random_inputs() {
        let mut rng = Rng::new(7);
        for isa in isas_to_test() {
            for (e, c, i, t, top_k, routing, normalize, bias) in [
                (8, 24, 10, 13, 2, MoeRouting::Softmax, true, false),
                (4, 17, 9, 5, 2, MoeRouting::Softmax, false, false),
                (8, 33, 6, 40, 3, MoeRouting::Softmax, true, true),
                (5, 16, 7, 1, 1, MoeRouting::Sigmoid, true, true),
            ] {
                let case = Case::random(&mut rng, e, c, i, bias);
                let x = rng.vec(t * c, 1.0);
                let p = params(e, top_k, routing, normalize);
                let (got, want) = case.run(isa, &x, t, &p);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-3, "{isa:?}: output is not trivially zero");
                assert!(
                    max_abs_diff(&got, &want) <= 1e-5 * scale.max(1.0),
                    "{isa:?} e={e} t={t}: {}",
                    max_abs_diff(&got, &want)
                );
                // The padding between rows is untouched.
                assert!(got.chunks(c + 3).all(|r| r[c..] == [7.0; 3]));
            }
        }
    }

    #[test]
    fn idle_experts_and_one_popular_expert() {
        let mut rng = Rng::new(11);
        let (e, c, i, t) = (6, 12, 8, 9);
        let mut case = Case::random(&mut rng, e, c, i, false);
        // Positive inputs, and expert 3's router row far larger than the others (all zero): every
        // token's first pick is 3, and the tie among the rest goes to expert 0. Experts 1, 2, 4,
        // 5 receive no token.
        case.router = vec![0.0; e * c];
        case.router[3 * c..4 * c].fill(1.0);
        let x: Vec<f32> = rng.vec(t * c, 1.0).iter().map(|v| v.abs() + 0.5).collect();
        let p = params(e, 2, MoeRouting::Softmax, true);
        let router = Weight::row_major(WeightData::F32(&case.router), e, c);
        let mut logits = vec![0.0; t * e];
        matmul(CpuIsa::Portable, &x, c, t, &router, None, &mut logits, e).unwrap();
        for row in logits.chunks(e) {
            let r = route(row, None, &p);
            assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 0]);
            assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6, "normalized: {r:?}");
        }
        for isa in isas_to_test() {
            let (got, want) = case.run(isa, &x, t, &p);
            assert!(max_abs_diff(&got, &want) <= 1e-5, "{isa:?}");
        }
    }

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let p = params(4, 2, MoeRouting::Softmax, false);
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let bias = [0.0f32, 0.0, 0.0, 10.0];
        let r = route(&logits, Some(&bias), &p);
        assert_eq!(r[0].0, 3);
        assert_eq!(r[1].0, 0);
        let sum: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((r[0].1 as f64 - (-1.0f64).exp() / sum).abs() < 1e-7);
        assert!((r[1].1 as f64 - 2.0f64.exp() / sum).abs() < 1e-7);
    }

    #[test]
    fn group_limited_routing_picks_within_the_best_groups() {
        // Two groups of four. Group 0's best two keys sum to 1.6 (0.9 + 0.7), group 1's to 1.7
        // (0.95 + 0.75) after its bias: only group 1's experts compete, though expert 0 has the
        // second largest score.
        let p = MoeParams {
            experts: 8,
            top_k: 2,
            routing: MoeRouting::SigmoidGrouped {
                groups: 2,
                top_groups: 1,
            },
            normalize: true,
            scaling: 2.5,
        };
        let sigmoid_inverse = |s: f64| (s / (1.0 - s)).ln() as f32;
        let scores = [0.9, 0.7, 0.1, 0.1, 0.95, 0.65, 0.1, 0.2];
        let logits: Vec<f32> = scores.iter().map(|&s| sigmoid_inverse(s)).collect();
        let mut bias = [0.0f32; 8];
        bias[5] = 0.1;
        let r = route(&logits, Some(&bias), &p);
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![4, 5]);
        // Weighted by the unbiased scores, normalized, then scaled.
        assert!((r[0].1 as f64 - 2.5 * 0.95 / 1.6).abs() < 1e-6, "{r:?}");
        assert!((r[1].1 as f64 - 2.5 * 0.65 / 1.6).abs() < 1e-6, "{r:?}");
        // Without the group limit expert 0 would be picked.
        let ungrouped = MoeParams {
            routing: MoeRouting::Sigmoid,
            ..p
        };
        let r = route(&logits, Some(&bias), &ungrouped);
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![4, 0]);
        // The fused layer agrees with the reference under group-limited routing.
        let mut rng = Rng::new(13);
        let case = Case::random(&mut rng, 8, 16, 6, true);
        let x = rng.vec(11 * 16, 1.0);
        for isa in isas_to_test() {
            let (got, want) = case.run(isa, &x, 11, &p);
            assert!(max_abs_diff(&got, &want) <= 1e-5, "{isa:?}");
        }
    }

    /// Stacked experts of random codes in `isa`'s panels: gate_up `[e * 2i, c]`, down `[e * c, i]`.
    fn quantized_experts(
        rng: &mut Rng,
        isa: CpuIsa,
        format: QuantFormat,
        (e, c, i): (usize, usize, usize),
    ) -> [PackedQuant; 2] {
        let layout = PackedLayout::for_isa(isa);
        [(e * 2 * i, c), (e * c, i)].map(|(rows, cols)| {
            random_quant_matrix(rng, format, rows, cols)
                .pack(layout)
                .unwrap()
        })
    }

    fn view<'a>(
        packed: &'a PackedQuant,
        isa: CpuIsa,
        format: QuantFormat,
        rows: usize,
        cols: usize,
        act: ActQuant,
    ) -> Experts<'a> {
        let w = QuantWeight {
            format,
            layout: PackedLayout::for_isa(isa),
            rows,
            cols,
            codes: &packed.codes,
            scales: &packed.scales,
            mins: &packed.mins,
        };
        Experts::Quant(w, act)
    }

    /// Token by token, each picked expert's MLP on that token's row alone through the expert's
    /// own weight slice, summed in ascending expert order: the unfused graph of one token.
    #[allow(clippy::too_many_arguments)]
    fn unfused(
        isa: CpuIsa,
        x: &[f32],
        t: usize,
        router: &Weight,
        gate_up: &Experts,
        down: &Experts,
        p: &MoeParams,
    ) -> Vec<f32> {
        let (c, i) = (router.cols, down.cols());
        let mut out = vec![0.0f32; t * c];
        for token in 0..t {
            let row = &x[token * c..][..c];
            let mut logits = vec![0.0f32; p.experts];
            matmul(isa, row, c, 1, router, None, &mut logits, p.experts).unwrap();
            let mut picks = route(&logits, None, p);
            picks.sort_by_key(|&(e, _)| e);
            let (mut gu, mut act, mut y) = (vec![0.0; 2 * i], vec![0.0; i], vec![0.0; c]);
            for (e, w) in picks {
                let g = gate_up.expert(e, 2 * i).unwrap();
                g.matmul(isa, row, c, 1, &mut gu, 2 * i).unwrap();
                silu_mul(isa, &gu, 2 * i, 1, i, &mut act, i).unwrap();
                down.expert(e, c)
                    .unwrap()
                    .matmul(isa, &act, i, 1, &mut y, c)
                    .unwrap();
                for (o, v) in out[token * c..][..c].iter_mut().zip(&y) {
                    *o += w * v;
                }
            }
        }
        out
    }

    #[test]
    fn quantized_experts_match_the_reference_and_the_unfused_graph() {
        let mut rng = Rng::new(17);
        let (e, c, i, t) = (6, 64, 32, 9);
        let p = params(e, 2, MoeRouting::Softmax, true);
        let router_values = rng.vec(e * c, 1.0);
        let router = Weight::row_major(WeightData::F32(&router_values), e, c);
        let x = rng.vec(t * c, 1.0);
        let formats = [
            (CodeFormat::Int(8), 32, false, ActQuant::None),
            (CodeFormat::Int(4), 32, true, ActQuant::None),
            (CodeFormat::Int(2), 16, true, ActQuant::None),
            (CodeFormat::Int(8), 32, false, ActQuant::Int8PerToken),
            (CodeFormat::Int(4), 32, true, ActQuant::Int8PerToken),
            (CodeFormat::Fp8E4M3, 32, false, ActQuant::Fp8PerToken),
        ];
        for isa in isas_to_test() {
            for (codes, group, asymmetric, act) in formats {
                let format = QuantFormat {
                    codes,
                    group,
                    asymmetric,
                };
                let packed = quantized_experts(&mut rng, isa, format, (e, c, i));
                let gate_up = view(&packed[0], isa, format, e * 2 * i, c, act);
                let down = view(&packed[1], isa, format, e * c, i, act);
                let mut got = vec![0.0f32; t * c];
                moe(
                    isa, &x, c, t, &router, None, &gate_up, &down, &p, &mut got, c,
                )
                .unwrap();
                let label = format!("{isa:?} {codes:?} g{group} {act:?}");
                // The unfused graph runs the same kernels on the same rows: the same bits.
                let want = unfused(isa, &x, t, &router, &gate_up, &down, &p);
                assert_eq!(got, want, "{label}: fused and unfused differ");
                // Against the f64 reference on the weights' values: for the A16 schemes (whose
                // activations keep 16 bits per block of 32) as they are, for A8 and FP8 with each
                // row an expert matmul reads put on the scheme's grid first.
                let mut want = vec![0.0f32; t * c];
                reference::moe(&x, c, t, &router, None, &gate_up, &down, &p, &mut want, c);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-3, "{label}: output is not trivially zero");
                let diff = max_abs_diff(&got, &want);
                assert!(diff <= 1e-4 * scale, "{label}: {diff} of {scale}");
            }
        }
    }

    #[test]
    fn quantized_experts_that_split_a_panel_are_refused() {
        let mut rng = Rng::new(19);
        let isa = CpuIsa::Portable; // panels of 8 rows
        let format = QuantFormat {
            codes: CodeFormat::Int(4),
            group: 16,
            asymmetric: false,
        };
        // I = 6: an expert's 12 gate-up rows are a panel and a half.
        let (e, c, i) = (4, 16, 6);
        let gate_up = random_quant_matrix(&mut rng, format, e * 2 * i, c)
            .pack(PackedLayout::for_isa(isa))
            .unwrap();
        let down = Experts::Plain(Weight::row_major(
            WeightData::F32(&[0.0; 4 * 16 * 6]),
            e * c,
            i,
        ));
        let gate_up = view(&gate_up, isa, format, e * 2 * i, c, ActQuant::None);
        let router = Weight::row_major(WeightData::F32(&[0.0; 4 * 16]), e, c);
        let (x, mut out) = (vec![1.0; 2 * c], vec![0.0; 2 * c]);
        let p = params(e, 2, MoeRouting::Softmax, true);
        let err = moe(
            isa, &x, c, 2, &router, None, &gate_up, &down, &p, &mut out, c,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("12 rows are not whole panels of 8"),
            "{err}"
        );
        assert!(gate_up.expert(1, 2 * i).is_err());
        assert!(gate_up.expert(6, 8).is_err(), "past the last row");
        assert!(gate_up.expert(5, 8).is_ok(), "whole panels inside");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = vec![0.0f32; 4 * 8];
        let router = Weight::row_major(WeightData::F32(&w), 4, 8);
        let gu = vec![0.0f32; 4 * 2 * 3 * 8];
        let gate_up = Experts::Plain(Weight::row_major(WeightData::F32(&gu), 4 * 2 * 3, 8));
        let d = vec![0.0f32; 4 * 8 * 2];
        let down = Experts::Plain(Weight::row_major(WeightData::F32(&d), 4 * 8, 2));
        let x = vec![0.0; 2 * 8];
        let mut out = vec![0.0; 2 * 8];
        let p = params(4, 2, MoeRouting::Softmax, true);
        let err = moe(
            CpuIsa::Portable,
            &x,
            8,
            2,
            &router,
            None,
            &gate_up,
            &down,
            &p,
            &mut out,
            8,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("down is [32, 2], not [4 * 8, 3]"),
            "{err}"
        );
        let p = params(4, 5, MoeRouting::Softmax, true);
        let err = moe(
            CpuIsa::Portable,
            &x,
            8,
            2,
            &router,
            None,
            &gate_up,
            &gate_up,
            &p,
            &mut out,
            8,
        )
        .unwrap_err();
        assert!(err.to_string().contains("picks 5 of 4"), "{err}");
    }
}
