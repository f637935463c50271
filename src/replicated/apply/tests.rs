//! The apply thread's unit tests: order, the cache of open files, page checks, confinement.

use super::*;

fn applier(root: &Path) -> Applier {
    Applier::new(root, 4096)
}

/// A `Write` of `data` at `offset` with the page hashes the apply thread checks.
pub(super) fn write(path: &str, offset: u64, data: Vec<u8>) -> Op {
    let hashes = data
        .chunks(4096)
        .map(|p| *blake3::hash(p).as_bytes())
        .collect();
    Op::Write {
        path: path.into(),
        offset,
        data: data.into(),
        hashes,
    }
}

#[test]
fn applies_in_order_and_skips_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![
        Op::Mkdir {
            path: "journal".into(),
            mode: 0o750,
        },
        Op::SetFile {
            path: "journal/a.tmp".into(),
            len: 8192,
            mode: 0o600,
        },
        write("journal/a.tmp", 4096, vec![7; 4096]),
        Op::Rename {
            from: "journal/a.tmp".into(),
            to: "journal/a".into(),
        },
    ];
    assert!(matches!(
        a.batch(2, ops.clone()),
        Applied::Skipped { seq: 2 }
    ));
    assert!(matches!(a.batch(1, ops), Applied::Done { seq: 1, .. }));
    let data = fs::read(dir.path().join("journal/a")).unwrap();
    assert_eq!(data.len(), 8192);
    assert!(data[..4096].iter().all(|b| *b == 0) && data[4096..].iter().all(|b| *b == 7));
    assert!(matches!(
        a.batch(
            2,
            vec![Op::Remove {
                path: "journal".into()
            }]
        ),
        Applied::Done { .. }
    ));
    assert!(!dir.path().join("journal").exists());
}

#[test]
fn a_batch_touching_more_files_than_the_cache_holds_applies_whole() {
    // the cache of open files empties itself while the batch writes; the files it
    // dropped are synced all the same
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let n = pages::OPEN_FILES_CACHED * 2 + 1;
    let mut ops = Vec::new();
    for i in 0..n {
        let path = format!("f{i}");
        ops.push(Op::SetFile {
            path: path.clone(),
            len: 4096,
            mode: 0o644,
        });
        ops.push(write(&path, 0, vec![1; 4096]));
    }
    ops.push(Op::Remove { path: "f0".into() });
    assert!(matches!(a.batch(1, ops), Applied::Done { seq: 1, .. }));
    assert!(!dir.path().join("f0").exists());
    for i in 1..n {
        let f = format!("f{i}");
        assert_eq!(fs::read(dir.path().join(&f)).unwrap(), [1; 4096]);
        let synced = Durability::SyncedData(dir.path().join(&f));
        assert!(a.log.contains(&synced), "{f} was acknowledged unsynced");
    }
}

#[test]
fn a_bad_page_rejects_the_whole_batch_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let mut bad = write("f", 0, vec![1; 8192]);
    if let Op::Write { data, .. } = &mut bad {
        let mut altered = data.to_vec();
        altered[5000] ^= 1;
        *data = altered.into();
    }
    let ops = vec![
        Op::SetFile {
            path: "f".into(),
            len: 8192,
            mode: 0o644,
        },
        bad,
    ];
    let Applied::Rejected { reason, .. } = a.batch(1, ops) else {
        panic!()
    };
    assert!(
        reason.contains("offset 4096") && reason.contains("blake3"),
        "{reason}"
    );
    assert!(!dir.path().join("f").exists(), "nothing was written");
    assert_eq!(a.expected, 1);
}

