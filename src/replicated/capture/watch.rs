//! Watching the data directory: `notify` (inotify) events, recursively, into a bounded
//! `crossbeam` channel. When the scanner falls behind, the channel fills, notify's thread
//! blocks, the kernel's inotify queue overflows, and the resulting `IN_Q_OVERFLOW` reaches the
//! scanner as a rescan request: back-pressure without unbounded memory, and nothing missed.
//!
//! The watch set is built, and rebuilt after events were lost, by one **watch thread** that
//! owns the watcher ([`Watches`]): the scanner asks for a rebuild before a walk that follows
//! lost events and drains the event channel while it waits, so notify's thread (which may be
//! blocked sending to that channel) can always answer. A rebuild unwatches the root and
//! watches it again, so directories created or renamed while events were lost are watched
//! under their current names. When the kernel refuses a watch (`ENOSPC`: the per-user watch
//! limit) or an inotify instance (`EMFILE`), the rebuild says which limit ([`Limit`]); the
//! scanner logs it once with the sysctl to raise ([`limit_message`]) and relies on its
//! periodic rescans, retrying the rebuild every minute (at once after lost events).

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::replicated::pages::Attrs;

/// Events buffered between notify's thread and the scanner.
pub const EVENT_QUEUE: usize = 8192;
/// Rebuild requests waiting for the watch thread (the scanner waits for each answer).
const REBUILD_QUEUE: usize = 1;

/// What the scanner hears from the watcher.
#[derive(Debug)]
pub enum FsEvent {
    /// A notify event (paths are absolute).
    Event(notify::Event),
    /// Events were lost (queue overflow, watcher error): rescan everything.
    Rescan(String),
    /// A new directory could not be watched: the watch limit is reached.
    WatchLimit,
    /// From the FUSE capture: `len` bytes at `offset` of the file at `path` (relative) were
    /// written, allocated or punched through `file`, the backing file the writer holds.
    Wrote {
        path: String,
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    /// From the FUSE capture: the length of the file at `path` (relative) was set through
    /// `file`, from or to `edge` (the shorter of the old and new lengths), or the file was
    /// created (`edge` 0). At that point of the stream the file ends at `edge`, with zeros
    /// after it up to its new length, whatever it holds by the time the event is handled.
    Resized {
        path: String,
        file: Arc<File>,
        edge: u64,
    },
    /// From the FUSE capture: something at `path` (relative) changed that the call cannot
    /// describe exactly (a change of attributes that failed part way, or whose path was gone
    /// when it looked): the scanner reads what the path holds when it handles the event.
    Changed(String),
    /// From the FUSE capture: the entry at `path` (relative), and everything below it, was
    /// removed (`unlink`, `rmdir`).
    Removed(String),
    /// From the FUSE capture: the directory `path` (relative) was made, empty, with `attrs`.
    MadeDir { path: String, attrs: Attrs },
    /// From the FUSE capture: the symlink `path` (relative) was made, to `target`, owned as
    /// `attrs` says.
    Linked {
        path: String,
        target: String,
        attrs: Attrs,
    },
    /// From the FUSE capture: the mode or owner of the entry at `path` (relative) was set
    /// (`chmod`, `chown`, `utimens`), and it then had `attrs`.
    AttrsSet { path: String, attrs: Attrs },
    /// From the FUSE capture: `from` was renamed to `to` (relative paths).
    Renamed { from: String, to: String },
    /// From the FUSE capture, durable acks: answer once the cold side has acknowledged every
    /// op made from the events before this one (dropped unanswered if it cannot be).
    Sync(Sender<()>),
    /// Not a change: a request is waiting on the scanner's control channel
    /// ([`crate::replicated::capture::ScanControl`]). Never counted as handled.
    Nudge,
}

/// The kernel limit that stopped the watch set from covering the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `ENOSPC` adding a watch: `fs.inotify.max_user_watches`.
    Watches,
    /// `EMFILE` creating an inotify instance: `fs.inotify.max_user_instances`.
    Instances,
}

