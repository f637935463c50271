//! Watching the data directory: `notify` (inotify) events, recursively, into a bounded
//! `crossbeam` channel. When the scanner falls behind, the channel fills, notify's thread
//! blocks, the kernel's inotify queue overflows, and the resulting `IN_Q_OVERFLOW` reaches the
//! scanner as a rescan request: back-pressure without unbounded memory, and nothing missed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::Sender;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// Events buffered between notify's thread and the scanner.
pub const EVENT_QUEUE: usize = 8192;

/// Errors starting the watch.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum WatchError {
    /// cannot watch {path:?}: {source}
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What the scanner hears from the watcher.
#[derive(Debug)]
pub enum FsEvent {
    /// A notify event (paths are absolute).
    Event(notify::Event),
    /// Events were lost (queue overflow, watcher error): rescan everything.
    Rescan(String),
    /// From the FUSE capture: `len` bytes at `offset` of the file at `path` (relative) were
    /// written, allocated or punched through `file`, the backing file the writer holds.
    Wrote {
        path: String,
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    /// From the FUSE capture: the entry at `path` (relative) was created or removed, or its
    /// attributes (length, mode, owner, times) changed.
    Changed(String),
    /// From the FUSE capture: `from` was renamed to `to` (relative paths).
    Renamed { from: String, to: String },
    /// From the FUSE capture, durable acks: answer once the cold side has acknowledged every
    /// op made from the events before this one (dropped unanswered if it cannot be).
    Sync(Sender<()>),
}

/// Starts a recursive watch of `root`; events go to `tx` until the returned watcher is dropped.
pub fn watch(root: &Path, tx: Sender<FsEvent>) -> Result<RecommendedWatcher, WatchError> {
    let err = |source| WatchError::Watch {
        path: root.to_owned(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let msg = match res {
            Ok(e) if e.need_rescan() => {
                FsEvent::Rescan("the kernel's event queue overflowed".into())
            }
            Ok(e) => FsEvent::Event(e),
            Err(e) => FsEvent::Rescan(format!("watch error: {e}")),
        };
        let _ = tx.send(msg);
    })
    .map_err(err)?;
    watcher.watch(root, RecursiveMode::Recursive).map_err(err)?;
    Ok(watcher)
}
