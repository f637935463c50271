//! What the apply thread streams to the connection, as it walks the tree rather than after:
//! the index on a new connection (its parts in path order, a big file's page hashes in
//! chunks), and the digest at each barrier (entries in path order, in chunks, the root last).
//! Each goes through a bounded channel the connection drains onto the wire, so the apply
//! thread holds a directory listing and a chunk, not the tree; a connection that went away
//! ends the walk.

use tokio::sync::{mpsc, oneshot};

use crate::replicated::apply::Applier;
use crate::replicated::ops::DigestPart;
use crate::replicated::pages::{digest_parts, index_parts, Entry, IndexPart, PagesError};

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
        if let Err(e) = self.sync_unsynced() {
            let _ = done.send(Err(e));
            return;
        }
        let chunk = outlet.index_chunk_pages;
        self.outlet = Some(outlet);
        let walked = index_parts(&self.root, self.page_size, chunk, &mut |part| {
            parts.blocking_send(part).map_err(|_| Stop::Closed)
        });
        match walked {
            Ok(()) => {
                let _ = done.send(Ok(()));
            }
            Err(Stop::Pages(e)) => {
                let _ = done.send(Err(e));
            }
            Err(Stop::Closed) => tracing::debug!("the connection went away during the index"),
        }
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
