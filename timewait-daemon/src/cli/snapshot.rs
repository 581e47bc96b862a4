//! `timewaitd snapshot [--json]`: the aggregated view once, from a running daemon or else the kernel.
//!
//! From the daemon's API or, when none answers, straight from the kernel (the
//! same probes and start-up snapshot the daemon uses, then detached).

use std::process::ExitCode;

use serde_json::Value;

use super::{
    api::http_get,
    args::RunArgs,
    config, fail, print_out,
    top::rows::{endpoint, fmt_left, fmt_rate},
};
use crate::{
    collect::Collector,
    kernel::load::{self, LoadOptions},
    model::aggregate::port_label,
};

pub fn main(args: &RunArgs, json: bool) -> ExitCode {
    let cfg = match config::resolve(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (view, source): (Value, String) = match http_get(cfg.listen, "/api/v1/snapshot") {
        Ok(body) => match serde_json::from_str(&body) {
            Ok(v) => (v, format!("daemon at {}", cfg.listen)),
            Err(e) => return fail(format!("the daemon at {} sent invalid JSON: {e}", cfg.listen)),
        },
        Err(_) => {
            let opts = LoadOptions::of(&cfg);
            match load::load(&opts) {
                Ok(p) => {
                    let v = Collector::new(p, cfg.max_series).read(&cfg.agg);
                    (serde_json::to_value(&v).unwrap_or(Value::Null), "kernel (no daemon answered)".into())
                }
                Err(e) => return fail(format!("no daemon at {} and reading the kernel failed: {e}", cfg.listen)),
            }
        }
    };
    let text = if json { format!("{view}\n") } else { render_table(&view, &source) };
    print_out(&text)
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The view as `ss`-like text, busiest first.
fn render_table(view: &Value, source: &str) -> String {
    let mut out = format!("# from {source}\n");
    let mut series: Vec<&Value> = view["series"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    series.sort_by_key(|x| std::cmp::Reverse(n(x, "time_wait") + n(x, "fin_wait2")));
    // With --attribute-cgroups the series are per cgroup too.
    let cgroups = series.iter().any(|x| x.get("cgroup").is_some());
    out.push_str(&format!(
        "{:<9} {:<40} {:>5} {:>10} {:>10} {:>12}{}\n",
        "DIRECTION",
        "REMOTE",
        "PORT",
        "TIME_WAIT",
        "FIN_WAIT2",
        "PORTS_IN_USE",
        if cgroups { "  CGROUP" } else { "" }
    ));
    let (mut tw, mut fw) = (0, 0);
    for x in series {
        let in_use = if s(x, "direction") == "outbound" {
            (n(x, "connections") + n(x, "time_wait") + n(x, "fin_wait2")).to_string()
        } else {
            "-".into()
        };
        tw += n(x, "time_wait");
        fw += n(x, "fin_wait2");
        out.push_str(&format!(
            "{:<9} {:<40} {:>5} {:>10} {:>10} {:>12}{}\n",
            s(x, "direction"),
            s(x, "remote"),
            port_label(n(x, "port") as u16),
            n(x, "time_wait"),
            n(x, "fin_wait2"),
            in_use,
            if cgroups { format!("  {}", s(x, "cgroup")) } else { String::new() }
        ));
    }
    out.push_str(&format!("total: {tw} TIME_WAIT, {fw} FIN_WAIT2\n"));
    if let Some(syns) = view["syns"].as_array().filter(|a| !a.is_empty()) {
        out.push_str(&format!("\n{:<40} {:>10} {:>10}\n", "SYN FROM", "TOTAL", "REJECTED"));
        for x in syns {
            out.push_str(&format!("{:<40} {:>10} {:>10}\n", s(x, "remote"), n(x, "total"), n(x, "rejected")));
        }
    }
    if let Some(range) = view["sysctls"]["local_port_range_size"].as_u64() {
        out.push_str(&format!("\nlocal port range: {range} ports\n"));
    }
    if let Some(est) = view["estimates"].as_array().filter(|a| !a.is_empty()) {
        out.push_str(&format!(
            "\n{:<46} {:>8} {:>10} {:>10} {:>10}\n",
            "TIME TO EXHAUSTION", "NEW/S", "FREED_10S", "FREED_60S", "LEFT"
        ));
        for x in est {
            let left = x.get("seconds_left").map(Value::as_f64);
            out.push_str(&format!(
                "{:<46} {:>8} {:>10} {:>10} {:>10}\n",
                endpoint(s(x, "remote"), n(x, "port") as u16),
                fmt_rate(x.get("rate").and_then(Value::as_f64).unwrap_or(0.0)),
                n(x, "freed_10s"),
                n(x, "freed_60s"),
                fmt_left(left)
            ));
        }
    }
    render_nat(view, &mut out);
    out
}

/// The NAT side (a balancer): ports held per (NAT address, destination).
fn render_nat(view: &Value, out: &mut String) {
    let nat = &view["nat"];
    match nat["state"].as_str() {
        Some("watched") => {}
        Some(state) => {
            out.push_str(&format!("
NAT: {state}: {}
", s(nat, "unavailable")));
            return;
        }
        None => return,
    }
    let mut series: Vec<&Value> = nat["series"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    if series.is_empty() {
        out.push_str(&format!("
NAT: no NATed connections ({} conntrack entries)
", n(nat, "dump_entries")));
        return;
    }
    series.sort_by_key(|x| std::cmp::Reverse(n(x, "in_use")));
    out.push_str(&format!(
        "
{:<40} {:<46} {:>5} {:>8} {:>10} {:>6} {:>10}
",
        "NAT ADDRESS", "DESTINATION", "PROTO", "IN_USE", "TIME_WAIT", "RATIO", "LEFT"
    ));
    for x in series {
        let ratio = x.get("ratio").and_then(Value::as_f64).map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
        // Absent: not estimated yet (one dump so far); null: never (+Inf).
        let left = fmt_left(x.get("seconds").map(Value::as_f64));
        out.push_str(&format!(
            "{:<40} {:<46} {:>5} {:>8} {:>10} {:>6} {:>10}
",
            s(x, "nat_address"),
            format!("{}:{}", s(x, "remote"), s(x, "port")),
            s(x, "protocol"),
            n(x, "in_use"),
            n(x, "time_wait"),
            ratio,
            left
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sorts_busiest_first_and_totals() {
        let v: Value = serde_json::from_str(
            r#"{"series":[
                {"direction":"outbound","remote":"10.0.0.1","port":443,"time_wait":2,"fin_wait2":0,"connections":5},
                {"direction":"inbound","remote":"10.0.0.2","port":80,"time_wait":9,"fin_wait2":1,"connections":0}],
              "syns":[{"remote":"10.0.0.2","total":4,"rejected":1}],
              "sysctls":{"local_port_range_size":28232},
              "estimates":[{"remote":"10.0.0.1","port":443,"seconds_left":12.2,"rate":4.0,"freed_10s":0,"freed_60s":2},
                           {"remote":"10.0.0.3","port":80,"seconds_left":null,"rate":0.0,"freed_10s":1,"freed_60s":1}]}"#,
        )
        .unwrap();
        let t = render_table(&v, "test");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[2].starts_with("inbound") && lines[2].contains("10.0.0.2"), "{t}");
        assert!(lines[3].trim_end().ends_with('7'), "ports in use = 5 + 2: {t}");
        assert!(t.contains("total: 11 TIME_WAIT, 1 FIN_WAIT2"), "{t}");
        assert!(t.contains("28232 ports"), "{t}");
        let est: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("TIME TO EXHAUSTION")).collect();
        assert!(est[1].starts_with("10.0.0.1:443") && est[1].trim_end().ends_with("12s"), "{t}");
        assert!(est[2].trim_end().ends_with("never"), "{t}");
    }

    #[test]
    fn nat_section_shows_destinations_busiest_first() {
        let v: Value = serde_json::from_str(
            r#"{"series":[],"nat":{"state":"watched","dump_entries":12,"series":[
                {"nat_address":"10.98.3.1","remote":"10.98.3.2","port":"80","protocol":"tcp","in_use":2,"time_wait":2,"ratio":0.25,"seconds":null},
                {"nat_address":"10.98.3.1","remote":"10.98.3.2","port":"5000","protocol":"udp","in_use":8,"time_wait":0,"ratio":1.0,"seconds":0.0},
                {"nat_address":"10.98.3.1","remote":"other","port":"other","protocol":"tcp","in_use":3,"time_wait":0}]}}"#,
        )
        .unwrap();
        let t = render_table(&v, "test");
        let nat: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("NAT ADDRESS")).collect();
        assert!(nat[1].contains("10.98.3.2:5000") && nat[1].contains("1.00") && nat[1].trim_end().ends_with("0s"), "{t}");
        assert!(nat[2].contains("other:other") && nat[2].trim_end().ends_with('-'), "{t}");
        assert!(nat[3].contains("10.98.3.2:80") && nat[3].trim_end().ends_with("never"), "{t}");
        let off: Value = serde_json::from_str(r#"{"series":[],"nat":{"state":"off","unavailable":"--nat off"}}"#).unwrap();
        assert!(render_table(&off, "test").contains("NAT: off: --nat off"));
    }
}
