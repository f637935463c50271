//! Issue 4: two real agent processes in replicated mode on loopback (PSK unless said), on temp
//! directories: initial sync, streaming, kill -9 of either side, a byte flipped in transit, an
//! unauthenticated peer, a stale-epoch hot, `../` paths, promote and demote.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use artemis_sync::replicated::channel::{self, Auth};
use artemis_sync::replicated::ops::Op;
use artemis_sync::replicated::wire::{Frame, FrameReader, FrameWriter, Psk};

use crate::util::{artemis_sync, main_cmd, spawn, toml_path, wait_bounded, write_script, Fixture};

pub(crate) const PSK_HEX: &str = "5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0ffee0001";

/// The port of a listener the test keeps (and hands to the agent that listens there).
pub(crate) fn port_of(listener: &TcpListener) -> u16 {
    listener.local_addr().unwrap().port()
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Dir(u32),
    File { mode: u32, len: u64, blake3: String },
}

/// Paths, kinds, modes, sizes and content digests below `root` (mtimes are not replicated).
pub(crate) fn content(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = rel.join(e.file_name());
            let Ok(m) = fs::symlink_metadata(root.join(&rel)) else {
                continue;
            };
            let key = rel.to_string_lossy().into_owned();
            if m.is_dir() {
                out.insert(key, Entry::Dir(m.mode() & 0o7777));
                stack.push(rel);
            } else if let Ok(data) = fs::read(root.join(&rel)) {
                out.insert(
                    key,
                    Entry::File {
                        mode: m.mode() & 0o7777,
                        len: m.len(),
                        blake3: blake3::hash(&data).to_hex().to_string(),
                    },
                );
            }
        }
    }
    out
}

pub(crate) struct Side {
    name: &'static str,
    pub(crate) config: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) port: u16,
    /// `listen` of the config (`ip:port`), where `listener` is bound.
    listen: String,
    /// Bound by the test on `port`, handed to every run of the agent as its fd 3.
    listener: TcpListener,
    /// Run the agent in this network namespace (`nsenter --net=<path>`), where `listener` was
    /// bound.
    pub(crate) netns: Option<PathBuf>,
    pub(crate) child: Option<Child>,
    runs: usize,
    /// Run the agent in a new user namespace whose `user.max_inotify_watches` is this.
    pub(crate) userns_watch_limit: Option<u32>,
}

pub(crate) struct Pair {
    pub(crate) fx: Fixture,
    pub(crate) hot: Side,
    pub(crate) cold: Side,
}

/// `[replication]` lines every test pair gets unless it asks for others.
pub(crate) const REPLICATION_EXTRA: &str = "rescan_interval_ms = 200";

impl Pair {
    /// `hot` streams to `cold`; `hot_peer` overrides where the hot connects (a proxy).
    /// `mode` is `psk`, `insecure` or `tls`.
    pub(crate) fn new(mode: &str, hot_peer: Option<u16>) -> Pair {
        Pair::new_in(mode, hot_peer, Fixture::new(), REPLICATION_EXTRA)
    }

    /// As [`Pair::new`], in `fx`, with `extra` as the `[replication]` section's last lines.
    /// The capture is the watch unless `extra` sets one: these tests write into `data_dir`
    /// directly, as a node does only under the watch capture (FUSE tests write through the
    /// mount, `fuse.rs`).
    pub(crate) fn new_in(mode: &str, hot_peer: Option<u16>, fx: Fixture, extra: &str) -> Pair {
        let watch = format!("capture = \"watch\"\n{extra}");
        let extra = if extra.contains("capture =") {
            extra
        } else {
            &watch
        };
        if mode == "tls" {
            artemis_sync(
                &fx.path("unused.toml"),
                [
                    "certs",
                    "init",
                    "--dir",
                    fx.path("certs").to_str().unwrap(),
                    "--hosts",
                    "hot,cold",
                ],
            )
            .code(0);
        }
        let (hot_listener, cold_listener) = (
            crate::listen::loopback_listener(),
            crate::listen::loopback_listener(),
        );
        let (hp, cp) = (port_of(&hot_listener), port_of(&cold_listener));
        let peers = [
            format!("127.0.0.1:{}", hot_peer.unwrap_or(cp)),
            format!("127.0.0.1:{hp}"),
        ];
        Pair::on(mode, fx, extra, [hot_listener, cold_listener], peers)
    }

