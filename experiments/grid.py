"""Spreading a grid of independent runs (the cells of an experiment) over processes.

A grid script enumerates its cells in a fixed order and runs only the cells of its shard: cell i
belongs to shard i mod N. The shard comes from `--shard I/N`, else from the scheduler or launcher
that started the script:

  - a Slurm job array (`sbatch --array=0-7 ...`): SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT;
  - `mpirun -np N python3 experiments/s3delta.py ...` (or `srun -n N`): the MPI rank and size
    (OMPI_COMM_WORLD_RANK / _SIZE, PMI_RANK / PMI_SIZE, PMIX_RANK with PMIX_SIZE);

and is 0/1 (everything) otherwise. Every shard appends to the same results file under an
exclusive lock, one whole line at a time, and skips cells already there, so shards, restarts and
a second pass over failed cells all combine. The `deltatune` runs a shard starts are single
processes: the launcher's variables are removed from their environment (a `train` started with
them would try to join the launcher's job).
"""
import fcntl
import json
import os

LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_")


def shard_from_env(env=None):
    """(index, count) from a job array or an MPI launcher, or (0, 1)."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env:
        count = env.get("SLURM_ARRAY_TASK_COUNT")
        if count is None:  # older Slurm: min/max only
            count = int(env["SLURM_ARRAY_TASK_MAX"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) + 1
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(count)
    for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"), ("PMIX_RANK", "PMIX_SIZE")):
        if rank in env and size in env:
            return int(env[rank]), int(env[size])
    return 0, 1


def parse_shard(text, env=None):
    """`I/N` (0-based I) or None (from the environment); errors name the flag."""
    if text is None:
        return shard_from_env(env)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"invalid --shard {text!r}: expected I/N, e.g. 0/4")
    if not (n >= 1 and 0 <= i < n):
        raise SystemExit(f"invalid --shard {text!r}: need 0 <= I < N")
    return i, n


def mine(cell_index, shard):
    """Whether cell `cell_index` (0-based, in the grid's fixed order) belongs to `shard`."""
    i, n = shard
    return cell_index % n == i


def child_env(env=None):
    """The environment for a `deltatune` run started by a shard: without the launcher's variables."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if not k.startswith(LAUNCHER_PREFIXES)}


def append(path, record):
    """Appends one JSON line to `path` under an exclusive lock (shards share the file)."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    # Self-check: every cell in exactly one shard; environments parsed.
    for n in range(1, 9):
        owners = [[s for s in range(n) if mine(c, (s, n))] for c in range(50)]
        assert all(len(o) == 1 for o in owners), n
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}) == (5, 8)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"}) == (3, 4)
    assert shard_from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == (1, 2)
    assert parse_shard("2/3") == (2, 3)
    assert "OMPI_COMM_WORLD_SIZE" not in child_env({"OMPI_COMM_WORLD_SIZE": "2", "PATH": "/bin"})
    print("grid: ok")
