//! The blake3 of many pages at once. A 4 KiB page is four 1 KiB blake3 chunks, so hashing
//! one page at a time fills at most four SIMD lanes: on AVX-512 (16 lanes) a page hashes at
//! about a third of blake3's speed on longer input, on AVX2 (8 lanes) at about two thirds.
//! [`page_digests`] lays the chunks of up to [`BATCH_PAGES`] pages side by side instead:
//! chunk `j` of every page in one call (every lane busy, each with chunk counter `j`), then
//! each level of parent nodes the same way, the last with the root flag. The result is
//! `blake3::hash` of each page, bit for bit.
//!
//! This drives `blake3::platform::Platform::hash_many`, the crate's own SIMD kernel, which it
//! exports undocumented ("for benchmarks only"); `Cargo.toml` pins the exact blake3 release
//! for that reason. The first use checks the batch against `blake3::hash` on pages of every
//! shape it takes, and a mismatch (a blake3 release that changed the kernel's meaning) makes
//! every later call hash page by page, with an error logged once: slower, never wrong.

use std::sync::OnceLock;

use blake3::platform::Platform;
use blake3::{IncrementCounter, BLOCK_LEN, CHUNK_LEN, OUT_LEN};

/// Pages hashed side by side: the widest SIMD degree blake3 has (AVX-512: 16 lanes), so
/// chunk `j` of a batch is one full-width pass.
pub const BATCH_PAGES: usize = 16;

/// Fewer pages than this are hashed one by one: `blake3::hash` already hashes a page's four
/// chunks side by side, while the kernel takes lanes from pages and would hash a lone page's
/// chunks one after another (a durable sync's one page would take longer).
const SIDE_BY_SIDE_MIN_PAGES: usize = 4;

/// blake3's domain flags (the specification's values; the crate keeps its own private).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

/// blake3's initial chaining value (unkeyed hashing), as words.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// Appends to `out` the blake3 of each `page_size` piece of `data` (the last may be
/// shorter), as `data.chunks(page_size).map(blake3::hash)` would, but with the full pages
/// hashed side by side when the page size is a power-of-two number of blake3 chunks.
/// `is_special` picks pages the caller hashes itself (say, pages of zeros whose hash it
/// keeps): for those `out` gets `special(page)` instead.
pub(super) fn page_digests(
    data: &[u8],
    page_size: usize,
    out: &mut Vec<blake3::Hash>,
    special: &mut dyn FnMut(&[u8]) -> Option<blake3::Hash>,
) {
    let kernel = kernel_for(page_size);
    let mut batch: Vec<(usize, &[u8])> = Vec::with_capacity(BATCH_PAGES);
    let first = out.len();
    for (i, page) in data.chunks(page_size).enumerate() {
        if let Some(h) = special(page) {
            out.push(h);
            continue;
        }
        // a placeholder, filled when its batch is hashed
        out.push(blake3::Hash::from_bytes([0; OUT_LEN]));
        match kernel {
            Some(k) if page.len() == page_size => {
                batch.push((first + i, page));
                if batch.len() == BATCH_PAGES {
                    k.hash_into(&batch, out);
                    batch.clear();
                }
            }
            _ => out[first + i] = blake3::hash(page),
        }
    }
    if let Some(k) = kernel {
        if batch.len() >= SIDE_BY_SIDE_MIN_PAGES {
            k.hash_into(&batch, out);
        } else {
            for (slot, page) in batch {
                out[slot] = blake3::hash(page);
            }
        }
    }
}

/// The batch kernel for pages of `page_size`, if that size has one and it passed its check.
fn kernel_for(page_size: usize) -> Option<Kernel> {
    let chunks = page_size / CHUNK_LEN;
    if !page_size.is_multiple_of(CHUNK_LEN) || !chunks.is_power_of_two() {
        return None;
    }
    static CHECKED: OnceLock<bool> = OnceLock::new();
    let kernel = Kernel {
        platform: Platform::detect(),
        chunks,
    };
    CHECKED.get_or_init(self_check).then_some(kernel)
}

/// Whether the batch kernel agrees with `blake3::hash` on every page shape it takes (1 to
/// 64 chunks, batches of 1 to [`BATCH_PAGES`] + 1 pages).
fn self_check() -> bool {
    let platform = Platform::detect();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = vec![0u8; (BATCH_PAGES + 1) * 64 * CHUNK_LEN];
    for b in &mut bytes {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed.to_le_bytes()[0];
    }
    for chunks in [1, 2, 4, 8, 64] {
        let k = Kernel { platform, chunks };
        let ps = chunks * CHUNK_LEN;
        for count in [1, 3, BATCH_PAGES, BATCH_PAGES + 1] {
            let pages: Vec<(usize, &[u8])> = bytes.chunks(ps).take(count).enumerate().collect();
            let mut out = vec![blake3::Hash::from_bytes([0; OUT_LEN]); count];
            for batch in pages.chunks(BATCH_PAGES) {
                k.hash_into(batch, &mut out);
            }
            if pages.iter().any(|(i, p)| out[*i] != blake3::hash(p)) {
                tracing::error!(
                    page_bytes = ps,
                    "blake3's batch kernel disagrees with blake3::hash: hashing page by page \
                     (a blake3 release other than the one Cargo.toml pins?)"
                );
                return false;
            }
        }
    }
    true
}

