//! `artemis-sync link [--migrate] [--force]` on a premounted share (a plain temp directory),
//! and `doctor` on the result. No root needed.

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// A Corda base directory, a share, and a premounted config pointing at them.
#[derive(Debug)]
struct Setup {
    fx: Fixture,
    base: PathBuf,
    share: PathBuf,
    link: PathBuf,
    config: PathBuf,
}

fn setup() -> Setup {
    let fx = Fixture::new();
    let base = fx.mkdir("corda");
    let share = fx.mkdir("share");
    let config = fx.write("agent.toml", premounted_config(&base, &share));
    let link = base.join("artemis");
    Setup {
        fx,
        base,
        share,
        link,
        config,
    }
}

impl Setup {
    fn link(&self, args: &[&str]) -> Output {
        let mut all = vec!["link"];
        all.extend_from_slice(args);
        artemis_sync(&self.config, all)
    }

    /// The directories named `artemis.pre-artemis-sync.*` in the base directory.
    fn asides(&self) -> Vec<String> {
        names(&self.base)
            .into_iter()
            .filter(|n| n.starts_with("artemis.pre-artemis-sync."))
            .collect()
    }
}

/// A small journal: files of several modes and sizes in nested directories, an empty file,
/// a relative symlink.
fn write_journal(dir: &Path) {
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    write_file(&dir.join("journal/activemq-data-1.amq"), &data);
    write_file(&dir.join("journal/activemq-data-2.amq"), &data[..100_000]);
    write_file(
        &dir.join("bindings/activemq-bindings-1.bindings"),
        &[7u8; 4096],
    );
    write_file(&dir.join("paging/abc-def/000000001.page"), b"page");
    write_file(&dir.join("paging/abc-def/address.txt"), b"my.address\n");
    write_file(&dir.join("large-messages/42.msg"), &data[..12_345]);
    write_file(&dir.join("server.lock"), b"");
    chmod(&dir.join("server.lock"), 0o600);
    chmod(&dir.join("journal/activemq-data-2.amq"), 0o640);
    chmod(&dir.join("large-messages/42.msg"), 0o755);
    chmod(&dir.join("paging"), 0o750);
    symlink("journal/activemq-data-1.amq", dir.join("latest.amq")).unwrap();
}

#[test]
fn issue2_link_creates_the_symlink_then_is_a_no_op() {
    let s = setup();
    s.fx.write("share/journal/activemq-data-1.amq", b"already in the share");
    let share_before = snapshot(&s.share);
    s.link(&[]).code(0).stdout_has(&[&format!(
        "linked {} -> {}",
        s.link.display(),
        s.share.display()
    )]);
    assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
    s.link(&[]).code(0).stdout_has(&[&format!(
        "{} already links to {}; nothing to do",
        s.link.display(),
        s.share.display()
    )]);
    assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
    // no temporary link left behind, the share untouched and reachable
    assert_eq!(names(&s.base), ["artemis"]);
    assert_eq!(snapshot(&s.share), share_before);
    assert_eq!(
        fs::read(s.link.join("journal/activemq-data-1.amq")).unwrap(),
        b"already in the share"
    );
}

#[test]
fn link_replaces_an_empty_directory() {
    let s = setup();
    fs::create_dir(&s.link).unwrap();
    s.link(&[]).code(0).stdout_has(&["linked"]);
    assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
}

#[test]
fn issue2_link_refuses_a_journal_directory_and_changes_nothing() {
    let s = setup();
    write_journal(&s.link);
    let before = snapshot(&s.link);
    let out = s.link(&[]);
    out.code(5).stderr_has(&[
        &s.link.display().to_string(),
        "real directory holding 6 entries",
        "--migrate",
    ]);
    assert!(s.link.is_dir() && !s.link.is_symlink());
    assert_eq!(snapshot(&s.link), before, "the journal changed");
    assert!(
        names(&s.share).is_empty(),
        "something was written to the share"
    );
    assert_eq!(names(&s.base), ["artemis"]);
    // --force does not replace a directory either
    s.link(&["--force"]).code(5);
    assert_eq!(snapshot(&s.link), before);
}

