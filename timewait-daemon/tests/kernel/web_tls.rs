//! `--web.config.file`: TLS and basic auth (exporter-toolkit format), checked
//! with real `curl` over TLS, inside the test's own namespace.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::{NetNs, require_root, run_cmd, wait_until};

/// `curl` inside the namespace; returns the HTTP status ("000" when the
/// connection or handshake failed).
fn curl(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn web_tls() {
    if !require_root("web_tls") {
        return;
    }
    let ns = NetNs::new();
    let dir = std::env::temp_dir().join(format!("tw-tls-{}-{}", std::process::id(), ns.name()));
    fs::create_dir_all(&dir).unwrap();
    let d = |f: &str| dir.join(f).display().to_string();
    run_cmd(
        "openssl",
        &[
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", &d("tls.key"), "-out", &d("tls.crt"), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
    );
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    fs::write(
        dir.join("web.yml"),
        format!("tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\nbasic_auth_users:\n  prometheus: {hash}\n"),
    )
    .unwrap();

    let log = fs::File::create(dir.join("daemon.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_timewaitd"), "run", "--web.config.file", &d("web.yml")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start timewaitd");
    let https = |path: &str| format!("https://127.0.0.1:19868{path}");
    let ok = ["--cacert", &d("tls.crt"), "-u", "prometheus:s3cret"];
    wait_until(Duration::from_secs(60), "readyz over TLS with the right password", || {
        curl(&ns, &[&ok[..], &[&https("/readyz")]].concat()) == "200"
    });

    assert_eq!(curl(&ns, &[&ok[..], &[&https("/metrics")]].concat()), "200");
    assert_eq!(curl(&ns, &["--cacert", &d("tls.crt"), "-u", "prometheus:wrong", &https("/metrics")]), "401", "wrong password");
    assert_eq!(curl(&ns, &["--cacert", &d("tls.crt"), "-u", "nobody:s3cret", &https("/metrics")]), "401", "unknown user");
    assert_eq!(curl(&ns, &["--cacert", &d("tls.crt"), &https("/metrics")]), "401", "no credentials");
    assert_eq!(curl(&ns, &["http://127.0.0.1:19868/metrics"]), "000", "plain HTTP must be refused");
    // A TLS client that does not trust the certificate fails the handshake.
    assert_eq!(curl(&ns, &["-u", "prometheus:s3cret", &https("/metrics")]), "000");

    // SAFETY: kill with a valid pid; SIGTERM is the documented stop.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM should exit 0, got {status}; log in {}", dir.display());
    let _ = fs::remove_dir_all(&dir);
}

/// A web config that cannot be used is one clear line and exit code 2.
#[test]
fn web_config_errors_exit_2() {
    let dir = std::env::temp_dir().join(format!("tw-tlsbad-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("plain.yml", "basic_auth_users:\n  u: plain-text\n", "not a bcrypt hash"),
        ("missing.yml", "tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n", "none.crt"),
        ("typo.yml", "tls_server_cfg: {}\n", "unknown field"),
    ];
    for (name, text, expect) in cases {
        fs::write(dir.join(name), text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_timewaitd"))
            .args(["run", "--web.listen-address", "127.0.0.1:0", "--web.config.file"])
            .arg(Path::new(&dir).join(name))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line, got {err}");
        assert!(err.contains(expect), "{name}: {err}");
    }
    let _ = fs::remove_dir_all(&dir);
}
