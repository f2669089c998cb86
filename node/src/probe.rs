//! Running one probe (tcpSocket, httpGet, exec) against a container, as kubelet does: TCP and
//! HTTP from the node to the pod's address, exec inside the container's namespaces.
use std::{path::Path, process::Stdio, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{rules, spawn::JoinNamespaces};

/// Settings of a probe with kubelet's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn timing(probe: &Probe) -> Timing {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Timing {
        initial_delay: secs(probe.initial_delay_seconds, 0),
        period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// Where and how an exec probe runs.
pub struct ExecContext<'a> {
    pub pid: u32,
    pub cgroup: &'a Path,
    pub workdir: &'a str,
    pub env: &'a [(String, String)],
    pub exec: rules::ExecStyle,
    pub applets: &'a [String],
    pub weir_binary: &'a std::path::Path,
}

fn port_of(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Runs the probe once; Ok on success, Err with kubelet-like output on failure.
pub async fn run(
    probe: &Probe,
    container: &Container,
    pod_ip: &str,
    exec: ExecContext<'_>,
) -> Result<(), String> {
    let timeout = timing(probe).timeout;
    let work = async {
        if let Some(tcp) = &probe.tcp_socket {
            let port = port_of(&tcp.port, container)?;
            let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let addr = format!("{}:{port}", bracket(&host));
            TcpStream::connect(&addr).await.map(|_| ()).map_err(|e| format!("dial tcp {addr}: {e}"))
        } else if let Some(http) = &probe.http_get {
            let port = http.port.clone();
            let port = port_of(&port, container)?;
            if http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("https")) {
                return Err("HTTPS probes are not supported by the weir lab".into());
            }
            let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let addr = format!("{}:{port}", bracket(&host));
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            http_get(&addr, &path).await
        } else if let Some(cmd) = &probe.exec {
            let argv = cmd.command.clone().unwrap_or_default();
            exec_probe(&argv, exec).await
        } else {
            Err("the probe has no handler (tcpSocket, httpGet or exec)".into())
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

async fn http_get(addr: &str, path: &str) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let mut stream =
        TcpStream::connect(addr).await.map_err(|e| format!("Get {url:?}: dial tcp: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("Get {url:?}: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(|e| format!("Get {url:?}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get {url:?}: malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

async fn exec_probe(argv: &[String], ctx: ExecContext<'_>) -> Result<(), String> {
    if argv.is_empty() {
        return Err("exec probe without a command".into());
    }
    let argv = rules::exec_argv(ctx.exec, argv, ctx.applets, ctx.weir_binary);
    let join = JoinNamespaces::prepare(ctx.pid, ctx.cgroup, ctx.workdir, false)
        .map_err(|e| format!("{e:#}"))?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(ctx.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    join.apply(&mut cmd);
    let out = cmd.output().await.map_err(|e| format!("exec {argv:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "command {argv:?} exited with {}: {}{}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
