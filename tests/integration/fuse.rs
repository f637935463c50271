//! The FUSE capture (issue 12), with real agents as root: the hot agent serves its data
//! directory at a mount point, and the tests write through that mount with the system-call
//! patterns of Artemis' three journal types (NIO: `pwrite` + `fdatasync`; ASYNCIO: kernel AIO
//! `io_submit` on an `O_DIRECT` file, whose completion is the record's sync; MAPPED: stores
//! into a shared mmap + `msync`), and, for durable acks, `O_DSYNC` writes with no sync call. The rescan periods are ten minutes, so
//! what reaches the cold side came from the calls.

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::replication::{wait_until, Pair};
use crate::util::{
    artemis_sync, main_cmd, mounts_at, require_root, run, system, toml_path, Fixture, MountGuard,
};

/// Bytes per journal record.
pub(crate) const RECORD_BYTES: usize = 4096;
/// Records each writer makes.
const RECORDS: usize = 200;
/// How long the cold copy may take to converge (no rescan can run within it).
const CONVERGE: Duration = Duration::from_secs(20);

/// `[replication]` lines: FUSE capture, and rescans too rare to deliver anything in a test.
const FUSE_EXTRA: &str = "rescan_interval_ms = 600000\ndeep_rescan_interval_ms = 600000\n\
                          capture = \"fuse\"\nmount_point = __MNT__";

/// A pair in FUSE mode; each side's mount point is `<side>/mnt`; `more` ends `[replication]`.
pub(crate) fn fuse_pair(fx: Fixture, more: &str) -> Pair {
    fuse_pair_to(fx, None, more)
}

/// [`fuse_pair`] whose hot side connects to `hot_peer` (a port of 127.0.0.1) if given.
pub(crate) fn fuse_pair_to(fx: Fixture, hot_peer: Option<u16>, more: &str) -> Pair {
    let p = Pair::new_in("psk", hot_peer, fx, &format!("{FUSE_EXTRA}\n{more}"));
    for (name, cfg) in [("hot", &p.hot.config), ("cold", &p.cold.config)] {
        let text = fs::read_to_string(cfg).unwrap();
        let mnt = toml_path(&p.fx.path(&format!("{name}/mnt")));
        fs::write(cfg, text.replace("__MNT__", &mnt)).unwrap();
    }
    p
}

pub(crate) fn mount_point(p: &Pair) -> PathBuf {
    p.fx.path("hot/mnt")
}

/// A FUSE pair (`more` ends `[replication]`) started and synced, the guard that unmounts the
/// hot side's mount point, and that mount point.
pub(crate) fn fuse_pair_started(more: &str) -> (Pair, MountGuard, PathBuf) {
    let mut p = fuse_pair(Fixture::new(), more);
    let guard = MountGuard::new(&p.fx.path("hot/mnt"));
    start_synced(&mut p);
    let mnt = mount_point(&p);
    (p, guard, mnt)
}

/// Starts both sides and waits until the hot one has sent its initial sync.
pub(crate) fn start_synced(p: &mut Pair) {
    p.start("cold");
    p.start("hot");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["synced"]
            == true),
        "the hot side did not sync\n{}",
        p.logs()
    );
}

/// Record `i` of writer `w`: its index, then a byte pattern of both.
pub(crate) fn record(w: u8, i: usize) -> Vec<u8> {
    let fill = w
        .wrapping_mul(31)
        .wrapping_add(u8::try_from(i % 251).unwrap());
    let mut r = vec![fill; RECORD_BYTES];
    r[..8].copy_from_slice(&u64::try_from(i).unwrap().to_le_bytes());
    r
}

fn check(rc: libc::c_long, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// What a writer calls after each sync returns, with the record's index.
type AfterSync<'a> = &'a mut dyn FnMut(usize);

/// NIO: `pwrite` then `fdatasync`, record by record.
fn nio_writer(path: &Path, after: AfterSync) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    for i in 0..RECORDS {
        let r = record(1, i);
        let at = u64::try_from(i * RECORD_BYTES).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &r, at).unwrap();
        f.sync_data().unwrap();
        after(i);
    }
}

