//! `${BASE_DIR}/artemis` as a symlink to the share: created atomically (a new link under a
//! temporary name, renamed into place), never replacing data. A real `artemis/` directory with
//! files is refused, or with `--migrate` copied into the share, every file verified by blake3,
//! and only then moved aside to `artemis.pre-artemis-sync.<timestamp>`. Nothing is deleted, and
//! an interrupted migration completes when run again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The read and write unit when copying and hashing files.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;
/// The suffix that marks a migrated file still being written.
pub const MIGRATE_TMP_SUFFIX: &str = ".artemis-sync-tmp";
/// Where the old directory goes: `artemis` + this + a UTC timestamp.
pub const ASIDE_INFIX: &str = ".pre-artemis-sync.";

/// Errors creating the link or migrating into the share. Each names the path involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LinkError {
    /// base directory {0:?} does not exist: check `[node] base_dir`
    BaseDirMissing(PathBuf),
    /// the share {0:?} is not a directory that exists: mount it first (`artemis-sync mount`)
    TargetMissing(PathBuf),
    /// {path:?} is a real directory holding {entries} entries; refusing to replace it with a link. Run `artemis-sync link --migrate` to move its files into the share (verified, old directory kept aside)
    NotEmpty { path: PathBuf, entries: usize },
    /// {path:?} is a link to {current:?}, not to the share {wanted:?}; run with --force to replace it
    PointsElsewhere {
        path: PathBuf,
        current: PathBuf,
        wanted: PathBuf,
    },
    /// {0:?} is neither a directory nor a symlink; move it away by hand
    NotALinkOrDirectory(PathBuf),
    /// {0:?} is a socket, device or pipe; a journal directory holds none, so nothing was migrated
    Unsupported(PathBuf),
    /// not enough space on the share {share:?}: the migration needs {needed} bytes, {available} are free; nothing was changed
    InsufficientSpace {
        share: PathBuf,
        needed: u64,
        available: u64,
    },
    /// {dest:?} already exists in the share with other content than {original:?}; refusing to overwrite it (is the other VM's journal already there?)
    Conflict { original: PathBuf, dest: PathBuf },
    /// the copy {dest:?} does not match {original:?} after writing (blake3 {wrote} written, {read} read back); it was removed, the source is intact: run again
    VerifyMismatch {
        original: PathBuf,
        dest: PathBuf,
        wrote: String,
        read: String,
    },
    /// {0:?} changed while it was being migrated (is the node running?); stop the node and run again: the source is intact
    SourceChanged(PathBuf),
    /// {op} {path:?}: {source}
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LinkError + 'a {
    move |source| LinkError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What [`link`] may do beyond creating a missing link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkOptions {
    /// Move the files of a real directory into the share.
    pub migrate: bool,
    /// Replace a link that points elsewhere.
    pub force: bool,
}

/// What [`link`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The link already pointed at the share; nothing changed.
    AlreadyLinked,
    /// The link was created (in place of nothing or of an empty directory).
    Created,
    /// A link to `previous` was replaced (`--force`).
    Replaced { previous: PathBuf },
    /// The directory's files were migrated and the link created.
    Migrated(MigrationReport),
}

/// The result of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Files copied by this run.
    pub copied: u64,
    /// Files already in the share with identical content (an earlier, interrupted run).
    pub already_present: u64,
    /// Bytes in all files, verified.
    pub bytes: u64,
    /// Where the old directory now is.
    pub aside: PathBuf,
}

/// State of the link path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing there.
    Missing,
    /// A symlink that resolves to the share.
    Correct,
    /// A symlink to something else.
    Elsewhere(PathBuf),
    /// A real directory with this many entries.
    Directory(usize),
    /// Something else (a regular file...).
    Other,
}

