//! Kernel audit on a host without auditd: wardend turns it on for landlock
//! denials, and adds the task rule `never` so that no process on the host
//! takes the syscall audit path for it (and deletes the rule at its end).
//! Its own test binary: it turns audit off, which no other test may see
//! while it runs.

use std::time::{Duration, Instant};

use warden_daemon::landlock_audit::{delete_never_rule, never_task_rules, set_enabled};
use warden_tests::daemon::Daemon;
use warden_tests::*;

#[test]
fn a_daemon_that_turns_audit_on_spares_the_host_the_syscall_path_and_still_reports_landlock_denials() {
    if !privileged("changes the kernel's audit status and rules, runs wardend") {
        return;
    }
    // A host without auditd (the kernel may remember audit was on once:
    // from then on, without a rule, every new process is audited).
    set_enabled(false).unwrap();
    // A test daemon killed with SIGKILL leaves its rule: not this test's.
    while never_task_rules().unwrap() > 0 {
        delete_never_rule().unwrap();
    }
    let d = Daemon::start();
    assert_eq!(never_task_rules().unwrap(), 1, "wardend added the task rule `never`");

    // Landlock's records now come alone (no SYSCALL record, no end of
    // event): each denial is still reported, at once, for its worker.
    let out = d.ctl(&["spawn", "--user", "alice", "-w", "--", "ls", "/"]);
    assert!(!out.status.success(), "ls / is denied");
    let started = d.events(&["--kind", "worker_started"]);
    assert_eq!(started[0]["landlock_denials_observable"], true, "{:?}", started[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let denial = loop {
        let ev = d.events(&["--kind", "sandbox_denial", "--user", "alice"]);
        if let Some(e) = ev.into_iter().find(|e| e["layer"] == "landlock") {
            break e;
        }
        assert!(Instant::now() < deadline, "no landlock denial reported");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (denial["access"].as_str(), denial["path"].as_str()),
        (Some("fs.read_dir"), Some("/"))
    );

    // Its end deletes the rule; audit stays on for whoever reads it.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while never_task_rules().unwrap() != 0 {
        assert!(Instant::now() < deadline, "the rule outlived the daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
}
