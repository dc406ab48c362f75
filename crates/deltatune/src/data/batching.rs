//! The order in which training examples are batched: a seeded shuffle per epoch, optionally
//! length-bucketed so that a batch holds examples of similar length (less padding with dynamic
//! padding). Only indices; tokenizing and padding are in [`crate::data::tokenize`].

use crate::data::rng::{permutation, shuffle, stream, SplitMix64};

/// How many batches' worth of examples are sorted together when bucketing. Large enough that
/// batches are homogeneous in length, small enough that the epoch order stays well mixed.
pub const BUCKET_BATCHES: usize = 50;

/// The batches of one epoch, as indices into `lengths`.
///
/// The indices are shuffled with `(seed, epoch)`. Without bucketing the batches are consecutive
/// runs of `batch_size` of that order. With bucketing the shuffled order is cut into chunks of
/// `batch_size * BUCKET_BATCHES`, each chunk is sorted by length (stable, so ties keep the
/// shuffled order) and cut into batches, and the order of all batches is shuffled again.
///
/// Every index appears exactly once; only the last batch of a chunk (or of the epoch) may be
/// short. A `batch_size` of 0 is treated as 1. The result depends only on the arguments.
pub fn batch_order(lengths: &[usize], batch_size: usize, seed: u64, epoch: u64, bucketed: bool) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let order = permutation(lengths.len(), &mut SplitMix64::derived(seed, &[stream::EPOCH_ORDER, epoch]));
    if !bucketed {
        return order.chunks(bs).map(<[usize]>::to_vec).collect();
    }
    let len_of = |i: &usize| lengths.get(*i).copied().unwrap_or(0);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(lengths.len().div_ceil(bs));
    for chunk in order.chunks(bs.saturating_mul(BUCKET_BATCHES)) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(len_of);
        batches.extend(chunk.chunks(bs).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut SplitMix64::derived(seed, &[stream::BATCH_ORDER, epoch]));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flat_sorted(batches: &[Vec<usize>]) -> Vec<usize> {
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort_unstable();
        all
    }

    proptest! {
        #[test]
        fn every_index_once_and_deterministic(
            lengths in proptest::collection::vec(0usize..300, 0..700),
            batch_size in 0usize..40,
            seed in any::<u64>(),
            epoch in 0u64..5,
            bucketed in any::<bool>(),
        ) {
            let b = batch_order(&lengths, batch_size, seed, epoch, bucketed);
            prop_assert_eq!(flat_sorted(&b), (0..lengths.len()).collect::<Vec<_>>());
            let bs = batch_size.max(1);
            prop_assert!(b.iter().all(|x| !x.is_empty() && x.len() <= bs));
            prop_assert_eq!(&b, &batch_order(&lengths, batch_size, seed, epoch, bucketed));
            if !bucketed {
                // Consecutive batches: only the last one may be short.
                prop_assert!(b.iter().rev().skip(1).all(|x| x.len() == bs));
            }
        }

        #[test]
        fn bucketed_batches_are_sorted_runs(
            lengths in proptest::collection::vec(0usize..300, 1..400),
            batch_size in 1usize..16,
            seed in any::<u64>(),
        ) {
            for x in batch_order(&lengths, batch_size, seed, 0, true) {
                prop_assert!(x.windows(2).all(|w| lengths[w[0]] <= lengths[w[1]]));
            }
        }
    }

    #[test]
    fn epochs_and_seeds_differ() {
        let lengths: Vec<usize> = (0..200).map(|i| (i * 37) % 61).collect();
        let e0 = batch_order(&lengths, 8, 42, 0, false);
        assert_ne!(e0, batch_order(&lengths, 8, 42, 1, false));
        assert_ne!(e0, batch_order(&lengths, 8, 43, 0, false));
        assert_ne!(batch_order(&lengths, 8, 42, 0, true), batch_order(&lengths, 8, 42, 1, true));
    }

    #[test]
    fn bucketing_reduces_padding() {
        // Padding = sum over batches of (max length * size - sum of lengths).
        let lengths: Vec<usize> = (0..4000).map(|i| 5 + (i * 7919) % 120).collect();
        let padding = |b: &[Vec<usize>]| -> usize {
            b.iter()
                .map(|x| {
                    let max = x.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                    x.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain = padding(&batch_order(&lengths, 32, 1, 0, false));
        let bucketed = padding(&batch_order(&lengths, 32, 1, 0, true));
        assert!(bucketed * 10 < plain, "bucketed {bucketed} vs plain {plain}");
    }

    #[test]
    fn empty_input() {
        assert!(batch_order(&[], 4, 0, 0, true).is_empty());
        assert!(batch_order(&[], 4, 0, 0, false).is_empty());
    }
}
