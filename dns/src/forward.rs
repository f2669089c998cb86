//! Forwarding names outside the cluster domain to upstream servers with hickory's client:
//! UDP first, TCP when the answer comes back truncated; upstreams are tried in order.
use std::{net::SocketAddr, time::Duration};

use hickory_net::{
    NetError,
    client::{Client, ClientHandle},
    runtime::TokioRuntimeProvider,
    tcp::TcpClientStream,
    udp::UdpClientStream,
    xfer::DnsHandle,
};
use hickory_proto::op::{DnsRequest, DnsRequestOptions, DnsResponse, Query};

/// How long one upstream may take to answer before the next one is asked.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Forwarder {
    upstreams: Vec<Upstream>,
}

struct Upstream {
    addr: SocketAddr,
    udp: Client<TokioRuntimeProvider>,
}

impl Forwarder {
    /// Clients for `upstreams`; must be called inside a tokio runtime (their I/O tasks are
    /// spawned on it).
    pub fn new(upstreams: &[SocketAddr]) -> Forwarder {
        let upstreams = upstreams
            .iter()
            .map(|&addr| {
                let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default())
                    .with_timeout(Some(UPSTREAM_TIMEOUT))
                    .build();
                let (udp, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
                tokio::spawn(background);
                Upstream { addr, udp }
            })
            .collect();
        Forwarder { upstreams }
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The first answer an upstream gives for `query` (any response code), or the last error.
    pub async fn resolve(&self, query: &Query) -> Result<DnsResponse, NetError> {
        let mut last = NetError::from("no upstream servers configured");
        for upstream in &self.upstreams {
            match ask(upstream, query).await {
                Ok(response) => return Ok(response),
                Err(err) => {
                    log::debug!("upstream {} failed for {}: {err}", upstream.addr, query.name());
                    last = err;
                }
            }
        }
        Err(last)
    }
}

async fn ask(upstream: &Upstream, query: &Query) -> Result<DnsResponse, NetError> {
    let mut client = upstream.udp.clone();
    let response =
        client.query(query.name().clone(), query.query_class(), query.query_type()).await?;
    if !response.metadata.truncation {
        return Ok(response);
    }
    // The exchange's I/O task lives in the provider's task set: keep a clone of the provider
    // until the answer is in.
    let provider = TokioRuntimeProvider::default();
    let exchange =
        TcpClientStream::exchange(upstream.addr, None, UPSTREAM_TIMEOUT, None, provider.clone())
            .await?;
    let request = DnsRequest::from_query(query.clone(), DnsRequestOptions::default());
    let answer = futures::StreamExt::next(&mut exchange.send(request)).await;
    drop(provider);
    answer.unwrap_or(Err(NetError::Timeout))
}
