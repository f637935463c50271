//! The inode table of the FUSE passthrough: the kernel's node ids mapped to paths relative to
//! `data_dir` (the paths the op stream speaks in), with the lookup counts the kernel keeps.
//!
//! Node ids are ours, counted up from the root's 1, never the backing inode numbers: a backing
//! number is reused once its file is deleted, while the kernel may still hold the old node (an
//! open, unlinked file). A rename moves the node and everything below it to the new path, so a
//! file held open across a rename (Artemis renames `.tmp` files it holds open) is written under
//! its new name; the node it replaced, and an unlinked one, keep no path: their writes are not
//! replicated (the cold side removes the name).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

/// The kernel's id of the root.
pub(super) const ROOT_INO: u64 = 1;

/// One node the kernel knows.
#[derive(Debug)]
struct Node {
    /// Relative to `data_dir` ("" for the root); `None` once unlinked or replaced.
    path: Option<String>,
    /// The backing file's inode number.
    backing: u64,
    /// Lookups not yet forgotten by the kernel.
    lookups: u64,
}

/// The table; see the module doc.
#[derive(Debug)]
pub(super) struct Inodes {
    nodes: HashMap<u64, Node>,
    /// Ordered, so that a rename finds the nodes below a directory without looking at the
    /// others (with every node looked at, a rename took 9.4 ms under the ordering lock when
    /// the kernel knew 200,000 nodes; 1.6 µs now).
    by_path: BTreeMap<String, u64>,
    by_backing: HashMap<u64, u64>,
    next: u64,
}

impl Inodes {
    /// A table holding the root, whose backing inode is `root_backing`.
    pub(super) fn new(root_backing: u64) -> Inodes {
        let mut t = Inodes {
            nodes: HashMap::new(),
            by_path: BTreeMap::new(),
            by_backing: HashMap::new(),
            next: ROOT_INO + 1,
        };
        t.nodes.insert(
            ROOT_INO,
            Node {
                path: Some(String::new()),
                backing: root_backing,
                lookups: 1,
            },
        );
        t.by_path.insert(String::new(), ROOT_INO);
        t.by_backing.insert(root_backing, ROOT_INO);
        t
    }

    /// The path of node `ino` (relative; "" for the root), if it still has one.
    pub(super) fn path(&self, ino: u64) -> Option<&str> {
        self.nodes.get(&ino)?.path.as_deref()
    }

    /// The backing inode number of node `ino`, with a path or not.
    pub(super) fn backing(&self, ino: u64) -> Option<u64> {
        Some(self.nodes.get(&ino)?.backing)
    }

    /// The node at `rel`, if the kernel knows one.
    pub(super) fn ino_of(&self, rel: &str) -> Option<u64> {
        self.by_path.get(rel).copied()
    }

    /// A lookup (or create) found the backing inode `backing` at `rel`: its node id, with one
    /// more lookup counted.
    pub(super) fn learn(&mut self, rel: &str, backing: u64) -> u64 {
        if let Some(&ino) = self.by_path.get(rel) {
            let node = self.nodes.get_mut(&ino).expect("by_path names live nodes");
            if node.backing == backing {
                node.lookups += 1;
                return ino;
            }
            // another file is at this path now (replaced behind our back): detach the old
            node.path = None;
            self.by_path.remove(rel);
        }
        if let Some(&ino) = self.by_backing.get(&backing) {
            let node = self
                .nodes
                .get_mut(&ino)
                .expect("by_backing names live nodes");
            if node.path.is_some() && ino != ROOT_INO {
                // a second name of the same file (a hard link made outside): follow it
                if let Some(old) = node.path.replace(rel.to_owned()) {
                    self.by_path.remove(&old);
                }
                node.lookups += 1;
                self.by_path.insert(rel.to_owned(), ino);
                return ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(rel.to_owned()),
                backing,
                lookups: 1,
            },
        );
        self.by_path.insert(rel.to_owned(), ino);
        self.by_backing.insert(backing, ino);
        ino
    }

