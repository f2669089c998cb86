#!/usr/bin/env python3
"""Generates controlplane/src/resources/protobuf_schema.rs: the protobuf field tables of the
kinds weir serves, for decoding kubectl's protobuf request bodies into JSON.

Sources (both in the local cargo registry, no network):
- k8s-pb (prost types generated from Kubernetes' generated.proto files): messages, field
  tags, wire types, message references.
- k8s-openapi (serde types): the exact JSON field names. prost snake-cases proto names
  (hostIPC -> host_ipc), so each JSON name is the k8s-openapi key that equals the snake name
  without underscores, case-insensitively.

Run: python3 controlplane/tools/protobuf_schema.py > controlplane/src/resources/protobuf_schema.rs
(then cargo fmt). A one-off code generator kept in Python because it only scans text.
"""
import glob, os, re, sys

REG = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))[0]
PB = glob.glob(REG + "k8s-pb-0.9.0/src")[0]
OPENAPI = glob.glob(REG + "k8s-openapi-0.29.0/src/v1_37")[0]

# (apiVersion, kind, module, message): the request bodies weir decodes.
ROOTS = [
    ("v1", "Namespace", "api::core::v1", "Namespace"),
    ("v1", "Node", "api::core::v1", "Node"),
    ("v1", "Pod", "api::core::v1", "Pod"),
    ("v1", "Service", "api::core::v1", "Service"),
    ("v1", "Endpoints", "api::core::v1", "Endpoints"),
    ("v1", "ConfigMap", "api::core::v1", "ConfigMap"),
    ("v1", "Event", "api::core::v1", "Event"),
    ("v1", "ServiceAccount", "api::core::v1", "ServiceAccount"),
    ("v1", "Binding", "api::core::v1", "Binding"),
    ("discovery.k8s.io/v1", "EndpointSlice", "api::discovery::v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy", "api::networking::v1", "NetworkPolicy"),
    ("apps/v1", "Deployment", "api::apps::v1", "Deployment"),
    ("apps/v1", "ReplicaSet", "api::apps::v1", "ReplicaSet"),
    ("autoscaling/v1", "Scale", "api::autoscaling::v1", "Scale"),
    ("meta.k8s.io/v1", "DeleteOptions", "apimachinery::pkg::apis::meta::v1", "DeleteOptions"),
    ("v1", "DeleteOptions", "apimachinery::pkg::apis::meta::v1", "DeleteOptions"),
]

# Messages with their own JSON form.
SPECIAL = {
    "apimachinery::pkg::apis::meta::v1::Time": "Time",
    "apimachinery::pkg::apis::meta::v1::MicroTime": "MicroTime",
    "apimachinery::pkg::apis::meta::v1::FieldsV1": "RawJson",
    "apimachinery::pkg::runtime::RawExtension": "RawJson",
    "apimachinery::pkg::util::intstr::IntOrString": "IntOrString",
    "apimachinery::pkg::api::resource::Quantity": "Quantity",
}

# Go pointer fields (*int32, *int64, *bool) whose zero value is meaningful; Go omits every
# other zero scalar from JSON, so the decoder drops zero scalars except these.
KEEP_ZERO = {
    "replicas", "revisionHistoryLimit", "progressDeadlineSeconds",
    "terminationGracePeriodSeconds", "activeDeadlineSeconds", "automountServiceAccountToken",
    "shareProcessNamespace", "priority", "enableServiceLinks", "setHostnameAsFQDN",
    "hostUsers", "privileged", "runAsUser", "runAsGroup", "runAsNonRoot",
    "readOnlyRootFilesystem", "allowPrivilegeEscalation", "fsGroup", "timeoutSeconds",
    "allocateLoadBalancerNodePorts", "ready", "serving", "terminating", "port", "endPort",
    "defaultMode", "mode", "optional", "immutable", "gracePeriodSeconds", "orphanDependents",
    "unschedulable", "seconds", "nanos",
}

# Fields k8s-pb has and k8s-openapi 0.29 does not know yet (so not evidence of inlining).
NEWER_THAN_OPENAPI = {"workloadRef"}

openapi_names = {}
for path in glob.glob(OPENAPI + "/**/*.rs", recursive=True):
    for name in re.findall(r'"([A-Za-z0-9$]+)" => Field::Key_', open(path).read()):
        openapi_names.setdefault(name.lower(), set()).add(name)


def json_name(snake, message):
    snake = snake.removeprefix("r#")
    candidates = openapi_names.get(snake.replace("_", "").lower(), set())
    if len(candidates) == 1:
        return next(iter(candidates))
    # Spelled differently in different types (DaemonEndpoint's `Port`, everyone else's
    # `port`): the spelling of this message's own k8s-openapi type.
    own = [c for c in sorted(candidates) if has_json_key(message, c)]
    if len(own) == 1:
        return own[0]
    parts = snake.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def openapi_file(message):
    """The k8s-openapi source of `message`, or None."""
    module, name = message.rsplit("::", 1)
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    path = os.path.join(OPENAPI, module.replace("::", "/"), snake + ".rs")
    return path if os.path.exists(path) else None