/// The threads as the receiver runs them, both ways in: a batch of 20 pages through the check
/// thread, one of 3 checked by the sender and queued straight for the apply thread. A bad
/// page still rejects the whole batch before anything of it is written; the next batch,
/// good, applies.
#[test]
fn issue15_pages_checked_on_the_way_to_the_apply_thread_still_reject_a_bad_batch_whole() {
    for pages in [20, 3] {
        let dir = tempfile::tempdir().unwrap();
        let jobs_tx = applier(dir.path()).spawn();
        let (reply, mut replies) = mpsc::unbounded_channel();
        let mut bad = write("f", 0, vec![1; pages * 4096]);
        if let Op::Write { data, .. } = &mut bad {
            let mut altered = data.to_vec();
            altered[2 * 4096 + 9] ^= 1;
            *data = altered.into();
        }
        let set = Op::SetFile {
            path: "f".into(),
            len: (pages * 4096) as u64,
            mode: 0o644,
        };
        let job = |seq, ops| Job::Batch {
            seq,
            epoch: 1,
            ops,
            reply: reply.clone(),
            pages: None,
        };
        jobs_tx.try_send(job(1, vec![set.clone(), bad])).unwrap();
        let good = vec![set, write("f", 0, vec![2; pages * 4096])];
        jobs_tx.send(job(1, good)).unwrap();
        let first = replies.blocking_recv().unwrap();
        let Applied::Rejected { seq: 1, reason } = first else {
            panic!("{first:?}")
        };
        assert!(
            reason.contains("offset 8192") && reason.contains("blake3"),
            "{reason}"
        );
        let second = replies.blocking_recv().unwrap();
        assert!(matches!(second, Applied::Done { seq: 1, .. }), "{second:?}");
        assert_eq!(
            fs::read(dir.path().join("f")).unwrap(),
            vec![2; pages * 4096]
        );
    }
}

/// Batch `seq` of the ordering tests below: one write at the start of `f` filled with a byte
/// of its own, large (32 pages, through the check thread) or small (1 page, direct when the
/// threads are idle) in runs of `run`, so that both meet the other in flight.
fn ordered_batch(seq: u64, run: u64, reply: &mpsc::UnboundedSender<Applied>) -> Job {
    let pages = if (seq / run).is_multiple_of(2) { 32 } else { 1 };
    let fill = u8::try_from(seq % 251).unwrap();
    Job::Batch {
        seq,
        epoch: 1,
        ops: vec![write("f", 0, vec![fill; pages * 4096])],
        reply: reply.clone(),
        pages: None,
    }
}

/// Queues `job` as fast as there is room, as the connection does.
fn send_when_room(jobs: &Jobs, mut job: Job) {
    loop {
        match jobs.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(j)) => job = j,
            Err(e) => panic!("{e}"),
        }
        std::thread::yield_now();
    }
}

/// Batches 1 to `rounds` were all answered `Done`, in sequence (one that overtook another
/// would be skipped as out of order and never answered `Done`), and `f` is as the last left it.
fn assert_applied_in_order(outcomes: &[Applied], rounds: u64, dir: &Path) {
    assert_eq!(outcomes.len() as u64, rounds);
    for (i, got) in outcomes.iter().enumerate() {
        let seq = i as u64 + 1;
        assert!(
            matches!(got, Applied::Done { seq: s, .. } if *s == seq),
            "batch {seq}: {got:?}"
        );
    }
    let last = fs::read(dir.join("f")).unwrap();
    let fill = u8::try_from(rounds % 251).unwrap();
    assert!(last[..4096].iter().all(|b| *b == fill));
}

/// Small batches go straight to the apply thread only when the check thread has nothing:
/// large and small batches sent back to back, as fast as there is room, all apply in
/// sequence.
#[test]
fn issue12_small_batches_sent_direct_never_overtake_large_ones_in_the_check_thread() {
    let dir = tempfile::tempdir().unwrap();
    let jobs_tx = applier(dir.path()).spawn();
    let (reply, mut replies) = mpsc::unbounded_channel();
    let rounds: u64 = 200;
    let sender = std::thread::spawn(move || {
        for seq in 1..=rounds {
            send_when_room(&jobs_tx, ordered_batch(seq, 3, &reply));
        }
    });
    let outcomes: Vec<_> = (0..rounds)
        .map(|_| replies.blocking_recv().unwrap())
        .collect();
    sender.join().unwrap();
    assert_applied_in_order(&outcomes, rounds, dir.path());
}

