//! Walking a tree in path order, streamed: every directory, file and symlink below a root is
//! visited in the byte order of its relative path (the order of [`TreeIndex`]'s maps and of the
//! root digest `verify` compares), holding one sorted listing per directory level and a file's
//! page hashes a chunk at a time. The cold side's index ([`index_parts`]) and its digest at a
//! barrier ([`digest_parts`]) are sent as they are read, so what either costs in memory is a
//! directory listing and a chunk, not the tree.
//!
//! Byte order of whole paths is not "each directory's names sorted, depth first": `a-c` sorts
//! between `a` and `a/b` (`-` is below `/`). So a directory `a` is listed twice in its
//! parent's sorted keys: as `a` (the entry itself) and as `a/` (where its contents go).

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use crate::replicated::pages::entry::Entry;
use crate::replicated::pages::{
    io_err, link_target, open_nofollow, read_full_at, Attrs, FileState, LinkState, PageHash,
    PagesError, ReadBuf, TreeIndex, READ_PAGES,
};

/// The hash the index gives a page it could not read (a file that shrank while it was read):
/// it matches no page, so the hot side sends that page.
pub const UNREAD_PAGE: PageHash = [0xff; 16];

/// One entry met by [`walk_sorted`].
#[derive(Debug)]
pub enum Node<'a> {
    /// A directory and its attributes.
    Dir(Attrs),
    /// A regular file, open (never through a symlink), and its metadata.
    File(&'a File, &'a fs::Metadata),
    /// A symlink (its target as text, never followed).
    Link(LinkState),
}

/// One directory's children, sorted by their key in whole-path byte order.
struct Level {
    /// The directory, relative (empty for the root).
    dir: String,
    /// Every child's name, one after another.
    names: String,
    /// Each key: where its name is in `names`, and whether it stands for the directory's
    /// contents (`name/`) rather than the entry.
    keys: Vec<(u32, u32, bool)>,
    next: usize,
}

impl Level {
    /// Lists `dir` (relative to `root`); `None` if it is gone or no longer a directory.
    fn list(root: &Path, dir: String) -> Result<Option<Level>, PagesError> {
        let full = if dir.is_empty() {
            root.to_owned()
        } else {
            root.join(&dir)
        };
        let entries = match fs::read_dir(&full) {
            Ok(e) => e,
            Err(e) if !dir.is_empty() && gone(&e) => return Ok(None),
            Err(e) => return Err(io_err("cannot list", &full)(e)),
        };
        let mut level = Level {
            dir,
            names: String::new(),
            keys: Vec::new(),
            next: 0,
        };
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", &full))?;
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(dir = %full.display(), "skipping a file name that is not UTF-8");
                continue;
            };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let start = offset(level.names.len());
            level.names.push_str(&name);
            let end = offset(level.names.len());
            level.keys.push((start, end, false));
            if is_dir {
                level.keys.push((start, end, true));
            }
        }
        let names = &level.names;
        level.keys.sort_unstable_by(|a, b| key_cmp(names, *a, *b));
        Ok(Some(level))
    }

    /// The next key: the child's path, and whether it stands for the directory's contents.
    fn next_key(&mut self) -> Option<(String, bool)> {
        let (start, end, contents) = *self.keys.get(self.next)?;
        self.next += 1;
        let name = &self.names[start as usize..end as usize];
        let path = if self.dir.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.dir)
        };
        Some((path, contents))
    }
}

/// A name's offset in a listing; a listing beyond 4 GiB of names is beyond any directory.
fn offset(n: usize) -> u32 {
    u32::try_from(n).expect("a directory's names fit in 4 GiB")
}

/// Compares two keys: a name, followed by `/` when it stands for a directory's contents.
fn key_cmp(names: &str, a: (u32, u32, bool), b: (u32, u32, bool)) -> Ordering {
    let bytes = |(s, e, contents): (u32, u32, bool)| {
        names.as_bytes()[s as usize..e as usize]
            .iter()
            .copied()
            .chain(contents.then_some(b'/'))
    };
    bytes(a).cmp(bytes(b))
}

