//! `weir-cni`: the CNI plugin that kubelet/containerd (and the lab's node runtime) exec for every
//! pod.
//!
//! Concern: one synchronous invocation per CNI command (ADD, DEL, CHECK, VERSION, STATUS, GC)
//! for spec versions 0.3.0 to 1.1.0: parse the config and environment, wire the pod's routed
//! veth (peer created directly in the pod namespace), allocate addresses with the built-in,
//! crash-safe IPAM (or delegate to another IPAM plugin), and print a result or a spec error.
//!
//! Contract of [`run`]: reads the config from stdin (at most 1 MiB), the `CNI_*` variables from
//! the environment; on success prints the command's output (ADD: the result in the config's
//! version; VERSION: the supported versions; others: nothing) and returns 0; on failure prints
//! the spec's error object and returns 1. It never panics on bad input. The process's own
//! network namespace is the node's; the pod's is entered only on a dedicated thread.
//!
//! ADD order (crash-safe): reserve addresses (on disk) -> create the veth -> attach the agent's
//! pinned policy programs to the host veth (when pinned) -> addresses and routes -> register
//! the endpoint -> commit. A failure rolls back what this invocation made; a crash leaves a
//! reservation (and maybe a veth) that DEL or GC removes, since the veth name is derived from
//! the attachment.
//!
//! Boundaries: no long-running state and no dependency on the agent being up. When the agent's
//! pinned endpoint map exists, ADD registers the endpoint in it.
pub mod bpf;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod nodestate;
pub mod policy;
pub mod unlink;
pub mod version;
pub mod wiring;

use std::{
    io::{Read, Write},
    net::IpAddr,
};

use config::{Command, Env, Ipam, MAX_CONFIG_BYTES, NetConf};
use error::CniError;
use serde_json::json;
use version::{CniResult, Interface, IpConfig, Route};

/// Runs one invocation; returns the process exit code.
pub fn run(
    stdin: impl Read,
    mut stdout: impl Write,
    get_env: impl Fn(&str) -> Option<String>,
) -> i32 {
    let mut input = Vec::new();
    let read = stdin.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut input);
    let reply_version = config::peek_version(&input)
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::NEWEST.to_string());
    let outcome = match read {
        Err(e) => Err(CniError::io("reading the network config from stdin", e)),
        Ok(_) => dispatch(&input, &get_env),
    };
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            0
        }
        Ok(None) => 0,
        Err(err) => {
            let _ = writeln!(stdout, "{}", err.to_json(&reply_version));
            1
        }
    }
}

