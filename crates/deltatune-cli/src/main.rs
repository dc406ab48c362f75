//! The `deltatune` command: parse flags, resolve them into library values, call the library, and
//! turn errors into a message and a non-zero exit code. No tensor logic lives here.

mod args;
mod commands;

use clap::Parser;
use std::process::ExitCode;

/// Keeps freed tensor buffers in the heap instead of returning them to the OS: training allocates
/// and frees the same large activation buffers every step, and glibc's default (mmap for large
/// blocks, trim on free) turns each reuse into page faults on fresh zeroed pages.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called once before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = args::Cli::parse();
    if let Err(e) = commands::setup_threads(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
