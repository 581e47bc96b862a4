//! Issue 11: `timewaitd check` tells the truth. It loads and attaches what the
//! daemon would, so on every kernel of the matrix it must name the path that
//! kernel gets (see `support::expected_paths`) and exit 0. (That a stopped
//! loader leaves no program behind is `reliability`'s test.)

use std::process::Command;

use crate::support::{daemon_bin, expected_paths, expected_sockets_path, require_root, test_kernel, test_probe_path};

#[test]
fn check_names_the_path_it_attached() {
    if !require_root("check_names_the_path_it_attached") {
        return;
    }
    let forced = test_probe_path();
    let out = Command::new(daemon_bin())
        .args(["check", "--probe-path", forced.as_str()])
        .output()
        .expect("run timewaitd check");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(0), "check exits 0 where the daemon runs (kernel {})", test_kernel());
    let (lifecycle, segments) = expected_paths();
    let line = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}")).to_string()
    };
    let sockets = expected_sockets_path();
    let k = line("sockets");
    assert!(k.contains(" ok ") && k.contains(&format!("{sockets}:")), "sockets must be {sockets}: {k}");
    let bind = line("bind errors");
    let want_bind = crate::support::expected_bind_errors_path(false);
    assert!(bind.contains(" ok ") && bind.contains(&want_bind), "bind errors must be {want_bind}: {bind}");
    let l = line("lifecycle");
    assert!(l.contains(" ok ") && l.contains(&format!("{lifecycle}:")), "lifecycle must be {lifecycle}: {l}");
    let s = line("segments");
    if segments == "unavailable" {
        assert!(s.contains(" partial ") && s.contains("unavailable"), "segments must be unavailable: {s}");
        assert!(text.contains("lines marked partial"), "the summary names the partial lines");
    } else {
        assert!(s.contains(" ok ") && s.contains(&format!("{segments}:")), "segments must be {segments}: {s}");
    }
}
