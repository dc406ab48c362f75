//! Data-parallel training: the few collective operations a training loop needs when several
//! processes (ranks) train one set of deltas, each on its shard of every global batch.
//!
//! The training loops take a [`Collective`] from their [`crate::control::Control`]; without one
//! they run alone. Every rank holds the same frozen backbone and the same deltas; per optimizer
//! step, the ranks' delta and head gradients are summed in one all-reduce ([`GradExchange`]),
//! so that every rank applies the identical AdamW update. Only rank 0 writes.
//!
//! [`mpi`] (cargo feature `mpi`) implements the trait over MPI; [`Solo`] is the one-process
//! case, and tests may implement it over threads.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What ranks exchange. Every rank calls the same operations in the same order; an operation
/// returns once all ranks have contributed.
pub trait Collective: Send + Sync {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place (every rank gets the sum).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, in place, in double precision (counters, flags, losses).
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's `buf` to every rank.
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()>;
}

/// One process: every operation is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// The number of processes an MPI launcher (`mpirun`, `mpiexec`, Slurm's `srun --mpi=pmix`) says it
/// started, from the environment it gives each process; `None` when not started by one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
}

/// `(rank, size)` of an optional collective.
pub fn rank_size(world: Option<&dyn Collective>) -> (usize, usize) {
    world.map_or((0, 1), |w| (w.rank(), w.size()))
}

/// Rank `rank`'s share of a global batch of `n` rows: a contiguous range, the first `n % size`
/// ranks one row longer (rows are ordered as in a one-process run, so rank r's rows start at
/// the returned offset).
pub fn shard(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Agrees on whether every rank got this far: `local` is this rank's outcome. Returns it when
/// every rank succeeded; otherwise every rank returns an error — the failing ranks their own,
/// the others one naming the ranks that failed — so that all stop before the first step. The
/// errors are [`Error::AllRanksStopped`]: every rank knows, none has to end the others.
pub fn agree<T>(world: Option<&dyn Collective>, what: &str, local: Result<T>) -> Result<T> {
    let Some(w) = world.filter(|w| w.size() > 1) else { return local };
    let mut failed = vec![0f64; w.size()];
    failed[w.rank()] = f64::from(u8::from(local.is_err()));
    w.sum_f64(&mut failed)?;
    let ranks: Vec<String> = failed.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(r, _)| r.to_string()).collect();
    match local {
        Err(e) => Err(Error::AllRanksStopped(Box::new(e))),
        Ok(_) if !ranks.is_empty() => Err(Error::AllRanksStopped(Box::new(Error::Distributed(format!(
            "rank{} {} failed {what} (its error is printed above); no rank started",
            if ranks.len() > 1 { "s" } else { "" },
            ranks.join(", ")
        ))))),
        Ok(v) => Ok(v),
    }
}

/// Checks that every rank has the same `fingerprint` (a hash of the resolved settings and data),
/// so that ranks started with different flags or files refuse to train together.
pub fn check_same(world: Option<&dyn Collective>, what: &str, fingerprint: u64) -> Result<()> {
    let Some(w) = world.filter(|w| w.size() > 1) else { return Ok(()) };
    // Two halves, each exact in an f64.
    let mine = [(fingerprint >> 32) as f64, (fingerprint & 0xFFFF_FFFF) as f64];
    let mut root = mine;
    w.broadcast_f64(&mut root)?;
    let mut differ = vec![0f64; w.size()];
    differ[w.rank()] = f64::from(u8::from(root != mine));
    w.sum_f64(&mut differ)?;
    let ranks: Vec<String> = differ.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(r, _)| r.to_string()).collect();
    if ranks.is_empty() {
        Ok(())
    } else {
        let msg = format!("rank(s) {} have different {what} than rank 0; start every rank with the same command and files", ranks.join(", "));
        Err(Error::AllRanksStopped(Box::new(Error::Distributed(msg))))
    }
}

