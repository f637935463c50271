//! Small helpers shared by the integration tests: a temp fixture, running the binaries with a
//! bounded wait, writing configs and scripts, snapshotting trees, and cleaning up mounts.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::RwLock;
use std::thread;
use std::time::{Duration, Instant};

/// The longest any one run of a binary may take before the test fails.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// An EFS source as the docs write it.
pub(crate) const EFS_SOURCE: &str = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/";
/// The options amazon-efs-utils mounts EFS with.
pub(crate) const EFS_OPTIONS: &str =
    "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport";

/// Held for writing while a script is created, for reading while a process is spawned: a
/// child forked by another thread while a script is open for writing would keep it open
/// until its exec, and running the script then fails with ETXTBSY.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// Whether the tests run as root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this is a CI run (`CI=true`, as `.ci/run` is run), where a test that cannot run
/// must fail rather than pass without having run.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `test` cannot run here, because `why`. In CI (`CI=true`) that fails the test, with the
/// reason; run by hand, it prints `skipped: <test>: <why>` on a line of its own (to the real
/// stderr, past the test harness's capture, so that it shows) and the caller returns.
#[track_caller]
pub(crate) fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run: {why}; under CI=true a test that cannot run fails instead of \
         passing as skipped (.ci/run installs what the tests need and runs as root)"
    );
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("\nskipped: {test}: {why}\n").as_bytes());
}

/// True when root; otherwise [`skip`]s `test` (a failure under CI) and returns false.
#[track_caller]
pub(crate) fn require_root(test: &str, why: &str) -> bool {
    if is_root() {
        true
    } else {
        skip(test, &format!("{why} (not root)"));
        false
    }
}

/// A temporary directory, removed on drop, with its canonical path.
#[derive(Debug)]
pub(crate) struct Fixture {
    _tmp: tempfile::TempDir,
    /// The directory, without symlinks.
    pub root: PathBuf,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        Fixture::new_in(&std::env::temp_dir())
    }

    /// A fixture below `dir` (`/dev/shm` for big trees on tmpfs).
    pub(crate) fn new_in(dir: &Path) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("artemis-sync-it.")
            .tempdir_in(dir)
            .expect("create temp dir");
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        Fixture { _tmp: tmp, root }
    }

    /// `root/rel`.
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Creates `root/rel` and its parents.
    pub(crate) fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Writes `root/rel`, creating its parents.
    pub(crate) fn write(&self, rel: &str, data: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        write_file(&p, data.as_ref());
        p
    }
}

/// Writes `path`, creating its parents.
pub(crate) fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Sets the permission bits of `path`.
pub(crate) fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A path as a TOML basic string (the paths in tests hold no control characters).
pub(crate) fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("UTF-8 path"))
}

/// A config where the share is a directory mounted by someone else (no mount, no root).
pub(crate) fn premounted_config(base_dir: &Path, share: &Path) -> String {
    format!(
        "[node]\nbase_dir = {}\n\n[storage]\nbackend = \"premounted\"\nmount_point = {}\n\n\
         [lock]\nallow_local_locks = true\n",
        toml_path(base_dir),
        toml_path(share)
    )
}

/// Writes an executable `#!/bin/sh` script at `path`.
pub(crate) fn write_script(path: &Path, body: &str) -> PathBuf {
    let _guard = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .unwrap_or_else(|e| panic!("create script {}: {e}", path.display()));
    f.write_all(format!("#!/bin/sh\n{body}\n").as_bytes())
        .unwrap_or_else(|e| panic!("write script {}: {e}", path.display()));
    drop(f);
    path.to_owned()
}

/// A command for `program` with none of the caller's artemis-sync settings and no colours.
/// `IT_AGENT_LOG` (a log filter, as `ARTEMIS_SYNC_LOG` takes) is passed on as its
/// `ARTEMIS_SYNC_LOG`, to see what the agents did in a failing test.
fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    for var in [
        "ARTEMIS_SYNC_CONFIG",
        "ARTEMIS_SYNC_LOG",
        "ARTEMIS_SYNC_MOUNT_PROGRAM",
        "JOURNAL_STREAM",
    ] {
        c.env_remove(var);
    }
    if let Ok(filter) = std::env::var("IT_AGENT_LOG") {
        c.env("ARTEMIS_SYNC_LOG", filter);
    }
    c.env("NO_COLOR", "1").stdin(Stdio::null());
    c
}

/// A binary of the workspace, from the folder cargo builds every binary into (a test binary
/// runs from its `deps/` subfolder). This file is shared by both packages' integration tests,
/// so the path comes from that layout rather than from one package's `CARGO_BIN_EXE_*`.
pub(crate) fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("the test binary runs from target/<profile>/deps/");
    assert!(
        path.is_file(),
        "{} is missing: run the tests of the whole workspace (`cargo test --release` at the top), which builds it",
        path.display()
    );
    path
}

/// Where `program` is on `PATH`, if it is.
pub(crate) fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// `artemis-sync` with a clean environment.
pub(crate) fn main_cmd() -> Command {
    command(&workspace_bin("artemis-sync"))
}

/// `mount-artemis-sync` with a clean environment.
pub(crate) fn helper_cmd() -> Command {
    command(&workspace_bin("mount-artemis-sync"))
}

