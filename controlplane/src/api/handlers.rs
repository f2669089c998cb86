//! The resource verbs: get, list, watch (see `watch.rs`), create, update, patch, delete,
//! deletecollection, the status and binding subresources, server-side dry run and field
//! validation (`fieldValidation`: unknown and duplicate fields of create, update and patch
//! bodies are dropped with a warning, refused, or dropped silently).
//!
//! Field ownership: every create, update and patch records its field manager (`fieldManager`,
//! else the user agent's first word, as kube-apiserver derives it) in `metadata.managedFields`
//! as an `Update`; server-side apply (PATCH `application/apply-patch+yaml`) merges the applied
//! configuration, creates the object when it is missing, and answers 409 for fields another
//! manager owns unless `force=true` (see `resources::managed`).
//!
//! Objects are stored as JSON without `metadata.resourceVersion`; on the way out the store's
//! mod revision becomes the resourceVersion. Writes check the resourceVersion a client sends
//! against the stored one (409 Conflict when stale) and use the store's compare-and-swap, so
//! concurrent writers cannot lose updates. Every write of an object that exists goes through
//! [`read_modify_write`]: a swap lost to a concurrent writer reads again and retries, so 409
//! answers only a stale version or a precondition the client asked for.
use std::{collections::HashSet, sync::Arc};

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, body::Incoming, header};
use serde_json::{Value, json};

use super::{
    ApiState, MAX_BODY,
    http::{Body, Query, json_response, with_warnings},
    read_modify_write::{WriteError, read_modify_write},
    services,
    status::{ApiError, success},
    stored, table,
};
use crate::{
    resources::{
        self, RESOURCES, Resource, SYSTEM_NAMESPACES,
        fields::{self, FieldValidation},
        managed::{self, Managers, Scope, Writer},
        meta,
        patch::{self, PatchError},
        selector::{FieldSelector, LabelSelector, supported_fields},
        validate,
    },
    store::{KeyValue, Store, StoreError},
};

/// Which part of an object a write addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Main,
    Status,
    /// `spec.replicas` through the scale subresource (stored as a write of the main resource).
    Scale,
}

/// The media type of server-side apply patches.
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// How a write records field ownership in `metadata.managedFields`.
pub(crate) enum Ownership {
    /// An `Update` by this field manager (every write of a client but apply).
    Update(String),
    /// Server-side apply: the entries `managed::apply` computed.
    Applied(Managers),
    /// The server's own writes (controllers, bootstrap, bindings): the entries stay as they are.
    Unchanged,
}

/// The field-ownership view of a write of `part` by `manager`.
fn writer(resource: &Resource, part: Part, manager: &str) -> Writer {
    let main = Scope::Object { status_subresource: resource.has_status };
    let (subresource, scope) = match part {
        Part::Main => ("", main),
        Part::Status => ("status", Scope::Status),
        Part::Scale => ("scale", main),
    };
    Writer {
        manager: manager.to_string(),
        api_version: resource.api_version(),
        subresource: subresource.to_string(),
        scope,
    }
}

/// 422 for request options kube-apiserver refuses (`PatchOptions.meta.k8s.io "" is invalid:
/// …`).
fn invalid_options(options: &str, field: &str, reason: &'static str, message: &str) -> ApiError {
    let mut err = ApiError::new(
        422,
        "Invalid",
        format!("{options}.meta.k8s.io \"\" is invalid: {field}: {message}"),
    );
    err.details = Some(json!({"group": "meta.k8s.io", "kind": options,
        "causes": [{"reason": reason, "message": message, "field": field}]}));
    err
}

/// The field manager of a write: the `fieldManager` query parameter, else the user agent up to
/// its first '/' (`kubectl`, `kube-rs`), as kube-apiserver derives it. `options` names the
/// request's options kind for errors (CreateOptions, UpdateOptions, PatchOptions).
fn field_manager(query: &Query, user_agent: &str, options: &str) -> Result<String, ApiError> {
    let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
        let prefix = user_agent.split('/').next().unwrap_or("");
        return Ok(prefix.chars().filter(|c| !c.is_control()).take(128).collect());
    };
    if manager.len() > 128 {
        let message = "Too long: may not be more than 128 bytes";
        return Err(invalid_options(options, "fieldManager", "FieldValueTooLong", message));
    }
    if manager.chars().any(char::is_control) {
        let message = format!("Invalid value: {manager:?}: must only contain printable characters");
        return Err(invalid_options(options, "fieldManager", "FieldValueInvalid", &message));
    }
    Ok(manager.to_string())
}

/// The `force` query parameter of a PATCH: only apply patches may carry it (422 otherwise,
/// as kube-apiserver answers); true, false or absent.
fn force_flag(query: &Query, apply: bool) -> Result<bool, ApiError> {
    let Some(value) = query.get("force") else { return Ok(false) };
    if !apply {
        let message = "Forbidden: may not be specified for non-apply patch";
        return Err(invalid_options("PatchOptions", "force", "FieldValueForbidden", message));
    }
    match value {
        "true" | "True" | "TRUE" | "t" | "T" | "1" => Ok(true),
        "false" | "False" | "FALSE" | "f" | "F" | "0" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "force={other:?} is not a boolean; use force=true or force=false"
        ))),
    }
}

pub(crate) async fn resource_request<S: Store>(
    state: Arc<ApiState<S>>,
    req: Request<Incoming>,
    group: &str,
    version: &str,
    mut rest: Vec<String>,
) -> Result<Response<Body>, ApiError> {
    let mut query = Query::parse(req.uri().query());
    if rest.first().map(String::as_str) == Some("watch") {
        rest.remove(0);
        query = Query::parse(Some(&format!("{}&watch=true", req.uri().query().unwrap_or(""))));
    }
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && resources::find(group, version, &rest[2]).is_some_and(|r| r.namespaced);
    let (namespace, tail): (Option<String>, &[String]) =
        if namespaced_path { (Some(rest[1].clone()), &rest[2..]) } else { (None, &rest[..]) };
    let Some((plural, tail)) = tail.split_first() else { return Err(ApiError::no_route()) };
    let resource = resources::find(group, version, plural).ok_or_else(ApiError::no_route)?;
    let namespace = if resource.namespaced { namespace } else { None };
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).map(String::from);
    let wants_table = table::wants_table(accept.as_deref());
    let method = req.method().clone();
    let content_type = header_value(&req, header::CONTENT_TYPE);
    let ns = namespace.as_deref();
    match (tail, &method) {
        ([], &Method::GET) if query.flag("watch") => {
            super::watch::watch(state, resource, ns, &query, wants_table).await
        }
        ([], &Method::GET) => list(&state, resource, ns, &query, wants_table).await,
        ([], &Method::POST) => {
            require_namespace(resource, ns)?;
            let mode = query.field_validation()?;
            let user_agent = header_value(&req, header::USER_AGENT);
            let manager = field_manager(&query, &user_agent, "CreateOptions")?;
            let (mut body, duplicates) = read_json(req).await?;
            check_type(resource, &body)?;
            let warnings = check_fields(
                &resource.api_version(),
                resource.kind,
                &mut body,
                duplicates,
                &HashSet::new(),
                mode,
            )?;
            let ownership = Ownership::Update(manager);
            let (code, obj) =
                create(&state, resource, ns, body, query.dry_run(), &ownership).await?;
            Ok(with_warnings(json_response(code, &obj), &warnings))
        }
        ([], &Method::DELETE) => {
            require_namespace(resource, ns)?;
            delete_collection(&state, resource, ns, &query).await
        }
        ([name], &Method::GET) => {
            let obj = get(&state, resource, ns, name).await?;
            if wants_table {
                let rv = meta::meta_str(&obj, "resourceVersion").unwrap_or("").to_string();
                Ok(json_response(200, &table::table(resource, &[obj], &rv, None)))
            } else {
                Ok(json_response(200, &obj))
            }
        }
        ([name, sub], &Method::GET) if sub == "status" && resource.has_status => {
            Ok(json_response(200, &get(&state, resource, ns, name).await?))
        }
        ([name, sub], &Method::PUT | &Method::PATCH) if sub == "status" && resource.has_status => {
            write_request(&state, req, resource, ns, name, Part::Status, &query, &content_type)
                .await
        }
        ([name], &Method::PUT | &Method::PATCH) => {
            write_request(&state, req, resource, ns, name, Part::Main, &query, &content_type).await
        }
        ([name, sub], &Method::GET | &Method::PUT | &Method::PATCH)
            if sub == "scale" && matches!(resource.kind, "Deployment" | "ReplicaSet") =>
        {
            scale_request(&state, req, resource, ns, name, &query, &content_type).await
        }
        ([name], &Method::DELETE) => {
            let body = read_body(req).await?;
            let mut options: Value = if body.is_empty() { json!({}) } else { parse_json(&body)? };
            // DeleteOptions may also come as query parameters (kubectl sends a body).
            if options.get("gracePeriodSeconds").is_none()
                && let Some(grace) = query.get("gracePeriodSeconds")
            {
                let grace: i64 = grace.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "gracePeriodSeconds={grace:?} is not a whole number of seconds"
                    ))
                })?;
                options["gracePeriodSeconds"] = json!(grace);
            }
            let (code, obj) = delete(&state, resource, ns, name, &options, query.dry_run()).await?;
            Ok(json_response(code, &obj))
        }
        ([name, sub], &Method::POST) if sub == "binding" && resource.kind == "Pod" => {
            let mode = query.field_validation()?;
            let (mut body, duplicates) = read_json(req).await?;
            let warnings =
                check_fields("v1", "Binding", &mut body, duplicates, &HashSet::new(), mode)?;
            let response = bind(&state, resource, ns, name, body, query.dry_run()).await?;
            Ok(with_warnings(response, &warnings))
        }
        ([name, sub], &Method::GET | &Method::POST)
            if resource.kind == "Pod"
                && super::proxy::SUBRESOURCES.contains(&sub.as_str())
                && (sub != "log" || method == Method::GET) =>
        {
            let ns = ns.ok_or_else(ApiError::no_route)?;
            super::proxy::pod_subresource(&state, resource, ns, name, sub, req).await
        }
        ([_, _], _) => Err(ApiError::no_route()),
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

