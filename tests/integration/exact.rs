//! Issue 11, items 1 and 7: the cold copy is exact (type, contents, size, mode, owner and
//! group, symlink target, allocation) and renames converge in any order. Real agents
//! (`replication.rs`'s `Pair`), real files; owners need root. The owner and symlink tests run
//! against both captures (issue 12): the watch, the node writing into `data_dir`, and FUSE,
//! the node writing through the hot side's mount (root).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{lchown, symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::replication::{wait_until, Pair};
use crate::util::{artemis_sync, require_root, Fixture, MountGuard};

/// One entry as the copy must reproduce it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
        owner: (u32, u32),
    },
    File {
        mode: u32,
        owner: (u32, u32),
        len: u64,
        blake3: String,
        allocated: bool,
    },
    Link {
        owner: (u32, u32),
        target: PathBuf,
    },
}

/// Every block of the length allocated (the rule the agent replicates).
fn fully_allocated(m: &fs::Metadata) -> bool {
    m.len() > 0 && m.blocks() * 512 >= m.len().next_multiple_of(4096)
}

/// Everything below `root`, walked with `symlink_metadata` and `read_link` (never following
/// a link).
fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = rel.join(e.file_name());
            let path = root.join(&rel);
            let Ok(m) = fs::symlink_metadata(&path) else {
                continue;
            };
            let owner = (m.uid(), m.gid());
            let mode = m.mode() & 0o7777;
            let node = if m.is_dir() {
                stack.push(rel.clone());
                Node::Dir { mode, owner }
            } else if m.file_type().is_symlink() {
                let Ok(target) = fs::read_link(&path) else {
                    continue;
                };
                Node::Link { owner, target }
            } else {
                let Ok(data) = fs::read(&path) else { continue };
                Node::File {
                    mode,
                    owner,
                    len: m.len(),
                    blake3: blake3::hash(&data).to_hex().to_string(),
                    allocated: fully_allocated(&m),
                }
            };
            out.insert(rel.to_string_lossy().into_owned(), node);
        }
    }
    out
}

/// The entries that differ, hot first.
fn differences(hot: &Path, cold: &Path) -> Vec<String> {
    let (h, c) = (tree(hot), tree(cold));
    let mut keys: Vec<&String> = h.keys().chain(c.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| h.get(*k) != c.get(*k))
        .map(|k| format!("{k}: hot {:?} / cold {:?}", h.get(k), c.get(k)))
        .collect()
}

/// Waits (bounded) until the cold tree equals the hot one in everything; the difference if
/// it does not.
fn converge(p: &Pair, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    if wait_until(limit, || differences(&p.hot.data, &p.cold.data).is_empty()) {
        return Ok(started.elapsed());
    }
    Err(format!(
        "no exact copy within {limit:?}:\n{}",
        differences(&p.hot.data, &p.cold.data).join("\n")
    ))
}

#[track_caller]
fn assert_exact(p: &Pair) {
    if let Err(e) = converge(p, Duration::from_secs(30)) {
        panic!("{e}\n{}", p.logs());
    }
}

fn verify(p: &Pair) -> serde_json::Value {
    let out = artemis_sync(&p.hot.config, ["verify", "--json"]);
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn started(p: &mut Pair) {
    p.start("cold");
    p.start("hot");
}

/// How the hot side captures what the node changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// inotify and rescans; the node writes into `data_dir`.
    Watch,
    /// The FUSE mount (no rescans within a test); the node writes through it.
    Fuse,
    /// The same with durable acks: small writes are handled on the FUSE threads when the
    /// scanner is free.
    FuseDurable,
}