/// Runs `artemis-sync -c <config> <args>`.
pub(crate) fn artemis_sync<I, S>(config: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(main_cmd().arg("-c").arg(config).args(args))
}

/// What a finished run printed, and how it ended.
#[derive(Debug)]
pub(crate) struct Output {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  exited {:?} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}--------------",
            self.what,
            self.status.code(),
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

impl Output {
    #[track_caller]
    pub(crate) fn code(&self, code: i32) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "unexpected exit code:\n{self}"
        );
        self
    }

    #[track_caller]
    pub(crate) fn failed(&self) -> &Self {
        assert!(!self.status.success(), "expected a failure:\n{self}");
        self
    }

    #[track_caller]
    pub(crate) fn stdout_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(self.stdout.contains(n), "stdout lacks {n:?}:\n{self}");
        }
        self
    }

    #[track_caller]
    pub(crate) fn stderr_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{self}");
        }
        self
    }

    #[track_caller]
    pub(crate) fn nowhere(&self, secret: &str) -> &Self {
        assert!(
            !self.stdout.contains(secret) && !self.stderr.contains(secret),
            "{secret:?} was printed:\n{self}"
        );
        self
    }
}

/// Spawns `cmd` (with the spawn lock held, see [`SPAWN_LOCK`]).
pub(crate) fn spawn(cmd: &mut Command) -> Child {
    let _guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` with `stdin` as its input, capturing its output (stdout, stderr).
pub(crate) fn run_with_input(cmd: &mut Command, stdin: &str) -> std::process::Output {
    let mut child = spawn(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    child
        .stdin
        .take()
        .expect("stdin pipe")
        .write_all(stdin.as_bytes())
        .expect("write the input");
    child.wait_with_output().expect("wait for the command")
}

/// Waits for `child` at most `limit`, polling; `None` if it is still running.
pub(crate) fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `cmd` to completion (at most [`RUN_TIMEOUT`]), capturing its output.
pub(crate) fn run(cmd: &mut Command) -> Output {
    run_within(cmd, RUN_TIMEOUT)
}

/// Runs `cmd` to completion (at most `limit`), capturing its output.
pub(crate) fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = spawn(cmd);
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let Some(status) = wait_bounded(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {limit:?}");
    };
    let text =
        |h: thread::JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap()).into_owned();
    Output {
        what,
        status,
        stdout: text(out),
        stderr: text(err),
        elapsed: start.elapsed(),
    }
}

/// One entry of a directory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        len: u64,
        mtime: (i64, i64),
        blake3: String,
    },
    Symlink(PathBuf),
}

/// Every entry below a directory, by relative path.
pub(crate) type Tree = BTreeMap<PathBuf, Node>;

/// Every entry below `root` (followed if it is a symlink) with its mode, size, mtime and
/// blake3 digest. Bounded: at most 100 000 entries.
pub(crate) fn snapshot(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let entry = entry.expect("read_dir entry");
            let rel = rel.join(entry.file_name());
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(fs::read_link(&path).expect("readlink"))
            } else if meta.is_dir() {
                stack.push(rel.clone());
                Node::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else {
                Node::File {
                    mode: meta.mode() & 0o7777,
                    len: meta.len(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    blake3: file_digest_hex(&path),
                }
            };
            tree.insert(rel, node);
            assert!(
                tree.len() <= 100_000,
                "tree under {} is too big",
                root.display()
            );
        }
    }
    tree
}

/// The blake3 digest of a file's content, in hex.
pub(crate) fn file_digest_hex(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    hasher.update_reader(f).expect("read for hashing");
    hasher.finalize().to_hex().to_string()
}

/// Names in `dir`, sorted (empty if it does not exist).
pub(crate) fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| {
            e.expect("read_dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// Undoes the kernel's octal escapes in a mountinfo field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            // past a byte (up to \777) it is no escape the kernel writes: keep the text
            match u8::try_from(v) {
                Ok(byte) => out.push(byte),
                Err(_) => out.extend_from_slice(&b[i..i + 4]),
            }
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mountinfo lines (this process's view) whose mount point is `dir`.
pub(crate) fn mounts_at(dir: &Path) -> Vec<String> {
    let bytes = fs::read("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .filter(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(dir.to_str().unwrap()))
        .map(str::to_owned)
        .collect()
}

/// Lazily unmounts whatever is mounted on its directory when dropped (also when a test
/// panics). Declare it after the [`Fixture`] so that it runs first.
#[derive(Debug)]
pub(crate) struct MountGuard(PathBuf);

impl MountGuard {
    pub(crate) fn new(dir: &Path) -> Self {
        MountGuard(dir.to_owned())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for _ in 0..8 {
            if mounts_at(&self.0).is_empty() {
                return;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stdin(Stdio::null())
                .status();
        }
        eprintln!("warning: {} is still mounted", self.0.display());
    }
}

/// Runs a system command (mount, umount) and asserts it succeeded.
#[track_caller]
pub(crate) fn system(program: &str, args: &[&OsStr]) {
    let out = run(Command::new(program).args(args).stdin(Stdio::null()));
    assert!(out.status.success(), "{out}");
}