/// blake3's SIMD kernel, for pages of `chunks` chunks (a power of two).
#[derive(Clone, Copy)]
struct Kernel {
    platform: Platform,
    chunks: usize,
}

impl Kernel {
    /// Hashes each `(slot, page)` of `batch` (full pages, at most [`BATCH_PAGES`]) into
    /// `out[slot]`.
    fn hash_into(self, batch: &[(usize, &[u8])], out: &mut [blake3::Hash]) {
        let n = batch.len();
        let c = self.chunks;
        debug_assert!(n <= BATCH_PAGES && batch.iter().all(|(_, p)| p.len() == c * CHUNK_LEN));
        // every node of a level, page by page: page b's nodes are [b * width, (b+1) * width),
        // so two siblings are 64 adjacent bytes, the next level's input as it lies
        let mut level = vec![0u8; n * c * OUT_LEN];
        let mut lanes = vec![0u8; n * OUT_LEN];
        let mut inputs: Vec<&[u8; CHUNK_LEN]> = Vec::with_capacity(n);
        for j in 0..c {
            inputs.clear();
            inputs.extend(batch.iter().map(|(_, page)| {
                <&[u8; CHUNK_LEN]>::try_from(&page[j * CHUNK_LEN..(j + 1) * CHUNK_LEN])
                    .expect("a chunk is CHUNK_LEN bytes")
            }));
            // a one-chunk page's chunk is its root
            let end = if c == 1 { CHUNK_END | ROOT } else { CHUNK_END };
            self.platform.hash_many(
                &inputs,
                &IV,
                j as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                end,
                &mut lanes,
            );
            for (b, cv) in lanes.chunks_exact(OUT_LEN).enumerate() {
                let at = (b * c + j) * OUT_LEN;
                level[at..at + OUT_LEN].copy_from_slice(cv);
            }
        }
        let mut width = c;
        let mut next = vec![0u8; level.len() / 2];
        while width > 1 {
            let flags = if width == 2 { PARENT | ROOT } else { PARENT };
            let parents: Vec<&[u8; BLOCK_LEN]> = level
                .chunks_exact(BLOCK_LEN)
                .map(|pair| <&[u8; BLOCK_LEN]>::try_from(pair).expect("two CVs"))
                .collect();
            let len = parents.len() * OUT_LEN;
            self.platform.hash_many(
                &parents,
                &IV,
                0,
                IncrementCounter::No,
                flags,
                0,
                0,
                &mut next[..len],
            );
            std::mem::swap(&mut level, &mut next);
            level.truncate(len);
            width /= 2;
        }
        for ((slot, _), root) in batch.iter().zip(level.chunks_exact(OUT_LEN)) {
            out[*slot] = blake3::Hash::from_bytes(root.try_into().expect("a CV is 32 bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn issue15_the_batch_kernel_passes_its_own_check() {
        assert!(self_check());
        assert!(kernel_for(4096).is_some());
        assert!(
            kernel_for(512).is_none(),
            "half a chunk has no batch kernel"
        );
        assert!(
            kernel_for(3 * 1024).is_none(),
            "three chunks are not a balanced tree"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every page size the config allows, any length (a short last page), pages of
        /// zeros the caller keeps, and pages the caller leaves to us: blake3::hash each.
        #[test]
        fn issue15_many_pages_hash_as_blake3_hashes_each(
            shift in 9u32..=20,
            pages in 0usize..40,
            tail in 0usize..2048,
            seed in any::<u64>(),
            zeros in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let ps = 1usize << shift;
            // (the kernel, not its fallback, for every size of whole chunks)
            prop_assert_eq!(kernel_for(ps).is_some(), ps >= CHUNK_LEN);
            let pages = if ps >= 1 << 17 { pages.min(3) } else { pages };
            let len = pages * ps + tail.min(ps - 1);
            let mut s = seed | 1;
            let mut data: Vec<u8> = (0..len).map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s.to_le_bytes()[0]
            }).collect();
            for (i, page) in data.chunks_mut(ps).enumerate() {
                if zeros[i % zeros.len()] {
                    page.fill(0);
                }
            }
            let mut out = vec![blake3::hash(b"already there")];
            page_digests(&data, ps, &mut out, &mut |p| {
                p.iter().all(|&b| b == 0).then(|| blake3::hash(p))
            });
            prop_assert_eq!(out.len(), 1 + data.chunks(ps).count());
            prop_assert_eq!(out[0], blake3::hash(b"already there"));
            for (i, page) in data.chunks(ps).enumerate() {
                prop_assert_eq!(out[1 + i], blake3::hash(page), "page {} of {}", i, ps);
            }
        }
    }
}
