//! `link --migrate`: the files of a real `artemis/` directory copied into the share, each
//! through a temporary name (a source entry named like one is refused) given the source's
//! owner and mode, fsynced, read back and compared by blake3; directories and symlinks keep
//! their owners too, and the share's root takes the old directory's. A same-named file of other content in the share, or anything but a real
//! directory where the source has a directory, stops everything before the first write
//! (symlinks in the share are never followed), and so does a source symlink leading out of
//! the directory (what it leads to would stay on this VM). Each source file is checked
//! unchanged after its copy, and the whole source listed again and compared with its first
//! listing (an entry the node created meanwhile would be left behind): only then is it moved
//! aside and replaced by the link. Run again after an interruption, it skips what is already
//! in the share with identical content.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use crate::link::{
    chown_err, create_link, file_digest, io_err, sync_dir, utc_stamp, LinkError, ASIDE_INFIX,
    COPY_CHUNK_BYTES, MIGRATE_TMP_SUFFIX,
};
use crate::shared::lock::{short_constant, whole_file_write_lock};

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

/// An entry's owner, `(uid, gid)`, given to its copy in the share.
type Owner = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Dir {
        mode: u32,
        mtime: (i64, i64),
        owner: Owner,
    },
    File {
        len: u64,
        mode: u32,
        mtime: (i64, i64),
        owner: Owner,
    },
    Symlink {
        target: PathBuf,
        owner: Owner,
    },
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
            let owner = (meta.uid(), meta.gid());
            let kind = if ft.is_symlink() {
                Kind::Symlink {
                    target: fs::read_link(&path).map_err(io_err("cannot read link", &path))?,
                    owner,
                }
            } else if ft.is_dir() {
                stack.push(rel.clone());
                Kind::Dir {
                    mode: meta.mode() & 0o7777,
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    owner,
                }
            } else if ft.is_file() {
                Kind::File {
                    len: meta.len(),
                    mode: meta.mode() & 0o7777,
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    owner,
                }
            } else {
                return Err(LinkError::Unsupported(path));
            };
            out.push((rel, kind));
        }
    }
    Ok(out)
}

/// Migrates the directory `src_root` into `dst_root` (the share), then moves it aside and
/// puts the link in its place.
pub(super) fn migrate(src_root: &Path, dst_root: &Path) -> Result<MigrationReport, LinkError> {
    check_broker_stopped(src_root)?;
    let entries = walk(src_root)?;
    check_names(&entries, src_root)?;
    check_links(&entries, src_root)?;
    let needed = check_space(&entries, dst_root)?;
    let present = already_present(&entries, src_root, dst_root)?;
    let files = entries
        .iter()
        .filter(|(_, k)| !matches!(k, Kind::Dir { .. }))
        .count();
    tracing::info!(from = %src_root.display(), to = %dst_root.display(), files, bytes = needed, "migrating into the share");
    let mut report = copy_entries(&entries, src_root, dst_root, &present)?;
    // Every file is in the share and verified, and the source is listed again: a file the node
    // created meanwhile would otherwise go aside with the old directory, missing in the share.
    check_unchanged(&entries, &walk(src_root)?, src_root)?;
    check_broker_stopped(src_root)?;
    give_root_owner(src_root, dst_root)?;
    // Only now does the source move, and only aside.
    let aside = move_aside(src_root)?;
    create_link(src_root, dst_root)?;
    report.aside = aside;
    Ok(report)
}

/// The file ActiveMQ Artemis locks (fcntl) in its data directory for as long as it runs.
const BROKER_LOCK: &str = "server.lock";

