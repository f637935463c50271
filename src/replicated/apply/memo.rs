//! The page memo: the cold side's own record of its files' page hashes, so that the index a
//! new connection asks for (after a restart of either agent, or an outage) reads and hashes
//! only what the memo cannot vouch for, instead of the whole tree.
//!
//! Where the hashes come from: the index itself (a file hashed while it held still, with both
//! its times older than [`RACY_WINDOW`]), and the batches the apply thread writes: a `Write`
//! carries the verified blake3 of each page, a new file's length is zeros, and a change whose
//! result the memo cannot know (a page that is shortened, or extended past a partial last
//! page) leaves that page unknown, to be read at the next index.
//!
//! When an entry counts: its [`Stamp`] (device, inode, length, mtime, ctime, blocks) was
//! taken after the last change the apply thread made to the file and is still the file's
//! now. Any later write, truncation, chmod or rename moves its ctime, which no one can set
//! back. The applier is the only writer of the cold data directory; a write by anyone
//! else in the same clock tick as the applier's last change to that file is the one
//! change a stamp cannot see (`verify` and the hot side's deep rescan still do). A batch that
//! fails drops the entries of everything it touched; any length the stamp disagrees with
//! drops the entry; so does a batch's first change to a file whose stamp moved since (the
//! stamp the batch ends with would otherwise vouch for pages changed behind the memo).
//!
//! Across restarts: a clean stop writes the memo to `<state_file>.pages` (checksummed,
//! written aside and renamed into place), and the next start reads it and removes it before
//! applying anything, so a crash later leaves no memo (after a crash a page's data may be on
//! the disk while its file's new ctime is not, and an older stamp would match again); the
//! same stamp rule decides what of it counts, so an old or foreign file costs hashing,
//! never a wrong index.
//! Memory: 17 bytes a page, at most [`MEMO_MAX_PAGES`] pages (the rest is hashed each time),
//! for files of at least [`MEMO_MIN_PAGES`] pages: a tree of many small files costs no memory
//! per file (they are read at each index, as without a memo).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::replicated::capture::RACY_WINDOW;
use crate::replicated::pages::{
    page_digests, page_hash, read_full_at, truncated, PageHash, ReadBuf, Stamp, READ_PAGES,
};

/// Pages the memo holds at most: 17 bytes each, so about 68 MiB, a 16 GiB tree of 4 KiB
/// pages. Files beyond it are hashed in full at each index, as without a memo.
pub(crate) const MEMO_MAX_PAGES: usize = 4 << 20;

/// Files of fewer pages are not kept: reading them costs little more than the lookup, and
/// a tree of many small files would make the memo grow by an entry each.
pub(crate) const MEMO_MIN_PAGES: usize = 16;
/// The first bytes of a saved memo, and its format's version.
const MAGIC: &[u8; 8] = b"ASPMEMO1";
/// Bytes of the blake3 that ends a saved memo.
const CHECKSUM_BYTES: usize = 32;
/// The longest path a saved memo may hold (Linux's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// What the memo knows of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Memo {
    len: u64,
    /// One per page; `None` where a change left the page's contents unknown.
    pages: Vec<Option<PageHash>>,
    /// Taken after the batch that last changed the file; `None` until then.
    stamp: Option<Stamp>,
}

/// See the module doc.
#[derive(Debug)]
pub(crate) struct PageMemo {
    /// The data directory (a memo without one vouches for nothing a batch changes).
    root: PathBuf,
    page_size: usize,
    files: BTreeMap<String, Memo>,
    pages: usize,
    /// Entries the batch being applied changed: stamped again once it is durable, dropped if
    /// it fails.
    changed: BTreeSet<String>,
    zero_page: PageHash,
    /// The budget was met: said once.
    full_said: bool,
    /// During an index: the entries before it, for the files the walk has yet to meet.
    previous: BTreeMap<String, Memo>,
    /// Files of fewer pages are not kept ([`MEMO_MIN_PAGES`]; tests lower it).
    pub(crate) min_pages: usize,
}

impl PageMemo {
    pub(crate) fn new(page_size: usize) -> Self {
        PageMemo {
            root: PathBuf::new(),
            page_size,
            files: BTreeMap::new(),
            pages: 0,
            changed: BTreeSet::new(),
            zero_page: page_hash(&vec![0u8; page_size]),
            full_said: false,
            previous: BTreeMap::new(),
            min_pages: MEMO_MIN_PAGES,
        }
    }

    /// The same memo, of the data directory `root`.
    pub(crate) fn at(mut self, root: &Path) -> Self {
        root.clone_into(&mut self.root);
        self
    }

