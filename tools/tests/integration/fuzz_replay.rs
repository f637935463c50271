//! The fuzz targets' checks on stable, as CI runs them (issue 16): every seed in
//! `fuzz/seeds/<target>/`, every crash kept in `fuzz/regressions/<target>/`, then a bounded
//! number of deterministic mutations of them (bit flips, boundary bytes, truncation,
//! insertion, duplication, splicing). Not coverage-guided: the long runs are cargo-fuzz's
//! (README "Fuzzing"); this keeps every input that once mattered passing, on every change.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use artemis_sync_tools::fuzz_checks::{Check, TARGETS};

/// Mutated inputs tried per target.
const MUTATIONS_PER_TARGET: u32 = 50_000;
/// Wall-clock budget per target for the mutations (a loaded CI machine stops early, saying so).
const MUTATION_BUDGET: Duration = Duration::from_secs(15);
/// The largest mutated input, in bytes: decoders refuse larger frames anyway.
const MAX_INPUT_BYTES: usize = 1 << 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted by name; none when it does not exist.
fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("list a corpus directory").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p.display().to_string(), data)
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on `data`; a panic is reported with the input saved to a file named in the
/// message.
fn run_one(target: &str, check: Check, origin: &str, data: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| check(data))).is_ok() {
        return;
    }
    let saved = std::env::temp_dir().join(format!(
        "artemis-sync-fuzz-replay-{target}-{}",
        std::process::id()
    ));
    let _ = fs::write(&saved, data);
    panic!(
        "fuzz target {target} failed on {origin} ({} bytes, saved to {}); keep it in \
         fuzz/regressions/{target}/ once fixed",
        data.len(),
        saved.display()
    );
}

/// xorshift64*: deterministic, so a failing mutation is found again by the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below a usize")
    }
}

/// One mutation of `base`, with `other` for splicing.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe][rng.below(6)];
            }
            2 => v.truncate(at),
            3 => {
                let n = 1 + rng.below(16);
                let fresh: Vec<u8> = (0..n).map(|_| rng.next().to_le_bytes()[0]).collect();
                v.splice(at..at, fresh);
            }
            4 if at < v.len() => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ => {
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
        }
    }
    v.truncate(MAX_INPUT_BYTES);
    v
}

#[test]
fn issue16_every_fuzz_target_passes_its_seeds_regressions_and_mutations() {
    let dir = fuzz_dir();
    for (target, check) in TARGETS {
        assert!(
            dir.join("fuzz_targets").join(format!("{target}.rs")).is_file(),
            "fuzz/fuzz_targets/{target}.rs is missing: the replayed checks and the fuzz targets must be the same set"
        );
        let seeds = inputs(&dir.join("seeds").join(target));
        assert!(
            !seeds.is_empty(),
            "fuzz/seeds/{target}/ is empty: run `cargo run --bin make-seeds` in fuzz/"
        );
        let kept = inputs(&dir.join("regressions").join(target));
        for (name, data) in seeds.iter().chain(&kept) {
            run_one(target, *check, name, data);
        }
        let corpus: Vec<&(String, Vec<u8>)> = seeds.iter().chain(&kept).collect();
        let salt = target
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ salt);
        let started = Instant::now();
        let mut tried = 0;
        while tried < MUTATIONS_PER_TARGET && started.elapsed() < MUTATION_BUDGET {
            let (a, b) = (rng.below(corpus.len()), rng.below(corpus.len()));
            let input = mutate(&mut rng, &corpus[a].1, &corpus[b].1);
            let origin = format!("mutation {tried} of {}", corpus[a].0);
            run_one(target, *check, &origin, &input);
            tried += 1;
        }
        eprintln!(
            "fuzz replay {target}: {} seeds, {} kept crashes, {tried} mutations in {:.1} s",
            seeds.len(),
            kept.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
