//! Kubernetes' protobuf encoding of request bodies, which kubectl's typed commands send
//! (`kubectl create deployment|service|namespace|configmap|serviceaccount …`): the `k8s\0`
//! envelope (runtime.Unknown) around the object, decoded into the JSON object it stands for.
//!
//! The decoder is driven by field tables ([`super::protobuf_schema`], generated from the
//! k8s-pb protobuf types with k8s-openapi's JSON names by `controlplane/tools/protobuf_schema.py`)
//! for every kind the server serves. JSON follows Go's rules: scalars at their zero value are
//! left out (Go marshals non-pointer fields even when empty, and omits them from JSON), except
//! pointer fields whose zero means something (`replicas: 0`, `terminationGracePeriodSeconds: 0`,
//! …); embedded structs (`json:",inline"`, e.g. a Volume's source) are flattened; Time,
//! IntOrString, Quantity and RawExtension take their JSON forms. Unknown field numbers are
//! skipped, as protobuf requires. Kinds without a table are refused (the caller answers 415).
//! The same tables tell field validation which fields each kind has (`fields.rs`).
use base64::Engine;
use serde_json::{Map, Value, json};

use super::protobuf_schema::{KINDS, MESSAGES};

const MAGIC: &[u8] = b"k8s\0";

/// Objects nested deeper than this are refused (the schema's real depth is about 15).
const MAX_DEPTH: u32 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtobufError {
    #[error("the protobuf body is malformed: {0}")]
    Malformed(&'static str),
    #[error("protobuf bodies are not understood for {0}; send JSON (application/json)")]
    Unsupported(String),
}

/// One message of the schema.
pub(crate) struct Message {
    #[cfg_attr(not(test), allow(dead_code))]
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// One field: its number, JSON name, value type and shape.
pub(crate) struct Field {
    pub tag: u64,
    pub json: &'static str,
    pub ty: Ty,
    pub shape: Shape,
    /// A Go pointer field: a zero value is kept in the JSON.
    pub keep_zero: bool,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Ty {
    Str,
    Bytes,
    Bool,
    I32,
    I64,
    /// Index into the schema's messages.
    Msg(usize),
    Time,
    MicroTime,
    /// RawExtension and FieldsV1: embedded JSON bytes.
    RawJson,
    IntOrString,
    Quantity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    One,
    List,
    /// map<string, ty>
    Map,
    /// An embedded struct whose fields appear in the parent's JSON object.
    Inline,
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed64,
    Fixed32,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ProtobufError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(ProtobufError::Malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ProtobufError::Malformed("varint too long"))
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], ProtobufError> {
    let end = pos
        .checked_add(len)
        .filter(|e| *e <= buf.len())
        .ok_or(ProtobufError::Malformed("truncated field"))?;
    let bytes = &buf[*pos..end];
    *pos = end;
    Ok(bytes)
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ProtobufError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            1 => {
                take(buf, &mut pos, 8)?;
                Wire::Fixed64
            }
            5 => {
                take(buf, &mut pos, 4)?;
                Wire::Fixed32
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?)
                    .map_err(|_| ProtobufError::Malformed("field length too large"))?;
                Wire::Bytes(take(buf, &mut pos, len)?)
            }
            _ => return Err(ProtobufError::Malformed("unknown wire type")),
        };
        out.push((key >> 3, wire));
    }
    Ok(out)
}

fn string(bytes: &[u8]) -> Result<String, ProtobufError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtobufError::Malformed("a string is not UTF-8"))
}

fn bytes_of<'a>(wire: &Wire<'a>) -> Result<&'a [u8], ProtobufError> {
    match wire {
        Wire::Bytes(b) => Ok(b),
        _ => Err(ProtobufError::Malformed("a field has the wrong wire type")),
    }
}

fn varint_of(wire: &Wire<'_>) -> Result<u64, ProtobufError> {
    match wire {
        Wire::Varint(v) => Ok(*v),
        _ => Err(ProtobufError::Malformed("a field has the wrong wire type")),
    }
}