/// A pair capturing `via`, with the guard of the FUSE mount point.
fn pair(via: Via) -> (Pair, Option<MountGuard>) {
    match via {
        Via::Watch => (Pair::new("psk", None), None),
        Via::Fuse | Via::FuseDurable => {
            let more = if via == Via::FuseDurable {
                "ack = \"durable\""
            } else {
                ""
            };
            let p = crate::fuse::fuse_pair(Fixture::new(), more);
            let guard = MountGuard::new(&p.fx.path("hot/mnt"));
            (p, Some(guard))
        }
    }
}

/// Where the node writes once the hot side runs.
fn node_dir(p: &Pair, via: Via) -> PathBuf {
    match via {
        Via::Watch => p.hot.data.clone(),
        Via::Fuse | Via::FuseDurable => crate::fuse::mount_point(p),
    }
}

#[test]
fn issue11_owners_of_files_and_directories_are_replicated_initially_and_streamed() {
    if !require_root("owners", "chown to 4321:4322") {
        return;
    }
    owners(Via::Watch);
}

#[test]
fn issue12_owners_are_replicated_through_the_fuse_mount() {
    if !require_root("owners_fuse", "chown to 4321:4322, FUSE mounts") {
        return;
    }
    owners(Via::Fuse);
}

fn owners(via: Via) {
    let (mut p, _guard) = pair(via);
    let journal = p.hot.data.join("journal");
    fs::create_dir_all(&journal).unwrap();
    fs::write(journal.join("a.amq"), vec![1u8; 10_000]).unwrap();
    lchown(journal.join("a.amq"), Some(4321), Some(4322)).unwrap();
    lchown(&journal, Some(4321), Some(4322)).unwrap();
    started(&mut p);
    assert_exact(&p);
    let m = fs::metadata(p.cold.data.join("journal/a.amq")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4321, 4322));
    // streamed: a new directory and file, and an owner changed in place (IN_ATTRIB)
    let journal = node_dir(&p, via).join("journal");
    let paging = node_dir(&p, via).join("paging");
    fs::create_dir_all(&paging).unwrap();
    fs::write(paging.join("b.page"), b"page").unwrap();
    lchown(paging.join("b.page"), Some(4323), Some(4324)).unwrap();
    lchown(&paging, Some(4325), Some(4326)).unwrap();
    lchown(journal.join("a.amq"), Some(4327), Some(4328)).unwrap();
    fs::set_permissions(journal.join("a.amq"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_exact(&p);
    let m = fs::metadata(p.cold.data.join("paging")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4325, 4326));
    let v = verify(&p);
    assert_eq!(v["identical"], true, "{v}");
    // an owner changed behind the stream's back is named by verify
    lchown(p.cold.data.join("journal/a.amq"), Some(0), Some(0)).unwrap();
    let v = verify(&p);
    assert_eq!(v["identical"], false, "{v}");
    assert!(
        v["differing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "journal/a.amq: owner 4327:4328 vs 0:0"),
        "{v}"
    );
}

#[test]
fn issue11_symlinks_are_replicated_as_links_never_followed_and_verified() {
    symlinks(Via::Watch);
}

#[test]
fn issue12_symlinks_are_replicated_through_the_fuse_mount() {
    if !require_root("symlinks_fuse", "FUSE mounts") {
        return;
    }
    symlinks(Via::Fuse);
}

fn symlinks(via: Via) {
    let (mut p, _guard) = pair(via);
    let outside = p.fx.write("outside", b"not data");
    let d = p.hot.data.clone();
    fs::create_dir_all(d.join("journal")).unwrap();
    fs::write(d.join("journal/a.amq"), b"a").unwrap();
    symlink("journal/a.amq", d.join("current")).unwrap();
    symlink(&outside, d.join("abs")).unwrap();
    symlink("nowhere", d.join("dangling")).unwrap();
    symlink(&outside, d.join("journal/was-link")).unwrap();
    started(&mut p);
    assert_exact(&p);
    assert_eq!(
        fs::read_link(p.cold.data.join("abs")).unwrap(),
        outside,
        "the target is replicated as text"
    );
    let v = verify(&p);
    assert_eq!(v["identical"], true, "{v}");
    // streamed: retarget by rename over (ln -sfn), a new link, a link that becomes a file
    // (the cold side must replace the link, not write through it to `outside`), a file and
    // a directory that become links
    let d = node_dir(&p, via);
    symlink("journal/b.amq", d.join("current.tmp")).unwrap();
    fs::rename(d.join("current.tmp"), d.join("current")).unwrap();
    symlink("..", d.join("journal/up")).unwrap();
    fs::remove_file(d.join("journal/was-link")).unwrap();
    fs::write(d.join("journal/was-link"), b"now a file").unwrap();
    fs::remove_file(d.join("journal/a.amq")).unwrap();
    symlink("b.amq", d.join("journal/a.amq")).unwrap();
    assert_exact(&p);
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"not data",
        "written through a link"
    );
    fs::create_dir_all(d.join("dir/sub")).unwrap();
    fs::write(d.join("dir/sub/f"), b"f").unwrap();
    assert_exact(&p);
    fs::remove_dir_all(d.join("dir")).unwrap();
    symlink("journal", d.join("dir")).unwrap();
    fs::write(d.join("journal/c.amq"), b"c").unwrap();
    assert_exact(&p);
    let v = verify(&p);
    assert_eq!(v["identical"], true, "{v}");
    // a link changed behind the stream's back is named by verify
    fs::remove_file(p.cold.data.join("current")).unwrap();
    symlink("elsewhere", p.cold.data.join("current")).unwrap();
    let v = verify(&p);
    assert_eq!(v["identical"], false, "{v}");
    assert!(
        v["differing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "link current: target journal/b.amq vs elsewhere"),
        "{v}"
    );
}

/// Writes `len` zeros in 1 MiB writes, as Artemis preallocates a journal file.
fn preallocate(path: &Path, len: usize) {
    let f = fs::File::create(path).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for off in (0..len).step_by(zeros.len()) {
        let n = zeros.len().min(len - off);
        f.write_all_at(&zeros[..n], u64::try_from(off).unwrap())
            .unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn issue11_a_preallocated_journal_file_is_allocated_on_the_cold_side() {
    const LEN: usize = 10 << 20;
    let mut p = Pair::new("psk", None);
    fs::create_dir_all(p.hot.data.join("journal")).unwrap();
    preallocate(&p.hot.data.join("journal/pre-1.amq"), LEN);
    // a sparse file stays sparse
    fs::File::create(p.hot.data.join("journal/sparse"))
        .unwrap()
        .set_len(u64::try_from(LEN).unwrap())
        .unwrap();
    started(&mut p);
    assert_exact(&p);
    let blocks = |rel: &str| fs::metadata(p.cold.data.join(rel)).unwrap().blocks() * 512;
    assert!(
        blocks("journal/pre-1.amq") >= u64::try_from(LEN).unwrap(),
        "initial sync: {} bytes allocated",
        blocks("journal/pre-1.amq")
    );
    // streamed
    preallocate(&p.hot.data.join("journal/pre-2.amq"), LEN);
    assert_exact(&p);
    assert!(
        blocks("journal/pre-2.amq") >= u64::try_from(LEN).unwrap(),
        "streamed: {} bytes allocated",
        blocks("journal/pre-2.amq")
    );
    assert!(blocks("journal/sparse") < u64::try_from(LEN).unwrap());
    let v = verify(&p);
    assert_eq!(v["identical"], true, "{v}");
}

/// Names the random sequences use: files at the top and in two directories, which also get
/// renamed, removed and turned into files or links.
const NAMES: &[&str] = &["a", "b", "c", "d", "d/a", "d/b", "e", "e/a", "e/d"];
const TARGETS: &[&str] = &["a", "d/a", "../outside", "/nonexistent", ".."];

/// One change on the hot side.
#[derive(Debug, Clone)]
enum Step {
    Create(usize, usize),
    Write(usize, u64, usize, u8),
    Truncate(usize, u64),
    /// `fallocate` of a range: blocks allocated (the length grows to cover it), or a hole
    /// punched (the length kept).
    Fallocate(usize, u64, u64, bool),
    /// `mknod(2)` of an empty regular file.
    Mknod(usize),
    Mkdir(usize),
    Rename(usize, usize),
    Chain(usize, usize, usize),
    Swap(usize, usize),
    Chmod(usize, u32),
    Chown(usize, u32, u32),
    Symlink(usize, usize),
    Retarget(usize, usize),
    Unlink(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let n = || 0..NAMES.len();
    prop_oneof![
        (n(), 0..20_000usize).prop_map(|(p, l)| Step::Create(p, l)),
        (n(), 0..20_000u64, 1..9000usize, any::<u8>())
            .prop_map(|(p, o, l, b)| Step::Write(p, o, l, b)),
        (n(), 0..20_000u64).prop_map(|(p, l)| Step::Truncate(p, l)),
        (n(), 0..20_000u64, 1..20_000u64, any::<bool>())
            .prop_map(|(p, o, l, punch)| Step::Fallocate(p, o, l, punch)),
        n().prop_map(Step::Mknod),
        n().prop_map(Step::Mkdir),
        (n(), n()).prop_map(|(a, b)| Step::Rename(a, b)),
        (n(), n(), n()).prop_map(|(a, b, c)| Step::Chain(a, b, c)),
        (n(), n()).prop_map(|(a, b)| Step::Swap(a, b)),
        (
            n(),
            prop_oneof![Just(0o600u32), Just(0o640), Just(0o755), Just(0o700)]
        )
            .prop_map(|(p, m)| Step::Chmod(p, m)),
        (
            n(),
            prop_oneof![Just(0u32), Just(4321)],
            prop_oneof![Just(0u32), Just(4322)]
        )
            .prop_map(|(p, u, g)| Step::Chown(p, u, g)),
        (n(), 0..TARGETS.len()).prop_map(|(p, t)| Step::Symlink(p, t)),
        (n(), 0..TARGETS.len()).prop_map(|(p, t)| Step::Retarget(p, t)),
        n().prop_map(Step::Unlink),
    ]
}

/// Removes whatever is at `p` (file, link or tree); errors ignored (it may be missing).
fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => drop(fs::remove_dir_all(p)),
        Ok(_) => drop(fs::remove_file(p)),
        Err(_) => {}
    }
}

/// Applies one step to the hot tree as an application would; a step that makes no sense on
/// the tree as it is (a rename of a missing name) fails and is ignored, as it would be.
fn apply_step(root: &Path, step: &Step) {
    let at = |i: usize| root.join(NAMES[i]);
    let parent = |p: &Path| drop(fs::create_dir_all(p.parent().unwrap()));
    match *step {
        Step::Create(p, len) => {
            let p = at(p);
            parent(&p);
            remove_any(&p);
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let _ = fs::write(&p, data);
        }
        Step::Write(p, off, len, byte) => {
            if let Ok(f) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(p))
            {
                let _ = f.write_all_at(&vec![byte; len], off);
            }
        }
        Step::Truncate(p, len) => {
            if let Ok(f) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(p))
            {
                let _ = f.set_len(len);
            }
        }
        Step::Fallocate(p, off, len, punch) => {
            if let Ok(f) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(p))
            {
                let mode = if punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                };
                let (off, len) = (i64::try_from(off).unwrap(), i64::try_from(len).unwrap());
                // SAFETY: fallocate on an open descriptor; nothing is borrowed.
                let _ = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
            }
        }
        Step::Mknod(p) => {
            let p = at(p);
            parent(&p);
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is a NUL-terminated path for the duration of the call.
            let _ = unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o640, 0) };
        }
        Step::Mkdir(p) => {
            let p = at(p);
            if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
                remove_any(&p);
            }
            let _ = fs::create_dir_all(p);
        }
        Step::Rename(a, b) => drop(fs::rename(at(a), at(b))),
        Step::Chain(a, b, c) => {
            let _ = fs::rename(at(a), at(b));
            let _ = fs::rename(at(b), at(c));
        }
        Step::Swap(a, b) => {
            let tmp = root.join("swap.tmp");
            let _ = fs::rename(at(a), &tmp);
            let _ = fs::rename(at(b), at(a));
            let _ = fs::rename(&tmp, at(b));
        }
        Step::Chmod(p, mode) => {
            let p = at(p);
            if fs::symlink_metadata(&p).is_ok_and(|m| !m.file_type().is_symlink()) {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
            }
        }
        Step::Chown(p, u, g) => drop(lchown(at(p), Some(u), Some(g))),
        Step::Symlink(p, t) => {
            let p = at(p);
            parent(&p);
            remove_any(&p);
            let _ = symlink(TARGETS[t], p);
        }
        Step::Retarget(p, t) => {
            // ln -sfn: a new link renamed over the name
            let p = at(p);
            let tmp = root.join("link.tmp");
            parent(&p);
            let _ = symlink(TARGETS[t], &tmp);
            if fs::rename(&tmp, &p).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
        Step::Unlink(p) => remove_any(&at(p)),
    }
}

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

