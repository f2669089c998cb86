//! Agent restarts do not interrupt established connections: 50 long-lived TCP connections
//! through a ClusterIP, 10 restarts of the real `weir agent` (every other one a SIGKILL), and
//! every connection answers before, while the agent is down, and after each restart; new
//! connections keep working throughout. On both dataplanes (nftables: the table stays while
//! the agent is down, conntrack keeps the established flows).
use std::time::Duration;

use weir_tests::{
    agent::{AgentProcess, AgentSetup, create_endpoint_slice, create_service},
    apiserver::{ApiServer, TempDir},
    dataplane::{Dataplane, for_each_dataplane},
    privileged::require_root,
    probe::{Session, spread},
    topology::ServiceNet,
    wait::eventually,
};

const CONNECTIONS: usize = 50;
const RESTARTS: usize = 10;

#[test]
fn restart_fifty_connections_survive_ten_agent_restarts() {
    require_root();
    for_each_dataplane(connections_survive_restarts);
}

fn connections_survive_restarts(dataplane: Dataplane) {
    let net = ServiceNet::new("rsta", 209, 2).unwrap();
    let data = TempDir::new("rsta-api");
    let api = ApiServer::start(data.path());
    let setup = AgentSetup::new(dataplane, &net.client, &api, "rsta");
    let cgroup = setup.cgroup();
    let vip = format!("{}:80", create_service(&api, "web"));
    create_endpoint_slice(&api, "web", &net.backends);

    let mut agent = AgentProcess::start_on(&api, &setup);
    eventually("the service answering", Duration::from_secs(15), || {
        let result = spread(&net.client, cgroup, &vip, 1);
        (result["ok"] != true).then(|| result.to_string())
    });
    let mut sessions: Vec<Session> =
        (0..CONNECTIONS).map(|_| Session::open(&net.client, cgroup, &vip)).collect();
    let mut check_all = |when: &str| {
        for (i, session) in sessions.iter_mut().enumerate() {
            let reply = session.ping();
            assert_eq!(reply["ok"], true, "connection {i} {when}: {reply}");
        }
    };
    check_all("before any restart");

    for restart in 0..RESTARTS {
        if restart % 2 == 0 {
            agent.kill();
        } else {
            agent.terminate();
        }
        check_all(&format!("while the agent is down (restart {restart})"));
        let fresh = spread(&net.client, cgroup, &vip, 5);
        assert_eq!(fresh["ok"], true, "new connections while down (restart {restart}): {fresh}");
        agent = AgentProcess::start_on(&api, &setup);
        check_all(&format!("after restart {restart}"));
    }
    let (code, health) = agent.get(agent.health, "/healthz");
    assert_eq!(code, 200, "{health}");
}
