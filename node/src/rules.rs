//! Pure decisions of the runtime, without I/O: the lab's image rules, a pod's resolv.conf,
//! names of what the runtime makes, restart decisions and the crash-loop backoff.
use std::time::Duration;

/// Where busybox-static puts its binary (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// The message of an image the lab cannot run (ErrImagePull).
pub fn image_rules_message(image: &str) -> String {
    format!(
        "the weir lab has no container images: it cannot run image {image:?} without a command. \
         Lab image rules: nginx and httpd without a command serve a built-in web page on each \
         containerPort (default 80); busybox and alpine run their command under busybox \
         (default sh); coredns without a command runs `weir dns`; agnhost \
         (registry.k8s.io/e2e-test-images/agnhost) runs its serve-hostname, connect and pause \
         subcommands; any other image runs its command (spec.containers[].command) from the \
         node's file system. Give the container a command, or use one of those images."
    )
}

/// The last path segment of an image reference without tag or digest: `nginx` for
/// `docker.io/library/nginx:1.27`, `coredns` for `registry.k8s.io/coredns/coredns:v1.11.1`.
pub fn image_base_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// How a container is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `weir builtin web` on these ports.
    Web { ports: Vec<u16> },
    /// `weir dns`.
    Dns,
    /// An argv run under busybox (argv[0] is the applet).
    Busybox { argv: Vec<String> },
    /// An argv run from the node's file system.
    Host { argv: Vec<String> },
    /// `weir builtin agnhost` with these arguments (the subcommand first).
    Agnhost { args: Vec<String> },
}

/// How the commands exec'd in a container (kubectl exec, exec probes) are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStyle {
    /// As given, from the node's file system.
    Host,
    /// Under busybox ([`busybox_argv`]).
    Busybox,
    /// `/agnhost ...` (any path whose file name is `agnhost`) runs `weir builtin agnhost ...`;
    /// anything else runs from the node's file system.
    Agnhost,
}

impl Launch {
    /// How commands exec'd into a container started this way run.
    pub fn exec_style(launch: &Result<Launch, String>) -> ExecStyle {
        match launch {
            Ok(Launch::Busybox { .. }) => ExecStyle::Busybox,
            Ok(Launch::Agnhost { .. }) => ExecStyle::Agnhost,
            _ => ExecStyle::Host,
        }
    }
}

/// The argv to exec for a command run in a container of this style.
pub fn exec_argv(
    style: ExecStyle,
    argv: &[String],
    applets: &[String],
    weir_binary: &std::path::Path,
) -> Vec<String> {
    match style {
        ExecStyle::Host => argv.to_vec(),
        ExecStyle::Busybox => busybox_argv(argv, applets),
        ExecStyle::Agnhost => match argv.split_first() {
            Some((first, rest)) if is_agnhost(first) => agnhost_argv(weir_binary, rest),
            _ => argv.to_vec(),
        },
    }
}

/// `weir builtin agnhost ARGS...`.
pub fn agnhost_argv(weir_binary: &std::path::Path, args: &[String]) -> Vec<String> {
    let mut argv = vec![weir_binary.display().to_string(), "builtin".into(), "agnhost".into()];
    argv.extend(args.iter().cloned());
    argv
}

fn is_agnhost(program: &str) -> bool {
    program.rsplit('/').next() == Some("agnhost")
}

/// What a container's image, command, args and ports mean in the lab, or the ErrImagePull
/// message.
pub fn launch_for(
    image: &str,
    command: &[String],
    args: &[String],
    ports: &[u16],
) -> Result<Launch, String> {
    let argv: Vec<String> = command.iter().chain(args).cloned().collect();
    match image_base_name(image) {
        "nginx" | "httpd" if command.is_empty() => {
            let ports = if ports.is_empty() { vec![80] } else { ports.to_vec() };
            Ok(Launch::Web { ports })
        }
        "coredns" if command.is_empty() => Ok(Launch::Dns),
        // The image's entrypoint is /agnhost: `command: [/agnhost, sub, ...]` or `args: [sub,
        // ...]` both name the subcommand.
        "agnhost" => {
            let args = match argv.split_first() {
                Some((first, rest)) if is_agnhost(first) => rest.to_vec(),
                _ => argv,
            };
            match args.first() {
                Some(sub) if crate::agnhost::SUBCOMMANDS.contains(&sub.as_str()) => {
                    Ok(Launch::Agnhost { args })
                }
                _ => Err(format!(
                    "the weir lab's agnhost ({image:?}) implements the subcommands {}; got \
                     command+args {args:?}. Use e.g. command: [/agnhost, serve-hostname, --tcp, \
                     --http=false, --port, \"80\"]",
                    crate::agnhost::SUBCOMMANDS.join(", ")
                )),
            }
        }
        "busybox" | "alpine" => {
            let argv = if argv.is_empty() { vec!["sh".to_string()] } else { argv };
            Ok(Launch::Busybox { argv })
        }
        _ if !command.is_empty() => Ok(Launch::Host { argv }),
        _ => Err(image_rules_message(image)),
    }
}