#[test]
fn issue11_renames_and_every_change_converge_in_any_order() {
    if !require_root("renames converge", "chown to 4321:4322") {
        return;
    }
    every_change_converges(Via::Watch);
}

/// The same random sequences written through the FUSE mount, where no rescan helps: every
/// change must come from the calls the mount saw (lengths set by `ftruncate` among them).
#[test]
fn issue12_renames_and_every_change_converge_in_any_order_through_the_fuse_mount() {
    if !require_root("renames converge (FUSE)", "chown to 4321:4322, FUSE mounts") {
        return;
    }
    every_change_converges(Via::Fuse);
}

/// And with durable acks, where a FUSE thread handles a small write's event itself whenever
/// nothing is queued ahead of it, between namespace calls the scanner thread handles.
#[test]
fn issue12_every_change_converges_through_the_fuse_mount_with_durable_acks() {
    if !require_root(
        "renames converge (FUSE, durable)",
        "chown to 4321:4322, FUSE mounts",
    ) {
        return;
    }
    every_change_converges(Via::FuseDurable);
}

fn every_change_converges(via: Via) {
    let (mut p, _guard) = pair(via);
    p.fx.write("outside", b"not data");
    started(&mut p);
    let cases: u32 = std::env::var("EXACT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    // Each sequence starts from the tree the ones before it left: a failing sequence is
    // shown with that tree, and never shrunk (its shrunk forms would start from the tree
    // the failure left, which is no longer the hot one).
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    });
    let root = node_dir(&p, via);
    let started_at = Instant::now();
    let first_failure = std::cell::RefCell::new(None::<String>);
    let result = runner.run(&prop::collection::vec(step(), 1..14), |steps| {
        let before = tree(&p.hot.data);
        for s in &steps {
            apply_step(&root, s);
        }
        converge(&p, Duration::from_secs(15)).map_err(|e| {
            first_failure.borrow_mut().get_or_insert_with(|| {
                format!("{e}\nthe sequence: {steps:?}\nthe hot tree before it: {before:#?}")
            });
            TestCaseError::fail(e)
        })?;
        Ok(())
    });
    if let Err(e) = result {
        let first = first_failure.borrow_mut().take().unwrap_or_default();
        panic!("{e}\n{first}\n{}", p.logs());
    }
    eprintln!(
        "{cases} random sequences ({via:?}) converged in {:?}",
        started_at.elapsed()
    );
    let v = verify(&p);
    assert_eq!(v["identical"], true, "{v}");
}
