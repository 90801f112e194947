//! The `sluice` binary: operator, gateway and tools in one executable.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sluice::cli::Cli::parse();
    sluice::cli::run(cli).await
}