fn require_namespace(resource: &Resource, ns: Option<&str>) -> Result<(), ApiError> {
    if resource.namespaced && ns.is_none() {
        return Err(ApiError::method_not_allowed("POST/DELETE without a namespace"));
    }
    Ok(())
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY) {
        return Err(ApiError::too_large());
    }
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::too_large())
        }
        Err(err) => Err(ApiError::bad_request(format!("reading the request body failed: {err}"))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON: {err} (weir accepts application/json bodies)"
        ))
    })
}

/// Only JSON bodies are understood: protobuf and CBOR get 415, on which client-go retries
/// with JSON.
fn require_json(content_type: &str) -> Result<(), ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        "" | "application/json" | "*/*" => Ok(()),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

/// A header's value ("" when missing or not text).
fn header_value(req: &Request<Incoming>, name: header::HeaderName) -> String {
    req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// The body as JSON and the paths of the keys it repeats within an object (none for
/// protobuf, which has no repeated keys).
async fn read_json(req: Request<Incoming>) -> Result<(Value, Vec<String>), ApiError> {
    let content_type = header_value(&req, header::CONTENT_TYPE);
    if content_type.split(';').next().unwrap_or("").trim() == "application/vnd.kubernetes.protobuf"
    {
        // kubectl's typed commands (`kubectl create deployment|service|…`) send protobuf.
        let body = read_body(req).await?;
        let obj = resources::protobuf::to_json(&body).map_err(|err| match err {
            resources::protobuf::ProtobufError::Unsupported(_) => {
                ApiError::new(415, "UnsupportedMediaType", err.to_string())
            }
            other => ApiError::bad_request(other.to_string()),
        })?;
        return Ok((obj, Vec::new()));
    }
    require_json(&content_type)?;
    let body = read_body(req).await?;
    Ok((parse_json(&body)?, fields::duplicate_fields(&body)))
}

/// Applies `fieldValidation` to a body of `api_version`/`kind`: the fields the kind does not
/// have are dropped (but those in `kept`, which the stored object already had); under Strict
/// they, or keys the body repeats, refuse the request as kube-apiserver's strict decoder does;
/// under Warn each is one warning for the response.
fn check_fields(
    api_version: &str,
    kind: &str,
    obj: &mut Value,
    duplicates: Vec<String>,
    kept: &HashSet<String>,
    mode: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let unknown = fields::take_unknown_fields(api_version, kind, obj, kept);
    let problems: Vec<String> = duplicates
        .iter()
        .map(|path| format!("duplicate field {path:?}"))
        .chain(unknown.iter().map(|path| format!("unknown field {path:?}")))
        .collect();
    match mode {
        FieldValidation::Strict if !problems.is_empty() => {
            let version = api_version.rsplit('/').next().unwrap_or(api_version);
            Err(ApiError::bad_request(format!(
                "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                problems.join(", ")
            )))
        }
        FieldValidation::Ignore => Ok(Vec::new()),
        _ => Ok(problems),
    }
}

/// The stored object as clients see it.
pub(crate) fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut obj: Value = serde_json::from_slice(&kv.value).map_err(|err| {
        ApiError::internal(format!("stored object {} is not JSON: {err}", kv.key))
    })?;
    if obj.is_object() {
        meta::metadata_mut(&mut obj)
            .insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    }
    Ok(obj)
}

pub(crate) fn encode(obj: &Value) -> Bytes {
    let mut obj = obj.clone();
    if obj.is_object() {
        meta::metadata_mut(&mut obj).remove("resourceVersion");
    }
    Bytes::from(serde_json::to_vec(&obj).expect("JSON values serialize"))
}

pub(crate) async fn get<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    let kv = state
        .store
        .get(&resource.key(ns, name))
        .await?
        .ok_or_else(|| ApiError::not_found(resource, name))?;
    decode(&kv)
}

/// Parsed `labelSelector` and `fieldSelector`.
pub(crate) struct Selectors {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selectors {
    pub(crate) fn from_query(resource: &Resource, query: &Query) -> Result<Selectors, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(
            query.get("fieldSelector").unwrap_or(""),
            supported_fields(resource.kind),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Selectors { labels, fields })
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.fields().next().is_none()
    }

    /// Whether a stored object matches, parsing only the members the selectors read.
    pub(crate) fn matches_stored(&self, kv: &KeyValue) -> Result<bool, ApiError> {
        if self.is_empty() {
            return Ok(true);
        }
        let labels = (!self.labels.is_empty()).then_some("metadata.labels");
        let view = stored::selection_view(kv, labels.into_iter().chain(self.fields.fields()))?;
        Ok(self.matches(&view))
    }
}

fn encode_continue(key: &str, revision: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": 1, "start": key, "rv": revision}).to_string())
}

fn decode_continue(token: &str, prefix: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(format!("continue key {token:?} is not valid; list again without it"))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let start = value.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    if !start.starts_with(prefix) {
        return Err(bad());
    }
    Ok(start.to_string())
}

/// Lists matching objects: (items, revision, continue token).
pub(crate) async fn list_objects<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    selectors: &Selectors,
    limit: usize,
    continue_token: Option<&str>,
) -> Result<(Vec<Value>, i64, Option<String>), ApiError> {
    let (kvs, revision, next) =
        list_stored(&state.store, resource, ns, selectors, limit, continue_token).await?;
    let items = kvs.iter().map(decode).collect::<Result<_, _>>()?;
    Ok((items, revision, next))
}

