//! A persistent hash table for the lookup path (identity id → record, service name →
//! record): buckets in a radix trie, grown by linear hashing (each insert splits at most one
//! bucket, so no insert ever rehashes the table). A lookup reads a trie leaf, one bucket and
//! the matching key, fewer dependent memory reads than a HAMT, which at 100,000 identities is
//! what a lookup costs.

use std::borrow::Borrow;
use std::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::sync::Arc;

use super::trie::Trie;

/// The core has no randomness; keys are chosen by the controller and its admins, not by the
/// peers whose requests are looked up.
type Hasher = BuildHasherDefault<std::hash::DefaultHasher>;

/// Entries per bucket, on average, before a bucket is split.
const LOAD: usize = 2;

type Bucket<K, V> = Arc<[(u64, K, V)]>;

/// A persistent map from `K` to `V`.
#[derive(Debug, Clone)]
pub(crate) struct Table<K, V> {
    buckets: Trie<Bucket<K, V>>,
    /// Buckets are addressed by the low `level` bits of the hash, or `level + 1` bits for
    /// those below `split`, which have been split already.
    level: u32,
    split: usize,
    len: usize,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            buckets: Trie::default(),
            level: 0,
            split: 0,
            len: 0,
        }
    }
}

fn hash<Q: Hash + ?Sized>(key: &Q) -> u64 {
    Hasher::default().hash_one(key)
}

impl<K: Clone + Eq + Hash, V: Clone> Table<K, V> {
    fn bucket_of(&self, h: u64) -> usize {
        let low = (h & ((1u64 << self.level) - 1)) as usize;
        if low < self.split {
            (h & ((1u64 << (self.level + 1)) - 1)) as usize
        } else {
            low
        }
    }

    /// The value stored under `key`.
    #[inline]
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let h = hash(key);
        let bucket = self.buckets.get(self.bucket_of(h))?;
        (bucket.iter())
            .find(|(eh, k, _)| *eh == h && k.borrow() == key)
            .map(|(_, _, v)| v)
    }

    /// Stores `value` under `key`, replacing any value there.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.buckets.len() == 0 {
            self.buckets.push(None);
        }
        let h = hash(&key);
        let at = self.bucket_of(h);
        let old = self.buckets.get(at).cloned();
        let mut entries: Vec<(u64, K, V)> = old.as_deref().unwrap_or(&[]).to_vec();
        match entries.iter_mut().find(|(eh, k, _)| *eh == h && *k == key) {
            Some(entry) => entry.2 = value,
            None => {
                entries.push((h, key, value));
                self.len += 1;
            }
        }
        self.buckets.set(at, Some(entries.into()));
        if self.len > LOAD * self.buckets.len() {
            self.split_one();
        }
    }

    /// Splits the next bucket in turn into itself and a new last bucket.
    fn split_one(&mut self) {
        let at = self.split;
        let entries = self.buckets.get(at).cloned();
        let bit = 1u64 << self.level;
        let (stay, go): (Vec<_>, Vec<_>) =
            (entries.as_deref().unwrap_or(&[]).iter().cloned()).partition(|(h, _, _)| h & bit == 0);
        let shared = |v: Vec<(u64, K, V)>| (!v.is_empty()).then(|| v.into());
        self.buckets.set(at, shared(stay));
        self.buckets.push(shared(go));
        self.split += 1;
        if self.split == 1 << self.level {
            self.level += 1;
            self.split = 0;
        }
    }

    /// Removes and returns the value stored under `key`.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let h = hash(key);
        let at = self.bucket_of(h);
        let old = self.buckets.get(at)?.clone();
        let position = (old.iter()).position(|(eh, k, _)| *eh == h && k.borrow() == key)?;
        let mut entries = old.to_vec();
        let (_, _, value) = entries.remove(position);
        self.buckets
            .set(at, (!entries.is_empty()).then(|| entries.into()));
        self.len -= 1;
        Some(value)
    }

    /// The number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), 0u16..400, any::<u8>()), 0..1500)) {
            let mut table: Table<String, u8> = Table::default();
            let mut model = BTreeMap::new();
            let mut snapshot = None;
            for (n, (put, k, v)) in ops.into_iter().enumerate() {
                let key = format!("k{k}");
                if put {
                    table.insert(key.clone(), v);
                    model.insert(key, v);
                } else {
                    prop_assert_eq!(table.remove(key.as_str()), model.remove(&key));
                }
                if n == 100 {
                    snapshot = Some((table.clone(), model.clone()));
                }
            }
            prop_assert_eq!(table.len(), model.len());
            for k in 0..400u16 {
                let key = format!("k{k}");
                prop_assert_eq!(table.get(key.as_str()), model.get(&key));
            }
            if let Some((table, model)) = snapshot {
                for (k, v) in &model {
                    prop_assert_eq!(table.get(k.as_str()), Some(v));
                }
            }
        }
    }
}
