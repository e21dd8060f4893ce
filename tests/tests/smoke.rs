use warden_tests::*;

#[test]
fn smoke() {
    if !privileged("runs real sandboxes") {
        return;
    }
    let host = Host::new(&[]);
    let attack = host.install_attack("alice", "demo");
    let out = host.run("alice", "demo", "claude-code", &[&attack, "status"]);
    eprintln!("{out:#?}");
    assert_eq!(out.code, 0);
}