/// Refuses to migrate a journal whose broker runs: a process holds a lock on its
/// `server.lock`. (The listing before the move catches most of what a running node writes;
/// this catches the node itself, and a write between that listing and the move.)
fn check_broker_stopped(src_root: &Path) -> Result<(), LinkError> {
    let path = src_root.join(BROKER_LOCK);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot open", &path)(e)),
    };
    // F_GETLK asks whether this lock could be taken, and if not, who holds one in its way
    let mut lock = whole_file_write_lock();
    // SAFETY: F_GETLK reads and fills the `flock` we own; the descriptor is open for the call.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_GETLK,
            &mut lock,
        )
    };
    if rc != 0 {
        return Err(io_err("cannot test the lock of", &path)(
            io::Error::last_os_error(),
        ));
    }
    if lock.l_type == short_constant(libc::F_UNLCK) {
        return Ok(());
    }
    // an open file description lock has no process (-1)
    let holder = if lock.l_pid > 0 {
        format!("process {}", lock.l_pid)
    } else {
        "a process".to_owned()
    };
    Err(LinkError::BrokerRunning { path, holder })
}

/// Refuses a source entry named like a temporary (`.X.artemis-sync-tmp`): the copy of `X`
/// would write its temporary over it in the share, then rename it away.
fn check_names(entries: &[(PathBuf, Kind)], src_root: &Path) -> Result<(), LinkError> {
    for (rel, _) in entries {
        if rel.file_name().is_some_and(|n| {
            n.as_encoded_bytes()
                .ends_with(MIGRATE_TMP_SUFFIX.as_bytes())
        }) {
            return Err(LinkError::ReservedName(src_root.join(rel)));
        }
    }
    Ok(())
}

/// Refuses a source symlink that leads out of the journal directory (a journal moved to
/// another disk and linked back): copied as it is, it would lead from the share back to this
/// VM's disk, and the migration would report a journal in the share that is not there. Its
/// target is read lexically; an absolute one inside `src_root` is kept, since `src_root`
/// becomes the link to the share.
fn check_links(entries: &[(PathBuf, Kind)], src_root: &Path) -> Result<(), LinkError> {
    for (rel, kind) in entries {
        let Kind::Symlink { target, .. } = kind else {
            continue;
        };
        let inside = match target.strip_prefix(src_root) {
            Ok(rest) => rest.to_owned(),
            Err(_) if target.is_absolute() => PathBuf::from("/"),
            Err(_) => rel.parent().unwrap_or(Path::new("")).join(target),
        };
        let mut depth = 0usize;
        let escapes = inside.components().any(|c| match c {
            Component::Normal(_) => {
                depth += 1;
                false
            }
            Component::CurDir => false,
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => {
                    depth = d;
                    false
                }
                None => true,
            },
            Component::RootDir | Component::Prefix(_) => true,
        });
        if escapes {
            return Err(LinkError::LinkLeavesJournal {
                path: src_root.join(rel),
                target: target.clone(),
            });
        }
    }
    Ok(())
}