impl Limit {
    /// The sysctl to raise.
    pub fn sysctl(self) -> &'static str {
        match self {
            Limit::Watches => "fs.inotify.max_user_watches",
            Limit::Instances => "fs.inotify.max_user_instances",
        }
    }

    /// Its file under `/proc/sys`, and the user namespace's own limit (Linux 5.11 and
    /// later), which may be lower.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Limit::Watches => (
                "/proc/sys/fs/inotify/max_user_watches",
                "/proc/sys/user/max_inotify_watches",
            ),
            Limit::Instances => (
                "/proc/sys/fs/inotify/max_user_instances",
                "/proc/sys/user/max_inotify_instances",
            ),
        }
    }

    /// The current values of the sysctl and of the user namespace's limit, when readable.
    pub fn current(self) -> (Option<u64>, Option<u64>) {
        let read = |p: &str| fs::read_to_string(p).ok()?.trim().parse().ok();
        let (global, userns) = self.files();
        (read(global), read(userns))
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Watches => "inotify watch limit",
            Limit::Instances => "inotify instance limit",
        })
    }
}

/// The log line (and `status` text) for a reached limit: which sysctl, its value, the number of
/// directories, what to run, and how changes are found meanwhile.
pub fn limit_message(
    limit: Limit,
    (global, userns): (Option<u64>, Option<u64>),
    dirs: u64,
    rescan: Duration,
) -> String {
    let shown = |v: Option<u64>| v.map_or_else(|| "unreadable".to_owned(), |v| v.to_string());
    let mut msg = format!(
        "the {limit} is reached: {} = {} (shared by every process of this user) and {dirs} directories to watch",
        limit.sysctl(),
        shown(global)
    );
    let lower_userns = userns.filter(|u| global.is_none_or(|g| *u < g));
    let file = limit.files().1.rsplit('/').next().unwrap_or_default();
    if let Some(u) = lower_userns {
        msg.push_str(&format!(
            "; this user namespace allows {u} (/proc/sys/user/{file})"
        ));
    }
    // the namespace's own limit binds when it is the lower one
    let (key, current) = match lower_userns {
        Some(u) => (format!("user.{file}"), u),
        None => (limit.sysctl().to_owned(), global.unwrap_or(0)),
    };
    let want = match limit {
        Limit::Watches => current.max(dirs).saturating_mul(2),
        Limit::Instances => current.saturating_mul(2).max(128),
    };
    msg.push_str(&format!(
        "; raise it with `sysctl -w {key}={want}` (and a file in /etc/sysctl.d/ to keep it); until then changes in unwatched directories are found by the rescan every {} ms",
        rescan.as_millis()
    ));
    msg
}

/// Why a rebuild did not watch every directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchFailure {
    /// A kernel limit.
    Limit(Limit),
    /// Anything else (the root vanished, ...).
    Other(String),
}

/// What builds the watch set: notify in the agent, a stand-in in unit tests.
pub trait WatchBackend: Send + 'static {
    /// Drops the watch set and watches every directory under `root` again.
    fn rewatch(&mut self, root: &Path) -> Result<(), WatchFailure>;
}

/// The real watch set: a notify watcher (inotify), created on the first rebuild.
#[derive(Debug)]
pub struct NotifyBackend {
    tx: Sender<FsEvent>,
    watcher: Option<RecommendedWatcher>,
}

impl NotifyBackend {
    /// Events will go to `tx`.
    pub fn new(tx: Sender<FsEvent>) -> NotifyBackend {
        NotifyBackend { tx, watcher: None }
    }
}

/// The failure a notify error stands for.
fn failure(e: &notify::Error) -> WatchFailure {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => WatchFailure::Limit(Limit::Watches),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            WatchFailure::Limit(Limit::Watches)
        }
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EMFILE) => {
            WatchFailure::Limit(Limit::Instances)
        }
        _ => WatchFailure::Other(e.to_string()),
    }
}