/// Issue 12: the connection applies a small batch itself when nothing is ahead of it
/// (`Jobs::apply_now`), as the receiver does: only with every earlier outcome in hand, and
/// otherwise through the threads. Large and small batches in turn all apply in sequence,
/// some of each way.
#[test]
fn issue12_batches_applied_by_the_connection_never_overtake_those_in_the_threads() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = applier(dir.path()).spawn();
    let (reply, mut replies) = mpsc::unbounded_channel();
    let rounds: u64 = 300;
    let (mut in_flight, mut outcomes, mut here) = (0u64, Vec::new(), 0);
    for seq in 1..=rounds {
        while let Ok(a) = replies.try_recv() {
            in_flight -= 1;
            outcomes.push(a);
        }
        if seq % 8 == 4 {
            // a run of small batches begins after a sync's wait: everything before is answered
            while in_flight > 0 {
                outcomes.push(replies.blocking_recv().unwrap());
                in_flight -= 1;
            }
        }
        let mut job = ordered_batch(seq, 4, &reply);
        if in_flight == 0 {
            match jobs.apply_now(job) {
                Ok(a) => {
                    here += 1;
                    outcomes.push(a);
                    continue;
                }
                Err(j) => job = j,
            }
        }
        in_flight += 1;
        send_when_room(&jobs, job);
    }
    while in_flight > 0 {
        outcomes.push(replies.blocking_recv().unwrap());
        in_flight -= 1;
    }
    assert!(here > 0 && here < rounds, "{here} of {rounds} applied here");
    assert_applied_in_order(&outcomes, rounds, dir.path());
}

/// Issue 12: a small batch is not applied by the connection while the apply thread has a job
/// in hand (here an index, held part way), nor a batch with a barrier (its digest goes to the
/// connection, which would be the one waiting), nor one with more pages than
/// `DIRECT_BATCH_BYTES`: each comes back to go the usual way, and nothing of it is written.
#[test]
fn issue12_the_connection_applies_nothing_while_the_apply_thread_has_a_job() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("old"), vec![3u8; 4096]).unwrap();
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release_tx, release) = crossbeam_channel::bounded::<()>(1);
    let mut a = applier(dir.path());
    a.index_hook = Some(Box::new(move |_: &Path| {
        let _ = entered_tx.send(());
        let _ = release.recv();
    }));
    let jobs = a.spawn();
    let (parts_tx, mut parts) = mpsc::channel(1024);
    let (done_tx, mut done) = oneshot::channel();
    let (digests, _digests_rx) = mpsc::channel(4);
    let outlet = Outlet {
        digests,
        index_chunk_pages: 64,
        digest_chunk: (1 << 20, |_, _| 0),
    };
    jobs.send(Job::Index {
        parts: parts_tx,
        done: done_tx,
        outlet,
    })
    .unwrap();
    entered.recv().unwrap();
    let (reply, _replies) = mpsc::unbounded_channel();
    let batch = |ops| Job::Batch {
        seq: 1,
        epoch: 1,
        ops,
        reply: reply.clone(),
        pages: None,
    };
    let small = vec![write("new", 0, vec![1; 4096])];
    assert!(
        jobs.apply_now(batch(small.clone())).is_err(),
        "applied beside an index"
    );
    assert!(!dir.path().join("new").exists());
    release_tx.send(()).unwrap();
    while parts.blocking_recv().is_some() {}
    assert!(done.try_recv().unwrap().is_ok());
    // the index is done: now it may
    let mut with_barrier = small.clone();
    with_barrier.push(Op::Barrier { id: 1 });
    assert!(
        jobs.apply_now(batch(with_barrier)).is_err(),
        "a barrier applied here"
    );
    let large = vec![write("new", 0, vec![1; DIRECT_BATCH_BYTES + 4096])];
    assert!(
        jobs.apply_now(batch(large)).is_err(),
        "a large batch applied here"
    );
    assert!(!dir.path().join("new").exists());
    // once the apply thread has counted the index out (it answers `done` just before)
    let mut job = batch(small);
    let mut tries = 0;
    let got = loop {
        match jobs.apply_now(job) {
            Ok(got) => break got,
            Err(j) if tries < 1000 => job = j,
            Err(_) => panic!("still sent back 1 s after the index was done"),
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(matches!(got, Applied::Done { seq: 1, .. }), "{got:?}");
    assert_eq!(fs::read(dir.path().join("new")).unwrap(), vec![1u8; 4096]);
}

/// Issue 12: a panic while the applier is held (here, as if the connection applying a batch
/// panicked) leaves its state unknown: the apply thread stops at its next job instead of
/// applying it with that state, as a panic in the thread itself always stopped it. The batch
/// is not answered, nothing of it is written, and the connection cannot apply it either.
#[test]
fn issue12_after_a_panic_while_applying_the_apply_thread_applies_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = applier(dir.path()).spawn();
    let holder = jobs.clone();
    let panicked = std::thread::spawn(move || {
        let _held = holder.applier.lock().unwrap();
        panic!("planted: a panic while the applier is held");
    })
    .join();
    assert!(panicked.is_err());
    let (reply, mut replies) = mpsc::unbounded_channel();
    let batch = || Job::Batch {
        seq: 1,
        epoch: 1,
        ops: vec![write("new", 0, vec![1; 4096])],
        reply: reply.clone(),
        pages: None,
    };
    assert!(
        jobs.apply_now(batch()).is_err(),
        "applied with a poisoned applier"
    );
    // refused (the threads already gone) or taken and dropped, or left in the queue of a
    // thread that is gone: either way never applied (it would be within microseconds)
    let _ = jobs.send(batch());
    drop(reply);
    std::thread::sleep(Duration::from_millis(200));
    assert!(replies.try_recv().is_err(), "answered after the panic");
    assert!(!dir.path().join("new").exists());
}

