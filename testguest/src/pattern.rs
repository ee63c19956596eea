//! The disk test pattern and checksum (host tests compile this same file: crates/ferrite/tests/common/mod.rs).
//!
//! Sector `s` (512 bytes) written with seed `seed` holds 64 little-endian u64 words;
//! word `i` is `splitmix64(seed ^ (s << 20) ^ i)`. Checksums are FNV-1a 64 over bytes.

/// Bytes per virtio-blk sector (always 512, whatever the logical block size).
pub const SECTOR_SIZE: usize = 512;

/// SplitMix64 finaliser of `x` (one step from state `x`).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills one 512-byte sector with the pattern of `sector` under `seed`.
pub fn fill_sector(seed: u64, sector: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate().take(SECTOR_SIZE / 8) {
        let v = splitmix64(seed ^ (sector << 20) ^ i as u64);
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// True if `buf` holds the pattern of `sector` under `seed`.
pub fn check_sector(seed: u64, sector: u64, buf: &[u8]) -> bool {
    buf.chunks_exact(8)
        .take(SECTOR_SIZE / 8)
        .enumerate()
        .all(|(i, word)| word == splitmix64(seed ^ (sector << 20) ^ i as u64).to_le_bytes())
}

/// FNV-1a 64 offset basis (the hash of zero bytes).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues an FNV-1a 64 hash over `bytes`.
pub fn fnv1a64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}
