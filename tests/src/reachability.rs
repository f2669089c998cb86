//! Pod-to-pod reachability probes run from inside pod network namespaces, and the matrix they
//! fill, printed like upstream's NetworkPolicy suite prints its reachability tables.
//!
//! A probe is a real connection from the source pod's namespace to the destination pod's
//! address: TCP connects and reads the reply, UDP sends one datagram and waits for one back.
//! It counts as reached only when the reply is the destination's expected answer (agnhost
//! `serve-hostname` answers with the pod's hostname, its name), so a connection that lands on
//! the wrong pod is not a success. Every probe of a matrix runs at once: one thread per source
//! enters its namespace, and each cell gets a thread inside it (threads inherit their creator's
//! network namespace), so a matrix costs about one timeout whatever its size.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use crate::netns;

/// The transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// A pod that probes and is probed.
#[derive(Clone, Debug)]
pub struct ProbePod {
    /// `ns/name`, as the matrix shows it.
    pub label: String,
    pub ip: Ipv4Addr,
    /// The pod's network namespace (`/run/netns/...`).
    pub netns: PathBuf,
    /// What the pod's servers answer (its hostname).
    pub answer: String,
}

/// One cell: source pod index, destination pod index, port, transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub from: usize,
    pub to: usize,
    pub port: u16,
    pub proto: Proto,
}

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub reached: bool,
    /// How it failed (`timeout`, `refused`, `answer "x-b"`), empty when reached.
    pub detail: String,
}

/// Probes every cell at once, each bounded by `timeout` (connect, then reply).
pub fn probe_all(
    pods: &[ProbePod],
    cells: &[Cell],
    timeout: Duration,
) -> BTreeMap<Cell, Observation> {
    let mut by_source: BTreeMap<usize, Vec<Cell>> = BTreeMap::new();
    for cell in cells {
        by_source.entry(cell.from).or_default().push(*cell);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = by_source
            .into_iter()
            .map(|(from, cells)| {
                scope.spawn(move || {
                    let source = &pods[from];
                    let inside = netns::run_in(&source.netns, || {
                        std::thread::scope(|inner| {
                            let probes: Vec<_> = cells
                                .iter()
                                .map(|cell| {
                                    let target = &pods[cell.to];
                                    inner.spawn(move || (*cell, probe_one(cell, target, timeout)))
                                })
                                .collect();
                            probes
                                .into_iter()
                                .map(|p| p.join().expect("a probe thread panicked"))
                                .collect::<Vec<_>>()
                        })
                    });
                    match inside {
                        Ok(results) => results,
                        Err(err) => cells
                            .iter()
                            .map(|cell| {
                                let detail = format!("cannot enter {}: {err:#}", source.label);
                                (*cell, Observation { reached: false, detail })
                            })
                            .collect(),
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a source thread panicked")).collect()
    })
}

fn probe_one(cell: &Cell, target: &ProbePod, timeout: Duration) -> Observation {
    let addr = SocketAddr::from((target.ip, cell.port));
    let answer = match cell.proto {
        Proto::Tcp => tcp_answer(addr, timeout),
        Proto::Udp => udp_answer(addr, timeout),
    };
    match answer {
        Ok(text) if text == target.answer => Observation { reached: true, detail: String::new() },
        Ok(text) => Observation { reached: false, detail: format!("answer {text:?}") },
        Err(err) => Observation { reached: false, detail: err },
    }
}

fn describe(err: std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".into(),
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        _ => err.to_string(),
    }
}

fn tcp_answer(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(describe)?;
    stream.set_read_timeout(Some(timeout)).map_err(describe)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(|e| format!("connected, then {}", describe(e)))?;
    Ok(text)
}

fn udp_answer(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(describe)?;
    socket.connect(addr).map_err(describe)?;
    socket.set_read_timeout(Some(timeout)).map_err(describe)?;
    socket.send(b"hostname\n").map_err(describe)?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).map_err(describe)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Upstream-style tables for every (port, transport) with a wrong cell: expected, observed,
/// and the comparison (`.` right, `X` wrong). Rows are sources, columns destinations; in
/// expected/observed `.` is reached and `X` blocked; cells not probed are blank.
pub fn render(
    labels: &[String],
    expected: &BTreeMap<Cell, bool>,
    observed: &BTreeMap<Cell, Observation>,
) -> String {
    let mut out = String::new();
    let mut groups: Vec<(u16, Proto)> = expected.keys().map(|c| (c.port, c.proto)).collect();
    groups.sort();
    groups.dedup();
    let width = labels.iter().map(String::len).max().unwrap_or(1).max(3);
    for (port, proto) in groups {
        let wrong = expected.iter().any(|(c, e)| {
            c.port == port && c.proto == proto && observed.get(c).is_none_or(|o| o.reached != *e)
        });
        if !wrong {
            continue;
        }
        for (title, symbol) in [
            (
                "expected",
                &(|c: &Cell| expected.get(c).map(|e| if *e { "." } else { "X" }))
                    as &dyn Fn(&Cell) -> Option<&'static str>,
            ),
            ("observed", &|c: &Cell| observed.get(c).map(|o| if o.reached { "." } else { "X" })),
            ("comparison (X = wrong)", &|c: &Cell| {
                let e = expected.get(c)?;
                Some(if observed.get(c).is_some_and(|o| o.reached == *e) { "." } else { "X" })
            }),
        ] {
            let _ = writeln!(out, "{} {port} {title}:", proto.name());
            let _ = write!(out, "{:width$} ", "");
            for label in labels {
                let _ = write!(out, " {label:>width$}");
            }
            out.push('\n');
            for (from, row) in labels.iter().enumerate() {
                let _ = write!(out, "{row:>width$} ");
                for to in 0..labels.len() {
                    let cell = Cell { from, to, port, proto };
                    let _ = write!(out, " {:>width$}", symbol(&cell).unwrap_or(""));
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_mark_wrong_cells() {
        let labels = vec!["x/a".to_string(), "x/b".to_string()];
        let cell = |from, to| Cell { from, to, port: 80, proto: Proto::Tcp };
        let mut expected = BTreeMap::new();
        let mut observed = BTreeMap::new();
        for from in 0..2 {
            for to in 0..2 {
                expected.insert(cell(from, to), from == to || from == 0);
                let reached = from == to || from == 0 || (from, to) == (1, 0);
                let detail = String::new();
                observed.insert(cell(from, to), Observation { reached, detail });
            }
        }
        let text = render(&labels, &expected, &observed);
        assert!(text.contains("TCP 80 expected:"), "{text}");
        let comparison = text.split("comparison").nth(1).unwrap();
        let row_b = comparison.lines().find(|l| l.trim_start().starts_with("x/b")).unwrap();
        assert_eq!(row_b.split_whitespace().collect::<Vec<_>>(), ["x/b", "X", "."]);
        observed.insert(cell(1, 0), Observation { reached: false, detail: "timeout".into() });
        assert_eq!(render(&labels, &expected, &observed), "", "no table when all cells agree");
    }
}
