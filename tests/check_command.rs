//! `sluice check`, the built binary, on the example directories a user copies: exit
//! codes, and the exact verdicts in both output formats.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

const NOW: &str = "2027-01-01T00:00:00Z";
const COMPLIANT: &str = "examples/check/compliant";
const VIOLATIONS: &str = "examples/check/violations";

/// Runs `sluice check ARGS` from the repository root, so reported paths are relative.
fn check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("sluice runs")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `servers[]` by `namespace/name`.
fn server<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            format!(
                "{}/{}",
                s["namespace"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            ) == key
        })
        .unwrap_or_else(|| panic!("no server {key}"))
}

/// `(policy, rule, enforcement, message)` of each violation of a server.
fn violations(server: &Value) -> Vec<(String, String, String, String)> {
    server["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let field = |name: &str| v[name].as_str().unwrap().to_string();
            (
                field("policy"),
                field("rule"),
                field("enforcement"),
                field("message"),
            )
        })
        .collect()
}

fn v(
    policy: &str,
    rule: &str,
    enforcement: &str,
    message: &str,
) -> (String, String, String, String) {
    (
        policy.to_string(),
        rule.to_string(),
        enforcement.to_string(),
        message.to_string(),
    )
}

#[test]
fn the_compliant_examples_pass_with_exit_code_zero() {
    let output = check(&["--now", NOW, COMPLIANT]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(
        text.ends_with(
            "6 servers: 6 compliant, 0 not compliant (0 not rolled out); 0 errors, 0 warnings\n\
             PASSED\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "TransferServer telephony/eu-replica (examples/check/compliant/03-servers.yaml, \
             document 6)\n  \
             region:         eu-central-1\n  \
             storage region: eu-central-1\n  \
             governed by:    mainland-china\n  \
             verdict:        compliant\n  \
             condition:      ResidencyCompliant=True (RegionAllowed)\n  \
             allowance:      eu-central-1 until 2099-12-31T00:00:00Z by cross-border transfer \
             CAC-2026-0042 of mainland-china\n"
        ),
        "{text}"
    );

    let report = json_of(&check(&["--now", NOW, "--output", "json", COMPLIANT]));
    assert_eq!(report["schemaVersion"], 1);
    assert_eq!(report["evaluatedAt"], NOW);
    assert_eq!(report["problems"], json!([]));
    assert_eq!(
        report["summary"],
        json!({"servers": 6, "compliant": 6, "violating": 0, "blocked": 0, "errors": 0,
               "warnings": 0})
    );
    let cardholders = server(&report, "payments/cardholders");
    assert_eq!(
        cardholders["governing"],
        json!(["mainland-china", "personal-data"])
    );
    assert_eq!(
        cardholders["condition"],
        json!({"status": "True", "reason": "RegionAllowed",
               "message": "region cn-shanghai is allowed by DataResidencyPolicy mainland-china, \
                           DataResidencyPolicy personal-data"})
    );
    assert_eq!(
        server(&report, "telephony/archive")["storageRegion"],
        "cn-beijing"
    );
    assert_eq!(
        server(&report, "payments/invoices")["storageRegion"],
        "cn-north-1"
    );
    assert_eq!(
        server(&report, "telephony/eu-replica")["allowances"],
        json!([{
            "policy": "mainland-china",
            "reference": "CAC-2026-0042",
            "region": "eu-central-1",
            "expires": "2099-12-31T00:00:00Z",
            "maxBytes": 1_000_000_000_000u64,
            "maxIndividuals": 100000,
        }])
    );
    for server in report["servers"].as_array().unwrap() {
        assert_eq!(server["compliant"], true, "{server}");
        assert_eq!(server["enforced"], true, "{server}");
        assert_eq!(server["violations"], json!([]), "{server}");
    }
}

const MAINLAND: &str = "(allowed: jurisdiction CN (mainland China))";

#[test]
fn the_violation_examples_fail_with_every_rule_named() {
    let output = check(&["--now", NOW, "-o", "json", VIOLATIONS]);
    assert_eq!(output.status.code(), Some(1));
    let report = json_of(&output);
    let expected = [
        (
            "telephony/hk-gateway",
            "RegionNotAllowed",
            vec![v(
                "mainland-china",
                "Region",
                "Enforce",
                &format!(
                    "region cn-hongkong is not allowed by DataResidencyPolicy mainland-china \
                     {MAINLAND}"
                ),
            )],
        ),
        (
            "telephony/oss-hongkong",
            "StorageRegionNotAllowed",
            vec![v(
                "mainland-china",
                "StorageRegion",
                "Enforce",
                &format!(
                    "storage region cn-hongkong is not allowed by DataResidencyPolicy \
                     mainland-china {MAINLAND}"
                ),
            )],
        ),
        (
            "telephony/plaintext-ftp",
            "PlaintextNotAllowed",
            vec![v(
                "mainland-china",
                "PlaintextFtp",
                "Enforce",
                "plaintext FTP (ftps.allowPlaintext) is not allowed by DataResidencyPolicy \
                 mainland-china (the policy would need allowPlaintextFtp: true)",
            )],
        ),
        (
            "telephony/volume-anywhere",
            "StorageClassNotAllowed",
            vec![v(
                "mainland-china",
                "StorageClass",
                "Enforce",
                "StorageClass standard-anywhere binds volumes immediately and its \
                 allowedTopologies do not restrict topology.kubernetes.io/region, so its \
                 volumes may be created in any region (use volumeBindingMode: \
                 WaitForFirstConsumer or allowedTopologies) (DataResidencyPolicy \
                 mainland-china)",
            )],
        ),
        (
            "telephony/eu-replica",
            "CrossBorderTransferExpired",
            vec![v(
                "mainland-china",
                "CrossBorderTransfer",
                "Enforce",
                "cross-border transfer CAC-2024-0007 of DataResidencyPolicy mainland-china \
                 to eu-central-1 expired at 2025-06-30T00:00:00Z",
            )],
        ),
        (
            "telephony/cardholders",
            "RegionNotAllowed",
            vec![v(
                "personal-data",
                "Region",
                "Enforce",
                "region cn-beijing is not allowed by DataResidencyPolicy personal-data \
                 (allowed: cn-shanghai)",
            )],
        ),
        (
            "analytics/us-mirror",
            "AuditOnly",
            vec![v(
                "eu-audit",
                "Region",
                "Audit",
                "region us-east-1 is not allowed by DataResidencyPolicy eu-audit (allowed: EU)",
            )],
        ),
        ("billing/invoices", "NoPolicy", vec![]),
    ];
    for (key, reason, expected) in &expected {
        let server = server(&report, key);
        assert_eq!(violations(server), *expected, "{key}");
        assert_eq!(server["condition"]["reason"], *reason, "{key}");
        assert_eq!(server["compliant"], expected.is_empty(), "{key}");
    }
    assert_eq!(
        server(&report, "analytics/us-mirror")["blocksRollout"],
        false
    );
    assert_eq!(
        server(&report, "telephony/hk-gateway")["blocksRollout"],
        true
    );

    // The operator stalls this one before judging residency; the check says both.
    let accelerated = server(&report, "telephony/s3-accelerated");
    assert_eq!(accelerated["condition"], Value::Null);
    assert_eq!(accelerated["storageRegion"], Value::Null);
    let host = "telephony-uploads.s3-accelerate.amazonaws.com";
    let unpinnable = format!(
        "{host} is an accelerated endpoint: data passes through edge locations worldwide, so \
         it cannot be pinned to a region; use the regional endpoint"
    );
    assert_eq!(
        violations(accelerated),
        [v(
            "mainland-china",
            "StorageRegion",
            "Enforce",
            &format!(
                "the storage region cannot be resolved ({unpinnable}), so DataResidencyPolicy \
                 mainland-china cannot allow it"
            ),
        )]
    );

    let file = "examples/check/violations/03-servers.yaml";
    assert_eq!(
        report["problems"],
        json!([
            {
                "severity": "error",
                "file": file,
                "document": 3,
                "object": "TransferServer telephony/s3-accelerated",
                "message": format!(
                    "storage.objectStore: {unpinnable} (the operator stalls the server: \
                     InvalidSpec)"
                ),
            },
            {
                "severity": "warning",
                "file": file,
                "document": 9,
                "object": "TransferServer billing/invoices",
                "message": "namespace billing is not among the manifests: evaluated without \
                            labels (give them with --namespace-labels billing=key=value)",
            },
            {
                "severity": "warning",
                "file": "examples/check/violations/04-users.yaml",
                "document": 1,
                "object": "TransferUser telephony/auditor",
                "message": "TransferServer telephony/call-recordings is not among the \
                            manifests: the user waits (ServerNotFound) until it exists",
            },
        ])
    );
    assert_eq!(
        report["summary"],
        json!({"servers": 9, "compliant": 1, "violating": 8, "blocked": 7, "errors": 1,
               "warnings": 2})
    );
}

#[test]
fn the_text_report_names_policy_rule_message_and_fix_for_each_violation() {
    let output = check(&["--now", NOW, VIOLATIONS]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    let expected_blocks = [
        format!(
            "TransferServer telephony/hk-gateway (examples/check/violations/03-servers.yaml, \
             document 1)\n  \
             region:         cn-hongkong\n  \
             governed by:    mainland-china\n  \
             verdict:        NOT COMPLIANT: not rolled out\n  \
             condition:      ResidencyCompliant=False (RegionNotAllowed)\n  \
             [Region] mainland-china (Enforce): region cn-hongkong is not allowed by \
             DataResidencyPolicy mainland-china {MAINLAND}\n      \
             fix: set spec.region to a region the policy allows, or allow it in the policy \
             (allowedRegions, jurisdictions, or a crossBorderTransfers allowance)\n"
        ),
        "TransferServer analytics/us-mirror (examples/check/violations/03-servers.yaml, \
         document 8)\n  \
         region:         us-east-1\n  \
         governed by:    eu-audit\n  \
         verdict:        NOT COMPLIANT: rolled out and reported (Audit only)\n  \
         condition:      ResidencyCompliant=False (AuditOnly)\n  \
         [Region] eu-audit (Audit): region us-east-1 is not allowed by DataResidencyPolicy \
         eu-audit (allowed: EU)\n"
            .to_string(),
        "TransferServer telephony/s3-accelerated (examples/check/violations/03-servers.yaml, \
         document 3)\n  \
         region:         cn-north-1\n  \
         governed by:    mainland-china\n  \
         verdict:        INVALID: not rolled out (see the problems below)\n  \
         condition:      none: the operator stalls the server (InvalidSpec) before judging \
         residency\n"
            .to_string(),
        "Problems:\n  error: TransferServer telephony/s3-accelerated \
         (examples/check/violations/03-servers.yaml, document 3): storage.objectStore: "
            .to_string(),
        "\n9 servers: 1 compliant, 8 not compliant (7 not rolled out); 1 error, 2 warnings\n\
         FAILED\n"
            .to_string(),
    ];
    for block in expected_blocks {
        assert!(text.contains(&block), "missing:\n{block}\nin:\n{text}");
    }
}

#[test]
fn namespace_labels_from_the_command_line_put_a_server_under_its_policies() {
    let args = [
        "--now",
        NOW,
        "-o",
        "json",
        "--namespace-labels",
        "billing=sluice.dev/residency=cn,team=finance",
        VIOLATIONS,
    ];
    let report = json_of(&check(&args));
    let invoices = server(&report, "billing/invoices");
    assert_eq!(invoices["governing"], json!(["mainland-china"]));
    assert_eq!(
        violations(invoices),
        [v(
            "mainland-china",
            "Region",
            "Enforce",
            &format!(
                "region cn-hongkong is not allowed by DataResidencyPolicy mainland-china \
                 {MAINLAND}"
            ),
        )]
    );
    assert_eq!(report["summary"]["warnings"], 1, "{}", report["problems"]);
}

#[test]
fn the_time_of_evaluation_decides_whether_an_allowance_has_expired() {
    let before = json_of(&check(&[
        "--now",
        "2025-01-01T00:00:00Z",
        "-o",
        "json",
        VIOLATIONS,
    ]));
    let replica = server(&before, "telephony/eu-replica");
    assert_eq!(replica["compliant"], true);
    assert_eq!(replica["allowances"][0]["reference"], "CAC-2024-0007");
    let after = json_of(&check(&[
        "--now",
        "2025-06-30T00:00:00Z",
        "-o",
        "json",
        VIOLATIONS,
    ]));
    assert_eq!(server(&after, "telephony/eu-replica")["compliant"], false);
}

#[test]
fn a_manifest_that_does_not_parse_fails_the_check_naming_file_and_document() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join(COMPLIANT);
    for entry in std::fs::read_dir(&examples).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let broken = "apiVersion: sluice.dev/v1alpha1\nkind: TransferServer\n\
                  metadata: {name: broken, namespace: telephony}\n\
                  spec: {region: cn-shanghai, protocols: {sftp: {}}}\n";
    let path = dir.path().join("05-broken.yml");
    std::fs::write(&path, format!("---\n# first\n---\n{broken}")).unwrap();
    let output = check(&["-o", "json", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let report = json_of(&output);
    assert_eq!(
        report["problems"],
        json!([{
            "severity": "error",
            "file": path.display().to_string(),
            "document": 2,
            "object": "TransferServer broken",
            "message": "does not parse as a TransferServer: missing field `storage`",
        }])
    );
    assert_eq!(report["summary"]["violating"], 0);
}

#[test]
fn usage_and_io_errors_exit_with_code_two() {
    let empty = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["examples/check/missing"],
            "error: failed to read examples/check/missing",
        ),
        (
            &["--now", "yesterday", COMPLIANT],
            "error: --now \"yesterday\" is not an RFC 3339",
        ),
        (
            &["--namespace-labels", "billing", COMPLIANT],
            "error: --namespace-labels \"billing\" is not NAMESPACE=key=value",
        ),
        (
            &[empty.path().to_str().unwrap()],
            "error: no manifests (*.yaml, *.yml, *.json) under",
        ),
        (&[], "PATH"),
    ];
    for (args, message) in cases {
        let output = check(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}