    /// The pair with the listeners given (hot's, cold's: where each agent accepts) and where
    /// each connects to stream (`ip:port`, hot's, cold's).
    pub(crate) fn on(
        mode: &str,
        fx: Fixture,
        extra: &str,
        [hot_listener, cold_listener]: [TcpListener; 2],
        [hot_peer, cold_peer]: [String; 2],
    ) -> Pair {
        let psk = fx.path("psk");
        fs::write(&psk, PSK_HEX).unwrap();
        fs::set_permissions(&psk, fs::Permissions::from_mode(0o600)).unwrap();
        let mk = |name: &'static str, role: &str, listener: TcpListener, peer: &str| {
            let port = port_of(&listener);
            let listen = listener.local_addr().unwrap().to_string();
            let base = fx.mkdir(&format!("{name}/base"));
            let data = fx.path(&format!("{name}/data"));
            let certs = fx.path("certs");
            let auth = match mode {
                "insecure" => "insecure_loopback = true".to_owned(),
                "tls" => format!(
                    "tls_cert = {}\ntls_key = {}\ntls_ca = {}",
                    toml_path(&certs.join(format!("{name}.pem"))),
                    toml_path(&certs.join(format!("{name}.key"))),
                    toml_path(&certs.join("ca.pem"))
                ),
                _ => format!("psk_file = {}", toml_path(&psk)),
            };
            let text = format!(
                "[node]\nbase_dir = {}\n\n[storage]\nmode = \"replicated\"\n\n[replication]\nrole = \"{role}\"\ndata_dir = {}\n\
                 listen = \"{listen}\"\npeer = \"{peer}\"\n{auth}\nstate_file = {}\n{extra}\n\n\
                 [lock]\nmachine_name = \"{name}\"\n\n[agent]\ncontrol_socket = {}\n",
                toml_path(&base),
                toml_path(&data),
                toml_path(&fx.path(&format!("{name}/state.json"))),
                toml_path(&fx.path(&format!("{name}.sock"))),
            );
            let config = fx.path(&format!("{name}.toml"));
            fs::write(&config, text).unwrap();
            Side {
                name,
                config,
                data,
                port,
                listen,
                listener,
                netns: None,
                child: None,
                runs: 0,
                userns_watch_limit: None,
            }
        };
        let hot = mk("hot", "hot", hot_listener, &hot_peer);
        let cold = mk("cold", "cold", cold_listener, &cold_peer);
        fs::create_dir_all(&hot.data).unwrap();
        Pair { fx, hot, cold }
    }

    /// A drained hand-over from `from` to `to`: `demote` there, the goodbye seen here, then
    /// `promote` here, which says it is hot at `epoch`.
    pub(crate) fn hand_over(&mut self, from: &str, to: &str, epoch: u64) {
        artemis_sync(&self.side(from).config, ["demote"]).code(0);
        assert!(
            wait_until(Duration::from_secs(5), || self.status(to)["drained"]
                == true),
            "{}",
            self.logs()
        );
        artemis_sync(&self.side(to).config, ["promote"])
            .code(0)
            .stdout_has(&[&format!("hot at epoch {epoch}")]);
    }

    pub(crate) fn side(&mut self, name: &str) -> &mut Side {
        if name == "hot" {
            &mut self.hot
        } else {
            &mut self.cold
        }
    }

    pub(crate) fn start(&mut self, name: &str) {
        let fx_root = self.fx.root.clone();
        let s = self.side(name);
        s.runs += 1;
        let err = fs::File::create(fx_root.join(format!("{}.{}.err", s.name, s.runs))).unwrap();
        let base = match (s.userns_watch_limit, &s.netns) {
            (Some(n), _) => in_userns_with_watch_limit(&main_cmd(), n),
            (None, Some(ns)) => crate::drill::netns::in_netns(&main_cmd(), ns),
            (None, None) => main_cmd(),
        };
        let mut cmd = crate::listen::with_listener(&base, &s.listener);
        cmd.arg("-c")
            .arg(&s.config)
            .arg("agent")
            .env(
                "ARTEMIS_SYNC_LOG",
                std::env::var("IT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(err);
        s.child = Some(spawn(&mut cmd));
        // answering status means the listener and the control thread are up
        assert!(
            wait_until(Duration::from_secs(10), || self.status(name)["role"]
                .as_str()
                .is_some_and(|r| r != "down")),
            "{name} did not start\n{}",
            self.logs()
        );
        // it listens on the socket the test handed over, and says so
        let listen = if name == "hot" {
            &self.hot.listen
        } else {
            &self.cold.listen
        };
        assert_eq!(
            self.status(name)["listen"],
            listen.as_str(),
            "{}",
            self.logs()
        );
    }

    pub(crate) fn kill9(&mut self, name: &str) {
        let s = self.side(name);
        if let Some(mut c) = s.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn stop(&mut self, name: &str) {
        let s = self.side(name);
        if let Some(mut c) = s.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(
                    libc::pid_t::try_from(c.id()).expect("a child's pid came from a pid_t"),
                    libc::SIGTERM,
                )
            };
            assert!(
                wait_bounded(&mut c, Duration::from_secs(30)).is_some(),
                "{name} did not stop"
            );
        }
    }

    /// Sends `sig` (SIGSTOP, SIGCONT) to side `name`'s running agent; after SIGSTOP, returns
    /// once every thread of it has stopped. (The kernel wakes one thread for the signal, and
    /// that thread stops the others when it runs: on a busy host the others went on for a
    /// while, long enough to apply a batch the test sent after the signal.)
    pub(crate) fn signal(&self, name: &str, sig: libc::c_int) {
        let child = if name == "hot" {
            &self.hot.child
        } else {
            &self.cold.child
        };
        let pid = child.as_ref().expect("the agent runs").id();
        let pid = libc::pid_t::try_from(pid).expect("a child's pid came from a pid_t");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {name}");
        if sig == libc::SIGSTOP {
            assert!(
                wait_until(Duration::from_secs(10), || all_threads_stopped(pid)),
                "{name}'s threads did not all stop"
            );
        }
    }

    /// The config file of side `name`.
    pub(crate) fn config_of(&self, name: &str) -> &Path {
        if name == "hot" {
            &self.hot.config
        } else {
            &self.cold.config
        }
    }

    pub(crate) fn status(&self, name: &str) -> serde_json::Value {
        let out = artemis_sync(self.config_of(name), ["status", "--json"]);
        serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null)
    }

    pub(crate) fn logs(&self) -> String {
        let mut s = String::new();
        let mut names: Vec<_> = fs::read_dir(&self.fx.root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".err"))
            .collect();
        names.sort();
        for n in names {
            s.push_str(&format!(
                "--- {n} ---\n{}",
                fs::read_to_string(self.fx.root.join(&n)).unwrap_or_default()
            ));
        }
        s
    }

    #[track_caller]
    pub(crate) fn assert_converges(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        let ok = wait_until(limit, || {
            self.cold.data.exists() && content(&self.hot.data) == content(&self.cold.data)
        });
        if !ok {
            let (h, c) = (content(&self.hot.data), content(&self.cold.data));
            let diff: Vec<_> = h
                .keys()
                .chain(c.keys())
                .filter(|k| h.get(*k) != c.get(*k))
                .collect();
            panic!(
                "no convergence within {limit:?}; differing: {diff:?}\n{}",
                self.logs()
            );
        }
        started.elapsed()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for s in [&mut self.hot, &mut self.cold] {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `cmd` run by `unshare` in a new user namespace (root mapped to root) that lowers its own
/// `user.max_inotify_watches` to `limit` first: the global sysctls stay as they are.
fn in_userns_with_watch_limit(cmd: &std::process::Command, limit: u32) -> std::process::Command {
    let mut c = std::process::Command::new("unshare");
    c.args(["--user", "--map-root-user", "/bin/sh", "-c"])
        .arg(format!(
            "echo {limit} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""
        ))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

pub(crate) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A small Artemis-like tree: journal files, bindings, paging directories, odd modes.
pub(crate) fn seed_tree(root: &Path, journal_mib: usize) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    };
    for d in ["journal", "bindings", "paging/addr-1", "large-messages"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..journal_mib.div_ceil(2) {
        fs::write(
            root.join(format!("journal/activemq-data-{i}.amq")),
            rnd(2 << 20),
        )
        .unwrap();
    }
    fs::write(
        root.join("bindings/activemq-bindings-1.bindings"),
        rnd(100_000),
    )
    .unwrap();
    fs::write(root.join("paging/addr-1/000000001.page"), rnd(12_345)).unwrap();
    fs::write(root.join("paging/addr-1/address.txt"), b"addr-1").unwrap();
    fs::write(root.join("server.lock"), b"").unwrap();
    fs::set_permissions(root.join("bindings"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(root.join("server.lock"), fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn issue4_initial_sync_then_streaming_appends_rotation_and_page_files() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 8);
    // a stale cold copy: some files equal, one different, one extra
    fs::create_dir_all(p.cold.data.join("journal")).unwrap();
    fs::copy(
        p.hot.data.join("journal/activemq-data-0.amq"),
        p.cold.data.join("journal/activemq-data-0.amq"),
    )
    .unwrap();
    fs::write(p.cold.data.join("journal/stale-extra.amq"), b"old").unwrap();
    p.start("cold");
    p.start("hot");
    let took = p.assert_converges(Duration::from_secs(30));
    eprintln!("initial sync of 8 MiB converged in {took:?}");
    assert!(!p.cold.data.join("journal/stale-extra.amq").exists());

    // Artemis-like streaming: preallocated file, appended records with fdatasync, rotation
    let j = p.hot.data.join("journal");
    let tmp = j.join("activemq-data-9.amq.tmp");
    fs::write(&tmp, vec![0u8; 10 << 20]).unwrap();
    fs::rename(&tmp, j.join("activemq-data-9.amq")).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(j.join("activemq-data-9.amq"))
        .unwrap();
    for i in 0..300u64 {
        let rec = vec![(i % 251) as u8 + 1; 4096];
        f.write_all_at(&rec, i * 4096).unwrap();
        f.sync_data().unwrap();
    }
    fs::create_dir_all(p.hot.data.join("paging/addr-2")).unwrap();
    fs::write(
        p.hot.data.join("paging/addr-2/000000001.page"),
        vec![3u8; 5000],
    )
    .unwrap();
    fs::remove_file(p.hot.data.join("paging/addr-1/000000001.page")).unwrap();
    fs::remove_dir_all(p.hot.data.join("large-messages")).unwrap();
    let took = p.assert_converges(Duration::from_secs(20));
    eprintln!("streaming converged {took:?} after the last write");
    // the rotation was sent as a rename, not as a second copy of the file
    let s = p.status("hot");
    let data_bytes = s["data_bytes"].as_u64().unwrap();
    assert!(
        data_bytes < 8 * 1048576 + 300 * 4096 + 2 * 1048576,
        "sent {data_bytes} bytes: the zero-filled file was copied?"
    );

    let out = artemis_sync(&p.hot.config, ["verify", "--json"]);
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["identical"], true, "{v}");
    assert!(v["files"].as_u64().unwrap() >= 8);
}

#[test]
fn issue4_verify_names_a_file_changed_behind_the_streams_back() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 2);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    // damage the cold copy directly (disk corruption, an operator's mistake)
    let victim = p.cold.data.join("bindings/activemq-bindings-1.bindings");
    let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    f.write_all_at(b"X", 10).unwrap();
    let out = artemis_sync(&p.hot.config, ["verify"]);
    out.code(4)
        .stdout_has(&["differs: bindings/activemq-bindings-1.bindings"]);
}

#[test]
fn issue4_kill9_of_either_side_converges_without_a_full_copy() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 16);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    let tree = 16u64 << 20;

    // cold dies, the hot keeps writing, the cold comes back
    p.kill9("cold");
    fs::write(
        p.hot.data.join("journal/activemq-data-0.amq"),
        vec![9u8; 2 << 20],
    )
    .unwrap();
    fs::write(
        p.hot.data.join("paging/addr-1/000000002.page"),
        vec![4u8; 4096],
    )
    .unwrap();
    let before = p.status("hot")["data_bytes"].as_u64().unwrap();
    p.start("cold");
    p.assert_converges(Duration::from_secs(30));
    let sent = p.status("hot")["data_bytes"].as_u64().unwrap() - before;
    eprintln!("cold restart: {sent} bytes of pages re-sent for a {tree}-byte tree");
    assert!(sent < tree / 4, "re-sent {sent} bytes");

    // hot dies, changes happen while it is down, it comes back
    p.kill9("hot");
    fs::write(
        p.hot.data.join("bindings/activemq-bindings-1.bindings"),
        vec![5u8; 100_000],
    )
    .unwrap();
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    let sent = p.status("hot")["data_bytes"].as_u64().unwrap();
    eprintln!("hot restart: {sent} bytes of pages sent");
    assert!(sent < tree / 4, "sent {sent} bytes after the hot restarted");
}