/// Lists matching objects as stored: (items, revision, continue token).
pub(crate) async fn list_stored<S: Store>(
    store: &S,
    resource: &Resource,
    ns: Option<&str>,
    selectors: &Selectors,
    limit: usize,
    continue_token: Option<&str>,
) -> Result<(Vec<KeyValue>, i64, Option<String>), ApiError> {
    let prefix = resource.scope_prefix(ns);
    let mut after = continue_token.map(|t| decode_continue(t, &prefix)).transpose()?;
    let mut items = Vec::new();
    let mut revision = 0;
    let mut next = None;
    // Each round reads at least one key, so this ends; the bound guards against surprises.
    for _ in 0..1_000_000 {
        let want = if limit == 0 { 0 } else { (limit - items.len()).max(1) };
        let page = store.range(&prefix, after.as_deref(), want).await?;
        if revision == 0 {
            revision = page.revision;
        }
        if let Some(last) = page.kvs.last() {
            after = Some(last.key.clone());
        }
        for kv in page.kvs {
            if selectors.matches_stored(&kv)? {
                items.push(kv);
            }
        }
        if limit == 0 || !page.more {
            break;
        }
        if items.len() >= limit {
            next = after.as_deref().map(|k| encode_continue(k, revision));
            break;
        }
    }
    Ok((items, revision, next))
}

/// Objects per chunk of a streamed list body.
const LIST_CHUNK_ITEMS: usize = 256;

async fn list<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    query: &Query,
    wants_table: bool,
) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::from_query(resource, query)?;
    let limit = match query.get("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?
            .max(0) as usize,
    };
    let continue_token = query.get("continue").filter(|c| !c.is_empty());
    if wants_table {
        let (items, revision, next) =
            list_objects(state, resource, ns, &selectors, limit, continue_token).await?;
        let rv = revision.to_string();
        return Ok(json_response(200, &table::table(resource, &items, &rv, next.as_deref())));
    }
    let (items, revision, next) =
        list_stored(&state.store, resource, ns, &selectors, limit, continue_token).await?;
    Ok(stream_list(resource, items, revision, next))
}

/// The list body written from the stored bytes (see `stored.rs`) and streamed in chunks, so
/// neither a parsed tree nor the whole body is held in memory. An object that cannot be
/// written (stored bytes that are not JSON) aborts the response: the client sees a broken
/// transfer, never a truncated list that parses.
fn stream_list(
    resource: &Resource,
    items: Vec<KeyValue>,
    revision: i64,
    next: Option<String>,
) -> Response<Body> {
    let (head, tail) = stored::list_frame(
        &resource.api_version(),
        &resource.list_kind(),
        revision,
        next.as_deref(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut chunk = head;
        for (n, kv) in items.iter().enumerate() {
            if n > 0 {
                chunk.push(b',');
            }
            if let Err(err) = stored::write_object(kv, &mut chunk) {
                log::error!("list: {}", err.message);
                let _ = tx.send(Err(std::io::Error::other(err.message))).await;
                return;
            }
            if (n + 1) % LIST_CHUNK_ITEMS == 0 {
                let capacity = chunk.capacity();
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(capacity));
                if tx.send(Ok(Bytes::from(full))).await.is_err() {
                    return;
                }
            }
        }
        chunk.extend_from_slice(&tail);
        let _ = tx.send(Ok(Bytes::from(chunk))).await;
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::Chunks(rx))
        .expect("static headers are valid")
}

/// Checks apiVersion and kind of a body against the resource.
fn check_type(resource: &Resource, obj: &Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    let kind = obj.get("kind").and_then(Value::as_str);
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    match kind {
        None | Some("") => {
            return Err(ApiError::bad_request("Object 'Kind' is missing in the request body"));
        }
        Some(k) if k != resource.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the body ({k}) does not match the resource ({}, kind {})",
                resource.qualified(),
                resource.kind
            )));
        }
        _ => {}
    }
    match api_version {
        Some(v) if v == resource.api_version() => Ok(()),
        other => Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({})",
            other.unwrap_or(""),
            resource.api_version()
        ))),
    }
}

fn check_metadata_types(obj: &Value) -> Result<(), ApiError> {
    match obj.get("metadata") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::bad_request("metadata must be an object")),
    }
}

/// Defaults, validates and (for Services) allocates; `old` is the stored object on updates.
async fn admit<'a, S: Store>(
    state: &'a ApiState<S>,
    resource: &Resource,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<Option<tokio::sync::MutexGuard<'a, ()>>, ApiError> {
    validate::default(resource.kind, obj);
    let errors = validate::validate(resource.kind, obj);
    if !errors.is_empty() {
        return Err(ApiError::invalid(resource, name, &errors));
    }
    if resource.kind != "Service" {
        return Ok(None);
    }
    // Held until the caller stored the object and recorded it (`remember`), so two creates
    // cannot pick one address.
    let guard = state.alloc_lock.lock().await;
    let key = resource.key(meta::meta_str(obj, "namespace"), name);
    let allocations = state.allocations.lock().expect("allocations lock");
    services::allocate(obj, old, &allocations, &key)
        .map_err(|errs| ApiError::invalid(resource, name, &errs))?;
    Ok(Some(guard))
}

/// After a stored create or update: what a Service holds now.
fn remember<S: Store>(state: &ApiState<S>, kv: &KeyValue) {
    if !kv.key.starts_with(SERVICES_PREFIX) {
        return;
    }
    let held: services::Held = serde_json::from_slice(&kv.value).unwrap_or_default();
    if let Err(conflict) =
        state.allocations.lock().expect("allocations lock").record(&kv.key, &held, kv.mod_revision)
    {
        log::error!("service allocation: {conflict}");
    }
}

/// After a stored delete (`kv` as the store returns it, at the deletion's revision): what a
/// Service held is free again.
fn forget<S: Store>(state: &ApiState<S>, kv: &KeyValue) {
    if kv.key.starts_with(SERVICES_PREFIX) {
        state.allocations.lock().expect("allocations lock").release(&kv.key, kv.mod_revision);
    }
}

/// Where Services are stored (the allocations track the keys below it).
pub(crate) const SERVICES_PREFIX: &str = "/registry/core/services/";

/// Reconciles the allocations with the stored Services (at start and periodically, as
/// kube-apiserver's repair controllers). Reads every Service once; creates do not wait for it.
pub(crate) async fn repair_allocations<S: Store>(
    state: &ApiState<S>,
) -> Result<services::RepairReport, ApiError> {
    let page = state.store.range(SERVICES_PREFIX, None, 0).await?;
    let mut stored = Vec::with_capacity(page.kvs.len());
    for kv in page.kvs {
        let held: services::Held = serde_json::from_slice(&kv.value).map_err(|err| {
            ApiError::internal(format!("stored Service {} cannot be read: {err}", kv.key))
        })?;
        stored.push((kv.key, held, kv.mod_revision));
    }
    let report = state.allocations.lock().expect("allocations lock").repair(stored, page.revision);
    for conflict in &report.conflicts {
        log::error!("service allocation repair: {conflict}");
    }
    if report.recorded + report.released > 0 {
        log::info!(
            "service allocation repair: {} recorded, {} released",
            report.recorded,
            report.released
        );
    }
    Ok(report)
}