/// Whether a listing or opening failed because the entry went away (or changed type) meanwhile.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) || e.raw_os_error() == Some(libc::ELOOP)
}

/// Calls `visit` for every directory, file and symlink below `root`, in the byte order of
/// their relative paths. Special files are skipped (the journal holds none, and a replica
/// must never create them); entries that vanish while being walked are left out (the next
/// event or rescan accounts for them). Stops at the first error `visit` returns.
pub fn walk_sorted<E: From<PagesError>>(
    root: &Path,
    visit: &mut dyn FnMut(&str, Node<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut stack: Vec<Level> = Level::list(root, String::new())?.into_iter().collect();
    while let Some(level) = stack.last_mut() {
        let Some((rel, contents)) = level.next_key() else {
            stack.pop();
            continue;
        };
        if contents {
            if let Some(below) = Level::list(root, rel)? {
                stack.push(below);
            }
            continue;
        }
        let path = root.join(&rel);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            visit(&rel, Node::Dir(Attrs::of(&meta)))?;
        } else if meta.file_type().is_symlink() {
            if let Ok(Some(target)) = link_target(&path) {
                let attrs = Attrs::of(&meta);
                visit(&rel, Node::Link(LinkState { target, attrs }))?;
            }
        } else if meta.is_file() {
            let file = match open_nofollow(&path) {
                Ok(f) => f,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(io_err("cannot open", &path)(e).into()),
            };
            let meta = file.metadata().map_err(io_err("cannot inspect", &path))?;
            if meta.is_file() {
                visit(&rel, Node::File(&file, &meta))?;
            }
        }
    }
    Ok(())
}

/// Hashes the pages of `file`, `len` bytes long, and hands them to `each` in chunks of at
/// most `chunk` hashes with the number of the chunk's first page: exactly
/// `len.div_ceil(page_size)` pages, whatever the file does meanwhile (pages past its end, if
/// it shrank, are [`UNREAD_PAGE`]; bytes past `len`, if it grew, are not read). `buf` is the
/// read buffer, reused across files.
pub fn hash_pages_chunked<E: From<PagesError>>(
    (file, path): (&File, &Path),
    len: u64,
    page_size: usize,
    (chunk, buf): (usize, &mut ReadBuf),
    each: &mut dyn FnMut(u64, Vec<PageHash>) -> Result<(), E>,
) -> Result<(), E> {
    buf.set_len(page_size * READ_PAGES);
    let total = len.div_ceil(page_size as u64);
    let chunk = chunk.max(1);
    let mut hashes = Vec::with_capacity(usize::try_from(total).unwrap_or(chunk).min(chunk));
    let (mut first, mut page, mut off) = (0u64, 0u64, 0u64);
    let mut push = |h: PageHash, page: &mut u64| -> Result<(), E> {
        hashes.push(h);
        *page += 1;
        if hashes.len() == chunk {
            each(first, std::mem::take(&mut hashes))?;
            first = *page;
        }
        Ok(())
    };
    let mut digests = Vec::with_capacity(READ_PAGES);
    while page < total {
        let want = usize::try_from(len - off).map_or(buf.len(), |left| left.min(buf.len()));
        let n = read_full_at(file, &mut buf[..want], off).map_err(io_err("cannot read", path))?;
        if n == 0 {
            // it shrank: the rest is unread
            while page < total {
                push(UNREAD_PAGE, &mut page)?;
            }
            break;
        }
        digests.clear();
        super::page_digests(&buf[..n], page_size, &mut digests);
        for d in &digests {
            push(super::truncated(d), &mut page)?;
        }
        off += n as u64;
    }
    if !hashes.is_empty() {
        each(first, hashes)?;
    }
    Ok(())
}