/// What is at `link` now, relative to `target`.
pub fn inspect(link: &Path, target: &Path) -> Result<LinkState, LinkError> {
    let meta = match fs::symlink_metadata(link) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LinkState::Missing),
        Err(e) => return Err(io_err("cannot inspect", link)(e)),
    };
    if meta.file_type().is_symlink() {
        let current = fs::read_link(link).map_err(io_err("cannot read link", link))?;
        let resolves_same = match (fs::canonicalize(link), fs::canonicalize(target)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if current == target || resolves_same {
            Ok(LinkState::Correct)
        } else {
            Ok(LinkState::Elsewhere(current))
        }
    } else if meta.is_dir() {
        let entries = fs::read_dir(link)
            .map_err(io_err("cannot list", link))?
            .count();
        Ok(LinkState::Directory(entries))
    } else {
        Ok(LinkState::Other)
    }
}

/// Makes `link` a symlink to `target` (see the module doc for what it refuses).
pub fn link(link: &Path, target: &Path, opts: LinkOptions) -> Result<LinkOutcome, LinkError> {
    let base = link.parent().unwrap_or(Path::new("/"));
    if !base.is_dir() {
        return Err(LinkError::BaseDirMissing(base.to_owned()));
    }
    if !target.is_dir() {
        return Err(LinkError::TargetMissing(target.to_owned()));
    }
    match inspect(link, target)? {
        LinkState::Correct => Ok(LinkOutcome::AlreadyLinked),
        LinkState::Missing => {
            create_link(link, target)?;
            Ok(LinkOutcome::Created)
        }
        LinkState::Elsewhere(previous) if opts.force => {
            create_link(link, target)?;
            tracing::warn!(link = %link.display(), previous = %previous.display(), "replaced a link that pointed elsewhere");
            Ok(LinkOutcome::Replaced { previous })
        }
        LinkState::Elsewhere(current) => Err(LinkError::PointsElsewhere {
            path: link.to_owned(),
            current,
            wanted: target.to_owned(),
        }),
        LinkState::Directory(0) => {
            // rmdir fails, and changes nothing, if a file appeared meanwhile
            fs::remove_dir(link).map_err(io_err("cannot remove the empty directory", link))?;
            create_link(link, target)?;
            Ok(LinkOutcome::Created)
        }
        LinkState::Directory(entries) if !opts.migrate => Err(LinkError::NotEmpty {
            path: link.to_owned(),
            entries,
        }),
        LinkState::Directory(_) => migrate(link, target).map(LinkOutcome::Migrated),
        LinkState::Other => Err(LinkError::NotALinkOrDirectory(link.to_owned())),
    }
}

/// Creates the link under a temporary name beside it and renames it into place, so that
/// `link` is at every moment either absent, the old link, or the new one.
fn create_link(link: &Path, target: &Path) -> Result<(), LinkError> {
    let base = link.parent().unwrap_or(Path::new("/"));
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = base.join(format!(".{name}.link-tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp); // left by a crashed run that had our pid
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("cannot create link", &tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("cannot rename link into place at", link)(e));
    }
    sync_dir(base)
}

fn sync_dir(dir: &Path) -> Result<(), LinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync directory", dir))
}

#[derive(Debug)]
enum Kind {
    Dir {
        mode: u32,
    },
    File {
        len: u64,
        mode: u32,
        mtime: (i64, i64),
    },
    Symlink(PathBuf),
}

/// Every entry below `root`, parents before children, in a stable order.
fn walk(root: &Path) -> Result<Vec<(PathBuf, Kind)>, LinkError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err("cannot list", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("cannot list", &dir))?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(io_err("cannot inspect", &path))?;
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                Kind::Symlink(fs::read_link(&path).map_err(io_err("cannot read link", &path))?)
            } else if ft.is_dir() {
                stack.push(rel.clone());
                Kind::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else if ft.is_file() {
                Kind::File {
                    len: meta.len(),
                    mode: meta.mode() & 0o7777,
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                }
            } else {
                return Err(LinkError::Unsupported(path));
            };
            out.push((rel, kind));
        }
    }
    Ok(out)
}

