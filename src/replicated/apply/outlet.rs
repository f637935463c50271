//! What the apply thread streams to the connection, as it walks the tree rather than after:
//! the index on a new connection (its parts in path order, a big file's page hashes in
//! chunks), and the digest at each barrier (entries in path order, in chunks, the root last).
//! Each goes through a bounded channel the connection drains onto the wire, so the apply
//! thread holds a directory listing and a chunk, not the tree; a connection that went away
//! ends the walk.

use tokio::sync::{mpsc, oneshot};

use crate::replicated::apply::{sync_fs, Applier};
use crate::replicated::ops::DigestPart;
use crate::replicated::pages::{
    digest_parts, file_index_parts, file_parts_from, other_index_part, walk_sorted, Entry,
    IndexPart, Node, PagesError, ReadBuf, Stamp,
};

/// Where a connection's barrier digests go, and the sizes of the parts (the wire's).
pub(crate) struct Outlet {
    /// The parts of each barrier's digest, in order.
    pub(crate) digests: mpsc::Sender<DigestPart>,
    /// Page hashes per index part.
    pub(crate) index_chunk_pages: usize,
    /// Bytes of entries per digest part, and how many bytes an entry takes.
    pub(crate) digest_chunk: (usize, fn(&str, &Entry) -> usize),
}

/// Why a streamed walk stopped early.
enum Stop {
    /// The tree could not be read.
    Pages(PagesError),
    /// The connection went away.
    Closed,
}

impl From<PagesError> for Stop {
    fn from(e: PagesError) -> Self {
        Stop::Pages(e)
    }
}

impl Applier {
    /// A new connection: streams the index into `parts`, answers `done` (unless the
    /// connection went away), and expects batch 1 next.
    pub(super) fn index(
        &mut self,
        parts: &mpsc::Sender<IndexPart>,
        done: oneshot::Sender<Result<(), PagesError>>,
        outlet: Outlet,
    ) {
        self.expected = 1;
        self.files.clear();
        if !self.synced_at_start {
            // an agent killed in the middle of a batch left its changes in the page cache,
            // unsynced and unnoted: the index would vouch for them, and the hot side would
            // never send them again
            if let Err(e) = sync_fs(&self.root) {
                let _ = done.send(Err(e));
                return;
            }
            self.synced_at_start = true;
            #[cfg(test)]
            self.log
                .push(super::Durability::SyncedFs(self.root.clone()));
        }
        if let Err(e) = self.sync_unsynced() {
            let _ = done.send(Err(e));
            return;
        }
        let chunk = outlet.index_chunk_pages;
        self.outlet = Some(outlet);
        let walked = self.index_walk(chunk, &mut |part| {
            parts.blocking_send(part).map_err(|_| Stop::Closed)
        });
        match walked {
            Ok(_) => {
                let _ = done.send(Ok(()));
            }
            Err(Stop::Pages(e)) => {
                let _ = done.send(Err(e));
            }
            Err(Stop::Closed) => tracing::debug!("the connection went away during the index"),
        }
    }

    /// Walks the tree for the index, handing `each` its parts: a file's pages come from the
    /// page memo where it vouches for them, read and hashed where it does not (and the memo
    /// learns them); a file too large for the memo is streamed as it is read.
    fn index_walk(
        &mut self,
        chunk: usize,
        each: &mut dyn FnMut(IndexPart) -> Result<(), Stop>,
    ) -> Result<usize, Stop> {
        let started = std::time::Instant::now();
        let root = self.root.clone();
        let page_size = self.page_size;
        let memo = &mut self.memo;
        memo.begin_index();
        let mut buf = ReadBuf::default();
        let (mut vouched, mut read) = (0usize, 0usize);
        let walked = walk_sorted(&root, &mut |rel, node| {
            let Node::File(file, meta) = node else {
                return other_index_part(rel, node).map_or(Ok(()), &mut *each);
            };
            let path = root.join(rel);
            if !memo.has_room(meta.len()) {
                let opened = (file, meta, path);
                return file_index_parts(rel, opened, page_size, (chunk, &mut buf), each);
            }
            let io = |op: &'static str| {
                let path = path.clone();
                move |source| PagesError::Io { op, path, source }
            };
            let known = memo.known(rel, meta);
            let vouching = known.is_some();
            let (mut pages, mut n) = memo
                .fill(file, meta.len(), known, &mut buf)
                .map_err(io("cannot read"))?;
            #[cfg(test)]
            if let Some(hook) = &mut self.index_hook {
                hook(&path);
            }
            let mut after = file.metadata().map_err(io("cannot inspect"))?;
            if vouching && Stamp::of(&after) != Stamp::of(meta) {
                // changed while indexed (by someone else: the apply thread is here): the
                // hashes vouched for may be of pages it no longer has, so all are read
                (pages, n) = memo
                    .fill(file, meta.len(), None, &mut buf)
                    .map_err(io("cannot read"))?;
                after = file.metadata().map_err(io("cannot inspect"))?;
            }
            memo.learned(rel, (meta, &after), &pages, n);
            vouched += pages.len() - n;
            read += n;
            file_parts_from(rel, meta, pages, chunk, each)
        });
        memo.end_index(walked.is_ok());
        if walked.is_ok() {
            let (files, pages) = memo.size();
            tracing::info!(
                pages_read = read,
                pages_vouched = vouched,
                memo_files = files,
                memo_pages = pages,
                elapsed_ms = started.elapsed().as_millis(),
                "indexed the tree: the page memo vouched for {vouched} pages, {read} were read"
            );
        }
        walked.map(|()| read)
    }

    /// The index as a connection would get it, and how many pages it read (tests).
    #[cfg(test)]
    pub(super) fn index_for_test(&mut self) -> (crate::replicated::pages::TreeIndex, usize) {
        let mut index = crate::replicated::pages::TreeIndex::default();
        let mut open = None;
        let read = self
            .index_walk(7, &mut |part| {
                index.add_part(&mut open, part).expect("parts in order");
                Ok(())
            })
            .unwrap_or_else(|_| panic!("index of {}", self.root.display()));
        index.close_file(&mut open);
        (index, read)
    }

    /// The digest of the tree at barrier `id`, streamed to the connection as it is walked; a
    /// connection that went away gets no more.
    pub(super) fn barrier_digest(&mut self, id: u64) -> Result<(), PagesError> {
        let Some(outlet) = &self.outlet else {
            return Ok(());
        };
        let tx = &outlet.digests;
        let walked = digest_parts(
            &self.root,
            self.page_size,
            outlet.digest_chunk,
            &mut |files| {
                let part = DigestPart {
                    id,
                    root: None,
                    files,
                };
                tx.blocking_send(part).map_err(|_| Stop::Closed)
            },
        );
        match walked {
            Ok((root, files)) => {
                let last = DigestPart {
                    id,
                    root: Some(root),
                    files,
                };
                if tx.blocking_send(last).is_err() {
                    self.outlet = None;
                }
                Ok(())
            }
            Err(Stop::Closed) => {
                self.outlet = None;
                Ok(())
            }
            Err(Stop::Pages(e)) => Err(e),
        }
    }
}