/// One part of the cold side's index, as [`index_parts`] streams it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexPart {
    /// A directory.
    Dir { path: String, attrs: Attrs },
    /// A file with its first chunk of page hashes.
    File {
        path: String,
        len: u64,
        attrs: Attrs,
        allocated: bool,
        pages: Vec<PageHash>,
    },
    /// More page hashes of the file the last `File` named, from page `first_page` on.
    Pages {
        path: String,
        first_page: u64,
        pages: Vec<PageHash>,
    },
    /// A symlink.
    Link {
        path: String,
        target: String,
        attrs: Attrs,
    },
}

/// Streams the index of the tree under `root` to `each` as it is walked: a file's page hashes
/// in chunks of at most `chunk_pages` (the first with its `File`, the rest in `Pages` parts
/// right after it).
pub fn index_parts<E: From<PagesError>>(
    root: &Path,
    page_size: usize,
    chunk_pages: usize,
    each: &mut dyn FnMut(IndexPart) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf = ReadBuf::default();
    walk_sorted(root, &mut |rel, node| match node {
        Node::File(file, meta) => {
            let opened = (file, meta, root.join(rel));
            file_index_parts(rel, opened, page_size, (chunk_pages, &mut buf), each)
        }
        other => other_index_part(rel, other).map_or(Ok(()), &mut *each),
    })
}

/// The index part of a directory or symlink (`None` for a file: see [`file_index_parts`]).
pub fn other_index_part(rel: &str, node: Node<'_>) -> Option<IndexPart> {
    match node {
        Node::Dir(attrs) => Some(IndexPart::Dir {
            path: rel.to_owned(),
            attrs,
        }),
        Node::Link(LinkState { target, attrs }) => Some(IndexPart::Link {
            path: rel.to_owned(),
            target,
            attrs,
        }),
        Node::File(..) => None,
    }
}

/// The head of a file's index parts: its `File` part, without pages yet.
fn file_head(rel: &str, meta: &fs::Metadata) -> IndexPart {
    IndexPart::File {
        path: rel.to_owned(),
        len: meta.len(),
        attrs: Attrs::of(meta),
        allocated: super::fully_allocated(meta),
        pages: Vec::new(),
    }
}

/// Hands `each` the parts of one file's index as its pages are read and hashed: its `File`
/// part with the first chunk, then `Pages` parts.
pub fn file_index_parts<E: From<PagesError>>(
    rel: &str,
    (file, meta, path): (&File, &fs::Metadata, std::path::PathBuf),
    page_size: usize,
    (chunk_pages, buf): (usize, &mut ReadBuf),
    each: &mut dyn FnMut(IndexPart) -> Result<(), E>,
) -> Result<(), E> {
    let mut head = Some(file_head(rel, meta));
    hash_pages_chunked(
        (file, &path),
        meta.len(),
        page_size,
        (chunk_pages.max(1), buf),
        &mut |first, pages| chunk_part(rel, &mut head, first, pages, each),
    )?;
    // an empty file has no chunk: its part goes alone
    match head {
        Some(part) => each(part),
        None => Ok(()),
    }
}

/// Hands `each` the parts of one file's index from its page hashes, all known already.
pub fn file_parts_from<E>(
    rel: &str,
    meta: &fs::Metadata,
    pages: Vec<PageHash>,
    chunk_pages: usize,
    each: &mut dyn FnMut(IndexPart) -> Result<(), E>,
) -> Result<(), E> {
    let mut head = Some(file_head(rel, meta));
    for (i, chunk) in pages.chunks(chunk_pages.max(1)).enumerate() {
        let first = (i * chunk_pages.max(1)) as u64;
        chunk_part(rel, &mut head, first, chunk.to_vec(), each)?;
    }
    match head {
        Some(part) => each(part),
        None => Ok(()),
    }
}

