//! A `tshark` capture in a namespace, and its TCP segments read back.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::nat::lab::stop_child;
use crate::support::netns::{NetNs, run_cmd};
use crate::support::wait::scaled;

/// A `tshark` capture running in a namespace, writing a pcapng file.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
    stdout_reader: Option<thread::JoinHandle<()>>,
}

#[derive(Debug)]
pub struct CaptureSummary {
    pub captured: Option<u64>,
    pub dropped: u64,
    pub stderr: String,
}

impl Capture {
    /// Starts `tshark -i <iface> -f "(<filter>) or udp dst port 9" -w
    /// <file>` in `ns` and waits (bounded) until it is really capturing:
    /// tshark says `Capturing on` before dumpcap delivers packets, so
    /// `probe_from` (a namespace with a route to `probe_to`) sends a UDP
    /// datagram to `probe_to:9` every 100 ms until tshark prints one
    /// (`-P -l`: a summary line per packet, flushed). The probes are in the
    /// file too; `read_capture` returns TCP segments only.
    #[track_caller]
    pub fn start(
        ns: &NetNs,
        iface: &str,
        filter: &str,
        file: PathBuf,
        probe_from: &NetNs,
        probe_to: Ipv4Addr,
    ) -> Capture {
        let full = format!("({filter}) or (udp and dst host {probe_to} and dst port 9)");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tshark",
                "-n",
                "-l",
                "-P",
                "-i",
                iface,
                "-f",
                &full,
                "-B",
                "64",
                "-s",
                "160",
                "-w",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tshark: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("tshark stderr");
        let lines = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let out = child.stdout.take().expect("tshark stdout");
        let stdout_reader = thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !told && line.contains("UDP") {
                    told = tx.send(()).is_ok();
                }
            }
        });
        let mut cap = Capture {
            child: Some(child),
            file,
            stderr,
            reader: Some(reader),
            stdout_reader: Some(stdout_reader),
        };
        let timeout = scaled(Duration::from_secs(20));
        let start = Instant::now();
        let sock = probe_from
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .expect("probe socket");
        let mut probes = 0u32;
        loop {
            sock.send_to(b"capture probe", (probe_to, 9)).expect("send probe");
            probes += 1;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => {
                    eprintln!("tshark capturing after {:?} ({probes} probe(s))", start.elapsed());
                    return cap;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < timeout => {}
                Err(_) => {
                    let status = cap.child.as_mut().unwrap().try_wait().ok().flatten();
                    panic!(
                        "tshark saw none of {probes} probes within {timeout:?} (exit: {status:?}):\n{}",
                        cap.stderr.lock().unwrap().join("\n")
                    );
                }
            }
        }
    }

    /// SIGINT (tshark then writes out what it has), waits for it, and
    /// returns its own account of the capture.
    #[track_caller]
    pub fn stop(mut self) -> CaptureSummary {
        let mut child = self.child.take().expect("capture running");
        let status = stop_child(&mut child, libc::SIGINT, scaled(Duration::from_secs(20)));
        for r in [self.reader.take(), self.stdout_reader.take()].into_iter().flatten() {
            let _ = r.join();
        }
        let lines = self.stderr.lock().unwrap().clone();
        let text = lines.join("\n");
        if !status.is_some_and(|s| s.success() || s.code().is_none()) {
            panic!("tshark ended with {status:?}:\n{text}");
        }
        let captured = lines.iter().find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            (rest.starts_with("packet") && rest.contains("captured")).then(|| n.parse().ok())?
        });
        CaptureSummary {
            captured,
            dropped: dropped_count(&lines),
            stderr: text,
        }
    }
}

/// Packets tshark/dumpcap say they lost: the number before "packet(s)
/// dropped" on any of its lines (0 when it says nothing about drops).
fn dropped_count(lines: &[String]) -> u64 {
    let mut total = 0;
    for l in lines {
        let mut rest = l.as_str();
        while let Some(pos) = rest.find("dropped") {
            let before = &rest[..pos];
            let n = before
                .split(|c: char| !c.is_ascii_digit())
                .filter(|t| !t.is_empty())
                .last()
                .and_then(|t| t.parse::<u64>().ok());
            total += n.unwrap_or(0);
            rest = &rest[pos + "dropped".len()..];
        }
    }
    total
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGINT, Duration::from_secs(10));
        }
        for r in [self.reader.take(), self.stdout_reader.take()].into_iter().flatten() {
            let _ = r.join();
        }
    }
}

/// One TCP segment of the capture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Packet {
    /// Seconds since the first packet of the capture.
    pub t: f64,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u16,
    pub seq: u32,
    pub ack: u32,
    /// Payload length.
    pub len: u32,
}

pub const FIN: u16 = 0x01;
pub const SYN: u16 = 0x02;
pub const RST: u16 = 0x04;
pub const ACK: u16 = 0x10;

impl Packet {
    pub(super) fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

/// Reads a capture back (`tshark -r FILE -T fields`), raw sequence numbers:
/// the TCP segments, and how many frames the file holds in all.
#[track_caller]
pub fn read_capture(file: &Path) -> (Vec<Packet>, u64) {
    let f = file.to_str().expect("UTF-8 path");
    let mut args = vec!["-n", "-r", f, "-T", "fields", "-E", "separator=,", "-E", "occurrence=f"];
    for field in [
        "frame.time_relative",
        "ip.src",
        "tcp.srcport",
        "ip.dst",
        "tcp.dstport",
        "tcp.flags",
        "tcp.seq_raw",
        "tcp.ack_raw",
        "tcp.len",
    ] {
        args.extend(["-e", field]);
    }
    let text = run_cmd("tshark", &args);
    let frames: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let packets = frames
        .iter()
        // Frames without TCP fields: the capture's UDP probes.
        .filter(|l| l.split(',').nth(5).is_some_and(|f| !f.is_empty()))
        .map(|l| parse_packet(l).unwrap_or_else(|e| panic!("capture line {l:?}: {e}")))
        .collect();
    (packets, frames.len() as u64)
}

fn parse_packet(line: &str) -> Result<Packet, String> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 9 {
        return Err(format!("{} fields", f.len()));
    }
    let ip = |s: &str| s.parse::<Ipv4Addr>().map_err(|e| format!("{s:?}: {e}"));
    let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let flags = u16::from_str_radix(f[5].trim_start_matches("0x"), 16).map_err(|e| format!("flags {:?}: {e}", f[5]))?;
    Ok(Packet {
        t: f[0].parse().map_err(|e| format!("time {:?}: {e}", f[0]))?,
        src: SocketAddrV4::new(ip(f[1])?, num(f[2])? as u16),
        dst: SocketAddrV4::new(ip(f[3])?, num(f[4])? as u16),
        flags,
        seq: num(f[6])? as u32,
        ack: if f[7].is_empty() { 0 } else { num(f[7])? as u32 },
        len: if f[8].is_empty() { 0 } else { num(f[8])? as u32 },
    })
}
