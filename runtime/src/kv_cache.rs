//! The paged KV cache's memory: per layer, one pool of keys and one of values, each
//! `[blocks, block_size, KV, D]` f32. A sequence reads and writes it through its block table.
//! A latent cache (multi-head latent attention) has one pool per layer, `[blocks, block_size, W]`
//! with W the latent and rope-key width, and no values: the same blocks, tables and prefix
//! caching serve it unchanged.
//!
//! Only numbers live here. Which sequence holds which block, and which blocks hold a known
//! prefix, is the block manager's bookkeeping (`block_manager.rs`), testable without a model.
//! The pools are allocated zeroed, so the operating system commits their pages only as blocks
//! are first written.

use kernels::cpu::KvLayerMut;

pub struct KvPool {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    values: bool,
}

/// What one layer caches per position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvRows {
    /// Keys and values, `kv_heads * head_dim` each.
    KeysAndValues { kv_heads: usize, head_dim: usize },
    /// One latent row of `width` values (read as the keys of one head), no values.
    Latent { width: usize },
}

impl KvPool {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, rows: KvRows) -> KvPool {
        let (kv_heads, head_dim, values) = match rows {
            KvRows::KeysAndValues { kv_heads, head_dim } => (kv_heads, head_dim, true),
            KvRows::Latent { width } => (1, width, false),
        };
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        let value_len = if values { per_layer } else { 0 };
        KvPool {
            layers: (0..num_layers)
                .map(|_| (vec![0.0; per_layer], vec![0.0; value_len]))
                .collect(),
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            values,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Layer `layer` as the sequence with block table `blocks` sees it.
    pub fn layer<'a>(&'a mut self, layer: usize, blocks: &'a [u32]) -> Option<KvLayerMut<'a>> {
        let (block_size, kv_heads, head_dim) = (self.block_size, self.kv_heads, self.head_dim);
        self.layers.get_mut(layer).map(|(k, v)| KvLayerMut {
            k,
            v,
            block_size,
            blocks,
            kv_heads,
            head_dim,
        })
    }

    /// Bytes of keys and values (or latents) one block holds across all layers.
    pub fn bytes_per_block(&self) -> usize {
        let pools = if self.values { 2 } else { 1 };
        self.layers.len()
            * pools
            * self.block_size
            * self.kv_heads
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    /// Bytes of the whole pool.
    pub fn bytes(&self) -> usize {
        self.num_blocks * self.bytes_per_block()
    }

    /// Values of one block in one layer's pool.
    fn block_len(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }

    /// Block `block`'s keys and values of every layer as bytes (`bytes_per_block` of them):
    /// layer after layer, its keys then its values, little-endian f32. The form a block
    /// travels in between instances (prefill/decode disaggregation).
    pub fn read_block(&self, block: u32, out: &mut [u8]) -> Result<(), KvBlockError> {
        let range = self.block_range(block)?;
        if out.len() != self.bytes_per_block() {
            return Err(KvBlockError::Size {
                got: out.len(),
                want: self.bytes_per_block(),
            });
        }
        let mut rest = out;
        for (k, v) in &self.layers {
            let pools: &[&Vec<f32>] = if self.values { &[k, v] } else { &[k] };
            for pool in pools {
                let values = &pool[range.clone()];
                let (these, after) = rest.split_at_mut(values.len() * 4);
                write_le(these, values);
                rest = after;
            }
        }
        Ok(())
    }

    /// Writes block `block` from `bytes` in [`KvPool::read_block`]'s form.
    pub fn write_block(&mut self, block: u32, bytes: &[u8]) -> Result<(), KvBlockError> {
        let range = self.block_range(block)?;
        if bytes.len() != self.bytes_per_block() {
            return Err(KvBlockError::Size {
                got: bytes.len(),
                want: self.bytes_per_block(),
            });
        }
        let values = self.values;
        let mut rest = bytes;
        for (k, v) in &mut self.layers {
            let pools: &mut [&mut Vec<f32>] = if values { &mut [k, v] } else { &mut [k] };
            for pool in pools.iter_mut() {
                let slots = &mut pool[range.clone()];
                let (these, after) = rest.split_at(slots.len() * 4);
                copy_le(slots, these);
                rest = after;
            }
        }
        Ok(())
    }

    fn block_range(&self, block: u32) -> Result<std::ops::Range<usize>, KvBlockError> {
        let b = block as usize;
        if b >= self.num_blocks {
            return Err(KvBlockError::OutOfRange {
                block,
                blocks: self.num_blocks,
            });
        }
        Ok(b * self.block_len()..(b + 1) * self.block_len())
    }
}

/// Writes `values` as little-endian bytes (`out.len() == 4 * values.len()`).
fn write_le(out: &mut [u8], values: &[f32]) {
    if cfg!(target_endian = "little") {
        out.copy_from_slice(bytemuck::cast_slice(values));
    } else {
        for (b, x) in out.chunks_exact_mut(4).zip(values) {
            b.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Fills `slots` from little-endian bytes (`bytes.len() == 4 * slots.len()`).
fn copy_le(slots: &mut [f32], bytes: &[u8]) {
    if cfg!(target_endian = "little") {
        // The bytes of a frame need not be 4-aligned: copy through the byte view of the slots.
        bytemuck::cast_slice_mut::<f32, u8>(slots).copy_from_slice(bytes);
    } else {
        for (slot, b) in slots.iter_mut().zip(bytes.chunks_exact(4)) {
            *slot = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvBlockError {
    #[error("KV block {block} is outside the pool of {blocks} blocks")]
    OutOfRange { block: u32, blocks: usize },
    #[error("a KV block of this plan is {want} bytes, not {got}")]
    Size { got: usize, want: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_read_and_written_elsewhere_holds_the_same_values() {
        for rows in [
            KvRows::KeysAndValues {
                kv_heads: 2,
                head_dim: 3,
            },
            KvRows::Latent { width: 5 },
        ] {
            let mut a = KvPool::new(2, 4, 2, rows);
            for (l, (k, v)) in a.layers.iter_mut().enumerate() {
                for (i, x) in k.iter_mut().enumerate() {
                    *x = (l * 1000 + i) as f32;
                }
                for (i, x) in v.iter_mut().enumerate() {
                    *x = -((l * 1000 + i) as f32);
                }
            }
            let mut bytes = vec![0; a.bytes_per_block()];
            a.read_block(2, &mut bytes).unwrap();
            assert!(a.read_block(2, &mut bytes[1..]).is_err());
            let mut b = KvPool::new(2, 4, 2, rows);
            b.write_block(1, &bytes).unwrap();
            let len = a.block_len();
            for l in 0..2 {
                assert_eq!(b.layers[l].0[len..2 * len], a.layers[l].0[2 * len..3 * len]);
                assert_eq!(
                    b.layers[l].1.get(len..2 * len),
                    a.layers[l].1.get(2 * len..3 * len)
                );
                // The other blocks stay untouched.
                assert!(b.layers[l].0[..len].iter().all(|&x| x == 0.0));
            }
            assert_eq!(
                b.write_block(4, &bytes),
                Err(KvBlockError::OutOfRange {
                    block: 4,
                    blocks: 4
                })
            );
            assert!(matches!(
                b.write_block(0, &bytes[1..]),
                Err(KvBlockError::Size { .. })
            ));
        }
    }
}
