//! The link's unit tests: creation, idempotence, refusals, migration with verification, a
//! re-run after an interruption, conflicts, and the timestamp format.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    share: PathBuf,
    link: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("corda");
    let share = tmp.path().join("share");
    fs::create_dir_all(&base).unwrap();
    fs::create_dir_all(&share).unwrap();
    let link = base.join("artemis");
    Fixture {
        _tmp: tmp,
        base,
        share,
        link,
    }
}

fn write_journal(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files = vec![
        (
            PathBuf::from("journal/activemq-data-1.amq"),
            (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        ),
        (
            PathBuf::from("bindings/activemq-bindings-1.bindings"),
            vec![7u8; 4096],
        ),
        (PathBuf::from("paging/abc/000000001.page"), b"page".to_vec()),
        (PathBuf::from("server.lock"), Vec::new()),
    ];
    for (rel, data) in &files {
        fs::create_dir_all(dir.join(rel).parent().unwrap()).unwrap();
        fs::write(dir.join(rel), data).unwrap();
    }
    files
}

#[test]
fn creates_then_is_a_no_op() {
    let f = fixture();
    assert_eq!(
        link(&f.link, &f.share, LinkOptions::default()).unwrap(),
        LinkOutcome::Created
    );
    assert_eq!(fs::read_link(&f.link).unwrap(), f.share);
    assert_eq!(
        link(&f.link, &f.share, LinkOptions::default()).unwrap(),
        LinkOutcome::AlreadyLinked
    );
    // no temporary link is left behind
    assert_eq!(fs::read_dir(&f.base).unwrap().count(), 1);
}

#[test]
fn replaces_an_empty_directory() {
    let f = fixture();
    fs::create_dir(&f.link).unwrap();
    assert_eq!(
        link(&f.link, &f.share, LinkOptions::default()).unwrap(),
        LinkOutcome::Created
    );
    assert!(f.link.is_symlink());
}

#[test]
fn refuses_a_directory_with_files_and_changes_nothing() {
    let f = fixture();
    let files = write_journal(&f.link);
    let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("real directory holding 4 entries") && msg.contains("--migrate"),
        "{msg}"
    );
    assert!(f.link.is_dir() && !f.link.is_symlink());
    for (rel, data) in files {
        assert_eq!(fs::read(f.link.join(rel)).unwrap(), data);
    }
    assert_eq!(fs::read_dir(&f.share).unwrap().count(), 0);
}

#[test]
fn migrates_verifies_and_keeps_the_old_directory() {
    let f = fixture();
    let files = write_journal(&f.link);
    fs::set_permissions(
        f.link.join("server.lock"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    )
    .unwrap();
    let LinkOutcome::Migrated(report) = out else {
        panic!("{out:?}")
    };
    assert_eq!(report.copied, 4);
    assert!(report
        .aside
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("artemis.pre-artemis-sync.20"));
    for (rel, data) in &files {
        assert_eq!(
            &fs::read(f.link.join(rel)).unwrap(),
            data,
            "through the link"
        );
        assert_eq!(
            &fs::read(report.aside.join(rel)).unwrap(),
            data,
            "kept aside"
        );
    }
    let mode = fs::metadata(f.share.join("server.lock")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        link(&f.link, &f.share, LinkOptions::default()).unwrap(),
        LinkOutcome::AlreadyLinked
    );
}

#[test]
fn a_rerun_after_interruption_completes_and_a_foreign_file_is_a_conflict() {
    let f = fixture();
    let files = write_journal(&f.link);
    // an interrupted run: one file copied, one half-written temporary
    fs::create_dir_all(f.share.join("journal")).unwrap();
    fs::write(f.share.join("journal/activemq-data-1.amq"), &files[0].1).unwrap();
    fs::create_dir_all(f.share.join("bindings")).unwrap();
    fs::write(
        f.share
            .join("bindings/.activemq-bindings-1.bindings.artemis-sync-tmp"),
        b"half",
    )
    .unwrap();
    let out = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    )
    .unwrap();
    let LinkOutcome::Migrated(report) = out else {
        panic!("{out:?}")
    };
    assert_eq!((report.copied, report.already_present), (3, 1));
    assert!(!f
        .share
        .join("bindings/.activemq-bindings-1.bindings.artemis-sync-tmp")
        .exists());

    // a share that already holds a different file of the same name is never overwritten
    let g = fixture();
    write_journal(&g.link);
    fs::create_dir_all(g.share.join("journal")).unwrap();
    fs::write(
        g.share.join("journal/activemq-data-1.amq"),
        b"the other VM's journal",
    )
    .unwrap();
    let err = link(
        &g.link,
        &g.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, LinkError::Conflict { .. }), "{err}");
    assert_eq!(
        fs::read_dir(&g.share).unwrap().count(),
        1,
        "nothing else was written to the share"
    );
    assert_eq!(
        fs::read(g.share.join("journal/activemq-data-1.amq")).unwrap(),
        b"the other VM's journal"
    );
    assert!(g.link.is_dir() && !g.link.is_symlink(), "source untouched");
}

