//! A real Prometheus server (Debian's `prometheus`) scrapes a live daemon in
//! the test's namespace, and PromQL returns the TIME_WAIT count the test made.

use std::{
    fs,
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::{Daemon, NetNs, require_root, wait_until};

struct Prometheus(Child, std::path::PathBuf);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = fs::remove_dir_all(&self.1);
    }
}

/// `curl` inside the namespace; its own TIME_WAIT lands on port 9090, which
/// the query below does not look at.
fn query(ns: &NetNs, promql: &str) -> Option<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "curl", "-s", "-m", "5", "--get", "http://127.0.0.1:9090/api/v1/query"])
        .args(["--data-urlencode", &format!("query={promql}")])
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout);
    // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"40"]}]}}
    let v = body.split("\"value\":[").nth(1)?;
    let v = v.split(',').nth(1)?.trim_start_matches('"');
    v.split('"').next()?.parse().ok()
}

#[test]
fn prometheus_server() {
    if !require_root("prometheus_server") {
        return;
    }
    let ns = NetNs::new();
    let daemon = Daemon::start(&ns, &[]);
    let dir = std::env::temp_dir().join(format!("tw-prom-{}-{}", std::process::id(), ns.name()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("prometheus.yml"),
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: timewait\n    static_configs:\n      - targets: ['127.0.0.1:19868']\n",
    )
    .unwrap();
    let log = fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "prometheus"])
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus runs (cargo xtask setup installs Debian's prometheus)");
    let _prom = Prometheus(child, dir.clone());

    let listener = ns.listen("127.0.0.1:8080".parse().unwrap());
    let from: IpAddr = "127.0.0.2".parse().unwrap();
    ns.server_closes_first(&listener, &[(from, 40)]);

    let promql = r#"sum(timewait_sockets{direction="inbound",port="8080",remote="127.0.0.2"})"#;
    wait_until(Duration::from_secs(60), "Prometheus to return the 40 TIME_WAIT sockets the test made", || {
        query(&ns, promql) == Some(40.0)
    });
    assert_eq!(query(&ns, r#"up{job="timewait"}"#), Some(1.0));
    daemon.stop();
}