#[test]
fn issue2_link_migrate_moves_every_file_verified_and_keeps_the_old_directory() {
    let s = setup();
    write_journal(&s.link);
    let before = snapshot(&s.link);
    let files = before
        .values()
        .filter(|n| !matches!(n, Node::Dir { .. }))
        .count();
    let bytes: u64 = before
        .values()
        .map(|n| match n {
            Node::File { len, .. } => *len,
            _ => 0,
        })
        .sum();
    let out = s.link(&["--migrate"]);
    out.code(0).stdout_has(&[
        &format!("migrated {files} files ({bytes} bytes, every file verified by blake3; {files} copied, 0 already in the share)"),
        &format!("linked {} -> {}", s.link.display(), s.share.display()),
    ]);
    assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
    // everything reachable through the link: same bytes, modes and mtimes
    assert_eq!(snapshot(&s.link), before);
    assert_eq!(
        fs::read(s.link.join("latest.amq")).unwrap(),
        fs::read(s.share.join("journal/activemq-data-1.amq")).unwrap()
    );
    // the old directory is kept, intact, under a timestamped name
    let asides = s.asides();
    assert_eq!(asides.len(), 1, "{:?}", names(&s.base));
    let stamp = asides[0].strip_prefix("artemis.pre-artemis-sync.").unwrap();
    assert!(
        stamp.len() == 16
            && stamp.as_bytes()[8] == b'T'
            && stamp.ends_with('Z')
            && stamp[..8]
                .bytes()
                .chain(stamp[9..15].bytes())
                .all(|b| b.is_ascii_digit()),
        "timestamp {stamp:?}"
    );
    let aside = s.base.join(&asides[0]);
    out.stdout_has(&[&format!("old directory kept at {}", aside.display())]);
    assert_eq!(snapshot(&aside), before);
    // no temporaries in the share or the base directory
    assert!(
        snapshot(&s.share)
            .keys()
            .all(|p| !p.to_string_lossy().contains("artemis-sync-tmp")),
        "temporaries left in the share"
    );
    assert_eq!(names(&s.base).len(), 2, "{:?}", names(&s.base));
    // a second run is a no-op
    s.link(&[]).code(0).stdout_has(&["nothing to do"]);
    s.link(&["--migrate"])
        .code(0)
        .stdout_has(&["nothing to do"]);
    assert_eq!(s.asides().len(), 1);
    // and doctor agrees
    let doctor = artemis_sync(&s.config, ["doctor", "--json"]);
    doctor.code(0);
    let report: serde_json::Value =
        serde_json::from_str(&doctor.stdout).expect("doctor --json is JSON");
    assert_eq!(report["ok"], true, "{doctor}");
    for check in report["checks"].as_array().unwrap() {
        assert_eq!(check["status"], "ok", "{check}");
    }
}

/// A journal whose broker runs (a process holds the fcntl lock ActiveMQ Artemis keeps on
/// `server.lock`) is not migrated: the node writing on would leave the copy behind, or have
/// its newest files moved aside. The error names the lock and its holder, and nothing
/// changes; once the lock is gone the migration runs.
#[test]
fn issue2_link_migrate_refuses_while_the_broker_holds_its_lock() {
    use std::os::fd::AsRawFd;
    let s = setup();
    write_journal(&s.link);
    let before = snapshot(&s.link);
    let lock_file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.link.join("server.lock"))
        .unwrap();
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::c_short::try_from(libc::F_WRLCK).unwrap();
    lock.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap();
    lock.l_start = 1; // a byte range, as Artemis locks it
    lock.l_len = 1;
    // SAFETY: F_SETLK reads the `flock` we own; the descriptor is open for the call.
    let rc = unsafe { libc::fcntl(lock_file.as_raw_fd(), libc::F_SETLK, &lock) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    s.link(&["--migrate"]).code(5).stderr_has(&[
        "the broker is running",
        &format!("process {}", std::process::id()),
        &s.link.join("server.lock").display().to_string(),
    ]);
    assert!(s.link.is_dir() && !s.link.is_symlink());
    assert_eq!(snapshot(&s.link), before, "the source changed");
    assert!(s.asides().is_empty());
    assert!(names(&s.share).is_empty(), "{:?}", names(&s.share));
    drop(lock_file); // the broker stopped
    s.link(&["--migrate"]).code(0).stdout_has(&["migrated"]);
    assert_eq!(snapshot(&s.link), before);
}

