//! A compact, read-only map from string keys (identity ids, service names) to rows of `u32`.
//!
//! It exists for the lookup latency target. With 100,000 identities almost every lookup misses
//! the CPU caches, and what it costs is the number of memory reads that depend on each other.
//! A `HashMap<String, u32>` followed by per-slot arrays costs four or five (hash bucket, key
//! string, slot's row offset, row). Here each key and its row sit together in one block of a
//! single array, and the hash table holds the block's offset next to a 32-bit tag of the
//! hash: a lookup reads one table entry, then one contiguous block.
//!
//! The hash is unkeyed. That is safe because the keys in the table are chosen by the
//! controller (random identity ids) and by admins (service names), not by the peers who send
//! lookups, and a peer choosing lookup keys cannot lengthen probe sequences.

use super::rows::slot;

#[derive(Debug, Clone)]
pub(crate) struct KeyedRows {
    /// Blocks back to back: the key's length in bytes, the key packed into little-endian
    /// words, the row's length, the row.
    words: Vec<u32>,
    /// Open addressing with linear probing. An entry is the hash's high 32 bits above the
    /// block's offset plus one; zero marks an empty entry.
    table: Vec<u64>,
    /// The row of each entry, by position in the input.
    rows: Vec<(u32, u32)>,
}

impl KeyedRows {
    /// Maps each key to its row. Keys are expected to be distinct (they come from map keys);
    /// if one repeats, the first row wins.
    pub(crate) fn new<'a>(entries: impl ExactSizeIterator<Item = (&'a str, Vec<u32>)>) -> Self {
        // At most half full, so probe sequences stay short.
        let capacity = (entries.len() * 2).next_power_of_two().max(16);
        let mut map = KeyedRows {
            words: Vec::new(),
            table: vec![0; capacity],
            rows: Vec::with_capacity(entries.len()),
        };
        for (key, row) in entries {
            let h = hash(key.as_bytes());
            let mut at = h as usize & (capacity - 1);
            let existing = loop {
                match map.table[at] {
                    0 => break None,
                    entry => match map.block(entry, h, key) {
                        Some(found) => break Some(found),
                        None => at = (at + 1) & (capacity - 1),
                    },
                }
            };
            let found = existing.unwrap_or_else(|| {
                map.table[at] = (h & !0xffff_ffff) | u64::from(slot(map.words.len() + 1));
                map.words.push(slot(key.len()));
                map.words.extend(key_words(key.as_bytes()));
                map.words.push(slot(row.len()));
                let start = map.words.len();
                map.words.extend(row);
                start..map.words.len()
            });
            map.rows.push((slot(found.start), slot(found.end)));
        }
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
    fn find(&self, key: &str) -> Option<std::ops::Range<usize>> {
        let mask = self.table.len() - 1;
        let h = hash(key.as_bytes());
        let mut at = h as usize & mask;
        loop {
            let entry = self.table[at];
            if entry == 0 {
                return None;
            }
            if let Some(row) = self.block(entry, h, key) {
                return Some(row);
            }
            at = (at + 1) & mask;
        }
    }

    /// Where the row of a non-empty table entry is, if the entry holds `key` (whose hash is
    /// `h`).
    fn block(&self, entry: u64, h: u64, key: &str) -> Option<std::ops::Range<usize>> {
        if entry >> 32 != h >> 32 {
            return None;
        }
        let start = (entry as u32 - 1) as usize;
        let block = &self.words[start..];
        let key_words = key.len().div_ceil(4);
        if block[0] as usize != key.len() || !key_words_eq(&block[1..=key_words], key.as_bytes()) {
            return None;
        }
        let row = start + 2 + key_words;
        Some(row..row + block[1 + key_words] as usize)
    }

    /// Heap bytes held, for capacity planning.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.capacity() * size_of::<u32>()
            + self.table.capacity() * size_of::<u64>()
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
/// both the low bits (the table position) and the high bits (the tag) are well mixed.
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
