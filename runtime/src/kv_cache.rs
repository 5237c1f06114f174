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
}
