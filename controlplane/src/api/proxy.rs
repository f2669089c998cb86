//! The Pod subresources served by the node runtime: `log`, `exec`, `attach` and
//! `portforward`, proxied to the kubelet API of the Pod's node (plain HTTP on the Node's InternalIP and
//! `status.daemonEndpoints.kubeletEndpoint.Port`).
//!
//! - `GET pods/NAME/log` becomes `GET /containerLogs/NS/POD/CONTAINER?<same query>` and the
//!   node's answer is streamed back as it comes (`follow=true` stays open).
//! - `GET|POST pods/NAME/exec|attach` with an HTTP/1.1 `Upgrade` (WebSocket, as kubectl 1.37
//!   uses, or SPDY, passed through unchanged) becomes the same request on
//!   `/exec|attach/NS/POD/CONTAINER?<same query>` with the Upgrade, Connection,
//!   `Sec-WebSocket-*` and `X-Stream-Protocol-Version` headers; the node's 101 goes back to the
//!   client and bytes are then copied both ways until either side closes. Any other answer of
//!   the node is passed back as it is.
//! - `GET|POST pods/NAME/portforward` (WebSocket-tunnelled or plain SPDY, kubectl port-forward)
//!   becomes `/portForward/NS/POD?<same query>` the same way (no container: ports are the
//!   pod's).
//! - The container is `?container=`, else the `kubectl.kubernetes.io/default-container`
//!   annotation, else the only container (400 when the Pod has several).
//! - Errors say which step failed: Pod not scheduled or Node without an address (503), node
//!   unreachable (502).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{net::TcpStream, sync::mpsc};

use super::{
    handlers,
    http::{Body, Query},
    status::ApiError,
};
use crate::{
    api::ApiState,
    resources::{self, Resource, meta},
    store::Store,
};

/// The pod subresources proxied to the node.
pub(crate) const SUBRESOURCES: &[&str] = &["log", "exec", "attach", "portforward"];

const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Request headers forwarded to the node (besides Host, which names the node).
const FORWARDED: &[&str] = &[
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
    "accept",
    "content-type",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The container a request is for: `?container=`, the default-container annotation, or the
/// only container.
pub fn container_for(pod: &Value, requested: Option<&str>) -> Result<String, ApiError> {
    let name = meta::meta_str(pod, "name").unwrap_or("");
    let names_of = |field: &str| -> Vec<&str> {
        pod.pointer(field)
            .and_then(Value::as_array)
            .map(|cs| cs.iter().filter_map(|c| c.get("name").and_then(Value::as_str)).collect())
            .unwrap_or_default()
    };
    let names = names_of("/spec/containers");
    // Init containers have logs (and exec) too; they are never the default.
    let init_names = names_of("/spec/initContainers");
    let annotated = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
        .and_then(Value::as_str);
    let chosen = match (requested.filter(|c| !c.is_empty()), annotated, names.as_slice()) {
        (Some(c), _, _) => c,
        (None, Some(c), _) => c,
        (None, None, [only]) => only,
        (None, None, _) => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    if !names.contains(&chosen) && !init_names.contains(&chosen) {
        return Err(ApiError::bad_request(format!(
            "container {chosen} is not valid for pod {name}; its containers are: [{}]{}",
            names.join(" "),
            if init_names.is_empty() {
                String::new()
            } else {
                format!(" and its init containers: [{}]", init_names.join(" "))
            }
        )));
    }
    Ok(chosen.to_string())
}

/// The kubelet address of a Node: InternalIP and the kubelet endpoint port.
pub fn kubelet_address(node: &Value) -> Result<SocketAddr, ApiError> {
    let name = meta::meta_str(node, "name").unwrap_or("");
    let ip = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|addrs| {
            addrs.iter().find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
        })
        .and_then(|a| a.get("address").and_then(Value::as_str))
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .ok_or_else(|| {
            unavailable(format!(
                "node {name} has no InternalIP in status.addresses, so its node runtime cannot be reached"
            ))
        })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| {
            unavailable(format!(
                "node {name} reports no status.daemonEndpoints.kubeletEndpoint.Port, so its node runtime cannot be reached"
            ))
        })?;
    Ok(SocketAddr::new(ip, port as u16))
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", message)
}

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(502, "BadGateway", message)
}

/// Connects to a node runtime, from inside `netns` when given.
async fn connect(address: SocketAddr, netns: Option<PathBuf>) -> std::io::Result<TcpStream> {
    match netns {
        None => TcpStream::connect(address).await,
        Some(path) => {
            let stream = tokio::task::spawn_blocking(move || {
                crate::netns::connect_in(&path, address, CONNECT_TIMEOUT)
            })
            .await
            .map_err(std::io::Error::other)??;
            TcpStream::from_std(stream)
        }
    }
}

