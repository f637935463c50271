//! The hot side assembled: [`start`] runs the capture (the watch, or the FUSE mount) and the
//! scanner thread
//! ([`crate::replicated::capture`]) and the network task ([`crate::replicated::stream`]),
//! connected by bounded channels; the agent keeps the [`SenderHandle`] and talks to the
//! scanner through [`ScanMsg`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use tokio::sync::mpsc;

use crate::replicated::capture::fuse::{self, DurableConfig, FuseCapture, FuseError};
use crate::replicated::capture::watch::{NotifyBackend, Watches, EVENT_QUEUE};
use crate::replicated::capture::{ScanConfig, ScanControl, Scanner};
use crate::replicated::channel::Auth;
use crate::replicated::ops::Outgoing;
use crate::replicated::stream::{self, ScannerLink, StreamConfig};

pub use crate::replicated::ops::{ScanMsg, SenderEvent, VerifyReport};
pub use crate::replicated::stats::SenderStats;

/// Requests to the scanner (from the agent and the network task) waiting for it.
const SCAN_CONTROL_QUEUE: usize = 64;
/// Batches waiting for the network task.
const BATCH_QUEUE: usize = 8;
/// Events waiting for the agent.
const SENDER_EVENT_QUEUE: usize = 16;

/// What the sender needs to know.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The data directory.
    pub root: PathBuf,
    /// Replication unit.
    pub page_size: usize,
    /// The cold side's address.
    pub peer: SocketAddr,
    /// How to authenticate.
    pub auth: Auth,
    /// Our holder id, for the cold side's logs.
    pub node: String,
    /// Our epoch.
    pub epoch: u64,
    /// Changed-file rescan period.
    pub rescan: Duration,
    /// Full rehash period.
    pub deep_rescan: Duration,
    /// Unacknowledged page data allowed in flight.
    pub window_bytes: usize,
    /// `Some(mount point)`: capture with FUSE, serving `root` there; `None`: watch `root`.
    pub fuse_mount: Option<PathBuf>,
    /// With FUSE: durable acks (`None`: async).
    pub durable: Option<DurableConfig>,
}

/// Errors starting the sender.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum SenderError {
    /// {0}
    Fuse(#[from] FuseError),
}

impl SenderConfig {
    /// The scanner's part and the network task's part.
    fn split(
        self,
    ) -> (
        ScanConfig,
        StreamConfig,
        Option<PathBuf>,
        Option<DurableConfig>,
    ) {
        let scan = ScanConfig {
            root: self.root,
            page_size: self.page_size,
            rescan: self.rescan,
            deep_rescan: self.deep_rescan,
        };
        let stream = StreamConfig {
            peer: self.peer,
            auth: self.auth,
            node: self.node,
            epoch: self.epoch,
            page_size: self.page_size,
            window_bytes: self.window_bytes,
            durable: self.durable.clone(),
        };
        (scan, stream, self.fuse_mount, self.durable)
    }
}

/// A running sender: scanner thread, watcher and network task.
#[derive(Debug)]
pub struct SenderHandle {
    /// Requests to the scanner.
    pub ctl: ScanControl,
    /// Counters.
    pub stats: Arc<SenderStats>,
    /// Events for the agent.
    pub events: Receiver<SenderEvent>,
    stop: tokio::sync::watch::Sender<bool>,
    scanner: Option<std::thread::JoinHandle<()>>,
    fuse: Option<FuseCapture>,
}

impl SenderHandle {
    /// Stops the capture (a FUSE mount is unmounted: the node must be stopped already), the
    /// scanner and the network task, and waits for the scanner thread.
    pub fn stop(mut self) {
        // the watch set, if any, belongs to the scanner and goes with it
        if let Some(f) = self.fuse.take() {
            f.stop();
        }
        let _ = self.stop.send(true);
        let _ = self.ctl.send(ScanMsg::Stop);
        if let Some(t) = self.scanner.take() {
            let _ = t.join();
        }
    }
}

/// Starts capturing (watching, or serving the FUSE mount), scanning and sending, on `rt` for
/// the network part. A watch set is built before the scanner's first walk (and rebuilt after
/// lost events); a watch that cannot be set up is logged, and periodic rescans do its work.
/// Only a FUSE mount that cannot be served fails the start.
pub fn start(cfg: SenderConfig, rt: &tokio::runtime::Handle) -> Result<SenderHandle, SenderError> {
    let (scan_cfg, stream_cfg, fuse_mount, durable) = cfg.split();
    let stats = Arc::new(SenderStats::default());
    // async acks on the write path: nothing waits on a send, so small writes may gather
    let coalesce = durable.is_none();
    let (fs_tx, fs_rx) = crossbeam_channel::bounded(EVENT_QUEUE);
    let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(SCAN_CONTROL_QUEUE);
    let ctl_tx = ScanControl::new(ctl_tx, fs_tx.clone());
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(BATCH_QUEUE);
    let (ev_tx, ev_rx) = crossbeam_channel::bounded(SENDER_EVENT_QUEUE);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scanner = Scanner::new(&scan_cfg, out_tx);
    let (scanner, fuse) = match fuse_mount {
        None => {
            let watches = Watches::start(scan_cfg.root.clone(), NotifyBackend::new(fs_tx));
            let thread = scanner
                .with_watches(watches)
                .spawn(stats.clone(), fs_rx, ctl_rx);
            (thread, None)
        }
        Some(mp) => {
            // the write path's events are the changes themselves: never folded into a walk
            let scanner = scanner.with_exact_events(coalesce);
            let namespace = scanner.namespace_lock().unwrap_or_default();
            let (thread, inline) =
                scanner.spawn_sharing(stats.clone(), fs_rx, ctl_rx, Some(fs_tx.clone()));
            let durable = durable.map(|d| (d, stats.clone()));
            match fuse::mount(&scan_cfg.root, &mp, fs_tx, durable, (inline, namespace)) {
                Ok(f) => (thread, Some(f)),
                Err(e) => {
                    let _ = ctl_tx.send(ScanMsg::Stop);
                    let _ = thread.join();
                    return Err(e.into());
                }
            }
        }
    };
    let link = ScannerLink {
        out: out_rx,
        ctl: ctl_tx.clone(),
    };
    rt.spawn(stream::run_net(
        stream_cfg,
        link,
        stats.clone(),
        ev_tx,
        stop_rx,
    ));
    Ok(SenderHandle {
        ctl: ctl_tx,
        stats,
        events: ev_rx,
        stop: stop_tx,
        scanner: Some(scanner),
        fuse,
    })
}
