//! Sandbox denials: a worker's denied system calls, as its init reports
//! them on the worker's denial pipe.
//!
//! The init answers every denied call with EPERM in the worker's own
//! cgroup and writes rate-limited reports; this reads them and makes them
//! `sandbox_denial` events, under the daemon's own limit too (the pipe is
//! the worker's side: nothing on it is trusted to be well-formed or
//! polite).
//!
//! Must never: read an unbounded line, or report more than the worker's
//! `worker_denials` rate whatever the pipe carries.

use std::time::Instant;

use tokio::io::AsyncReadExt;
use warden_policy::DenialReport;

use crate::limits::Bucket;

/// The longest report line read; a longer one ends the relay.
const MAX_LINE: usize = 1024;

/// One reported denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub syscall: String,
    /// In the worker's PID namespace.
    pub pid: u32,
    /// Denials of this worker not reported since the previous report.
    pub suppressed: u64,
}

/// A denial pipe that carried something other than reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("A denial report is malformed or longer than {MAX_LINE} bytes")]
pub struct Malformed;

/// Splits report lines off `buf` and parses them (at most [`MAX_LINE`]
/// each; a longer or unparsable one is an error).
pub fn parse(buf: &mut Vec<u8>) -> Result<Vec<DenialReport>, Malformed> {
    let mut out = Vec::new();
    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        out.push(serde_json::from_slice(&line).map_err(|_| Malformed)?);
    }
    if buf.len() > MAX_LINE {
        return Err(Malformed);
    }
    Ok(out)
}

/// Relays a worker's denial reports until its init closes the pipe:
/// each admitted by `limit` goes to `report`, the rest are counted into
/// the next one (and a last count when the pipe ends).
pub async fn relay(pipe: std::os::fd::OwnedFd, mut limit: Bucket, mut report: impl FnMut(Denial)) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut held = 0u64;
    let mut last_pid = 0;
    loop {
        let n = match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let Ok(lines) = parse(&mut buf) else {
            tracing::warn!("a worker's denial pipe carried a malformed report; no more are read from it");
            break;
        };
        for r in lines {
            last_pid = r.pid;
            let covers = r.suppressed.saturating_add(1);
            if r.syscall != "(suppressed)" && limit.take(1.0, Instant::now()) {
                report(Denial {
                    syscall: r.syscall,
                    pid: r.pid,
                    suppressed: held + r.suppressed,
                });
                held = 0;
            } else {
                held = held.saturating_add(if r.syscall == "(suppressed)" {
                    r.suppressed
                } else {
                    covers
                });
            }
        }
    }
    if held > 0 {
        report(Denial {
            syscall: "(suppressed)".into(),
            pid: last_pid,
            suppressed: held,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_split_into_lines_and_bounded() {
        let mut buf = br#"{"syscall":"chroot","pid":7,"suppressed":0}
{"syscall":"mount","pid":8,"suppressed":3}
{"sysc"#
            .to_vec();
        let got = parse(&mut buf).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].syscall.as_str(), got[1].suppressed), ("mount", 3));
        assert_eq!(buf, br#"{"sysc"#);
        let mut long = vec![b'x'; MAX_LINE + 1];
        assert!(parse(&mut long).is_err());
        let mut bad = b"not json\n".to_vec();
        assert!(parse(&mut bad).is_err());
    }

    #[tokio::test]
    async fn the_relay_keeps_to_its_own_limit_and_counts_the_rest() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut text = String::new();
        for i in 0..10 {
            text.push_str(&format!("{{\"syscall\":\"chroot\",\"pid\":{i},\"suppressed\":1}}\n"));
        }
        text.push_str("{\"syscall\":\"(suppressed)\",\"pid\":9,\"suppressed\":5}\n");
        std::io::Write::write_all(&mut std::fs::File::from(w), text.as_bytes()).unwrap();
        let mut got = Vec::new();
        relay(r, Bucket::new(warden_policy::Rate::new(3, 0.001)), |d| got.push(d)).await;
        // Three reports (each covering one before it), then the rest:
        // 7 reports of 2 denials each, and 5 more.
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].suppressed, 1);
        assert_eq!(got[3].syscall, "(suppressed)");
        assert_eq!(got[3].suppressed, 7 * 2 + 5);
    }
}
