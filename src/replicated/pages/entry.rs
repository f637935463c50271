//! What `verify` compares, entry by entry: an [`Entry`] is everything item by item that makes
//! a copy exact (type, mode, owner and group, size, allocation, content digest, symlink
//! target). The cold side sends one per path with its root digest; the hot side compares them
//! with its own and names each difference ("journal/a: owner 4321:4322 vs 0:0").

use std::collections::BTreeMap;

use crate::replicated::pages::{Attrs, TreeIndex};

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symlink.
    Link,
}

impl EntryKind {
    /// Its byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            EntryKind::Dir => 1,
            EntryKind::File => 2,
            EntryKind::Link => 3,
        }
    }

    /// The kind a byte on the wire names.
    pub fn from_code(code: u8) -> Option<EntryKind> {
        match code {
            1 => Some(EntryKind::Dir),
            2 => Some(EntryKind::File),
            3 => Some(EntryKind::Link),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            EntryKind::Dir => "a directory",
            EntryKind::File => "a file",
            EntryKind::Link => "a symlink",
        }
    }
}

/// One entry of a tree as `verify` compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Directory, file or symlink.
    pub kind: EntryKind,
    /// Mode, owner and group.
    pub attrs: Attrs,
    /// A file's length (0 otherwise).
    pub len: u64,
    /// Whether a file is fully allocated (false otherwise).
    pub allocated: bool,
    /// A file's content digest (zeros otherwise).
    pub content: [u8; 32],
    /// A symlink's target (empty otherwise).
    pub target: String,
}

impl Entry {
    fn hash_into(&self, path: &str, h: &mut blake3::Hasher) {
        h.update(&[self.kind.code()]);
        h.update(path.as_bytes());
        h.update(&[0]);
        for v in [self.attrs.mode, self.attrs.uid, self.attrs.gid] {
            h.update(&v.to_le_bytes());
        }
        h.update(&self.len.to_le_bytes());
        h.update(&[u8::from(self.allocated)]);
        h.update(&self.content);
        h.update(self.target.as_bytes());
        h.update(&[0]);
    }

    /// What differs between the hot entry `self` and the cold one at `path`, in words.
    pub fn differences(&self, path: &str, cold: &Entry) -> Vec<String> {
        if self.kind != cold.kind {
            return vec![format!(
                "{path}: {} vs {}",
                self.kind.name(),
                cold.kind.name()
            )];
        }
        let mut out = Vec::new();
        let (h, c) = (self.attrs, cold.attrs);
        if h.mode != c.mode && self.kind != EntryKind::Link {
            out.push(format!("{path}: mode {:o} vs {:o}", h.mode, c.mode));
        }
        if (h.uid, h.gid) != (c.uid, c.gid) {
            out.push(format!(
                "{path}: owner {}:{} vs {}:{}",
                h.uid, h.gid, c.uid, c.gid
            ));
        }
        if self.len != cold.len {
            out.push(format!("{path}: size {} vs {}", self.len, cold.len));
        } else if self.content != cold.content {
            out.push(format!("{path}: contents differ"));
        }
        if self.allocated != cold.allocated {
            let word = |a: bool| if a { "fully allocated" } else { "sparse" };
            out.push(format!(
                "{path}: {} vs {}",
                word(self.allocated),
                word(cold.allocated)
            ));
        }
        if self.target != cold.target {
            out.push(format!(
                "link {path}: target {} vs {}",
                self.target, cold.target
            ));
        }
        out
    }
}

impl TreeIndex {
    /// Every entry as `verify` compares it, by path.
    pub fn entries(&self) -> BTreeMap<String, Entry> {
        let mut out = BTreeMap::new();
        for (d, attrs) in &self.dirs {
            let e = Entry {
                kind: EntryKind::Dir,
                attrs: *attrs,
                len: 0,
                allocated: false,
                content: [0; 32],
                target: String::new(),
            };
            out.insert(d.clone(), e);
        }
        for (f, state) in &self.files {
            let e = Entry {
                kind: EntryKind::File,
                attrs: state.attrs,
                len: state.len,
                allocated: state.allocated,
                content: state.digest(),
                target: String::new(),
            };
            out.insert(f.clone(), e);
        }
        for (l, link) in &self.links {
            let e = Entry {
                kind: EntryKind::Link,
                attrs: link.attrs,
                len: 0,
                allocated: false,
                content: [0; 32],
                target: link.target.clone(),
            };
            out.insert(l.clone(), e);
        }
        out
    }

    /// The root digest over every entry, and the entries, for `verify`.
    pub fn digest(&self) -> ([u8; 32], BTreeMap<String, Entry>) {
        let entries = self.entries();
        let mut root = blake3::Hasher::new();
        for (p, e) in &entries {
            e.hash_into(p, &mut root);
        }
        (*root.finalize().as_bytes(), entries)
    }
}

/// Every difference between the hot entries and the cold ones, in path order: what is
/// missing on either side, and what differs in an entry present on both.
pub fn compare_entries(
    hot: &BTreeMap<String, Entry>,
    cold: &BTreeMap<String, Entry>,
) -> Vec<String> {
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&String> = hot.keys().chain(cold.keys()).collect();
    for p in paths {
        match (hot.get(p), cold.get(p)) {
            (Some(h), Some(c)) => out.extend(h.differences(p, c)),
            (Some(_), None) => out.push(format!("{p}: missing on cold")),
            (None, Some(_)) => out.push(format!("{p}: only on cold")),
            (None, None) => {}
        }
    }
    out
}