/// The bytes still to copy (an earlier run may have copied part of them), if the share has
/// room for them.
fn check_space(entries: &[(PathBuf, Kind)], dst_root: &Path) -> Result<u64, LinkError> {
    let needed: u64 = entries
        .iter()
        .filter_map(|(rel, k)| match k {
            Kind::File { len, .. } => {
                let present = fs::symlink_metadata(dst_root.join(rel))
                    .is_ok_and(|m| m.is_file() && m.len() == *len);
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
    Ok(needed)
}

/// The files and links already in the share with the same content. A file of the same name
/// with other content in the share (the other VM's journal?), or anything but a real
/// directory where the source has a directory (a symlink would lead the copy out of the
/// share), stops the migration before anything is written. Symlinks in the share are never
/// followed.
fn already_present(
    entries: &[(PathBuf, Kind)],
    src_root: &Path,
    dst_root: &Path,
) -> Result<HashSet<PathBuf>, LinkError> {
    let mut present = HashSet::new();
    for (rel, kind) in entries {
        let (src, dst) = (src_root.join(rel), dst_root.join(rel));
        let same = match kind {
            Kind::Dir { .. } => match fs::symlink_metadata(&dst) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot inspect", &dst)(e)),
            },
            Kind::Symlink { target, .. } => match fs::read_link(&dst) {
                Ok(existing) => existing == *target,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => false,
            },
            Kind::File { .. } => match fs::symlink_metadata(&dst) {
                Ok(m) => m.is_file() && file_digest(&src)? == file_digest(&dst)?,
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
    Ok(present)
}

/// Creates the directories, copies (verified) what is not `present`, gives every entry it
/// creates the owner of its source, checks every source file
/// unchanged after its copy, and fsyncs every directory written to.
fn copy_entries(
    entries: &[(PathBuf, Kind)],
    src_root: &Path,
    dst_root: &Path,
    present: &HashSet<PathBuf>,
) -> Result<MigrationReport, LinkError> {
    let mut report = MigrationReport {
        copied: 0,
        already_present: 0,
        bytes: 0,
        aside: PathBuf::new(),
    };
    let mut dirs = vec![dst_root.to_owned()];
    for (rel, kind) in entries {
        let src = src_root.join(rel);
        let dst = dst_root.join(rel);
        match kind {
            Kind::Dir { mode, owner, .. } => {
                match fs::create_dir(&dst) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::AlreadyExists
                            && fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) => {}
                    Err(e) => return Err(io_err("cannot create directory", &dst)(e)),
                }
                // the owner first: a chown clears the set-id bits of the mode
                std::os::unix::fs::lchown(&dst, Some(owner.0), Some(owner.1))
                    .map_err(chown_err(&dst, *owner))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(*mode))
                    .map_err(io_err("cannot set mode of", &dst))?;
                dirs.push(dst);
            }
            Kind::Symlink { .. } if present.contains(rel) => report.already_present += 1,
            Kind::Symlink { target, owner } => {
                std::os::unix::fs::symlink(target, &dst)
                    .map_err(io_err("cannot create link", &dst))?;
                std::os::unix::fs::lchown(&dst, Some(owner.0), Some(owner.1))
                    .map_err(chown_err(&dst, *owner))?;
                report.copied += 1;
            }
            Kind::File {
                len,
                mode,
                mtime,
                owner,
            } => {
                if present.contains(rel) {
                    report.already_present += 1;
                } else {
                    copy_verified(&src, &dst, *mode, *owner)?;
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
    Ok(report)
}

/// Compares the source's listing after the copy with the one it started from: an entry added,
/// removed or changed (kind, length, mtime, mode, owner, link target; directories too) is
/// [`LinkError::SourceChanged`] naming it. A file added or removed also changes its
/// directory's mtime: the entry is named rather than its directory.
fn check_unchanged(
    before: &[(PathBuf, Kind)],
    after: &[(PathBuf, Kind)],
    src_root: &Path,
) -> Result<(), LinkError> {
    fn index(entries: &[(PathBuf, Kind)]) -> BTreeMap<&Path, &Kind> {
        entries.iter().map(|(rel, k)| (rel.as_path(), k)).collect()
    }
    let (before, after) = (index(before), index(after));
    let mut changed: Vec<&Path> = before
        .keys()
        .chain(after.keys())
        .copied()
        .filter(|rel| before.get(rel) != after.get(rel))
        .collect();
    changed.sort();
    changed.dedup();
    let is_dir = |k: Option<&&Kind>| matches!(k, Some(Kind::Dir { .. }));
    let named = changed
        .iter()
        .find(|rel| !(is_dir(before.get(*rel)) && is_dir(after.get(*rel))))
        .or(changed.first());
    match named {
        Some(rel) => Err(LinkError::SourceChanged(src_root.join(rel))),
        None => Ok(()),
    }
}

/// Renames `src_root` to `<name>.pre-artemis-sync.<UTC stamp>` (with `.N` if that exists) and
/// fsyncs its parent; returns the new path.
/// The share's root gets the old directory's owner and mode: it becomes
/// `${BASE_DIR}/artemis`, where the node, running as its own user, creates its journal's
/// directories (`bindings/`, `paging/`, ...) when they are missing. A share root left as the
/// server made it (root's own, 0755) refuses them, and the node fails at its first start on
/// the share.
fn give_root_owner(src_root: &Path, dst_root: &Path) -> Result<(), LinkError> {
    let src = fs::symlink_metadata(src_root).map_err(io_err("cannot stat", src_root))?;
    let dst = fs::metadata(dst_root).map_err(io_err("cannot stat", dst_root))?;
    let owner = (src.uid(), src.gid());
    let mode = src.mode() & 0o7777;
    if (dst.uid(), dst.gid()) == owner && dst.mode() & 0o7777 == mode {
        return Ok(());
    }
    // the owner first: a chown clears the set-id bits of the mode
    std::os::unix::fs::chown(dst_root, Some(owner.0), Some(owner.1))
        .map_err(chown_err(dst_root, owner))?;
    fs::set_permissions(dst_root, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set mode of", dst_root))?;
    tracing::info!(
        share = %dst_root.display(),
        uid = owner.0,
        gid = owner.1,
        mode = format!("{mode:o}"),
        "the share's root takes the old journal directory's owner and mode"
    );
    Ok(())
}

fn move_aside(src_root: &Path) -> Result<PathBuf, LinkError> {
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
    Ok(aside)
}

/// Copies `src` to `dst` through a temporary file given `mode` and `owner`, hashing what was
/// read, then reads the copy back and compares. `dst` exists only once it is complete and
/// verified; a copy that fails removes its temporary, so a failed migration leaves nothing
/// half-written in the share.
fn copy_verified(src: &Path, dst: &Path, mode: u32, owner: Owner) -> Result<(), LinkError> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}{MIGRATE_TMP_SUFFIX}"));
    let mut input = File::open(src).map_err(io_err("cannot open", src))?;
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    let copied = copy_to_temporary(&mut input, output, src, &tmp, mode, owner)
        .and_then(|wrote| verify_copy(&tmp, wrote, src, dst));
    if let Err(e) = copied {
        if let Err(rm) = fs::remove_file(&tmp) {
            tracing::warn!(file = %tmp.display(), error = %rm, "cannot remove the failed copy's temporary");
        }
        return Err(e);
    }
    fs::rename(&tmp, dst).map_err(io_err("cannot rename into place", dst))
}

/// Writes `input` into the temporary `output`, gives it the source's owner, mode and mtime,
/// fsyncs it, and returns the blake3 of what was read.
fn copy_to_temporary(
    input: &mut File,
    mut output: File,
    src: &Path,
    tmp: &Path,
    mode: u32,
    owner: Owner,
) -> Result<blake3::Hash, LinkError> {
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
            .map_err(io_err("cannot write", tmp))?;
    }
    let meta = input.metadata().map_err(io_err("cannot inspect", src))?;
    // the owner before the mode: a chown clears the set-id bits
    std::os::unix::fs::fchown(&output, Some(owner.0), Some(owner.1))
        .map_err(chown_err(tmp, owner))?;
    output
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set mode of", tmp))?;
    output
        .set_modified(
            meta.modified()
                .map_err(io_err("cannot read mtime of", src))?,
        )
        .map_err(io_err("cannot set mtime of", tmp))?;
    output.sync_all().map_err(io_err("cannot fsync", tmp))?;
    Ok(hasher.finalize())
}

/// Reads the temporary back and compares it with what was written.
fn verify_copy(tmp: &Path, wrote: blake3::Hash, src: &Path, dst: &Path) -> Result<(), LinkError> {
    let read = file_digest(tmp)?;
    if read != wrote {
        return Err(LinkError::VerifyMismatch {
            original: src.to_owned(),
            dest: dst.to_owned(),
            wrote: wrote.to_hex().to_string(),
            read: read.to_hex().to_string(),
        });
    }
    Ok(())
}
