//! `weir policy trace` against the embedded API server: the truth-table namespaces and pods and
//! a policy are created through the API; the command names the deciding rule, exits 0 when
//! allowed and 3 when denied, and explains bad arguments (exit 64). No privileges needed.
use std::process::Output;

use serde_json::json;
use weir_tests::{
    apiserver::{ApiServer, TempDir, weir_binary},
    policy_cases::{TruthTable, policy},
};

fn trace(server: &ApiServer, args: &[&str]) -> Output {
    std::process::Command::new(weir_binary())
        .args(["policy", "trace", "--kubeconfig"])
        .arg(&server.kubeconfig)
        .args(args)
        .output()
        .expect("run weir policy trace")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn trace_names_the_rule_from_the_api() {
    let dir = TempDir::new("netpol-trace");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let allow = policy(
        "x",
        "a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
    );
    TruthTable::new().create_in(&server, &[allow]);

    let out = trace(&server, &["--from", "x/b", "--to", "x/a", "--port", "80"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ingress of the destination: allowed by NetworkPolicy x/a-from-b ingress rule 0, peer 0, port 0"), "{}", text(&out));

    let out =
        trace(&server, &["--from", "x/c", "--to", "10.244.0.10", "--port", "80", "--proto", "udp"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("denied: no rule allows it (isolated by x/a-from-b)"),
        "{}",
        text(&out)
    );

    let out = trace(&server, &["--from", "y/a", "--to", "x/b", "--port", "81"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("allowed: no NetworkPolicy isolates it"), "{}", text(&out));

    for (args, says) in [
        (&["--from", "nope", "--to", "x/a", "--port", "80"][..], "write NAMESPACE/POD"),
        (
            &["--from", "x/b", "--to", "x/a", "--port", "80", "--proto", "icmp"][..],
            "use tcp, udp or sctp",
        ),
        (&["--from", "x/zz", "--to", "x/a", "--port", "80"][..], "pod x/zz is not known"),
    ] {
        let out = trace(&server, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    }
}