/// Seconds and nanoseconds of a Time/MicroTime message as RFC 3339 (None for the zero time).
fn time(bytes: &[u8], micro: bool) -> Result<Option<Value>, ProtobufError> {
    let (mut secs, mut nanos) = (0i64, 0i64);
    for (tag, wire) in fields(bytes)? {
        match tag {
            1 => secs = varint_of(&wire)? as i64,
            2 => nanos = i64::from(varint_of(&wire)? as i32),
            _ => {}
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(None);
    }
    let base = super::meta::rfc3339(secs);
    Ok(Some(json!(if micro {
        format!("{}.{:06}Z", base.trim_end_matches('Z'), nanos / 1000)
    } else {
        base
    })))
}

fn int_or_string(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let (mut is_string, mut int, mut text) = (false, 0i64, String::new());
    for (tag, wire) in fields(bytes)? {
        match tag {
            1 => is_string = varint_of(&wire)? == 1,
            2 => int = i64::from(varint_of(&wire)? as i32),
            3 => text = string(bytes_of(&wire)?)?,
            _ => {}
        }
    }
    Ok(if is_string { json!(text) } else { json!(int) })
}

/// A field's value; None when Go would leave it out of the JSON.
fn value(
    ty: Ty,
    wire: &Wire<'_>,
    keep_zero: bool,
    depth: u32,
) -> Result<Option<Value>, ProtobufError> {
    let zero_ok = |v: Value, zero: bool| if zero && !keep_zero { None } else { Some(v) };
    Ok(match ty {
        Ty::Str => {
            let s = string(bytes_of(wire)?)?;
            zero_ok(json!(s), s.is_empty())
        }
        Ty::Bytes => Some(json!(base64::engine::general_purpose::STANDARD.encode(bytes_of(wire)?))),
        Ty::Bool => {
            let v = varint_of(wire)? != 0;
            zero_ok(json!(v), !v)
        }
        Ty::I32 => {
            let v = varint_of(wire)? as i32;
            zero_ok(json!(v), v == 0)
        }
        Ty::I64 => {
            let v = varint_of(wire)? as i64;
            zero_ok(json!(v), v == 0)
        }
        Ty::Msg(index) => Some(Value::Object(message(index, bytes_of(wire)?, depth + 1)?)),
        Ty::Time => time(bytes_of(wire)?, false)?,
        Ty::MicroTime => time(bytes_of(wire)?, true)?,
        Ty::RawJson => {
            let mut raw = &[][..];
            for (tag, w) in fields(bytes_of(wire)?)? {
                if tag == 1 {
                    raw = bytes_of(&w)?;
                }
            }
            if raw.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_slice(raw)
                        .map_err(|_| ProtobufError::Malformed("embedded raw JSON is not JSON"))?,
                )
            }
        }
        Ty::IntOrString => Some(int_or_string(bytes_of(wire)?)?),
        Ty::Quantity => {
            let mut text = String::new();
            for (tag, w) in fields(bytes_of(wire)?)? {
                if tag == 1 {
                    text = string(bytes_of(&w)?)?;
                }
            }
            Some(json!(text))
        }
    })
}

fn is_scalar_number(ty: Ty) -> bool {
    matches!(ty, Ty::Bool | Ty::I32 | Ty::I64)
}

