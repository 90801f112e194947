//! The operator: one controller per kind.

/// Arguments of `sluice operator`.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {}

/// Runs the operator until interrupted.
pub async fn run(_args: OperatorArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