fn migrate(src_root: &Path, dst_root: &Path) -> Result<MigrationReport, LinkError> {
    let entries = walk(src_root)?;
    // Space: what is not yet in the share (an earlier run may have copied part of it).
    let needed: u64 = entries
        .iter()
        .filter_map(|(rel, k)| match k {
            Kind::File { len, .. } => {
                let present =
                    fs::metadata(dst_root.join(rel)).is_ok_and(|m| m.is_file() && m.len() == *len);
                (!present).then_some(*len)
            }
            _ => None,
        })
        .sum();
    let available =
        crate::sys::free_bytes(dst_root).map_err(io_err("cannot read free space of", dst_root))?;
    if needed > available {
        return Err(LinkError::InsufficientSpace {
            share: dst_root.to_owned(),
            needed,
            available,
        });
    }
    // Conflicts first: a file of the same name with other content in the share (the other
    // VM's journal?) stops the migration before anything is written.
    let mut present = std::collections::HashSet::new();
    for (rel, kind) in &entries {
        let (src, dst) = (src_root.join(rel), dst_root.join(rel));
        let same = match kind {
            Kind::Dir { .. } => continue,
            Kind::Symlink(target) => match fs::read_link(&dst) {
                Ok(existing) => existing == *target,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => false,
            },
            Kind::File { .. } => match fs::symlink_metadata(&dst) {
                Ok(m) => m.is_file() && hash_file(&src)? == hash_file(&dst)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot inspect", &dst)(e)),
            },
        };
        if !same {
            return Err(LinkError::Conflict {
                original: src,
                dest: dst,
            });
        }
        present.insert(rel.clone());
    }
    let files = entries
        .iter()
        .filter(|(_, k)| !matches!(k, Kind::Dir { .. }))
        .count();
    tracing::info!(from = %src_root.display(), to = %dst_root.display(), files, bytes = needed, "migrating into the share");

    let mut report = MigrationReport {
        copied: 0,
        already_present: 0,
        bytes: 0,
        aside: PathBuf::new(),
    };
    let mut dirs = vec![dst_root.to_owned()];
    for (rel, kind) in &entries {
        let src = src_root.join(rel);
        let dst = dst_root.join(rel);
        match kind {
            Kind::Dir { mode } => {
                match fs::create_dir(&dst) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dst.is_dir() => {}
                    Err(e) => return Err(io_err("cannot create directory", &dst)(e)),
                }
                fs::set_permissions(&dst, fs::Permissions::from_mode(*mode))
                    .map_err(io_err("cannot set mode of", &dst))?;
                dirs.push(dst);
            }
            Kind::Symlink(_) if present.contains(rel) => report.already_present += 1,
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &dst)
                    .map_err(io_err("cannot create link", &dst))?;
                report.copied += 1;
            }
            Kind::File { len, mode, mtime } => {
                if present.contains(rel) {
                    report.already_present += 1;
                } else {
                    copy_verified(&src, &dst, *mode)?;
                    report.copied += 1;
                }
                report.bytes += len;
                let now = fs::metadata(&src).map_err(io_err("cannot inspect", &src))?;
                if now.len() != *len || (now.mtime(), now.mtime_nsec()) != *mtime {
                    return Err(LinkError::SourceChanged(src));
                }
            }
        }
    }
    for dir in &dirs {
        sync_dir(dir)?;
    }
    // Every file is in the share and verified: only now does the source move, and only aside.
    let base = src_root.parent().unwrap_or(Path::new("/"));
    let name = src_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = utc_stamp(SystemTime::now());
    let mut aside = base.join(format!("{name}{ASIDE_INFIX}{stamp}"));
    let mut n = 1;
    while fs::symlink_metadata(&aside).is_ok() {
        aside = base.join(format!("{name}{ASIDE_INFIX}{stamp}.{n}"));
        n += 1;
    }
    fs::rename(src_root, &aside)
        .map_err(io_err("cannot move the old directory aside from", src_root))?;
    sync_dir(base)?;
    tracing::info!(aside = %aside.display(), "old directory kept aside");
    create_link(src_root, dst_root)?;
    report.aside = aside;
    Ok(report)
}

