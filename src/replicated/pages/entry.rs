//! What `verify` compares, entry by entry: an [`Entry`] is everything item by item that makes
//! a copy exact (type, mode, owner and group, size, allocation, content digest, symlink
//! target). The cold side sends one per path with its root digest; the hot side compares them
//! with its own and names each difference ("journal/a: owner 4321:4322 vs 0:0").

use std::collections::BTreeMap;

use crate::replicated::pages::{fully_allocated, Attrs, FileState, LinkState, TreeIndex};

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
    /// A directory's entry.
    pub fn dir(attrs: Attrs) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            attrs,
            len: 0,
            allocated: false,
            content: [0; 32],
            target: String::new(),
        }
    }

    /// A file's entry: its metadata, and its content digest ([`FileState::digest`]).
    pub fn file(meta: &std::fs::Metadata, content: [u8; 32]) -> Entry {
        Entry {
            kind: EntryKind::File,
            attrs: Attrs::of(meta),
            len: meta.len(),
            allocated: fully_allocated(meta),
            content,
            target: String::new(),
        }
    }

    /// A file's entry from the table.
    fn of_state(state: &FileState) -> Entry {
        Entry {
            kind: EntryKind::File,
            attrs: state.attrs,
            len: state.len,
            allocated: state.allocated,
            content: state.digest(),
            target: String::new(),
        }
    }

    /// A symlink's entry.
    pub fn link(link: LinkState) -> Entry {
        Entry {
            kind: EntryKind::Link,
            attrs: link.attrs,
            len: 0,
            allocated: false,
            content: [0; 32],
            target: link.target,
        }
    }

    /// Adds this entry at `path` to a root digest.
    pub(super) fn hash_into(&self, path: &str, h: &mut blake3::Hasher) {
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
    /// Every entry as `verify` compares it, in path order, computed one at a time.
    pub fn entries_in_order(&self) -> impl Iterator<Item = (&str, Entry)> + '_ {
        let mut dirs = self.dirs.iter().peekable();
        let mut files = self.files.iter().peekable();
        let mut links = self.links.iter().peekable();
        std::iter::from_fn(move || {
            let heads = [
                dirs.peek().map(|(p, _)| p.as_str()),
                files.peek().map(|(p, _)| p.as_str()),
                links.peek().map(|(p, _)| p.as_str()),
            ];
            let least = heads.into_iter().flatten().min()?;
            // a path in two maps (never on a real disk) counts once, as the later map's
            let mut out = None;
            if heads[0] == Some(least) {
                out = dirs.next().map(|(p, a)| (p.as_str(), Entry::dir(*a)));
            }
            if heads[1] == Some(least) {
                out = files.next().map(|(p, f)| (p.as_str(), Entry::of_state(f)));
            }
            if heads[2] == Some(least) {
                out = links
                    .next()
                    .map(|(p, l)| (p.as_str(), Entry::link(l.clone())));
            }
            out
        })
    }

    /// Every entry as `verify` compares it, by path.
    pub fn entries(&self) -> BTreeMap<String, Entry> {
        self.entries_in_order()
            .map(|(p, e)| (p.to_owned(), e))
            .collect()
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

/// What a finished comparison found: the hot root digest, the entries on each side, and every
/// difference in path order (as [`compare_entries`] names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The hot table's root digest.
    pub hot_root: [u8; 32],
    /// Entries on the hot side.
    pub hot_entries: usize,
    /// Entries on the cold side.
    pub cold_entries: usize,
    /// Each difference, in words.
    pub differing: Vec<String>,
}

/// `verify`'s comparison, streamed: the hot table's entries, computed one at a time in path
/// order, merged with the cold side's as they arrive (in path order too), so that neither
/// side's entries are ever held whole; only the differences are kept.
pub struct DigestCompare<'t> {
    hot: std::iter::Peekable<Box<dyn Iterator<Item = (&'t str, Entry)> + 't>>,
    root: blake3::Hasher,
    last_cold: Option<String>,
    hot_entries: usize,
    cold_entries: usize,
    differing: Vec<String>,
}

impl std::fmt::Debug for DigestCompare<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestCompare")
            .field("hot_entries", &self.hot_entries)
            .field("cold_entries", &self.cold_entries)
            .field("differing", &self.differing.len())
            .finish_non_exhaustive()
    }
}

