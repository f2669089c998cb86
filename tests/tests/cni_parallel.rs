//! 300 parallel ADDs into a /24 (254 addresses): no address is handed out twice, the ADDs past
//! capacity fail cleanly with 51 (and STATUS says 51), and after DEL of all the pool is full
//! again.
use std::collections::BTreeSet;

use weir_tests::{
    cni::{Attachment, Node, result_ip},
    names,
    netns::Netns,
    privileged::require_root,
};

const PODS: usize = 300;
const CAPACITY: usize = 254;

fn in_parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.into_iter().map(|item| scope.spawn(|| f(item))).collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    })
}

#[test]
fn cni_parallel_adds_never_share_an_address_and_overflow_fails_with_51() {
    require_root();
    let node = Node::new().unwrap();
    let network = "parallel";
    let config = node.config("1.1.0", network, &["10.130.0.0/24"]);
    let pods: Vec<Netns> = in_parallel((0..PODS).collect(), |_| Netns::new("pod").unwrap());
    let attachments: Vec<Attachment> =
        pods.iter().map(|pod| Attachment::new(names::unique("ctr"), pod)).collect();

    let runs =
        in_parallel(attachments.iter().collect(), |a| node.weir("ADD", Some(a), &config).unwrap());
    let mut addresses = BTreeSet::new();
    let mut exhausted = 0;
    for run in &runs {
        if run.ok() {
            let ip = result_ip(&run.json().unwrap(), false).unwrap();
            assert!(addresses.insert(ip.clone()), "{ip} handed out twice");
        } else {
            assert_eq!(
                run.error_code().unwrap(),
                51,
                "failure other than exhaustion: {}",
                run.stdout
            );
            exhausted += 1;
        }
    }
    assert_eq!(addresses.len(), CAPACITY, "every address of the /24 is used once");
    assert_eq!(exhausted, PODS - CAPACITY);
    assert_eq!(node.reservations(network).unwrap().len(), CAPACITY);
    assert_eq!(node.links().unwrap().len(), CAPACITY, "failed ADDs leave no link");
    let status = node.weir("STATUS", None, &config).unwrap();
    assert_eq!(status.error_code().unwrap(), 51);

    let dels =
        in_parallel(attachments.iter().collect(), |a| node.weir("DEL", Some(a), &config).unwrap());
    for del in &dels {
        del.expect_ok().unwrap();
    }
    node.assert_clean(network).unwrap();
    node.weir("STATUS", None, &config).unwrap().expect_ok().unwrap();

    // The pool is full again: a second wave gets every address once more.
    let second = in_parallel(attachments[..CAPACITY].iter().collect(), |a| {
        node.weir("ADD", Some(a), &config).unwrap()
    });
    assert!(second.iter().all(|r| r.ok()), "second wave failed");
    in_parallel(attachments[..CAPACITY].iter().collect(), |a| {
        node.weir("DEL", Some(a), &config).unwrap().expect_ok().unwrap()
    });
    node.assert_clean(network).unwrap();
}