/// `O_DSYNC`: each record a `pwrite` that returns once it is synced; no sync call (Artemis'
/// NIO journal with `journal-datasync` and a synced open, or any writer that opens so).
fn dsync_writer(path: &Path, after: AfterSync) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DSYNC)
        .open(path)
        .unwrap();
    for i in 0..RECORDS {
        let r = record(4, i);
        let at = u64::try_from(i * RECORD_BYTES).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &r, at).unwrap();
        after(i);
    }
}

/// The kernel's `struct iocb` (linux/aio_abi.h, little-endian).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// `IOCB_CMD_PWRITE`.
const IOCB_CMD_PWRITE: u16 = 1;

/// ASYNCIO: a preallocated `O_DIRECT` file written by `io_submit` from an aligned buffer,
/// each completion reaped with `io_getevents`, then `fdatasync` (fio's libaio engine with
/// `fsync=1`).
fn aio_writer(path: &Path, after: AfterSync) {
    aio_writer_with(path, true, after);
}

/// As [`aio_writer`], with `fdatasync` after each completion only if `fdatasync`: Artemis'
/// libaio journal never calls it, and takes the completion as the record on the disk.
fn aio_writer_with(path: &Path, fdatasync: bool, after: AfterSync) {
    fs::write(path, vec![0u8; RECORDS * RECORD_BYTES]).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(RECORD_BYTES, RECORD_BYTES).unwrap();
    // SAFETY: the layout has a non-zero size.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    let mut ctx: libc::c_ulong = 0;
    // SAFETY: io_setup writes the new context id into `ctx`.
    check(
        unsafe { libc::syscall(libc::SYS_io_setup, 4, &mut ctx) },
        "io_setup",
    );
    for i in 0..RECORDS {
        let r = record(2, i);
        // SAFETY: `buf` holds RECORD_BYTES bytes and does not overlap `r`.
        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), buf, RECORD_BYTES) };
        let mut cb = Iocb {
            opcode: IOCB_CMD_PWRITE,
            fildes: u32::try_from(f.as_raw_fd()).unwrap(),
            buf: buf as u64,
            nbytes: u64::try_from(RECORD_BYTES).unwrap(),
            offset: i64::try_from(i * RECORD_BYTES).unwrap(),
            ..Iocb::default()
        };
        let mut cbs = [&mut cb as *mut Iocb];
        // SAFETY: `cbs` holds one valid iocb whose buffer outlives the request (reaped below).
        check(
            unsafe { libc::syscall(libc::SYS_io_submit, ctx, 1, cbs.as_mut_ptr()) },
            "io_submit",
        );
        let mut ev = [IoEvent::default()];
        // SAFETY: `ev` has room for the one event asked for; no timeout.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx,
                1,
                1,
                ev.as_mut_ptr(),
                std::ptr::null::<libc::timespec>(),
            )
        };
        assert_eq!(n, 1, "io_getevents: {}", std::io::Error::last_os_error());
        assert_eq!(
            ev[0].res,
            i64::try_from(RECORD_BYTES).unwrap(),
            "AIO write {i}"
        );
        if fdatasync {
            f.sync_data().unwrap();
        }
        after(i);
    }
    // SAFETY: `ctx` came from io_setup and has no request in flight.
    check(
        unsafe { libc::syscall(libc::SYS_io_destroy, ctx) },
        "io_destroy",
    );
    // SAFETY: `buf` came from alloc with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
}

/// MAPPED: a file sized up front, mapped shared, each record stored then `msync(MS_SYNC)`.
fn mmap_writer(path: &Path, after: AfterSync) {
    let len = RECORDS * RECORD_BYTES;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of `len` bytes of an open file; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    for i in 0..RECORDS {
        let r = record(3, i);
        // SAFETY: the record lies inside the mapping (i < RECORDS); the page is synced whole.
        unsafe {
            let at = map.cast::<u8>().add(i * RECORD_BYTES);
            std::ptr::copy_nonoverlapping(r.as_ptr(), at, RECORD_BYTES);
            check(
                libc::c_long::from(libc::msync(at.cast(), RECORD_BYTES, libc::MS_SYNC)),
                "msync",
            );
        }
        after(i);
    }
    // SAFETY: `map` is the mapping made above, of `len` bytes.
    unsafe { libc::munmap(map, len) };
}