#[test]
fn escaping_paths_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
    let mut a = applier(&root);
    for op in [
        Op::SetFile {
            path: "../escape".into(),
            len: 1,
            mode: 0o644,
        },
        Op::SetFile {
            path: "/etc/x".into(),
            len: 1,
            mode: 0o644,
        },
        Op::SetFile {
            path: "up/escape".into(),
            len: 1,
            mode: 0o644,
        },
        Op::Rename {
            from: "a".into(),
            to: "../b".into(),
        },
        write("up/x", 0, vec![0; 4096]),
    ] {
        let Applied::Rejected { reason, .. } = a.batch(1, vec![op.clone()]) else {
            panic!("{op:?} was not rejected")
        };
        assert!(reason.contains("refusing path"), "{reason}");
    }
    assert!(!dir.path().join("escape").exists());
}

/// A batch that failed opening a path the cold side has as a symlink (a write the watch
/// capture sent before the change that replaced the file) left that path to fsync before
/// the next index, which then failed on the symlink (`ELOOP`) at every reconnection: the
/// pair never converged again (found by `exact::issue11_renames_and_every_change_converge_in_any_order`
/// at 100 cases). A name that no longer holds a file has nothing of the failed batch to sync.
#[test]
fn issue16_a_failed_write_to_what_is_now_a_symlink_does_not_block_every_later_index() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("elsewhere", dir.path().join("e")).unwrap();
    fs::write(dir.path().join("f"), b"a file").unwrap();
    let mut a = applier(dir.path());
    let ops = vec![write("e", 0, vec![5; 4096])];
    let failed = a.batch(1, ops);
    assert!(
        matches!(failed, Applied::Failed { seq: 1, .. }),
        "{failed:?}"
    );
    // and one whose name now sits below a file
    assert!(matches!(
        a.batch(1, vec![write("f/g", 0, vec![6; 4096])]),
        Applied::Rejected { .. } | Applied::Failed { .. }
    ));
    a.unsynced.insert("f/g".into());
    let (indexed, _) = index_now(&mut a);
    assert!(indexed.is_ok(), "{indexed:?}");
    assert!(a.unsynced.is_empty(), "{:?}", a.unsynced);
}

/// Runs an index on this thread: its outcome and the parts it streamed.
pub(super) fn index_now(a: &mut Applier) -> (Result<(), PagesError>, Vec<IndexPart>) {
    let (parts_tx, mut parts) = mpsc::channel(1024);
    let (done_tx, mut done) = oneshot::channel();
    let (digests, _digests_rx) = mpsc::channel(4);
    a.index(
        &parts_tx,
        done_tx,
        Outlet {
            digests,
            index_chunk_pages: 64,
            digest_chunk: (1 << 20, |_, _| 0),
        },
    );
    drop(parts_tx);
    let mut streamed = Vec::new();
    while let Ok(part) = parts.try_recv() {
        streamed.push(part);
    }
    (done.try_recv().expect("the index answered"), streamed)
}

/// Issue 16 review: what a batch that failed part way wrote is left unsynced (its file and
/// the directory entries it made) and fsynced before the next index, and the next index
/// reads it from the disk.
#[test]
fn a_failed_batch_leaves_its_files_and_entries_unsynced_until_the_next_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![
        Op::Mkdir {
            path: "j".into(),
            mode: 0o750,
        },
        write("j/a", 0, vec![5; 4096]),
        // fails after the write: no filesystem allocates 2^62 bytes
        Op::Allocate {
            path: "j/a".into(),
            offset: 0,
            len: 1 << 62,
        },
    ];
    assert!(matches!(a.batch(1, ops), Applied::Failed { seq: 1, .. }));
    assert!(a.unsynced.contains("j/a"), "{:?}", a.unsynced);
    assert!(
        a.unsynced_inodes.contains(&dir.path().join("j")),
        "the new directory's entry: {:?}",
        a.unsynced_inodes
    );
    let (indexed, parts) = index_now(&mut a);
    assert!(indexed.is_ok(), "{indexed:?}");
    assert!(a.unsynced.is_empty() && a.unsynced_inodes.is_empty());
    let mut files = Vec::new();
    for part in parts {
        if let IndexPart::File { path, pages, .. } = part {
            files.push((path, pages.len()));
        }
    }
    assert_eq!(files, vec![("j/a".to_owned(), 1)]);
}