/// Decodes one message of the schema into a JSON object.
fn message(index: usize, buf: &[u8], depth: u32) -> Result<Map<String, Value>, ProtobufError> {
    if depth > MAX_DEPTH {
        return Err(ProtobufError::Malformed("objects are nested too deeply"));
    }
    let schema = &MESSAGES[index];
    let mut out = Map::new();
    for (tag, wire) in fields(buf)? {
        let Some(field) = schema.fields.iter().find(|f| f.tag == tag) else { continue };
        match field.shape {
            Shape::One => {
                if let Some(v) = value(field.ty, &wire, field.keep_zero, depth)? {
                    out.insert(field.json.into(), v);
                }
            }
            Shape::Inline => {
                let Ty::Msg(inner) = field.ty else {
                    return Err(ProtobufError::Malformed("an inline field is not a message"));
                };
                out.extend(message(inner, bytes_of(&wire)?, depth + 1)?);
            }
            Shape::List => {
                let list = out.entry(field.json).or_insert_with(|| json!([]));
                let list = list.as_array_mut().ok_or(ProtobufError::Malformed("field repeated"))?;
                match (&wire, is_scalar_number(field.ty)) {
                    // Packed repeated numbers: one length-delimited run of varints.
                    (Wire::Bytes(packed), true) => {
                        let mut pos = 0;
                        while pos < packed.len() {
                            let v = Wire::Varint(varint(packed, &mut pos)?);
                            list.extend(value(field.ty, &v, true, depth)?);
                        }
                    }
                    _ => list.extend(value(field.ty, &wire, true, depth)?),
                }
            }
            Shape::Map => {
                let (mut key, mut item) = (String::new(), None);
                for (entry_tag, entry_wire) in fields(bytes_of(&wire)?)? {
                    match entry_tag {
                        1 => key = string(bytes_of(&entry_wire)?)?,
                        2 => item = value(field.ty, &entry_wire, true, depth)?,
                        _ => {}
                    }
                }
                let item = item.unwrap_or_else(|| match field.ty {
                    Ty::Msg(_) => json!({}),
                    _ => json!(""),
                });
                let map = out.entry(field.json).or_insert_with(|| json!({}));
                map.as_object_mut()
                    .ok_or(ProtobufError::Malformed("field repeated"))?
                    .insert(key, item);
            }
        }
    }
    Ok(out)
}