/// Where the flipping proxy flips a bit of the first connection's hot-to-cold direction.
#[derive(Clone, Copy)]
enum Flip {
    /// At this byte of the stream.
    At(usize),
    /// In the header of the first batch frame (its sequence number), the stream's frames
    /// read as they pass (`len | body | 16-byte MAC` after the PSK handshake's two frames).
    BatchHeader,
    /// As [`Flip::BatchHeader`], and again in the next frame of the same batch: its resend.
    BatchAndItsResend,
}

/// Bytes of the PSK handshake frames the hot side sends before its frames carry a MAC
/// (`Hello`: length, type, version, nonce; `Proof`: length, type, proof).
const PSK_HANDSHAKE_BYTES: usize = (4 + 1 + 2 + 32) + (4 + 1 + 32);
/// The batch frame type, and where its sequence number starts in its body (after the type
/// and the header length).
const BATCH_TYPE: u8 = 10;
const BATCH_SEQ_AT: usize = 1 + 4;

/// Flips `flip` in `buf`, the bytes from `seen` on of the stream, if it falls there; true
/// once every flip is made. `frame_at` is where the next whole frame starts, `first` the
/// sequence number of the batch flipped first (for the batch flips).
fn flip_in(
    flip: Flip,
    buf: &mut [u8],
    seen: usize,
    frame_at: &mut usize,
    first: &mut Option<u64>,
) -> bool {
    match flip {
        Flip::At(at) => {
            let hit = (seen..seen + buf.len()).contains(&at);
            if hit {
                buf[at - seen] ^= 0x10;
            }
            hit
        }
        Flip::BatchHeader | Flip::BatchAndItsResend => {
            // the caller hands over whole frames from `frame_at` on
            while *frame_at + 4 <= seen + buf.len() {
                let i = *frame_at - seen;
                let len = u32::from_le_bytes(buf[i..i + 4].try_into().unwrap()) as usize;
                *frame_at += 4 + len + 16;
                if buf[i + 4] != BATCH_TYPE {
                    continue;
                }
                let at = i + 4 + BATCH_SEQ_AT;
                let seq = u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
                match (flip, *first) {
                    (Flip::BatchAndItsResend, None) => *first = Some(seq),
                    (Flip::BatchAndItsResend, Some(s)) if s != seq => continue,
                    _ => {
                        buf[at] ^= 0x10;
                        return true;
                    }
                }
                buf[at] ^= 0x10;
            }
            false
        }
    }
}

/// Forwards what `listener` accepts to `target`, flipping one bit (`flip`) of the first
/// connection's hot-to-cold direction.
fn flipping_proxy(listener: TcpListener, target: u16, flip: Flip) -> Arc<AtomicBool> {
    let flipped = Arc::new(AtomicBool::new(false));
    let f2 = flipped.clone();
    thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(client) = conn else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let f3 = f2.clone();
            thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let mut buf = vec![0u8; 65536];
                // bytes read but not forwarded: whole frames go on, for BatchHeader
                let mut held: Vec<u8> = Vec::new();
                let (mut seen, mut frame_at) = (0usize, PSK_HANDSHAKE_BYTES);
                let mut first = None;
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    held.extend_from_slice(&buf[..n]);
                    let ready = if f3.load(Ordering::SeqCst) {
                        held.len()
                    } else {
                        whole_frames(flip, &held, seen, frame_at)
                    };
                    if !f3.load(Ordering::SeqCst)
                        && flip_in(flip, &mut held[..ready], seen, &mut frame_at, &mut first)
                    {
                        f3.store(true, Ordering::SeqCst);
                    }
                    if server.write_all(&held[..ready]).is_err() {
                        break;
                    }
                    held.drain(..ready);
                    seen += ready;
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
            thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    flipped
}

/// How many of `held` (the stream from `seen` on) may go on: all of it, or for
/// [`Flip::BatchHeader`] up to the end of the last whole frame (the handshake's bytes as
/// they come).
fn whole_frames(flip: Flip, held: &[u8], seen: usize, frame_at: usize) -> usize {
    if matches!(flip, Flip::At(_)) || seen + held.len() <= frame_at {
        return held.len();
    }
    let mut at = frame_at.max(seen) - seen;
    while at + 4 <= held.len() {
        let len = u32::from_le_bytes(held[at..at + 4].try_into().unwrap()) as usize;
        if at + 4 + len + 16 > held.len() {
            break;
        }
        at += 4 + len + 16;
    }
    at
}

