//! Buffers reused across training steps. The block engines take their activations and gradients
//! from here and give them back when a layer's backward is done with them (or when the step's
//! graph is dropped), so a step neither zero-fills nor faults in fresh pages for the hundreds of
//! megabytes it overwrites anyway: the next step (or the next layer) gets the same memory back.
//!
//! A buffer from [`take`] holds unspecified finite values (what its last user left, or zeros):
//! only for outputs whose every element is written before it is read.
//!
//! The pool keeps at most [`MAX_BUFFERS`] buffers, [`MAX_BYTES`] in all, and never more bytes than
//! the engines have held at once; beyond that, a buffer given back is freed. Small buffers are not
//! kept (the allocator serves them well). [`clear`] frees them all.

use std::sync::Mutex;

/// Buffers kept at most.
const MAX_BUFFERS: usize = 256;
/// Bytes kept at most (all buffers together).
const MAX_BYTES: usize = 2 << 30;
/// Buffers smaller than this (elements) are neither kept nor looked up.
const MIN_LEN: usize = 1 << 14;

/// Free buffers; the engines use [`POOL`].
pub(crate) struct Pool {
    inner: Mutex<Inner>,
}

struct Inner {
    bufs: Vec<Vec<f32>>,
    /// Bytes taken and not given back (buffers the engines hold now), and the most ever: the
    /// pool keeps no more than that, so a buffer given back that was not taken here (a fresh
    /// allocation handed over) cannot make it grow step after step.
    out: usize,
    most_out: usize,
}

/// The process's pool.
pub(crate) static POOL: Pool = Pool::new();

impl Pool {
    pub(crate) const fn new() -> Self {
        Pool { inner: Mutex::new(Inner { bufs: Vec::new(), out: 0, most_out: 0 }) }
    }

    /// A buffer of `n` elements with unspecified (finite) contents: one given back earlier whose
    /// capacity fits (at least `n`, at most twice it; the smallest such), or a fresh one.
    pub(crate) fn take(&self, n: usize) -> Vec<f32> {
        if n < MIN_LEN {
            return vec![0.0; n];
        }
        let Ok(mut p) = self.inner.lock() else { return vec![0.0; n] };
        let fits = p.bufs.iter().enumerate().filter(|(_, v)| v.capacity() >= n && v.capacity() <= 2 * n);
        let mut v = match fits.min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i) {
            Some(i) => p.bufs.swap_remove(i),
            None => Vec::new(),
        };
        p.out += n.max(v.capacity()) * 4;
        p.most_out = p.most_out.max(p.out);
        drop(p);
        // Elements past the old length (never written, or a fresh buffer) are zeroed; the rest
        // are kept.
        v.resize(n, 0.0);
        v
    }

    /// Gives a buffer back for a later [`Self::take`].
    pub(crate) fn give(&self, v: Vec<f32>) {
        if v.capacity() < MIN_LEN {
            return;
        }
        if let Ok(mut p) = self.inner.lock() {
            let bytes = v.capacity() * 4;
            p.out = p.out.saturating_sub(bytes);
            let held: usize = p.bufs.iter().map(|b| b.capacity() * 4).sum();
            if p.bufs.len() < MAX_BUFFERS && held + bytes <= MAX_BYTES.min(p.most_out) {
                p.bufs.push(v);
            }
        }
    }

    /// Frees every kept buffer (the memory goes back to the allocator).
    pub(crate) fn clear(&self) {
        if let Ok(mut p) = self.inner.lock() {
            p.bufs.clear();
            p.most_out = p.out;
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.inner.lock().map(|p| p.bufs.iter().map(|b| b.capacity() * 4).sum()).unwrap_or(0)
    }
}

/// Whether the engines reuse buffers: `DELTATUNE_POOL` unset or not `0` (read once; `0`
/// allocates every buffer afresh, zeroed, for A/B timing).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DELTATUNE_POOL").map(|v| v != "0").unwrap_or(true))
}

/// [`Pool::take`] from the process's pool.
pub(crate) fn take(n: usize) -> Vec<f32> {
    if !enabled() {
        return vec![0.0; n];
    }
    POOL.take(n)
}

/// [`Pool::give`] to the process's pool.
pub(crate) fn give(v: Vec<f32>) {
    if enabled() {
        POOL.give(v)
    }
}

/// Gives back a buffer if there is one.
pub(crate) fn give_opt(v: Option<Vec<f32>>) {
    if let Some(v) = v {
        give(v)
    }
}

/// Frees every buffer the process's pool keeps (the memory goes back to the allocator); the
/// next step allocates afresh.
pub fn clear() {
    POOL.clear()
}

/// Frees the pool's buffers when dropped: a training run holds one for its duration, so that
/// the memory one step held goes back to the allocator when the run ends (or fails).
pub struct ClearOnDrop;

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        clear()
    }
}

/// Test support: `count` buffers of `n` NaNs given to the process's pool (taken first, so that
/// the pool keeps them), so that an engine that read a taken buffer before writing it would
/// produce NaN.
#[cfg(test)]
pub(crate) fn poison(n: usize, count: usize) {
    let bufs: Vec<Vec<f32>> = (0..count).map(|_| POOL.take(n)).collect();
    for mut v in bufs {
        v.fill(f32::NAN);
        POOL.give(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is the one taken next for a size it fits (same memory, contents kept
    /// where it is not longer), not for one it does not fit; `take_zeroed` zeroes it.
    #[test]
    fn buffers_come_back() {
        let pool = Pool::new();
        // A buffer that was not taken from the pool is not kept (the pool holds no more than was
        // taken at once).
        pool.give(vec![1.0; MIN_LEN * 3]);
        assert_eq!(pool.held_bytes(), 0);
        let mut v = pool.take(MIN_LEN * 3);
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        let ptr = v.as_ptr();
        pool.give(v);
        assert_eq!(pool.held_bytes(), MIN_LEN * 3 * 4);
        // Too large for it, and less than half of it: fresh buffers.
        let big = pool.take(MIN_LEN * 4);
        assert!(big.iter().all(|&x| x == 0.0));
        let small = pool.take(MIN_LEN);
        assert_ne!(small.as_ptr(), ptr);
        // A size it fits: the same memory, the old values up to the new length.
        let again = pool.take(MIN_LEN * 2);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again[5], 5.0);
        assert_eq!(again.len(), MIN_LEN * 2);
        pool.give(again);
        // Grown back past its last length: the elements past it are zeros, not stale.
        let grown = pool.take(MIN_LEN * 3);
        assert_eq!(grown.as_ptr(), ptr);
        assert_eq!((grown[5], grown[MIN_LEN * 2 + 1]), (5.0, 0.0));
        pool.give(grown);
        // Small buffers are not kept; the byte bound holds.
        pool.give(vec![1.0; 16]);
        assert_eq!(pool.held_bytes(), MIN_LEN * 3 * 4);
        pool.clear();
        assert_eq!(pool.held_bytes(), 0);
    }
}
