//! Command-line entry points of the `sluice` binary.

mod admission;
mod check;
mod crds;
mod logging;
mod regions;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use logging::{LogFormat, init_logging, without_credential_logs};

/// Sluice: region-pinned SFTP gateways on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator against the current kubeconfig or the in-cluster config.
    Operator(crate::operator::OperatorArgs),
    /// Run the SFTP and FTPS gateway of one TransferServer (what gateway pods run).
    Gateway(Box<crate::gateway::GatewayArgs>),
    /// Print the CustomResourceDefinitions, or write them to a directory.
    Crds(crds::CrdsArgs),
    /// Print the built-in region catalogue (regions, providers, jurisdictions) as Markdown.
    Regions(regions::RegionsArgs),
    /// Print the ValidatingAdmissionPolicies that enforce DataResidencyPolicies at
    /// admission, or write them to a directory.
    AdmissionPolicy(admission::AdmissionPolicyArgs),
    /// Evaluate manifests against their DataResidencyPolicies offline, as the operator
    /// would. Exit code 0: nothing violates; 1: a violation or an invalid manifest; 2: a
    /// usage or I/O error.
    Check(check::CheckArgs),
}

/// Completes on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn terminated() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM; only Ctrl-C stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Runs a parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    init_logging(cli.log_format);
    let result = match cli.command {
        // Its exit code says what it found.
        Command::Check(args) => return check::run(&args),
        Command::Operator(args) => crate::operator::run(args).await,
        Command::Gateway(args) => crate::gateway::run(*args).await,
        Command::Crds(args) => crds::run(&args),
        Command::Regions(args) => regions::run(&args),
        Command::AdmissionPolicy(args) => admission::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "Failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