/// Sums named gradients over ranks: one all-reduce of one flat f32 buffer per optimizer step,
/// with the scalars the step needs (loss, example count, a stop flag) carried alongside.
pub struct GradExchange {
    /// (name, element count, shape) in a fixed order — the same on every rank.
    layout: Vec<(String, usize, Vec<usize>)>,
    buf: Vec<f32>,
    /// Time spent in exchanges: the all-reduce (which includes waiting for the slowest rank) and
    /// the copies around it.
    pub comm: Duration,
    /// Bytes of one exchange.
    pub bytes: usize,
}

/// What the ranks agree on in a step besides the gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTotals {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Examples (or target tokens) the loss sum covers.
    pub count: f64,
    /// Some rank was asked to stop.
    pub stop: bool,
}

impl GradExchange {
    pub fn new(params: &[(String, Var)]) -> Self {
        let layout: Vec<(String, usize, Vec<usize>)> = params.iter().map(|(n, v)| (n.clone(), v.elem_count(), v.dims().to_vec())).collect();
        let n: usize = layout.iter().map(|(_, c, _)| c + 1).sum::<usize>() + 3;
        GradExchange { layout, buf: vec![0.0; n], comm: Duration::ZERO, bytes: n * 4 }
    }

    /// Sums `grads` (this rank's, possibly missing some names) and `totals` over ranks. A name
    /// no rank has a gradient for stays absent, as in a one-process run.
    pub fn all_reduce(&mut self, world: &dyn Collective, grads: BTreeMap<String, Tensor>, totals: StepTotals, device: &Device) -> Result<(BTreeMap<String, Tensor>, StepTotals)> {
        let t0 = Instant::now();
        let mut at = 0;
        for (name, count, _) in &self.layout {
            // One presence flag per tensor, then its values (zeros where absent).
            match grads.get(name) {
                Some(g) => {
                    self.buf[at] = 1.0;
                    let v = g.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
                    self.buf[at + 1..at + 1 + count].copy_from_slice(&v);
                }
                None => self.buf[at..at + 1 + count].fill(0.0),
            }
            at += 1 + count;
        }
        let mut scalars = [totals.loss_sum, totals.count, f64::from(u8::from(totals.stop))];
        world.sum_f32(&mut self.buf)?;
        world.sum_f64(&mut scalars)?;
        let mut out = BTreeMap::new();
        at = 0;
        for (name, count, shape) in &self.layout {
            if self.buf[at] > 0.0 {
                out.insert(name.clone(), Tensor::from_slice(&self.buf[at + 1..at + 1 + count], shape.as_slice(), device)?);
            }
            at += 1 + count;
        }
        self.comm += t0.elapsed();
        Ok((out, StepTotals { loss_sum: scalars[0], count: scalars[1], stop: scalars[2] > 0.0 }))
    }
}

/// Ranks as threads of one process (tests and examples): `run(n, f)` calls `f(&world)` on `n`
/// threads, each with its own rank, and returns their results in rank order.
pub mod threads {
    use super::Collective;
    use crate::error::{Error, Result};
    use std::sync::{Arc, Barrier, Mutex};

    struct Shared {
        barrier: Barrier,
        f32s: Mutex<Vec<f32>>,
        f64s: Mutex<Vec<f64>>,
    }

    pub struct ThreadWorld {
        rank: usize,
        size: usize,
        shared: Arc<Shared>,
    }

