//! The paged KV cache's memory: per layer, one pool of keys and one of values, each
//! `[blocks, block_size, KV, D]` f32. A sequence reads and writes it through its block table.
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
}

impl KvPool {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> KvPool {
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        KvPool {
            layers: (0..num_layers)
                .map(|_| (vec![0.0; per_layer], vec![0.0; per_layer]))
                .collect(),
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
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

    /// Bytes of keys and values one block holds across all layers.
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        num_layers * 2 * block_size * kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Bytes of the whole pool.
    pub fn bytes(&self) -> usize {
        self.num_blocks
            * Self::bytes_per_block(
                self.layers.len(),
                self.block_size,
                self.kv_heads,
                self.head_dim,
            )
    }
}
