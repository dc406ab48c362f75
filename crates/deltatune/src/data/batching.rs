//! The order of examples in an epoch: a seeded shuffle, optionally bucketed by length so that a
//! batch's sequences need little padding. A pure function of (seed, epoch): a resumed run sees the
//! same batches as an uninterrupted one.

use crate::ops::rng::splitmix64;

/// Fisher–Yates shuffle driven by splitmix64 (stable across versions and platforms).
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..v.len()).rev() {
        state = splitmix64(state);
        let j = (state % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Batches (lists of example indices) for one epoch. Every index appears exactly once. With
/// `bucketed`, the shuffled list is cut into windows of 50 batches, each window is sorted by
/// length and cut into batches, and the batch order is shuffled again.
pub fn batch_order(lengths: &[usize], batch_size: usize, seed: u64, epoch: u64, bucketed: bool) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    let epoch_seed = splitmix64(seed ^ splitmix64(epoch.wrapping_add(0xA5A5)));
    shuffle(&mut idx, epoch_seed);
    if !bucketed {
        return idx.chunks(bs).map(|c| c.to_vec()).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in idx.chunks(bs * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| (lengths[i], i));
        batches.extend(w.chunks(bs).map(|c| c.to_vec()));
    }
    shuffle(&mut batches, splitmix64(epoch_seed ^ 0x5EED));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_index_once_and_deterministic(lens in proptest::collection::vec(1usize..200, 0..400), bs in 1usize..40,
                                              seed in any::<u64>(), epoch in 0u64..5, bucketed in any::<bool>()) {
            let a = batch_order(&lens, bs, seed, epoch, bucketed);
            let b = batch_order(&lens, bs, seed, epoch, bucketed);
            prop_assert_eq!(&a, &b);
            let mut all: Vec<usize> = a.iter().flatten().copied().collect();
            all.sort();
            prop_assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
            prop_assert!(a.iter().all(|b| !b.is_empty() && b.len() <= bs));
        }
    }

    #[test]
    fn epochs_differ_and_buckets_reduce_padding() {
        let lens: Vec<usize> = (0..1000).map(|i| 5 + (i * 37) % 120).collect();
        assert_ne!(batch_order(&lens, 32, 1, 0, false), batch_order(&lens, 32, 1, 1, false));
        let pad = |bs: &Vec<Vec<usize>>| -> usize {
            bs.iter().map(|b| {
                let m = b.iter().map(|&i| lens[i]).max().unwrap();
                b.iter().map(|&i| m - lens[i]).sum::<usize>()
            }).sum()
        };
        let plain = pad(&batch_order(&lens, 32, 1, 0, false));
        let bucket = pad(&batch_order(&lens, 32, 1, 0, true));
        assert!(bucket * 5 < plain, "{bucket} vs {plain}");
    }
}
