//! `enforcer demo`, the README's first command: agents in namespaces behind the real
//! daemon, whose own checks fail the demo when a packet is not treated as the policy says.

use std::process::Command;

use enforcer::lab::require_root;
use integration_tests::enforcer_bin;

#[test]
fn the_demo_runs_its_agents_and_every_check_holds() {
    if !require_root("the_demo_runs_its_agents_and_every_check_holds") {
        return;
    }
    let out = Command::new(enforcer_bin())
        .args(["demo", "--seconds", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Each agent's table row, the audit records as `audit tail` shows them, the chain.
    for agent in ["coder", "browser", "intern"] {
        assert!(stdout.contains(agent), "{agent}: {stdout}");
    }
    assert!(stdout.contains("monitor_egress_denied"), "{stdout}");
    assert!(
        stdout.contains("TIME                     AGENT"),
        "the audit table's header: {stdout}"
    );
    assert!(stdout.contains("hash chain intact"), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("done: namespaces, pins and files removed"),
        "{stdout}"
    );
}
