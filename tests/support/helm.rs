//! `helm`, built from its upstream Go module, for the chart tests.
//!
//! Contract:
//! - The binary comes from the directory named by `$SLUICE_HELM_BIN`, or else from
//!   `tests/helm/build.sh`, which builds the version pinned next to it into a cache outside
//!   the repository (a few minutes the first time, instant afterwards).
//! - helm runs with its cache, configuration and data directories in a temporary directory
//!   and with no kubeconfig, so it neither reads nor writes the user's Helm state; `lint`
//!   and `template` never contact a cluster.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// Names a directory holding a prebuilt `helm`.
pub const BIN_ENV: &str = "SLUICE_HELM_BIN";

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/sluice")
}

/// A helm binary with private state directories.
pub struct Helm {
    bin: PathBuf,
    home: TempDir,
}

impl Helm {
    /// Finds or builds helm.
    pub fn find() -> Result<Self> {
        let dir = match std::env::var_os(BIN_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => run_build_script()?,
        };
        let bin = dir.join("helm");
        if !bin.is_file() {
            bail!("{} does not exist", bin.display());
        }
        let home = tempfile::Builder::new().prefix("sluice-helm-").tempdir()?;
        Ok(Self { bin, home })
    }

    /// Runs helm with `args` and returns its standard output, or fails with its standard
    /// error.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let home = self.home.path();
        let output = Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env("KUBECONFIG", home.join("no-kubeconfig"))
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        let stdout = String::from_utf8(output.stdout).context("helm printed non-UTF-8")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            bail!(
                "helm {} failed ({}):\n{stderr}{stdout}",
                args.join(" "),
                output.status
            );
        }
        Ok(stdout)
    }

    /// `helm template RELEASE CHART --namespace NAMESPACE EXTRA...`, as YAML.
    pub fn template(&self, release: &str, namespace: &str, extra: &[&str]) -> Result<String> {
        let chart = chart_dir();
        let chart = chart.to_str().context("the chart's path is not UTF-8")?;
        let mut args = vec!["template", release, chart, "--namespace", namespace];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

/// Runs build.sh, letting its progress through to stderr, and returns the directory it prints.
fn run_build_script() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its messages are on stderr; set {BIN_ENV} to use a prebuilt helm",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8(output.stdout).context("build.sh printed a non-UTF-8 path")?;
    match stdout.trim() {
        "" => bail!("{} printed no directory", script.display()),
        dir => Ok(PathBuf::from(dir)),
    }
}