/// A journal in `${BASE_DIR}/artemis` and the share served from `backing` by the FUSE fault
/// layer: the set-up, `backing`, the layer and the journal's snapshot; `None` when not root.
fn journal_over_faultfs(test: &str) -> Option<(Setup, PathBuf, crate::faultfs::FaultFs, Tree)> {
    if !require_root(test, "a FUSE mount") {
        return None;
    }
    let s = setup();
    let backing = s.fx.path("backing");
    let faultfs = crate::faultfs::FaultFs::mount(&backing, &s.share);
    write_journal(&s.link);
    let before = snapshot(&s.link);
    Some((s, backing, faultfs, before))
}

/// After a failed migration: the journal a directory as it was, nothing set aside, and no
/// temporary left in the share.
#[track_caller]
fn assert_nothing_migrated(s: &Setup, backing: &Path, before: &Tree) {
    let temporaries: Vec<_> = snapshot(backing)
        .into_keys()
        .filter(|p| p.to_string_lossy().contains("artemis-sync-tmp"))
        .collect();
    assert!(temporaries.is_empty(), "left in the share: {temporaries:?}");
    assert!(s.link.is_dir() && !s.link.is_symlink());
    assert_eq!(&snapshot(&s.link), before, "the source changed");
    assert!(s.asides().is_empty());
}

/// A copy that fails part way (the share's fsync answers `EIO`) leaves no hidden temporary in
/// the share, and the source where it was; a run after the share recovers completes.
#[test]
fn issue2_link_migrate_a_failed_copy_leaves_no_temporary_in_the_share() {
    let Some((s, backing, faultfs, before)) =
        journal_over_faultfs("issue2_link_migrate_a_failed_copy_leaves_no_temporary_in_the_share")
    else {
        return;
    };
    faultfs.set_fsync_failing(true);
    s.link(&["--migrate"])
        .failed()
        .stderr_has(&["cannot fsync", ".artemis-sync-tmp"]);
    assert!(faultfs.failed_calls() > 0, "no fsync failed");
    assert_nothing_migrated(&s, &backing, &before);
    faultfs.set_fsync_failing(false);
    s.link(&["--migrate"]).code(0).stdout_has(&["migrated"]);
    assert_eq!(snapshot(&s.link), before);
}

/// A share that maps root to nobody (`root_squash`) refuses the owners a migration run as
/// root gives: the error says so and how to fix the export, instead of "Operation not
/// permitted" on a hidden temporary, and nothing is changed.
#[test]
fn issue2_link_migrate_onto_a_root_squashing_share_says_so() {
    let Some((s, backing, faultfs, before)) =
        journal_over_faultfs("issue2_link_migrate_onto_a_root_squashing_share_says_so")
    else {
        return;
    };
    faultfs.set_squashing_root(true);
    s.link(&["--migrate"]).code(5).stderr_has(&[
        "root_squash",
        "no_root_squash",
        "the source is intact",
    ]);
    assert_nothing_migrated(&s, &backing, &before);
}

#[test]
fn issue2_link_pointing_elsewhere_needs_force() {
    let s = setup();
    let other = s.fx.mkdir("other");
    s.fx.write("other/journal/activemq-data-1.amq", b"other journal");
    let other_before = snapshot(&other);
    symlink(&other, &s.link).unwrap();
    s.link(&[]).code(5).stderr_has(&[
        &s.link.display().to_string(),
        &other.display().to_string(),
        &s.share.display().to_string(),
        "--force",
    ]);
    assert_eq!(fs::read_link(&s.link).unwrap(), other);
    s.link(&["--migrate"]).code(5);
    assert_eq!(fs::read_link(&s.link).unwrap(), other);
    s.link(&["--force"]).code(0).stdout_has(&[&format!(
        "linked {} -> {} (it pointed to {})",
        s.link.display(),
        s.share.display(),
        other.display()
    )]);
    assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
    assert_eq!(
        snapshot(&other),
        other_before,
        "the old link's target was touched"
    );
    assert_eq!(names(&s.base), ["artemis"]);
}

