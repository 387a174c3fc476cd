//! A persistent array: a radix tree of 64-wide nodes behind `Arc`s, so that cloning is O(1),
//! a write copies the (at most four, for a million slots) nodes on its path, and a read is a
//! few shifts and pointer loads with no size tables or balancing (the index's records are
//! only ever appended or replaced in place, so the general RRB vector is more than needed and
//! measurably slower on the lookup path).

use std::sync::Arc;

const BITS: u32 = 6;
const WIDTH: usize = 1 << BITS;
const MASK: usize = WIDTH - 1;

#[derive(Debug, Clone)]
enum Node<T> {
    Inner(Vec<Option<Arc<Node<T>>>>),
    Leaf(Vec<T>),
}

/// A persistent array of `T`, grown at the end.
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
    /// The number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The element at `i`.
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        let mut node = self.root.as_deref()?;
        let mut level = self.depth;
        loop {
            match node {
                Node::Inner(children) => {
                    let child = children.get((i >> (BITS * level)) & MASK)?;
                    node = child.as_deref()?;
                    level -= 1;
                }
                Node::Leaf(items) => return items.get(i & MASK),
            }
        }
    }

    /// Replaces the element at `i` (which exists).
    pub(crate) fn set(&mut self, i: usize, value: T) {
        if i >= self.len {
            return;
        }
        if let Some(root) = self.root.as_mut() {
            Self::set_in(root, self.depth, i, value);
        }
    }

    fn set_in(node: &mut Arc<Node<T>>, level: u32, i: usize, value: T) {
        match Arc::make_mut(node) {
            Node::Inner(children) => {
                if let Some(Some(child)) = children.get_mut((i >> (BITS * level)) & MASK) {
                    Self::set_in(child, level - 1, i, value);
                }
            }
            Node::Leaf(items) => {
                if let Some(place) = items.get_mut(i & MASK) {
                    *place = value;
                }
            }
        }
    }

    /// Appends `value`.
    pub(crate) fn push(&mut self, value: T) {
        let i = self.len;
        let capacity = WIDTH << (BITS * self.depth);
        if self.root.is_none() {
            self.root = Some(Arc::new(Node::Leaf(Vec::with_capacity(WIDTH))));
        } else if i == capacity {
            let old = self.root.take();
            self.root = Some(Arc::new(Node::Inner(vec![old])));
            self.depth += 1;
        }
        if let Some(root) = self.root.as_mut() {
            Self::push_in(root, self.depth, i, value);
        }
        self.len += 1;
    }

    fn push_in(node: &mut Arc<Node<T>>, level: u32, i: usize, value: T) {
        match Arc::make_mut(node) {
            Node::Inner(children) => {
                let at = (i >> (BITS * level)) & MASK;
                if at == children.len() {
                    let fresh = if level == 1 {
                        Node::Leaf(Vec::with_capacity(WIDTH))
                    } else {
                        Node::Inner(Vec::new())
                    };
                    children.push(Some(Arc::new(fresh)));
                }
                if let Some(Some(child)) = children.get_mut(at) {
                    Self::push_in(child, level - 1, i, value);
                }
            }
            Node::Leaf(items) => items.push(value),
        }
    }

    /// The elements in order.
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
                trie.push(i as u32);
                model.push(i as u32);
            }
            let snapshot = trie.clone();
            for (i, v) in sets {
                trie.set(i, v);
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