/// Copies `src` to `dst` through a temporary file, hashing what was read, then reads the copy
/// back and compares. `dst` exists only once it is complete and verified.
fn copy_verified(src: &Path, dst: &Path, mode: u32) -> Result<(), LinkError> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}{MIGRATE_TMP_SUFFIX}"));
    let mut input = File::open(src).map_err(io_err("cannot open", src))?;
    let mut output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("cannot read", src)(e)),
        };
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(io_err("cannot write", &tmp))?;
    }
    let meta = input.metadata().map_err(io_err("cannot inspect", src))?;
    output
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set mode of", &tmp))?;
    output
        .set_modified(
            meta.modified()
                .map_err(io_err("cannot read mtime of", src))?,
        )
        .map_err(io_err("cannot set mtime of", &tmp))?;
    output.sync_all().map_err(io_err("cannot fsync", &tmp))?;
    drop(output);
    let wrote = hasher.finalize();
    let read = hash_file(&tmp)?;
    if read != wrote {
        let _ = fs::remove_file(&tmp);
        return Err(LinkError::VerifyMismatch {
            original: src.to_owned(),
            dest: dst.to_owned(),
            wrote: wrote.to_hex().to_string(),
            read: read.to_hex().to_string(),
        });
    }
    fs::rename(&tmp, dst).map_err(io_err("cannot rename into place", dst))
}

/// The blake3 digest of a whole file.
pub fn hash_file(path: &Path) -> Result<blake3::Hash, LinkError> {
    let mut hasher = blake3::Hasher::new();
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    hasher
        .update_reader(file)
        .map_err(io_err("cannot read", path))?;
    Ok(hasher.finalize())
}