#[test]
fn link_names_a_missing_base_dir_or_share() {
    let fx = Fixture::new();
    let share = fx.mkdir("share");
    let missing_base = fx.path("no-such-corda");
    let config = fx.write("agent.toml", premounted_config(&missing_base, &share));
    let out = artemis_sync(&config, ["link"]);
    out.failed()
        .stderr_has(&[&missing_base.display().to_string(), "base_dir"]);
    assert!(!missing_base.exists(), "the base directory was created");
    assert!(names(&share).is_empty());

    let base = fx.mkdir("corda");
    let missing_share = fx.path("unmounted");
    let config = fx.write("agent2.toml", premounted_config(&base, &missing_share));
    let out = artemis_sync(&config, ["link"]);
    out.failed()
        .stderr_has(&[&missing_share.display().to_string(), "mount it first"]);
    assert!(
        names(&base).is_empty(),
        "a link to a missing share was made"
    );
}

#[test]
fn link_refuses_a_regular_file_in_the_way() {
    let s = setup();
    fs::write(&s.link, b"not a journal").unwrap();
    s.link(&["--migrate", "--force"]).code(5).stderr_has(&[
        &s.link.display().to_string(),
        "neither a directory nor a symlink",
    ]);
    assert_eq!(fs::read(&s.link).unwrap(), b"not a journal");
}

#[test]
fn issue2_link_migrate_refuses_to_overwrite_a_different_file_in_the_share() {
    let s = setup();
    write_journal(&s.link);
    let before = snapshot(&s.link);
    let theirs = s.fx.write(
        "share/journal/activemq-data-1.amq",
        b"the other VM's journal",
    );
    let out = s.link(&["--migrate"]);
    out.code(5).stderr_has(&[
        &theirs.display().to_string(),
        &s.link
            .join("journal/activemq-data-1.amq")
            .display()
            .to_string(),
        "already exists in the share with other content",
    ]);
    assert_eq!(
        fs::read(&theirs).unwrap(),
        b"the other VM's journal",
        "the share file was overwritten"
    );
    assert!(
        s.link.is_dir() && !s.link.is_symlink(),
        "the source was replaced"
    );
    assert_eq!(snapshot(&s.link), before, "the source changed");
    assert!(s.asides().is_empty(), "the source was moved aside");
}