fn corrupted_frame_is_rejected_and_resent(mode: &str, flip: Flip, expect_in_log: &str) {
    // the hot connects to the proxy, which forwards to the cold
    let proxy = crate::listen::loopback_listener();
    let mut p = Pair::new(mode, Some(port_of(&proxy)));
    let flipped = flipping_proxy(proxy, p.cold.port, flip);
    seed_tree(&p.hot.data, 4);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    assert!(flipped.load(Ordering::SeqCst), "the proxy flipped nothing");
    let logs = p.logs();
    assert!(
        logs.contains(expect_in_log),
        "the cold side did not report the bad frame:\n{logs}"
    );
    // a frame that fails its MAC is resent from the window; a batch that fails its page
    // checks makes the cold side answer Nack and the hot side resync from its index
    assert!(
        logs.contains("resending from it") || logs.contains("the hot side resyncs from our index"),
        "the hot side did not resend:\n{logs}"
    );
    // damage in transit is counted as such, never as a failing cold disk
    let cold = p.status("cold");
    if expect_in_log.contains("blake3") {
        assert!(cold["checksum_failures"].as_u64() > Some(0), "{cold}");
    }
    assert!(cold.get("apply_error").is_none(), "{cold}");
    assert_eq!(cold["apply_failures"].as_u64(), Some(0), "{cold}");
}

#[test]
fn issue4_a_byte_flipped_in_transit_fails_the_mac_and_is_resent() {
    corrupted_frame_is_rejected_and_resent(
        "psk",
        Flip::BatchHeader,
        "failed its authentication code",
    );
}

/// A batch damaged again when it is resent: the cold side, whose request for it is out,
/// ends the stream (it once waited for an answer that could not come, skipping every later
/// batch unanswered while heartbeats kept the stream open), and the hot side resyncs.
#[test]
fn issue4_a_batch_damaged_again_when_resent_ends_the_stream_and_converges() {
    corrupted_frame_is_rejected_and_resent(
        "psk",
        Flip::BatchAndItsResend,
        "was asked for again; ending the stream",
    );
}

/// Issue 15: a batch's page data is outside the PSK MAC (its page hashes are inside): a page
/// altered in transit fails its blake3 on the cold side, and is refused and resent.
#[test]
fn issue15_with_psk_a_flipped_page_fails_its_blake3_and_is_resent() {
    corrupted_frame_is_rejected_and_resent("psk", Flip::At(300_000), "failed its blake3 check");
}

#[test]
fn issue4_without_psk_a_flipped_page_fails_its_blake3_and_is_resent() {
    corrupted_frame_is_rejected_and_resent(
        "insecure",
        Flip::At(300_000),
        "failed its blake3 check",
    );
}

/// Connects to the cold side with `auth` and, if authenticated, introduces itself as a hot
/// side at `epoch`; returns the first answer.
pub(crate) type RawConn = (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
);

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn raw_client(
    rt: &tokio::runtime::Runtime,
    port: u16,
    auth: Auth,
    epoch: u64,
) -> Result<(Frame, RawConn), String> {
    // each batch answered at once, as the tests reading answers expect
    raw_client_acking(rt, port, auth, epoch, 1)
}

/// [`raw_client`], asking for an acknowledgement every `ack_every` batches.
pub(crate) fn raw_client_acking(
    rt: &tokio::runtime::Runtime,
    port: u16,
    auth: Auth,
    epoch: u64,
    ack_every: u16,
) -> Result<(Frame, RawConn), String> {
    rt.block_on(async move {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (r, w) = s.into_split();
        let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
        channel::connect(&auth, &mut r, &mut w)
            .await
            .map_err(|e| e.to_string())?;
        w.send(&Frame::Intro {
            epoch,
            hot: true,
            node: "intruder".into(),
            page_size: 4096,
            ack_every,
        })
        .await
        .map_err(|e| e.to_string())?;
        w.flush().await.map_err(|e| e.to_string())?;
        let f = r.recv().await.map_err(|e| e.to_string())?;
        Ok((f, (r, w)))
    })
}

#[test]
fn issue4_an_unauthenticated_peer_is_refused_before_any_file_is_read() {
    let mut p = Pair::new("psk", None);
    fs::create_dir_all(&p.cold.data).unwrap();
    fs::write(p.cold.data.join("secret.amq"), b"journal").unwrap();
    p.start("cold");
    let rt = rt();
    let wrong = Psk::from_hex(&"ab".repeat(32)).unwrap();
    let err = raw_client(&rt, p.cold.port, Auth::Psk(wrong), 99)
        .map(|(f, _)| f)
        .unwrap_err();
    assert!(!err.contains("Connection refused"), "{err}: {}", p.logs());
    assert!(err.contains("could not prove"), "{err}");
    let err = raw_client(&rt, p.cold.port, Auth::Insecure, 99).map(|(f, _)| f);
    assert!(err.is_err(), "a peer without the key got {err:?}");
    assert!(
        wait_until(Duration::from_secs(5), || p
            .logs()
            .matches("refused a replication peer")
            .count()
            >= 2),
        "{}",
        p.logs()
    );
    assert_eq!(
        fs::read(p.cold.data.join("secret.amq")).unwrap(),
        b"journal"
    );
    assert_eq!(p.status("cold")["epoch"], 0, "nothing was admitted");
}

#[test]
fn issue4_paths_escaping_the_data_directory_are_refused() {
    let mut p = Pair::new("psk", None);
    p.start("cold");
    let rt = rt();
    for path in [
        "../escape",
        "/tmp/escape-abs",
        "journal/../../escape",
        "a/./b",
    ] {
        let psk = Psk::from_hex(PSK_HEX).unwrap();
        let (first, (mut r, mut w)) = raw_client(&rt, p.cold.port, Auth::Psk(psk), 1).unwrap();
        assert!(matches!(first, Frame::Welcome { .. }), "{first:?}");
        let answer = rt.block_on(async {
            while !matches!(r.recv().await.unwrap(), Frame::IndexEnd) {}
            w.send(&Frame::Batch {
                seq: 1,
                ops: vec![Op::SetFile {
                    path: path.into(),
                    len: 1,
                    mode: 0o644,
                }],
            })
            .await
            .unwrap();
            w.flush().await.unwrap();
            r.recv().await.unwrap()
        });
        assert!(
            matches!(&answer, Frame::Nack { seq: 1, reason } if reason.contains("refusing path")),
            "{path}: {answer:?}"
        );
    }
    assert!(
        !p.fx.path("cold/escape").exists()
            && !Path::new("/tmp/escape-abs").exists()
            && !p.fx.path("escape").exists()
    );
    assert!(
        p.logs().contains("refusing path \"../escape\""),
        "{}",
        p.logs()
    );
}

/// A drained goodbye is what lets `promote` go without `--force`: it says every batch the hot
/// side sent is applied. The cold side took any marker at its word, one naming a batch it never
/// applied (or sent ahead of a batch still unanswered) included. Now only a marker naming the
/// last batch applied on the stream, with none in hand, counts.
#[test]
fn issue10_a_drained_marker_that_does_not_match_the_last_applied_batch_is_not_a_hand_over() {
    let mut p = Pair::new("psk", None);
    p.start("cold");
    let rt = rt();
    let psk = Psk::from_hex(PSK_HEX).unwrap();
    let (first, (mut r, mut w)) = raw_client(&rt, p.cold.port, Auth::Psk(psk), 1).unwrap();
    assert!(matches!(first, Frame::Welcome { .. }), "{first:?}");
    let batch = |seq: u64| Frame::Batch {
        seq,
        ops: vec![Op::SetFile {
            path: format!("f{seq}"),
            len: 4096,
            mode: 0o644,
        }],
    };
    rt.block_on(async {
        while !matches!(r.recv().await.unwrap(), Frame::IndexEnd) {}
        // a marker sent behind batch 1 but naming none; then one naming a batch never sent;
        // batch 2's answer comes after both were read
        w.send(&batch(1)).await.unwrap();
        w.send(&Frame::Drained { seq: 0 }).await.unwrap();
        w.send(&Frame::Drained { seq: 7 }).await.unwrap();
        w.send(&batch(2)).await.unwrap();
        w.flush().await.unwrap();
        let mut acked = 0;
        while acked < 2 {
            match r.recv().await.unwrap() {
                Frame::Ack { seq } => acked = seq,
                Frame::Heartbeat(_) => {}
                other => panic!("{other:?}"),
            }
        }
    });
    assert_eq!(p.status("cold")["drained"], false, "{}", p.logs());
    assert!(
        p.logs()
            .contains("says it drained its stream at batch 7, but batch 1 is the last applied"),
        "{}",
        p.logs()
    );
    // the marker a hot side sends once batch 2 is acknowledged is a hand-over
    rt.block_on(async {
        w.send(&Frame::Drained { seq: 2 }).await.unwrap();
        w.flush().await.unwrap();
    });
    assert!(
        wait_until(Duration::from_secs(5), || p.status("cold")["drained"]
            == true),
        "{}",
        p.logs()
    );
    drop((r, w));
}