impl WatchBackend for NotifyBackend {
    fn rewatch(&mut self, root: &Path) -> Result<(), WatchFailure> {
        if self.watcher.is_none() {
            let tx = self.tx.clone();
            // symlinks are data, never followed: a link to `..` would otherwise watch (and
            // report paths into) the data directory's parent
            let w = RecommendedWatcher::new(
                move |res| {
                    let _ = tx.send(to_fs_event(res));
                },
                notify::Config::default().with_follow_symlinks(false),
            )
            .map_err(|e| failure(&e))?;
            self.watcher = Some(w);
        }
        let w = self.watcher.as_mut().expect("created above");
        // nothing watched yet is fine
        let _ = w.unwatch(root);
        w.watch(root, RecursiveMode::Recursive)
            .map_err(|e| failure(&e))
    }
}

/// What one notify callback means for the scanner.
fn to_fs_event(res: notify::Result<notify::Event>) -> FsEvent {
    match res {
        Ok(e) if e.need_rescan() => FsEvent::Rescan("the kernel's event queue overflowed".into()),
        Ok(e) => FsEvent::Event(e),
        Err(e) if failure(&e) == WatchFailure::Limit(Limit::Watches) => FsEvent::WatchLimit,
        Err(e) => FsEvent::Rescan(format!("watch error: {e}")),
    }
}

/// The watch thread: owns the backend, rebuilds the watch set when asked. Dropping it stops
/// the thread and with it the watcher.
#[derive(Debug)]
pub struct Watches {
    req: Sender<Sender<Result<(), WatchFailure>>>,
}

impl Watches {
    /// Starts the watch thread for `root`; nothing is watched until the first [`rebuild`].
    ///
    /// [`rebuild`]: Watches::rebuild
    pub fn start(root: PathBuf, mut backend: impl WatchBackend) -> Watches {
        let (req, rx) = crossbeam_channel::bounded::<Sender<_>>(REBUILD_QUEUE);
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || {
                for reply in rx {
                    let _ = reply.send(backend.rewatch(&root));
                }
            })
            .expect("spawn the watch thread");
        Watches { req }
    }

    /// Asks for a rebuild; its outcome comes on the returned channel. `None` if the watch
    /// thread is gone.
    pub fn rebuild(&self) -> Option<Receiver<Result<(), WatchFailure>>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.req.send(tx).ok()?;
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_message_names_the_sysctl_its_value_and_the_directories() {
        let m = limit_message(
            Limit::Watches,
            (Some(8192), None),
            10_000,
            Duration::from_secs(10),
        );
        assert!(m.contains("fs.inotify.max_user_watches = 8192"), "{m}");
        assert!(m.contains("10000 directories"), "{m}");
        assert!(
            m.contains("sysctl -w fs.inotify.max_user_watches=20000"),
            "{m}"
        );
        assert!(m.contains("rescan every 10000 ms"), "{m}");
        assert!(!m.contains("user namespace"), "{m}");
        let m = limit_message(
            Limit::Watches,
            (Some(8192), Some(5)),
            12,
            Duration::from_secs(1),
        );
        assert!(
            m.contains("this user namespace allows 5 (/proc/sys/user/max_inotify_watches)"),
            "{m}"
        );
        assert!(m.contains("sysctl -w user.max_inotify_watches=24"), "{m}");
        let m = limit_message(
            Limit::Instances,
            (Some(128), None),
            3,
            Duration::from_secs(1),
        );
        assert!(m.contains("fs.inotify.max_user_instances = 128"), "{m}");
    }

    #[test]
    fn notify_errors_map_to_the_limits() {
        let enospc = notify::Error::io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let emfile = notify::Error::io(std::io::Error::from_raw_os_error(libc::EMFILE));
        let max = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        assert_eq!(failure(&enospc), WatchFailure::Limit(Limit::Watches));
        assert_eq!(failure(&max), WatchFailure::Limit(Limit::Watches));
        assert_eq!(failure(&emfile), WatchFailure::Limit(Limit::Instances));
        assert!(matches!(to_fs_event(Err(max)), FsEvent::WatchLimit));
        let other = notify::Error::generic("boom");
        assert!(matches!(to_fs_event(Err(other)), FsEvent::Rescan(_)));
    }
}
