//! Output straight from the stored bytes: lists and watch events without a parse and a
//! re-serialisation per object.
//!
//! Objects are stored as compact JSON with sorted keys and without `metadata.resourceVersion`
//! (what `handlers::encode` writes). [`write_object`] copies the stored bytes and splices
//! `"resourceVersion":"N"` into `metadata` at its sorted place, so the result is byte for byte
//! what `serde_json::to_vec(&handlers::decode(kv))` gives, at the cost of a scan of the
//! top-level keys and of `metadata`'s. Whatever the scan does not expect (keys with escapes,
//! no `metadata` object, a stored `resourceVersion`, malformed bytes) goes the old way: parse,
//! set, serialise. [`selection_view`] extracts only the members a selector reads, so
//! selectors do not parse whole objects either.
use std::ops::Range;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{handlers::decode, status::ApiError};
use crate::store::KeyValue;

/// The stored bytes are not in the shape the fast path handles; use the parsed path.
#[derive(Debug, PartialEq, Eq)]
struct Unsupported;

type Scan<T> = Result<T, Unsupported>;

/// One member of a JSON object: its key (raw bytes between the quotes) and value range.
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `i` at an opening quote: the index after the closing one, and whether escapes occur.
fn skip_string(b: &[u8], mut i: usize) -> Scan<(usize, bool)> {
    if b.get(i) != Some(&b'"') {
        return Err(Unsupported);
    }
    i += 1;
    let mut escaped = false;
    while i < b.len() {
        match b[i] {
            b'"' => return Ok((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
    Err(Unsupported)
}

/// `i` at the first byte of a value: the index after it.
fn skip_value(b: &[u8], i: usize) -> Scan<usize> {
    match b.get(i) {
        Some(b'"') => Ok(skip_string(b, i)?.0),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(Unsupported)
        }
        Some(_) => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            if j == i { Err(Unsupported) } else { Ok(j) }
        }
        None => Err(Unsupported),
    }
}

/// The members of the object starting at `start` (`{`), and the index of its closing `}`.
/// Keys with escapes are refused: their raw bytes do not compare like the decoded keys.
fn members(b: &[u8], start: usize) -> Scan<(Vec<Member>, usize)> {
    if b.get(start) != Some(&b'{') {
        return Err(Unsupported);
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, start + 1);
    if b.get(i) == Some(&b'}') {
        return Ok((out, i));
    }
    loop {
        let (key_end, escaped) = skip_string(b, i)?;
        if escaped {
            return Err(Unsupported);
        }
        let key = i + 1..key_end - 1;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return Err(Unsupported);
        }
        let value_start = skip_ws(b, i + 1);
        let value_end = skip_value(b, value_start)?;
        out.push(Member { key, value: value_start..value_end });
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Ok((out, i)),
            _ => return Err(Unsupported),
        }
    }
}

fn find<'m>(b: &[u8], members: &'m [Member], key: &str) -> Option<&'m Member> {
    members.iter().find(|m| &b[m.key.clone()] == key.as_bytes())
}

/// Appends the stored object with `metadata.resourceVersion` spliced in, or Unsupported.
fn splice(b: &[u8], revision: i64, out: &mut Vec<u8>) -> Scan<()> {
    let start = skip_ws(b, 0);
    let (top, end) = members(b, start)?;
    if skip_ws(b, end + 1) != b.len() {
        return Err(Unsupported);
    }
    let meta = find(b, &top, "metadata").ok_or(Unsupported)?;
    let (fields, meta_end) = members(b, meta.value.start)?;
    const RV: &[u8] = b"resourceVersion";
    // Before the first key that sorts after resourceVersion, else after the last member.
    let (at, before) = match fields.iter().find(|f| &b[f.key.clone()] >= RV) {
        Some(f) if &b[f.key.clone()] == RV => return Err(Unsupported),
        Some(f) => (f.key.start - 1, true),
        None => (fields.last().map_or(meta_end, |f| f.value.end), false),
    };
    out.reserve(b.len() + 40);
    out.extend_from_slice(&b[start..at]);
    if !before && !fields.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(revision.to_string().as_bytes());
    out.push(b'"');
    if before {
        out.push(b',');
    }
    out.extend_from_slice(&b[at..=end]);
    Ok(())
}

