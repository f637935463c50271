//! The page memo's tests: what it vouches for is what the disk has, whatever the batches did;
//! the index it shortens is the index a full hash gives; a saved memo spares the next start's
//! reads and a damaged one is refused.

use std::fs;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use super::tests::write;
use super::*;
use crate::replicated::pages::index_tree;

const PS: usize = 4096;

/// An applier whose memo keeps files of any size (these tests' files are small).
fn memo_applier(root: &Path, memo: Option<PathBuf>) -> Applier {
    let mut a = Applier::new(root, PS);
    if let Some(m) = memo {
        a = a.with_memo_file(m);
    }
    a.memo.min_pages = 1;
    a
}

/// One change a batch may carry, on a few paths that collide on purpose.
#[derive(Debug, Clone)]
enum Change {
    SetFile {
        path: usize,
        len: u64,
    },
    Write {
        path: usize,
        page: u64,
        len: usize,
        seed: u8,
    },
    Allocate {
        path: usize,
        offset: u64,
        len: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Remove {
        path: usize,
    },
    Chmod {
        path: usize,
    },
    Mkdir {
        path: usize,
    },
}

/// Files and directories the changes name: `d` exists from the start (so changes below it
/// apply), `e` only once made or renamed to; a rename of either moves what is below it.
const PATHS: [&str; 7] = ["a", "b", "d", "d/a", "d/b", "e", "e/a"];

fn change() -> impl Strategy<Value = Change> {
    let path = 0..PATHS.len();
    prop_oneof![
        (path.clone(), 0u64..5 * PS as u64).prop_map(|(path, len)| Change::SetFile { path, len }),
        (path.clone(), 0u64..5, 1usize..3 * PS, any::<u8>()).prop_map(|(path, page, len, seed)| {
            Change::Write {
                path,
                page,
                len,
                seed,
            }
        }),
        (path.clone(), 0u64..4 * PS as u64, 1u64..2 * PS as u64)
            .prop_map(|(path, offset, len)| Change::Allocate { path, offset, len }),
        (path.clone(), path.clone()).prop_map(|(from, to)| Change::Rename { from, to }),
        path.clone().prop_map(|path| Change::Remove { path }),
        path.clone().prop_map(|path| Change::Chmod { path }),
        path.prop_map(|path| Change::Mkdir { path }),
    ]
}

fn op(c: &Change) -> Op {
    match c {
        Change::SetFile { path, len } => Op::SetFile {
            path: PATHS[*path].into(),
            len: *len,
            mode: 0o640,
        },
        Change::Write {
            path,
            page,
            len,
            seed,
        } => {
            let data = (0..*len)
                .map(|i| (i.to_le_bytes()[0]).wrapping_mul(31) ^ seed)
                .collect();
            write(PATHS[*path], page * PS as u64, data)
        }
        Change::Allocate { path, offset, len } => Op::Allocate {
            path: PATHS[*path].into(),
            offset: *offset,
            len: *len,
        },
        Change::Rename { from, to } => Op::Rename {
            from: PATHS[*from].into(),
            to: PATHS[*to].into(),
        },
        Change::Remove { path } => Op::Remove {
            path: PATHS[*path].into(),
        },
        Change::Chmod { path } => Op::SetAttrs {
            path: PATHS[*path].into(),
            attrs: pages::Attrs {
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
        },
        Change::Mkdir { path } => Op::Mkdir {
            path: PATHS[*path].into(),
            mode: 0o750,
        },
    }
}

/// Applies each batch in turn (one that fails, as a write below a file does, is left
/// behind as the hot side would resend it after a resync).
fn apply_all(a: &mut Applier, batches: &[Vec<Change>]) {
    let mut seq = a.expected;
    for b in batches {
        let ops = b.iter().map(op).collect();
        if matches!(a.batch(seq, ops), Applied::Done { .. }) {
            seq += 1;
        } else {
            // what a new connection does first
            a.expected = seq;
        }
        a.memo
            .check(&a.root)
            .expect("the memo vouches only for what is on disk");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("MEMO_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn issue15_memo_vouches_only_for_what_is_on_disk_and_never_changes_the_index(
        batches in prop::collection::vec(prop::collection::vec(change(), 1..6), 1..8)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = memo_applier(dir.path(), None);
        let d = vec![Op::Mkdir { path: "d".into(), mode: 0o750 }];
        let made = matches!(a.batch(1, d), Applied::Done { .. });
        prop_assert!(made, "d made");
        apply_all(&mut a, &batches);
        let (index, _) = a.index_for_test();
        prop_assert_eq!(&index, &index_tree(dir.path(), PS).unwrap());
        // and again, from what the first index left
        let (again, _) = a.index_for_test();
        prop_assert_eq!(&again, &index);
        a.memo.check(dir.path()).unwrap();
    }
}

/// Three files written by batches, as an initial sync writes them.
fn synced_tree(a: &mut Applier) {
    let mut ops = vec![Op::Mkdir {
        path: "j".into(),
        mode: 0o750,
    }];
    for (i, name) in (1u8..).zip(["j/1", "j/2", "j/3"]) {
        ops.push(Op::SetFile {
            path: name.into(),
            len: 10 * PS as u64 + 100,
            mode: 0o640,
        });
        ops.push(write(name, 0, vec![i; 10 * PS + 100]));
    }
    assert!(matches!(a.batch(1, ops), Applied::Done { .. }));
}

/// A data directory whose three files batches wrote, and the memo a clean stop left of it:
/// the temporary directory (kept alive), the data directory and the memo file.
fn saved_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (root, memo) = (dir.path().join("data"), dir.path().join("state.json.pages"));
    fs::create_dir(&root).unwrap();
    let mut a = memo_applier(&root, Some(memo.clone()));
    synced_tree(&mut a);
    a.save_memo();
    assert!(memo.exists());
    (dir, root, memo)
}

#[test]
fn issue15_a_memo_saved_by_a_clean_stop_spares_the_next_index_every_read() {
    let (_dir, root, memo) = saved_tree();
    let mut b = memo_applier(&root, Some(memo));
    b.load_memo();
    assert_eq!(b.memo.size(), (3, 33));
    let (index, read) = b.index_for_test();
    assert_eq!(index, index_tree(&root, PS).unwrap());
    assert_eq!(read, 0, "every page vouched for");
}

/// A memo vouches for the start right after the clean stop that wrote it, never for a start
/// after a crash that followed: it is gone from the disk once read, so a crash before the
/// next clean stop leaves no memo (a page written after it may be on the disk while the
/// file's new ctime is not, and the old stamp would match again).
#[test]
fn issue15_a_memo_is_removed_once_read_so_a_start_after_a_crash_reads_everything() {
    let (_dir, root, memo) = saved_tree();
    let mut b = memo_applier(&root, Some(memo.clone()));
    b.load_memo();
    assert_eq!(b.memo.size(), (3, 33), "read");
    assert!(!memo.exists(), "removed once read");
    // b is killed: no clean stop, no save. The next start has nothing to vouch with
    drop(b);
    let mut c = memo_applier(&root, Some(memo));
    c.load_memo();
    assert_eq!(c.memo.size(), (0, 0));
    let (index, read) = c.index_for_test();
    assert_eq!(index, index_tree(&root, PS).unwrap());
    assert_eq!(read, 33, "every page read");
}

/// A memo that cannot be removed once read is not used: it would still be there after a
/// crash.
#[test]
fn issue15_a_memo_that_cannot_be_removed_is_not_used() {
    if !crate::sys::is_root() {
        // (chattr +i needs CAP_LINUX_IMMUTABLE; CI runs as root)
        assert!(std::env::var_os("CI").is_none(), "CI runs this as root");
        return;
    }
    let (_dir, root, memo) = saved_tree();
    let dir = memo.parent().unwrap().to_owned();
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    // an immutable directory: nothing in it can be removed, even by root
    assert!(chattr("+i"), "chattr +i {}", dir.display());
    let mut b = memo_applier(&root, Some(memo.clone()));
    b.load_memo();
    let kept = memo.exists();
    assert!(chattr("-i"), "chattr -i {}", dir.display());
    assert!(kept, "the directory was not immutable");
    assert_eq!(b.memo.size(), (0, 0), "not used");
    let (index, read) = b.index_for_test();
    assert_eq!(index, index_tree(&root, PS).unwrap());
    assert_eq!(read, 33, "every page read");
}

#[test]
fn issue15_a_file_changed_behind_the_memo_is_read_again() {
    let (_dir, root, memo) = saved_tree();
    // while the agent is stopped, someone writes a page in place: same length, same blocks
    let f = OpenOptions::new()
        .write(true)
        .open(root.join("j/2"))
        .unwrap();
    f.write_all_at(&[9; PS], 3 * PS as u64).unwrap();
    drop(f);
    let mut b = memo_applier(&root, Some(memo));
    b.load_memo();
    let (index, read) = b.index_for_test();
    assert_eq!(
        index,
        index_tree(&root, PS).unwrap(),
        "the new page is indexed"
    );
    assert_eq!(read, 11, "only the changed file is read");
}

#[test]
fn issue15_a_failed_batch_forgets_what_it_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = memo_applier(dir.path(), None);
    synced_tree(&mut a);
    // j/1 is written, then a rename of what is not there fails the batch
    let ops = vec![
        write("j/1", 0, vec![7; PS]),
        Op::Rename {
            from: "gone".into(),
            to: "j/4".into(),
        },
    ];
    let outcome = a.batch(2, ops);
    assert!(matches!(outcome, Applied::Failed { .. }), "{outcome:?}");
    let (index, read) = a.index_for_test();
    assert_eq!(index, index_tree(dir.path(), PS).unwrap());
    assert_eq!(read, 11, "j/1 is read again, and only j/1");
}

#[test]
fn issue15_a_damaged_memo_is_refused_with_the_reason() {
    let (_dir, root, memo) = saved_tree();
    let good = fs::read(&memo).unwrap();

    let mut flipped = good.clone();
    flipped[40] ^= 1;
    fs::write(&memo, &flipped).unwrap();
    let err = PageMemo::new(PS).load(&memo).unwrap_err();
    assert!(err.contains("checksum"), "{err}");

    fs::write(&memo, &good[..good.len() / 2]).unwrap();
    let err = PageMemo::new(PS).load(&memo).unwrap_err();
    assert!(err.contains("checksum"), "{err}");

    fs::write(&memo, &good).unwrap();
    let err = PageMemo::new(512).load(&memo).unwrap_err();
    assert!(err.contains("pages of 4096 bytes"), "{err}");

    // refused, the index still comes out right: it reads everything
    fs::write(&memo, &flipped).unwrap();
    let mut b = memo_applier(&root, Some(memo));
    b.load_memo();
    let (index, read) = b.index_for_test();
    assert_eq!(index, index_tree(&root, PS).unwrap());
    assert_eq!(read, 33);
}

#[test]
fn issue15_small_files_cost_the_memo_nothing() {
    // a tree of many small files (paging, bindings): read at each index, never kept
    let dir = tempfile::tempdir().unwrap();
    let mut a = Applier::new(dir.path(), PS);
    let mut ops = Vec::new();
    for i in 0..50 {
        let name = format!("p{i}");
        ops.push(Op::SetFile {
            path: name.clone(),
            len: 3 * PS as u64,
            mode: 0o640,
        });
        ops.push(write(&name, 0, vec![1; 3 * PS]));
    }
    // and one journal file, kept
    ops.push(Op::SetFile {
        path: "j".into(),
        len: (memo::MEMO_MIN_PAGES * PS) as u64,
        mode: 0o640,
    });
    assert!(matches!(a.batch(1, ops), Applied::Done { .. }));
    assert_eq!(a.memo.size(), (1, memo::MEMO_MIN_PAGES));
    let (index, read) = a.index_for_test();
    assert_eq!(index, index_tree(dir.path(), PS).unwrap());
    assert_eq!(
        read, 150,
        "the small files are read, the journal file is not"
    );
}

#[test]
fn issue15_a_file_that_shrank_while_indexed_gets_no_vouched_page_past_its_end() {
    // the memo vouched for pages 5..10 of a 10-page file, which meanwhile shrank to 2 pages:
    // reading pages 0..5 comes up short, and no page after it may keep its vouched hash
    // (a change the read does not meet is caught by the stamp after it: `index_walk`)
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs::write(&path, vec![3u8; PS + 10]).unwrap();
    let file = File::open(&path).unwrap();
    let memo = PageMemo::new(PS);
    let mut known = vec![Some([7u8; 16]); 10];
    known[..5].fill(None);
    let mut buf = pages::ReadBuf::default();
    let (got, read) = memo
        .fill(&file, 10 * PS as u64, Some(known), &mut buf)
        .unwrap();
    assert_eq!(read, 2);
    assert_eq!(got.len(), 10);
    assert_eq!(got[0], pages::page_hash(&[3u8; PS]));
    assert!(got[2..].iter().all(|h| *h == pages::UNREAD_PAGE), "{got:?}");
}

#[test]
fn issue15_a_file_changed_while_indexed_is_read_again_in_full() {
    // while the index reads j/2 (only its unknown last page), someone truncates it to 2
    // pages: the pages the memo vouched for are past its end now, so all of it is read
    let dir = tempfile::tempdir().unwrap();
    let mut a = memo_applier(dir.path(), None);
    synced_tree(&mut a);
    // the last page of j/2 unknown: the index reads it, the rest is vouched for
    let ops = vec![Op::SetFile {
        path: "j/2".into(),
        len: 10 * PS as u64 + 50,
        mode: 0o640,
    }];
    assert!(matches!(a.batch(2, ops), Applied::Done { .. }));
    a.index_hook = Some(Box::new(|path: &Path| {
        if path.ends_with("j/2") {
            let f = OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(2 * PS as u64).unwrap();
        }
    }));
    let (index, _) = a.index_for_test();
    a.index_hook = None;
    let f = &index.files["j/2"];
    assert!(
        f.pages[2..].iter().all(|p| *p == pages::UNREAD_PAGE),
        "a page past the end kept a vouched hash: {:?}",
        &f.pages[2..4]
    );
    assert_eq!(
        &f.pages[..2],
        &index_tree(dir.path(), PS).unwrap().files["j/2"].pages[..]
    );
}

/// An applier of the synced tree in `dir` whose page 3 of `j/2` another process then
/// rewrote, well after the batch (so the write moves the file's stamp).
fn changed_behind_the_memo(dir: &Path) -> Applier {
    let mut a = memo_applier(dir, None);
    synced_tree(&mut a);
    std::thread::sleep(crate::replicated::capture::RACY_WINDOW * 2);
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join("j/2"))
        .unwrap();
    f.write_all_at(&[9; PS], 3 * PS as u64).unwrap();
    a
}

