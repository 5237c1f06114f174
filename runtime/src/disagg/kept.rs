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