/// Appends the object as clients see it (`handlers::decode`, serialised) to `out`.
pub(crate) fn write_object(kv: &KeyValue, out: &mut Vec<u8>) -> Result<(), ApiError> {
    let mark = out.len();
    if splice(&kv.value, kv.mod_revision, out).is_ok() {
        return Ok(());
    }
    out.truncate(mark);
    serde_json::to_writer(&mut *out, &decode(kv)?).expect("JSON values serialize");
    Ok(())
}

/// A JSON string literal.
fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("strings serialize");
}

/// The start and end of a list body: `{"apiVersion":…,"items":[` and
/// `],"kind":…,"metadata":{…}}` (keys sorted, as the parsed path serialises them).
pub(crate) fn list_frame(
    api_version: &str,
    list_kind: &str,
    revision: i64,
    continue_token: Option<&str>,
) -> (Vec<u8>, Vec<u8>) {
    let mut head = b"{\"apiVersion\":".to_vec();
    write_str(&mut head, api_version);
    head.extend_from_slice(b",\"items\":[");
    let mut tail = b"],\"kind\":".to_vec();
    write_str(&mut tail, list_kind);
    tail.extend_from_slice(b",\"metadata\":{");
    if let Some(token) = continue_token {
        tail.extend_from_slice(b"\"continue\":");
        write_str(&mut tail, token);
        tail.push(b',');
    }
    tail.extend_from_slice(b"\"resourceVersion\":");
    write_str(&mut tail, &revision.to_string());
    tail.extend_from_slice(b"}}\n");
    (head, tail)
}

/// One watch event line, `{"object":…,"type":"KIND"}\n`.
pub(crate) fn watch_line(kind: &str, kv: &KeyValue) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(kv.value.len() + 64);
    out.extend_from_slice(b"{\"object\":");
    write_object(kv, &mut out)?;
    out.extend_from_slice(b",\"type\":");
    write_str(&mut out, kind);
    out.extend_from_slice(b"}\n");
    Ok(Bytes::from(out))
}

/// The raw value at a dotted path of members (`metadata.labels`), if every step is an object
/// member; Ok(None) when a step is missing or not an object.
fn raw_path<'b>(b: &'b [u8], dotted: &str) -> Scan<Option<&'b [u8]>> {
    let mut at = skip_ws(b, 0);
    for part in dotted.split('.') {
        if b.get(at) != Some(&b'{') {
            return Ok(None);
        }
        let (fields, _) = members(b, at)?;
        match find(b, &fields, part) {
            Some(m) => at = m.value.start,
            None => return Ok(None),
        }
    }
    Ok(Some(&b[at..skip_value(b, at)?]))
}

