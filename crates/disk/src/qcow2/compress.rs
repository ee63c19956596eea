//! Compressed clusters: raw deflate streams (no zlib header, as QEMU writes them with
//! `windowBits = -12`), each inflating to exactly one cluster.

use flate2::{Decompress, FlushDecompress, Status};

/// Inflate `input` into one cluster of `cluster_size` bytes. The input may carry trailing
/// bytes (its length is rounded up to sectors); the output must fill the whole cluster.
pub fn inflate_cluster(input: &[u8], cluster_size: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; cluster_size];
    let mut d = Decompress::new(false);
    let status = d
        .decompress(input, &mut out, FlushDecompress::Finish)
        .map_err(|e| format!("inflate failed: {e}"))?;
    let produced = d.total_out() as usize;
    match status {
        Status::StreamEnd | Status::Ok | Status::BufError if produced == cluster_size => Ok(out),
        _ => Err(format!(
            "inflated to {produced} bytes, expected {cluster_size}"
        )),
    }
}

/// Deflate one cluster (raw stream), for tests that build compressed images by hand.
#[cfg(test)]
pub fn deflate_cluster(data: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::default(), false);
    let mut out = vec![0u8; data.len() + 1024];
    c.compress(data, &mut out, FlushCompress::Finish)
        .expect("deflate into a large enough buffer");
    out.truncate(c.total_out() as usize);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_inflate_roundtrip_fills_cluster() {
        // Arrange
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut packed = deflate_cluster(&data);
        packed.extend_from_slice(&[0u8; 300]);
        // Act
        let out = inflate_cluster(&packed, 4096).unwrap();
        // Assert
        assert_eq!(out, data);
    }

    #[test]
    fn test_inflate_garbage_is_error() {
        // Arrange
        let garbage = [0xffu8; 64];
        // Act
        let res = inflate_cluster(&garbage, 4096);
        // Assert
        assert!(res.is_err());
    }

    #[test]
    fn test_inflate_short_stream_is_error() {
        // Arrange
        let packed = deflate_cluster(&[7u8; 1024]);
        // Act
        let res = inflate_cluster(&packed, 4096);
        // Assert
        assert!(res.is_err());
    }
}
