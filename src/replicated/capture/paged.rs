//! Files by path, each with its pages, and the pages they hold in all: the pre-hashes
//! (`prehash.rs`) and the record (`record.rs`) are both such maps, each under a page budget,
//! and both drop a path with everything below it when an event makes it stale.

use std::collections::BTreeMap;

use crate::replicated::capture::scan::remove_below;

/// An entry that holds some number of pages.
pub(super) trait Paged {
    fn page_count(&self) -> usize;
}

/// See the module doc.
#[derive(Debug)]
pub(super) struct PagedFiles<T> {
    pub(super) files: BTreeMap<String, T>,
    /// The pages of every entry, summed.
    pub(super) pages: usize,
}

impl<T> Default for PagedFiles<T> {
    fn default() -> Self {
        PagedFiles {
            files: BTreeMap::new(),
            pages: 0,
        }
    }
}

impl<T: Paged> PagedFiles<T> {
    pub(super) fn insert(&mut self, rel: String, v: T) {
        self.pages += v.page_count();
        if let Some(old) = self.files.insert(rel, v) {
            self.pages -= old.page_count();
        }
    }

    pub(super) fn remove(&mut self, rel: &str) -> Option<T> {
        let v = self.files.remove(rel)?;
        self.pages -= v.page_count();
        Some(v)
    }

    /// Drops `rel` and everything below it.
    pub(super) fn forget(&mut self, rel: &str) {
        self.remove(rel);
        let before = self.files.len();
        remove_below(&mut self.files, &format!("{rel}/"));
        if self.files.len() != before {
            self.pages = self.files.values().map(Paged::page_count).sum();
        }
    }

    pub(super) fn clear(&mut self) {
        self.files.clear();
        self.pages = 0;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}
