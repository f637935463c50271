//! The FUSE capture (`capture = "fuse"`): on the hot host the agent serves `data_dir` at
//! `[replication] mount_point` as a passthrough filesystem, and `${BASE_DIR}/artemis` links
//! to the mount. Every call the node makes is applied to `data_dir` (`passthrough.rs`,
//! `names.rs`, `data.rs`; listings in `dirs.rs`, nodes and paths in `inodes.rs`, system calls
//! in `sys.rs`), and each mutation queues an [`FsEvent`] that says what it did (`Wrote` with
//! the exact range, `Resized`, `MadeDir`, `Linked`, `Removed`, `AttrsSet`, `Renamed`) to the
//! scanner in call order, through the same bounded channel the watch capture uses. The
//! scanner turns them into the same ops as the watch capture's events without reading the
//! paths they name, and nothing is missed between rescans: native AIO on `O_DIRECT` files and
//! write-back from a shared mmap reach the daemon as `write` calls like any other.
//!
//! Lifecycle: [`mount`] when the host turns hot, [`FuseCapture::stop`] when it stops being
//! hot (after the node is stopped). A mount left by an agent that was killed answers every
//! call with `ENOTCONN`; [`detach_stale`] lazily unmounts it at the next start, before
//! anything else, so a crash never blocks boot.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use fuser::{MountOption, SessionACL};

use crate::replicated::capture::watch::FsEvent;
use crate::replicated::capture::InlineScan;
use crate::replicated::stats::SenderStats;

pub(crate) use durable::mark_degraded;
pub use durable::DurableConfig;

mod data;
mod dirs;
mod durable;
mod inodes;
mod names;
mod passthrough;
mod sys;

/// Threads serving the kernel's requests. One: no handler waits on anything but the backing
/// filesystem and the scanner's queue (a durable sync is handed to a settling thread), and the
/// kernel hands requests to its waiting readers first come first served, so with more threads
/// each request woke one that had gone cold (the FUSE round trip was 64-68 µs with four threads,
/// 45-49 µs with one: docs/performance-log.md, run 12).
pub const FUSE_THREADS: usize = 1;
/// The mount's read-ahead, in KiB: the kernel reads a file ahead through the mount in requests
/// this large (up to the largest request the mount takes, `MAX_WRITE_BYTES`). With the
/// kernel's default, 128 KiB, a first buffered read of a 1 GiB file through the mount ran at
/// 1.8-2.2 GB/s, with 1024 at 2.6-3.1 GB/s (tmpfs; docs/performance-log.md, run 22). Artemis'
/// NIO and MAPPED journals are read this way when the node starts, after a failover too.
pub const READ_AHEAD_KB: u32 = 1024;
/// The mount's source and subtype (`fuse.artemis-sync` in the mount table).
pub const FS_NAME: &str = "artemis-sync";
/// How long [`FuseCapture::stop`] waits for the serving threads once unmounted.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How often the stop polls the serving threads.
const STOP_POLL: Duration = Duration::from_millis(10);
/// Stacked stale mounts detached at most (each start that failed may have left one).
const MAX_STALE_MOUNTS: usize = 16;
/// Where the kernel lists FUSE connections (fusectl).
const FUSECTL: &str = "/sys/fs/fuse/connections";
/// How long a `statfs` of a mount found at start may take before its server counts as hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the FUSE capture, each naming the path.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum FuseError {
    /// cannot prepare the mount point {path:?}: {source}
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot serve {data_dir:?} at {path:?} over FUSE (is /dev/fuse present, the fuse module loaded (`modprobe fuse`), and the agent root?): {source}
    Mount {
        data_dir: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot detach the stale FUSE mount at {path:?} (`umount -l {path:?}` by hand): {source}
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// a live FUSE filesystem is already served at {path:?} (another agent running?); stop it, or `umount {path:?}`
    Live { path: PathBuf },
}

