//! Throughput of the blake3 file hashing that verifies every migrated file: the migration's
//! verify pass reads each file back, so this bounds how long `link --migrate` takes per GiB.

use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn file_digest(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("file_digest");
    for mib in [1usize, 10] {
        let path = dir.path().join(format!("f{mib}"));
        let mut f = std::fs::File::create(&path).expect("create");
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        for _ in 0..mib {
            f.write_all(&block).expect("write");
        }
        drop(f);
        group.throughput(Throughput::Bytes((mib as u64) << 20));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &path,
            |b, p| b.iter(|| artemis_sync::link::file_digest(p).expect("hash")),
        );
    }
    group.finish();
}

criterion_group!(benches, file_digest);
criterion_main!(benches);
