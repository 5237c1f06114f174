//! A contiguous KV cache for one sequence: per layer, K and V as `[capacity, KV, D]` f32.
//! Paging and sharing between sequences come with the serving work; this is the simple form.

use kernels::cpu::KvLayerMut;

pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize, kv_heads: usize, head_dim: usize) -> KvCache {
        let per_layer = capacity * kv_heads * head_dim;
        KvCache {
            layers: (0..num_layers)
                .map(|_| (vec![0.0; per_layer], vec![0.0; per_layer]))
                .collect(),
            capacity,
            kv_heads,
            head_dim,
        }
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn layer(&mut self, layer: usize) -> Option<KvLayerMut<'_>> {
        let (capacity, kv_heads, head_dim) = (self.capacity, self.kv_heads, self.head_dim);
        self.layers.get_mut(layer).map(|(k, v)| KvLayerMut {
            k,
            v,
            capacity,
            kv_heads,
            head_dim,
        })
    }

    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.capacity * self.kv_heads * self.head_dim * 4
    }
}