/// With async acks the hot side asks for an acknowledgement every few batches (one per batch
/// was half of its network thread's wake-ups under a steady stream of small writes): the cold
/// side answers the first batch at once, then every fourth applied, and the last few once
/// `ACK_HOLD` has passed with nothing after them. A hot side asking for each (durable acks)
/// gets each answered.
#[test]
fn issue12_the_cold_side_acknowledges_every_few_batches_when_asked_and_the_rest_soon_after() {
    const BATCHES: u64 = 41;
    let mut p = Pair::new("psk", None);
    p.start("cold");
    let rt = rt();
    for ack_every in [4u16, 1] {
        let psk = Psk::from_hex(PSK_HEX).unwrap();
        let (first, (mut r, mut w)) =
            raw_client_acking(&rt, p.cold.port, Auth::Psk(psk), 1, ack_every).unwrap();
        assert!(matches!(first, Frame::Welcome { .. }), "{first:?}");
        let acks = rt.block_on(async {
            while !matches!(r.recv().await.unwrap(), Frame::IndexEnd) {}
            for seq in 1..=BATCHES {
                let path = format!("every-{ack_every}-{seq}");
                let ops = vec![Op::SetFile {
                    path,
                    len: 10,
                    mode: 0o644,
                }];
                w.send(&Frame::Batch { seq, ops }).await.unwrap();
            }
            w.flush().await.unwrap();
            let mut acks = Vec::new();
            while acks.last() != Some(&BATCHES) {
                let frame = tokio::time::timeout(Duration::from_secs(5), r.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no acknowledgement of {BATCHES} after {acks:?}"))
                    .unwrap();
                match frame {
                    Frame::Ack { seq } => acks.push(seq),
                    Frame::Heartbeat(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            acks
        });
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
        if ack_every == 1 {
            assert_eq!(acks, (1..=BATCHES).collect::<Vec<_>>());
        } else {
            // the first at once (nothing came before it), then at most every fourth: more
            // often only when applying them took longer than the hold (a slow disk)
            assert_eq!(acks[0], 1, "{acks:?}");
            assert!(acks.windows(2).all(|w| w[1] - w[0] <= 4), "{acks:?}");
            assert!(acks.len() < 30, "{acks:?}");
        }
        drop((r, w));
    }
    for seq in 1..=BATCHES {
        assert_eq!(
            fs::metadata(p.cold.data.join(format!("every-4-{seq}")))
                .unwrap()
                .len(),
            10
        );
    }
}

#[test]
fn issue4_promote_demote_and_a_stale_epoch_hot_that_is_turned_cold_and_resynced() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 2);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));

    // promote refuses while the hot streams
    artemis_sync(&p.cold.config, ["promote"])
        .code(1)
        .stderr_has(&["connected and streaming", "demote it first"]);

    // a clean hand-over: demote drains, promote reports it
    artemis_sync(&p.hot.config, ["demote"])
        .code(0)
        .stdout_has(&["demoted: cold at epoch 1", "has everything"]);
    assert!(wait_until(Duration::from_secs(5), || p.status("cold")
        ["drained"]
        == true));
    artemis_sync(&p.cold.config, ["promote"])
        .code(0)
        .stdout_has(&["hot at epoch 2", "drained its stream"]);
    assert_eq!(p.status("cold")["role"], "hot");
    assert_eq!(
        fs::read_link(p.fx.path("cold/base/artemis")).unwrap(),
        p.cold.data.canonicalize().unwrap()
    );
    // the new hot streams to the old one
    fs::write(
        p.cold.data.join("journal/after-promotion.amq"),
        vec![1u8; 8192],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || content(&p.cold.data)
            == content(&p.hot.data)),
        "{}",
        p.logs()
    );

    // now the old hot (still epoch 1 on disk as cold) is killed, made to think it is hot again,
    // and given a divergent write: it must be refused, turned cold, and overwritten
    p.kill9("hot");
    fs::write(
        p.fx.path("hot/state.json"),
        "{\"epoch\": 1, \"role\": \"hot\"}",
    )
    .unwrap();
    fs::write(p.hot.data.join("journal/divergent.amq"), vec![7u8; 4096]).unwrap();
    p.start("hot");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["role"]
            == "cold"),
        "{}",
        p.logs()
    );
    assert!(
        wait_until(Duration::from_secs(20), || content(&p.cold.data)
            == content(&p.hot.data)),
        "{}",
        p.logs()
    );
    assert!(
        !p.cold.data.join("journal/divergent.amq").exists(),
        "the stale hot pushed its pages"
    );
    assert!(
        !p.hot.data.join("journal/divergent.amq").exists(),
        "the stale copy was not resynced"
    );
    assert_eq!(p.status("hot")["epoch"], 2);
    let logs = p.logs();
    assert!(
        logs.contains("stale epoch 1") || logs.contains("FENCING"),
        "{logs}"
    );
}

/// Forwards each connection accepted on `listener` to `127.0.0.1:target` while the returned
/// flag is clear; while it is set it drops every new connection at once (those forwarded
/// before go on).
pub(crate) fn cuttable_proxy(listener: TcpListener, target: u16) -> Arc<AtomicBool> {
    let cut = Arc::new(AtomicBool::new(false));
    let is_cut = cut.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(inbound) = conn else { continue };
            if is_cut.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    cut
}

#[test]
fn issue10_a_drained_hand_over_lets_one_promotion_through_not_a_later_one() {
    // "hot" reaches "cold" through a proxy the test can cut; "cold" reaches "hot" directly
    let proxy = crate::listen::loopback_listener();
    let mut p = Pair::new("psk", Some(port_of(&proxy)));
    let cut = cuttable_proxy(proxy, p.cold.port);
    seed_tree(&p.hot.data, 1);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    // hot -> cold -> hot: each hand-over drained
    p.hand_over("hot", "cold", 2);
    assert!(
        wait_until(Duration::from_secs(30), || p.status("cold")["synced"]
            == true),
        "{}",
        p.logs()
    );
    artemis_sync(&p.cold.config, ["demote"]).code(0);
    assert!(wait_until(Duration::from_secs(5), || p.status("hot")
        ["drained"]
        == true));
    // "hot" becomes hot again, but its stream never reaches "cold"
    cut.store(true, Ordering::SeqCst);
    artemis_sync(&p.hot.config, ["promote"])
        .code(0)
        .stdout_has(&["hot at epoch 3"]);
    // "cold" has heard nothing from the new hot: the drained marker it got before its own
    // promotion was used by that promotion, and must not let it become hot a second time
    assert_eq!(p.status("cold")["drained"], false, "{}", p.status("cold"));
    artemis_sync(&p.cold.config, ["promote"])
        .code(1)
        .stderr_has(&["has not handed over"]);
    assert_eq!(p.status("cold")["role"], "cold");
}