pub(crate) async fn create<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    mut obj: Value,
    dry_run: bool,
    ownership: &Ownership,
) -> Result<(u16, Value), ApiError> {
    check_type(resource, &obj)?;
    check_metadata_types(&obj)?;
    if let (Some(url_ns), Some(body_ns)) = (ns, meta::meta_str(&obj, "namespace"))
        && url_ns != body_ns
        && !body_ns.is_empty()
    {
        return Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({url_ns})"
        )));
    }
    let name = match (
        meta::meta_str(&obj, "name").filter(|n| !n.is_empty()),
        meta::meta_str(&obj, "generateName"),
    ) {
        (Some(name), _) => name.to_string(),
        (None, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", meta::name_suffix()),
        _ => {
            return Err(ApiError::invalid(
                resource,
                "",
                &[validate::FieldError {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
    };
    if let Err(why) = validate::name(resource.kind, &name) {
        return Err(ApiError::invalid(
            resource,
            &name,
            &[validate::FieldError {
                reason: "FieldValueInvalid",
                field: "metadata.name".into(),
                message: format!("Invalid value: {name:?}: {why}"),
            }],
        ));
    }
    if let Some(ns) = ns {
        let namespaces = resources::find("", "v1", "namespaces").expect("served");
        let Some(kv) = state.store.get(&namespaces.key(None, ns)).await? else {
            return Err(ApiError::not_found(namespaces, ns));
        };
        if meta::meta_str(&decode(&kv)?, "deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(
                resource,
                &name,
                &format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            ));
        }
    }
    let m = meta::metadata_mut(&mut obj);
    m.insert("name".into(), json!(name));
    if let Some(ns) = ns {
        m.insert("namespace".into(), json!(ns));
    } else {
        m.remove("namespace");
    }
    m.insert("uid".into(), json!(meta::new_uid()));
    m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
    if resources::has_generation(resource.kind) {
        m.insert("generation".into(), json!(1));
    } else {
        m.remove("generation");
    }
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        m.remove(field);
    }
    let map = obj.as_object_mut().expect("checked");
    if resource.has_status {
        match resource.kind {
            "Pod" => {
                map.insert("status".into(), json!({"phase": "Pending", "qosClass": "BestEffort"}));
            }
            "Namespace" => {
                map.insert("status".into(), json!({"phase": "Active"}));
            }
            "Node" => {}
            _ => {
                map.remove("status");
            }
        }
    }
    if resource.kind == "Namespace" {
        map.entry("spec").or_insert(json!({"finalizers": ["kubernetes"]}));
        let labels = meta::metadata_mut(&mut obj).entry("labels").or_insert(json!({}));
        if let Some(labels) = labels.as_object_mut() {
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
        }
    }
    let _guard = admit(state, resource, &name, &mut obj, None).await?;
    match ownership {
        Ownership::Update(manager) => {
            let mut managers = Managers::default();
            let writer = writer(resource, Part::Main, manager);
            managed::record_update(&mut managers, &json!({}), &obj, &writer, &meta::now_rfc3339());
            managers.store(&mut obj);
        }
        Ownership::Applied(managers) => managers.store(&mut obj),
        Ownership::Unchanged => {}
    }
    if dry_run {
        if state.store.get(&resource.key(ns, &name)).await?.is_some() {
            return Err(ApiError::already_exists(resource, &name));
        }
        return Ok((201, obj));
    }
    match state.store.create(&resource.key(ns, &name), encode(&obj)).await {
        Ok(kv) => {
            remember(state, &kv);
            Ok((201, decode(&kv)?))
        }
        Err(StoreError::AlreadyExists { .. }) => Err(ApiError::already_exists(resource, &name)),
        Err(err) => Err(err.into()),
    }
}

/// Creates an object unless it exists (bootstrap).
pub(crate) async fn create_if_missing<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    obj: Value,
) -> Result<(), ApiError> {
    let name = meta::meta_str(&obj, "name").unwrap_or("").to_string();
    if state.store.get(&resource.key(ns, &name)).await?.is_some() {
        return Ok(());
    }
    match create(state, resource, ns, obj, false, &Ownership::Unchanged).await {
        Ok(_) => Ok(()),
        Err(err) if err.code == 409 => Ok(()),
        Err(err) => Err(err),
    }
}

fn spec_like(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// Builds the object to store from what the client sent and what is stored.
fn merge_for_update(resource: &Resource, part: Part, old: &Value, mut new: Value) -> Value {
    if part == Part::Status {
        let mut merged = old.clone();
        if let Some(map) = merged.as_object_mut() {
            match new.get("status") {
                Some(status) => map.insert("status".into(), status.clone()),
                None => map.remove("status"),
            };
        }
        return merged;
    }
    let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
    let m = meta::metadata_mut(&mut new);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "name",
        "namespace",
    ] {
        match old_meta.get(field) {
            Some(v) => m.insert(field.into(), v.clone()),
            None => m.remove(field),
        };
    }
    m.remove("resourceVersion");
    m.remove("managedFields");
    if resources::has_generation(resource.kind) {
        let generation = old_meta.get("generation").and_then(Value::as_i64).unwrap_or(1);
        let changed = spec_like(old) != spec_like(&new);
        meta::metadata_mut(&mut new)
            .insert("generation".into(), json!(if changed { generation + 1 } else { generation }));
    } else {
        meta::metadata_mut(&mut new).remove("generation");
    }
    if resource.has_status
        && let Some(map) = new.as_object_mut()
    {
        match old.get("status") {
            Some(status) => map.insert("status".into(), status.clone()),
            None => map.remove("status"),
        };
    }
    new
}

fn strip_rv(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if copy.is_object() {
        meta::metadata_mut(&mut copy).remove("resourceVersion");
    }
    copy
}

/// Stores `new` over `current` (compare-and-swap on its revision), or deletes the object when
/// `new` removes its last finalizer while it is being deleted. One attempt of a
/// [`read_modify_write`]: a lost swap is [`WriteError::Raced`].
#[allow(clippy::too_many_arguments)]
async fn store_update<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    current: &KeyValue,
    new: Value,
    part: Part,
    dry_run: bool,
    ownership: &Ownership,
) -> Result<Value, WriteError> {
    let old = decode(current)?;
    check_type(resource, &new)?;
    check_metadata_types(&new)?;
    if let Some(body_name) = meta::meta_str(&new, "name")
        && body_name != name
    {
        let message = format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        );
        return Err(ApiError::bad_request(message).into());
    }
    let incoming = Managers::incoming(&new);
    let mut merged = merge_for_update(resource, part, &old, new);
    let _guard = admit(state, resource, name, &mut merged, Some(&old)).await?;
    record_fields(resource, part, ownership, incoming, &old, &mut merged);
    if strip_rv(&merged) == strip_rv(&old) {
        return Ok(old);
    }
    if dry_run {
        // As stored it would keep its version until written (what `kubectl diff` compares).
        meta::metadata_mut(&mut merged)
            .insert("resourceVersion".into(), json!(current.mod_revision.to_string()));
        return Ok(merged);
    }
    // Deleted by this update: an object being deleted whose last finalizer this update removes
    // (or that waited for finalizers alone, kube's `deletionGracePeriodSeconds: 0`). A Pod
    // terminating gracefully or a Terminating namespace stays when its status or labels are
    // written (kube-apiserver's ShouldDeleteDuringUpdate).
    let has_finalizers = |obj: &Value| {
        obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty())
    };
    let finalized = meta::meta_str(&merged, "deletionTimestamp").is_some()
        && !has_finalizers(&merged)
        && (has_finalizers(&old)
            || old.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64)
                == Some(0));
    let key = resource.key(ns, name);
    if finalized {
        let kv = state.store.delete(&key, Some(current.mod_revision)).await?;
        forget(state, &kv);
        cascade(state, resource, ns, &old, 0).await;
        return Ok(decode(&kv)?);
    }
    let kv = state.store.update(&key, encode(&merged), Some(current.mod_revision)).await?;
    remember(state, &kv);
    Ok(decode(&kv)?)
}

/// Sets the `managedFields` of `obj`, an update of `old` (see [`Ownership`]). A client's own
/// entries in the body replace the stored ones, `[{}]` drops them all, and absent, null or
/// `[]` keeps them, as kube-apiserver takes them; status and scale writes keep the stored ones.
fn record_fields(
    resource: &Resource,
    part: Part,
    ownership: &Ownership,
    incoming: managed::Incoming,
    old: &Value,
    obj: &mut Value,
) {
    let managers = match ownership {
        Ownership::Unchanged => Managers::of(old),
        Ownership::Applied(managers) => managers.clone(),
        Ownership::Update(manager) => {
            let mut base = match (part, incoming) {
                (Part::Main, managed::Incoming::Reset) => {
                    Managers::default().store(obj);
                    return;
                }
                (Part::Main, managed::Incoming::Replace(given)) => given,
                _ => Managers::of(old),
            };
            let writer = writer(resource, part, manager);
            managed::record_update(&mut base, old, obj, &writer, &meta::now_rfc3339());
            base
        }
    };
    managers.store(obj);
}