fn insert_path(view: &mut Value, dotted: &str, value: Value) {
    let mut at = view;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (n, part) in parts.iter().enumerate() {
        let map = at.as_object_mut().expect("the view is built of objects");
        if n + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        at = map.entry(*part).or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The stored object reduced to the members at `paths`, parsed; for selectors, which read
/// nothing else. Falls back to the whole object when the bytes are not in the expected shape.
pub(crate) fn selection_view<'p>(
    kv: &KeyValue,
    paths: impl IntoIterator<Item = &'p str>,
) -> Result<Value, ApiError> {
    let mut view = Value::Object(Map::new());
    for path in paths {
        let raw = match raw_path(&kv.value, path) {
            Ok(Some(raw)) => raw,
            Ok(None) => continue,
            Err(Unsupported) => return decode(kv),
        };
        let Ok(value) = serde_json::from_slice(raw) else { return decode(kv) };
        insert_path(&mut view, path, value);
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::handlers::encode;

    fn kv(obj: &Value, revision: i64) -> KeyValue {
        KeyValue {
            key: "/k".into(),
            value: encode(obj),
            create_revision: 1,
            mod_revision: revision,
        }
    }

    fn parsed_path(kv: &KeyValue) -> Vec<u8> {
        serde_json::to_vec(&decode(kv).unwrap()).unwrap()
    }

    fn fast_path(kv: &KeyValue) -> Vec<u8> {
        let mut out = Vec::new();
        write_object(kv, &mut out).unwrap();
        out
    }

    #[test]
    fn spliced_objects_are_byte_identical_to_the_parsed_path() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "default", "uid": "u", "labels": {"app": "x"}, "annotations": {"note": "}{\"[],"}}, "spec": {"containers": [{"name": "c", "image": "i", "args": ["a\"b", "{"]}]}, "status": {"phase": "Running"}}),
            // Keys all before resourceVersion, all after, none.
            json!({"kind": "ConfigMap", "metadata": {"annotations": {}, "name": "b"}, "data": {"k": "v"}}),
            json!({"kind": "ConfigMap", "metadata": {"uid": "u", "selfLink": "s"}}),
            json!({"kind": "ConfigMap", "metadata": {}}),
            json!({"metadata": {"name": "unicode ✓ \u{1}", "finalizers": ["a/b"], "generation": 3, "deletionGracePeriodSeconds": 30, "x": null, "y": 1.5e300, "z": true}}),
            // No metadata, metadata not an object, a key with an escape: the parsed path.
            json!({"kind": "Thing"}),
            json!({"kind": "Thing", "metadata": null}),
            json!({"kind": "Thing", "metadata": {"na\"me": "x"}}),
            json!({"ki\nnd": "Thing", "metadata": {"name": "x"}}),
        ];
        for obj in &objects {
            for revision in [1, 42, i64::MAX] {
                let kv = kv(obj, revision);
                assert_eq!(
                    String::from_utf8(fast_path(&kv)).unwrap(),
                    String::from_utf8(parsed_path(&kv)).unwrap(),
                    "{obj}"
                );
            }
        }
    }

    #[test]
    fn bytes_in_another_shape_still_give_the_same_object() {
        let cases: [&[u8]; 5] = [
            b" { \"metadata\" : { \"uid\" : \"u\" , \"name\":\"n\" } , \"kind\" : \"Pod\" } \n",
            b"{\"metadata\":{\"resourceVersion\":\"7\",\"name\":\"n\"}}",
            b"{\"metadata\":{\"name\":\"n\"}} trailing",
            b"[1,2]",
            b"{\"metadata\":{\"name\":\"n\"}",
        ];
        for raw in cases {
            let kv = KeyValue {
                key: "/k".into(),
                value: Bytes::copy_from_slice(raw),
                create_revision: 1,
                mod_revision: 9,
            };
            let mut out = Vec::new();
            match (write_object(&kv, &mut out), decode(&kv)) {
                (Ok(()), Ok(expected)) => {
                    let got: Value = serde_json::from_slice(&out).unwrap();
                    assert_eq!(got, expected, "{}", String::from_utf8_lossy(raw));
                }
                (Err(a), Err(b)) => assert_eq!(a.code, b.code),
                (got, expected) => panic!("{got:?} vs {expected:?}"),
            }
        }
    }

    #[test]
    fn watch_lines_and_list_frames_match_the_parsed_serialisation() {
        let obj = json!({"kind": "Pod", "metadata": {"name": "a", "labels": {"x": "y"}}});
        let kv = kv(&obj, 5);
        let line = watch_line("MODIFIED", &kv).unwrap();
        let mut expected =
            serde_json::to_vec(&json!({"type": "MODIFIED", "object": decode(&kv).unwrap()}))
                .unwrap();
        expected.push(b'\n');
        assert_eq!(line.as_ref(), expected.as_slice());
        for token in [None, Some("tok\"en")] {
            let (mut body, tail) = list_frame("v1", "PodList", 12, token);
            write_object(&kv, &mut body).unwrap();
            body.push(b',');
            write_object(&kv, &mut body).unwrap();
            body.extend_from_slice(&tail);
            let mut metadata = json!({"resourceVersion": "12"});
            if let Some(token) = token {
                metadata["continue"] = json!(token);
            }
            let item = decode(&kv).unwrap();
            let mut expected = serde_json::to_vec(&json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": [item.clone(), item]})).unwrap();
            expected.push(b'\n');
            assert_eq!(String::from_utf8(body).unwrap(), String::from_utf8(expected).unwrap());
        }
    }

    /// Where the time of a 10k Pod list goes, old path against this one. Timings are printed,
    /// not asserted: `cargo test --release -p weir-controlplane --lib profile_list -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn profile_list_of_10k_pods() {
        use std::time::Instant;
        let kvs: Vec<KeyValue> = (0..10_000)
            .map(|i| {
                let pod = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("bench-{i}"), "namespace": "default", "labels": {"app": "bench"},
                        "uid": "0b8f8a0c-3c7e-4f5e-9d4a-2f6c1e0b7a11", "creationTimestamp": "2026-11-23T07:00:00Z", "generation": 1},
                    "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "imagePullPolicy": "IfNotPresent",
                        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "resources": {}}],
                        "dnsPolicy": "ClusterFirst", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
                        "priority": 0, "restartPolicy": "Always", "schedulerName": "default-scheduler", "securityContext": {},
                        "serviceAccountName": "default", "terminationGracePeriodSeconds": 30,
                        "tolerations": [{"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300}]},
                    "status": {"phase": "Pending", "qosClass": "BestEffort"}});
                KeyValue { key: format!("/registry/pods/default/bench-{i}"), ..kv(&pod, 100 + i) }
            })
            .collect();
        let t = Instant::now();
        let copied: Vec<KeyValue> = kvs.to_vec();
        let range = t.elapsed();
        let t = Instant::now();
        let items: Vec<Value> = copied.iter().map(|kv| decode(kv).unwrap()).collect();
        let parse = t.elapsed();
        let t = Instant::now();
        let selector = crate::resources::selector::LabelSelector::parse("app=bench").unwrap();
        let matched = items.iter().filter(|obj| selector.matches(obj)).count();
        let select = t.elapsed();
        let t = Instant::now();
        let list = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items});
        let body = serde_json::to_vec(&list).unwrap();
        let encode = t.elapsed();
        let t = Instant::now();
        let (mut spliced, tail) = list_frame("v1", "PodList", 1, None);
        for (n, kv) in copied.iter().enumerate() {
            if n > 0 {
                spliced.push(b',');
            }
            write_object(kv, &mut spliced).unwrap();
        }
        spliced.extend_from_slice(&tail);
        let splice = t.elapsed();
        let t = Instant::now();
        let views = copied
            .iter()
            .filter(|kv| selector.matches(&selection_view(kv, ["metadata.labels"]).unwrap()))
            .count();
        let view = t.elapsed();
        assert_eq!((matched, views), (10_000, 10_000));
        println!(
            "10k pods, {} bytes: range copy {range:?}, parse {parse:?}, label selector on parsed \
             {select:?}, build + serialise {encode:?}; spliced body {splice:?} ({} bytes), label \
             selector on views {view:?}",
            body.len(),
            spliced.len()
        );
    }

    #[test]
    fn selection_views_hold_exactly_the_selected_members() {
        let obj = json!({"kind": "Pod", "metadata": {"name": "a", "labels": {"app": "web"}}, "spec": {"nodeName": "n1", "containers": []}, "status": {"phase": 3}});
        let kv = kv(&obj, 5);
        let view = selection_view(
            &kv,
            ["metadata.labels", "spec.nodeName", "status.phase", "status.podIP", "kind.x"],
        )
        .unwrap();
        assert_eq!(
            view,
            json!({"metadata": {"labels": {"app": "web"}}, "spec": {"nodeName": "n1"}, "status": {"phase": 3}})
        );
        let odd = KeyValue {
            value: Bytes::from_static(b"{\"metadata\":{\"la\\u0062els\":{\"a\":\"b\"}}}"),
            ..kv
        };
        // An escaped key falls back to the whole parsed object.
        assert_eq!(
            selection_view(&odd, ["metadata.labels"]).unwrap().pointer("/metadata/labels/a"),
            Some(&json!("b"))
        );
    }
}
