//! Data-parallel runs: a process started by an MPI launcher (`mpirun -np N deltatune train …`)
//! joins the job's other processes here, before any work; only `train` and `train-lm` run this
//! way. Built without the `mpi` feature, such a start is refused with what to do instead.

use crate::args::Command;
use anyhow::Result;
use deltatune::dist::Collective;
use std::process::ExitCode;

/// The MPI job this process belongs to (feature `mpi`).
pub struct Session {
    #[cfg(feature = "mpi")]
    inner: deltatune::dist::mpi::Session,
}

impl Session {
    pub fn collective(&self) -> &dyn Collective {
        #[cfg(feature = "mpi")]
        return &self.inner.world;
        #[cfg(not(feature = "mpi"))]
        unreachable!("no session exists without the mpi feature")
    }

    /// Prints `e` with this rank's number. When every rank stopped on an error they agreed on,
    /// finalises MPI and exits 1 like the others; otherwise ends every rank of the job
    /// (MPI_Abort): a rank that stops while the others wait in an exchange must not leave them
    /// waiting.
    pub fn fail(self, e: &anyhow::Error) -> ExitCode {
        let w = self.collective();
        // One write of the whole line: stderr is unbuffered, so a formatted print would go out in
        // pieces, and the launcher may forward another rank's output between them.
        let line = format!("rank {} of {}: error: {e:#}\n", w.rank(), w.size());
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        let agreed = e.chain().any(|c| matches!(c.downcast_ref::<deltatune::Error>(), Some(deltatune::Error::AllRanksStopped(_))));
        if agreed {
            drop(self);
            return ExitCode::FAILURE;
        }
        #[cfg(feature = "mpi")]
        self.inner.world.abort(1);
        #[cfg(not(feature = "mpi"))]
        ExitCode::FAILURE
    }
}

/// Joins the MPI job when started by a launcher with more than one process.
pub fn start(cmd: &Command) -> Result<Option<Session>> {
    let Some(n) = deltatune::dist::launched_size().filter(|&n| n > 1) else { return Ok(None) };
    let name = match cmd {
        Command::Train(_) => "train",
        Command::TrainLm(_) => "train-lm",
        _ => anyhow::bail!(
            "this process was started by an MPI launcher with {n} processes, but only `train` and `train-lm` run data-parallel; start other commands without mpirun (a grid of runs spreads over ranks with scripts/grid_shard.py)"
        ),
    };
    #[cfg(feature = "mpi")]
    {
        let _ = name;
        Ok(Some(Session { inner: deltatune::dist::mpi::init()? }))
    }
    #[cfg(not(feature = "mpi"))]
    anyhow::bail!(
        "`{name}` was started by an MPI launcher with {n} processes, but this deltatune was built without MPI support; build it with `cargo build --release --features mpi` (needs an MPI library and libclang: scripts/setup-mpi.sh installs them), or run a single process"
    )
}
