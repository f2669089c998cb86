//! Container log files in the CRI format kubelet reads: one line per output line,
//! `<RFC3339Nano timestamp> <stdout|stderr> <F|P> <text>`. The timestamp is kept apart from the
//! text so `kubectl logs --timestamps` can show it or not.
use std::path::{Path, PathBuf};

/// One parsed log line.
#[derive(Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub timestamp: &'a str,
    pub stream: &'a str,
    pub text: &'a str,
}

/// Formats one complete output line (`text` without its newline).
pub fn format_line(timestamp: &str, stream: &str, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 48);
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(b" F ");
    out.extend_from_slice(text);
    out.push(b'\n');
    out
}

/// Parses one line of a log file (without its newline).
pub fn parse_line(line: &str) -> Option<LogLine<'_>> {
    let mut parts = line.splitn(4, ' ');
    let timestamp = parts.next()?;
    let stream = parts.next()?;
    let _tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    Some(LogLine { timestamp, stream, text })
}

/// Renders log lines as kubelet serves them: the text, prefixed by the timestamp when asked.
pub fn render(line: &LogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}\n", line.timestamp, line.text)
    } else {
        format!("{}\n", line.text)
    }
}

/// The last `n` complete lines of `content` (all when `n` is None).
pub fn tail(content: &str, n: Option<usize>) -> Vec<&str> {
    let lines: Vec<&str> = content.lines().collect();
    match n {
        Some(n) => lines[lines.len().saturating_sub(n)..].to_vec(),
        None => lines,
    }
}

/// The log file of one run (restart number `run`) of a container.
pub fn run_log_path(pod_dir: &Path, container: &str, run: u32) -> PathBuf {
    pod_dir.join("logs").join(container).join(format!("{run}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_render() {
        let raw = format_line("2026-01-02T03:04:05.123456789Z", "stdout", b"hello world");
        let text = String::from_utf8(raw).unwrap();
        let line = parse_line(text.trim_end()).unwrap();
        assert_eq!(line.stream, "stdout");
        assert_eq!(line.text, "hello world");
        assert_eq!(render(&line, false), "hello world\n");
        assert_eq!(render(&line, true), "2026-01-02T03:04:05.123456789Z hello world\n");
        let empty = parse_line("2026-01-02T03:04:05Z stderr F ").unwrap();
        assert_eq!(empty.text, "");
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", Some(2)), vec!["b", "c"]);
        assert_eq!(tail("a\nb\n", Some(5)), vec!["a", "b"]);
        assert_eq!(tail("a\nb\n", None), vec!["a", "b"]);
        assert!(tail("a\n", Some(0)).is_empty());
    }
}
