//! A compact, read-only map from string keys (identity ids, service names) to rows of `u32`.
//!
//! It exists for the lookup latency target. With 100,000 identities almost every lookup misses
//! the CPU caches, and what it costs is the number of memory reads that wait on each other. A
//! `HashMap<String, u32>` followed by per-slot arrays costs four or five (hash bucket, key
//! string, the slot's row offset, the row), and even a table of offsets costs two (the table,
//! then the block it points to). Here the blocks (key and row together) are laid out bucket by
//! bucket in one array, and the only other thing read is the bucket's start in a small array
//! of offsets (4 bytes per key, which stays in cache): a lookup waits on main memory once.
//!
//! The hash is unkeyed. That is safe because the keys in the map are chosen by the controller
//! (random identity ids) and by admins (service names), not by the peers who send lookups, and
//! a peer choosing lookup keys cannot lengthen the buckets.

use std::ops::Range;

use super::rows::slot;

#[derive(Debug, Clone)]
pub(crate) struct KeyedRows {
    /// Blocks grouped by bucket: the key's length in bytes, the key packed into little-endian
    /// words, the row's length, the row.
    words: Vec<u32>,
    /// `buckets[b]..buckets[b + 1]` are the blocks of bucket `b` in `words`. The number of
    /// buckets is a power of two at least the number of keys, so a bucket holds about one.
    buckets: Vec<u32>,
    /// The row of each entry, by position in the input.
    rows: Vec<(u32, u32)>,
}

impl KeyedRows {
    /// Maps each key to its row. Keys are expected to be distinct (they come from map keys);
    /// if one repeats, the first row wins.
    pub(crate) fn new<'a>(entries: impl ExactSizeIterator<Item = (&'a str, Vec<u32>)>) -> Self {
        let mask = entries.len().next_power_of_two() - 1;
        let mut entries: Vec<(usize, &str, Vec<u32>)> = (entries)
            .map(|(key, row)| (hash(key.as_bytes()) as usize & mask, key, row))
            .collect();
        // Stable, so that the first of repeated keys comes first in its bucket.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].0);
        let mut map = KeyedRows {
            words: Vec::new(),
            buckets: vec![0; mask + 2],
            rows: vec![(0, 0); entries.len()],
        };
        let mut order = order.into_iter().peekable();
        for bucket in 0..=mask {
            let opened = map.words.len();
            map.buckets[bucket] = slot(opened);
            while let Some(i) = order.next_if(|&i| entries[i].0 == bucket) {
                let (_, key, row) = &mut entries[i];
                let found = map.find_from(opened..map.words.len(), key);
                let found = found.unwrap_or_else(|| {
                    map.words.push(slot(key.len()));
                    map.words.extend(key_words(key.as_bytes()));
                    map.words.push(slot(row.len()));
                    let start = map.words.len();
                    map.words.append(row);
                    start..map.words.len()
                });
                map.rows[i] = (slot(found.start), slot(found.end));
            }
        }
        map.buckets[mask + 1] = slot(map.words.len());
        map.words.shrink_to_fit();
        map
    }

    /// The row of `key`, if the key is present.
    pub(crate) fn get(&self, key: &str) -> Option<&[u32]> {
        self.find(key).map(|row| &self.words[row])
    }

    /// The row of the entry that came `i`-th in the input (the first one, for a repeated key).
    pub(crate) fn at(&self, i: u32) -> &[u32] {
        let (start, end) = self.rows[i as usize];
        &self.words[start as usize..end as usize]
    }

    /// The row of `key` for changing in place, if the key is present.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut [u32]> {
        self.find(key).map(|row| &mut self.words[row])
    }

    /// Where the row of `key` is in `words`.
    fn find(&self, key: &str) -> Option<Range<usize>> {
        let b = hash(key.as_bytes()) as usize & (self.buckets.len() - 2);
        self.find_from(self.buckets[b] as usize..self.buckets[b + 1] as usize, key)
    }

    /// Where the row of `key` is, looking through the blocks in `blocks`.
    fn find_from(&self, blocks: Range<usize>, key: &str) -> Option<Range<usize>> {
        let key_words = key.len().div_ceil(4);
        let mut at = blocks.start;
        while at < blocks.end {
            let len_words = (self.words[at] as usize).div_ceil(4);
            let row_len = self.words[at + 1 + len_words] as usize;
            let row = at + 2 + len_words;
            if self.words[at] as usize == key.len()
                && key_words_eq(&self.words[at + 1..=at + key_words], key.as_bytes())
            {
                return Some(row..row + row_len);
            }
            at = row + row_len;
        }
        None
    }

    /// Heap bytes held, for capacity planning.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.capacity() * size_of::<u32>()
            + self.buckets.capacity() * size_of::<u32>()
            + self.rows.capacity() * size_of::<(u32, u32)>()
    }
}

/// The key's bytes packed four to a word, the last one padded with zeros.
fn key_words(key: &[u8]) -> impl Iterator<Item = u32> + '_ {
    key.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_le_bytes(w)
    })
}

fn key_words_eq(words: &[u32], key: &[u8]) -> bool {
    words.iter().copied().eq(key_words(key))
}

/// A fast 64-bit string hash: eight bytes at a time, then the MurmurHash3 finalizer so that
/// the low bits (the bucket) are well mixed.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |h: u64, word: u64| (h ^ word).wrapping_mul(K).rotate_left(29);
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(w));
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(i: usize) -> Vec<u32> {
        (0..i % 5).map(|x| slot(x * i)).collect()
    }

    proptest! {
        #[test]
        fn finds_exactly_the_keys_it_holds(
            keys in proptest::collection::btree_set("[a-z0-9-]{0,70}", 0..200),
            probes in proptest::collection::vec("[a-z0-9-]{0,12}", 0..50),
        ) {
            let list: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            let map = KeyedRows::new(list.iter().enumerate().map(|(i, k)| (*k, row(i))));
            for (i, k) in list.iter().enumerate() {
                prop_assert_eq!(map.get(k).map(|r| r.to_vec()), Some(row(i)));
                prop_assert_eq!(map.at(slot(i)).to_vec(), row(i));
            }
            for p in &probes {
                let want = list.iter().position(|k| k == p).map(row);
                prop_assert_eq!(map.get(p).map(|r| r.to_vec()), want);
            }
        }
    }

    #[test]
    fn repeated_keys_keep_the_first_row() {
        let map = KeyedRows::new([("a", vec![1]), ("b", vec![]), ("a", vec![2])].into_iter());
        assert_eq!(map.get("a"), Some(&[1][..]));
        assert_eq!(map.get("b"), Some(&[][..]));
        assert_eq!(map.get("c"), None);
        assert_eq!(map.get(""), None);
        assert_eq!(map.at(2), &[1]);
    }

    #[test]
    fn keys_that_share_a_prefix_or_padding_differ() {
        let map = KeyedRows::new([("abcd", vec![1]), ("abc", vec![2])].into_iter());
        assert_eq!(map.get("abc"), Some(&[2][..]));
        assert_eq!(map.get("abc\0"), None);
        assert_eq!(map.get("abcd"), Some(&[1][..]));
    }
}
