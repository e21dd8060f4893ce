//! `wardenctl top`: the running workers and what each uses (CPU, memory,
//! processes, traffic through the proxy, age), refreshed in place like
//! systemd-cgtop or `docker stats`; when stdout is not a terminal, one
//! plain table per refresh.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;
use warden_proto::v1 as pb;
use warden_proto::v1::workers_client::WorkersClient;

use crate::text::plain;

/// What `top` was asked for.
#[derive(Debug)]
pub struct Options {
    pub interval: Duration,
    /// Refreshes before it exits (None: until interrupted).
    pub iterations: Option<u32>,
    pub user: Option<String>,
}

/// The terminal's alternate screen, left when dropped (so that an
/// interrupted `top` gives the shell its screen back).
struct Screen {
    on: bool,
}

impl Screen {
    fn enter(on: bool) -> Screen {
        if on {
            print!("\x1b[?1049h\x1b[?25l");
        }
        Screen { on }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if self.on {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
        }
    }
}

pub async fn run(client: &mut WorkersClient<Channel>, opts: Options) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let screen = Screen::enter(tty);
    let mut before: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut n = 0u32;
    loop {
        let workers = client
            .list(pb::ListWorkersRequest {
                user: opts.user.clone().unwrap_or_default(),
                include_exited: false,
                usage: true,
            })
            .await?
            .into_inner()
            .workers;
        let now = Instant::now();
        let lines = frame(&workers, &mut before, now, SystemTime::now());
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear, then the frame: it replaces the last one.
            write!(out, "\x1b[H\x1b[2J")?;
            for l in &lines {
                write!(out, "{l}\r\n")?;
            }
        } else {
            for l in &lines {
                writeln!(out, "{l}")?;
            }
            writeln!(out)?;
        }
        out.flush()?;
        drop(out);
        n += 1;
        if opts.iterations.is_some_and(|max| n >= max) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(opts.interval) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(screen);
    Ok(())
}

/// One refresh: a summary line, a header, and a row per worker, busiest
/// first. `before` holds each worker's CPU time at the last refresh, for
/// the CPU share since (at the first, the share since it started).
fn frame(
    workers: &[pb::Worker],
    before: &mut HashMap<String, (u64, Instant)>,
    now: Instant,
    wall: SystemTime,
) -> Vec<String> {
    let now_ms = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut rows: Vec<(f64, &pb::Worker)> = workers
        .iter()
        .map(|w| {
            let age_ms = now_ms
                .saturating_sub(u128::try_from(w.started_at_ms).unwrap_or(0))
                .max(1);
            #[allow(clippy::cast_precision_loss)] // µs and ms far below 2^52.
            let cpu = match before.get(&w.id) {
                Some((cpu_us, at)) => {
                    let used = w.cpu_time_us.saturating_sub(*cpu_us) as f64;
                    used / (now.duration_since(*at).as_micros().max(1) as f64) * 100.0
                }
                None => w.cpu_time_us as f64 / (age_ms as f64 * 1000.0) * 100.0,
            };
            (cpu, w)
        })
        .collect();
    before.retain(|id, _| workers.iter().any(|w| w.id == *id));
    for w in workers {
        before.insert(w.id.clone(), (w.cpu_time_us, now));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.memory_bytes.cmp(&a.1.memory_bytes)));
    // (An empty sum is -0.0.)
    let total_cpu: f64 = rows.iter().map(|r| r.0).sum::<f64>() + 0.0;
    let total_mem: u64 = workers.iter().map(|w| w.memory_bytes).sum();
    let total_pids: u64 = workers.iter().map(|w| w.pids).sum();
    let mut lines = vec![
        format!(
            "warden: {} running, CPU {:.1}%, memory {}, {} processes",
            workers.len(),
            total_cpu,
            bytes(total_mem),
            total_pids
        ),
        format!(
            "{:<14} {:<12} {:<12} {:>6} {:>8} {:>5} {:>8} {:>8} {:>7}  COMMAND",
            "ID", "USER", "PROFILE", "CPU%", "MEMORY", "PIDS", "NET IN", "NET OUT", "AGE"
        ),
    ];
    for (cpu, w) in rows {
        let (up, down) = w.network.as_ref().map_or((0, 0), |n| (n.bytes_up, n.bytes_down));
        let age = now_ms.saturating_sub(u128::try_from(w.started_at_ms).unwrap_or(0)) / 1000;
        let mut command = plain(&w.command.join(" "));
        if command.chars().count() > 40 {
            command = command.chars().take(39).collect::<String>() + "…";
        }
        lines.push(format!(
            "{:<14} {:<12} {:<12} {:>6.1} {:>8} {:>5} {:>8} {:>8} {:>7}  {}",
            plain(&w.id),
            plain(&w.user),
            plain(&w.profile),
            cpu,
            bytes(w.memory_bytes),
            w.pids,
            bytes(down),
            bytes(up),
            duration(age),
            command
        ));
    }
    lines
}

