//! Kubernetes label-selector matching, as the API server defines it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A selector that cannot be evaluated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    /// `matchExpressions` used an operator Kubernetes does not define.
    #[error("unknown label selector operator {0:?}")]
    UnknownOperator(String),
    /// `In` or `NotIn` without values, or `Exists`/`DoesNotExist` with values.
    #[error("label selector operator {operator} on key {key} has the wrong number of values")]
    BadValues {
        /// The operator.
        operator: String,
        /// The label key.
        key: String,
    },
}

/// Whether `labels` satisfy `selector`. An empty selector matches everything.
pub fn matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let mut by_expressions = true;
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.as_deref().unwrap_or_default();
        let value = labels.get(&expression.key);
        let bad_values = || SelectorError::BadValues {
            operator: expression.operator.clone(),
            key: expression.key.clone(),
        };
        let ok = match expression.operator.as_str() {
            "In" if values.is_empty() => return Err(bad_values()),
            "NotIn" if values.is_empty() => return Err(bad_values()),
            "Exists" | "DoesNotExist" if !values.is_empty() => return Err(bad_values()),
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(SelectorError::UnknownOperator(other.to_string())),
        };
        by_expressions &= ok;
    }
    Ok(by_labels && by_expressions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(selector: &str, labels: &[(&str, &str)]) -> Result<bool, SelectorError> {
        let selector: LabelSelector = serde_yaml::from_str(selector).unwrap();
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        matches(&selector, &labels)
    }

    /// Selector YAML, labels, whether they match.
    type Case = (&'static str, &'static [(&'static str, &'static str)], bool);

    #[test]
    fn selector_semantics_follow_kubernetes() {
        let cases: &[Case] = &[
            ("{}", &[], true),
            ("matchLabels: {a: x}", &[("a", "x")], true),
            ("matchLabels: {a: x}", &[("a", "y")], false),
            ("matchLabels: {a: x}", &[], false),
            (
                "matchExpressions: [{key: a, operator: In, values: [x, y]}]",
                &[("a", "y")],
                true,
            ),
            (
                "matchExpressions: [{key: a, operator: In, values: [x]}]",
                &[],
                false,
            ),
            (
                "matchExpressions: [{key: a, operator: NotIn, values: [x]}]",
                &[],
                true,
            ),
            (
                "matchExpressions: [{key: a, operator: NotIn, values: [x]}]",
                &[("a", "x")],
                false,
            ),
            (
                "matchExpressions: [{key: a, operator: Exists}]",
                &[("a", "")],
                true,
            ),
            (
                "matchExpressions: [{key: a, operator: DoesNotExist}]",
                &[("a", "")],
                false,
            ),
            (
                "{matchLabels: {b: z}, matchExpressions: [{key: a, operator: Exists}]}",
                &[("a", "1")],
                false,
            ),
        ];
        for (selector, labels, expected) in cases {
            assert_eq!(
                check(selector, labels),
                Ok(*expected),
                "{selector} on {labels:?}"
            );
        }
    }

    #[test]
    fn malformed_selectors_are_errors() {
        assert!(check("matchExpressions: [{key: a, operator: Near}]", &[]).is_err());
        assert!(check("matchExpressions: [{key: a, operator: In}]", &[]).is_err());
        assert!(
            check(
                "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
                &[]
            )
            .is_err()
        );
    }
}
