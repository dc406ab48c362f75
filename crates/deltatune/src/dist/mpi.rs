//! [`Collective`] over MPI (cargo feature `mpi`; needs an MPI library and its `mpicc` at build
//! time — Debian's `libopenmpi-dev` — and libclang for the bindings).
//!
//! A process started by `mpirun` calls [`init`] once, on its main thread, before any other MPI
//! use; the training loop then calls the collectives from whichever thread runs it (MPI's
//! "serialized" threading level: one thread at a time, guarded here by a mutex).

use super::Collective;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::sync::Mutex;

/// MPI_COMM_WORLD, as a [`Collective`].
pub struct MpiWorld {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is a handle to MPI_COMM_WORLD; MPI is initialised with (at least)
// the serialized threading level, and every use goes through the mutex, so no two threads call
// MPI at once.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Keeps MPI initialised; dropping it finalises MPI (after a successful run). After an error,
/// call [`MpiWorld::abort`] instead: finalising waits for ranks that may never arrive.
pub struct Session {
    _universe: mpi::environment::Universe,
    pub world: MpiWorld,
}

/// Initialises MPI. Errors when it is already initialised or the library cannot give a
/// threading level that allows calls from a worker thread.
pub fn init() -> Result<Session> {
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| Error::Distributed("MPI is already initialised in this process".into()))?;
    if level < mpi::Threading::Serialized {
        return Err(Error::Distributed(format!("the MPI library offers threading level {level:?}; training needs `serialized` or better")));
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    Ok(Session { _universe: universe, world: MpiWorld { comm: Mutex::new(comm), rank, size } })
}

impl MpiWorld {
    fn comm(&self) -> Result<std::sync::MutexGuard<'_, SimpleCommunicator>> {
        self.comm.lock().map_err(|_| Error::Distributed("the MPI communicator's lock is poisoned".into()))
    }

    /// Ends every rank of the job (MPI_Abort) with exit code `code`.
    pub fn abort(&self, code: i32) -> ! {
        match self.comm.lock() {
            Ok(c) => c.abort(code),
            Err(p) => p.into_inner().abort(code),
        }
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.comm()?.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.comm()?.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.comm()?.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }
}
