//! Label selectors (`matchLabels` and `matchExpressions` with In, NotIn, Exists,
//! DoesNotExist), as Kubernetes evaluates them: all requirements must hold; an empty selector
//! matches everything.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use thiserror::Error;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error(
        "matchExpressions key `{key}`: unknown operator `{operator}` (use In, NotIn, Exists or \
         DoesNotExist)"
    )]
    Operator { key: String, operator: String },
    #[error("matchExpressions key `{key}`: operator {operator} needs at least one value")]
    NoValues { key: String, operator: String },
    #[error("matchExpressions key `{key}`: operator {operator} takes no values")]
    UnexpectedValues { key: String, operator: String },
}

impl Selector {
    /// The selector that matches every label set (`{}`).
    pub const EVERYTHING: Selector = Selector { requirements: Vec::new() };

    pub fn everything() -> Self {
        Self::EVERYTHING
    }

    pub fn from_k8s(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: key.clone(),
                op: Op::In(BTreeSet::from([value.clone()])),
            });
        }
        for expr in selector.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let key = expr.key.clone();
            let operator = expr.operator.clone();
            let op = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::NoValues { key, operator });
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues { key, operator });
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                _ => return Err(SelectorError::Operator { key, operator }),
            };
            requirements.push(Requirement { key, op });
        }
        Ok(Self { requirements })
    }

    /// A label every matching set must have, with the values it may take (the first `In`
    /// requirement): matching sets can be looked up by label instead of scanned.
    pub fn required_label(&self) -> Option<(&str, &BTreeSet<String>)> {
        self.requirements.iter().find_map(|req| match &req.op {
            Op::In(values) => Some((req.key.as_str(), values)),
            _ => None,
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|req| {
            let value = labels.get(&req.key);
            match &req.op {
                Op::In(values) => value.is_some_and(|v| values.contains(v)),
                Op::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() {
                    None
                } else {
                    Some(values.iter().map(|v| v.to_string()).collect())
                },
            }]),
            match_labels: None,
        }
    }

    #[test]
    fn operators() {
        let a = labels(&[("pod", "a")]);
        let none = labels(&[]);
        let sel = |s| Selector::from_k8s(&s).unwrap();
        assert!(sel(expr("pod", "In", &["a", "b"])).matches(&a));
        assert!(!sel(expr("pod", "In", &["b"])).matches(&a));
        assert!(!sel(expr("pod", "In", &["a"])).matches(&none));
        assert!(!sel(expr("pod", "NotIn", &["a"])).matches(&a));
        assert!(sel(expr("pod", "NotIn", &["a"])).matches(&none));
        assert!(sel(expr("pod", "Exists", &[])).matches(&a));
        assert!(!sel(expr("pod", "Exists", &[])).matches(&none));
        assert!(sel(expr("pod", "DoesNotExist", &[])).matches(&none));
        assert!(Selector::from_k8s(&LabelSelector::default()).unwrap().matches(&a));
    }

    #[test]
    fn bad_expressions_are_explained() {
        let err = Selector::from_k8s(&expr("pod", "Equals", &["a"])).unwrap_err();
        assert!(err.to_string().contains("unknown operator `Equals`"));
        assert!(Selector::from_k8s(&expr("pod", "In", &[])).is_err());
        assert!(Selector::from_k8s(&expr("pod", "Exists", &["a"])).is_err());
    }
}
