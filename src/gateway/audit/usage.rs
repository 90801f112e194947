//! How much of each cross-border allowance's volume limit the server has used, counted
//! over all of its gateway pods.
//!
//! Contract:
//! - Each pod counts the bytes of the uploads it completes under each allowance that has
//!   a volume limit ([`Usage::add`]) and keeps its own running total in one small file
//!   per allowance in the server's storage ([`UsageFile`], written with the audit flush).
//!   A total only grows: a restarted pod continues from its file.
//! - Every pod reads all pods' files of an allowance at start and every
//!   [`USAGE_REFRESH`](super::USAGE_REFRESH), and sums them ([`Usage::merge`]): its own
//!   count is what it counted itself (or its file, if that says more), the others' are
//!   their files as last read.
//! - [`Usage::exhausted`] names the first allowance whose summed use has reached its limit.
//!
//! No I/O here: the audit writer reads and writes the files.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::gateway::config::CrossBorderStamp;

/// One pod's count for one allowance, as stored in
/// `.sluice-audit/usage/<reference>/<pod>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFile {
    /// The allowance's assessment reference.
    pub reference: String,
    /// The pod that counted.
    pub pod: String,
    /// Bytes of completed uploads the pod has counted under the allowance, ever.
    pub bytes: u64,
    /// When the file was written (RFC 3339).
    pub updated: String,
}

/// The counts one pod knows, per allowance reference.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pod: String,
    /// What this pod has counted.
    own: BTreeMap<String, u64>,
    /// The sum of the other pods' files, as last read.
    others: BTreeMap<String, u64>,
    /// References whose own count changed since their file was last written.
    dirty: BTreeSet<String>,
}

impl Usage {
    /// No counts yet, for pod `pod`.
    pub fn new(pod: &str) -> Self {
        Self {
            pod: pod.to_owned(),
            ..Self::default()
        }
    }

    /// Counts `bytes` of a completed upload under `reference`.
    pub fn add(&mut self, reference: &str, bytes: u64) {
        let own = self.own.entry(reference.to_owned()).or_default();
        *own = own.saturating_add(bytes);
        self.dirty.insert(reference.to_owned());
    }

    /// Takes in the files of `reference` as just read: the other pods' files replace what
    /// was known of them, and this pod's own file raises its count if it says more (the
    /// pod restarted).
    pub fn merge(&mut self, reference: &str, files: &[UsageFile]) {
        let mut others = 0u64;
        for file in files.iter().filter(|f| f.reference == reference) {
            if file.pod == self.pod {
                let own = self.own.entry(reference.to_owned()).or_default();
                *own = (*own).max(file.bytes);
            } else {
                others = others.saturating_add(file.bytes);
            }
        }
        self.others.insert(reference.to_owned(), others);
    }

    /// The bytes counted under `reference` over all pods.
    pub fn total(&self, reference: &str) -> u64 {
        let own = self.own.get(reference).copied().unwrap_or(0);
        let others = self.others.get(reference).copied().unwrap_or(0);
        own.saturating_add(others)
    }

    /// The first of `allowances` with a volume limit that the summed use has reached.
    pub fn exhausted<'a>(
        &self,
        allowances: &'a [CrossBorderStamp],
    ) -> Option<&'a CrossBorderStamp> {
        allowances.iter().find(|a| {
            a.max_bytes
                .is_some_and(|max| self.total(&a.reference) >= max)
        })
    }

    /// The files this pod must write: its count of each reference that changed since it
    /// was last written. They stay due until [`Usage::written`] says so.
    pub fn due(&self, updated: &str) -> Vec<UsageFile> {
        self.dirty
            .iter()
            .map(|reference| UsageFile {
                reference: reference.clone(),
                pod: self.pod.clone(),
                bytes: self.own.get(reference).copied().unwrap_or(0),
                updated: updated.to_owned(),
            })
            .collect()
    }

    /// Marks `file` as stored, unless the count grew again since it was taken.
    pub fn written(&mut self, file: &UsageFile) {
        if self.own.get(&file.reference).copied().unwrap_or(0) == file.bytes {
            self.dirty.remove(&file.reference);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pod: &str, bytes: u64) -> UsageFile {
        UsageFile {
            reference: "CAC-2026-001".into(),
            pod: pod.into(),
            bytes,
            updated: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn allowance(max_bytes: Option<u64>) -> CrossBorderStamp {
        CrossBorderStamp {
            policy: "cn".into(),
            enforced: true,
            reference: "CAC-2026-001".into(),
            region: "eu-central-1".into(),
            expires: i64::MAX,
            max_bytes,
            max_individuals: None,
        }
    }

    #[test]
    fn the_total_sums_every_pods_file_and_this_pods_own_count() {
        let mut usage = Usage::new("s-gateway-0");
        usage.add("CAC-2026-001", 100);
        usage.merge(
            "CAC-2026-001",
            &[
                file("s-gateway-1", 250),
                file("s-gateway-2", 50),
                file("s-gateway-0", 40),
            ],
        );
        // Its own file says less than it counted since: the count wins.
        assert_eq!(usage.total("CAC-2026-001"), 400);

        // Read again later: the others' files replace what was known of them.
        usage.merge("CAC-2026-001", &[file("s-gateway-1", 300)]);
        assert_eq!(usage.total("CAC-2026-001"), 400);
        assert_eq!(usage.total("other"), 0);
    }

    #[test]
    fn a_restarted_pod_continues_from_its_own_file() {
        let mut usage = Usage::new("s-gateway-0");
        usage.merge("CAC-2026-001", &[file("s-gateway-0", 1_000)]);
        usage.add("CAC-2026-001", 5);
        assert_eq!(usage.total("CAC-2026-001"), 1_005);
        let due = usage.due("now");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].bytes, 1_005);
    }

    #[test]
    fn an_allowance_is_exhausted_once_the_total_reaches_its_limit() {
        let mut usage = Usage::new("p");
        let limited = [allowance(Some(1_000))];
        let unlimited = [allowance(None)];
        usage.add("CAC-2026-001", 999);
        assert!(usage.exhausted(&limited).is_none());
        usage.merge("CAC-2026-001", &[file("q", 1)]);
        assert_eq!(
            usage.exhausted(&limited).map(|a| a.reference.as_str()),
            Some("CAC-2026-001")
        );
        assert!(usage.exhausted(&unlimited).is_none());
    }

    #[test]
    fn a_count_stays_due_until_the_file_written_holds_it() {
        let mut usage = Usage::new("p");
        usage.add("r", 10);
        let taken = usage.due("t");
        usage.add("r", 5);
        usage.written(&taken[0]);
        assert_eq!(usage.due("t")[0].bytes, 15);
        let taken = usage.due("t");
        usage.written(&taken[0]);
        assert!(usage.due("t").is_empty());
    }
}