/// 409 when the object a write carries names another version than the stored one (an
/// update or patch conditional on `metadata.resourceVersion`).
fn check_resource_version(
    resource: &Resource,
    name: &str,
    obj: &Value,
    current: &KeyValue,
) -> Result<(), ApiError> {
    match body_resource_version(obj) {
        Some(rv) if rv != current.mod_revision => Err(ApiError::conflict(resource, name)),
        _ => Ok(()),
    }
}

fn body_resource_version(obj: &Value) -> Option<i64> {
    meta::meta_str(obj, "resourceVersion")
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(-1))
}

#[allow(clippy::too_many_arguments)]
async fn write_request<S: Store>(
    state: &ApiState<S>,
    req: Request<Incoming>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    part: Part,
    query: &Query,
    content_type: &str,
) -> Result<Response<Body>, ApiError> {
    let is_patch = req.method() == Method::PATCH;
    let mode = query.field_validation()?;
    let media = content_type.split(';').next().unwrap_or("").trim();
    let user_agent = header_value(&req, header::USER_AGENT);
    if is_patch && media == APPLY_PATCH {
        let force = force_flag(query, true)?;
        if query.get("fieldManager").is_none_or(str::is_empty) {
            let message = "Required value: is required for apply patch";
            return Err(invalid_options(
                "PatchOptions",
                "fieldManager",
                "FieldValueRequired",
                message,
            ));
        }
        let manager = field_manager(query, &user_agent, "PatchOptions")?;
        let body = read_body(req).await?;
        let request =
            ApplyRequest { part, manager: &manager, force, mode, dry_run: query.dry_run() };
        return apply_request(state, resource, ns, name, &request, &body).await;
    }
    if is_patch {
        force_flag(query, false)?;
    }
    let options = if is_patch { "PatchOptions" } else { "UpdateOptions" };
    let ownership = &Ownership::Update(field_manager(query, &user_agent, options)?);
    let body = read_body(req).await?;
    let dry_run = query.dry_run();
    let api_version = resource.api_version();
    if !is_patch {
        require_json(content_type)?;
        let mut new = parse_json(&body)?;
        check_type(resource, &new)?;
        let duplicates = fields::duplicate_fields(&body);
        let no_kept = HashSet::new();
        let warnings =
            check_fields(&api_version, resource.kind, &mut new, duplicates, &no_kept, mode)?;
        // Without a resourceVersion the update is unconditional: retried on a lost race.
        let new = &new;
        let obj = read_modify_write(&state.store, resource, ns, name, |current| async move {
            check_resource_version(resource, name, new, &current)?;
            let new = new.clone();
            store_update(state, resource, ns, name, &current, new, part, dry_run, ownership).await
        })
        .await?;
        return Ok(with_warnings(json_response(200, &obj), &warnings));
    }
    let patch_doc = &parse_json(&body)?;
    let (duplicates, api_version) = (&fields::duplicate_fields(&body), api_version.as_str());
    // Applied again to each fresh read when a concurrent writer won the swap; a patch that
    // carries metadata.resourceVersion is conditional on it (409 once the object moved on).
    let (obj, warnings) =
        read_modify_write(&state.store, resource, ns, name, |current| async move {
            let mut obj = decode(&current)?;
            // Unknown fields stored before validation existed are not this patch's doing.
            let kept: HashSet<String> = fields::take_unknown_fields(
                api_version,
                resource.kind,
                &mut obj.clone(),
                &HashSet::new(),
            )
            .into_iter()
            .collect();
            apply_patch(media, &mut obj, patch_doc)?;
            let warnings = check_fields(
                api_version,
                resource.kind,
                &mut obj,
                duplicates.clone(),
                &kept,
                mode,
            )?;
            check_resource_version(resource, name, &obj, &current)?;
            let obj =
                store_update(state, resource, ns, name, &current, obj, part, dry_run, ownership)
                    .await?;
            Ok((obj, warnings))
        })
        .await?;
    Ok(with_warnings(json_response(200, &obj), &warnings))
}

/// What a server-side apply asks for besides the configuration.
struct ApplyRequest<'a> {
    part: Part,
    manager: &'a str,
    force: bool,
    mode: FieldValidation,
    dry_run: bool,
}

/// An applied configuration: YAML, or JSON (which YAML includes, and which clients mostly
/// send); 400 with kube-apiserver's wording when it is neither, or not an object.
fn parse_applied(body: &[u8]) -> Result<Value, ApiError> {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(value) => value,
        Err(_) => serde_saphyr::from_slice::<Value>(body).map_err(|err| {
            let text = err.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            ApiError::bad_request(format!("error decoding YAML: {first}"))
        })?,
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "error decoding YAML: the applied configuration must be an object (a YAML mapping)",
        ));
    }
    Ok(value)
}

/// Server-side apply (PATCH `application/apply-patch+yaml`) of `body` to the object `name`:
/// created from the configuration when missing (201, main resource only), else merged into it
/// (200); 409 FieldManagerConflict for fields other managers own unless forced.
async fn apply_request<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    request: &ApplyRequest<'_>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let mut config = parse_applied(body)?;
    check_type(resource, &config)?;
    check_metadata_types(&config)?;
    if config.pointer("/metadata/managedFields").is_some_and(|m| !m.is_null()) {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    match meta::meta_str(&config, "name") {
        Some(body_name) if body_name != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        Some(_) => {}
        None => {
            meta::metadata_mut(&mut config).insert("name".into(), json!(name));
        }
    }
    if let (Some(url_ns), Some(body_ns)) = (ns, meta::meta_str(&config, "namespace"))
        && !body_ns.is_empty()
        && body_ns != url_ns
    {
        return Err(ApiError::bad_request(format!(
            "the namespace of the object ({body_ns}) does not match the namespace on the request ({url_ns})"
        )));
    }
    let warnings = check_fields(
        &resource.api_version(),
        resource.kind,
        &mut config,
        fields::duplicate_fields(body),
        &HashSet::new(),
        request.mode,
    )?;
    let writer = &writer(resource, request.part, request.manager);
    let (config, part, force, dry_run) = (&config, request.part, request.force, request.dry_run);
    // A missing object is created from the configuration, through the create path; one that
    // a concurrent create made first is applied to instead.
    if part == Part::Main && state.store.get(&resource.key(ns, name)).await?.is_none() {
        let now = meta::now_rfc3339();
        let (obj, managers) =
            managed::apply(None, config, &Managers::default(), writer, force, &now)
                .map_err(|err| apply_error(resource, err))?;
        let ownership = Ownership::Applied(managers);
        match create(state, resource, ns, obj, dry_run, &ownership).await {
            Err(err) if err.reason == "AlreadyExists" => {}
            created => {
                let (code, obj) = created?;
                return Ok(with_warnings(json_response(code, &obj), &warnings));
            }
        }
    }
    let obj = read_modify_write(&state.store, resource, ns, name, |current| async move {
        check_resource_version(resource, name, config, &current)?;
        let live = decode(&current)?;
        let now = meta::now_rfc3339();
        let (merged, managers) =
            managed::apply(Some(&live), config, &Managers::of(&live), writer, force, &now)
                .map_err(|err| apply_error(resource, err))?;
        let ownership = Ownership::Applied(managers);
        store_update(state, resource, ns, name, &current, merged, part, dry_run, &ownership).await
    })
    .await?;
    Ok(with_warnings(json_response(200, &obj), &warnings))
}

/// kube-apiserver's answers for a failed apply: 409 Conflict with one FieldManagerConflict
/// cause per field, which kubectl prints with its advice on `--force-conflicts`.
fn apply_error(resource: &Resource, err: managed::ApplyError) -> ApiError {
    match &err {
        managed::ApplyError::Conflicts(conflicts) => {
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {}", c.manager), "field": c.path}))
                .collect();
            let mut api = ApiError::new(409, "Conflict", err.to_string());
            api.details = Some(json!({"causes": causes}));
            api
        }
        managed::ApplyError::Invalid(why) => ApiError::bad_request(format!(
            "failed to create typed patch object ({}, Kind={}): {why}",
            resource.api_version(),
            resource.kind
        )),
    }
}

