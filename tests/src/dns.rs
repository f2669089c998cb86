//! Running `weir dns` in tests (on a loopback port it picks) and asking it questions with
//! hickory's client over UDP or TCP. The process is killed on drop.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use hickory_net::{
    runtime::TokioRuntimeProvider, tcp::TcpClientStream, udp::UdpClientStream, xfer::DnsHandle,
};
use hickory_proto::{
    op::{DnsRequest, DnsRequestOptions, Query},
    rr::Name,
};
pub use hickory_proto::{
    op::{DnsResponse, Message, ResponseCode},
    rr::{RData, RecordType},
};

use crate::apiserver::{ApiServer, weir_binary};

/// How long `weir dns` may take to load its first lists and report that it serves.
const START_WAIT: Duration = Duration::from_secs(30);
/// How long one question may wait for its answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `weir dns`, killed on drop.
pub struct DnsServer {
    child: Child,
    /// The UDP and TCP address it answers on.
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Starts `weir dns` against `api` on 127.0.0.1 (a free port) with `extra` arguments, and
    /// waits for its "serving" line.
    pub fn start(api: &ApiServer, extra: &[&str]) -> DnsServer {
        let mut child = Command::new(weir_binary())
            .arg("dns")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning weir dns");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_WAIT;
        let addr = loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("weir dns did not report that it serves within {START_WAIT:?}");
            };
            if let Some(rest) = line.strip_prefix("weir dns: serving ") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr.parse().unwrap_or_else(|_| panic!("address in {line:?}"));
            }
        };
        DnsServer { child, addr }
    }

    /// Stops the server with SIGTERM and returns its exit status; panics when it does not stop
    /// within 10 s.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("weir dns did not stop within 10 s of SIGTERM");
    }

    /// One question over `transport`; panics when no answer comes.
    pub fn query(&self, transport: Transport, name: &str, qtype: RecordType) -> DnsResponse {
        query(self.addr, transport, name, qtype)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Asks `server` one question (recursion desired, EDNS) and returns its response, whatever
/// the response code; panics when no answer comes within the timeout.
pub fn query(
    server: SocketAddr,
    transport: Transport,
    name: &str,
    qtype: RecordType,
) -> DnsResponse {
    let name = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad name {name:?}: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let provider = TokioRuntimeProvider::default();
        let request =
            DnsRequest::from_query(Query::query(name.clone(), qtype), DnsRequestOptions::default());
        let answer = match transport {
            Transport::Udp => {
                let exchange = UdpClientStream::builder(server, provider)
                    .with_timeout(Some(QUERY_TIMEOUT))
                    .exchange();
                futures::StreamExt::next(&mut exchange.send(request)).await
            }
            Transport::Tcp => {
                // The exchange's I/O task lives in the provider's task set: keep a clone of
                // the provider until the answer is in.
                let exchange =
                    TcpClientStream::exchange(server, None, QUERY_TIMEOUT, None, provider.clone())
                        .await
                        .unwrap_or_else(|e| panic!("connecting to {server} over TCP: {e}"));
                let answer = futures::StreamExt::next(&mut exchange.send(request)).await;
                drop(provider);
                answer
            }
        };
        match answer {
            Some(Ok(response)) => response,
            Some(Err(err)) => panic!("{transport:?} query {name} {qtype} to {server}: {err}"),
            None => panic!("{transport:?} query {name} {qtype} to {server}: no answer"),
        }
    })
}

/// The answer section's data, in the order sent.
pub fn answers(response: &Message) -> Vec<RData> {
    response.answers.iter().map(|r| r.data.clone()).collect()
}

/// The answer section's data as text (`10.96.0.1`, `0 100 80 web.default.svc.cluster.local.`),
/// sorted, for comparisons that do not depend on order.
pub fn answer_texts(response: &Message) -> Vec<String> {
    let mut texts: Vec<String> = response.answers.iter().map(|r| r.data.to_string()).collect();
    texts.sort();
    texts
}
