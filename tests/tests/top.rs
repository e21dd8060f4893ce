//! `wardenctl top` as a person sees it: in a real terminal (tmux), the
//! running workers refreshed in place, busiest first; piped, plain tables.

use std::process::Command;
use std::time::{Duration, Instant};

use warden_tests::daemon::Daemon;
use warden_tests::*;

fn root() -> bool {
    privileged("runs wardend, which builds sandboxes and cgroups")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux is installed");
    text(&out.stdout)
}

/// Ends the tmux session when dropped.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
    }
}

#[test]
fn top_refreshes_in_a_terminal_and_prints_plain_tables_to_a_pipe() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let spawn = |user: &str, cmd: &[&str]| {
        let mut args = vec!["spawn", "--user", user, "--"];
        args.extend_from_slice(cmd);
        let out = d.ctl(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let busy = spawn("alice", &["sh", "-c", "while :; do :; done"]);
    let idle = spawn("bob", &["sleep", "600"]);

    // A terminal of 160 columns by 40 lines, refreshing twice a second.
    let name = format!("warden-top-{}", std::process::id());
    let command = format!(
        "{} --socket {} top -d 0.5",
        bin_dir().join("wardenctl").display(),
        d.socket().display()
    );
    tmux(&["new-session", "-d", "-s", &name, "-x", "160", "-y", "40", &command]);
    let _session = Session(name.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let pane = loop {
        let pane = tmux(&["capture-pane", "-p", "-t", &name]);
        // Past the first frame (whose CPU shares are since each start).
        if pane.contains(&busy) && pane.contains(&idle) && pane.contains("warden: 2 running") {
            std::thread::sleep(Duration::from_millis(1200));
            break tmux(&["capture-pane", "-p", "-t", &name]);
        }
        assert!(Instant::now() < deadline, "top never showed both workers:\n{pane}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines: Vec<&str> = pane.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines[0].starts_with("warden: 2 running"), "{pane}");
    assert!(
        lines[1].contains("ID") && lines[1].contains("CPU%") && lines[1].contains("MEMORY"),
        "{pane}"
    );
    // One frame on the screen: refreshed in place, not scrolled.
    assert_eq!(pane.matches("warden: ").count(), 1, "{pane}");
    // The busy worker first, using most of a CPU; the idle one next.
    let first: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        (first[0], first[1], first[2]),
        (busy.as_str(), "alice", "base"),
        "{pane}"
    );
    let cpu: f64 = first[3].parse().unwrap();
    assert!(cpu > 30.0, "the busy worker's CPU share: {pane}");
    assert!(
        lines[3].starts_with(&idle) && lines[3].contains("bob") && lines[3].contains("sleep 600"),
        "{pane}"
    );

    // Piped: two plain tables, no escape sequence.
    let out = d.ctl(&["top", "-n", "2", "-d", "0.2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let piped = text(&out.stdout);
    assert!(!piped.contains('\x1b'), "{piped:?}");
    assert_eq!(piped.matches("warden: 2 running").count(), 2, "{piped}");
    assert!(piped.contains(&busy) && piped.contains(&idle), "{piped}");

    for id in [&busy, &idle] {
        let _ = d.ctl(&["kill", id, "-s", "KILL"]);
    }
}