/// The content of big file `i`: one pseudo-random block, stamped with `i` every 4 KiB so that
/// every file differs.
fn big_content(base: &[u8], i: u64) -> Vec<u8> {
    let mut v = base.to_vec();
    for chunk in v.chunks_mut(4096) {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
    }
    v
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Complete (renamed into place) files in `dir`.
fn complete_files(dir: &Path) -> usize {
    names(dir).iter().filter(|n| !n.starts_with('.')).count()
}

#[test]
fn issue2_interrupted_migration_leaves_the_source_intact_and_completes_on_rerun() {
    const FILE_BYTES: usize = 4 << 20;
    let block = pseudo_random(FILE_BYTES);
    let name = |i: usize| format!("activemq-data-{i:03}.amq");
    for (attempt, files) in [64usize, 160].into_iter().enumerate() {
        let s = setup();
        let journal = s.link.join("journal");
        for i in 0..files {
            write_file(&journal.join(name(i)), &big_content(&block, i as u64));
        }
        let shared_journal = s.share.join("journal");

        let mut child = spawn(
            main_cmd()
                .arg("-c")
                .arg(&s.config)
                .args(["link", "--migrate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let started = Instant::now();
        let mut seen = 0;
        for _ in 0..20_000 {
            seen = complete_files(&shared_journal);
            if seen > 0 || started.elapsed() > Duration::from_secs(20) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let status = child.wait().unwrap();
        let at_kill = complete_files(&shared_journal);
        if !running || status.signal() != Some(9) || at_kill >= files {
            assert_eq!(
                attempt, 0,
                "the migration of {files} files finished before it could be killed ({status:?})"
            );
            eprintln!("note: the migration of {files} files finished before the kill; retrying with a bigger tree");
            continue;
        }
        assert!(
            seen > 0,
            "no file appeared in the share within the time limit"
        );

        // The source is intact and still a real directory; nothing is aside yet.
        assert!(
            s.link.is_dir() && !s.link.is_symlink(),
            "the source is no longer a directory"
        );
        assert_eq!(s.asides(), Vec::<String>::new());
        assert_eq!(complete_files(&journal), files);
        for i in 0..files {
            assert!(
                fs::read(journal.join(name(i))).unwrap() == big_content(&block, i as u64),
                "source file {i} changed"
            );
        }
        // What reached the share is complete and correct.
        for n in names(&shared_journal)
            .iter()
            .filter(|n| !n.starts_with('.'))
        {
            let i: u64 = n["activemq-data-".len()..n.len() - 4].parse().unwrap();
            assert!(
                fs::read(shared_journal.join(n)).unwrap() == big_content(&block, i),
                "{n} in the share is wrong"
            );
        }

        // Running it again completes the migration.
        let out = s.link(&["--migrate"]);
        out.code(0)
            .stdout_has(&[&format!("migrated {files} files"), "already in the share"]);
        let counts = out
            .stdout
            .split_once("blake3; ")
            .and_then(|(_, rest)| rest.split_once(" already in the share"))
            .map(|(c, _)| c.to_owned())
            .expect("the counts");
        let (copied, present) = counts.split_once(" copied, ").expect("copied, present");
        let (copied, present): (usize, usize) = (copied.parse().unwrap(), present.parse().unwrap());
        assert_eq!(copied + present, files, "{out}");
        assert!(
            present >= at_kill && present >= 1,
            "{out}\n{at_kill} files were in the share at the kill"
        );
        assert_eq!(fs::read_link(&s.link).unwrap(), s.share);
        let asides = s.asides();
        assert_eq!(asides.len(), 1);
        let aside = s.base.join(&asides[0]).join("journal");
        for i in 0..files {
            let want = big_content(&block, i as u64);
            assert!(
                fs::read(journal.join(name(i))).unwrap() == want,
                "file {i} through the link"
            );
            assert!(
                fs::read(aside.join(name(i))).unwrap() == want,
                "file {i} kept aside"
            );
        }
        assert_eq!(
            names(&shared_journal).len(),
            files,
            "temporaries left: {:?}",
            names(&shared_journal)
        );
        return;
    }
    unreachable!("both attempts returned or failed");
}

/// `link --migrate` with an fstab backend whose share is not mounted (the mount failed at boot
/// under `nofail`, or was never made) copied the journal into the empty local directory
/// under the mount point and linked to it: once the share was mounted over that directory,
/// the node found an empty share and the journal was hidden beneath it. It must refuse, and
/// change nothing, until the share is mounted.
#[test]
fn link_migrate_refuses_a_share_that_is_not_mounted() {
    let s = setup();
    let export = s.fx.mkdir("export");
    let config = s.fx.write(
        "bind.toml",
        format!(
            "[node]\nbase_dir = {}\n\n[storage]\nbackend = \"bind\"\nsource = {}\nmount_point = {}\n",
            toml_path(&s.base),
            toml_path(&export),
            toml_path(&s.share)
        ),
    );
    write_journal(&s.link);
    let before = snapshot(&s.link);
    artemis_sync(&config, ["link", "--migrate"])
        .code(5)
        .stderr_has(&["not mounted", "artemis-sync mount"]);
    assert_eq!(snapshot(&s.link), before, "the journal directory changed");
    assert!(
        names(&s.share).is_empty(),
        "copied into the unmounted mount point"
    );
    assert!(s.asides().is_empty());
}
