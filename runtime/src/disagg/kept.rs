//! Transfer memory kept from one transfer for the next: making a region (reserving and zeroing
//! host pages, or allocating device memory) and opening a peer's costs more than copying the
//! blocks through it, so both ends reuse what they made or opened. One pool per kind of memory
//! and side (`super::shared`, `crate::cuda::ipc`), each bounded in count and bytes.

use std::ops::RangeInclusive;
use std::sync::Mutex;

/// Regions (or mappings of a peer's) one pool keeps.
const MAX_KEPT: usize = 4;
/// The most bytes one pool keeps.
pub(crate) const MAX_KEPT_BYTES: usize = 1 << 30;

/// Items of `bytes` each, with the offer that named them on the side that opened them (`None`
/// for one made here).
pub(crate) struct Kept<K, T> {
    items: Mutex<Vec<(Option<K>, T, usize)>>,
}

impl<K: PartialEq, T> Kept<K, T> {
    pub(crate) const fn new() -> Self {
        Kept {
            items: Mutex::new(Vec::new()),
        }
    }

    /// Takes the smallest kept item named by `key` whose size is in `sizes`.
    pub(crate) fn take(&self, key: Option<&K>, sizes: RangeInclusive<usize>) -> Option<T> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let at = (0..items.len())
            .filter(|&i| items[i].0.as_ref() == key && sizes.contains(&items[i].2))
            .min_by_key(|&i| items[i].2)?;
        Some(items.swap_remove(at).1)
    }

    /// Keeps `item` for a later [`Kept::take`], unless it alone is over the bytes bound. Drops
    /// the items whose owner `gone` says has ended (they only hold memory), then the oldest
    /// while the pool is over its bounds.
    pub(crate) fn put(&self, key: Option<K>, item: T, bytes: usize, gone: impl Fn(&K) -> bool) {
        if bytes > MAX_KEPT_BYTES {
            return;
        }
        // Dropped after the lock is released: freeing device memory takes a while.
        let mut dropped = Vec::new();
        {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            let mut i = 0;
            while i < items.len() {
                if items[i].0.as_ref().is_some_and(&gone) {
                    dropped.push(items.remove(i));
                } else {
                    i += 1;
                }
            }
            items.push((key, item, bytes));
            while items.len() > MAX_KEPT
                || items.iter().map(|(_, _, b)| b).sum::<usize>() > MAX_KEPT_BYTES
            {
                dropped.push(items.remove(0));
            }
        }
        drop(dropped);
    }
}

/// The bytes a region for `blocks` blocks of `block_bytes` behind a header of `header` bytes
/// needs, and the room a new one gets: the next power of two of blocks, so that it fits later
/// prompts too. `None` when either overflows.
pub(crate) fn region_sizes(
    blocks: usize,
    block_bytes: usize,
    header: usize,
) -> Option<(usize, usize)> {
    let bytes = |blocks: usize| blocks.checked_mul(block_bytes)?.checked_add(header);
    Some((bytes(blocks)?, bytes(blocks.checked_next_power_of_two()?)?))
}

/// An offer naming a peer's region: what a kept opening of it is found by.
pub(crate) trait Offer: PartialEq {
    /// The process that made the region.
    fn pid(&self) -> u32;
}

/// The two pools of one kind of memory: regions made here, and peers' regions opened here.
pub(crate) struct Pools<O, M> {
    pub(crate) made: Kept<O, M>,
    pub(crate) opened: Kept<O, M>,
}

impl<O: PartialEq, M> Pools<O, M> {
    pub(crate) const fn new() -> Self {
        Pools {
            made: Kept::new(),
            opened: Kept::new(),
        }
    }
}

/// Memory one transfer holds (a region made here, or a peer's opened by `opened_by`) with room
/// for `blocks` blocks of `block_bytes`; back to its pool when dropped, once kept.
pub(crate) struct Held<O: Offer + 'static, M: 'static> {
    /// `Some` until dropped.
    memory: Option<M>,
    bytes: usize,
    pub(crate) opened_by: Option<O>,
    pub(crate) block_bytes: usize,
    pub(crate) blocks: usize,
    reusable: bool,
    pools: &'static Pools<O, M>,
}

impl<O: Offer, M> Held<O, M> {
    /// `memory` of `bytes` in all, from `pools`.
    pub(crate) fn new(
        pools: &'static Pools<O, M>,
        memory: M,
        bytes: usize,
        opened_by: Option<O>,
        blocks: usize,
        block_bytes: usize,
    ) -> Self {
        Held {
            memory: Some(memory),
            bytes,
            opened_by,
            block_bytes,
            blocks,
            reusable: false,
            pools,
        }
    }

    /// Lets the memory be reused once dropped: call it only when the other side is done with
    /// it (the transfer ended with its `Done`), since memory given to the next transfer while a
    /// late writer still writes into it would seat that writer's bytes.
    pub(crate) fn keep(&mut self) {
        self.reusable = true;
    }

    pub(crate) fn memory(&self) -> Option<&M> {
        self.memory.as_ref()
    }

    pub(crate) fn memory_mut(&mut self) -> Option<&mut M> {
        self.memory.as_mut()
    }
}

impl<O: Offer + std::fmt::Debug, M> std::fmt::Debug for Held<O, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("bytes", &self.bytes)
            .field("opened_by", &self.opened_by)
            .field("block_bytes", &self.block_bytes)
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl<O: Offer, M> Drop for Held<O, M> {
    fn drop(&mut self) {
        let Some(memory) = self.memory.take() else {
            return;
        };
        if !self.reusable {
            return;
        }
        let pool = if self.opened_by.is_some() {
            &self.pools.opened
        } else {
            &self.pools.made
        };
        pool.put(self.opened_by.take(), memory, self.bytes, |o| {
            process_gone(o.pid())
        });
    }
}

/// Whether process `pid` has ended (its `/proc` entry is gone).
pub(crate) fn process_gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_fitting_item_of_its_key_is_taken_and_the_pool_stays_bounded() {
        let pool: Kept<u32, &str> = Kept::new();
        pool.put(None, "big", 1000, |_| false);
        pool.put(None, "small", 100, |_| false);
        pool.put(Some(7), "peer's", 100, |_| false);
        assert_eq!(pool.take(None, 50..=2000), Some("small"));
        assert_eq!(pool.take(None, 50..=500), None, "the big one does not fit");
        assert_eq!(pool.take(Some(&7), 0..=usize::MAX), Some("peer's"));
        assert_eq!(pool.take(Some(&8), 0..=usize::MAX), None);
        // Past the count bound the oldest go; an ended owner's item goes at the next put.
        for i in 0..MAX_KEPT as u32 {
            pool.put(Some(i), "x", 1, |_| false);
        }
        assert_eq!(
            pool.take(None, 0..=usize::MAX),
            None,
            "\"big\" was the oldest"
        );
        pool.put(None, "y", 1, |&k| k == 3);
        assert_eq!(pool.take(Some(&3), 0..=usize::MAX), None);
        assert_eq!(pool.take(Some(&2), 0..=usize::MAX), Some("x"));
        pool.put(None, "huge", MAX_KEPT_BYTES + 1, |_| false);
        assert_eq!(pool.take(None, MAX_KEPT_BYTES..=usize::MAX), None);
    }
}