impl<'t> DigestCompare<'t> {
    /// A comparison of `hot` with cold entries still to come.
    pub fn new(hot: &'t TreeIndex) -> Self {
        let entries: Box<dyn Iterator<Item = (&'t str, Entry)> + 't> =
            Box::new(hot.entries_in_order());
        DigestCompare {
            hot: entries.peekable(),
            root: blake3::Hasher::new(),
            last_cold: None,
            hot_entries: 0,
            cold_entries: 0,
            differing: Vec::new(),
        }
    }

    /// The next hot entry, counted in the root digest.
    fn take_hot(&mut self) -> Option<(&'t str, Entry)> {
        let (path, entry) = self.hot.next()?;
        entry.hash_into(path, &mut self.root);
        self.hot_entries += 1;
        Some((path, entry))
    }

    /// Compares the next cold entries; `Err` if they are not in path order after those
    /// before them (the merge would then name false differences).
    pub fn feed(&mut self, cold: Vec<(String, Entry)>) -> Result<(), String> {
        for (path, entry) in cold {
            if self
                .last_cold
                .as_deref()
                .is_some_and(|l| l >= path.as_str())
            {
                return Err(format!(
                    "the cold side's digest is not in path order at {path:?}"
                ));
            }
            self.cold_entries += 1;
            loop {
                match self.hot.peek() {
                    Some((hot, _)) if *hot < path.as_str() => {
                        let (hot, _) = self.take_hot().expect("peeked");
                        self.differing.push(format!("{hot}: missing on cold"));
                    }
                    Some((hot, _)) if *hot == path.as_str() => {
                        let (hot, hot_entry) = self.take_hot().expect("peeked");
                        self.differing.extend(hot_entry.differences(hot, &entry));
                        break;
                    }
                    _ => {
                        self.differing.push(format!("{path}: only on cold"));
                        break;
                    }
                }
            }
            self.last_cold = Some(path);
        }
        Ok(())
    }

    /// The cold side sent its last entry: what is left of the hot side is missing on cold.
    pub fn finish(mut self) -> Comparison {
        while let Some((hot, _)) = self.take_hot() {
            self.differing.push(format!("{hot}: missing on cold"));
        }
        Comparison {
            hot_root: *self.root.finalize().as_bytes(),
            hot_entries: self.hot_entries,
            cold_entries: self.cold_entries,
            differing: self.differing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_attrs() -> impl Strategy<Value = Attrs> {
        (0u32..3, 0u32..2).prop_map(|(mode, uid)| Attrs {
            mode: 0o600 + mode,
            uid,
            gid: 0,
        })
    }

    /// A small tree whose paths share prefixes around `/` (`a`, `a-b`, `a/b`).
    fn arb_tree() -> impl Strategy<Value = TreeIndex> {
        let path = "[ab]{1,2}([-/][ab]{1,2}){0,2}";
        let file =
            (0u8..3, arb_attrs(), any::<bool>()).prop_map(|(len, attrs, allocated)| FileState {
                len: u64::from(len),
                attrs,
                allocated,
                pages: vec![[len; 16]; usize::from(len)],
            });
        let link = ("[xy]", arb_attrs()).prop_map(|(target, attrs)| LinkState { target, attrs });
        (
            proptest::collection::btree_map(path, arb_attrs(), 0..5),
            proptest::collection::btree_map(path, file, 0..6),
            proptest::collection::btree_map(path, link, 0..3),
        )
            .prop_map(|(dirs, mut files, mut links)| {
                // one kind per path, as on a disk
                files.retain(|p, _| !dirs.contains_key(p));
                links.retain(|p, _| !dirs.contains_key(p) && !files.contains_key(p));
                TreeIndex { dirs, files, links }
            })
    }

    proptest! {
        /// Fed in chunks of any size, the streamed comparison names exactly what comparing
        /// both trees whole names, and the same root digest.
        #[test]
        fn the_streamed_comparison_equals_the_whole_one(
            hot in arb_tree(),
            cold in arb_tree(),
            chunk in 1usize..4,
        ) {
            let (hot_root, hot_entries) = hot.digest();
            let (_, cold_entries) = cold.digest();
            let want = compare_entries(&hot_entries, &cold_entries);
            let mut cmp = DigestCompare::new(&hot);
            let cold_list: Vec<(String, Entry)> = cold_entries.clone().into_iter().collect();
            for part in cold_list.chunks(chunk) {
                cmp.feed(part.to_vec()).unwrap();
            }
            let got = cmp.finish();
            prop_assert_eq!(got.differing, want);
            prop_assert_eq!(got.hot_root, hot_root);
            prop_assert_eq!(got.hot_entries, hot_entries.len());
            prop_assert_eq!(got.cold_entries, cold_entries.len());
        }
    }

    #[test]
    fn cold_entries_out_of_path_order_are_refused() {
        let hot = TreeIndex::default();
        let mut cmp = DigestCompare::new(&hot);
        let e = Entry::dir(Attrs::default());
        cmp.feed(vec![("b".into(), e.clone())]).unwrap();
        let err = cmp.feed(vec![("a".into(), e)]).unwrap_err();
        assert!(err.contains("not in path order"), "{err}");
    }
}