/// A file's length is the peer's word, and a sparse file of terabytes a valid one (ext4 takes
/// 16 TiB): the page memo asks its budget before it makes a slot per page. 8 TiB was 2^31
/// slots, 36 GiB asked of the allocator, and the cold agent aborted.
#[test]
fn issue15_a_huge_sparse_file_gets_no_memo_slot_per_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![Op::SetFile {
        path: "big".into(),
        len: 8 << 40,
        mode: 0o644,
    }];
    let got = a.batch(1, ops);
    assert!(matches!(got, Applied::Done { seq: 1, .. }), "{got:?}");
    assert_eq!(fs::metadata(dir.path().join("big")).unwrap().len(), 8 << 40);
    assert_eq!(
        a.memo.size(),
        (0, 0),
        "a file beyond the budget is not kept"
    );
}

/// The same through a write far past the end of a file the memo keeps: the entry is dropped
/// before its slots would grow to the new end.
#[test]
fn issue15_a_write_far_past_the_end_gets_no_memo_slot_per_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![Op::SetFile {
        path: "f".into(),
        len: 64 * 4096,
        mode: 0o644,
    }];
    assert!(matches!(a.batch(1, ops), Applied::Done { seq: 1, .. }));
    assert_eq!(a.memo.size(), (1, 64), "a file within the budget is kept");
    let got = a.batch(2, vec![write("f", 8 << 40, vec![1; 4096])]);
    assert!(matches!(got, Applied::Done { seq: 2, .. }), "{got:?}");
    assert_eq!(a.memo.size(), (0, 0), "dropped, not grown");
    // what the memo no longer keeps is read from the disk at the next index, as without it
    use std::io::{Read, Seek};
    let mut f = File::open(dir.path().join("f")).unwrap();
    let mut page = vec![0u8; 4096];
    f.seek(io::SeekFrom::Start(8 << 40)).unwrap();
    f.read_exact(&mut page).unwrap();
    assert_eq!(page, vec![1; 4096]);
}

/// Issue 8 review: a `SetFile` that created its file and then failed (here its length, which
/// no file can have; on a sick disk an `EIO`) left the new entry out of what the next index
/// fsyncs. The index then reports the file, the hot side's next `SetFile` finds it there (not
/// created, so no entry noted), and the name was never made durable under batches acked since.
#[test]
fn issue8_a_file_a_failed_batch_created_has_its_entry_synced_before_the_next_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![Op::SetFile {
        path: "new".into(),
        len: u64::MAX,
        mode: 0o644,
    }];
    assert!(matches!(a.batch(1, ops), Applied::Failed { seq: 1, .. }));
    assert!(
        fs::symlink_metadata(dir.path().join("new")).is_ok(),
        "the open created it"
    );
    assert!(
        a.unsynced_inodes.contains(dir.path()),
        "the entry the failed batch made: {:?}",
        a.unsynced_inodes
    );
}

/// Issue 8 review: a `Mkdir` whose `create_dir_all` made some of the missing directories and
/// then failed (a full disk, or here a name too long) left those entries out of what the
/// next index fsyncs; later batches find the directories there and never note them again.
#[test]
fn issue8_directories_a_failed_mkdir_made_on_the_way_are_synced_before_the_next_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = applier(dir.path());
    let ops = vec![Op::Mkdir {
        path: format!("a/b/{}", "x".repeat(300)),
        mode: 0o755,
    }];
    assert!(matches!(a.batch(1, ops), Applied::Failed { seq: 1, .. }));
    assert!(dir.path().join("a/b").is_dir(), "made on the way");
    for d in [dir.path().to_owned(), dir.path().join("a")] {
        assert!(
            a.unsynced_inodes.contains(&d),
            "{} lost the entry the failed batch made in it: {:?}",
            d.display(),
            a.unsynced_inodes
        );
    }
}