/// 0, 812K, 12.3M, 1.5G.
fn bytes(n: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // A display.
    let f = n as f64;
    match n {
        0 => "0".into(),
        n if n < 1 << 20 => format!("{}K", (n + 1023) >> 10),
        n if n < 1 << 30 => format!("{:.1}M", f / f64::from(1u32 << 20)),
        _ => format!("{:.1}G", f / f64::from(1u32 << 30)),
    }
}

/// 42s, 3m05s, 2h07m, 3d04h.
fn duration(secs: u128) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, cpu_us: u64, mem: u64, started_ms: i64) -> pb::Worker {
        pb::Worker {
            id: id.into(),
            user: "alice".into(),
            profile: "base".into(),
            command: vec!["sh".into(), "-c".into(), "yes\x1b[2J > /dev/null".into()],
            cpu_time_us: cpu_us,
            memory_bytes: mem,
            pids: 2,
            started_at_ms: started_ms,
            ..Default::default()
        }
    }

    #[test]
    fn the_busiest_worker_comes_first_and_no_control_character_gets_through() {
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let now = Instant::now();
        let mut before = HashMap::new();
        let first = [
            worker("w1", 1_000_000, 5 << 20, 990_000),
            worker("w2", 9_000_000, 1 << 20, 990_000),
        ];
        let lines = frame(&first, &mut before, now, wall);
        assert!(
            lines[0].starts_with("warden: 2 running, CPU 100.0%, memory 6.0M, 4 processes"),
            "{lines:?}"
        );
        assert!(lines[2].starts_with("w2 ") && lines[3].starts_with("w1 "), "{lines:?}");
        // A second later w1 used a whole CPU second, w2 nothing.
        let later = [
            worker("w1", 2_000_000, 5 << 20, 990_000),
            worker("w2", 9_000_000, 1 << 20, 990_000),
        ];
        let lines = frame(
            &later,
            &mut before,
            now + Duration::from_secs(1),
            wall + Duration::from_secs(1),
        );
        assert!(lines[2].starts_with("w1 ") && lines[2].contains(" 100.0 "), "{lines:?}");
        assert!(lines[2].contains("11s"), "its age: {lines:?}");
        assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:?}");
    }

    #[test]
    fn nothing_running_is_zero_percent() {
        let lines = frame(&[], &mut HashMap::new(), Instant::now(), UNIX_EPOCH);
        assert_eq!(lines[0], "warden: 0 running, CPU 0.0%, memory 0, 0 processes");
    }

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(
            [bytes(0), bytes(1000), bytes(5 << 20), bytes(3 << 30)],
            ["0", "1K", "5.0M", "3.0G"]
        );
        assert_eq!(
            [duration(42), duration(185), duration(7620), duration(273_600)],
            ["42s", "3m05s", "2h07m", "3d04h"]
        );
    }
}
