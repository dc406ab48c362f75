//! The `deltatune` command: parse flags, map them onto the library's job specs, call the library,
//! and turn errors into a message and a non-zero exit code. No tensor logic lives here.

mod args;
mod commands;
mod world;

use clap::error::{ContextKind, ErrorKind};
use clap::Parser;
use deltatune::api::Cancel;
use std::process::ExitCode;

/// Keeps freed tensor buffers in the heap instead of returning them to the OS: training allocates
/// and frees the same large activation buffers every step, and glibc's default (mmap for large
/// blocks, trim on free) turns each reuse into page faults on fresh zeroed pages. One arena: the
/// work runs on a thread of the kernels' pool (`ops::in_pool`), and a second arena's heaps are
/// mmap'd pieces that large buffers do not fit, which brought the page faults back.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called once before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A flag value our parsers refused: print the library's message (which names the flag) and exit 1,
/// like every other invalid value; anything else clap reports itself (usage errors exit 2).
fn parse_args() -> Result<args::Cli, ExitCode> {
    match args::Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if e.kind() == ErrorKind::ValueValidation => {
            let arg = e.get(ContextKind::InvalidArg).map(|a| a.to_string());
            match (std::error::Error::source(&e), arg) {
                // Our parsers name the flag themselves; a plain number parser does not.
                (Some(inner), Some(arg)) if !inner.to_string().contains(arg.split(' ').next().unwrap_or_default()) => {
                    let value = e.get(ContextKind::InvalidValue).map(|v| v.to_string()).unwrap_or_default();
                    eprintln!("error: invalid value '{value}' for '{arg}': {inner}")
                }
                (Some(inner), _) => eprintln!("error: {inner}"),
                (None, _) => eprintln!("{e}"),
            }
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(e.exit_code().clamp(0, 255) as u8))
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Encoder training: candle's own elementwise ops run on the calling thread instead of on
    // candle's separate spinning worker pool, which competed with our kernels' threads for the
    // same cores (and, with --data-parallel, serialised the ranks on its one lock): LoRA step
    // 850-900 -> 710-750 ms at 2 threads, --data-parallel 2 6.5 -> 3.6 s for 14 steps. Decoding
    // keeps candle's pool (its quantized matmuls use it), and so does decoder training but with
    // --data-parallel (ranks must not queue on candle's one lock). An explicit CANDLE_NUM_THREADS
    // wins.
    use deltatune_bench::BenchWhat;
    let encoder_training = matches!(&cli.command, args::Command::Train(_) | args::Command::Search(_))
        || matches!(&cli.command, args::Command::TrainLm(a) if a.data_parallel > 1)
        || matches!(&cli.command, args::Command::Bench(b) if matches!(b.what, BenchWhat::Train(_) | BenchWhat::Accuracy(_) | BenchWhat::Cache(_)));
    if encoder_training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Err(e) = commands::setup_threads(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let cancel = Cancel::new();
    let session = match world::start(&cli.command) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let world = session.as_ref().map(world::Session::collective);
    // Compute jobs run on a thread of the kernels' pool (see `ops::in_pool`); servers, whose
    // main thread only waits, do not.
    let serving = matches!(&cli.command, args::Command::Serve(_))
        || matches!(&cli.command, args::Command::Bench(b) if matches!(b.what, deltatune_bench::BenchWhat::Serve(_)));
    let result = if serving { commands::run(cli, &cancel, world) } else { deltatune::ops::in_pool(|| commands::run(cli, &cancel, world)) };
    match (result, session) {
        (Ok(()), s) => {
            drop(s); // finalises MPI after a data-parallel run
            ExitCode::SUCCESS
        }
        (Err(e), None) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        // A failed rank ends the whole job at once: the others may be waiting for it — unless
        // every rank knows of the failure and stops on its own.
        (Err(e), Some(s)) => s.fail(&e),
    }
}