#[test]
fn a_link_elsewhere_needs_force() {
    let f = fixture();
    let other = f.base.join("other");
    fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(&other, &f.link).unwrap();
    let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(fs::read_link(&f.link).unwrap(), other);
    let out = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: false,
            force: true,
        },
    )
    .unwrap();
    assert_eq!(out, LinkOutcome::Replaced { previous: other });
    assert_eq!(fs::read_link(&f.link).unwrap(), f.share);
}

#[test]
fn missing_base_dir_target_and_odd_files_are_named() {
    let f = fixture();
    let err = link(
        &f.base.join("nope/artemis"),
        &f.share,
        LinkOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("nope") && err.to_string().contains("base_dir"),
        "{err}"
    );
    let err = link(&f.link, &f.base.join("unmounted"), LinkOptions::default()).unwrap_err();
    assert!(err.to_string().contains("unmounted"), "{err}");
    fs::write(&f.link, b"x").unwrap();
    let err = link(&f.link, &f.share, LinkOptions::default()).unwrap_err();
    assert!(matches!(err, LinkError::NotALinkOrDirectory(_)), "{err}");
}

#[test]
fn utc_stamp_formats_known_instants() {
    assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
    assert_eq!(
        utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_319_827)),
        "20261122T035707Z"
    );
    assert_eq!(
        utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
        "20000229T000000Z"
    );
}

/// Regression (issue 2, found by a review of shared mode): a symlink in the share where the
/// source has a directory was followed, and the files landed wherever it pointed (here outside
/// the share) while the migration reported success. It is a conflict, found before anything is
/// written.
#[test]
fn issue2_a_symlink_in_the_share_where_the_source_has_a_directory_is_a_conflict() {
    let f = fixture();
    let files = write_journal(&f.link);
    let outside = f.base.parent().unwrap().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.share.join("journal")).unwrap();
    let r = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    );
    match &r {
        Err(LinkError::Conflict { original, dest }) => {
            assert_eq!(original, &f.link.join("journal"));
            assert_eq!(dest, &f.share.join("journal"));
        }
        other => panic!("expected a conflict on the share's symlink, got {other:?}"),
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written through the share's symlink, outside the share"
    );
    // nothing was written to the share, the source is intact and still a directory
    let share: Vec<_> = fs::read_dir(&f.share)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(share, vec![std::ffi::OsString::from("journal")]);
    assert!(fs::symlink_metadata(&f.link).unwrap().is_dir());
    for (rel, data) in &files {
        assert_eq!(&fs::read(f.link.join(rel)).unwrap(), data);
    }
}

/// Regression (issue 2, found by a review of shared mode): a source file named like another
/// file's temporary (`.X.artemis-sync-tmp`) was copied, then overwritten in the share by X's
/// temporary and renamed away: the share lost it. Such a name is refused before anything is
/// written.
#[test]
fn issue2_a_source_file_named_like_a_temporary_is_refused_before_any_write() {
    let f = fixture();
    fs::create_dir_all(&f.link).unwrap();
    fs::write(f.link.join(".a.artemis-sync-tmp"), b"precious").unwrap();
    fs::write(f.link.join("a"), b"other").unwrap();
    let r = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    );
    match &r {
        Err(e @ LinkError::ReservedName(path)) => {
            assert_eq!(path, &f.link.join(".a.artemis-sync-tmp"));
            assert!(e.to_string().contains(".a.artemis-sync-tmp"), "{e}");
        }
        other => panic!("expected the temporary-like name to be refused, got {other:?}"),
    }
    assert_eq!(
        fs::read_dir(&f.share).unwrap().count(),
        0,
        "the share was written to"
    );
    assert!(fs::symlink_metadata(&f.link).unwrap().is_dir());
    assert_eq!(
        fs::read(f.link.join(".a.artemis-sync-tmp")).unwrap(),
        b"precious"
    );
    assert_eq!(fs::read(f.link.join("a")).unwrap(), b"other");
}

/// Regression (issue 2, found by a review of shared mode): owners were not carried over, the
/// share got root-owned files, directories and links, which the node (running as its own
/// user, README's `setpriv --reuid=corda`) cannot write.
#[test]
fn issue2_migration_keeps_the_owners_of_files_directories_and_links() {
    let f = fixture();
    let files = write_journal(&f.link);
    std::os::unix::fs::symlink("journal", f.link.join("current")).unwrap();
    // the node's user owns its journal
    let mut owned = vec![PathBuf::from("current")];
    for (rel, _) in &files {
        owned.push(rel.clone());
        let mut d = rel.parent().unwrap().to_owned();
        while !d.as_os_str().is_empty() {
            owned.push(d.clone());
            d = d.parent().unwrap().to_owned();
        }
    }
    for rel in &owned {
        std::os::unix::fs::lchown(f.link.join(rel), Some(1000), Some(1000)).unwrap();
    }
    // the journal directory itself too; the share's root is root's own, as a server makes it
    std::os::unix::fs::lchown(&f.link, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(&f.link, fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(&f.share, fs::Permissions::from_mode(0o755)).unwrap();
    link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    )
    .unwrap();
    let mut wrong = Vec::new();
    for rel in &owned {
        let p = f.share.join(rel);
        let m = fs::symlink_metadata(&p).unwrap();
        if m.uid() != 1000 || m.gid() != 1000 {
            wrong.push(format!("{} is {}:{}", p.display(), m.uid(), m.gid()));
        }
    }
    assert!(fs::symlink_metadata(f.share.join("current"))
        .unwrap()
        .is_symlink());
    assert!(
        wrong.is_empty(),
        "owners not kept (source was 1000:1000): {wrong:#?}"
    );
    // the node creates its missing directories at the top of the share: its root is the
    // node's, with the old directory's mode
    let root = fs::metadata(&f.share).unwrap();
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (1000, 1000, 0o750),
        "the share's root"
    );
}

