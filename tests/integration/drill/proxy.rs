//! A small delaying TCP proxy for the delay drill (this kernel has no netem): it listens in
//! one VM's namespace and relays each connection to the other VM's agent over the agents'
//! link, holding every chunk it reads for 50 ms +- 20 ms (uniform) when delay is on.
//!
//! What "reordering" can mean here: one TCP stream delivers bytes in order whatever the
//! packets did, so a chunk is never sent before the one read ahead of it; a short delay drawn
//! after a long one waits for it (head-of-line blocking, which is what a reordered packet
//! costs a TCP receiver). The two directions are delayed independently, so acknowledgements
//! and data are not held in step.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::drill::netns::enter;
use crate::drill::Rng;
use crate::pg::read_step;

/// The mean delay added to each chunk.
pub(crate) const DELAY_MS: u64 = 50;
/// The delay's spread either side of the mean (uniform).
pub(crate) const JITTER_MS: u64 = 20;
/// How long a blocking read or accept waits before looking at the flags.
const TICK: Duration = Duration::from_millis(20);
/// Chunks held per direction at most (each at most [`CHUNK_BYTES`]).
const QUEUE_CHUNKS: usize = 256;
/// The largest chunk read at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// A running proxy; stopped (with its connections) on drop.
pub(crate) struct DelayProxy {
    /// Where it listens (in its namespace).
    pub(crate) addr: SocketAddr,
    delay: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Listens on `listen` in the namespace at `ns` and relays to `target` from there.
    pub(crate) fn start(ns: &Path, listen: SocketAddr, target: SocketAddr, seed: u64) -> Self {
        let delay = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, ns): (_, _, PathBuf) = (delay.clone(), stop.clone(), ns.to_owned());
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            enter(&ns);
            let listener = TcpListener::bind(listen).expect("bind the delay proxy");
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let mut rng = Rng::new(seed);
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        if let Ok(server) = TcpStream::connect_timeout(&target, TICK * 50) {
                            relay(&client, &server, &d, &s, rng.next());
                            relay(&server, &client, &d, &s, rng.next());
                        }
                    }
                    Err(_) => thread::sleep(TICK),
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy listens");
        DelayProxy { addr, delay, stop }
    }

    /// Turns the delay on or off (off: chunks pass at once).
    pub(crate) fn set_delay(&self, on: bool) {
        self.delay.store(on, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Relays `from` to `to` on two threads (a reader stamping each chunk with its delivery time,
/// a writer sending it then), until either side closes or the proxy stops.
fn relay(
    from: &TcpStream,
    to: &TcpStream,
    delay: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
    seed: u64,
) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    let (delay, stop, stop_w) = (delay.clone(), stop.clone(), stop.clone());
    let (tx, rx) = crossbeam_channel::bounded::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    from.set_read_timeout(Some(TICK)).unwrap();
    thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut last = Instant::now();
        let mut buf = vec![0u8; CHUNK_BYTES];
        while !stop.load(Ordering::Relaxed) {
            match read_step(&mut from, &mut buf) {
                Some(0) => {}
                Some(n) => {
                    let held = if delay.load(Ordering::Relaxed) {
                        DELAY_MS - JITTER_MS + rng.below(2 * JITTER_MS + 1)
                    } else {
                        0
                    };
                    // in order: never before the chunk read ahead of it
                    last = last.max(Instant::now() + Duration::from_millis(held));
                    if tx.send((last, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
        let _ = from.shutdown(Shutdown::Both);
    });
    thread::spawn(move || {
        while !stop_w.load(Ordering::Relaxed) {
            match rx.recv_timeout(TICK) {
                Ok((at, chunk)) => {
                    thread::sleep(at.saturating_duration_since(Instant::now()));
                    if to.write_all(&chunk).is_err() {
                        break;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}
