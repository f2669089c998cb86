//! aya-log wiring: with `forward_logs`, the programs' debug records reach the `log` crate; by
//! default the programs' log level is 0 and nothing is emitted.
use std::{
    net::Ipv4Addr,
    sync::{Mutex, OnceLock},
};

use aya::programs::{TestRun, TestRunOptions};
use log::{Log, Metadata, Record};
use weir_common::{lb::Backend, proto};
use weir_proxy::{
    maps::{ServiceEntry, ServiceMaps},
    programs::{self, LoadOptions, TC_LB4_FORWARD},
};
use weir_tests::{bpffs::TestPinDir, packet::Ipv4Packet, privileged::require_root};

/// A `log` backend that keeps the messages, so the test can read them.
struct Capture(Mutex<Vec<String>>);

impl Log for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Trace);
        capture
    })
}

/// Loads the object, translates one packet to 10.0.1.1:8080 and returns the forwarded logs.
fn translate_once(forward_logs: bool) -> Vec<String> {
    require_root();
    let capture = capture();
    let pins = TestPinDir::new("logs").unwrap();
    let options = LoadOptions { forward_logs, ..LoadOptions::new(pins.path()) };
    let mut loaded = programs::load(&options).expect("load");
    ServiceMaps::take(&mut loaded.ebpf)
        .unwrap()
        .upsert(&ServiceEntry {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: proto::TCP,
            rev_nat_index: 1,
            backends: vec![(1, Backend::new([10, 0, 1, 1], 8080, proto::TCP))],
        })
        .unwrap();
    let packet =
        Ipv4Packet::tcp(Ipv4Addr::new(10, 0, 0, 1), 40_000, Ipv4Addr::new(10, 96, 0, 10), 80)
            .build();
    let program = programs::classifier_ref(&loaded.ebpf, TC_LB4_FORWARD).unwrap();
    program
        .test_run(TestRunOptions { data_in: Some(&packet), ..TestRunOptions::new() })
        .expect("test run");
    capture.0.lock().unwrap().clear();
    match loaded.logger.as_mut() {
        Some(logger) => logger.flush(),
        // Not forwarding: drain the programs' log ring buffer anyway, so that a record written
        // despite the level being 0 would show up and fail the test.
        None => aya_log::EbpfLogger::init(&mut loaded.ebpf).expect("AYA_LOGS map").flush(),
    }
    std::mem::take(&mut *capture.0.lock().unwrap())
}

#[test]
fn lb_tc_logs_are_forwarded_only_when_asked() {
    let quiet = translate_once(false);
    assert!(quiet.is_empty(), "logging is off by default: {quiet:?}");

    let logs = translate_once(true);
    assert!(
        logs.iter().any(|line| line.contains("translated to 10.0.1.1:8080")),
        "the program's debug record reaches the logger: {logs:?}"
    );
}
