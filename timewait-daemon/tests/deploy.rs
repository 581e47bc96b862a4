//! Checks of what ships in deploy/: the Prometheus alert rules and their unit
//! tests, with Debian's promtool (installed by `cargo xtask test`).

use std::{path::PathBuf, process::Command};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy_dir())
        .output()
        .unwrap_or_else(|e| panic!("promtool not runnable ({e}): `cargo xtask setup` installs Debian's prometheus package"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "timewait.rules.yml"]);
    assert!(out.contains("SUCCESS: 12 rules found"), "{out}");
}

/// The unit tests assert both that each alert fires (exhaustion high for
/// minutes, overflow increasing, connect errors, SYN rejections for one
/// remote; NAT ports of one destination, NAT allocation failures per
/// destination or from conntrack's stats, a full conntrack table) and that
/// it stays quiet where it should (folded series, counter resets).
#[test]
fn alert_rule_unit_tests_pass() {
    let out = promtool(&["test", "rules", "timewait.rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}