/// Proxies `pods/NAME/{log,exec,attach,portforward}` to the Pod's node.
pub(crate) async fn pod_subresource<S: Store>(
    state: &ApiState<S>,
    pods: &Resource,
    ns: &str,
    name: &str,
    sub: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let pod = handlers::get(state, pods, Some(ns), name).await?;
    let query = Query::parse(req.uri().query());
    // A port-forward reaches the pod's network namespace, not a container.
    let container = match sub {
        "portforward" => None,
        _ => Some(container_for(&pod, query.get("container"))?),
    };
    let node_name = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
    if node_name.is_empty() {
        return Err(unavailable(format!(
            "pod {name} is not scheduled to a node yet, so it has no {sub} to serve"
        )));
    }
    let nodes = resources::find("", "v1", "nodes").expect("nodes are served");
    let node = match handlers::get(state, nodes, None, node_name).await {
        Ok(node) => node,
        Err(err) if err.code == 404 => {
            return Err(unavailable(format!(
                "pod {name} is bound to node {node_name}, which does not exist"
            )));
        }
        Err(err) => return Err(err),
    };
    let address = kubelet_address(&node)?;
    let node_path = match (sub, container) {
        ("log", Some(container)) => format!("/containerLogs/{ns}/{name}/{container}"),
        (_, Some(container)) => format!("/{sub}/{ns}/{name}/{container}"),
        (_, None) => format!("/portForward/{ns}/{name}"),
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{node_path}?{q}"),
        None => node_path,
    };
    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect(address, state.config.node_netns.clone()),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            return Err(bad_gateway(format!(
                "the node runtime of node {node_name} at {address} is unreachable: {err}"
            )));
        }
        Err(_) => {
            return Err(bad_gateway(format!(
                "the node runtime of node {node_name} at {address} did not accept a connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| bad_gateway(format!("talking to the node runtime at {address}: {err}")))?;
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            log::debug!("node runtime connection ended: {err}");
        }
    });
    let mut forward = Request::builder()
        .method(req.method().clone())
        .uri(path_and_query)
        .header(header::HOST, address.to_string());
    for (key, value) in req.headers() {
        if FORWARDED.contains(&key.as_str()) {
            forward = forward.header(key, value);
        }
    }
    let forward = forward
        .body(Empty::<Bytes>::new())
        .map_err(|err| ApiError::bad_request(format!("the request cannot be forwarded: {err}")))?;
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let mut node_response = sender
        .send_request(forward)
        .await
        .map_err(|err| bad_gateway(format!("the node runtime at {address} failed: {err}")))?;
    let status = node_response.status();
    let mut response = Response::builder().status(status);
    for (key, value) in node_response.headers() {
        if key != header::TRANSFER_ENCODING && key != header::CONTENT_LENGTH {
            response = response.header(key, value);
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS && upgrading {
        let client_side = hyper::upgrade::on(req);
        let node_side = hyper::upgrade::on(&mut node_response);
        let sub = sub.to_string();
        tokio::spawn(async move {
            match tokio::try_join!(client_side, node_side) {
                Ok((client, node)) => {
                    let (mut client, mut node) = (TokioIo::new(client), TokioIo::new(node));
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
                }
                Err(err) => log::debug!("upgrading the {sub} stream failed: {err}"),
            }
        });
        return response
            .body(Body::Full(None))
            .map_err(|err| bad_gateway(format!("the node's answer cannot be relayed: {err}")));
    }
    // Stream the node's body as it comes (logs with follow=true never end on their own).
    let (tx, rx) = mpsc::channel(16);
    let mut body = node_response.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data()
                && tx.send(data).await.is_err()
            {
                break;
            }
        }
    });
    response
        .body(Body::Stream(rx))
        .map_err(|err| bad_gateway(format!("the node's answer cannot be relayed: {err}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_container_is_the_requested_the_annotated_or_the_only_one() {
        let one = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        assert_eq!(container_for(&one, None).unwrap(), "a");
        assert_eq!(container_for(&one, Some("a")).unwrap(), "a");
        assert_eq!(container_for(&one, Some("b")).unwrap_err().code, 400);
        let two = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let err = container_for(&two, None).unwrap_err();
        assert!(err.message.contains("choose one of: [a b]"), "{}", err.message);
        let mut annotated = two.clone();
        annotated["metadata"]["annotations"] = json!({DEFAULT_CONTAINER_ANNOTATION: "b"});
        assert_eq!(container_for(&annotated, None).unwrap(), "b");
        let init = json!({"metadata": {"name": "p"},
                          "spec": {"containers": [{"name": "a"}], "initContainers": [{"name": "i"}]}});
        assert_eq!(container_for(&init, None).unwrap(), "a");
        assert_eq!(container_for(&init, Some("i")).unwrap(), "i");
        let err = container_for(&init, Some("x")).unwrap_err();
        assert!(err.message.contains("init containers: [i]"), "{}", err.message);
    }

    #[test]
    fn kubelet_addresses_come_from_the_internal_ip_and_the_endpoint_port() {
        let node = json!({"metadata": {"name": "n"}, "status": {
            "addresses": [{"type": "Hostname", "address": "n"}, {"type": "InternalIP", "address": "10.0.0.2"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        assert_eq!(kubelet_address(&node).unwrap().to_string(), "10.0.0.2:10250");
        let mut no_port = node.clone();
        no_port["status"]["daemonEndpoints"] = json!({});
        let err = kubelet_address(&no_port).unwrap_err();
        assert_eq!(err.code, 503);
        assert!(err.message.contains("kubeletEndpoint.Port"), "{}", err.message);
        let no_ip = json!({"metadata": {"name": "n"}, "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 1}}}});
        assert!(kubelet_address(&no_ip).unwrap_err().message.contains("InternalIP"));
    }
}
