//! Bad input on the command line and in the config file: one clear line on
//! stderr and exit code 2, never a panic or a backtrace. Needs no root: every
//! case fails before the probes load.

use std::{net::TcpListener, process::Command};

fn timewaitd(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_timewaitd")).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[track_caller]
fn assert_one_line_exit_2(args: &[&str], expect: &str) {
    let (code, err) = timewaitd(args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line, got {err}");
}

#[test]
fn bad_flags() {
    assert_one_line_exit_2(&["--bogus"], "unexpected argument '--bogus'");
    assert_one_line_exit_2(&["--web.listen-address", "localhost"], "invalid web.listen-address");
    assert_one_line_exit_2(&["--aggregate-ipv4-prefix", "33"], "aggregate-ipv4-prefix");
    assert_one_line_exit_2(&["--aggregate-ipv6-prefix", "129"], "aggregate-ipv6-prefix");
    assert_one_line_exit_2(&["--top-remotes", "0"], "top-remotes");
    assert_one_line_exit_2(&["--top-remotes", "-3"], "timewaitd: ");
    assert_one_line_exit_2(&["snapshot", "--json", "extra"], "unexpected argument 'extra'");
    assert_one_line_exit_2(&["--remote-port-range-size", "70000"], "remote-port-range-size");
    assert_one_line_exit_2(&["--log.level", "[[["], "invalid log.level");
}

#[test]
fn bad_config_files() {
    let dir = std::env::temp_dir().join(format!("tw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("unknown.toml", "top-remots = 5\n", "unknown field `top-remots`"),
        ("type.toml", "top-remotes = \"many\"\n", "line 1"),
        ("addr.toml", "[web]\nlisten-address = \"nowhere\"\n", "invalid web.listen-address"),
        ("syntax.toml", "top-remotes = \n", "line 1"),
    ];
    for (name, text, expect) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        assert_one_line_exit_2(&["--config", path.to_str().unwrap()], expect);
    }
    assert_one_line_exit_2(&["--config", "/nonexistent/timewaitd.toml"], "cannot read config file /nonexistent/timewaitd.toml");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_one_line_exit_2(&["run", "--web.listen-address", &addr], &format!("cannot listen on {addr}"));
}

#[test]
fn help_names_the_contract_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_timewaitd")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--web.listen-address", "--top-remotes", "--aggregate-ipv4-prefix", "--aggregate-ipv6-prefix", "--web.config.file", "--config", "--all-netns"] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    for cmd in ["run", "check", "snapshot", "top"] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_timewaitd")).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{v}");
    let prefix = format!("timewaitd {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(v.starts_with(&prefix) && v.trim_end().ends_with(')'), "{v}");
    // Built from a git checkout (this repository), the commit is known.
    let in_git = Command::new("git").args(["rev-parse", "HEAD"]).output().is_ok_and(|o| o.status.success());
    if in_git && std::env::var_os("TIMEWAIT_COMMIT").is_none() {
        let id = v.trim_end().trim_end_matches(')').rsplit(' ').next().unwrap_or("");
        assert!(id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()), "a 12-digit commit id: {v}");
    }
}

/// What the package ships beside the binary: a man page and completions
/// generated from the same clap definitions.
#[test]
fn generate_assets_writes_man_page_and_completions() {
    let dir = std::env::temp_dir().join(format!("tw-assets-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_timewaitd")).arg("generate-assets").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let man = read("timewaitd.8");
    assert!(man.contains(".TH timewaitd 8") && man.contains("reconcile\\-interval"), "{man}");
    assert!(read("completions/timewaitd.bash").contains("--web.listen-address"));
    assert!(read("completions/_timewaitd").contains("--top-remotes"));
    assert!(read("completions/timewaitd.fish").contains("top-remotes"));
    std::fs::remove_dir_all(&dir).unwrap();
    // A folder that cannot be made is one line and exit 2.
    assert_one_line_exit_2(&["generate-assets", "/proc/version/x"], "cannot write into /proc/version/x");
}