def has_json_key(message, key):
    """Whether k8s-openapi's type for `message` is known and has the JSON key."""
    path = openapi_file(message)
    return path is not None and f'"{key}" => Field::Key_' in open(path).read()


def is_json_key(message, key):
    """Whether k8s-openapi's type for `message` has the JSON key (true when unknown)."""
    return openapi_file(message) is None or has_json_key(message, key)


def module_of(path):
    rel = os.path.relpath(os.path.dirname(path), PB)
    return rel.replace("/", "::")


messages = {}  # "module::Name" -> list of (tag, snake, prost_kind, rust_type)
FIELD = re.compile(r'#\[prost\(([^\]]*?)\)\]\s*pub (?:r#)?(\w+):\s*(.*?),\n\s*(?:///|#\[|pub |\})', re.S)
for path in glob.glob(PB + "/**/mod.rs", recursive=True):
    module = module_of(path)
    text = open(path).read()
    for m in re.finditer(r'pub struct (\w+) \{(.*?)\n\}', text, re.S):
        body = m.group(2) + "\n}"
        fields = []
        for f in FIELD.finditer(body):
            fields.append((f.group(1), f.group(2), " ".join(f.group(3).split())))
        messages[f"{module}::{m.group(1)}"] = fields


def resolve(module, rust_type):
    # innermost type argument: the last path in the type text
    paths = re.findall(r'((?:super::)*(?:[a-z_0-9]+::)*[A-Z]\w*)', rust_type)
    paths = [p for p in paths if p not in ("Option", "Vec", "BTreeMap", "String")
             and not p.endswith(("::Option", "::Vec", "::BTreeMap", "::String"))]
    target = paths[-1]
    parts = module.split("::")
    segs = target.split("::")
    while segs and segs[0] == "super":
        parts = parts[:-1]
        segs = segs[1:]
    return "::".join(parts + segs) if len(segs) > 1 else "::".join(parts + segs)


SCALAR = {"string": "Str", "bool": "Bool", "int32": "I32", "int64": "I64"}
order, index = [], {}


def visit(name):
    if name in index or name in SPECIAL:
        return
    if name not in messages:
        sys.exit(f"unknown message {name}")
    index[name] = len(order)
    order.append(name)
    module = name.rsplit("::", 1)[0]
    out = []
    for attr, snake, rust_type in messages[name]:
        tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
        kind = attr.split(",")[0].strip()
        shape = "List" if "repeated" in attr else "One"
        if kind.startswith("btree_map"):
            shape = "Map"
            kind = attr.split('"')[1].split(",")[1].strip()
        if kind.startswith("bytes"):
            ty = "Bytes"
        elif kind in SCALAR:
            ty = SCALAR[kind]
        elif kind == "message":
            target = resolve(module, rust_type)
            if target in SPECIAL:
                ty = SPECIAL[target]
            else:
                visit(target)
                ty = ("Msg", target)
        else:
            sys.exit(f"unhandled prost kind {attr} in {name}")
        name_json = json_name(snake, name)
        if isinstance(ty, tuple) and shape == "One" and not is_json_key(name, name_json) \
                and name_json not in NEWER_THAN_OPENAPI:
            shape = "Inline"  # Go embeds it with `json:",inline"`
        out.append((tag, name_json, ty, shape))
    fields_of[name] = out


fields_of = {}
for _, _, module, msg in ROOTS:
    visit(f"{module}::{msg}")


def ty_text(ty):
    return f"Ty::Msg({index[ty[1]]})" if isinstance(ty, tuple) else f"Ty::{ty}"


print("//! Generated by controlplane/tools/protobuf_schema.py from k8s-pb 0.9.0 (field tags and")
print("//! types) and k8s-openapi 0.29 (JSON names); do not edit by hand.")
print("#![allow(clippy::all)]")
print("use super::protobuf::{Field, Message, Shape, Ty};")
print()
print("pub(super) static MESSAGES: &[Message] = &[")
for name in order:
    print(f"    Message {{ name: {name.rsplit('::', 1)[1]!r}, fields: &[".replace("'", '"'))
    for tag, js, ty, shape in fields_of[name]:
        keep = "true" if js in KEEP_ZERO else "false"
        print(f'        Field {{ tag: {tag}, json: "{js}", ty: {ty_text(ty)}, shape: Shape::{shape}, keep_zero: {keep} }},')
    print("    ]},")
print("];")
print()
print("/// (apiVersion, kind, index into MESSAGES) of the objects a request body may carry.")
print("pub(super) static KINDS: &[(&str, &str, usize)] = &[")
for api_version, kind, module, msg in ROOTS:
    print(f'    ("{api_version}", "{kind}", {index[module + "::" + msg]}),')
print("];")