/// Applies a patch of the request's media type to `obj`: 415 for another media type, 400 for
/// a malformed patch, 422 for a JSON patch operation that fails.
fn apply_patch(media: &str, obj: &mut Value, patch_doc: &Value) -> Result<(), ApiError> {
    let result = match media {
        "application/merge-patch+json" => {
            patch::merge_patch(obj, patch_doc);
            Ok(())
        }
        "application/json-patch+json" => patch::json_patch(obj, patch_doc),
        "application/strategic-merge-patch+json" => patch::strategic_merge_patch(obj, patch_doc),
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    result.map_err(|err| match err {
        PatchError::Invalid(_) => ApiError::bad_request(err.to_string()),
        PatchError::OperationFailed { .. } => ApiError::new(422, "Invalid", err.to_string()),
    })
}

/// What a deletion did.
enum Deletion {
    /// The object stays (marked for a graceful or finalized deletion, or a dry run): the
    /// code and the object.
    Kept(u16, Value),
    /// The object is gone: its last state.
    Removed(Value),
}

/// Deletes one object: immediately, or by marking it when finalizers remain or a Pod
/// terminates gracefully. Retried on a fresh read when a concurrent writer wins the swap
/// (kube-apiserver's deletes never answer 409 for that); `preconditions` (uid,
/// resourceVersion) are checked against each read (409).
pub(crate) async fn delete<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    options: &Value,
    dry_run: bool,
) -> Result<(u16, Value), ApiError> {
    if resource.kind == "Namespace" && SYSTEM_NAMESPACES.contains(&name) {
        return Err(ApiError::forbidden(resource, name, "this namespace may not be deleted"));
    }
    let deletion = read_modify_write(&state.store, resource, ns, name, |current| async move {
        delete_attempt(state, resource, name, options, dry_run, current).await
    })
    .await?;
    match deletion {
        Deletion::Kept(code, obj) => Ok((code, obj)),
        Deletion::Removed(deleted) => {
            let orphan = options.get("propagationPolicy").and_then(Value::as_str) == Some("Orphan")
                || options.get("orphanDependents").and_then(Value::as_bool) == Some(true);
            if !orphan {
                cascade(state, resource, ns, &deleted, 0).await;
            }
            Ok((200, deleted))
        }
    }
}

/// One attempt of [`delete`] on the object as read.
async fn delete_attempt<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    name: &str,
    options: &Value,
    dry_run: bool,
    current: KeyValue,
) -> Result<Deletion, WriteError> {
    let obj = decode(&current)?;
    if let Some(pre) = options.get("preconditions") {
        let uid_ok = pre
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(|u| Some(u) == meta::meta_str(&obj, "uid"));
        let rv_ok = pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(|rv| rv == current.mod_revision.to_string());
        if !uid_ok || !rv_ok {
            return Err(ApiError::conflict(resource, name).into());
        }
    }
    if dry_run {
        return Ok(Deletion::Kept(200, obj));
    }
    if resource.kind == "Pod"
        && let Some(grace) = pod_grace_period(state, &obj, options).await?
    {
        let (code, obj) = mark_terminating(state, &current, obj, grace).await?;
        return Ok(Deletion::Kept(code, obj));
    }
    let finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if finalizers {
        if meta::meta_str(&obj, "deletionTimestamp").is_some() {
            return Ok(Deletion::Kept(202, obj));
        }
        let mut marked = strip_rv(&obj);
        let m = meta::metadata_mut(&mut marked);
        m.insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
        m.insert("deletionGracePeriodSeconds".into(), json!(0));
        let kv =
            state.store.update(&current.key, encode(&marked), Some(current.mod_revision)).await?;
        return Ok(Deletion::Kept(202, decode(&kv)?));
    }
    if resource.kind == "Namespace" {
        // Like kube-apiserver: the namespace turns Terminating now; the namespace finalizer
        // (finalize_namespaces) deletes its contents and then the namespace.
        if meta::meta_str(&obj, "deletionTimestamp").is_some() {
            return Ok(Deletion::Kept(200, obj));
        }
        let mut marked = strip_rv(&obj);
        meta::metadata_mut(&mut marked)
            .insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
        marked["status"] = json!({"phase": "Terminating"});
        let kv =
            state.store.update(&current.key, encode(&marked), Some(current.mod_revision)).await?;
        return Ok(Deletion::Kept(200, decode(&kv)?));
    }
    let kv = state.store.delete(&current.key, Some(current.mod_revision)).await?;
    forget(state, &kv);
    Ok(Deletion::Removed(decode(&kv)?))
}

/// Graceful Pod deletion: sets `deletionTimestamp` (now + grace) and
/// `deletionGracePeriodSeconds` and keeps the Pod; the node runtime stops its containers and
/// deletes it again with a grace period of 0. A later request may only shorten the period.
/// One attempt of a [`read_modify_write`] on `current`.
async fn mark_terminating<S: Store>(
    state: &ApiState<S>,
    current: &KeyValue,
    obj: Value,
    grace: i64,
) -> Result<(u16, Value), WriteError> {
    let old_grace = obj.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64);
    if old_grace.is_some_and(|old| old <= grace) {
        return Ok((200, obj));
    }
    let mut marked = strip_rv(&obj);
    let m = meta::metadata_mut(&mut marked);
    m.insert("deletionTimestamp".into(), json!(meta::rfc3339(meta::now_secs() + grace)));
    m.insert("deletionGracePeriodSeconds".into(), json!(grace));
    let kv = state.store.update(&current.key, encode(&marked), Some(current.mod_revision)).await?;
    Ok((200, decode(&kv)?))
}

/// The grace period a Pod's deletion gets, or None when it is removed at once: Pods not bound
/// to a Node (or bound to one that does not exist, as Kubernetes' pod GC would remove them),
/// finished Pods, and a grace period of 0 (`--grace-period=0 --force`, or the node runtime
/// once the containers are stopped). Otherwise the request's `gracePeriodSeconds`, else
/// `spec.terminationGracePeriodSeconds`, else 30.
async fn pod_grace_period<S: Store>(
    state: &ApiState<S>,
    pod: &Value,
    options: &Value,
) -> Result<Option<i64>, ApiError> {
    let grace = match options.get("gracePeriodSeconds") {
        None | Some(Value::Null) => {
            pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(30)
        }
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("gracePeriodSeconds {v} is not a whole number"))
        })?,
    };
    let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
    let finished = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if grace <= 0 || node.is_empty() || finished {
        return Ok(None);
    }
    let nodes = resources::find("", "v1", "nodes").expect("nodes are served");
    if state.store.get(&nodes.key(None, node)).await?.is_none() {
        return Ok(None);
    }
    Ok(Some(grace))
}