/// Regression (issue 2, found by a review of shared mode): a file the node created in the
/// source after the walk (Artemis opening its next journal file, a new page file) was neither
/// copied nor noticed: the migration succeeded, the source moved aside, and the share lacked
/// the file. The source is listed again after the copy; the new file is refused, naming it,
/// and the source stays in place.
#[test]
fn issue2_a_file_created_in_the_source_during_migration_is_refused() {
    let f = fixture();
    fs::create_dir_all(f.link.join("journal")).unwrap();
    // a big file so the copy takes a while
    let big = vec![0x5au8; 256 << 20];
    fs::write(f.link.join("journal/activemq-data-1.amq"), &big).unwrap();
    drop(big);
    let src = f.link.clone();
    let tmp = f
        .share
        .join("journal/.activemq-data-1.amq.artemis-sync-tmp");
    let writer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !tmp.exists() {
            assert!(std::time::Instant::now() < deadline, "copy never started");
            std::thread::sleep(Duration::from_micros(200));
        }
        // the node creates its next journal file while the copy runs
        fs::write(src.join("journal/activemq-data-2.amq"), b"new records").unwrap();
    });
    let outcome = link(
        &f.link,
        &f.share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    );
    writer.join().unwrap();
    let new = f.link.join("journal/activemq-data-2.amq");
    match &outcome {
        Err(e @ LinkError::SourceChanged(path)) => {
            assert_eq!(path, &new);
            assert!(e.to_string().contains("activemq-data-2.amq"), "{e}");
        }
        other => panic!(
            "expected the file created during the migration to be refused, got {other:?} \
             (share has it: {})",
            f.share.join("journal/activemq-data-2.amq").exists()
        ),
    }
    // the source is intact, in place, with the new file; nothing was moved aside
    assert!(fs::symlink_metadata(&f.link).unwrap().is_dir());
    assert_eq!(fs::read(&new).unwrap(), b"new records");
    assert_eq!(
        fs::metadata(f.link.join("journal/activemq-data-1.amq"))
            .unwrap()
            .len(),
        256 << 20
    );
    assert_eq!(fs::read_dir(&f.base).unwrap().count(), 1);
}

/// A journal moved to another disk and linked back (`journal -> /data/journal`, or a relative
/// link climbing out with `..`) was copied into the share as that symlink: the migration said
/// every file was verified and moved the directory aside, while the journal stayed on this
/// VM's disk and the other VM's link led nowhere. It is refused before anything is written;
/// links within the directory (also absolute ones into it) still migrate.
#[test]
fn issue2_a_source_symlink_leading_out_of_the_journal_is_refused() {
    let migrate = LinkOptions {
        migrate: true,
        force: false,
    };
    for target in ["OUTSIDE", "../outside", "paging/../../outside"] {
        let f = fixture();
        write_journal(&f.link);
        let outside = f.base.parent().unwrap().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(
            outside.join("activemq-data-9.amq"),
            b"journal on another disk",
        )
        .unwrap();
        let target = if target == "OUTSIDE" {
            outside.clone()
        } else {
            PathBuf::from(target)
        };
        std::os::unix::fs::symlink(&target, f.link.join("large-messages")).unwrap();
        match link(&f.link, &f.share, migrate) {
            Err(e @ LinkError::LinkLeavesJournal { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&*f.link.join("large-messages").to_string_lossy())
                        && msg.contains(&*target.to_string_lossy()),
                    "{msg}"
                );
            }
            other => panic!("{target:?}: expected a refusal, got {other:?}"),
        }
        assert_eq!(fs::read_dir(&f.share).unwrap().count(), 0, "{target:?}");
        assert!(fs::symlink_metadata(&f.link).unwrap().is_dir());
    }
    // within the directory, relative or absolute: migrated as links
    let f = fixture();
    write_journal(&f.link);
    std::os::unix::fs::symlink("paging/../journal", f.link.join("current")).unwrap();
    std::os::unix::fs::symlink(f.link.join("bindings"), f.link.join("b")).unwrap();
    link(&f.link, &f.share, migrate).unwrap();
    assert!(f.link.join("current/activemq-data-1.amq").is_file());
    assert!(f.link.join("b/activemq-bindings-1.bindings").is_file());
}
