//! Counter-based randomness for dropout: a mask element is a pure function of (key, index), so the
//! same step always drops the same units whatever the thread count, and a resumed run reproduces
//! the uninterrupted one.

/// Identifies one dropout application: derived from the run seed, the step and the call site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropoutKey(pub u64);

#[inline]
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a string (FNV-1a), for deriving keys from site paths.
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

impl DropoutKey {
    /// A new key for a sub-stream (e.g. a site path or a tag such as "attn_probs").
    pub fn derive(self, tag: &str) -> Self {
        DropoutKey(splitmix64(self.0 ^ hash_str(tag)))
    }

    pub fn derive_n(self, n: u64) -> Self {
        DropoutKey(splitmix64(self.0 ^ splitmix64(n.wrapping_add(0x5851_F42D_4C95_7F2D))))
    }

    /// A uniform number in [0, 1) for element `i`.
    #[inline]
    pub fn uniform(self, i: u64) -> f32 {
        let r = splitmix64(self.0.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        (r >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Whether element `i` is kept under drop probability `p`.
    #[inline]
    pub fn keep(self, i: u64, p: f32) -> bool {
        self.uniform(i) >= p
    }

    /// The key whose element `i` is this key's element `i + offset` (the element index enters
    /// [`Self::uniform`] only as `key + i · C`, so an offset folds into the key).
    pub fn shifted(self, offset: u64) -> Self {
        DropoutKey(self.0.wrapping_add(offset.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// For a batch-major tensor of `elems` elements computed inside [`in_batch_rows`]: the key that
    /// gives its rows the masks they get in the whole batch.
    pub fn for_rows(self, elems: usize) -> Self {
        let (first, rows) = BATCH_ROWS.with(|c| c.get());
        if first == 0 || rows == 0 || !elems.is_multiple_of(rows) {
            return self;
        }
        self.shifted((first * (elems / rows)) as u64)
    }
}

thread_local! {
    /// (first row of the whole batch, rows) of the shard the current thread computes; (0, 0) outside
    /// [`in_batch_rows`].
    static BATCH_ROWS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// Runs `f` — a forward pass over rows `first..first + rows` of a larger batch (data-parallel
/// training computes one shard per process) — so that every dropout mask it draws equals the mask
/// those rows get when the whole batch runs at once: masks depend on the seed and on the global
/// position, not on how the batch was split. The tensors dropout applies to are batch-major
/// (rows outermost) and padded to the whole batch's length.
pub fn in_batch_rows<R>(first: usize, rows: usize, f: impl FnOnce() -> R) -> R {
    let before = BATCH_ROWS.with(|c| c.replace((first, rows)));
    let out = f();
    BATCH_ROWS.with(|c| c.set(before));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_p() {
        let k = DropoutKey(42).derive("x");
        let n = 200_000u64;
        let kept = (0..n).filter(|&i| k.keep(i, 0.1)).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        // Different keys give different masks.
        let k2 = DropoutKey(43).derive("x");
        let same = (0..1000u64).filter(|&i| k.keep(i, 0.5) == k2.keep(i, 0.5)).count();
        assert!(same < 600, "{same}");
    }

    #[test]
    fn shifted_key_is_an_index_offset() {
        let k = DropoutKey(7).derive("y");
        for off in [1u64, 5, 1 << 40] {
            for i in 0..100u64 {
                assert_eq!(k.shifted(off).uniform(i), k.uniform(i + off));
            }
        }
        // Outside a shard, and for tensors that are not batch-major, the key is unchanged.
        assert_eq!(k.for_rows(12), k);
        in_batch_rows(3, 2, || {
            assert_eq!(k.for_rows(10), k.shifted(15));
            assert_eq!(k.for_rows(7), k);
        });
        assert_eq!(k.for_rows(10), k);
    }
}