/// Finishes the deletion of Terminating namespaces: deletes their contents, then them. Run
/// periodically by the server (so it also resumes after a restart).
pub(crate) async fn finalize_namespaces<S: Store>(state: &ApiState<S>) -> Result<(), ApiError> {
    let namespaces = resources::find("", "v1", "namespaces").expect("served");
    let page = state.store.range(&namespaces.prefix(), None, 0).await?;
    for kv in page.kvs {
        let obj = decode(&kv)?;
        if meta::meta_str(&obj, "deletionTimestamp").is_none() {
            continue;
        }
        let name = meta::meta_str(&obj, "name").unwrap_or("").to_string();
        delete_namespace_contents(state, &name).await?;
        let deleted =
            read_modify_write(&state.store, namespaces, None, &name, |current| async move {
                state.store.delete(&current.key, Some(current.mod_revision)).await?;
                Ok(())
            })
            .await;
        match deleted {
            // Gone already, or still changing: the next round finishes it.
            Ok(()) => {}
            Err(err) if err.code == 404 || err.code == 409 => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

async fn delete_namespace_contents<S: Store>(
    state: &ApiState<S>,
    ns: &str,
) -> Result<(), ApiError> {
    for resource in RESOURCES.iter().filter(|r| r.namespaced) {
        let page = state.store.range(&resource.scope_prefix(Some(ns)), None, 0).await?;
        for kv in page.kvs {
            match state.store.delete(&kv.key, None).await {
                Ok(deleted) => forget(state, &deleted),
                Err(StoreError::NotFound { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(())
}

/// Deletes the objects `owner` owns (ownerReferences by uid), in its namespace, recursively.
/// Best-effort: what cannot be deleted now stays (there is no garbage collector to retry).
async fn cascade<S: Store>(
    state: &ApiState<S>,
    _resource: &Resource,
    ns: Option<&str>,
    owner: &Value,
    depth: u32,
) {
    let (Some(ns), Some(uid)) = (ns, meta::meta_str(owner, "uid")) else { return };
    if depth > 8 {
        return;
    }
    let owned_by_it = |obj: &Value| {
        obj.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
            refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
        })
    };
    for resource in RESOURCES.iter().filter(|r| r.namespaced) {
        let Ok(page) = state.store.range(&resource.scope_prefix(Some(ns)), None, 0).await else {
            continue;
        };
        for kv in page.kvs {
            let Ok(obj) = decode(&kv) else { continue };
            let Some(name) = meta::meta_str(&obj, "name").filter(|_| owned_by_it(&obj)) else {
                continue;
            };
            let removed =
                read_modify_write(&state.store, resource, Some(ns), name, |current| async move {
                    let obj = decode(&current)?;
                    if !owned_by_it(&obj) {
                        return Ok(None);
                    }
                    // Pods on a node terminate gracefully, as Kubernetes' garbage collector
                    // deletes.
                    if resource.kind == "Pod"
                        && let Some(grace) = pod_grace_period(state, &obj, &json!({})).await?
                    {
                        mark_terminating(state, &current, obj, grace).await?;
                        return Ok(None);
                    }
                    let deleted =
                        state.store.delete(&current.key, Some(current.mod_revision)).await?;
                    forget(state, &deleted);
                    Ok(Some(decode(&deleted)?))
                })
                .await;
            if let Ok(Some(deleted)) = removed {
                Box::pin(cascade(state, resource, Some(ns), &deleted, depth + 1)).await;
            }
        }
    }
}

async fn delete_collection<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::from_query(resource, query)?;
    let (items, revision, _) = list_objects(state, resource, ns, &selectors, 0, None).await?;
    let mut deleted = Vec::new();
    for obj in items {
        let name = meta::meta_str(&obj, "name").unwrap_or("").to_string();
        let item_ns = meta::meta_str(&obj, "namespace").map(String::from);
        match delete(state, resource, item_ns.as_deref(), &name, &json!({}), query.dry_run()).await
        {
            Ok((_, obj)) => deleted.push(obj),
            Err(err) if err.code == 404 || err.code == 403 => {}
            Err(err) => return Err(err),
        }
    }
    Ok(json_response(
        200,
        &json!({"kind": resource.list_kind(), "apiVersion": resource.api_version(), "metadata": {"resourceVersion": revision.to_string()}, "items": deleted}),
    ))
}

/// The autoscaling/v1 Scale view of a Deployment or ReplicaSet.
fn to_scale(obj: &Value) -> Value {
    let selector: Vec<String> = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    let m = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"), "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector.join(","),
        },
    })
}

/// GET, PUT and PATCH of the `scale` subresource: reads and sets `spec.replicas`.
#[allow(clippy::too_many_arguments)]
async fn scale_request<S: Store>(
    state: &ApiState<S>,
    req: Request<Incoming>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    query: &Query,
    content_type: &str,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    if method == Method::GET {
        return Ok(json_response(200, &to_scale(&get(state, resource, ns, name).await?)));
    }
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == APPLY_PATCH {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "server-side apply is not supported on the scale subresource of {}; apply \
                 spec.replicas on the {} itself, or use kubectl scale (a merge patch)",
                resource.qualified(),
                resource.kind
            ),
        ));
    }
    let mode = query.field_validation()?;
    let put = method == Method::PUT;
    if !put {
        force_flag(query, false)?;
    }
    let user_agent = header_value(&req, header::USER_AGENT);
    let options = if put { "UpdateOptions" } else { "PatchOptions" };
    let ownership = &Ownership::Update(field_manager(query, &user_agent, options)?);
    let raw = read_body(req).await?;
    let body = &parse_json(&raw)?;
    let duplicates = &fields::duplicate_fields(&raw);
    let dry_run = query.dry_run();
    let (stored, warnings) =
        read_modify_write(&state.store, resource, ns, name, |current| async move {
            let obj = decode(&current)?;
            let mut scale = if put {
                body.clone()
            } else {
                let mut scale = to_scale(&obj);
                apply_patch(media, &mut scale, body)?;
                scale
            };
            // A Scale (or a patch of it) that names a resourceVersion is conditional on it.
            check_resource_version(resource, name, &scale, &current)?;
            let warnings = check_fields(
                "autoscaling/v1",
                "Scale",
                &mut scale,
                duplicates.clone(),
                &HashSet::new(),
                mode,
            )?;
            let replicas = scale
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .filter(|r| *r >= 0)
                .ok_or_else(|| {
                    ApiError::invalid(
                        resource,
                        name,
                        &[validate::FieldError {
                            reason: "FieldValueInvalid",
                            field: "spec.replicas".into(),
                            message: "Invalid value: must be greater than or equal to 0".into(),
                        }],
                    )
                })?;
            let mut updated = obj;
            updated["spec"]["replicas"] = json!(replicas);
            let stored = store_update(
                state,
                resource,
                ns,
                name,
                &current,
                updated,
                Part::Scale,
                dry_run,
                ownership,
            )
            .await?;
            Ok((stored, warnings))
        })
        .await?;
    Ok(with_warnings(json_response(200, &to_scale(&stored)), &warnings))
}

