//! The datapath smoke demo (`cargo xtask lab up` runs it until the lab exists): a real TCP
//! connection to a service VIP through weir's tc load balancer, between two network
//! namespaces that the demo creates and removes.
use anyhow::{Result, ensure};
use weir_tests::scenarios::{self, BACKEND_PORT, CLIENT, SERVER, VIP, VIP_PORT};

fn main() -> Result<()> {
    println!(
        "smoke: client {CLIENT} -> service {VIP}:{VIP_PORT} (TCP), backend {SERVER}:{BACKEND_PORT}, \
         weir's tc_lb4_fwd/tc_lb4_rev on the client's veth"
    );
    let trip = scenarios::tc_vip_roundtrip()?;
    println!("smoke: client read {:?} from {}", trip.reply.trim(), trip.client_saw_peer);
    println!("smoke: backend accepted on {} from {}", trip.server_local, trip.server_saw_peer);
    for (counter, value) in &trip.counters {
        println!("smoke: datapath counter {:<20} {value}", counter.name());
    }
    ensure!(trip.reply.starts_with("pong from "), "unexpected reply {:?}", trip.reply);
    println!("smoke: ok (namespaces and programs removed)");
    Ok(())
}
