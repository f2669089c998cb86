//! Reads the objects the policy compiler needs from the API (one list of each kind).
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{Api, Client, api::ListParams};
use weir_policy::Cluster;

/// Namespaces, Pods, NetworkPolicies and Nodes, listed now.
pub async fn list_cluster(client: &Client) -> Result<Cluster, kube::Error> {
    let params = ListParams::default();
    let namespaces = Api::<Namespace>::all(client.clone()).list(&params).await?.items;
    let pods = Api::<Pod>::all(client.clone()).list(&params).await?.items;
    let policies = Api::<NetworkPolicy>::all(client.clone()).list(&params).await?.items;
    let nodes = Api::<Node>::all(client.clone()).list(&params).await?.items;
    Ok(Cluster::from_k8s(&namespaces, &pods, &policies, &nodes))
}
