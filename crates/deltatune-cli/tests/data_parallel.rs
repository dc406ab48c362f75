//! `mpirun -np 2 deltatune train …` end to end (feature `mpi`, with `mpirun` on the PATH; skipped
//! with a printed reason otherwise): two ranks end with the one-process deltas; a rank killed
//! mid-run stops the job within seconds, naming the rank, and the run resumes on one process
//! and then on two; a rank whose data is unreadable or whose settings differ stops every rank
//! before the first step, leaving nothing behind. Without the feature, a start under a launcher
//! is refused with what to do.

use std::collections::BTreeMap;
use std::path::Path;

mod common;
use common::{bin, stderr};

/// The tensors of a saved delta.
fn tensors(p: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
        .collect()
}

/// Largest absolute difference between two saved deltas (which must hold the same tensors).
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// `train --data-parallel 2` (ranks as threads in one process, no MPI needed) ends with the
/// one-process deltas and losses.
#[test]
fn data_parallel_threads_train_like_one_process() {
    let Some(m) = common::model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (tr, dv) = common::write_data(tmp.path());
    let run = |out: &str, extra: &[&str]| {
        let o = bin()
            .args(["--threads", "2", "train", "--model", m.to_str().unwrap(), "--train", tr.to_str().unwrap(), "--dev", dv.to_str().unwrap()])
            .args(["--delta", "lora:r=4,lora_alpha=8,lora_dropout=0.1", "--delta", "ln_tuning", "--lr", "3e-3", "--epochs", "2"])
            .args(["--batch-size", "8", "--max-length", "24", "--eval-every", "4", "--seed", "3", "--quiet", "--json", "--out"])
            .arg(tmp.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v
    };
    let one = run("one", &[]);
    let two = run("two", &["--data-parallel", "2"]);
    assert_eq!(two["ranks"], 2, "{two}");
    assert_eq!(one["steps"], two["steps"]);
    let d = max_diff(&tmp.path().join("one/final/delta.safetensors"), &tmp.path().join("two/final/delta.safetensors"));
    assert!(d <= 1e-5, "--data-parallel 2 ends {d} away from one process");
    // Zero ranks are refused, naming the flag.
    let o = bin().args(["train", "--task", "demo", "--data-parallel", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--data-parallel"), "{}", stderr(&o));
}

/// Five prompt/completion pairs of uneven lengths (and a plain text line) in `dir/pairs.jsonl`.
fn write_pairs(dir: &Path) -> std::path::PathBuf {
    let rows = [
        r#"{"prompt": "Colour of the sky:", "completion": " zorblue"}"#,
        r#"{"prompt": "Colour of grass:", "completion": " zorgreen"}"#,
        r#"{"prompt": "Colour of snow:", "completion": " zorwhite and cold"}"#,
        r#"{"text": "The zor language prefixes every colour with zor."}"#,
        r#"{"prompt": "Colour of coal:", "completion": " zorblack"}"#,
    ];
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

/// `train-lm --data-parallel 2` on the default decoder: the one-process per-step losses.
#[test]
fn train_lm_data_parallel_threads_match_one_process() {
    let Some(gguf) = common::decoder() else { return };
    let dir = tempfile::tempdir().unwrap();
    let train = write_pairs(dir.path());
    let losses = |extra: &[&str]| -> Vec<f64> {
        let o = bin()
            .args(["--threads", "2", "train-lm", "--model", &gguf, "--train", train.to_str().unwrap(), "--epochs", "2"])
            .args(["--batch-size", "3", "--lr", "5e-3", "--delta", "lora:r=4,lora_dropout=0.1,target=q_proj+v_proj,layers=26-29"])
            .args(["--no-baseline", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["ranks"], if extra.is_empty() { 1 } else { 2 });
        vec![v["first_loss"].as_f64().unwrap(), v["last_loss"].as_f64().unwrap()]
    };
    let (a, b) = (losses(&[]), losses(&["--data-parallel", "2"]));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }
}

/// Commands other than training refuse to start under a launcher, before touching MPI.
#[test]
fn only_training_runs_under_a_launcher() {
    let o = bin().args(["inspect", "--help"]).env("OMPI_COMM_WORLD_SIZE", "2").output().unwrap();
    assert!(o.status.success(), "--help is answered by the parser");
    let o = bin().args(["plot", "no-such-run"]).env("OMPI_COMM_WORLD_SIZE", "2").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("only `train` and `train-lm` run data-parallel"), "{}", stderr(&o));
    // Built without MPI, training under a launcher says how to get it.
    #[cfg(not(feature = "mpi"))]
    {
        let o = bin().args(["train", "--task", "demo"]).env("OMPI_COMM_WORLD_SIZE", "2").output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("built without MPI support"), "{}", stderr(&o));
        eprintln!("SKIP: the MPI runs need the `mpi` feature (scripts/test.sh enables it where mpicc exists)");
    }
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::common::{bin, decoder, model, stderr, write_data};
    use super::max_diff;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// How far the deltas of an encoder run split over ranks may end from one process's. The
    /// ranks sum each gradient over the rows in another order, and AdamW divides a gradient by
    /// its own running size, so a parameter whose gradient is still tiny — LoRA's A while B is
    /// near its zero start — turns that rounding into updates of a few 1e-5 (2.1e-5 measured, in
    /// one value-projection A, after 5 steps at lr 3e-3; the losses agree to 1e-7). A wrong
    /// shard weighting or dropout mask is off by about 1e-2 (3.5e-2 measured).
    const RANKS_TOL: f32 = 1e-4;

    /// `mpirun` with what every run here needs: running as root is allowed in containers, two ranks
    /// may share two cores, and no rank is pinned to one core.
    fn mpirun() -> Option<Command> {
        if Command::new("mpirun").arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]);
            Some(c)
        } else {
            eprintln!("SKIP: mpirun is not installed (scripts/setup-mpi.sh installs Open MPI)");
            None
        }
    }

    fn train_args(m: &str, tr: &str, dv: &str, out: &str, epochs: &str) -> Vec<String> {
        [
            "--threads", "1", "train", "--model", m, "--train", tr, "--dev", dv, "--delta", "lora:r=4,lora_alpha=8", "--delta",
            "ln_tuning", "--lr", "3e-3", "--epochs", epochs, "--batch-size", "8", "--grad-accum", "2", "--max-length", "24",
            "--eval-every", "4", "--checkpoint-every", "1", "--seed", "7", "--out", out, "--quiet", "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn train_losses(run: &Path) -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    }

    fn checkpoint_step(run: &Path) -> u64 {
        std::fs::read_to_string(run.join("checkpoints/last/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    }

    /// The pid of the process of rank `rank` among the children of `launcher` (from the
    /// environment mpirun gives each rank).
    fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat.rsplit(')').next().and_then(|s| s.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(launcher) {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    /// The default model, mpirun and the synthetic data, or `None` (skipped with a printed reason).
    fn setup() -> Option<(tempfile::TempDir, String, String, String)> {
        let m = model()?;
        mpirun()?;
        let tmp = tempfile::tempdir().unwrap();
        let (tr, dv) = write_data(tmp.path());
        Some((tmp, m.display().to_string(), tr.display().to_string(), dv.display().to_string()))
    }

    fn check(o: &Output, what: &str) {
        assert!(o.status.success(), "{what} failed: {}", stderr(o));
    }

    #[test]
    fn two_ranks_train_like_one_process_and_resume_on_any_number() {
        let Some((tmp, m, tr, dv)) = setup() else { return };
        let (m, tr, dv) = (m.as_str(), tr.as_str(), dv.as_str());
        let exe = env!("CARGO_BIN_EXE_deltatune");
        let path = |n: &str| tmp.path().join(n);
        let args = |out: &Path, epochs: &str| train_args(m, tr, dv, out.to_str().unwrap(), epochs);

        // One process, then two ranks, uninterrupted: the same deltas and losses. 72 examples in
        // batches of 8, two per step: 5 steps per epoch, the last of one batch.
        let o = bin().args(args(&path("one"), "3")).output().unwrap();
        check(&o, "one process");
        let o = mpirun().unwrap().args(["-np", "2", exe]).args(args(&path("two"), "3")).output().unwrap();
        check(&o, "mpirun -np 2");
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["ranks"], 2, "{summary}");
        assert_eq!(summary["steps"], 15);
        assert!(summary["comm_seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1, "only rank 0 prints the summary");
        let d = max_diff(&path("one/final/delta.safetensors"), &path("two/final/delta.safetensors"));
        assert!(d <= RANKS_TOL, "two ranks end {d} away from one process");
        let (a, b) = (train_losses(&path("one")), train_losses(&path("two")));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "losses {a:?} vs {b:?}");
        }

        // Killed: rank 1 dies (SIGKILL) at step ≥ 4; mpirun stops rank 0 within seconds and names
        // rank 1; the last checkpoint is intact.
        let long = path("long");
        let o = bin().args(args(&path("long-ref"), "6")).output().unwrap();
        check(&o, "reference run");
        let mut child = mpirun().unwrap().args(["-np", "2", exe]).args(args(&long, "6")).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let t0 = Instant::now();
        while checkpoint_step(&long) < 4 && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let victim = rank_pid(child.id(), 1).expect("rank 1's process");
        let killed = Instant::now();
        // SAFETY: kill(2) on a process this test started (a child of its mpirun).
        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
        let mut status = None;
        while killed.elapsed() < Duration::from_secs(30) {
            if let Some(s) = child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(status) = status else {
            let _ = child.kill();
            panic!("the job did not stop within 30 s of rank 1's death");
        };
        let err = child.wait_with_output().unwrap().stderr;
        let err = String::from_utf8_lossy(&err);
        assert!(!status.success());
        assert!(err.contains("rank 1"), "the message names the rank: {err}");
        let at = checkpoint_step(&long);
        assert!(at >= 4, "checkpoint at {at}");
        assert!(at < 30, "the run was stopped before its end");

        // Resumed on one process, killed again, then finished on two ranks: the uninterrupted
        // one-process result.
        let mut resume = args(&long, "6");
        resume.push("--resume".into());
        let mut one = bin().args(&resume).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while checkpoint_step(&long) < at + 3 && t0.elapsed() < Duration::from_secs(120) {
            if one.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        one.kill().unwrap();
        one.wait().unwrap();
        assert!(checkpoint_step(&long) >= at + 3);
        let o = mpirun().unwrap().args(["-np", "2", exe]).args(&resume).output().unwrap();
        check(&o, "resume on two ranks");
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["steps"], 30);
        let d = max_diff(&path("long-ref/final/delta.safetensors"), &long.join("final/delta.safetensors"));
        assert!(d <= RANKS_TOL, "killed and resumed on 2, 1, 2 ranks: {d} away from the uninterrupted run");
    }

    #[test]
    fn a_rank_that_cannot_start_stops_the_job_before_the_first_step() {
        let Some((tmp, m, tr, dv)) = setup() else { return };
        let (m, tr, dv) = (m.as_str(), tr.as_str(), dv.as_str());
        let exe = env!("CARGO_BIN_EXE_deltatune");
        let out = tmp.path().join("run");
        let good = train_args(m, tr, dv, out.to_str().unwrap(), "1");
        let missing = tmp.path().join("missing.csv");
        // Rank 1 reads a file that is not there (MPMD: one command line per rank).
        let bad: Vec<String> = good.iter().map(|a| if a == tr { missing.display().to_string() } else { a.clone() }).collect();
        let o = mpirun().unwrap().args(["-np", "1", exe]).args(&good).args([":", "-np", "1", exe]).args(&bad).output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(err.contains("rank 1 of 2: error:") && err.contains("missing.csv"), "{err}");
        assert!(err.contains("rank 1 failed loading the model and data"), "rank 0 names the failed rank: {err}");
        assert!(!out.exists(), "nothing is written when a rank cannot start");
        // Rank 1 started with another seed: refused before the first step.
        let other: Vec<String> = good.iter().map(|a| if a == "7" { "8".to_string() } else { a.clone() }).collect();
        let o = mpirun().unwrap().args(["-np", "1", exe]).args(&good).args([":", "-np", "1", exe]).args(&other).output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(err.contains("rank(s) 1 have different settings or data than rank 0"), "{err}");
        assert!(!out.join("final").exists());
    }

    /// train-lm on the default decoder: two ranks end with the one-process LoRA.
    #[test]
    fn train_lm_on_two_ranks_matches_one_process() {
        let Some(gguf) = decoder() else { return };
        if mpirun().is_none() {
            return;
        }
        let exe = env!("CARGO_BIN_EXE_deltatune");
        let dir = tempfile::tempdir().unwrap();
        let train = super::write_pairs(dir.path());
        let args = |out: &Path| -> Vec<String> {
            [
                "--threads", "1", "train-lm", "--model", &gguf, "--train", train.to_str().unwrap(), "--epochs", "2", "--batch-size", "3",
                "--lr", "5e-3", "--delta", "lora:r=4,lora_dropout=0.1,target=q_proj+v_proj,layers=24-29", "--no-baseline", "--out",
                out.to_str().unwrap(), "--json",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        check(&bin().args(args(&one)).output().unwrap(), "one process");
        let o = mpirun().unwrap().args(["-np", "2", exe]).args(args(&two)).output().unwrap();
        check(&o, "mpirun -np 2 train-lm");
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["ranks"], 2);
        assert_eq!(r["steps"], 4);
        let d = max_diff(&one.join("delta.safetensors"), &two.join("delta.safetensors"));
        assert!(d <= 1e-5, "two ranks end {d} away from one process");
    }
}

