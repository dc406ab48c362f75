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
import subprocess
import time
from pathlib import Path

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


def common_args(ap, out, work, threads=2):
    """The flags every grid script has: the binary, the data root, the results file, the work
    directory, threads per run and the shard."""
    ap.add_argument("--bin", default="target/release/deltatune")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default=out)
    ap.add_argument("--work", default=work)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--shard", default=None, help="I/N: run every N-th cell from the I-th (default: from a job array or mpirun)")


def done_keys(path, key):
    """`key(record)` of every finished record (no "error") in the results file `path`."""
    keys = set()
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" not in r:
                keys.add(key(r))
    return keys


def run_json(cmd, log):
    """Runs a `deltatune ... --json` command (launcher variables removed), appends its stderr tail
    to `log`, and returns its JSON result and wall seconds; raises with the stderr tail on failure."""
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + p.stderr[-4000:] + "\n")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line), time.time() - t


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