fn dispatch(
    input: &[u8],
    get_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<serde_json::Value>, CniError> {
    let env = config::parse_env(get_env)?;
    if env.command == Command::Version {
        let asked = config::peek_version(input)
            .filter(|v| version::SUPPORTED.contains(&v.as_str()))
            .unwrap_or_else(|| version::NEWEST.to_string());
        return Ok(Some(json!({ "cniVersion": asked, "supportedVersions": version::SUPPORTED })));
    }
    let conf = config::parse_conf(input)?;
    match env.command {
        Command::Add => add(&env, &conf).map(Some),
        Command::Del => del(&env, &conf).map(|()| None),
        Command::Check => check(&env, &conf).map(|()| None),
        Command::Status => status(&env, &conf).map(|()| None),
        Command::Gc => gc(&env, &conf).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

fn node_socket() -> Result<netlink::Socket, CniError> {
    netlink::Socket::open().map_err(|e| CniError::io("opening a netlink socket", e))
}

/// Addresses of the built-in IPAM, or of a delegate, for one ADD.
struct Allocation {
    ips: Vec<IpAddr>,
    node_mtu: Option<u32>,
}

fn builtin_sets(
    ranges: &[ipam::allocator::RangeSet],
    node_state_file: &std::path::Path,
) -> Result<(Vec<ipam::allocator::RangeSet>, Option<u32>), CniError> {
    if !ranges.is_empty() {
        return Ok((ranges.to_vec(), None));
    }
    let state = nodestate::read(node_state_file)?;
    let sets = state.range_sets().map_err(|msg| CniError::NotAvailable { msg })?;
    Ok((sets, state.mtu))
}

fn add(env: &Env, conf: &NetConf) -> Result<serde_json::Value, CniError> {
    let netns_path = env.netns.clone().expect("parse_env requires CNI_NETNS for ADD");
    let pod_ns = netns::open(&netns_path)?;
    let prev = conf.prev_result.as_ref().map(CniResult::parse).transpose()?;
    let host_name = wiring::host_ifname(&env.container_id, &env.ifname);
    let mut node = node_socket()?;
    if node.link(&host_name).map_err(|e| CniError::io("looking up the host veth", e))?.is_some() {
        return Err(CniError::AlreadyExists {
            msg: format!(
                "container {} already has an attachment {} (host veth {host_name}); DEL it first",
                env.container_id, env.ifname
            ),
        });
    }

    // 1. Reserve (or delegate).
    let allocation = match &conf.ipam {
        Ipam::Builtin { ranges, node_state_file, data_dir, lock_timeout } => {
            let (sets, node_mtu) = builtin_sets(ranges, node_state_file)?;
            let dir = ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout);
            let picked = ipam::reserve(&dir, &sets, &env.container_id, &env.ifname)?;
            wiring::test_kill_point("after-reservation");
            Allocation { ips: picked.into_iter().map(|(ip, _)| ip).collect(), node_mtu }
        }
        Ipam::Delegate { plugin } => {
            let binary = ipam::delegate::find(plugin, &env.cni_path)?;
            let result = ipam::delegate::exec(&binary, "ADD", &conf.raw)?.ok_or_else(|| {
                CniError::Delegate {
                    plugin: plugin.clone(),
                    code: 999,
                    msg: "ADD printed no result".into(),
                    details: String::new(),
                }
            })?;
            let parsed = CniResult::parse(&result)?;
            Allocation { ips: parsed.ips.iter().filter_map(IpConfig::ip).collect(), node_mtu: None }
        }
    };
    let undo_ipam = || match &conf.ipam {
        Ipam::Builtin { data_dir, lock_timeout, .. } => {
            let _ = ipam::release(
                &ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout),
                &env.container_id,
                &env.ifname,
            );
        }
        Ipam::Delegate { plugin } => {
            if let Ok(binary) = ipam::delegate::find(plugin, &env.cni_path) {
                let _ = ipam::delegate::exec(&binary, "DEL", &conf.raw);
            }
        }
    };
    if allocation.ips.is_empty() {
        undo_ipam();
        return Err(CniError::NotAvailable { msg: "IPAM returned no address for the pod".into() });
    }

    // 2. Wire.
    let wired = (|| {
        let mtu = conf.mtu.or(allocation.node_mtu).unwrap_or_else(|| wiring::uplink_mtu(&mut node));
        wiring::enable_forwarding(allocation.ips.iter().any(IpAddr::is_ipv6))?;
        let pod_mac = wiring::pod_mac(&env.container_id, &env.ifname);
        let wired = wiring::add(
            &mut node,
            &pod_ns,
            &host_name,
            pod_mac,
            &env.ifname,
            &allocation.ips,
            mtu,
            &|ifindex| attach_policy(&conf.bpffs_dir, ifindex),
        )?;
        wiring::test_kill_point("after-routes");
        // 3. Tell the dataplane, when the agent runs.
        if let Err(err) = endpoint::register(&conf.bpffs_dir, &allocation.ips, wired.host.index) {
            let _ = wiring::del(&mut node, &host_name);
            return Err(err);
        }
        Ok(wired)
    })();
    let wired = match wired {
        Ok(wired) => wired,
        Err(err) => {
            undo_ipam();
            return Err(err);
        }
    };

    // 4. Commit.
    if let Ipam::Builtin { data_dir, lock_timeout, .. } = &conf.ipam {
        ipam::commit(
            &ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout),
            &env.container_id,
            &env.ifname,
        )?;
    }

    let mut result = prev.unwrap_or_default();
    result.interfaces.push(Interface {
        name: host_name,
        mac: wiring::format_mac(wiring::HOST_MAC),
        mtu: Some(wired.mtu),
        sandbox: String::new(),
    });
    result.interfaces.push(Interface {
        name: env.ifname.clone(),
        mac: wiring::format_mac(wired.pod_mac),
        mtu: Some(wired.mtu),
        sandbox: netns_path.display().to_string(),
    });
    let pod_if = result.interfaces.len() - 1;
    for ip in &allocation.ips {
        let (prefix, gw, any) = if ip.is_ipv4() {
            (32, IpAddr::V4(wiring::GATEWAY_V4), "0.0.0.0/0")
        } else {
            (128, IpAddr::V6(wiring::GATEWAY_V6), "::/0")
        };
        result.ips.push(IpConfig {
            address: format!("{ip}/{prefix}"),
            gateway: Some(gw),
            interface: Some(pod_if),
        });
        result.routes.push(Route { dst: any.into(), gw: Some(gw), extra: Default::default() });
    }
    if let Some(dns) = &conf.dns {
        result.dns = dns.clone();
    }
    Ok(result.to_json(conf.version))
}