/// The program and arguments to exec for a busybox argv: `sh -c x` -> `/bin/busybox sh -c x`;
/// a path whose file name is an applet (`/bin/sh`) runs the applet, any other path runs as is.
///
/// Debian's busybox wget has no `-T`/`--timeout` (upstream busybox and the busybox image have
/// it, and tutorials use it): `wget --timeout=N ...` runs as `busybox timeout N busybox wget
/// ...`, a bound on the whole download instead of on each network read.
pub fn busybox_argv(argv: &[String], applets: &[String]) -> Vec<String> {
    let Some(first) = argv.first() else { return vec![BUSYBOX.into(), "sh".into()] };
    let name = first.rsplit('/').next().unwrap_or(first);
    if !first.contains('/') || applets.iter().any(|a| a == name) {
        let mut out = vec![BUSYBOX.to_string(), name.to_string()];
        let (rest, timeout) = if name == "wget" {
            strip_wget_timeout(&argv[1..])
        } else {
            (argv[1..].to_vec(), None)
        };
        if let Some(seconds) = timeout {
            out = vec![BUSYBOX.into(), "timeout".into(), seconds, BUSYBOX.into(), name.into()];
        }
        out.extend(rest);
        out
    } else {
        argv.to_vec()
    }
}

/// wget's arguments without `-T N`, `-TN`, `--timeout N` or `--timeout=N`, and that timeout.
fn strip_wget_timeout(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut rest = Vec::new();
    let mut timeout = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "-T" || arg == "--timeout" {
            timeout = iter.next().cloned();
        } else if let Some(value) = arg.strip_prefix("--timeout=") {
            timeout = Some(value.to_string());
        } else if let Some(value) = arg
            .strip_prefix("-T")
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        {
            timeout = Some(value.to_string());
        } else {
            rest.push(arg.clone());
        }
    }
    (rest, timeout.filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())))
}

/// A pod's DNS settings, from spec.dnsPolicy and spec.dnsConfig.
pub struct DnsInput<'a> {
    pub policy: Option<&'a str>,
    pub namespace: &'a str,
    pub cluster_dns: &'a str,
    pub cluster_domain: &'a str,
    /// The node's own resolv.conf (for dnsPolicy Default).
    pub node_resolv: &'a str,
    pub extra_nameservers: &'a [String],
    pub extra_searches: &'a [String],
    pub extra_options: &'a [(String, Option<String>)],
}

/// The resolv.conf a pod's containers see (kubelet's rules: ClusterFirst is the default and
/// uses the cluster DNS with the namespace's search path and ndots:5; Default uses the node's
/// file; None uses only dnsConfig).
pub fn resolv_conf(input: &DnsInput) -> String {
    let (mut servers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match input.policy.unwrap_or("ClusterFirst") {
            "Default" => {
                let mut s = Vec::new();
                let mut se = Vec::new();
                let mut o = Vec::new();
                for line in input.node_resolv.lines() {
                    let mut words = line.split_whitespace();
                    match words.next() {
                        Some("nameserver") => s.extend(words.map(str::to_string)),
                        Some("search") | Some("domain") => se.extend(words.map(str::to_string)),
                        Some("options") => o.extend(words.map(str::to_string)),
                        _ => {}
                    }
                }
                (s, se, o)
            }
            "None" => (Vec::new(), Vec::new(), Vec::new()),
            _ => {
                let d = input.cluster_domain;
                (
                    vec![input.cluster_dns.to_string()],
                    vec![format!("{}.svc.{d}", input.namespace), format!("svc.{d}"), d.to_string()],
                    vec!["ndots:5".to_string()],
                )
            }
        };
    servers.extend(input.extra_nameservers.iter().cloned());
    searches.extend(input.extra_searches.iter().cloned());
    for (name, value) in input.extra_options {
        options.retain(|o| o.split(':').next() != Some(name.as_str()));
        options.push(match value {
            Some(v) => format!("{name}:{v}"),
            None => name.clone(),
        });
    }
    servers.dedup();
    let mut out = String::new();
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// The pod's network namespace: `<prefix><first 12 hex digits of the uid>`.
pub fn netns_name(prefix: &str, uid: &str) -> String {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).take(12).collect();
    format!("{prefix}{}", hex.to_ascii_lowercase())
}

/// CNI_ARGS for a pod, as kubelet passes them.
pub fn cni_args(namespace: &str, name: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={uid};K8S_POD_UID={uid}"
    )
}

