//! The `apex` binary.
#![forbid(unsafe_code)]

use clap::Parser;

/// jemalloc: under load glibc's allocator took about 40 % of Apex's CPU, most of it outside its
/// per-thread cache, in its arenas (docs/benchmarks.md, change 33).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = apex::cli::Cli::parse();
    match apex::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apex: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "apex stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