/// A pair (PSK, watch capture) in which each side reaches the other through a proxy the test
/// can cut: set `hot_to_cold` and the hot side's connections to the cold one fail, and those
/// open end; `cold_to_hot` likewise.
pub(crate) fn cuttable_pair() -> (Pair, Arc<AtomicBool>, Arc<AtomicBool>) {
    let (to_cold, to_hot) = (
        crate::listen::loopback_listener(),
        crate::listen::loopback_listener(),
    );
    let (hot_listener, cold_listener) = (
        crate::listen::loopback_listener(),
        crate::listen::loopback_listener(),
    );
    let peers = [
        format!("127.0.0.1:{}", port_of(&to_cold)),
        format!("127.0.0.1:{}", port_of(&to_hot)),
    ];
    let (cold_port, hot_port) = (port_of(&cold_listener), port_of(&hot_listener));
    let p = Pair::on(
        "psk",
        Fixture::new(),
        &format!("capture = \"watch\"\n{REPLICATION_EXTRA}"),
        [hot_listener, cold_listener],
        peers,
    );
    let hot_to_cold = cuttable_proxy(to_cold, cold_port);
    let cold_to_hot = cuttable_proxy(to_hot, hot_port);
    (p, hot_to_cold, cold_to_hot)
}

#[test]
fn issue10_a_forced_promotion_cuts_the_old_stream_so_its_drained_goodbye_cannot_count() {
    let (mut p, _hot_to_cold, cold_to_hot) = cuttable_pair();
    seed_tree(&p.hot.data, 1);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    // the new hot cannot reach the old one; the old one, idle, still streams heartbeats to it
    cold_to_hot.store(true, Ordering::SeqCst);
    artemis_sync(&p.cold.config, ["promote", "--force"])
        .code(0)
        .stdout_has(&["hot at epoch 2"]);
    // the old stream is no longer admitted: it is cut, the old hot reconnects, is refused at
    // epoch 2 and turns cold, instead of running its node until its next write
    assert!(
        wait_until(Duration::from_secs(10), || p.status("hot")["role"]
            == "cold"),
        "the old hot kept running beside the forced promotion: {}\n{}",
        p.status("hot"),
        p.logs()
    );
    assert_eq!(p.status("hot")["epoch"], 2);
    // so no drained goodbye of that stream can reach the new hot and, once it is cold again,
    // let a plain promotion through
    artemis_sync(&p.cold.config, ["demote", "--force"]).code(0);
    assert_eq!(p.status("cold")["drained"], false, "{}", p.status("cold"));
    artemis_sync(&p.cold.config, ["promote"])
        .code(1)
        .stderr_has(&["has not handed over"]);
}

#[test]
fn issue4_mutual_tls_streams_and_refuses_a_certificate_from_another_ca() {
    let mut p = Pair::new("tls", None);
    seed_tree(&p.hot.data, 4);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    artemis_sync(&p.hot.config, ["verify"])
        .code(0)
        .stdout_has(&["identical"]);

    // a host with a certificate from another pair's CA cannot connect
    let other = p.fx.path("other-certs");
    artemis_sync(
        &p.hot.config,
        [
            "certs",
            "init",
            "--dir",
            other.to_str().unwrap(),
            "--hosts",
            "intruder",
        ],
    )
    .code(0);
    let text = fs::read_to_string(&p.hot.config)
        .unwrap()
        .replace(
            &*p.fx.path("certs/hot.pem").to_string_lossy(),
            &other.join("intruder.pem").to_string_lossy(),
        )
        .replace(
            &*p.fx.path("certs/hot.key").to_string_lossy(),
            &other.join("intruder.key").to_string_lossy(),
        );
    fs::write(&p.hot.config, text).unwrap();
    p.kill9("hot");
    fs::write(p.hot.data.join("journal/after.amq"), vec![1u8; 4096]).unwrap();
    p.start("hot");
    assert!(
        wait_until(Duration::from_secs(10), || p
            .logs()
            .contains("refused a replication peer")),
        "{}",
        p.logs()
    );
    thread::sleep(Duration::from_millis(500));
    assert!(
        !p.cold.data.join("journal/after.amq").exists(),
        "an intruder's stream was applied"
    );
    // certs init never overwrites
    artemis_sync(
        &p.hot.config,
        [
            "certs",
            "init",
            "--dir",
            other.to_str().unwrap(),
            "--hosts",
            "intruder",
        ],
    )
    .code(1)
    .stderr_has(&["already exists"]);
}

/// The pages the cold side's last index read and those its page memo vouched for, from its
/// log line.
fn last_index_reads(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("the page memo vouched for"))?;
    let field = |name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((field("pages_read")?, field("pages_vouched")?))
}

#[test]
fn issue15_a_cold_restart_indexes_from_its_page_memo_and_reads_only_what_changed_behind_it() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 8);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    // a clean stop leaves the memo beside the state file
    p.stop("cold");
    let memo = p.fx.path("cold/state.json.pages");
    assert!(memo.exists(), "no {}\n{}", memo.display(), p.logs());
    // while the cold agent is away: a page of its copy changed behind its back (same length),
    // and a page of the hot tree changed
    let damaged = p.cold.data.join("journal/activemq-data-1.amq");
    let f = fs::OpenOptions::new().write(true).open(&damaged).unwrap();
    f.write_all_at(&[0x5a; 4096], 40 * 4096).unwrap();
    drop(f);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p.hot.data.join("journal/activemq-data-2.amq"))
        .unwrap();
    f.write_all_at(&[0xa5; 4096], 7 * 4096).unwrap();
    drop(f);
    p.start("cold");
    p.assert_converges(Duration::from_secs(30));
    let cold_log = fs::read_to_string(p.fx.root.join("cold.2.err")).unwrap();
    let (read, vouched) =
        last_index_reads(&cold_log).unwrap_or_else(|| panic!("no index line\n{}", p.logs()));
    // the damaged file (2 MiB, 512 pages) is read, and the files too small for the memo (the
    // page file and address.txt: 4 + 1 pages); everything else the memo vouched for
    assert_eq!(read, 512 + 4 + 1, "{}", p.logs());
    assert!(vouched > 1000, "vouched for {vouched}\n{}", p.logs());
    artemis_sync(&p.hot.config, ["verify"])
        .code(0)
        .stdout_has(&["identical"]);
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: libc::pid_t) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // the state follows the command name, which is in parentheses
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

/// A "cold side" on `listener` that completes the PSK handshake with the next connection and
/// reads its introduction; returns the connection, kept open.
pub(crate) async fn fake_cold_admits(
    listener: &tokio::net::TcpListener,
    limit: Duration,
) -> Option<RawConn> {
    let (s, _) = tokio::time::timeout(limit, listener.accept())
        .await
        .ok()?
        .unwrap();
    let (r, w) = s.into_split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    let psk = Psk::from_hex(PSK_HEX).unwrap();
    channel::accept(&Auth::Psk(psk), &mut r, &mut w)
        .await
        .unwrap();
    let intro = r.recv().await.unwrap();
    assert!(matches!(intro, Frame::Intro { hot: true, .. }), "{intro:?}");
    Some((r, w))
}