/// A served mount; see the module doc.
#[derive(Debug)]
pub struct FuseCapture {
    mount_point: PathBuf,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `data_dir` (canonical) at `mount_point`; events go to `events`; with `durable`,
/// syncs wait for the cold side's ack (counted in `stats`), and small writes' events are
/// handled through `inline` when the scanner is free; `namespace` is the scanner's lock that
/// each call changing the tree holds with its event. A stale mount there is detached first.
pub fn mount(
    data_dir: &Path,
    mount_point: &Path,
    events: Sender<FsEvent>,
    durable: Option<(DurableConfig, Arc<SenderStats>)>,
    (inline, namespace): (Option<InlineScan>, Arc<std::sync::RwLock<()>>),
) -> Result<FuseCapture, FuseError> {
    detach_stale(mount_point)?;
    let at = |source| FuseError::MountPoint {
        path: mount_point.to_owned(),
        source,
    };
    fs::create_dir_all(mount_point).map_err(at)?;
    let failed = |source| FuseError::Mount {
        data_dir: data_dir.to_owned(),
        path: mount_point.to_owned(),
        source,
    };
    let durable = durable
        .map(|(cfg, stats)| durable::Durable::start(cfg, stats, events.clone()))
        .transpose()
        .map_err(failed)?;
    let fs = passthrough::Passthrough::new(data_dir.to_owned(), events, durable, inline)
        .map_err(failed)?
        .with_namespace_lock(namespace);
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_NAME.into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(FUSE_THREADS);
    cfg.clone_fd = true;
    let session = fuser::Session::new(fs, mount_point, &cfg).map_err(failed)?;
    let thread = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())
        .map_err(failed)?;
    set_read_ahead(mount_point, READ_AHEAD_KB);
    tracing::info!(data_dir = %data_dir.display(), mount_point = %mount_point.display(), threads = FUSE_THREADS, "serving the data directory over FUSE");
    Ok(FuseCapture {
        mount_point: mount_point.to_owned(),
        thread: Some(thread),
    })
}

/// Where the kernel keeps the read-ahead of the FUSE mount at `mount_point`: a FUSE mount's
/// backing device is named after the mount's device number.
fn read_ahead_file(mount_point: &Path) -> io::Result<PathBuf> {
    let dev = fs::metadata(mount_point)?.dev();
    Ok(PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    )))
}

/// Sets the read-ahead of the mount at `mount_point` to `kb` (a performance setting: a failure
/// is logged, not fatal). The kernel lowers the read-ahead to what the filesystem asked for
/// when it handles the filesystem's first answer: a `statfs` through the mount waits for that
/// answer, so the setting is made after it and stays.
fn set_read_ahead(mount_point: &Path, kb: u32) {
    let set = || -> io::Result<PathBuf> {
        sys::statvfs(mount_point)?;
        let path = read_ahead_file(mount_point)?;
        fs::write(&path, kb.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(path)
    };
    match set() {
        Ok(path) => {
            tracing::debug!(mount_point = %mount_point.display(), read_ahead_kb = kb, "read-ahead set in {}", path.display());
        }
        Err(e) => {
            tracing::warn!(mount_point = %mount_point.display(), "cannot set the mount's read-ahead to {kb} KiB (buffered reads through it are slower): {e}");
        }
    }
}

/// The read-ahead of the FUSE mount at `mount_point`, in KiB (the benchmark reports it).
pub fn read_ahead_kb(mount_point: &Path) -> io::Result<u32> {
    fs::read_to_string(read_ahead_file(mount_point)?)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl FuseCapture {
    /// Unmounts (lazily, and aborting the connection, if something still holds it) and waits
    /// for the serving threads.
    pub fn stop(mut self) {
        self.stop_serving();
    }

    fn stop_serving(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let mp = &self.mount_point;
        let dev = fs::metadata(mp).map(|m| m.dev()).ok();
        match sys::umount(mp, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(mount_point = %mp.display(), "still in use: detaching it and aborting its connection");
                if let Err(e) = sys::umount(mp, libc::MNT_DETACH) {
                    tracing::warn!(mount_point = %mp.display(), "cannot detach: {e}");
                }
                if let Some(dev) = dev {
                    abort_connection(dev);
                }
            }
            Err(e) => tracing::warn!(mount_point = %mp.display(), "cannot unmount: {e}"),
        }
        let deadline = Instant::now() + STOP_WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(STOP_POLL);
        }
        if thread.is_finished() {
            if let Ok(Err(e)) = thread.join() {
                tracing::warn!(mount_point = %mp.display(), "FUSE session ended with: {e}");
            }
            tracing::info!(mount_point = %mp.display(), "unmounted");
        } else {
            tracing::warn!(mount_point = %mp.display(), "FUSE threads still busy after unmount; left to finish");
        }
    }
}

impl Drop for FuseCapture {
    fn drop(&mut self) {
        self.stop_serving();
    }
}

