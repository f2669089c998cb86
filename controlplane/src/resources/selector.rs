//! Label and field selectors as the `labelSelector` / `fieldSelector` query parameters spell
//! them.
//!
//! Labels: comma-separated requirements `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
//! `k` (exists), `!k` (does not exist). Fields: `path=v`, `path==v`, `path!=v` where path is
//! one of the fields the resource supports (metadata.name, metadata.namespace and per-kind ones
//! such as spec.nodeName); an unsupported field is an error, as in Kubernetes.
use serde_json::Value;

use super::meta;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {which} selector {input:?}: {detail}")]
pub struct SelectorError {
    pub which: &'static str,
    pub input: String,
    pub detail: String,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(|p| super::validate::dns1123_subdomain(p).is_ok())
}

fn valid_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<LabelSelector, SelectorError> {
        let err =
            |detail: String| SelectorError { which: "label", input: input.to_string(), detail };
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(input) {
            let part = part.trim();
            let req = if let Some(key) = part.strip_prefix('!') {
                Requirement { key: key.trim().to_string(), op: Op::DoesNotExist }
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement { key: k.trim().into(), op: Op::NotEquals(v.trim().into()) }
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement { key: k.trim().into(), op: Op::Equals(v.trim().into()) }
            } else if let Some((k, rest)) =
                part.split_once(" notin ").or_else(|| part.split_once(" in "))
            {
                let is_in = !part.contains(" notin ");
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("values of {k:?} must be in parentheses")))?;
                let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                Requirement {
                    key: k.trim().into(),
                    op: if is_in { Op::In(values) } else { Op::NotIn(values) },
                }
            } else {
                Requirement { key: part.to_string(), op: Op::Exists }
            };
            if !valid_label_key(&req.key) {
                return Err(err(format!("{:?} is not a valid label key", req.key)));
            }
            let values: Vec<&String> = match &req.op {
                Op::Equals(v) | Op::NotEquals(v) => vec![v],
                Op::In(vs) | Op::NotIn(vs) => vs.iter().collect(),
                _ => vec![],
            };
            if let Some(bad) = values.iter().find(|v| !valid_label_value(v)) {
                return Err(err(format!("{bad:?} is not a valid label value")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Builds the selector of a `matchLabels` / `matchExpressions` object (or a plain map, as
    /// Service.spec.selector is).
    pub fn from_object(selector: &Value) -> Result<LabelSelector, SelectorError> {
        let err =
            |detail: String| SelectorError { which: "label", input: selector.to_string(), detail };
        let mut reqs = Vec::new();
        let Some(map) = selector.as_object() else { return Ok(LabelSelector(reqs)) };
        let (labels, expressions) =
            if map.contains_key("matchLabels") || map.contains_key("matchExpressions") {
                (map.get("matchLabels"), map.get("matchExpressions"))
            } else {
                (Some(selector), None)
            };
        for (k, v) in labels.and_then(Value::as_object).into_iter().flatten() {
            let v = v.as_str().ok_or_else(|| err(format!("value of {k:?} is not a string")))?;
            reqs.push(Requirement { key: k.clone(), op: Op::Equals(v.into()) });
        }
        for expr in expressions.and_then(Value::as_array).into_iter().flatten() {
            let key = expr
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| err("expression without key".into()))?;
            let values: Vec<String> = expr
                .get("values")
                .and_then(Value::as_array)
                .map(|vs| vs.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let op = match expr.get("operator").and_then(Value::as_str) {
                Some("In") => Op::In(values),
                Some("NotIn") => Op::NotIn(values),
                Some("Exists") => Op::Exists,
                Some("DoesNotExist") => Op::DoesNotExist,
                other => return Err(err(format!("unknown operator {other:?}"))),
            };
            reqs.push(Requirement { key: key.into(), op });
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object (its metadata.labels) matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match (&req.op, label(&req.key)) {
            (Op::Equals(v), Some(l)) => l == v,
            (Op::Equals(_), None) => false,
            (Op::NotEquals(v), l) => l != Some(v.as_str()),
            (Op::In(vs), Some(l)) => vs.iter().any(|v| v == l),
            (Op::In(_), None) => false,
            (Op::NotIn(vs), l) => l.is_none_or(|l| !vs.iter().any(|v| v == l)),
            (Op::Exists, l) => l.is_some(),
            (Op::DoesNotExist, l) => l.is_none(),
        })
    }
}

/// Writes the selector as apimachinery's `Selector.String()` does (what printer columns show):
/// requirements sorted by key, set values sorted; the empty selector is "".
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut reqs: Vec<&Requirement> = self.0.iter().collect();
        reqs.sort_by(|a, b| a.key.cmp(&b.key));
        let sorted = |vs: &[String]| {
            let mut vs = vs.to_vec();
            vs.sort();
            vs.join(",")
        };
        for (i, req) in reqs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let key = &req.key;
            match &req.op {
                Op::Equals(v) => write!(f, "{key}={v}")?,
                Op::NotEquals(v) => write!(f, "{key}!={v}")?,
                Op::In(vs) => write!(f, "{key} in ({})", sorted(vs))?,
                Op::NotIn(vs) => write!(f, "{key} notin ({})", sorted(vs))?,
                Op::Exists => write!(f, "{key}")?,
                Op::DoesNotExist => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// The dotted paths of the fields it reads (`spec.nodeName`).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(field, _, _)| field.as_str())
    }

    /// Parses `input`, accepting only the fields in `supported`.
    pub fn parse(input: &str, supported: &[&str]) -> Result<FieldSelector, SelectorError> {
        let err =
            |detail: String| SelectorError { which: "field", input: input.to_string(), detail };
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in input.split(',') {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(err(format!(
                    "{part:?} is not of the form field=value or field!=value"
                )));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(err(format!(
                    "field label not supported: {field} (supported: {})",
                    supported.join(", ")
                )));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = match meta::path(obj, field) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (actual == *value) == *equal
        })
    }
}

/// The fields a kind can be selected by (Kubernetes' field label conversions, the useful part).
pub fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Node" => &["metadata.name", "spec.unschedulable"],
        "Namespace" => &["metadata.name", "status.phase"],
        "Event" => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "ReplicaSet" => &["metadata.name", "metadata.namespace", "status.replicas"],
        _ => &["metadata.name", "metadata.namespace"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_print_sorted_like_apimachinery() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"tier": "web", "app": "shop"},
            "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "dev"]},
                                 {"key": "zz", "operator": "DoesNotExist"}]}))
        .unwrap();
        assert_eq!(sel.to_string(), "app=shop,env in (dev,prod),tier=web,!zz");
        assert_eq!(LabelSelector::from_object(&json!({})).unwrap().to_string(), "");
    }

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let p = pod(json!({"app": "web", "tier": "front"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&p);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (db, web)"));
        assert!(!m("app notin (web)"));
        assert!(m("missing notin (x)"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(!m("missing=x"));
        assert!(m("missing!=x"));
    }

    #[test]
    fn invalid_label_selectors_are_rejected() {
        for bad in ["app in web", "=x", "a b=c", "app=-bad-", "app in (x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn selector_objects_combine_labels_and_expressions() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]
        }))
        .unwrap();
        assert!(sel.matches(&pod(json!({"app": "web", "tier": "front"}))));
        assert!(!sel.matches(&pod(json!({"app": "web"}))));
        let plain = LabelSelector::from_object(&json!({"app": "web"})).unwrap();
        assert!(plain.matches(&pod(json!({"app": "web"}))));
    }

    #[test]
    fn field_selectors_check_supported_fields() {
        let fields = supported_fields("Pod");
        let p = pod(json!({}));
        assert!(FieldSelector::parse("spec.nodeName=n1", fields).unwrap().matches(&p));
        assert!(!FieldSelector::parse("spec.nodeName!=n1", fields).unwrap().matches(&p));
        assert!(
            FieldSelector::parse("metadata.name=p,metadata.namespace==ns", fields)
                .unwrap()
                .matches(&p)
        );
        assert!(FieldSelector::parse("spec.nodeName=", fields).unwrap().matches(&json!({})));
        assert!(FieldSelector::parse("spec.bogus=1", fields).is_err());
        assert!(FieldSelector::parse("nonsense", fields).is_err());
    }
}