/// One chunk of a file's page hashes as a part: with the `File` head if it is still
/// `head`, else as `Pages`.
fn chunk_part<E>(
    rel: &str,
    head: &mut Option<IndexPart>,
    first: u64,
    pages: Vec<PageHash>,
    each: &mut dyn FnMut(IndexPart) -> Result<(), E>,
) -> Result<(), E> {
    match head.take() {
        Some(IndexPart::File {
            path,
            len,
            attrs,
            allocated,
            ..
        }) => each(IndexPart::File {
            path,
            len,
            attrs,
            allocated,
            pages,
        }),
        _ => each(IndexPart::Pages {
            path: rel.to_owned(),
            first_page: first,
            pages,
        }),
    }
}

impl TreeIndex {
    /// Adds one part of a streamed index; `Err` (naming it) for pages that do not continue
    /// the file before them.
    pub fn add_part(
        &mut self,
        open: &mut Option<(String, FileState)>,
        part: IndexPart,
    ) -> Result<(), String> {
        if let IndexPart::Pages {
            path,
            first_page,
            pages,
        } = part
        {
            return match open {
                Some((p, f)) if *p == path && u64::try_from(f.pages.len()) == Ok(first_page) => {
                    f.pages.extend_from_slice(&pages);
                    Ok(())
                }
                _ => Err(format!("pages from {first_page} of {path:?} out of order")),
            };
        }
        self.close_file(open);
        match part {
            IndexPart::Dir { path, attrs } => {
                self.dirs.insert(path, attrs);
            }
            IndexPart::File {
                path,
                len,
                attrs,
                allocated,
                pages,
            } => {
                let state = FileState {
                    len,
                    attrs,
                    allocated,
                    pages,
                };
                *open = Some((path, state));
            }
            IndexPart::Link {
                path,
                target,
                attrs,
            } => {
                self.links.insert(path, LinkState { target, attrs });
            }
            IndexPart::Pages { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Files the file whose pages may still continue.
    pub fn close_file(&mut self, open: &mut Option<(String, FileState)>) {
        if let Some((path, f)) = open.take() {
            self.files.insert(path, f);
        }
    }
}

/// The whole tree under `root`, indexed (tests and small trees: the cold side streams it with
/// [`index_parts`] instead).
pub fn index_tree(root: &Path, page_size: usize) -> Result<TreeIndex, PagesError> {
    let mut index = TreeIndex::default();
    let mut open = None;
    index_parts::<PagesError>(root, page_size, usize::MAX, &mut |part| {
        index
            .add_part(&mut open, part)
            .expect("index_parts streams a file's pages right after it");
        Ok(())
    })?;
    index.close_file(&mut open);
    Ok(index)
}

/// The root digest of a tree, and the last part of its entries.
pub type RootAndLast = ([u8; 32], Vec<(String, Entry)>);

/// Streams the digest of the tree under `root` as `verify` compares it: each entry in path
/// order, in chunks whose [`Entry`] sizes (by `size_of`) stay within `chunk_bytes`, handed to
/// `each`; returns the root digest and the last chunk (possibly empty).
pub fn digest_parts<E: From<PagesError>>(
    root: &Path,
    page_size: usize,
    (chunk_bytes, size_of): (usize, fn(&str, &Entry) -> usize),
    each: &mut dyn FnMut(Vec<(String, Entry)>) -> Result<(), E>,
) -> Result<RootAndLast, E> {
    let mut hasher = blake3::Hasher::new();
    let mut chunk: Vec<(String, Entry)> = Vec::new();
    let mut bytes = 0;
    let mut buf = ReadBuf::default();
    walk_sorted::<E>(root, &mut |rel, node| {
        let entry = match node {
            Node::Dir(attrs) => Entry::dir(attrs),
            Node::Link(link) => Entry::link(link),
            Node::File(file, meta) => {
                let mut content = FileState::content_hasher(meta.len());
                let path = root.join(rel);
                let chunks = (READ_PAGES, &mut buf);
                hash_pages_chunked::<PagesError>(
                    (file, &path),
                    meta.len(),
                    page_size,
                    chunks,
                    &mut |_, pages| {
                        pages.iter().for_each(|p| {
                            content.update(p);
                        });
                        Ok(())
                    },
                )?;
                Entry::file(meta, *content.finalize().as_bytes())
            }
        };
        entry.hash_into(rel, &mut hasher);
        let size = size_of(rel, &entry);
        if bytes + size > chunk_bytes && !chunk.is_empty() {
            each(std::mem::take(&mut chunk))?;
            bytes = 0;
        }
        bytes += size;
        chunk.push((rel.to_owned(), entry));
        Ok::<(), E>(())
    })?;
    Ok((*hasher.finalize().as_bytes(), chunk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Paths walked, in order.
    fn walked(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        walk_sorted::<PagesError>(root, &mut |rel, _| {
            out.push(rel.to_owned());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn the_walk_is_in_whole_path_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a", "a/b", "a.x", "a-c", "b/c/d"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["a/b/f", "a/0", "a-c/z", "a0", "b/c/d/e", "b/c.d"] {
            fs::write(root.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink("a", root.join("a+")).unwrap();
        let paths = walked(root);
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert_eq!(paths.len(), 14);
    }

    #[test]
    fn chunked_hashes_are_the_whole_file_s_and_a_shrunk_file_gets_unread_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut got = Vec::new();
        let mut buf = ReadBuf::default();
        hash_pages_chunked::<PagesError>(
            (&file, &path),
            10_000,
            512,
            (3, &mut buf),
            &mut |first, p| {
                assert_eq!(usize::try_from(first).unwrap(), got.len());
                assert!(p.len() <= 3);
                got.extend(p);
                Ok(())
            },
        )
        .unwrap();
        let want: Vec<PageHash> = data.chunks(512).map(super::super::page_hash).collect();
        assert_eq!(got, want);
        // declared longer than it is: the missing pages are unread, the count is the length's
        got.clear();
        hash_pages_chunked::<PagesError>(
            (&file, &path),
            12_000,
            512,
            (5, &mut buf),
            &mut |_, p| {
                got.extend(p);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got.len(), 24);
        assert_eq!(got[..20], want[..]);
        assert!(got[20..].iter().all(|p| *p == UNREAD_PAGE));
    }

    proptest! {
        /// Streamed in small chunks, the index and the digest are the tree's, whatever the
        /// names (siblings whose names sort around `/`).
        #[test]
        fn streamed_index_and_digest_equal_the_whole_tree_s(
            names in proptest::collection::vec(("[a./-]{1,3}", 0usize..3, 0usize..2000), 1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for (name, depth, len) in &names {
                if name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                    continue;
                }
                let nested = (0..*depth).fold(String::new(), |p, i| format!("{p}d{i}/"));
                let path = root.join(format!("{nested}{name}"));
                if fs::create_dir_all(path.parent().unwrap()).is_err() || path.exists() {
                    continue;
                }
                let _ = fs::write(&path, vec![7u8; *len]);
            }
            let whole = index_tree(root, 512).unwrap();
            let mut streamed = TreeIndex::default();
            let mut open = None;
            index_parts::<PagesError>(root, 512, 1, &mut |part| {
                streamed.add_part(&mut open, part).unwrap();
                Ok(())
            }).unwrap();
            streamed.close_file(&mut open);
            prop_assert_eq!(&streamed, &whole);
            let (root_digest, entries) = whole.digest();
            let mut chunks = Vec::new();
            let (streamed_root, last) = digest_parts::<PagesError>(root, 512, (100, |p, _| p.len() + 60), &mut |c| {
                chunks.extend(c);
                Ok(())
            }).unwrap();
            chunks.extend(last);
            prop_assert_eq!(streamed_root, root_digest);
            prop_assert_eq!(chunks, entries.into_iter().collect::<Vec<_>>());
        }
    }
}