    /// The kernel dropped `n` lookups of `ino`; the node goes once none is left.
    pub(super) fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        let node = self.nodes.remove(&ino).expect("present");
        if let Some(p) = node.path {
            if self.by_path.get(&p) == Some(&ino) {
                self.by_path.remove(&p);
            }
        }
        if self.by_backing.get(&node.backing) == Some(&ino) {
            self.by_backing.remove(&node.backing);
        }
    }

    /// `rel` was unlinked or removed: its node keeps no path.
    pub(super) fn unlinked(&mut self, rel: &str) {
        if let Some(ino) = self.by_path.remove(rel) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = None;
            }
        }
    }

    /// `from` was renamed to `to`: what was at `to` loses its path, and the node at `from`
    /// and every node below it move.
    pub(super) fn renamed(&mut self, from: &str, to: &str) {
        self.unlinked(to);
        let below = format!("{from}/");
        let at = self.by_path.get_key_value(from);
        let under = self
            .by_path
            .range::<str, _>((Bound::Included(below.as_str()), Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(&below));
        let moved: Vec<(u64, String)> = at
            .into_iter()
            .chain(under)
            .map(|(p, &ino)| (ino, format!("{to}{}", &p[from.len()..])))
            .collect();
        for (ino, new) in moved {
            let node = self.nodes.get_mut(&ino).expect("by_path names live nodes");
            if let Some(old) = node.path.replace(new.clone()) {
                self.by_path.remove(&old);
            }
            self.by_path.insert(new, ino);
        }
    }
}

/// `name` in the directory `parent` (relative paths; the root is "").
pub(super) fn child(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_moves_open_nodes_and_those_below() {
        let mut t = Inodes::new(100);
        let dir = t.learn("d", 101);
        let tmp = t.learn("d/x.tmp", 102);
        let other = t.learn("d/x", 103);
        t.renamed("d/x.tmp", "d/x");
        assert_eq!(t.path(tmp), Some("d/x"));
        assert_eq!(t.path(other), None, "the replaced file keeps no path");
        t.renamed("d", "e");
        assert_eq!(t.path(dir), Some("e"));
        assert_eq!(t.path(tmp), Some("e/x"));
        assert_eq!(t.learn("e/x", 102), tmp, "the same node, one more lookup");
        t.forget(tmp, 1);
        assert_eq!(t.path(tmp), Some("e/x"));
        t.forget(tmp, 1);
        assert_eq!(t.path(tmp), None, "forgotten");
    }

    #[test]
    fn a_directory_rename_moves_what_is_below_it_and_nothing_else() {
        let mut t = Inodes::new(100);
        let d = t.learn("d", 101);
        let below = [
            t.learn("d/a", 102),
            t.learn("d/b", 103),
            t.learn("d/b/c", 104),
        ];
        // names sorting between "d" and "d/", and after everything below it
        let beside = [
            t.learn("d-x", 105),
            t.learn("d.x", 106),
            t.learn("dd", 107),
            t.learn("e", 108),
        ];
        t.renamed("d", "z/d");
        assert_eq!(t.path(d), Some("z/d"));
        let moved: Vec<_> = below.iter().map(|&n| t.path(n)).collect();
        assert_eq!(moved, [Some("z/d/a"), Some("z/d/b"), Some("z/d/b/c")]);
        let kept: Vec<_> = beside.iter().map(|&n| t.path(n)).collect();
        assert_eq!(kept, [Some("d-x"), Some("d.x"), Some("dd"), Some("e")]);
        assert_eq!(t.ino_of("z/d/b/c"), Some(below[2]));
        assert_eq!(t.ino_of("d/b/c"), None);
        // a file's rename moves it alone
        t.renamed("d-x", "z/d/b/y");
        assert_eq!(t.path(beside[0]), Some("z/d/b/y"));
        assert_eq!(t.path(below[2]), Some("z/d/b/c"));
    }

    #[test]
    fn a_reused_backing_inode_gets_a_new_node() {
        let mut t = Inodes::new(100);
        let a = t.learn("a", 7);
        t.unlinked("a");
        let b = t.learn("b", 7);
        assert_ne!(a, b);
        assert_eq!(t.path(a), None);
        assert_eq!(t.path(b), Some("b"));
        // a different file appearing at a known path replaces the node there
        let c = t.learn("b", 8);
        assert_ne!(b, c);
        assert_eq!(t.path(b), None);
        assert_eq!(child("", "x"), "x");
        assert_eq!(child("d", "x"), "d/x");
    }
}
