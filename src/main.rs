//! The `apex` binary.
#![forbid(unsafe_code)]

use clap::Parser;

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