/// Aborts the FUSE connection of the mount whose device is `dev` (fusectl): its pending and
/// future calls fail, and the serving threads end.
fn abort_connection(dev: u64) {
    abort_connection_id((u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev)));
}

/// Aborts FUSE connection `id` (the kernel's device number, as fusectl names it).
fn abort_connection_id(id: u64) {
    let path = Path::new(FUSECTL).join(id.to_string()).join("abort");
    if let Err(e) = fs::write(&path, "1") {
        tracing::warn!(path = %path.display(), "cannot abort the FUSE connection: {e}");
    }
}

/// `mount_point` as the mount table spells it: its parent resolved (the mount point itself
/// may be a dead mount that cannot be resolved).
fn table_path(mount_point: &Path) -> PathBuf {
    match (mount_point.parent(), mount_point.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .unwrap_or_else(|_| parent.to_owned())
            .join(name),
        _ => mount_point.to_owned(),
    }
}

/// The device (`major:minor`, as fusectl names its connection) of the topmost FUSE
/// filesystem mounted at `path` (as the mount table spells it), from `/proc/self/mountinfo`.
fn fuse_mounted_at(mountinfo: &str, path: &Path) -> Option<(u64, u64)> {
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        let fstype = right.split(' ').next().unwrap_or("");
        let here = fields.get(4).map(|f| unescape(f)).as_deref()
            == Some(path.as_os_str().to_str().unwrap_or(""));
        if !here || !(fstype == "fuse" || fstype.starts_with("fuse.")) {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

/// What a `statfs` of a mount says about its server: gone (`ENOTCONN`), alive, or hung (no
/// answer within [`PROBE_TIMEOUT`]; the probing thread is left blocked). Not a `stat`: the
/// kernel answers that from its attribute cache for a while after the server died (a node
/// that wrote through the mount until the agent was killed kept it fresh), and the dead mount
/// looked live; every `statfs` is a request to the server.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Dead,
    Live,
    Hung,
}

fn probe(path: &Path) -> Probe {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let p = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("fuse-probe".into())
        .spawn(move || {
            let _ = tx.send(sys::statvfs(&p).map_err(|e| e.raw_os_error()));
        });
    if spawned.is_err() {
        return Probe::Hung;
    }
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(Err(Some(libc::ENOTCONN))) => Probe::Dead,
        Ok(_) => Probe::Live,
        Err(_) => Probe::Hung,
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts every FUSE mount at `mount_point` whose server is gone (an agent that was
/// killed: its calls fail with `ENOTCONN`) or hung (its connection is aborted too); how many
/// there were. A mount whose server answers is someone else's: refused, not touched.
pub fn detach_stale(mount_point: &Path) -> Result<usize, FuseError> {
    let path = table_path(mount_point);
    let stale = |source| FuseError::Stale {
        path: path.clone(),
        source,
    };
    for n in 0..MAX_STALE_MOUNTS {
        // (as bytes: one mount point anywhere whose name is not UTF-8 must not stop the agent)
        let info = crate::sys::read_mountinfo().map_err(stale)?;
        let Some((major, minor)) = fuse_mounted_at(&info, &path) else {
            return Ok(n);
        };
        match probe(&path) {
            Probe::Live => return Err(FuseError::Live { path }),
            Probe::Dead => {
                tracing::warn!(mount_point = %path.display(), "detaching a FUSE mount left by an earlier agent");
            }
            Probe::Hung => {
                tracing::warn!(mount_point = %path.display(), "a FUSE mount whose server does not answer: aborting its connection and detaching it");
                abort_connection_id((major << 20) | minor);
            }
        }
        sys::umount(&path, libc::MNT_DETACH).map_err(stale)?;
    }
    Ok(MAX_STALE_MOUNTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fuse_mounts_in_mountinfo() {
        let info =
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.artemis-sync artemis-sync rw\n\
                    37 35 98:0 / /mnt/c rw - ext4 /dev/sda1 rw\n";
        assert_eq!(fuse_mounted_at(info, Path::new("/mnt/a b")), Some((98, 0)));
        assert_eq!(fuse_mounted_at(info, Path::new("/mnt/c")), None);
        assert_eq!(fuse_mounted_at(info, Path::new("/mnt/a")), None);
        assert_eq!(unescape("a\\040b\\\\"), "a b\\\\");
    }
}