/// Regression: the hot side waited for the cold side's answer to its introduction with no
/// time limit. A cold agent stopped (or its VM gone) right after the handshake left the hot
/// side waiting for ever: no reconnection, and the stream never came back. It now gives up
/// after the cold side's own admission limit and connects again.
#[test]
fn a_hot_side_whose_introduction_is_never_answered_connects_again() {
    let fake = crate::listen::loopback_listener();
    let mut p = Pair::new("psk", Some(port_of(&fake)));
    p.start("hot");
    let rt = rt();
    rt.block_on(async {
        fake.set_nonblocking(true).unwrap();
        let fake = tokio::net::TcpListener::from_std(fake).unwrap();
        let silent = fake_cold_admits(&fake, Duration::from_secs(10)).await;
        assert!(
            silent.is_some(),
            "the hot side never connected\n{}",
            p.logs()
        );
        // no welcome, no refusal, the connection kept open: a stopped cold agent
        let again = fake_cold_admits(&fake, Duration::from_secs(15)).await;
        assert!(
            again.is_some(),
            "the hot side still waits for an answer to its introduction\n{}",
            p.logs()
        );
        drop(silent);
    });
}

/// Regression: the hot side reads the cold side's index with no time limit, as it must (an
/// index of a large tree, or one held back while the cold disk fails, is long and silent), and
/// sends nothing meanwhile. A cold host that vanished then (powered off, rebooted, cut off)
/// was never noticed: no data of ours was in flight for TCP to time out, and a rebooted host
/// had nothing to answer with a reset, so the hot side waited for ever and the stream never
/// came back. The connection now has TCP keepalives: a peer host that stops answering them is
/// given up within seconds, and the hot side connects again.
#[test]
fn a_cold_host_lost_while_the_hot_side_waits_for_its_index_is_given_up() {
    let test = "a_cold_host_lost_while_the_hot_side_waits_for_its_index_is_given_up";
    if !crate::util::require_root(test, "network namespaces and nftables") {
        return;
    }
    use crate::drill::netns::{listener_in, run_in, Topology};
    let topo = Topology::new();
    let (a_ns, b_ns) = (topo.a.path(), topo.b.path());
    let hot_listener = listener_in(&a_ns, topo.a.repl_addr());
    let fake = listener_in(&b_ns, topo.b.repl_addr());
    // the pair's cold side is never started: the test plays it on `fake`
    let unused = listener_in(
        &b_ns,
        std::net::SocketAddr::from((topo.b.link_ip, topo.b.repl_addr().port() + 1)),
    );
    let peers = [
        topo.b.repl_addr().to_string(),
        topo.a.repl_addr().to_string(),
    ];
    let mut p = Pair::on(
        "psk",
        Fixture::new(),
        &format!("capture = \"watch\"\n{REPLICATION_EXTRA}"),
        [hot_listener, unused],
        peers,
    );
    p.hot.netns = Some(a_ns);
    p.start("hot");
    let rt = rt();
    let conn = rt.block_on(async {
        fake.set_nonblocking(true).unwrap();
        let fake = tokio::net::TcpListener::from_std(fake).unwrap();
        let (r, mut w) = fake_cold_admits(&fake, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the hot side never connected\n{}", p.logs()));
        w.send(&Frame::Welcome { epoch: 1 }).await.unwrap();
        w.flush().await.unwrap();
        (r, w)
    });
    assert!(
        wait_until(Duration::from_secs(10), || p
            .logs()
            .contains("the peer confirmed that no newer epoch exists")),
        "{}",
        p.logs()
    );
    // the cold host is gone: nothing in or out of its end of the link
    run_in(
        &b_ns,
        "nft",
        &["-f", "-"],
        &format!(
            "table inet artemis_gone {{\n\
               chain input {{ type filter hook input priority 0; policy accept; iifname {dev} drop; }}\n\
               chain output {{ type filter hook output priority 0; policy accept; oifname {dev} drop; }}\n\
             }}\n",
            dev = topo.b.link_dev
        ),
    );
    assert!(
        wait_until(Duration::from_secs(40), || p
            .logs()
            .contains("reconnecting in")),
        "the hot side still waits for the index of a cold host that is gone\n{}",
        p.logs()
    );
    drop(conn);
}

/// Regression: the hot side took any welcome as the cold side's word that no newer epoch
/// exists, whatever epoch it carried, and a hot waiting for that word started its node. A
/// welcome at a newer epoch than ours is now a refusal (the agent steps down), and one at an
/// older epoch (the cold side did not record ours) ends the connection.
#[test]
fn a_welcome_at_another_epoch_is_no_confirmation() {
    let fake = crate::listen::loopback_listener();
    let mut p = Pair::new("psk", Some(port_of(&fake)));
    fs::write(
        p.fx.path("hot/state.json"),
        "{\"epoch\": 3, \"role\": \"hot\"}",
    )
    .unwrap();
    p.start("hot");
    let rt = rt();
    rt.block_on(async {
        fake.set_nonblocking(true).unwrap();
        let fake = tokio::net::TcpListener::from_std(fake).unwrap();
        let limit = Duration::from_secs(10);
        let never = || panic!("the hot side never connected\n{}", p.logs());
        let (_r, mut w) = fake_cold_admits(&fake, limit).await.unwrap_or_else(never);
        w.send(&Frame::Welcome { epoch: 2 }).await.unwrap();
        w.flush().await.unwrap();
        let (_r, mut w) = fake_cold_admits(&fake, limit).await.unwrap_or_else(|| {
            panic!(
                "no new connection after an old epoch's welcome\n{}",
                p.logs()
            )
        });
        assert!(
            p.logs().contains("did not record our epoch"),
            "{}",
            p.logs()
        );
        w.send(&Frame::Welcome { epoch: 7 }).await.unwrap();
        w.flush().await.unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || p.status("hot")["role"]
                == "cold"),
            "the hot side welcomed at a newer epoch did not step down\n{}",
            p.logs()
        );
    });
    let logs = p.logs();
    assert!(!logs.contains("the peer confirmed"), "{logs}");
    assert!(
        logs.contains("it welcomed us at epoch 7, newer than ours (3)"),
        "{logs}"
    );
    assert_eq!(p.status("hot")["epoch"], 7);
}

/// SIGTERM (`systemctl stop`) while the hot agent waits on a `verify` whose cold side does
/// not answer (a paused VM): the agent stops its node at once. It read no signal until the
/// verify gave up (5 minutes), so its node ran on until systemd's TimeoutStopSec killed
/// everything.
/// A pair whose hot side runs a node (a script writing its pid to `node.pid`, stopped within
/// 500 ms), synced; then the cold agent stopped (a paused VM) and a `verify` started on the hot
/// side, which waits for the cold side's digest. Returns the node's pid and the verify.
fn a_verify_held_up(
    p: &mut Pair,
    node_more: &str,
) -> (libc::pid_t, thread::JoinHandle<crate::util::Output>) {
    let pidfile = p.fx.path("node.pid");
    let node = write_script(
        &p.fx.path("node.sh"),
        &format!(
            "echo $$ > {}\nwhile :; do sleep 0.05; done",
            pidfile.display()
        ),
    );
    let text = fs::read_to_string(&p.hot.config).unwrap().replacen(
        "[node]\n",
        &format!(
            "[node]\ncommand = [{}]\nstop_timeout_ms = 500\n{node_more}",
            toml_path(&node)
        ),
        1,
    );
    fs::write(&p.hot.config, text).unwrap();
    seed_tree(&p.hot.data, 1);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    let pid = node_pid_in(&pidfile, None);
    p.signal("cold", libc::SIGSTOP);
    let config = p.hot.config.clone();
    let verify = thread::spawn(move || artemis_sync(&config, ["verify"]));
    thread::sleep(Duration::from_secs(1)); // the verify waits for the cold side's digest
    (pid, verify)
}

