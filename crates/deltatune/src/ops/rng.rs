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
}