/// Issue 15, found in review: a file changed behind the memo (its stamp moved) and then
/// changed by a batch. The batch's stamp must not make the memo vouch again for the pages it
/// kept from before the change it did not see.
#[test]
fn issue15_a_file_changed_behind_the_memo_then_by_a_batch_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = changed_behind_the_memo(dir.path());
    // then a batch writes another page of it
    let outcome = a.batch(2, vec![write("j/2", 0, vec![5; PS])]);
    assert!(matches!(outcome, Applied::Done { .. }), "{outcome:?}");
    a.memo
        .check(dir.path())
        .expect("the memo vouches only for what is on disk");
    let (index, _) = a.index_for_test();
    assert_eq!(
        index,
        index_tree(dir.path(), PS).unwrap(),
        "the page written behind the memo is indexed"
    );
}

/// Issue 15, found in review: as above, with the file moved by a batch's rename of its
/// directory.
#[test]
fn issue15_a_file_changed_behind_the_memo_then_moved_by_a_batch_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = changed_behind_the_memo(dir.path());
    let ops = vec![Op::Rename {
        from: "j".into(),
        to: "k".into(),
    }];
    let outcome = a.batch(2, ops);
    assert!(matches!(outcome, Applied::Done { .. }), "{outcome:?}");
    a.memo
        .check(dir.path())
        .expect("the memo vouches only for what is on disk");
    let (index, read) = a.index_for_test();
    assert_eq!(index, index_tree(dir.path(), PS).unwrap());
    assert_eq!(read, 11, "k/2 is read again, and only k/2");
}
