//! The policy benchmark's quick mode (`weir-bench policy --quick`) as a test, so the benchmark
//! code cannot rot between runs: N = 0 and 100 rules, short samples, one round. It checks that
//! every side measured something and that the policy datapath enforced the rules (the run
//! itself fails when the allowed connection fails or a port no rule opens answers). It does
//! not judge the figures. Privileged.
use weir_tests::bench::policy::{Options, run};

#[test]
fn quick_policy_benchmark_runs_and_enforces() {
    let options = Options::quick();
    let outcome = run(&options).expect("the quick policy benchmark runs");
    let ebpf = outcome
        .reports
        .iter()
        .find(|r| r.name == "policy-ebpf")
        .expect("the eBPF side is measured");
    for n in &options.sizes {
        for prefix in ["conn_per_s", "rr_per_s"] {
            let figure = &ebpf.figures[format!("{prefix}_n{n}").as_str()];
            assert!(
                figure.candidate_median > 0.0 && figure.baseline_median > 0.0,
                "{prefix} n={n}"
            );
        }
    }
    let programmed = &outcome.programming["backends"]["ebpf"];
    for n in &options.sizes {
        let ops = programmed[format!("program_ops_n{n}")]["median"].as_f64().expect("ops");
        // Endpoint entries of both pods at least; N rules add their own entries.
        assert!(ops >= 2.0, "n={n}: {ops} operations");
    }
    let big = programmed["program_ops_n100"]["median"].as_f64().unwrap();
    assert!(big >= 100.0, "100 rules are at least 100 entries: {big}");
    // One more ipBlock rule among 100: its rule and ipcache entries, the endpoint's policy
    // attribution and the global flag, not a rewrite.
    let add = programmed["add_one_ops_n100"]["median"].as_f64().unwrap();
    assert!((1.0..=6.0).contains(&add), "+1 rule at 100 wrote {add} operations");
}
