//! `sluice admission-policy`: the ValidatingAdmissionPolicies generated from the region
//! catalogue and the residency rules (see [`crate::residency::admission`]).

use std::path::PathBuf;

use anyhow::Context;

use crate::residency::admission::{Mode, admission_policy_yaml};

/// Arguments of `sluice admission-policy`.
#[derive(Debug, clap::Args)]
pub struct AdmissionPolicyArgs {
    /// Write `<name>.yaml` (the policy and its binding) per ValidatingAdmissionPolicy into
    /// this directory instead of printing a multi-document stream.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

pub(super) fn run(args: &AdmissionPolicyArgs) -> anyhow::Result<()> {
    let modes = [Mode::Enforce, Mode::Audit];
    let Some(dir) = &args.output_dir else {
        for mode in modes {
            print!("{}", admission_policy_yaml(mode));
        }
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    for mode in modes {
        let path = dir.join(format!("{}.yaml", mode.name()));
        std::fs::write(&path, admission_policy_yaml(mode))
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}