/// The no-window step of ADD: the policy programs go on the host veth before the pod has an
/// address, so its first packet already meets them.
fn attach_policy(dir: &std::path::Path, ifindex: u32) -> Result<(), CniError> {
    policy::attach_pinned(dir, ifindex).map(drop).map_err(|e| {
        CniError::io(
            format!(
                "attaching the NetworkPolicy programs pinned in {} to the pod's host veth \
                 (is the kernel 6.6 or newer, with tcx?)",
                dir.display()
            ),
            e,
        )
    })
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let host_name = wiring::host_ifname(&env.container_id, &env.ifname);
    let mut node = node_socket()?;
    // The host end takes the pod end, its routes and neighbours with it; when the netns is gone
    // the pair is gone already.
    wiring::del_unlisted(&mut node, &host_name)?;
    match &conf.ipam {
        Ipam::Builtin { data_dir, lock_timeout, .. } => {
            let dir = ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout);
            let released = ipam::release(&dir, &env.container_id, &env.ifname)?;
            endpoint::unregister(&conf.bpffs_dir, &released);
        }
        Ipam::Delegate { plugin } => {
            if let Some(prev) = conf.prev_result.as_ref().and_then(|p| CniResult::parse(p).ok()) {
                let ips: Vec<IpAddr> = prev.ips.iter().filter_map(IpConfig::ip).collect();
                endpoint::unregister(&conf.bpffs_dir, &ips);
            }
            let binary = ipam::delegate::find(plugin, &env.cni_path)?;
            ipam::delegate::exec(&binary, "DEL", &conf.raw)?;
        }
    }
    Ok(())
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if !conf.version.has_check() {
        return Err(CniError::IncompatibleVersion {
            msg: format!(
                "CHECK exists since cniVersion 0.4.0; this config says {}",
                conf.version.as_str()
            ),
        });
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| CniError::InvalidConfig {
        msg: "CHECK needs prevResult (the result of ADD) in the config".into(),
    })?;
    let prev = CniResult::parse(prev)?;
    let netns_path = env.netns.clone().expect("parse_env requires CNI_NETNS for CHECK");
    let pod_ns = netns::open(&netns_path)?;
    let ours = prev.interfaces.iter().position(|i| i.name == env.ifname && !i.sandbox.is_empty());
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| ours.is_none() || ip.interface == ours)
        .filter_map(IpConfig::ip)
        .collect();
    if ips.is_empty() {
        return Err(CniError::CheckFailed {
            msg: format!("prevResult has no address for {}", env.ifname),
        });
    }
    match &conf.ipam {
        Ipam::Builtin { data_dir, lock_timeout, .. } => {
            let mut held = ipam::held(
                &ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout),
                &env.container_id,
                &env.ifname,
            )?;
            let mut want = ips.clone();
            held.sort();
            want.sort();
            if held != want {
                return Err(CniError::CheckFailed {
                    msg: format!(
                        "the IPAM store holds {held:?} for this attachment, prevResult says {want:?}"
                    ),
                });
            }
        }
        Ipam::Delegate { plugin } => {
            let binary = ipam::delegate::find(plugin, &env.cni_path)?;
            ipam::delegate::exec(&binary, "CHECK", &conf.raw)?;
        }
    }
    let host_name = wiring::host_ifname(&env.container_id, &env.ifname);
    wiring::check(&mut node_socket()?, &pod_ns, &host_name, &env.ifname, &ips)
}

fn require_status_and_gc(conf: &NetConf, what: &str) -> Result<(), CniError> {
    if conf.version.has_status_and_gc() {
        Ok(())
    } else {
        Err(CniError::IncompatibleVersion {
            msg: format!(
                "{what} exists since cniVersion 1.1.0; this config says {}",
                conf.version.as_str()
            ),
        })
    }
}

fn status(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    require_status_and_gc(conf, "STATUS")?;
    match &conf.ipam {
        Ipam::Builtin { ranges, node_state_file, data_dir, lock_timeout } => {
            let (sets, _) = builtin_sets(ranges, node_state_file)?;
            ipam::status(&ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout), &sets)
        }
        Ipam::Delegate { plugin } => {
            let binary = ipam::delegate::find(plugin, &env.cni_path)?;
            ipam::delegate::exec(&binary, "STATUS", &conf.raw).map(|_| ())
        }
    }
}

fn gc(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    require_status_and_gc(conf, "GC")?;
    // Without the list every reservation would look stale: refuse instead of releasing all.
    let valid = conf.valid_attachments.clone().ok_or_else(|| CniError::InvalidConfig {
        msg: "GC needs cni.dev/valid-attachments (an empty list releases everything)".into(),
    })?;
    match &conf.ipam {
        Ipam::Builtin { data_dir, lock_timeout, .. } => {
            let mut node = node_socket()?;
            let dir = ipam::StoreDir::new(data_dir, &conf.name, *lock_timeout);
            ipam::gc(&dir, &valid, |container_id, ifname, ips| {
                let _ = wiring::del(&mut node, &wiring::host_ifname(container_id, ifname));
                endpoint::unregister(&conf.bpffs_dir, ips);
            })?;
            Ok(())
        }
        Ipam::Delegate { plugin } => {
            let binary = ipam::delegate::find(plugin, &env.cni_path)?;
            ipam::delegate::exec(&binary, "GC", &conf.raw).map(|_| ())
        }
    }
}

/// Where the binary looks for its config when run by hand with `--help`-like arguments.
pub fn usage() -> String {
    format!(
        "weir-cni {}: a CNI plugin; runtimes exec it with CNI_COMMAND and friends in the environment \
         and the network config on stdin. Supported spec versions: {}. See docs/cni.md.",
        env!("CARGO_PKG_VERSION"),
        version::SUPPORTED.join(", ")
    )
}