/// `YYYYMMDDTHHMMSSZ` in UTC, for names that sort by time.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Fixture {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        share: PathBuf,
        link: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("corda");
        let share = tmp.path().join("share");
        fs::create_dir_all(&base).unwrap();
        fs::create_dir_all(&share).unwrap();
        let link = base.join("artemis");
        Fixture {
            _tmp: tmp,
            base,
            share,
            link,
        }
    }

    fn write_journal(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let files = vec![
            (
                PathBuf::from("journal/activemq-data-1.amq"),
                (0..200_000u32).map(|i| (i % 251) as u8).collect(),
            ),
            (
                PathBuf::from("bindings/activemq-bindings-1.bindings"),
                vec![7u8; 4096],
            ),
            (PathBuf::from("paging/abc/000000001.page"), b"page".to_vec()),
            (PathBuf::from("server.lock"), Vec::new()),
        ];
        for (rel, data) in &files {
            fs::create_dir_all(dir.join(rel).parent().unwrap()).unwrap();
            fs::write(dir.join(rel), data).unwrap();
        }
        files
    }

    #[test]
    fn creates_then_is_a_no_op() {
        let f = fixture();
        assert_eq!(
            link(&f.link, &f.share, LinkOptions::default()).unwrap(),
            LinkOutcome::Created
        );
        assert_eq!(fs::read_link(&f.link).unwrap(), f.share);
        assert_eq!(
            link(&f.link, &f.share, LinkOptions::default()).unwrap(),
            LinkOutcome::AlreadyLinked
        );
        // no temporary link is left behind
        assert_eq!(fs::read_dir(&f.base).unwrap().count(), 1);
    }

    #[test]
    fn replaces_an_empty_directory() {
        let f = fixture();
        fs::create_dir(&f.link).unwrap();
        assert_eq!(
            link(&f.link, &f.share, LinkOptions::default()).unwrap(),
            LinkOutcome::Created
        );
        assert!(f.link.is_symlink());
    }

    #[test]
    fn refuses_a_directory_with_files_and_changes_nothing() {
        let f = fixture();
        let files = write_journal(&f.link);
        let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("real directory holding 4 entries") && msg.contains("--migrate"),
            "{msg}"
        );
        assert!(f.link.is_dir() && !f.link.is_symlink());
        for (rel, data) in files {
            assert_eq!(fs::read(f.link.join(rel)).unwrap(), data);
        }
        assert_eq!(fs::read_dir(&f.share).unwrap().count(), 0);
    }

    #[test]
    fn migrates_verifies_and_keeps_the_old_directory() {
        let f = fixture();
        let files = write_journal(&f.link);
        fs::set_permissions(
            f.link.join("server.lock"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let out = link(
            &f.link,
            &f.share,
            LinkOptions {
                migrate: true,
                force: false,
            },
        )
        .unwrap();
        let LinkOutcome::Migrated(report) = out else {
            panic!("{out:?}")
        };
        assert_eq!(report.copied, 4);
        assert!(report
            .aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("artemis.pre-artemis-sync.20"));
        for (rel, data) in &files {
            assert_eq!(
                &fs::read(f.link.join(rel)).unwrap(),
                data,
                "through the link"
            );
            assert_eq!(
                &fs::read(report.aside.join(rel)).unwrap(),
                data,
                "kept aside"
            );
        }
        let mode = fs::metadata(f.share.join("server.lock")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            link(&f.link, &f.share, LinkOptions::default()).unwrap(),
            LinkOutcome::AlreadyLinked
        );
    }

    #[test]
    fn a_rerun_after_interruption_completes_and_a_foreign_file_is_a_conflict() {
        let f = fixture();
        let files = write_journal(&f.link);
        // an interrupted run: one file copied, one half-written temporary
        fs::create_dir_all(f.share.join("journal")).unwrap();
        fs::write(f.share.join("journal/activemq-data-1.amq"), &files[0].1).unwrap();
        fs::create_dir_all(f.share.join("bindings")).unwrap();
        fs::write(
            f.share
                .join("bindings/.activemq-bindings-1.bindings.artemis-sync-tmp"),
            b"half",
        )
        .unwrap();
        let out = link(
            &f.link,
            &f.share,
            LinkOptions {
                migrate: true,
                force: false,
            },
        )
        .unwrap();
        let LinkOutcome::Migrated(report) = out else {
            panic!("{out:?}")
        };
        assert_eq!((report.copied, report.already_present), (3, 1));
        assert!(!f
            .share
            .join("bindings/.activemq-bindings-1.bindings.artemis-sync-tmp")
            .exists());

        // a share that already holds a different file of the same name is never overwritten
        let g = fixture();
        write_journal(&g.link);
        fs::create_dir_all(g.share.join("journal")).unwrap();
        fs::write(
            g.share.join("journal/activemq-data-1.amq"),
            b"the other VM's journal",
        )
        .unwrap();
        let err = link(
            &g.link,
            &g.share,
            LinkOptions {
                migrate: true,
                force: false,
            },
        )
        .unwrap_err();
        assert!(matches!(err, LinkError::Conflict { .. }), "{err}");
        assert_eq!(
            fs::read_dir(&g.share).unwrap().count(),
            1,
            "nothing else was written to the share"
        );
        assert_eq!(
            fs::read(g.share.join("journal/activemq-data-1.amq")).unwrap(),
            b"the other VM's journal"
        );
        assert!(g.link.is_dir() && !g.link.is_symlink(), "source untouched");
    }

    #[test]
    fn a_link_elsewhere_needs_force() {
        let f = fixture();
        let other = f.base.join("other");
        fs::create_dir(&other).unwrap();
        std::os::unix::fs::symlink(&other, &f.link).unwrap();
        let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read_link(&f.link).unwrap(), other);
        let out = link(
            &f.link,
            &f.share,
            LinkOptions {
                migrate: false,
                force: true,
            },
        )
        .unwrap();
        assert_eq!(out, LinkOutcome::Replaced { previous: other });
        assert_eq!(fs::read_link(&f.link).unwrap(), f.share);
    }

    #[test]
    fn missing_base_dir_target_and_odd_files_are_named() {
        let f = fixture();
        let err = link(
            &f.base.join("nope/artemis"),
            &f.share,
            LinkOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("nope") && err.to_string().contains("base_dir"),
            "{err}"
        );
        let err = link(&f.link, &f.base.join("unmounted"), LinkOptions::default()).unwrap_err();
        assert!(err.to_string().contains("unmounted"), "{err}");
        fs::write(&f.link, b"x").unwrap();
        let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
        assert!(matches!(err, LinkError::NotALinkOrDirectory(_)), "{err}");
    }

    #[test]
    fn utc_stamp_formats_known_instants() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_319_827)),
            "20261122T035707Z"
        );
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
    }
}
