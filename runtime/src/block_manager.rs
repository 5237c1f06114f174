//! Bookkeeping of the paged KV cache: which blocks are free, which sequences hold which, and
//! which full blocks hold a known prefix (prefix caching). No KV numbers live here (they are in
//! `kv_cache.rs`), so every rule below is tested without a model.
//!
//! A block is always in exactly one of three states:
//! - **held**: its reference count is at least 1 (one per sequence whose table names it);
//! - **cached**: count 0, but it is full and its content hash is registered, so a later prompt
//!   with the same prefix can take it back; it sits in the eviction queue;
//! - **free**: count 0 and no hash; it sits at the front of the eviction queue.
//!
//! Allocation takes the front of the queue: free blocks first, then cached ones least recently
//! used first (dropping their hash). A block's hash chains the hash of the block before it, the
//! block's token ids, and a salt naming the plan, so equal hashes mean equal prefixes of the same
//! model and two plans never share.
//!
//! Only a full block is ever shared between sequences: a sequence writes positions only in
//! blocks it alone holds (its last, partial block) or that it has just been given, and
//! [`BlockManager::start`] leaves at least the last prompt token to compute, so the block that
//! token lands in is never a shared one.

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;
/// BLAKE3 of (the previous block's hash or the salt, the block's token ids).
pub type BlockHash = [u8; 32];

/// A sequence's share of the cache.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SeqBlocks {
    /// The block table: position `p` lives in `blocks[p / block_size]`.
    pub blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks whose content is known (registered or taken from the
    /// cache), in order; the chain continues from the last one.
    hashes: Vec<BlockHash>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} is not held: freed twice or never allocated")]
    NotHeld(BlockId),
    #[error("block {0} does not exist")]
    OutOfRange(BlockId),
}

pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    salt: BlockHash,
    ref_counts: Vec<u32>,
    /// The registered hash of each block, if any.
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Blocks with count 0, by eviction order (smallest key first). Free blocks get keys below
    /// zero that fall with each insertion, cached ones keys above zero that rise: the front is
    /// the most recently freed free block, then the least recently used cached one.
    queue: BTreeMap<i64, BlockId>,
    /// Each queued block's key in `queue`.
    queue_key: Vec<Option<i64>>,
    next_front: i64,
    next_back: i64,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` positions. `salt` names the plan (its
    /// weights and program), so that hashes from different plans never match.
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
        salt: BlockHash,
    ) -> BlockManager {
        let mut manager = BlockManager {
            block_size: block_size.max(1),
            prefix_caching,
            salt,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            queue: BTreeMap::new(),
            queue_key: vec![None; num_blocks],
            next_front: -1,
            next_back: 1,
        };
        // Block 0 first.
        for block in (0..num_blocks as BlockId).rev() {
            manager.enqueue_front(block);
        }
        manager
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that an allocation can take now (free or cached).
    pub fn num_available(&self) -> usize {
        self.queue.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_held(&self) -> usize {
        self.num_blocks() - self.queue.len()
    }

    /// Cached blocks (count 0, hash registered).
    pub fn num_cached_free(&self) -> usize {
        self.queue_key
            .iter()
            .enumerate()
            .filter(|(b, key)| key.is_some() && self.hashes[*b].is_some())
            .count()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Starts a sequence whose first tokens are `tokens` (a prompt, or a preempted sequence's
    /// prompt and output): takes the longest run of cached full blocks that prefixes them,
    /// leaving at least the last token to compute. Returns the sequence and how many of its
    /// tokens are already in the cache.
    pub fn start(&mut self, tokens: &[u32]) -> (SeqBlocks, usize) {
        if tokens.is_empty() {
            return (SeqBlocks::default(), 0);
        }
        // The last token must go through the model for its logits: only blocks entirely
        // before it can come from the cache.
        let eligible = (tokens.len() - 1) / self.block_size;
        let seq = self.take_cached(&tokens[..eligible * self.block_size]);
        let hit = seq.blocks.len() * self.block_size;
        (seq, hit)
    }

    /// How many leading full blocks of `tokens` are cached, taking none of them (a decode
    /// instance asks before it has a prefill instance send it the rest).
    pub fn cached_blocks(&self, tokens: &[u32]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        let mut parent = self.salt;
        let mut found = 0;
        for block_tokens in tokens.chunks_exact(self.block_size) {
            let hash = chain_hash(&parent, block_tokens);
            if !self.cached.contains_key(&hash) {
                break;
            }
            found += 1;
            parent = hash;
        }
        found
    }

    /// Takes the leading cached full blocks of `tokens`, all of them (where [`BlockManager::start`]
    /// leaves the last token to compute): the blocks a prefill instance sends, held until
    /// [`BlockManager::free`].
    pub fn take_cached(&mut self, tokens: &[u32]) -> SeqBlocks {
        let mut seq = SeqBlocks::default();
        if !self.prefix_caching {
            return seq;
        }
        let mut parent = self.salt;
        for block_tokens in tokens.chunks_exact(self.block_size) {
            let hash = chain_hash(&parent, block_tokens);
            let Some(&block) = self.cached.get(&hash) else {
                break;
            };
            self.take(block);
            seq.blocks.push(block);
            seq.hashes.push(hash);
            parent = hash;
        }
        seq
    }

    /// Gives `seq` blocks enough for `positions` positions. Returns false, allocating nothing,
    /// when too few blocks are available.
    pub fn grow(&mut self, seq: &mut SeqBlocks, positions: usize) -> bool {
        let needed = self.blocks_for(positions).saturating_sub(seq.blocks.len());
        if needed > self.num_available() {
            return false;
        }
        for _ in 0..needed {
            let Some(block) = self.allocate() else {
                return false; // unreachable: counted as available above
            };
            seq.blocks.push(block);
        }
        true
    }

    /// Records that `tokens[..computed]` of `seq` are now in the cache: every block that became
    /// full gets its hash registered, so later prompts can share it. A block whose hash another
    /// block already holds stays unregistered (its twin serves the hits).
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let full = (computed.min(tokens.len()) / self.block_size).min(seq.blocks.len());
        while seq.hashes.len() < full {
            let index = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(self.salt);
            let block_tokens = &tokens[index * self.block_size..][..self.block_size];
            let hash = chain_hash(&parent, block_tokens);
            let block = seq.blocks[index];
            if self.hashes[block as usize].is_none() && !self.cached.contains_key(&hash) {
                self.hashes[block as usize] = Some(hash);
                self.cached.insert(hash, block);
            }
            seq.hashes.push(hash);
        }
    }

    /// Releases all of `seq`'s blocks. Its last blocks are freed first so that, among blocks of
    /// equal age, a prefix outlives its continuations in the cache.
    pub fn free(&mut self, seq: SeqBlocks) -> Result<(), BlockError> {
        for &block in seq.blocks.iter().rev() {
            self.release(block)?;
        }
        Ok(())
    }

    /// A second sequence with the same first `positions` positions as `seq` (for several
    /// choices of one prompt): full blocks are shared; a partial last block is copied into a new
    /// one, returned as `(from, to)` for the caller to copy the KV numbers. `None` when no block
    /// is available for that copy.
    pub fn fork(
        &mut self,
        seq: &SeqBlocks,
        positions: usize,
    ) -> Option<(SeqBlocks, Option<(BlockId, BlockId)>)> {
        let full = positions / self.block_size;
        let partial = !positions.is_multiple_of(self.block_size);
        let copy = if partial {
            let from = *seq.blocks.get(full)?;
            Some((from, self.allocate()?))
        } else {
            None
        };
        let mut child = SeqBlocks {
            blocks: seq.blocks[..full.min(seq.blocks.len())].to_vec(),
            hashes: seq.hashes[..full.min(seq.hashes.len())].to_vec(),
        };
        for &block in &child.blocks {
            self.ref_counts[block as usize] += 1;
        }
        if let Some((_, to)) = copy {
            child.blocks.push(to);
        }
        Some((child, copy))
    }

    /// Forgets every registered hash (after a weight update, say): nothing cached is reused.
    pub fn clear_cache(&mut self, new_salt: BlockHash) {
        self.salt = new_salt;
        self.cached.clear();
        for block in 0..self.num_blocks() as BlockId {
            if self.hashes[block as usize].take().is_some()
                && self.queue_key[block as usize].is_some()
            {
                // Now a plain free block: to the front.
                self.dequeue(block);
                self.enqueue_front(block);
            }
        }
    }

    /// Reference count of `block` (tests and checks).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block as usize).copied().unwrap_or(0)
    }

    fn allocate(&mut self) -> Option<BlockId> {
        let (_, block) = self.queue.pop_first()?;
        self.queue_key[block as usize] = None;
        if let Some(hash) = self.hashes[block as usize].take() {
            self.cached.remove(&hash);
        }
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// One more holder of a cached or held block.
    fn take(&mut self, block: BlockId) {
        if self.ref_counts[block as usize] == 0 {
            self.dequeue(block);
        }
        self.ref_counts[block as usize] += 1;
    }

    fn release(&mut self, block: BlockId) -> Result<(), BlockError> {
        let count = self
            .ref_counts
            .get_mut(block as usize)
            .ok_or(BlockError::OutOfRange(block))?;
        if *count == 0 {
            return Err(BlockError::NotHeld(block));
        }
        *count -= 1;
        if *count == 0 {
            if self.hashes[block as usize].is_some() {
                self.enqueue_back(block);
            } else {
                self.enqueue_front(block);
            }
        }
        Ok(())
    }

    fn enqueue_front(&mut self, block: BlockId) {
        let key = self.next_front;
        self.next_front -= 1;
        self.queue.insert(key, block);
        self.queue_key[block as usize] = Some(key);
    }

    fn enqueue_back(&mut self, block: BlockId) {
        let key = self.next_back;
        self.next_back += 1;
        self.queue.insert(key, block);
        self.queue_key[block as usize] = Some(key);
    }

    fn dequeue(&mut self, block: BlockId) {
        if let Some(key) = self.queue_key[block as usize].take() {
            self.queue.remove(&key);
        }
    }
}

/// The hash of a block given its parent's.
fn chain_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(parent);
    for token in tokens {
        hasher.update(&token.to_le_bytes());
    }
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: BlockHash = [7; 32];

    fn manager(blocks: usize, block_size: usize) -> BlockManager {
        BlockManager::new(blocks, block_size, true, SALT)
    }

    #[test]
    fn cached_blocks_are_counted_without_taking_and_taken_whole() {
        let mut m = manager(6, 2);
        let tokens = [1, 2, 3, 4, 5, 6, 7];
        let (mut seq, hit) = m.start(&tokens);
        assert_eq!(hit, 0);
        assert!(m.grow(&mut seq, 7));
        m.commit(&mut seq, &tokens, 6); // three full blocks
        let held = seq.blocks.clone();
        m.free(seq).unwrap();
        assert_eq!(m.cached_blocks(&tokens), 3);
        assert_eq!(m.cached_blocks(&tokens[..5]), 2, "only full blocks count");
        assert_eq!(
            m.cached_blocks(&[1, 2, 9, 9]),
            1,
            "the chain stops at the first miss"
        );
        assert_eq!(m.num_held(), 0, "counting takes nothing");
        // `start` leaves the last token to compute; `take_cached` takes every full block.
        let (s, hit) = m.start(&tokens[..6]);
        assert_eq!(hit, 4);
        m.free(s).unwrap();
        let taken = m.take_cached(&tokens[..6]);
        assert_eq!(taken.blocks, held[..3]);
        assert!(taken.blocks.iter().all(|&b| m.ref_count(b) == 1));
        m.free(taken).unwrap();
        let mut off = BlockManager::new(6, 2, false, SALT);
        assert_eq!(off.cached_blocks(&tokens), 0);
        assert!(off.take_cached(&tokens).blocks.is_empty());
    }

    fn run(m: &mut BlockManager, tokens: &[u32]) -> SeqBlocks {
        let (mut seq, _) = m.start(tokens);
        assert!(m.grow(&mut seq, tokens.len()));
        m.commit(&mut seq, tokens, tokens.len());
        seq
    }

    #[test]
    fn a_cached_prefix_is_found_and_the_last_token_left_to_compute() {
        let mut m = manager(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let first = run(&mut m, &prompt);
        assert_eq!(first.blocks.len(), 3);
        m.free(first.clone()).unwrap();
        // Two full blocks are cached; the third was partial.
        assert_eq!(m.num_cached_free(), 2);
        let (again, hit) = m.start(&prompt);
        assert_eq!((hit, &again.blocks[..]), (8, &first.blocks[..2]));
        // A prompt of exactly two blocks gets one: its last token must be computed.
        let (exact, hit) = m.start(&prompt[..8]);
        assert_eq!((hit, exact.blocks.len()), (4, 1));
        assert_eq!(m.ref_count(first.blocks[0]), 2);
        // A different first token shares nothing; another salt shares nothing.
        let mut other: Vec<u32> = prompt.clone();
        other[0] = 99;
        assert_eq!(m.start(&other).1, 0);
        let mut salted = BlockManager::new(8, 4, true, [8; 32]);
        assert_eq!(salted.start(&prompt).1, 0);
        // Without prefix caching nothing is found.
        let mut off = BlockManager::new(8, 4, false, SALT);
        let seq = run(&mut off, &prompt);
        off.free(seq).unwrap();
        assert_eq!(off.start(&prompt).1, 0);
    }

    #[test]
    fn free_blocks_go_before_cached_ones_and_cached_ones_least_recent_first() {
        let mut m = manager(4, 2);
        let a = run(&mut m, &[1, 2, 3]); // blocks: one full (cached later), one partial
        let b = run(&mut m, &[5, 6, 7]);
        m.free(a.clone()).unwrap();
        m.free(b.clone()).unwrap();
        assert_eq!(m.num_cached_free(), 2);
        // The two partial blocks are taken first, then a's full block (older than b's).
        let mut c = SeqBlocks::default();
        assert!(m.grow(&mut c, 6));
        assert_eq!(c.blocks, vec![b.blocks[1], a.blocks[1], a.blocks[0]]);
        assert_eq!(m.num_cached_free(), 1);
        assert_eq!(m.start(&[5, 6, 7]).1, 2, "b's prefix is still cached");
        assert_eq!(m.start(&[1, 2, 3]).1, 0, "a's was evicted");
    }

    #[test]
    fn grow_is_all_or_nothing_and_free_twice_is_an_error() {
        let mut m = manager(3, 2);
        let mut a = SeqBlocks::default();
        assert!(m.grow(&mut a, 4));
        let mut b = SeqBlocks::default();
        assert!(!m.grow(&mut b, 4));
        assert!(b.blocks.is_empty());
        assert_eq!(m.num_available(), 1);
        m.free(a.clone()).unwrap();
        assert_eq!(
            m.free(a),
            Err(BlockError::NotHeld(1)),
            "the last block is released first"
        );
    }

    #[test]
    fn fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut m = manager(6, 4);
        let tokens: Vec<u32> = (0..6).collect();
        let seq = run(&mut m, &tokens);
        let (child, copy) = m.fork(&seq, 6).unwrap();
        assert_eq!(child.blocks[0], seq.blocks[0]);
        assert_eq!(copy, Some((seq.blocks[1], child.blocks[1])));
        assert_ne!(child.blocks[1], seq.blocks[1]);
        assert_eq!(m.ref_count(seq.blocks[0]), 2);
        m.free(seq).unwrap();
        m.free(child).unwrap();
        assert_eq!(m.num_held(), 0);
    }

    #[test]
    fn clearing_the_cache_forgets_every_prefix() {
        let mut m = manager(4, 2);
        let a = run(&mut m, &[1, 2, 3]);
        m.free(a).unwrap();
        m.clear_cache([9; 32]);
        assert_eq!(m.num_cached_free(), 0);
        assert_eq!(m.start(&[1, 2, 3]).1, 0);
        assert_eq!(m.num_available(), 4);
    }

    /// Random allocate / append / fork / free / evict sequences against a model of who holds
    /// what: no block leaks, none is freed twice, none is handed out while still referenced.
    #[test]
    fn random_operations_keep_every_block_accounted_for() {
        for seed in 0..200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let (blocks, block_size) = (1 + next(24) as usize, 1 + next(4) as usize);
            let mut m = manager(blocks, block_size);
            // Live sequences: (blocks, tokens held).
            let mut live: Vec<(SeqBlocks, Vec<u32>)> = vec![];
            for _ in 0..300 {
                match next(5) {
                    0 => {
                        // A new sequence with a prompt from a small alphabet (prefix hits).
                        let len = 1 + next(3 * block_size as u64 + 2) as usize;
                        let tokens: Vec<u32> = (0..len).map(|_| next(3) as u32).collect();
                        let (mut seq, hit) = m.start(&tokens);
                        assert!(hit < tokens.len());
                        if m.grow(&mut seq, tokens.len()) {
                            m.commit(&mut seq, &tokens, tokens.len());
                            live.push((seq, tokens));
                        } else {
                            m.free(seq).unwrap();
                        }
                    }
                    1 if !live.is_empty() => {
                        // Append one token.
                        let i = next(live.len() as u64) as usize;
                        let (seq, tokens) = &mut live[i];
                        if m.grow(seq, tokens.len() + 1) {
                            tokens.push(next(3) as u32);
                            m.commit(seq, tokens, tokens.len());
                        }
                    }
                    2 if !live.is_empty() => {
                        let i = next(live.len() as u64) as usize;
                        let (seq, tokens) = live.swap_remove(i);
                        let _ = tokens;
                        m.free(seq).unwrap();
                    }
                    3 if !live.is_empty() => {
                        let i = next(live.len() as u64) as usize;
                        let (seq, tokens) = &live[i];
                        let tokens = tokens.clone();
                        if let Some((child, copy)) = m.fork(seq, tokens.len()) {
                            if let Some((from, to)) = copy {
                                assert_ne!(from, to);
                            }
                            live.push((child, tokens));
                        }
                    }
                    _ => {
                        // Evict: ask for every available block, then give them back.
                        let mut hog = SeqBlocks::default();
                        let n = m.num_available() * block_size;
                        assert!(m.grow(&mut hog, n));
                        m.free(hog).unwrap();
                    }
                }
                // Reference counts equal the holders in the model.
                let mut holders = vec![0u32; blocks];
                for (seq, tokens) in &live {
                    assert!(seq.blocks.len() >= tokens.len().div_ceil(block_size));
                    for &b in &seq.blocks {
                        holders[b as usize] += 1;
                    }
                }
                for (b, &count) in holders.iter().enumerate() {
                    assert_eq!(m.ref_count(b as BlockId), count, "seed {seed} block {b}");
                }
                assert_eq!(m.num_held(), holders.iter().filter(|&&c| c > 0).count());
                assert_eq!(m.num_held() + m.num_available(), blocks);
            }
            for (seq, _) in live {
                m.free(seq).unwrap();
            }
            assert_eq!(m.num_available(), blocks, "seed {seed}: a block leaked");
        }
    }
}