    /// The same memo keeping files of at least `n` pages.
    pub(crate) fn with_min_pages(mut self, n: usize) -> Self {
        self.min_pages = n;
        self
    }

    /// Files and pages held.
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.files.len(), self.pages)
    }

    fn ps(&self) -> u64 {
        self.page_size as u64
    }

    fn pages_of(&self, len: u64) -> usize {
        usize::try_from(len.div_ceil(self.ps())).unwrap_or(usize::MAX)
    }

    /// The number of the page holding byte `off`.
    fn page_at(&self, off: u64) -> usize {
        usize::try_from(off / self.ps()).unwrap_or(usize::MAX)
    }

    /// The hash of a page of `len` zeros (at most a page: the last page of a file).
    fn zeros(&self, len: u64) -> PageHash {
        if len == self.ps() {
            return self.zero_page;
        }
        page_hash(&vec![0u8; usize::try_from(len).unwrap_or(self.page_size)])
    }

    /// Whether a file of `len` bytes fits in what is left of the budget (else the index
    /// streams it, as without a memo).
    pub(crate) fn has_room(&self, len: u64) -> bool {
        self.pages.saturating_add(self.pages_of(len)) <= MEMO_MAX_PAGES
    }

    fn insert(&mut self, rel: String, m: Memo) -> bool {
        let n = m.pages.len();
        if n < self.min_pages {
            self.remove_one(&rel);
            return false;
        }
        if !self.room_for(&rel, n) {
            return false;
        }
        let old = self.files.get(&rel).map_or(0, |o| o.pages.len());
        self.pages = self.pages - old + n;
        self.files.insert(rel, m);
        true
    }

    /// Whether `rel` may have `n` pages within [`MEMO_MAX_PAGES`] (its own pages counted as
    /// freed); if not, its entry is dropped (it is hashed in full at each index). Asked before
    /// a file's pages are made, never after: a length is the peer's word, and a sparse file
    /// of terabytes is a valid one whose slots would not fit in memory.
    fn room_for(&mut self, rel: &str, n: usize) -> bool {
        let old = self.files.get(rel).map_or(0, |o| o.pages.len());
        if (self.pages - old).saturating_add(n) <= MEMO_MAX_PAGES {
            return true;
        }
        if !self.full_said {
            self.full_said = true;
            tracing::info!(
                pages = MEMO_MAX_PAGES,
                "the page memo is full: the files beyond it are hashed in full at each index"
            );
        }
        self.remove_one(rel);
        false
    }

    fn remove_one(&mut self, rel: &str) -> Option<Memo> {
        let m = self.files.remove(rel)?;
        self.pages -= m.pages.len();
        Some(m)
    }

    /// Drops `rel` and everything below it.
    pub(crate) fn remove(&mut self, rel: &str) {
        self.remove_one(rel);
        for k in self.below(rel) {
            self.remove_one(&k);
        }
    }

    fn below(&self, rel: &str) -> Vec<String> {
        let prefix = format!("{rel}/");
        self.files
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    // ---- the index ----

    /// Starts an index: the entries move aside, and each file the walk meets takes its own
    /// back ([`Self::known`], [`Self::learned`]); those of files it does not meet are gone.
    pub(crate) fn begin_index(&mut self) {
        self.pages = 0;
        self.changed.clear();
        self.previous = std::mem::take(&mut self.files);
    }

    /// Ends an index: what a complete walk did not meet is gone from the disk and forgotten;
    /// after a walk cut short (the connection went) the entries it did not reach are kept
    /// (their stamps still decide).
    pub(crate) fn end_index(&mut self, complete: bool) {
        for (rel, m) in std::mem::take(&mut self.previous) {
            if !complete && !self.files.contains_key(&rel) {
                self.insert(rel, m);
            }
        }
    }

    /// The pages of `rel` the memo vouches for, if its entry's stamp is the file's now
    /// (`meta`, from the open file); `None` where a page must be read. `None` for the
    /// whole file when nothing is vouched for.
    pub(crate) fn known(&self, rel: &str, meta: &fs::Metadata) -> Option<Vec<Option<PageHash>>> {
        let m = self.previous.get(rel)?;
        let fits = m.stamp == Some(Stamp::of(meta))
            && m.len == meta.len()
            && m.pages.len() == self.pages_of(m.len);
        fits.then(|| m.pages.clone())
    }

    /// The index has every page of `rel`, `read` of them read now, the rest vouched for.
    /// Kept if nothing was read (the stamp still holds), or if the file held still while read
    /// (`before` when opened, `after` once read) and both its times were settled: then the
    /// stamp proves every later change.
    pub(crate) fn learned(
        &mut self,
        rel: &str,
        (before, after): (&fs::Metadata, &fs::Metadata),
        pages: &[PageHash],
        read: usize,
    ) {
        let stamp = Stamp::of(before);
        let still = stamp == Stamp::of(after);
        if !still
            || (read > 0 && !stamp.settled(RACY_WINDOW))
            || pages.len() != self.pages_of(stamp.len)
        {
            return;
        }
        self.insert(
            rel.to_owned(),
            Memo {
                len: stamp.len,
                pages: pages.iter().copied().map(Some).collect(),
                stamp: Some(stamp),
            },
        );
    }

    /// Every page's hash of `file` (`len` bytes), reading only the pages `known` lacks.
    pub(crate) fn fill(
        &self,
        file: &File,
        len: u64,
        known: Option<Vec<Option<PageHash>>>,
        buf: &mut ReadBuf,
    ) -> io::Result<(Vec<PageHash>, usize)> {
        let total = self.pages_of(len);
        let known = known
            .filter(|k| k.len() == total)
            .unwrap_or_else(|| vec![None; total]);
        let ps = self.page_size;
        buf.set_len(ps * READ_PAGES);
        let mut out = Vec::with_capacity(total);
        let mut digests = Vec::with_capacity(READ_PAGES);
        let mut read = 0;
        let mut p = 0;
        while p < total {
            if let Some(h) = known[p] {
                out.push(h);
                p += 1;
                continue;
            }
            // a run of unknown pages, read at once
            let run = known[p..]
                .iter()
                .take(READ_PAGES)
                .take_while(|k| k.is_none())
                .count();
            let off = p as u64 * self.ps();
            let want = usize::try_from((len - off).min((run * ps) as u64)).unwrap_or(run * ps);
            let n = read_full_at(file, &mut buf[..want], off)?;
            digests.clear();
            page_digests(&buf[..n], ps, &mut digests);
            read += digests.len();
            out.extend(digests.iter().map(truncated));
            if n < want {
                // the file shrank meanwhile (its stamp moved: not learned): the pages it no
                // longer has match nothing, vouched for or not
                let missing = total - out.len();
                out.extend(std::iter::repeat_n(
                    crate::replicated::pages::UNREAD_PAGE,
                    missing,
                ));
                break;
            }
            p += run;
        }
        Ok((out, read))
    }

    // ---- the apply thread's changes ----

    /// The batch is about to change `rel` (its entry is dropped if the batch fails). The first
    /// time in a batch, an entry whose stamp is no longer the file's goes: the file changed
    /// behind the memo, and the stamp this batch ends with would vouch for the pages it keeps.
    pub(crate) fn changing(&mut self, rel: &str) {
        if self.changed.insert(rel.to_owned()) {
            self.drop_if_stale(rel, rel);
        }
    }

    /// Drops the entry at `rel` unless its stamp is that of the file at `path` now.
    fn drop_if_stale(&mut self, rel: &str, path: &str) {
        let Some(stamp) = self.files.get(rel).and_then(|m| m.stamp) else {
            return;
        };
        let now = fs::symlink_metadata(self.root.join(path))
            .ok()
            .map(|m| Stamp::of(&m));
        if now != Some(stamp) {
            self.remove_one(rel);
        }
    }

    /// `rel` was made a regular file of `len` bytes (`created`: a new one, so all zeros).
    pub(crate) fn set_file(&mut self, rel: &str, len: u64, created: bool) {
        self.changing(rel);
        if created {
            let n = self.pages_of(len);
            if !self.room_for(rel, n) {
                return;
            }
            let mut pages = vec![Some(self.zero_page); n];
            self.zero_tail(&mut pages, len);
            self.insert(
                rel.to_owned(),
                Memo {
                    len,
                    pages,
                    stamp: None,
                },
            );
        } else {
            self.resize(rel, len);
        }
    }

    /// The last page of a `len`-byte file of zeros is as long as what is left of it.
    fn zero_tail(&self, pages: &mut [Option<PageHash>], len: u64) {
        let tail = len % self.ps();
        if let (Some(last), true) = (pages.last_mut(), tail != 0) {
            *last = Some(self.zeros(tail));
        }
    }

    /// The file's length became `new` (a truncation, or zeros appended).
    fn resize(&mut self, rel: &str, new: u64) {
        let ps = self.ps();
        let n = self.pages_of(new);
        let zero = self.zero_page;
        let tail_zero = (!new.is_multiple_of(ps)).then(|| self.zeros(new % ps));
        let old_last = self.files.get(rel).map(|m| self.page_at(m.len));
        if !self.files.contains_key(rel) || !self.room_for(rel, n) {
            return;
        }
        let Some(m) = self.files.get_mut(rel) else {
            return;
        };
        let old = m.len;
        if new == old {
            return;
        }
        let old_n = m.pages.len();
        if !old.is_multiple_of(ps) {
            // the old last page, partial, loses bytes or gains zeros
            if let Some(p) = old_last.and_then(|i| m.pages.get_mut(i)) {
                *p = None;
            }
        }
        if new < old {
            m.pages.truncate(n);
            if let (Some(last), true) = (m.pages.last_mut(), !new.is_multiple_of(ps)) {
                *last = None;
            }
        } else {
            m.pages.resize(n, Some(zero));
            if let (Some(t), true) = (tail_zero, n > old_n) {
                m.pages[n - 1] = Some(t);
            }
        }
        m.len = new;
        self.pages = self.pages - old_n + n;
    }

    /// `data_len` bytes of verified pages (`hashes`, full blake3) were written at `offset`.
    pub(crate) fn write(&mut self, rel: &str, offset: u64, data_len: usize, hashes: &[[u8; 32]]) {
        self.changing(rel);
        let ps = self.ps();
        let end = offset + data_len as u64;
        let Some(len) = self.files.get(rel).map(|m| m.len) else {
            return;
        };
        if end > len {
            // the bytes between the old end and `offset` read as zeros
            self.resize(rel, end);
        }
        let first = self.page_at(offset);
        let Some(m) = self.files.get_mut(rel) else {
            return;
        };
        for (i, h) in hashes.iter().enumerate() {
            let Some(slot) = m.pages.get_mut(first + i) else {
                break;
            };
            let start = i as u64 * ps;
            let whole = start + ps <= data_len as u64;
            // a short last page is the page only where it ends the file
            let mut short = [0u8; 16];
            short.copy_from_slice(&h[..16]);
            *slot = (whole || end == m.len).then_some(short);
        }
    }

    /// `fallocate` of `offset..offset+len` (mode 0: the length grows if the range passes it,
    /// with zeros; what is there stays).
    pub(crate) fn allocate(&mut self, rel: &str, offset: u64, len: u64) {
        self.changing(rel);
        if let Some(old) = self.files.get(rel).map(|m| m.len) {
            if offset + len > old {
                self.resize(rel, offset + len);
            }
        }
    }

    /// `from` (and what is below it) is now `to`; whatever was at `to` is gone.
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        self.remove(to);
        // (an entry below `from` this batch has not touched is checked under its new name:
        // the same file, and a rename of a directory above it moves none of its times)
        for k in self.below(from) {
            if !self.changed.contains(&k) {
                self.drop_if_stale(&k, &format!("{to}{}", &k[from.len()..]));
            }
        }
        let mut moved: Vec<(String, Memo)> = Vec::new();
        if let Some(m) = self.remove_one(from) {
            moved.push((to.to_owned(), m));
        }
        for k in self.below(from) {
            if let Some(m) = self.remove_one(&k) {
                moved.push((format!("{to}{}", &k[from.len()..]), m));
            }
        }
        for (k, m) in moved {
            self.changed.insert(k.clone());
            self.insert(k, m);
        }
    }

    /// The batch is durable: each entry it changed is stamped as the file is now (dropped if
    /// it is no longer a file of the length the memo has).
    pub(crate) fn batch_done(&mut self, root: &Path) {
        for rel in std::mem::take(&mut self.changed) {
            let Some(m) = self.files.get_mut(&rel) else {
                continue;
            };
            match fs::symlink_metadata(root.join(&rel)) {
                Ok(meta)
                    if meta.is_file() && meta.len() == m.len && m.pages.len() >= self.min_pages =>
                {
                    m.stamp = Some(Stamp::of(&meta));
                }
                _ => {
                    self.remove_one(&rel);
                }
            }
        }
    }

    /// The batch failed part way: what it touched is unknown.
    pub(crate) fn batch_failed(&mut self) {
        for rel in std::mem::take(&mut self.changed) {
            self.remove_one(&rel);
        }
    }

    // ---- across restarts ----

    /// Writes every entry that is complete and still matches its file to `path` (aside, then
    /// renamed over it): entries (`files`, `pages`) written.
    pub(crate) fn save(&self, root: &Path, path: &Path) -> io::Result<(usize, usize)> {
        let mut out = Vec::with_capacity(64 + self.pages * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.page_size as u64).to_le_bytes());
        let mut body = Vec::new();
        let (mut files, mut pages) = (0usize, 0usize);
        for (rel, m) in &self.files {
            let Some(stamp) = m.stamp else { continue };
            let now = fs::symlink_metadata(root.join(rel))
                .ok()
                .map(|m| Stamp::of(&m));
            if now != Some(stamp) || m.pages.iter().any(Option::is_none) {
                continue;
            }
            let Ok(n) = u32::try_from(rel.len()) else {
                continue;
            };
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(rel.as_bytes());
            for v in [stamp.dev, stamp.ino, stamp.len, stamp.blocks] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            for v in [stamp.mtime.0, stamp.mtime.1, stamp.ctime.0, stamp.ctime.1] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            for p in m.pages.iter().flatten() {
                body.extend_from_slice(p);
            }
            files += 1;
            pages += m.pages.len();
        }
        out.extend_from_slice(&(files as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        let aside = aside_of(path);
        let mut f = File::create(&aside)?;
        f.write_all(&out)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&aside, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok((files, pages))
    }

    /// Reads a memo [`Self::save`] wrote; `Err` names what is wrong with it.
    pub(crate) fn load(&mut self, path: &Path) -> Result<(), String> {
        let raw = fs::read(path).map_err(|e| e.to_string())?;
        let Some((content, sum)) = raw.split_last_chunk::<CHECKSUM_BYTES>() else {
            return Err("too short".into());
        };
        if blake3::hash(content).as_bytes() != sum {
            return Err("its checksum does not match (cut short or damaged)".into());
        }
        let mut r = Reader(content);
        if r.take(MAGIC.len())? != MAGIC {
            return Err("not a page memo of this version".into());
        }
        let ps = r.u64()?;
        if ps != self.ps() {
            return Err(format!(
                "written for pages of {ps} bytes, not {}",
                self.page_size
            ));
        }
        let count = r.u64()?;
        let mut files = BTreeMap::new();
        let mut total = 0usize;
        for _ in 0..count {
            let n = usize::try_from(r.u32()?).map_err(|e| e.to_string())?;
            if n == 0 || n > MAX_PATH_BYTES {
                return Err(format!("a path of {n} bytes"));
            }
            let rel = std::str::from_utf8(r.take(n)?)
                .map_err(|_| "a path that is not UTF-8".to_string())?
                .to_owned();
            let (dev, ino, len, blocks) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let (ms, mn, cs, cn) = (r.i64()?, r.i64()?, r.i64()?, r.i64()?);
            let pages = self.pages_of(len);
            total = total.saturating_add(pages);
            if total > MEMO_MAX_PAGES || pages.saturating_mul(16) > r.0.len() {
                return Err(format!("{rel:?}: more pages than the file holds"));
            }
            let hashes = (0..pages)
                .map(|_| r.take(16).map(|b| Some(b.try_into().expect("16 bytes"))))
                .collect::<Result<Vec<_>, _>>()?;
            let stamp = Stamp {
                dev,
                ino,
                len,
                mtime: (ms, mn),
                ctime: (cs, cn),
                blocks,
            };
            files.insert(
                rel,
                Memo {
                    len,
                    pages: hashes,
                    stamp: Some(stamp),
                },
            );
        }
        if !r.0.is_empty() {
            return Err("bytes after its last entry".into());
        }
        self.files = files;
        self.pages = total;
        Ok(())
    }

    /// Whether every page the memo vouches for (an entry stamped as its file is now) is the
    /// file's (tests).
    #[cfg(test)]
    pub(crate) fn check(&self, root: &Path) -> Result<usize, String> {
        let mut checked = 0;
        for (rel, m) in &self.files {
            let path = root.join(rel);
            let meta = fs::symlink_metadata(&path).map_err(|e| format!("{rel}: {e}"))?;
            if m.stamp != Some(Stamp::of(&meta)) {
                continue;
            }
            let real = crate::replicated::pages::hash_pages(&path, self.page_size)
                .map_err(|e| e.to_string())?;
            if real.len != m.len || real.pages.len() != m.pages.len() {
                return Err(format!(
                    "{rel}: {} bytes, the memo says {}",
                    real.len, m.len
                ));
            }
            for (i, (r, k)) in real.pages.iter().zip(&m.pages).enumerate() {
                if k.is_some_and(|k| k != *r) {
                    return Err(format!("{rel}: page {i} differs from the memo"));
                }
                checked += usize::from(k.is_some());
            }
        }
        Ok(checked)
    }
}

/// Where a memo is written before it is renamed over `path`.
fn aside_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The memo's place beside the state file: `<state_file>.pages`.
pub fn memo_path(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().unwrap_or_default().to_owned();
    name.push(".pages");
    state_file.with_file_name(name)
}

/// Reads a saved memo front to back; each read checks what is left first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("cut short inside an entry".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}
