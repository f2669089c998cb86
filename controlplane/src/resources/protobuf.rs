//! Kubernetes' protobuf encoding, for the request bodies kubectl's typed commands send
//! (`kubectl create namespace`, `kubectl create configmap`): the `k8s\0` envelope
//! (runtime.Unknown) and the fields of Namespace, ConfigMap and ObjectMeta that a create
//! carries. Anything else is refused (the caller answers 415), never guessed.
use base64::Engine;
use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtobufError {
    #[error("the protobuf body is malformed: {0}")]
    Malformed(&'static str),
    #[error("protobuf bodies are understood for Namespace and ConfigMap only, not {0}; send JSON")]
    Unsupported(String),
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
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

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ProtobufError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            1 | 5 => {
                pos += if key & 7 == 1 { 8 } else { 4 };
                if pos > buf.len() {
                    return Err(ProtobufError::Malformed("truncated fixed field"));
                }
                Wire::Fixed
            }
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or(ProtobufError::Malformed("truncated field"))?;
                let bytes = &buf[pos..end];
                pos = end;
                Wire::Bytes(bytes)
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

/// A map<string, string> entry (key 1, value 2).
fn map_entry(bytes: &[u8]) -> Result<(String, Vec<u8>), ProtobufError> {
    let (mut key, mut value) = (String::new(), Vec::new());
    for (field, wire) in fields(bytes)? {
        match (field, wire) {
            (1, Wire::Bytes(b)) => key = string(b)?,
            (2, Wire::Bytes(b)) => value = b.to_vec(),
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_entry(
    target: &mut Map<String, Value>,
    name: &str,
    bytes: &[u8],
) -> Result<(), ProtobufError> {
    let (k, v) = map_entry(bytes)?;
    let map = target.entry(name).or_insert(json!({}));
    map[k] = json!(string(&v)?);
    Ok(())
}

fn object_meta(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let mut meta = Map::new();
    for (field, wire) in fields(bytes)? {
        let Wire::Bytes(b) = wire else { continue };
        match field {
            1 => _ = meta.insert("name".into(), json!(string(b)?)),
            2 => _ = meta.insert("generateName".into(), json!(string(b)?)),
            3 => _ = meta.insert("namespace".into(), json!(string(b)?)),
            11 => insert_entry(&mut meta, "labels", b)?,
            12 => insert_entry(&mut meta, "annotations", b)?,
            14 => {
                let list = meta.entry("finalizers").or_insert(json!([]));
                list.as_array_mut().expect("made a list").push(json!(string(b)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(meta))
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
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            for (field, wire) in fields(raw)? {
                match (field, wire) {
                    (1, Wire::Bytes(b)) => _ = obj.insert("metadata".into(), object_meta(b)?),
                    (2, Wire::Bytes(b)) => {
                        let mut finalizers = Vec::new();
                        for (f, w) in fields(b)? {
                            if let (1, Wire::Bytes(s)) = (f, w) {
                                finalizers.push(json!(string(s)?));
                            }
                        }
                        obj.insert("spec".into(), json!({"finalizers": finalizers}));
                    }
                    _ => {}
                }
            }
        }
        ("v1", "ConfigMap") => {
            for (field, wire) in fields(raw)? {
                match (field, wire) {
                    (1, Wire::Bytes(b)) => _ = obj.insert("metadata".into(), object_meta(b)?),
                    (2, Wire::Bytes(b)) => insert_entry(&mut obj, "data", b)?,
                    (3, Wire::Bytes(b)) => {
                        let (k, v) = map_entry(b)?;
                        let map = obj.entry("binaryData").or_insert(json!({}));
                        map[k] = json!(base64::engine::general_purpose::STANDARD.encode(v));
                    }
                    (4, Wire::Varint(v)) => _ = obj.insert("immutable".into(), json!(v != 0)),
                    _ => {}
                }
            }
        }
        (v, k) => return Err(ProtobufError::Unsupported(format!("{v} {k}"))),
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    fn entry(k: &str, v: &str) -> Vec<u8> {
        [field(1, k.as_bytes()), field(2, v.as_bytes())].concat()
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        [MAGIC.to_vec(), field(1, &type_meta), field(2, raw)].concat()
    }

    #[test]
    fn configmaps_and_namespaces_decode_to_json() {
        let meta =
            [field(1, b"cfg"), field(3, b"default"), field(11, &entry("app", "web"))].concat();
        let raw = [
            field(1, &meta),
            field(2, &entry("a", "1")),
            field(2, &entry("b", "2")),
            vec![4 << 3, 1],
        ]
        .concat();
        assert_eq!(
            to_json(&envelope("v1", "ConfigMap", &raw)).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "immutable": true,
                   "metadata": {"name": "cfg", "namespace": "default", "labels": {"app": "web"}},
                   "data": {"a": "1", "b": "2"}})
        );
        let ns = [field(1, &field(1, b"demo")), field(2, &field(1, b"kubernetes"))].concat();
        assert_eq!(
            to_json(&envelope("v1", "Namespace", &ns)).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}, "spec": {"finalizers": ["kubernetes"]}})
        );
    }

    #[test]
    fn other_kinds_and_garbage_are_refused() {
        assert!(matches!(
            to_json(&envelope("apps/v1", "Deployment", &[])),
            Err(ProtobufError::Unsupported(_))
        ));
        assert!(to_json(b"not protobuf").is_err());
        assert!(to_json(&[MAGIC, &[0x0a, 0x7f]].concat()).is_err());
    }
}