/// Whether a container that exited with `exit_code` is started again.
pub fn should_restart(policy: Option<&str>, exit_code: i32) -> bool {
    match policy.unwrap_or("Always") {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// Crash-loop backoff: the first restart waits [`BACKOFF_BASE`], each further one twice as
/// long, up to [`BACKOFF_CAP`] (kubelet uses 10 s and 5 min; the lab is for learning, so
/// loops are visible sooner).
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A container that ran this long without exiting starts its next backoff from the base.
pub const BACKOFF_RESET: Duration = Duration::from_secs(120);

/// The wait before restart number `restarts + 1` after `restarts` restarts in a row.
pub fn restart_backoff(consecutive_restarts: u32) -> Duration {
    let factor = 1u32.checked_shl(consecutive_restarts.min(16)).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
}

/// Backoff of a failed sandbox creation (CNI ADD): 1 s doubling to 30 s.
pub fn sandbox_backoff(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
    Duration::from_secs(1).saturating_mul(factor).min(Duration::from_secs(30))
}

/// How long to wait after SIGTERM: the pod's grace period, capped at 30 s.
pub fn grace_period(deletion_grace: Option<i64>, spec_grace: Option<i64>) -> Duration {
    let secs = deletion_grace.or(spec_grace).unwrap_or(30).clamp(MIN_GRACE.as_secs() as i64, 30);
    Duration::from_secs(secs as u64)
}

/// The shortest time containers get between SIGTERM and SIGKILL, also for a pod forced out of
/// the API (grace 0) or gone from it: kubelet's `minimumGracePeriodInSeconds`.
pub const MIN_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn image_names() {
        assert_eq!(image_base_name("nginx"), "nginx");
        assert_eq!(image_base_name("docker.io/library/nginx:1.27"), "nginx");
        assert_eq!(image_base_name("registry.k8s.io/coredns/coredns:v1.11.1"), "coredns");
        assert_eq!(image_base_name("localhost:5000/httpd@sha256:abc"), "httpd");
        assert_eq!(image_base_name("busybox:1.36"), "busybox");
    }

    #[test]
    fn launches() {
        assert_eq!(launch_for("nginx:1", &[], &[], &[]), Ok(Launch::Web { ports: vec![80] }));
        assert_eq!(
            launch_for("httpd", &[], &[], &[8080, 8443]),
            Ok(Launch::Web { ports: vec![8080, 8443] })
        );
        assert_eq!(
            launch_for("nginx", &s(&["sleep"]), &s(&["1"]), &[]),
            Ok(Launch::Host { argv: s(&["sleep", "1"]) })
        );
        assert_eq!(
            launch_for("registry.k8s.io/coredns/coredns:v1", &[], &[], &[]),
            Ok(Launch::Dns)
        );
        assert_eq!(launch_for("busybox", &[], &[], &[]), Ok(Launch::Busybox { argv: s(&["sh"]) }));
        assert_eq!(
            launch_for("alpine", &[], &s(&["sleep", "5"]), &[]),
            Ok(Launch::Busybox { argv: s(&["sleep", "5"]) })
        );
        assert_eq!(
            launch_for("busybox", &s(&["sh", "-c"]), &s(&["echo hi"]), &[]),
            Ok(Launch::Busybox { argv: s(&["sh", "-c", "echo hi"]) })
        );
        let agnhost = "registry.k8s.io/e2e-test-images/agnhost:2.53";
        assert_eq!(
            launch_for(agnhost, &s(&["/agnhost", "serve-hostname", "--tcp"]), &[], &[80]),
            Ok(Launch::Agnhost { args: s(&["serve-hostname", "--tcp"]) })
        );
        assert_eq!(
            launch_for(agnhost, &[], &s(&["connect", "a:80"]), &[]),
            Ok(Launch::Agnhost { args: s(&["connect", "a:80"]) })
        );
        let err = launch_for(agnhost, &s(&["/agnhost", "netexec"]), &[], &[]).unwrap_err();
        assert!(err.contains("netexec") && err.contains("serve-hostname"), "{err}");
        assert!(launch_for(agnhost, &[], &[], &[]).is_err());
        let err = launch_for("quay.io/foo/bar:1", &[], &s(&["x"]), &[]).unwrap_err();
        assert!(err.contains("\"quay.io/foo/bar:1\"") && err.contains("busybox"), "{err}");
    }

    #[test]
    fn busybox_paths() {
        let applets = s(&["sh", "sleep"]);
        assert_eq!(busybox_argv(&s(&["sh", "-c", "x"]), &applets), s(&[BUSYBOX, "sh", "-c", "x"]));
        assert_eq!(busybox_argv(&s(&["/bin/sleep", "1"]), &applets), s(&[BUSYBOX, "sleep", "1"]));
        assert_eq!(busybox_argv(&s(&["/usr/bin/env"]), &applets), s(&["/usr/bin/env"]));
        assert_eq!(busybox_argv(&[], &applets), s(&[BUSYBOX, "sh"]));
        assert_eq!(
            busybox_argv(&s(&["wget", "-qO-", "--timeout=2", "http://web"]), &applets),
            s(&[BUSYBOX, "timeout", "2", BUSYBOX, "wget", "-qO-", "http://web"])
        );
        assert_eq!(
            busybox_argv(&s(&["wget", "-T", "3", "-qO-", "http://web"]), &applets),
            s(&[BUSYBOX, "timeout", "3", BUSYBOX, "wget", "-qO-", "http://web"])
        );
        assert_eq!(
            busybox_argv(&s(&["wget", "http://x"]), &applets),
            s(&[BUSYBOX, "wget", "http://x"])
        );
    }

    #[test]
    fn exec_styles() {
        let weir = std::path::Path::new("/usr/bin/weir");
        let applets = s(&["sh"]);
        assert_eq!(
            exec_argv(ExecStyle::Agnhost, &s(&["/agnhost", "connect", "a:80"]), &applets, weir),
            s(&["/usr/bin/weir", "builtin", "agnhost", "connect", "a:80"])
        );
        assert_eq!(
            exec_argv(ExecStyle::Agnhost, &s(&["cat", "/etc/hostname"]), &applets, weir),
            s(&["cat", "/etc/hostname"])
        );
        assert_eq!(exec_argv(ExecStyle::Busybox, &s(&["sh"]), &applets, weir), s(&[BUSYBOX, "sh"]));
        assert_eq!(exec_argv(ExecStyle::Host, &s(&["/agnhost"]), &applets, weir), s(&["/agnhost"]));
        assert_eq!(Launch::exec_style(&Ok(Launch::Agnhost { args: vec![] })), ExecStyle::Agnhost);
        assert_eq!(Launch::exec_style(&Err(String::new())), ExecStyle::Host);
    }

    fn dns(policy: Option<&str>) -> String {
        resolv_conf(&DnsInput {
            policy,
            namespace: "team",
            cluster_dns: "10.96.0.10",
            cluster_domain: "cluster.local",
            node_resolv: "nameserver 192.0.2.53\nsearch example.org\n",
            extra_nameservers: &[],
            extra_searches: &[],
            extra_options: &[("ndots".into(), Some("2".into()))],
        })
    }

    #[test]
    fn resolv_confs() {
        assert_eq!(
            dns(None),
            "nameserver 10.96.0.10\nsearch team.svc.cluster.local svc.cluster.local \
             cluster.local\noptions ndots:2\n"
        );
        assert_eq!(
            dns(Some("Default")),
            "nameserver 192.0.2.53\nsearch example.org\noptions ndots:2\n"
        );
        assert_eq!(dns(Some("None")), "options ndots:2\n");
    }

    #[test]
    fn names() {
        assert_eq!(
            netns_name("weirt-1-pod-", "0a1B2c3d-4e5f-6789-abcd-ef0123456789"),
            "weirt-1-pod-0a1b2c3d4e5f"
        );
        assert!(cni_args("ns", "p", "u").contains("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;"));
    }

    #[test]
    fn restarts_and_backoff() {
        assert!(should_restart(None, 0));
        assert!(!should_restart(Some("Never"), 1));
        assert!(should_restart(Some("OnFailure"), 1));
        assert!(!should_restart(Some("OnFailure"), 0));
        assert_eq!(restart_backoff(0), Duration::from_secs(1));
        assert_eq!(restart_backoff(3), Duration::from_secs(8));
        assert_eq!(restart_backoff(40), BACKOFF_CAP);
        assert_eq!(sandbox_backoff(1), Duration::from_secs(1));
        assert_eq!(sandbox_backoff(99), Duration::from_secs(30));
        assert_eq!(grace_period(Some(90), None), Duration::from_secs(30));
        assert_eq!(grace_period(None, Some(2)), Duration::from_secs(2));
        assert_eq!(grace_period(Some(-1), None), MIN_GRACE);
        assert_eq!(grace_period(Some(0), Some(60)), MIN_GRACE, "a forced deletion still TERMs");
    }
}
