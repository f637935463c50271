//! What an `Ack` promises: every change an acknowledged batch made (a file's data, an
//! inode's mode, a directory's entries, including directories created on the way and both
//! parents of a rename) is followed by an fsync that covers it, whatever the open-file cache
//! kept. The apply thread logs both, in order, under `cfg(test)`; a power cut keeps exactly
//! what was fsynced, so this is the check a kill on one host (which keeps the page cache)
//! cannot make. It checks the bookkeeping against the changes reported to it, and the
//! expected fsync targets by name.

use std::fs;

use super::tests::{index_now, write};
use super::*;

fn applier(root: &Path) -> Applier {
    Applier::new(root, 4096)
}

/// Each change of the log is followed by an fsync that covers it: the data of a file by
/// an `fdatasync` or `fsync` of it, an inode's metadata and a directory's entries by an
/// `fsync` of that inode. Whatever the page cache keeps, that is what survives a power cut.
fn assert_every_change_synced_after(log: &[Durability]) {
    for (i, change) in log.iter().enumerate() {
        let covered = |later: &Durability| match (change, later) {
            (Durability::Data(p), Durability::SyncedData(q) | Durability::SyncedAll(q)) => p == q,
            (Durability::Meta(p) | Durability::Entries(p), Durability::SyncedAll(q)) => p == q,
            // everything on the file system (the tests' trees are on one)
            (
                Durability::Data(p) | Durability::Meta(p) | Durability::Entries(p),
                Durability::SyncedFs(q),
            ) => p.starts_with(q),
            _ => false,
        };
        let is_change = matches!(
            change,
            Durability::Data(_) | Durability::Meta(_) | Durability::Entries(_)
        );
        assert!(
            !is_change || log[i + 1..].iter().any(covered),
            "{change:?} was acknowledged without an fsync after it\n{log:#?}"
        );
    }
}

#[test]
fn an_acked_batch_fsyncs_every_file_inode_and_directory_it_changed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    fs::create_dir(root.join("old")).unwrap();
    fs::write(root.join("old/keep"), b"x").unwrap();
    fs::write(root.join("chmod-me"), b"y").unwrap();
    fs::set_permissions(root.join("chmod-me"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut a = applier(&root);
    let ops = vec![
        // create_dir_all makes a, a/b and a/b/c: each entry, in its parent
        Op::Mkdir {
            path: "a/b/c".into(),
            mode: 0o750,
        },
        Op::SetFile {
            path: "a/b/c/f".into(),
            len: 4096,
            mode: 0o600,
        },
        write("a/b/c/f", 0, vec![3; 4096]),
        // a mode change alone: the inode, not its data
        Op::SetFile {
            path: "chmod-me".into(),
            len: 1,
            mode: 0o600,
        },
        // a directory renamed into a parent that does not exist yet
        Op::Rename {
            from: "old".into(),
            to: "new/place".into(),
        },
    ];
    assert!(matches!(a.batch(1, ops), Applied::Done { seq: 1, .. }));
    assert_every_change_synced_after(&a.log);
    for d in ["", "a", "a/b", "a/b/c", "new"] {
        let want = Durability::SyncedAll(root.join(d).components().collect());
        assert!(a.log.contains(&want), "{want:?} missing\n{:#?}", a.log);
    }
    for want in [
        Durability::SyncedAll(root.join("chmod-me")),
        Durability::SyncedData(root.join("a/b/c/f")),
    ] {
        assert!(a.log.contains(&want), "{want:?} missing\n{:#?}", a.log);
    }
    // a directory renamed away after its entries changed: they were synced before
    a.log.clear();
    let ops = vec![
        Op::Mkdir {
            path: "t.tmp".into(),
            mode: 0o755,
        },
        Op::SetFile {
            path: "t.tmp/x".into(),
            len: 0,
            mode: 0o644,
        },
        Op::Rename {
            from: "t.tmp".into(),
            to: "t".into(),
        },
    ];
    assert!(matches!(a.batch(2, ops), Applied::Done { seq: 2, .. }));
    assert_every_change_synced_after(&a.log);
    assert!(a.log.contains(&Durability::SyncedAll(root.join("t.tmp"))));
}

/// Issue 8 review: an agent killed (`kill -9`) in the middle of a batch leaves what the batch
/// did so far in the page cache, not on the disk, and no note of it (its `unsynced` sets die
/// with it). The next start's index read it from the cache, the hot side found it on the cold
/// side and never sent it again, and a durable sync that had waited for that batch returned
/// on the next connection's acks with its record on no disk: a power cut of the cold VM then
/// lost it. Whatever the killed agent changed is synced before the first index reads it.
#[test]
fn issue8_the_first_index_after_a_kill_mid_batch_makes_what_the_killed_agent_left_durable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    // the killed agent: a batch's changes made, its fsyncs not reached
    let mut killed = applier(&root);
    let mut touched = Touched::default();
    killed.mkdir("j", 0o750, &mut touched).unwrap();
    killed
        .set_file("j/a".into(), 4096, 0o640, &mut touched)
        .unwrap();
    let data = vec![7u8; 4096];
    killed
        .open("j/a", false)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    touched.data("j/a", &root.join("j/a"));
    drop(killed);
    // the next start
    let mut started = applier(&root);
    let (indexed, _) = index_now(&mut started);
    assert!(indexed.is_ok(), "{indexed:?}");
    let mut log = std::mem::take(&mut touched.log);
    log.append(&mut started.log);
    assert_every_change_synced_after(&log);
}