/// POST pods/NAME/binding: sets spec.nodeName once (409 when already bound, also when another
/// binding won the race).
async fn bind<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    binding: Value,
    dry_run: bool,
) -> Result<Response<Body>, ApiError> {
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("a Binding needs target.name (the node)"))?;
    read_modify_write(&state.store, resource, ns, name, |current| async move {
        let mut obj = decode(&current)?;
        if obj.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty()) {
            let message = format!("pod {name} is already assigned to a node");
            return Err(ApiError::new(409, "Conflict", message).into());
        }
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("nodeName".into(), json!(node));
        }
        let ownership = &Ownership::Unchanged;
        store_update(state, resource, ns, name, &current, obj, Part::Main, dry_run, ownership).await
    })
    .await?;
    Ok(json_response(201, &success()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, embedded::tests::TempDir};

    /// Pods in two namespaces with labels, nodes and phases to select by, some updated and
    /// some deleted so revisions are not in key order.
    async fn pod_store(dir: &TempDir) -> EmbeddedStore {
        let store = EmbeddedStore::open(&dir.0, Default::default()).unwrap();
        let pods = resources::find("", "v1", "pods").unwrap();
        for i in 0..90 {
            let ns = ["default", "other"][i % 2];
            let name = format!("p{i:03}");
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "uid": format!("u{i}"),
                    "annotations": {"note": "}{\"],[ \u{e9}"}},
                "spec": {"nodeName": format!("n{}", i % 5), "containers": [{"name": "c", "image": "i"}]},
                "status": {"phase": if i % 7 == 0 { "Running" } else { "Pending" }}});
            if i % 10 != 0 {
                let app = ["web", "db", "cache"][i % 3];
                pod["metadata"]["labels"] = json!({"app": app,
                    "tier": if i % 4 == 0 { "front" } else { "back" }});
            }
            store.create(&pods.key(Some(ns), &name), encode(&pod)).await.unwrap();
        }
        for i in (0..90).step_by(9) {
            let key = pods.key(Some(["default", "other"][i % 2]), &format!("p{i:03}"));
            let kv = store.get(&key).await.unwrap().unwrap();
            let mut pod = decode(&kv).unwrap();
            if i % 2 == 0 {
                pod["status"]["phase"] = json!("Running");
                store.update(&key, encode(&pod), None).await.unwrap();
            } else {
                store.delete(&key, None).await.unwrap();
            }
        }
        store
    }

    const SELECTORS: &[&str] = &[
        "",
        "labelSelector=app=web",
        "labelSelector=app+in+(db,cache),tier!=front",
        "labelSelector=!app",
        "labelSelector=tier",
        "fieldSelector=spec.nodeName=n2",
        "fieldSelector=status.phase!=Pending,metadata.namespace=default",
        "labelSelector=app=db&fieldSelector=spec.nodeName=n3",
        "fieldSelector=metadata.name=p042",
        "labelSelector=app=nothing",
    ];

    /// Every page of the streamed, spliced list body is byte for byte the list the parsed path
    /// built (items decoded, selected on the whole object, serialised as one tree), and the
    /// pages together are exactly the matching objects in key order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_lists_page_and_select_like_the_parsed_path() {
        let dir = TempDir::new("lists");
        let store = pod_store(&dir).await;
        let pods = resources::find("", "v1", "pods").unwrap();
        for query in SELECTORS {
            let selectors = Selectors::from_query(pods, &Query::parse(Some(query))).unwrap();
            for ns in [None, Some("default")] {
                let all = store.range(&pods.scope_prefix(ns), None, 0).await.unwrap();
                let expected: Vec<Value> = all
                    .kvs
                    .iter()
                    .map(|kv| decode(kv).unwrap())
                    .filter(|obj| selectors.matches(obj))
                    .collect();
                for limit in [0, 1, 4, 7, 500] {
                    let mut seen = Vec::new();
                    let mut token: Option<String> = None;
                    for _page in 0..200 {
                        let (items, revision, next) =
                            list_stored(&store, pods, ns, &selectors, limit, token.as_deref())
                                .await
                                .unwrap();
                        assert_eq!(revision, all.revision);
                        assert!(limit == 0 || items.len() <= limit);
                        let decoded: Vec<Value> =
                            items.iter().map(|kv| decode(kv).unwrap()).collect();
                        let mut metadata = json!({"resourceVersion": revision.to_string()});
                        if let Some(next) = &next {
                            metadata["continue"] = json!(next);
                            assert_eq!(
                                decode_continue(next, &pods.scope_prefix(ns)).unwrap(),
                                items.last().unwrap().key
                            );
                        }
                        let mut old = serde_json::to_vec(&json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": decoded})).unwrap();
                        old.push(b'\n');
                        let body = stream_list(pods, items, revision, next.clone())
                            .into_body()
                            .collect()
                            .await
                            .unwrap()
                            .to_bytes();
                        assert_eq!(
                            String::from_utf8_lossy(&body),
                            String::from_utf8_lossy(&old),
                            "{query} ns={ns:?} limit={limit}"
                        );
                        seen.extend(decoded);
                        token = next;
                        if token.is_none() {
                            break;
                        }
                    }
                    assert!(token.is_none(), "{query}: paging did not end");
                    assert_eq!(seen, expected, "{query} ns={ns:?} limit={limit}");
                }
            }
        }
    }

    /// Big lists come in several chunks and still form one body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_lists_stream_in_chunks() {
        let dir = TempDir::new("chunks");
        let store = EmbeddedStore::open(&dir.0, Default::default()).unwrap();
        let cms = resources::find("", "v1", "configmaps").unwrap();
        let count = LIST_CHUNK_ITEMS * 2 + 3;
        for i in 0..count {
            let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i:04}"), "namespace": "default"}});
            store
                .create(&cms.key(Some("default"), &format!("c{i:04}")), encode(&cm))
                .await
                .unwrap();
        }
        let selectors = Selectors::from_query(cms, &Query::parse(None)).unwrap();
        let (items, revision, next) =
            list_stored(&store, cms, Some("default"), &selectors, 0, None).await.unwrap();
        let mut body = stream_list(cms, items, revision, next).into_body();
        let mut chunks = 0;
        let mut whole = Vec::new();
        while let Some(frame) = body.frame().await {
            whole.extend_from_slice(&frame.unwrap().into_data().unwrap());
            chunks += 1;
        }
        assert_eq!(chunks, 3);
        let list: Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), count);
        assert_eq!(list["items"][5]["metadata"]["resourceVersion"], json!("6"));
    }

    /// Watch translation on stored bytes (selection views) gives the events the parsed objects
    /// give, for every selector and every kind of transition.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_translation_selects_like_the_parsed_objects() {
        use crate::store::{Event, EventKind};
        let dir = TempDir::new("translate");
        let store = pod_store(&dir).await;
        let pods = resources::find("", "v1", "pods").unwrap();
        let mut events = store.watch(&pods.prefix(), 0).await.unwrap();
        let mut checked = 0;
        while let Ok(event) = events.try_recv() {
            for query in SELECTORS {
                let selectors = Selectors::from_query(pods, &Query::parse(Some(query))).unwrap();
                let parsed = |kv: &KeyValue| selectors.matches(&decode(kv).unwrap());
                let before = event.prev.as_ref().is_some_and(parsed);
                let expected = match (event.kind, before, parsed(&event.kv)) {
                    (EventKind::Delete, true, _) => Some("DELETED"),
                    (EventKind::Delete, false, _) => None,
                    (EventKind::Put, false, true) => Some("ADDED"),
                    (EventKind::Put, true, true) => Some("MODIFIED"),
                    (EventKind::Put, true, false) => Some("DELETED"),
                    (EventKind::Put, false, false) => None,
                };
                let got =
                    super::super::watch::translate(&Event::clone(&event), &selectors).unwrap();
                assert_eq!(got, expected, "{query} {:?}", event.kv.key);
                checked += 1;
            }
        }
        assert!(checked > 900, "{checked}");
    }

    #[test]
    fn updates_keep_identity_and_status_and_bump_generation_on_spec_changes() {
        let deploy = resources::find("apps", "v1", "deployments").unwrap();
        let old = json!({"metadata": {"name": "d", "uid": "u1", "creationTimestamp": "t", "generation": 2, "resourceVersion": "5"}, "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let new = json!({"metadata": {"name": "d", "uid": "forged", "labels": {"a": "b"}}, "spec": {"replicas": 3}, "status": {"replicas": 99}});
        let merged = merge_for_update(deploy, Part::Main, &old, new);
        assert_eq!(merged.pointer("/metadata/uid"), Some(&json!("u1")));
        assert_eq!(merged.pointer("/metadata/generation"), Some(&json!(3)));
        assert_eq!(merged.pointer("/status/replicas"), Some(&json!(1)));
        assert_eq!(merged.pointer("/metadata/labels/a"), Some(&json!("b")));
        let status = merge_for_update(
            deploy,
            Part::Status,
            &old,
            json!({"spec": {"replicas": 7}, "status": {"replicas": 2}}),
        );
        assert_eq!(status.pointer("/spec/replicas"), Some(&json!(1)));
        assert_eq!(status.pointer("/status/replicas"), Some(&json!(2)));
    }

    #[test]
    fn continue_tokens_round_trip_and_stay_in_their_prefix() {
        let token = encode_continue("/registry/core/pods/default/b", 7);
        assert_eq!(
            decode_continue(&token, "/registry/core/pods/").unwrap(),
            "/registry/core/pods/default/b"
        );
        assert!(decode_continue(&token, "/registry/core/services/").is_err());
        assert!(decode_continue("garbage!", "/").is_err());
    }

    #[test]
    fn bodies_must_name_the_right_kind_and_version() {
        let pods = resources::find("", "v1", "pods").unwrap();
        assert!(check_type(pods, &json!({"apiVersion": "v1", "kind": "Pod"})).is_ok());
        assert_eq!(
            check_type(pods, &json!({"apiVersion": "v1", "kind": "Service"})).unwrap_err().code,
            400
        );
        assert_eq!(
            check_type(pods, &json!({"apiVersion": "apps/v1", "kind": "Pod"})).unwrap_err().code,
            400
        );
        assert_eq!(check_type(pods, &json!({"apiVersion": "v1"})).unwrap_err().code, 400);
        assert_eq!(check_type(pods, &json!([1])).unwrap_err().code, 400);
    }
}
