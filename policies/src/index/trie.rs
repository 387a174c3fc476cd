//! A persistent array: a radix tree of 64-wide nodes behind `Arc`s, so that cloning is O(1),
//! a write copies the (at most four, for a million slots) nodes on its path, and a read is a
//! few shifts and one pointer load per level (each node holds its 64 entries inline), with no
//! size tables or balancing: the index's records are only ever appended or replaced in place,
//! so the general RRB vector is more than needed and measurably slower on the lookup path.

use std::sync::Arc;

const BITS: u32 = 6;
const WIDTH: usize = 1 << BITS;
const MASK: usize = WIDTH - 1;

// Nodes live behind `Arc`s already; boxing a variant would add back the load per level this
// layout exists to avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Node<T> {
    Inner([Option<Arc<Node<T>>>; WIDTH]),
    Leaf([Option<T>; WIDTH]),
}

impl<T> Node<T> {
    fn leaf() -> Self {
        Node::Leaf(std::array::from_fn(|_| None))
    }

    fn inner() -> Self {
        Node::Inner(std::array::from_fn(|_| None))
    }
}

/// A persistent array of optional `T`, grown at the end.
#[derive(Debug, Clone)]
pub(crate) struct Trie<T> {
    root: Option<Arc<Node<T>>>,
    /// Levels of inner nodes above the leaves.
    depth: u32,
    len: usize,
}

impl<T> Default for Trie<T> {
    fn default() -> Self {
        Trie {
            root: None,
            depth: 0,
            len: 0,
        }
    }
}

impl<T: Clone> Trie<T> {
    /// The number of places (used or not).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The element at `i`, if there is one.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        let mut node = self.root.as_deref()?;
        let mut level = self.depth;
        loop {
            match node {
                Node::Inner(children) => {
                    node = children[(i >> (BITS * level)) & MASK].as_deref()?;
                    level = level.saturating_sub(1);
                }
                Node::Leaf(items) => return items[i & MASK].as_ref(),
            }
        }
    }

    /// The element at `i`, to change in place: the nodes on its path are copied first if
    /// another version shares them (and changed in place if not, as while building).
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        let mut node = self.root.as_mut()?;
        let mut level = self.depth;
        loop {
            match Arc::make_mut(node) {
                Node::Inner(children) => {
                    node = children[(i >> (BITS * level)) & MASK].as_mut()?;
                    level = level.saturating_sub(1);
                }
                Node::Leaf(items) => return items[i & MASK].as_mut(),
            }
        }
    }

    /// Puts `value` at `i` (below `len`), or empties the place.
    pub(crate) fn set(&mut self, i: usize, value: Option<T>) {
        if i >= self.len {
            return;
        }
        if let Some(root) = self.root.as_mut() {
            Self::set_in(root, self.depth, i, value);
        }
    }

    fn set_in(node: &mut Arc<Node<T>>, level: u32, i: usize, value: Option<T>) {
        match Arc::make_mut(node) {
            Node::Inner(children) => {
                let child = children[(i >> (BITS * level)) & MASK].get_or_insert_with(|| {
                    Arc::new(if level == 1 {
                        Node::leaf()
                    } else {
                        Node::inner()
                    })
                });
                Self::set_in(child, level.saturating_sub(1), i, value);
            }
            Node::Leaf(items) => items[i & MASK] = value,
        }
    }

    /// Appends `value`.
    pub(crate) fn push(&mut self, value: Option<T>) {
        let capacity = WIDTH << (BITS * self.depth);
        match self.root.take() {
            None => self.root = Some(Arc::new(Node::leaf())),
            Some(old) if self.len == capacity => {
                let mut inner = Node::inner();
                if let Node::Inner(children) = &mut inner {
                    children[0] = Some(old);
                }
                self.root = Some(Arc::new(inner));
                self.depth += 1;
            }
            Some(old) => self.root = Some(old),
        }
        self.len += 1;
        self.set(self.len - 1, value);
    }

    /// The elements in order, with their positions.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        (0..self.len).filter_map(move |i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_vec(n in 0usize..9_000, sets in proptest::collection::vec((0usize..9_000, any::<u32>()), 0..50)) {
            let mut trie = Trie::default();
            let mut model = Vec::new();
            for i in 0..n {
                trie.push(Some(i as u32));
                model.push(i as u32);
            }
            let snapshot = trie.clone();
            for (i, v) in sets {
                trie.set(i, Some(v));
                if let Some(place) = model.get_mut(i) {
                    *place = v;
                }
            }
            prop_assert_eq!(trie.len(), model.len());
            prop_assert_eq!(trie.iter().copied().collect::<Vec<_>>(), model);
            prop_assert_eq!(trie.get(n), None);
            // The snapshot still holds what it held.
            prop_assert!(snapshot.iter().enumerate().all(|(i, &v)| v == i as u32));
        }
    }
}