/// The records writer `w` made, as the file must hold them.
fn expected(w: u8) -> Vec<u8> {
    (0..RECORDS).flat_map(|i| record(w, i)).collect()
}

#[test]
fn issue12_fuse_capture_pwrite_aio_and_mmap_writers_converge_without_rescans() {
    if !require_root("issue12_fuse", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("");
    assert_eq!(mounts_at(&mnt).len(), 1, "{}", p.logs());
    let link = p.fx.path("hot/base/artemis");
    assert_eq!(
        fs::read_link(&link).unwrap(),
        mnt,
        "the link goes to the mount"
    );
    fs::create_dir(mnt.join("journal")).unwrap();
    nio_writer(&mnt.join("journal/nio.amq"), &mut |_| {});
    aio_writer(&mnt.join("journal/aio.amq"), &mut |_| {});
    mmap_writer(&mnt.join("journal/mmap.amq"), &mut |_| {});
    // a file made by the node's user is the node's, on both sides (the kernel checks the
    // user's access: the fixture's directories are opened to it, the journal given to it)
    for dir in [p.fx.root.clone(), p.fx.path("hot")] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::os::unix::fs::chown(mnt.join("journal"), Some(4321), Some(4322)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=4321", "--regid=4322", "--clear-groups", "touch"])
        .arg(mnt.join("journal/owned.tmp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    fs::rename(mnt.join("journal/owned.tmp"), mnt.join("journal/owned")).unwrap();
    // a file held open across its rename keeps being written, under its new name
    let held = fs::File::create(mnt.join("journal/held.tmp")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&held, b"before the rename|", 0).unwrap();
    fs::rename(mnt.join("journal/held.tmp"), mnt.join("journal/held")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&held, b"after", 18).unwrap();
    held.sync_data().unwrap();
    drop(held);
    let owned = fs::metadata(p.hot.data.join("journal/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (4321, 4322));
    let took = p.assert_converges(CONVERGE);
    eprintln!("three writers x {RECORDS} records converged {took:?} after the last write");
    // the cold side knows the hot side acks async, and how far behind it was
    let async_state = || {
        p.status("cold")["hot_sync"]
            .as_str()
            .is_some_and(|s| s.starts_with("async, "))
    };
    assert!(
        wait_until(Duration::from_secs(5), async_state),
        "{}",
        p.status("cold")
    );
    for (w, name) in [(1, "nio"), (2, "aio"), (3, "mmap")] {
        let cold = fs::read(p.cold.data.join(format!("journal/{name}.amq"))).unwrap();
        assert!(
            cold == expected(w),
            "{name}: the cold copy differs from the records"
        );
    }
    assert_eq!(
        fs::read(p.cold.data.join("journal/held")).unwrap(),
        b"before the rename|after"
    );
    assert!(!p.cold.data.join("journal/held.tmp").exists());
    let cold_owned = fs::metadata(p.cold.data.join("journal/owned")).unwrap();
    assert_eq!((cold_owned.uid(), cold_owned.gid()), (4321, 4322));
    p.stop("hot");
    assert!(mounts_at(&mnt).is_empty(), "a clean stop unmounts");
}

#[test]
fn issue12_kill9_of_the_hot_agent_leaves_a_stale_mount_the_next_start_detaches() {
    if !require_root("issue12_stale", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("");
    fs::write(mnt.join("before"), b"before the crash").unwrap();
    p.kill9("hot");
    let err = fs::metadata(mnt.join("before")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert_eq!(mounts_at(&mnt).len(), 1, "the dead mount is still there");
    p.start("hot");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["synced"]
            == true),
        "{}",
        p.logs()
    );
    assert_eq!(
        mounts_at(&mnt).len(),
        1,
        "one live mount: {:?}",
        mounts_at(&mnt)
    );
    assert_eq!(fs::read(mnt.join("before")).unwrap(), b"before the crash");
    fs::write(mnt.join("after"), b"after the restart").unwrap();
    p.assert_converges(CONVERGE);
    assert_eq!(
        fs::read(p.cold.data.join("after")).unwrap(),
        b"after the restart"
    );
    assert!(p
        .logs()
        .contains("detaching a FUSE mount left by an earlier agent"));
    // a live mount is another agent's: an agent of another config with the same mount
    // point (the control socket already keeps out a second one of the same config) leaves
    // it alone
    let other = p.fx.path("other.toml");
    let text = fs::read_to_string(&p.hot.config).unwrap();
    fs::write(&other, text.replace("hot.sock", "other.sock")).unwrap();
    let out = run(main_cmd().arg("-c").arg(&other).arg("agent"));
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr
            .contains("a live FUSE filesystem is already served"),
        "{out}"
    );
    fs::write(mnt.join("still"), b"served").unwrap();
    p.assert_converges(CONVERGE);
}

#[test]
fn issue12_a_full_disk_under_the_mount_returns_enospc_and_queues_nothing_unwritten() {
    if !require_root("issue12_enospc", "tmpfs and FUSE mounts") {
        return;
    }
    let mut p = fuse_pair(Fixture::new(), "");
    let _tmpfs = MountGuard::new(&p.hot.data);
    let _guard = MountGuard::new(&p.fx.path("hot/mnt"));
    let data = p.hot.data.clone();
    system(
        "mount",
        &["-t", "tmpfs", "-o", "size=1m", "tmpfs"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([data.as_os_str()])
            .collect::<Vec<_>>(),
    );
    start_synced(&mut p);
    let mnt = mount_point(&p);
    let f = fs::File::create(mnt.join("big")).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let (mut written, mut enospc) = (0u64, None);
    for _ in 0..64 {
        match std::os::unix::fs::FileExt::write_at(&f, &chunk, written) {
            Ok(n) => written += u64::try_from(n).unwrap(),
            Err(e) => {
                enospc = Some(e);
                break;
            }
        }
    }
    let e = enospc.expect("1 MiB of tmpfs fills before 4 MiB are written");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(fs::metadata(data.join("big")).unwrap().len(), written);
    p.assert_converges(CONVERGE);
    let cold = fs::read(p.cold.data.join("big")).unwrap();
    assert_eq!(
        u64::try_from(cold.len()).unwrap(),
        written,
        "exactly what was written"
    );
    assert!(cold.iter().all(|&b| b == 0x5a));
    drop(f);
    p.stop("hot");
}

/// Whether the cold copy of `rel` holds record `i` of writer `w` now.
pub(crate) fn cold_has(p: &Pair, rel: &str, w: u8, i: usize) -> bool {
    let Ok(f) = fs::File::open(p.cold.data.join(rel)) else {
        return false;
    };
    let mut buf = vec![0u8; RECORD_BYTES];
    let at = u64::try_from(i * RECORD_BYTES).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, at).is_ok() && buf == record(w, i)
}

#[test]
fn issue12_durable_every_record_is_on_the_cold_disk_when_its_sync_returns() {
    if !require_root("issue12_durable", "FUSE mounts") {
        return;
    }
    let (p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 10000");
    fs::create_dir(mnt.join("journal")).unwrap();
    let mut missing = Vec::new();
    let started = std::time::Instant::now();
    let writers = [
        (1u8, "nio"),
        (2, "aio"),
        (3, "mmap"),
        (4, "dsync"),
        (2, "aio-no-fdatasync"),
    ];
    for (w, name) in writers {
        let rel = format!("journal/{name}.amq");
        let mut check = |i: usize| {
            if !cold_has(&p, &rel, w, i) {
                missing.push(format!("{name} {i}"));
            }
        };
        match (w, name) {
            (1, _) => nio_writer(&mnt.join(&rel), &mut check),
            (2, "aio") => aio_writer(&mnt.join(&rel), &mut check),
            // Artemis' ASYNCIO journal: the completion of an O_DIRECT write is its sync
            (2, _) => aio_writer_with(&mnt.join(&rel), false, &mut check),
            (3, _) => mmap_writer(&mnt.join(&rel), &mut check),
            _ => dsync_writer(&mnt.join(&rel), &mut check),
        }
    }
    let per_sync = started.elapsed() / u32::try_from(writers.len() * RECORDS).unwrap();
    eprintln!(
        "durable: {} x {RECORDS} records, {per_sync:?} per record and sync",
        writers.len()
    );
    assert!(
        missing.is_empty(),
        "not on the cold disk when the sync returned: {missing:?}"
    );
    assert!(
        p.status("hot").get("degraded").is_none(),
        "{}",
        p.status("hot")
    );
}

/// Several writers at once, each syncing its own records while the others' writes and syncs
/// come between (the FUSE thread handles a write's event itself only when nothing is queued
/// ahead of it): each finds every record on the cold disk when its sync returns.
#[test]
fn issue12_durable_concurrent_writers_each_find_their_records_on_the_cold_disk() {
    if !require_root("issue12_durable_concurrent", "FUSE mounts") {
        return;
    }
    const WRITERS: u8 = 4;
    const EACH: usize = 100;
    let (p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 10000");
    let missing: Vec<String> = std::thread::scope(|s| {
        let writers: Vec<_> = (1..=WRITERS)
            .map(|w| {
                let (p, mnt) = (&p, &mnt);
                s.spawn(move || {
                    let rel = format!("w{w}.amq");
                    let f = fs::File::create(mnt.join(&rel)).unwrap();
                    let mut missing = Vec::new();
                    for i in 0..EACH {
                        let at = u64::try_from(i * RECORD_BYTES).unwrap();
                        std::os::unix::fs::FileExt::write_all_at(&f, &record(w, i), at).unwrap();
                        f.sync_data().unwrap();
                        if !cold_has(p, &rel, w, i) {
                            missing.push(format!("{rel} {i}"));
                        }
                    }
                    missing
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    assert!(
        missing.is_empty(),
        "not on the cold disk when the sync returned: {missing:?}"
    );
    assert!(p.status("hot").get("degraded").is_none());
}

#[test]
fn issue12_durable_with_the_cold_side_gone_degrades_after_the_timeout_and_recovers() {
    if !require_root("issue12_degrade", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 500");
    let f = fs::File::create(mnt.join("j")).unwrap();
    let write_sync = |i: usize| {
        let at = u64::try_from(i * RECORD_BYTES).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &record(4, i), at).unwrap();
        let t = std::time::Instant::now();
        f.sync_data().unwrap();
        t.elapsed()
    };
    write_sync(0);
    assert!(
        cold_has(&p, "j", 4, 0),
        "durable while the cold side is there"
    );
    p.stop("cold");
    let waited = write_sync(1);
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "the first sync without the peer waited {waited:?}"
    );
    let degraded = p.status("hot")["degraded"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(degraded.contains("may lack data"), "{}", p.status("hot"));
    let waited = write_sync(2);
    assert!(
        waited < Duration::from_millis(400),
        "degraded syncs do not wait: {waited:?}"
    );
    assert!(p.logs().contains("DEGRADED"));
    p.start("cold");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["synced"]
            == true),
        "{}",
        p.logs()
    );
    // the next sync is acknowledged in time: durable again
    write_sync(3);
    assert!(cold_has(&p, "j", 4, 3), "durable again after the catch-up");
    assert!(
        p.status("hot").get("degraded").is_none(),
        "{}",
        p.status("hot")
    );
    for i in 0..4 {
        assert!(cold_has(&p, "j", 4, i), "record {i} after the catch-up");
    }
    drop(f);
    let out = artemis_sync(&p.hot.config, ["verify"]);
    out.code(0).stdout_has(&["identical"]);
}

/// Kill -9 runs of the durable test.
const KILL_RUNS: usize = 5;

#[test]
fn issue12_durable_kill9_of_the_hot_agent_loses_no_record_whose_sync_returned() {
    if !require_root("issue12_durable_kill9", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 10000");
    for run in 0..KILL_RUNS {
        let rel = format!("j{run}");
        let path = mnt.join(&rel);
        let writer = std::thread::spawn(move || {
            let f = fs::File::create(path).unwrap();
            // the index of every record whose fdatasync returned success
            let mut synced = Vec::new();
            for i in 0..10_000 {
                let at = u64::try_from(i * RECORD_BYTES).unwrap();
                let rec = record(5, i);
                if std::os::unix::fs::FileExt::write_all_at(&f, &rec, at).is_err()
                    || f.sync_data().is_err()
                {
                    break;
                }
                synced.push(i);
            }
            synced
        });
        std::thread::sleep(Duration::from_millis(
            150 + 50 * u64::try_from(run).unwrap(),
        ));
        p.kill9("hot");
        let synced = writer.join().unwrap();
        assert!(synced.len() > 1, "run {run}: the loop ran ({synced:?})");
        let lost: Vec<_> = synced
            .iter()
            .filter(|&&i| !cold_has(&p, &rel, 5, i))
            .collect();
        assert!(
            lost.is_empty(),
            "run {run}: {} of {} synced records missing on the cold side: {lost:?}",
            lost.len(),
            synced.len()
        );
        eprintln!(
            "run {run}: {} synced records, all on the cold side",
            synced.len()
        );
        p.start("hot");
        assert!(
            wait_until(Duration::from_secs(20), || p.status("hot")["synced"]
                == true),
            "{}",
            p.logs()
        );
    }
}

/// A file of `pages` pages of 4 KiB whose every page differs from the others and from the
/// other files' (`seed`).
fn paged(seed: u8, pages: usize) -> Vec<u8> {
    (0..pages * 4096)
        .map(|i| u8::try_from((i / 4096 * 7 + i % 251 + usize::from(seed) * 13) % 256).unwrap())
        .collect()
}

#[test]
fn issue15_a_resync_after_a_cold_restart_reads_only_what_the_prehash_cannot_prove_equal() {
    if !require_root("issue15_prehash", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("");
    let mut want: Vec<(&str, Vec<u8>)> = ["a", "b", "c"]
        .iter()
        .zip(1u8..)
        .map(|(name, seed)| (*name, paged(seed, 64)))
        .collect();
    for (name, data) in &want {
        fs::write(mnt.join(name), data).unwrap();
    }
    let cold = p.cold.data.clone();
    let copied = |want: &[(&str, Vec<u8>)]| {
        want.iter()
            .all(|(name, data)| fs::read(cold.join(name)).is_ok_and(|d| d == *data))
    };
    assert!(
        wait_until(CONVERGE, || copied(&want)),
        "not copied\n{}",
        p.logs()
    );
    p.stop("cold");
    // while the cold side is away: a page of `a` through the mount (an event), a page of `b`
    // behind the mount's back (only its ctime tells); `c` untouched
    let page = |byte: u8| vec![byte; 4096];
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("a"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &page(0xa5), 5 * 4096).unwrap();
    drop(f);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p.hot.data.join("b"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &page(0xb7), 7 * 4096).unwrap();
    drop(f);
    want[0].1[5 * 4096..6 * 4096].copy_from_slice(&page(0xa5));
    want[1].1[7 * 4096..8 * 4096].copy_from_slice(&page(0xb7));
    // a stray file on the cold side: removed by the resync, and 64 MiB for its index to
    // hash, so the hot side's pre-hash of 768 KiB is done before the index arrives
    fs::write(cold.join("zz-stray"), vec![1u8; 64 << 20]).unwrap();
    // every change older than the racy window, so each file is pre-hashed
    std::thread::sleep(Duration::from_millis(300));
    p.start("cold");
    assert!(
        wait_until(CONVERGE, || p.status("hot")["synced"] == true
            && copied(&want)),
        "the resync did not bring the changes\n{}",
        p.logs()
    );
    assert!(!cold.join("zz-stray").exists(), "the stray file is kept");
    // 63 + 63 + 64: every page but the two changed ones proven equal
    assert!(
        p.logs().contains("pre-hash proved equal pages=190"),
        "{}",
        p.logs()
    );
    let out = artemis_sync(&p.hot.config, ["verify"]);
    out.code(0).stdout_has(&["identical"]);
}