/// Decodes a protobuf request body into the JSON object it stands for.
pub fn to_json(body: &[u8]) -> Result<Value, ProtobufError> {
    let envelope =
        body.strip_prefix(MAGIC).ok_or(ProtobufError::Malformed("missing the k8s\\0 prefix"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (field, wire) in fields(envelope)? {
        match (field, wire) {
            (1, Wire::Bytes(type_meta)) => {
                for (f, w) in fields(type_meta)? {
                    match (f, w) {
                        (1, Wire::Bytes(b)) => api_version = string(b)?,
                        (2, Wire::Bytes(b)) => kind = string(b)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            (3, Wire::Bytes(b)) if !b.is_empty() => {
                return Err(ProtobufError::Malformed("content encodings are not supported"));
            }
            _ => {}
        }
    }
    let index = KINDS
        .iter()
        .find(|(v, k, _)| *v == api_version && *k == kind)
        .map(|(_, _, index)| *index)
        .ok_or_else(|| ProtobufError::Unsupported(format!("{api_version} {kind}")))?;
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    obj.extend(message(index, raw, 0)?);
    Ok(Value::Object(obj))
}

/// The schema message named `name` (for tests).
#[cfg(test)]
fn schema_index(name: &str) -> usize {
    MESSAGES.iter().position(|m| m.name == name).expect("message in the schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64, wire: u64) -> Vec<u8> {
        encode_varint(n << 3 | wire)
    }

    fn encode_varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        [key(n, 2), encode_varint(bytes.len() as u64), bytes.to_vec()].concat()
    }

    fn int(n: u64, v: i64) -> Vec<u8> {
        [key(n, 0), encode_varint(v as u64)].concat()
    }

    fn entry(k: &str, v: &[u8]) -> Vec<u8> {
        [field(1, k.as_bytes()), field(2, v)].concat()
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        [MAGIC.to_vec(), field(1, &type_meta), field(2, raw)].concat()
    }

    #[test]
    fn configmaps_and_namespaces_decode_to_json() {
        let meta =
            [field(1, b"cfg"), field(3, b"default"), field(11, &entry("app", b"web"))].concat();
        let raw = [
            field(1, &meta),
            field(2, &entry("a", b"1")),
            field(2, &entry("b", b"2")),
            field(3, &entry("bin", &[0, 1])),
            int(4, 1),
        ]
        .concat();
        assert_eq!(
            to_json(&envelope("v1", "ConfigMap", &raw)).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "immutable": true,
                   "metadata": {"name": "cfg", "namespace": "default", "labels": {"app": "web"}},
                   "data": {"a": "1", "b": "2"}, "binaryData": {"bin": "AAE="}})
        );
        let ns = [field(1, &field(1, b"demo")), field(2, &field(1, b"kubernetes"))].concat();
        assert_eq!(
            to_json(&envelope("v1", "Namespace", &ns)).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}, "spec": {"finalizers": ["kubernetes"]}})
        );
    }

    /// What Go's marshaller sends for `kubectl create deployment web --image=nginx
    /// --replicas=0`: empty strings and zero non-pointer fields present on the wire, an empty
    /// creationTimestamp, empty structs.
    #[test]
    fn deployments_follow_go_json_rules() {
        let labels = field(11, &entry("app", b"web"));
        let meta = [field(1, b"web"), field(2, b""), field(8, b""), labels.clone()].concat();
        let container = [
            field(1, b"nginx"),
            field(2, b"nginx"),
            field(8, b""), // resources: {}
            int(16, 0),    // stdin: false
        ]
        .concat();
        let pod_spec = [field(2, &container), int(4, 30), field(3, b"")].concat();
        let template = [field(1, &[field(8, b""), labels.clone()].concat()), field(2, &pod_spec)];
        let selector = field(1, &entry("app", b"web"));
        let strategy = [
            field(1, b"RollingUpdate"),
            field(
                2,
                &[field(1, &[int(1, 1), field(3, b"25%")].concat()), field(2, &int(2, 1))].concat(),
            ),
        ]
        .concat();
        let spec = [
            int(1, 0),
            field(2, &selector),
            field(3, &template.concat()),
            field(4, &strategy),
            int(5, 0), // minReadySeconds: non-pointer, left out
        ]
        .concat();
        let raw = [field(1, &meta), field(2, &spec), field(3, b"")].concat();
        assert_eq!(
            to_json(&envelope("apps/v1", "Deployment", &raw)).unwrap(),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx", "resources": {}}],
                                 "terminationGracePeriodSeconds": 30}},
                    "strategy": {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 1}}},
                "status": {}})
        );
    }

    #[test]
    fn services_pods_and_inline_volume_sources() {
        let port = [field(1, b"http"), int(3, 80), field(4, &int(2, 8080)), field(2, b"TCP")];
        let spec = [field(1, &port.concat()), field(2, &entry("app", b"web")), field(3, b"")];
        let raw = [field(1, &field(1, b"web")), field(2, &spec.concat())].concat();
        assert_eq!(
            to_json(&envelope("v1", "Service", &raw)).unwrap(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                         "selector": {"app": "web"}}})
        );
        let volume = [field(1, b"scratch"), field(2, &field(2, b""))].concat(); // emptyDir
        let created = field(8, &int(1, 86_400));
        let raw = [
            field(1, &[field(1, b"p"), created].concat()),
            field(2, &[field(1, &volume), field(2, &field(1, b"c"))].concat()),
        ]
        .concat();
        let pod = to_json(&envelope("v1", "Pod", &raw)).unwrap();
        assert_eq!(pod["spec"]["volumes"], json!([{"name": "scratch", "emptyDir": {}}]));
        assert_eq!(pod["metadata"]["creationTimestamp"], json!("1970-01-02T00:00:00Z"));
        assert_eq!(pod["spec"]["containers"], json!([{"name": "c"}]));
    }

    #[test]
    fn schema_names_match_kubernetes_json() {
        let names = |m: &str| -> Vec<&str> {
            MESSAGES[schema_index(m)].fields.iter().map(|f| f.json).collect()
        };
        for wanted in ["hostIPC", "hostPID", "nodeName", "terminationGracePeriodSeconds"] {
            assert!(names("PodSpec").contains(&wanted), "{wanted}");
        }
        for wanted in ["clusterIP", "clusterIPs", "externalIPs", "loadBalancerIP", "ipFamilies"] {
            assert!(names("ServiceSpec").contains(&wanted), "{wanted}");
        }
        assert!(names("PodStatus").contains(&"podIPs"));
    }

    #[test]
    fn other_kinds_and_garbage_are_refused() {
        assert!(matches!(
            to_json(&envelope("batch/v1", "Job", &[])),
            Err(ProtobufError::Unsupported(_))
        ));
        assert!(to_json(b"not protobuf").is_err());
        assert!(to_json(&[MAGIC, &[0x0a, 0x7f]].concat()).is_err());
        // A string field sent as a varint, and a truncated nested message.
        assert!(to_json(&envelope("v1", "Pod", &field(1, &int(1, 5)))).is_err());
        assert!(to_json(&envelope("v1", "Pod", &[0x0a, 0x05, 0x0a])).is_err());
    }
}
