//! `sluice crds`: the CustomResourceDefinitions generated from the Rust types.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `sluice crds`.
#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Write one `<plural>.<group>.yaml` file per CRD into this directory instead of
    /// printing a multi-document stream.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

pub(super) fn run(args: &CrdsArgs) -> anyhow::Result<()> {
    let crds = crate::api::crds();
    let Some(dir) = &args.output_dir else {
        for crd in &crds {
            print!("---\n{}", crate::api::crd_yaml(crd));
        }
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    for crd in &crds {
        let name = crd.metadata.name.as_deref().context("CRD without a name")?;
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, crate::api::crd_yaml(crd))
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}