/// The pid in `pidfile` once it holds one other than `not` (within 10 s).
#[track_caller]
fn node_pid_in(pidfile: &Path, not: Option<libc::pid_t>) -> libc::pid_t {
    let read = || {
        fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            .filter(|pid| Some(*pid) != not)
    };
    assert!(
        wait_until(Duration::from_secs(10), || read().is_some()),
        "no node (other than {not:?}) wrote {}",
        pidfile.display()
    );
    read().unwrap()
}

#[test]
fn sigterm_during_a_verify_stops_the_node_at_once() {
    let mut p = Pair::new("psk", None);
    let (pid, _verify) = a_verify_held_up(&mut p, "");
    let hot = p.hot.child.as_ref().unwrap().id();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(libc::pid_t::try_from(hot).unwrap(), libc::SIGTERM) };
    // SAFETY: signal 0 only checks for existence.
    let node_gone = wait_until(
        Duration::from_secs(5),
        || unsafe { libc::kill(pid, 0) } != 0,
    );
    p.signal("cold", libc::SIGCONT);
    assert!(
        node_gone,
        "the node still runs 5 s after SIGTERM:\n{}",
        p.logs()
    );
}

/// Regression: while the hot agent waited on a `verify` (up to 5 minutes with a paused cold
/// VM), it did not watch its node: a node that died then was noticed, and restarted (or the
/// lease handed over), only when the verify ended. Its exit now ends the verify, saying why,
/// and the node is restarted after its back-off.
#[test]
fn a_node_that_dies_during_a_verify_is_restarted_at_once() {
    let mut p = Pair::new("psk", None);
    let (pid, verify) = a_verify_held_up(&mut p, "restart_backoff_ms = 200\n");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_the_verify_ends_and_the_node_comes_back(&p, (pid, verify), || {}, "the node exited");
}

/// As [`a_node_that_dies_during_a_verify_is_restarted_at_once`], for a node the watchdog
/// stops because its probes fail: the wait went on with the stopped node's (disconnected)
/// exit channel, spinning on a core, and the node stayed down until the verify ended.
#[test]
fn a_node_whose_probes_fail_during_a_verify_is_restarted_at_once() {
    let mut p = Pair::new("psk", None);
    let sick = p.fx.path("sick");
    let held = a_verify_held_up(
        &mut p,
        &format!(
            "probe_command = [\"/bin/sh\", \"-c\", \"! test -e {}\"]\n\
             probe_interval_ms = 200\nprobe_timeout_ms = 150\nprobe_failures = 2\n\
             probe_grace_ms = 0\nrestart_backoff_ms = 200\n",
            sick.display()
        ),
    );
    fs::write(&sick, "").unwrap();
    let healed = || fs::remove_file(&sick).unwrap();
    assert_the_verify_ends_and_the_node_comes_back(&p, held, healed, "failed its probes");
}

/// After the node of [`a_verify_held_up`] failed: the verify ends within 5 s saying `says`,
/// and once `healed` ran, a new node writes its pid within 5 s more.
#[track_caller]
fn assert_the_verify_ends_and_the_node_comes_back(
    p: &Pair,
    (pid, verify): (libc::pid_t, thread::JoinHandle<crate::util::Output>),
    healed: impl FnOnce(),
    says: &str,
) {
    let ended = wait_until(Duration::from_secs(5), || verify.is_finished());
    healed();
    let restarted = ended
        && wait_until(Duration::from_secs(5), || {
            fs::read_to_string(p.fx.path("node.pid"))
                .is_ok_and(|s| s.trim().parse::<libc::pid_t>().is_ok_and(|new| new != pid))
        });
    p.signal("cold", libc::SIGCONT);
    assert!(
        ended,
        "the verify still waits 5 s after the node failed\n{}",
        p.logs()
    );
    let out = verify.join().unwrap();
    assert!(out.to_string().contains(says), "{out}");
    assert!(
        restarted,
        "no new node within 5 s of the verify's end\n{}",
        p.logs()
    );
}

/// Regression: the reader and the network task judged an ack against different counters at
/// different times. An ack of batch k+1 read while batch k's write is still under way (the
/// socket full) is dropped by the reader (it answers no durable sync: k+1 > sent_seq), but
/// if the network task sends batch k+1 before it takes the ack from the queue, `on_ack`
/// finds k+1 < next_seq and accepts it: the window is emptied, `acked_seq` moves, waiting
/// `Synced` syncs and drains are answered, on an ack of a batch the cold side never had.
#[test]
fn issue12_an_ack_read_ahead_of_its_batch_is_never_accepted() {
    let fake = crate::listen::loopback_listener();
    let mut p = Pair::new_in(
        "psk",
        Some(port_of(&fake)),
        Fixture::new(),
        &format!("{REPLICATION_EXTRA}\nwindow_mb = 512"),
    );
    // 64 batches of page data for the resync against an empty index
    let mut big = vec![0u8; 64 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = u8::try_from((i * 7 + i / 4096) % 256).unwrap();
    }
    fs::create_dir_all(&p.hot.data).unwrap();
    fs::write(p.hot.data.join("big"), &big).unwrap();
    p.start("hot");
    let batches = |p: &Pair| p.status("hot")["batches"].as_u64().unwrap_or(0);
    let rt = rt();
    let mut accepted = None;
    for attempt in 0..10 {
        let outcome = rt.block_on(async {
            fake.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(fake.try_clone().unwrap()).unwrap();
            let (mut r, mut w) = fake_cold_admits(&listener, Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("no connection\n{}", p.logs()));
            let b0 = batches(&p);
            w.send(&Frame::Welcome { epoch: 1 }).await.unwrap();
            w.send(&Frame::IndexEnd).await.unwrap();
            w.flush().await.unwrap();
            // read nothing until the network task is stuck writing a batch
            let mut last = u64::MAX;
            let mut stable = 0;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let b = batches(&p);
                if b == last && b > b0 {
                    stable += 1;
                    if stable == 3 {
                        break;
                    }
                } else {
                    stable = 0;
                }
                last = b;
            }
            // batches(p) - b0 written in full; batch k is being written (sent_seq = k)
            let k = last - b0 + 1;
            w.send(&Frame::Ack { seq: k + 1 }).await.unwrap();
            w.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            // now drain, and see whether the connection survives the bogus ack
            let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
            let mut max_seq = 0;
            loop {
                match tokio::time::timeout_at(deadline, r.recv()).await {
                    Err(_) => return Some((k, max_seq)), // still open: the ack was taken
                    Ok(Ok(Frame::Batch { seq, .. })) => max_seq = max_seq.max(seq),
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return None, // closed: refused as it should be
                }
            }
        });
        eprintln!("attempt {attempt}: {outcome:?}");
        if let Some(o) = outcome {
            accepted = Some(o);
            break;
        }
    }
    let logs = p.logs();
    assert!(
        accepted.is_none(),
        "the hot side accepted an ack of batch {} sent while it was still writing batch {} \
         (it then sent up to batch {})\n{}",
        accepted.unwrap().0 + 1,
        accepted.unwrap().0,
        accepted.unwrap().1,
        logs.lines()
            .filter(|l| l.contains("never sent") || l.contains("replication connection"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