    fn lock<T>(m: &Mutex<Vec<T>>) -> Result<std::sync::MutexGuard<'_, Vec<T>>> {
        m.lock().map_err(|_| Error::Distributed("a rank thread panicked".into()))
    }

    impl ThreadWorld {
        /// Sums every rank's `buf` in rank order (deterministic), then hands the sum back.
        fn reduce<T: Copy + Default + std::ops::Add<Output = T>>(&self, slot: &Mutex<Vec<T>>, buf: &mut [T], broadcast: bool) -> Result<()> {
            // Each rank adds in turn, rank 0 first: the result does not depend on timing.
            for r in 0..self.size {
                if r == self.rank {
                    let mut acc = lock(slot)?;
                    if r == 0 {
                        *acc = buf.to_vec();
                    } else if !broadcast {
                        for (a, b) in acc.iter_mut().zip(buf.iter()) {
                            *a = *a + *b;
                        }
                    }
                }
                self.shared.barrier.wait();
            }
            buf.copy_from_slice(&lock(slot)?);
            self.shared.barrier.wait();
            Ok(())
        }
    }

    impl Collective for ThreadWorld {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.reduce(&self.shared.f32s, buf, false)
        }
        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.reduce(&self.shared.f64s, buf, false)
        }
        fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.reduce(&self.shared.f64s, buf, true)
        }
    }

    /// [`run`] with each rank inside a rayon pool of its own, with an equal share (at least one)
    /// of the calling pool's threads: data parallelism inside one process. Each rank's kernels
    /// run on its own cores over whole matrices of its shard, instead of every kernel being split
    /// across all cores (which costs synchronisation on every call). Each rank holds its own
    /// model, so memory grows by the frozen weights once per extra rank.
    pub fn run_split<T: Send>(n: usize, f: impl Fn(&ThreadWorld) -> T + Sync) -> Result<Vec<T>> {
        let per = (rayon::current_num_threads() / n.max(1)).max(1);
        let pools = (0..n)
            .map(|r| rayon::ThreadPoolBuilder::new().num_threads(per).thread_name(move |i| format!("rank{r}-{i}")).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Distributed(format!("creating the ranks' thread pools: {e}")))?;
        Ok(run(n, |w| pools[w.rank].install(|| f(w))))
    }

    /// Runs `f` on `n` rank threads; results in rank order.
    pub fn run<T: Send>(n: usize, f: impl Fn(&ThreadWorld) -> T + Sync) -> Vec<T> {
        let shared = Arc::new(Shared { barrier: Barrier::new(n), f32s: Mutex::new(Vec::new()), f64s: Mutex::new(Vec::new()) });
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let w = ThreadWorld { rank, size: n, shared: shared.clone() };
                    let f = &f;
                    s.spawn(move || f(&w))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Shards cover the batch in order, without overlap, and differ in size by at most one.
        #[test]
        fn shards_partition_the_batch(n in 0usize..200, size in 1usize..17) {
            let mut next = 0;
            let mut lens = Vec::new();
            for r in 0..size {
                let s = shard(n, r, size);
                prop_assert_eq!(s.start, next);
                next = s.end;
                lens.push(s.len());
            }
            prop_assert_eq!(next, n);
            prop_assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn thread_world_sums_and_agrees() {
        let out = threads::run(3, |w| {
            let mut b = vec![w.rank() as f32 + 1.0, 1.0];
            w.sum_f32(&mut b).unwrap();
            let mut x = [if w.rank() == 0 { 7.0 } else { 0.0 }];
            w.broadcast_f64(&mut x).unwrap();
            let ok = agree(Some(w), "loading", if w.rank() == 2 { Err(Error::Delta("boom".into())) } else { Ok(()) });
            let same = check_same(Some(w), "settings", if w.rank() == 1 { 5 } else { 4 });
            (b, x[0], ok.map_err(|e| e.to_string()), same.map_err(|e| e.to_string()))
        });
        for (r, (b, x, ok, same)) in out.into_iter().enumerate() {
            assert_eq!(b, vec![6.0, 3.0]);
            assert_eq!(x, 7.0);
            match r {
                2 => assert_eq!(ok.unwrap_err(), "boom"),
                _ => assert!(ok.unwrap_err().contains("rank 2 failed loading"), "rank {r}"),
            }
            assert!(same.unwrap_err().contains("rank(s) 1 have different settings"));
        }
    }
}
