//! Reproducible random inputs for kernel tests and benchmarks.

/// Uniform values in [-1, 1) from a fixed seed (a 64-bit LCG: the tests need reproducible,
/// well-spread values, not statistical quality, so no generator crate).
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
